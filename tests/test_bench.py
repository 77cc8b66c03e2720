"""bench/: analytic FLOP counts, the CI-sized benchmark run, HLO inspection, tokenizer precision modes."""

import contextlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import benchmark, flops
from mage_jax.conformance.forward import configs_from_json
from mage_jax.convert import convert, torch_pickle
from mage_jax.models.mage import MAGE, config_for
from mage_jax.models.vqgan import VQGAN, VQGANConfig, squared_distances
from mage_jax.objectives import masking

GF = 1e9


# ---------------------------------------------------------------------------------------------------------
# FLOP counts.


def _rel(a, b):
  return abs(a - b) / b


@pytest.mark.parametrize(
  "name, variant, expected",
  [
    ("pretrain", "B", 292 * GF),
    ("tokenizer_forward", "B", 129 * GF),
    ("pretrain", "L", 535 * GF),
    ("pretrain_cached", "B", 163 * GF),
    ("generation", "B", 1751 * GF),
    ("mage_generation_step", "B", 78 * GF),
    ("tokenizer_decode", "B", 187 * GF),
  ],
)
def test_flops_match_issue_figures(name, variant, expected):
  counts = flops.flop_counts(config_for(variant), VQGANConfig(), num_steps=20)
  assert _rel(getattr(counts, name), expected) < 0.02, getattr(counts, name) / GF


def test_block_and_conv_flops_by_hand():
  # 3 tokens, width 2, MLP 4: 2·3·(4·2² + 2·2·4) products + 4·3²·2 for QKᵀ and PV.
  assert flops.block_flops(3, 2, 2.0) == 2 * 3 * (16 + 16) + 4 * 9 * 2
  c = VQGANConfig(ch=2, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, resolution=4, codebook_size=5, num_groups=2)
  conv_in = 2 * 16 * 9 * 3 * 2
  level0 = 2 * (2 * 16 * 9 * 2 * 2)
  level1 = 2 * 4 * 9 * 2 * 4 + 2 * 4 * 9 * 4 * 4 + 2 * 4 * 4 * 4  # conv1, conv2, 1×1 shortcut on the output
  mid = 4 * (2 * 4 * 9 * 4 * 4)
  conv_out = 2 * 4 * 4 * 3
  assert flops.tokenizer_encoder_flops(c) == conv_in + level0 + level1 + mid + conv_out
  assert flops.quantizer_flops(c) == 2 * 4 * 5 * 3


def test_flop_counts_reject_mismatched_token_grid():
  with pytest.raises(ValueError, match="tokens"):
    flops.flop_counts(config_for("B", num_tokens=64), VQGANConfig())


def _is_jaxpr(v):
  return hasattr(v, "eqns")


def _jaxpr_flops(jaxpr) -> float:
  """2 × MACs of every dot_general / conv_general_dilated the traced program executes (scan bodies × length)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      k = math.prod(eqn.invars[0].aval.shape[i] for i in lhs_contract)
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
      k = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
    for value in eqn.params.values():
      inner = value.jaxpr if hasattr(value, "jaxpr") and _is_jaxpr(value.jaxpr) else value
      if _is_jaxpr(inner):
        total += _jaxpr_flops(inner) * (eqn.params.get("length", 1) if name == "scan" else 1)
  return total


@pytest.mark.parametrize("scan", [False, True])
def test_analytic_flops_equal_the_traced_programs(scan):
  """The formulas count exactly the products the modules execute (tiny sizes, traced, not compiled)."""
  tok_cfg = benchmark.SIZES["tiny"].tokenizer
  n = tok_cfg.num_tokens
  cfg = config_for("tiny", num_tokens=n, scan=scan)
  model, tok = MAGE(cfg), VQGAN(tok_cfg)
  b = 2
  ids = jnp.zeros((b, n), jnp.int32)
  plan, _ = masking.sample_plan(jax.random.key(0), b, n, **{k: v for k, v in benchmark.MASKING.items()})
  params = jax.eval_shape(model.init, jax.random.key(0), ids, plan)
  tparams = jax.eval_shape(tok.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  images = jnp.zeros((b, 32, 32, 3))
  counts = flops.flop_counts(cfg, tok_cfg, num_steps=1)

  traced = lambda fn, *a: _jaxpr_flops(jax.make_jaxpr(fn)(*a).jaxpr) / b
  assert traced(lambda p: model.apply(p, ids, plan, True, targets_only=True), params) == counts.mage_train_forward
  tokens = jnp.full((b, n), cfg.mask_id, jnp.int32)
  assert traced(lambda p: model.apply(p, tokens, method=MAGE.image_token_logits), params) == counts.mage_generation_step
  assert traced(lambda p: tok.apply(p, images, method=VQGAN.encode_to_ids), tparams) == counts.tokenizer_forward
  assert traced(lambda p: tok.apply(p, ids, method=VQGAN.decode_ids), tparams) == counts.tokenizer_decode


# ---------------------------------------------------------------------------------------------------------
# Report helpers.


def test_peak_flops_and_mfu():
  assert benchmark.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert benchmark.peak_flops("NVIDIA H200") == 989e12
  assert benchmark.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert benchmark.peak_flops("TPU v4") == 275e12
  assert benchmark.peak_flops("cpu") is None
  rows = [{"tflops_per_s": 989.0}, {"tflops_per_s": None}]
  benchmark.add_mfu(rows, {"peak_flops_per_device": 989e12, "num_devices": 2})
  assert rows[0]["mfu"] == pytest.approx(0.5) and rows[1]["mfu"] is None


def test_hlo_summary_counts_ops_and_host_transfers():
  hlo = """HloModule m

%fused_computation (p: f32[8,4]) -> f32[4,8] {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %t = f32[4,8]{1,0} transpose(%p), dimensions={1,0}
}

ENTRY %main (a: f32[8,4], b: bf16[16,16]) -> f32[4,8] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = bf16[16,16]{1,0} parameter(1)
  %c = bf16[16,16]{0,1} copy(%b)
  %t2 = bf16[16,16]{1,0} transpose(%c), dimensions={1,0}
  %d = f32[8,8]{1,0} dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %i = (f32[4], token[]) infeed(%tok)
  %cb = f32[] custom-call(%a), custom_call_target="xla_python_cpu_callback"
  %ar = f32[8,8]{1,0} all-reduce(%d), replica_groups={}, to_apply=%add
  ROOT %f = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation
}
"""
  s = benchmark.hlo_summary(hlo)
  assert s["fusions"] == 1 and s["dots"] == 1
  assert s["transposes"] == 1 and s["transposes_in_fusions"] == 1
  assert s["transpose_mib"] == pytest.approx(16 * 16 * 2 / 2**20)
  assert s["copies"] == 1 and s["copy_mib"] == pytest.approx(512 / 2**20)
  assert s["host_transfers"] == 2  # the infeed and the Python callback
  assert s["collectives"] == {"all-reduce": 1}


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="workloads"):
    benchmark.parse_args(["--workloads=pretrain,train"])
  with pytest.raises(ValueError, match="encode modes"):
    benchmark.parse_args(["--encode-modes=fp8"])
  with pytest.raises(ValueError, match="remat"):
    benchmark.parse_args(["--remat=sometimes"])
  with pytest.raises(ValueError, match="steps"):
    benchmark.parse_args(["--steps=0"])
  assert benchmark._strip_args(["--size", "all", "--json=x", "--batch=4"], ("--size", "--json")) == ["--batch=4"]


# ---------------------------------------------------------------------------------------------------------
# The CI-sized run.


@pytest.mark.heavy  # the device-suite test runs the benchmark's pretraining and input rows in CI
def test_tiny_benchmark_runs_every_workload_and_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  benchmark.main(
    [
      "--size=tiny",
      "--steps=2",
      "--warmup=1",
      "--gen-steps=4",
      "--gen-repeats=1",
      "--encode-repeats=1",
      "--input-batches=1",
      "--jpeg-count=16",
      "--json",
      str(out),
      "--strict",
    ]
  )
  result = json.loads(out.read_text())
  assert result["backend"] == "cpu" and result["device_kind"]
  rows = result["results"]
  kinds = [(r["workload"], r["dtype"]) for r in rows]
  assert [k[0] for k in kinds] == [
    "pretrain",
    "pretrain_cached",
    "generate",
    "encode",
    "encode",
    "encode",
    "features",
    "input",
  ]
  assert {r["dtype"] for r in rows if r["workload"] == "encode"} == set(benchmark.TOKENIZER_MODES)
  for r in rows:
    assert "error" not in r and "skipped" not in r, r
    for key in ("step_ms_median", "images_per_s"):
      assert math.isfinite(r[key]) and r[key] > 0, (r["workload"], key, r[key])
    if r["workload"] != "input":
      assert math.isfinite(r["gflop_per_image"]) and r["gflop_per_image"] > 0
      assert r["memory"]["total_gib"] > 0
      assert r["hlo"]["host_transfers"] == 0, r["hlo"]  # nothing leaves the device inside a step
      assert r["mfu"] is None  # CPU: no peak in the table
  pre = rows[0]
  assert math.isfinite(pre["loss"]) and pre["finite"] == 1.0
  # bf16 step: MAGE's matmuls take bf16 operands; float32 ones are the tokenizer (TF32-class convs, HIGH),
  # the codebook distances (HIGHEST, the only one) and backward passes of float32 attention logits / MLM logits
  dtypes = pre["matmul_dtypes"]
  assert dtypes["bf16 x bf16"]["ops"] >= 12, dtypes
  assert dtypes["f32 x f32 HIGHEST"]["ops"] == 1, dtypes
  assert pre["timed_calls"] == 2
  assert rows[1]["tokenizer_mode"] == "cached" and math.isfinite(rows[1]["loss"])
  assert rows[1]["gflop_per_image"] < pre["gflop_per_image"]
  assert rows[2]["ids_in_codebook"]


def test_checkpoint_row_times_save_seal_verify_and_restore(tmp_path, capsys):
  out = tmp_path / "bench.json"
  benchmark.main(["--size=tiny", "--workloads=checkpoint", "--json", str(out), "--strict"])
  (row,) = json.loads(out.read_text())["results"]
  assert row["workload"] == "checkpoint" and row["images_per_s"] is None
  assert row["checkpoint_bytes"] > 4 * 200_000  # params and two AdamW moments of the tiny MAGE, float32
  for key in ("save_s", "seal_s", "verify_s", "restore_s", "verify_gb_per_s"):
    assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
  assert row["step_ms_median"] == pytest.approx(row["verify_s"] * 1e3)
  assert "verify" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Tokenizer precision on the conformance fixture.


@pytest.fixture(scope="module")
def fixture_tokenizer(testdata):
  d = testdata / "official_tiny"
  tok_cfg, _ = configs_from_json(json.loads((d / "config.json").read_text()))
  sd = torch_pickle.flatten_state_dict(torch_pickle.load(str(d / "tokenizer.pth")))
  variables = convert.convert_state_dict(sd, "tokenizer", tokenizer_config=tok_cfg).variables["tokenizer"]
  ref = np.load(d / "reference.npz")
  images = jnp.asarray(ref["images_nchw"].transpose(0, 2, 3, 1))
  ids32 = np.asarray(VQGAN(tok_cfg).apply(variables, images, method=VQGAN.encode_to_ids))
  assert np.array_equal(ids32.reshape(-1), ref["tokenizer_indices"].reshape(-1))  # float32 = official code
  return tok_cfg, variables, images, ids32


def _round_mantissa(x, bits):
  """Rounds float32 to `bits` explicit mantissa bits (nearest even): 10 = TF32, 7 = bfloat16."""
  u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  drop = 23 - bits
  u = (u + jnp.uint32((1 << (drop - 1)) - 1) + ((u >> drop) & 1)) & jnp.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
  return jax.lax.bitcast_convert_type(u, jnp.float32)


def _ids(tok_cfg, variables, images, mode, operand_fn=None):
  """ids [B, N], latents and float32 distances; `operand_fn` rounds every conv operand (emulation)."""
  module = benchmark.tokenizer_module(tok_cfg, mode)
  ctx = benchmark.conv_precision(jax.lax.Precision.HIGHEST, operand_fn) if operand_fn else contextlib.nullcontext()
  with ctx:
    z = module.apply(variables, images, method=VQGAN.encode)
  d = squared_distances(z, variables["params"]["quantize"]["embedding"]["embedding"])
  return np.asarray(jnp.argmin(d, -1)).reshape(images.shape[0], -1), np.asarray(z), np.asarray(d)


def test_conv_override_reproduces_the_module(fixture_tokenizer):
  tok_cfg, variables, images, _ = fixture_tokenizer
  z_module = VQGAN(tok_cfg).apply(variables, images, method=VQGAN.encode)
  with benchmark.conv_precision(jax.lax.Precision.HIGHEST):
    z_override = VQGAN(tok_cfg).apply(variables, images, method=VQGAN.encode)
  np.testing.assert_allclose(z_override, z_module, rtol=1e-5, atol=1e-5)


def test_tf32_convs_keep_float32_ids(fixture_tokenizer):
  """TF32 products (10-bit mantissa operands, float32 accumulation: what 'tf32' mode runs on a GPU) leave
  every id of the fixture unchanged; the same emulation with bf16 operands (7 bits) does not, so the check
  can tell the two apart."""
  tok_cfg, variables, images, ids32 = fixture_tokenizer
  tf32_ids, _, _ = _ids(tok_cfg, variables, images, "float32", lambda x: _round_mantissa(x, 10))
  assert np.array_equal(tf32_ids, ids32)
  bf16_like, _, _ = _ids(tok_cfg, variables, images, "float32", lambda x: _round_mantissa(x, 7))
  assert not np.array_equal(bf16_like, ids32)


def test_bf16_tokenizer_flips_are_near_ties(fixture_tokenizer):
  """`VQGAN(dtype=bfloat16)` flips a few ids of the fixture; each flip is a code whose float32 distance is
  within 2% of the winner's (bf16 rounding of the latents, not a wrong computation)."""
  tok_cfg, variables, images, ids32 = fixture_tokenizer
  ids_bf16, _, _ = _ids(tok_cfg, variables, images, "bfloat16")
  _, _, d32 = _ids(tok_cfg, variables, images, "float32")
  d32 = d32.reshape(-1, d32.shape[-1])
  got, want = ids_bf16.reshape(-1), ids32.reshape(-1)
  flips = np.flatnonzero(got != want)
  assert len(flips) <= 8, len(flips)
  gap = (d32[flips, got[flips]] - d32[flips, want[flips]]) / d32[flips, want[flips]]
  assert np.all(gap >= 0) and np.all(gap < 0.02), gap


@pytest.mark.xfail(
  strict=True,
  reason="bf16 convs move the latents ~1% and flip 4/256 fixture ids (near-ties "
  "at bf16 precision); equality needs float32 activations with TF32/bf16x3 convs ('tf32' mode)",
)
def test_bf16_tokenizer_ids_equal_float32(fixture_tokenizer):
  tok_cfg, variables, images, ids32 = fixture_tokenizer
  ids_bf16 = np.asarray(
    benchmark.tokenizer_module(tok_cfg, "bfloat16").apply(variables, images, method=VQGAN.encode_to_ids)
  )
  assert np.array_equal(ids_bf16, ids32)


def test_chunked_tokenizer_gives_the_same_ids(fixture_tokenizer):
  tok_cfg, variables, images, ids32 = fixture_tokenizer
  for mode in ("float32", "tf32"):
    tok = benchmark.Tokenizer(benchmark.tokenizer_module(tok_cfg, mode), mode, chunks=2)
    ids = jax.jit(lambda v, x, tok=tok: tok.apply(v, x, method=VQGAN.encode_to_ids))(variables, images)
    assert np.array_equal(np.asarray(ids), ids32)
  with pytest.raises(ValueError, match="divisible"):
    benchmark.Tokenizer(VQGAN(tok_cfg), chunks=3).apply(variables, images, method=VQGAN.encode_to_ids)
