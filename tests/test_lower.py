"""bench/lower.py, aot_memory.py, memory_plan.py: every program lowers for GPU and TPU without a device, the
bf16 steps' float32 HIGHEST matmuls, the FSDP all-gathers after SPMD partitioning, and the memory plans."""

import re

import jax
import pytest

from bench import aot_memory, benchmark, lower, memory_plan

TINY_CODEBOOK = benchmark.SIZES["tiny"].tokenizer.codebook_size
BF16_PROGRAMS = (
  "pretrain",
  "pretrain_fused",
  "mage_c",
  "class_cond",
  "tokenizer",
  "generate_bf16",
  "linear_probe",
  "probe_features",
  "finetune",
)


@pytest.fixture(scope="module")
def tiny_lowering():
  return lower.run(lower.parse_args(["--size=tiny", "--platforms=cuda,tpu"]))


@pytest.mark.slow
def test_every_program_lowers_for_cuda_and_tpu_without_host_transfers(tiny_lowering):
  programs = tiny_lowering["programs"]
  assert list(programs) == list(lower.PROGRAMS)
  for name, row in programs.items():
    entry = lower.PROGRAMS[name]
    for platform in ("cuda", "tpu"):
      p = row["platforms"][platform]
      if p["status"] == "skipped":
        # only where the program does not exist, or its plugin is missing, and always with the reason
        assert entry.only or entry.needs_plugin, (name, platform)
        assert p["reason"] == lower.skip_reason(entry, platform)
        continue
      assert p["status"] == "ok", (name, platform, p)
      assert p["host_transfers"] == 0 and p["matmuls"], (name, platform)
      assert p["devices"] == (1 if name == "fid_inception" else 8)
  assert tiny_lowering["ok"]
  for name in ("pretrain_cudnn", "generate_cudnn"):
    cudnn = programs[name]["platforms"]
    assert cudnn["tpu"]["status"] == "skipped"
    if lower.skip_reason(lower.PROGRAMS[name], "cuda"):
      assert "plugin" in cudnn["cuda"]["reason"]
    else:  # a GPU host: the cuDNN kernel must be in the program
      assert any("cudnn" in t.lower() for t in cudnn["cuda"]["custom_calls"]), cudnn["cuda"]


@pytest.mark.slow
def test_bf16_steps_keep_float32_highest_only_for_codebook_distances(tiny_lowering):
  """In bf16 programs every float32 HIGHEST matmul is a codebook distance (ids must equal float32's): its
  operands carry the codebook size. The frozen tokenizers' convolutions run at HIGH (TF32-class)."""
  for name in BF16_PROGRAMS:
    for platform, p in tiny_lowering["programs"][name]["platforms"].items():
      shapes = p["f32_highest"]
      assert all(TINY_CODEBOOK in lhs + rhs for lhs, rhs in shapes), (name, platform, shapes)
      # every program that tokenizes images has its distances (generation only decodes ids)
      assert bool(shapes) == (name != "generate_bf16"), (name, platform, shapes)
      assert p["matmuls"].get("f32 x f32 HIGHEST", {}).get("ops", 0) == len(shapes)
  # the float32 programs keep their exact products (the FID network's 94 convolutions)
  assert tiny_lowering["programs"]["fid_inception"]["platforms"]["cuda"]["matmuls"]["f32 x f32 HIGHEST"]["ops"] == 94


def test_stablehlo_census_counts_collectives_custom_calls_and_host_transfers():
  text = (
    (
      "%0 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0], precision = [HIGHEST, HIGHEST] : "
      "(tensor<4x16xf32>, tensor<16x1024xf32>) -> tensor<4x1024xf32>\n"
      "%1 = stablehlo.dot_general %c, %d, contracting_dims = [1] x [0] : (tensor<4x8xbf16>, tensor<8x2xbf16>) -> "
      "tensor<4x2xbf16>\n"
    )
    + """
    %2 = "stablehlo.all_gather"(%1) {all_gather_dim = 0 : i64} : (tensor<4x2xbf16>) -> tensor<8x2xbf16>
    %3 = stablehlo.custom_call @__cudnn$fmhaSoftmax(%a) : (tensor<4x16xf32>) -> tensor<4x16xf32>
    %4 = stablehlo.custom_call @xla_ffi_python_gpu_callback(%a) : (tensor<4x16xf32>) -> tensor<4x16xf32>
    %5 = "stablehlo.outfeed"(%a, %t) : (tensor<4x16xf32>, !stablehlo.token) -> !stablehlo.token
  """
  )
  c = lower.stablehlo_census(text)
  assert c["matmuls"]["f32 x f32 HIGHEST"] == {"ops": 1, "gflops": 2 * 4 * 1024 * 16 / 1e9}
  assert c["matmuls"]["bf16 x bf16"]["ops"] == 1
  assert c["f32_highest"] == [([4, 16], [16, 1024])]
  assert c["collectives"] == {"all_gather": 1}
  assert c["custom_calls"] == {"__cudnn$fmhaSoftmax": 1, "xla_ffi_python_gpu_callback": 1}
  assert c["host_transfers"] == 2  # the outfeed and the Python callback


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="--platforms"):
    lower.parse_args(["--platforms=cuda,gpu"])
  with pytest.raises(ValueError, match="--programs"):
    lower.parse_args(["--programs=pretrain,train"])
  with pytest.raises(ValueError, match="no such field"):
    lower.pretrain("tiny", 8, overrides={"model.remat": "full"})
  with pytest.raises(SystemExit):
    lower.parse_args(["--size=XL"])
  assert jax.device_count() == 8  # JAX runs (conftest's 8 CPU devices): it cannot be given 4 any more
  with pytest.raises(ValueError, match="start a new process"):
    lower.use_cpu_devices(4)


def _all_gathers(hlo: str) -> dict[str, set[tuple[int, ...]]]:
  out: dict[str, set] = {}
  for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", hlo):
    out.setdefault(dtype, set()).add(tuple(int(d) for d in dims.split(",") if d))
  return out


@pytest.mark.slow
def test_fsdp_gathers_move_bf16_weights():
  """ZeRO-3 over 8 devices (fsdp=8): after XLA's SPMD partitioner every Dense kernel and the MLM table's codebook
  rows (all the head reads) are all-gathered in bf16 (the table once, in the forward); float32 gathers are only
  the float32-computed params (LayerNorm vectors, the position rows). The CPU backend later rewrites bf16
  collectives to float32, hence the partitioner's output."""
  program = lower.pretrain("tiny", 8, overrides={"mesh": "data=1,fsdp=8,model=1"})
  params = program.args[0].params
  kernels = {
    tuple(x.shape)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if getattr(path[-1], "key", "") == "kernel"
  }
  table = tuple(params["token_emb"]["word_embeddings"]["embedding"].shape)
  gathers = _all_gathers(lower.partitioned_hlo(program))
  n, d = program.args[2]["image"].shape[1] // 4, table[1]  # 32 px, 8x8 tokens
  head_rows = (lower.mage_config("mage_pretrain", "tiny", 8).tokenizer.codebook_size, d)
  assert kernels | {head_rows} <= gathers["bf16"], (kernels, gathers)
  assert all(len(s) == 1 or s == (n * n + 1, d) for s in gathers["f32"]), gathers["f32"]


@pytest.mark.slow
def test_memory_plan_lines_predict_a_third_compile_and_plans_follow_them():
  fit = memory_plan.fit_policy("tiny", "none", (2, 4))
  line = memory_plan.Fit(fit["fixed_gib"], fit["per_image_gib"])
  third = aot_memory.step_memory("tiny", {"num_devices": 1, "input.batch_size": 16, "model.remat_policy": "none"})
  assert third["state_gib_per_device"] == pytest.approx(fit["state_gib"])
  assert line.per_image > 0 and line.fixed >= fit["state_gib"]
  assert line.gib(16) == pytest.approx(third["memory"]["total_gib"], rel=0.15)


def test_plan_rule_prefers_least_recompute_that_keeps_a_chip_busy():
  fits = {
    "none": memory_plan.Fit(10.0, 0.5),
    "dots_with_no_batch_dims_saveable": memory_plan.Fit(10.0, 0.2),
    "nothing_saveable": memory_plan.Fit(10.0, 0.05),
  }
  # 0.9 * 80 = 72 GiB: none fits 64 (42 GiB) but not 128 (74 GiB)
  t = memory_plan.plan_target(fits, 80.0, multiple=1)
  assert t["max_batch"] == {"none": 64, "dots_with_no_batch_dims_saveable": 256, "nothing_saveable": 1024}
  assert (t["remat"], t["batch"], t["devices_for_4096"]) == ("none", 64, 64)
  small = memory_plan.plan_target(fits, 16.0, multiple=4)  # 14.4 GiB: none 8, dots 16, nothing 64
  assert (small["remat"], small["batch"], small["devices_for_4096"]) == ("nothing_saveable", 64, 64)
  none_fit = memory_plan.plan_target({"none": memory_plan.Fit(20.0, 1.0)}, 16.0, multiple=1)
  assert none_fit["batch"] == 0 and none_fit["devices_for_4096"] is None
  assert memory_plan.Fit.through(16, 20.0, 64, 44.0) == memory_plan.Fit(12.0, 0.5)
