"""MAGE throughput benchmark: pretraining step, generation, tokenizer encode and the input pipeline.

  python bench/benchmark.py --size=all --json bench.json          # on a GPU/TPU host: ViT-B and ViT-L
  python bench/benchmark.py --size=tiny --steps=3 --warmup=1       # CPU/CI-sized smoke run (no timing claims)

Every workload runs on RANDOM weights (seeded), so anyone can compare without checkpoints; the speed of
these programs does not depend on the weight values. Per workload it prints one table row (device kind and
backend in the header) and writes the same numbers as JSON:

  pretrain  the jitted, donated `steps.pretrain_step` (frozen tokenizer + MAGE fwd/bwd + AdamW), sharded by
            the config's logical rules over all devices; step time = median of `--steps` steps after
            `--warmup`, each synced (the step itself has no host sync).
  pretrain_cached  the same step on cached token ids (`steps.pretrain_ids_step`, `input.tokens`): no tokenizer.
  generate  `sampling.make_sampler`: 20 decoding steps + VQGAN decode + uint8, one batch per call.
  encode    tokenizer images → ids, once per tokenizer mode in `--encode-modes`.
  input     `data.pipeline.measure_throughput` on a folder of JPEGs (synthesised, ImageNet-like sizes,
            unless `--jpeg-dir`); needs TensorFlow (skipped where it is not installed).
  checkpoint  (only when asked for) the pretraining train state saved with orbax into a temporary folder, then
            what integrity costs: writing the step's manifest (`checkpointing.seal`), verifying it
            (`manifest_problem`, the check before each restore) and the restore itself, in seconds and GB/s.

MFU = analytic FLOPs per image (bench/flops.py) × images/s ÷ (dense bf16 peak per device × devices); it is
printed only for devices in `PEAK_FLOPS`. Peak memory is the compiled executable's buffer assignment
(`memory_analysis()`, arguments + outputs − aliased + temporaries, per device); on GPUs the allocator's
process-wide high-water mark is recorded too.

Tokenizer modes (`--tokenizer`, `--encode-modes`): 'float32' (the module as written: full-precision convs),
'tf32' (float32 activations, convs at `Precision.HIGH`: TF32 on NVIDIA GPUs, bf16×3 on TPU; conv precision
is overridden here through a flax method interceptor because `VQGAN` hard-codes HIGHEST), 'bfloat16'
(`VQGAN(dtype=bfloat16)`); distances to the codebook are float32 in every mode.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

if __package__ in (None, ""):
  # Run as a script: make `bench` and `mage_jax` importable from the repository root.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":
  from mage_jax.system import allocator  # noqa: E402

  allocator.maybe_reexec(script=True)  # timed as the binaries run: under tcmalloc where the system has it

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import flops as flops_lib  # noqa: E402
from mage_jax.generation import sampling
from mage_jax.models import layers  # noqa: E402
from mage_jax.models.mage import MAGE  # noqa: E402
from mage_jax.models.vqgan import VQGAN, VQGANConfig  # noqa: E402
from mage_jax.train import builders, config_views, sharding, steps, trainer  # noqa: E402

WORKLOADS = ("pretrain", "pretrain_cached", "generate", "encode", "features", "input")
EXTRA_WORKLOADS = ("checkpoint",)  # run only when named in --workloads
TOKENIZER_MODES = ("float32", "tf32", "bfloat16")
# Dense bf16 peak per device (datasheets), matched as a case-insensitive substring of device_kind, first hit
# wins. 'TPU v5' without 'lite' is how v5p reports itself.
PEAK_FLOPS = (
  ("H200", 989e12),
  ("H100", 989e12),
  ("A100", 312e12),
  ("TPU v4", 275e12),
  ("TPU v5p", 459e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5", 459e12),
)
# Official PyTorch implementation on one H200 (the figures), images/s.
REFERENCE = {
  ("B", "pretrain"): (396.0, "official fp16, batch 128 (361 at 64)"),
  ("L", "pretrain"): (257.0, "official fp16"),
  ("B", "generate"): (23.4, "official fp32"),
  ("B", "encode"): (890.0, "official fp32 (cuDNN TF32 convs), batch 128"),
  ("L", "encode"): (890.0, "official fp32 (cuDNN TF32 convs), batch 128"),
}
# `--remat auto`: no rematerialisation where the activations fit one 80 GB device at batch 128; ViT-L saves
# only the weight products (CPU compile estimate at batch 128: ~106 GiB without remat, ~42 GiB with this).
REMAT_AUTO = {"tiny": "none", "mid": "none", "B": "none", "L": "dots_with_no_batch_dims_saveable"}
MASKING = dict(min_ratio=0.5, max_ratio=1.0, mu=0.55, std=0.25, drop_ratio=0.5)


@dataclasses.dataclass(frozen=True)
class Size:
  """One benchmarked model size: MAGE variant (with `mage` overrides), tokenizer config and default batch."""

  variant: str
  tokenizer: VQGANConfig
  batch: int
  mage: tuple = ()  # (field, value) pairs over the variant's sizes


SIZES = {
  # The conformance fixture's tokenizer (32 px → 8×8 tokens) with the tiny MAGE: seconds on a CPU.
  "tiny": Size("tiny", VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=16, resolution=32), batch=8),
  # Where matmuls dominate on a CPU: 192 wide, 6+4 layers, 64x64 images (16x16 tokens), the same tokenizer.
  "mid": Size(
    "tiny",
    VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=16, resolution=64),
    batch=64,
    mage=(
      ("embed_dim", 192),
      ("depth", 6),
      ("num_heads", 3),
      ("decoder_embed_dim", 192),
      ("decoder_depth", 4),
      ("decoder_num_heads", 3),
    ),
  ),
  "B": Size("B", VQGANConfig(), batch=128),
  "L": Size("L", VQGANConfig(), batch=128),
}


# ---------------------------------------------------------------------------------------------------------
# Tokenizer precision and chunking (bench-side: the VQGAN module itself is left as written).


def _override_conv(module: nn.Conv, x, precision, operand_fn):
  """nn.Conv.__call__ for the stride-1, undilated, ungrouped convs of the VQGAN, at `precision`."""
  if (
    module.strides not in (None, 1, (1, 1))
    or module.input_dilation not in (None, 1, (1, 1))
    or module.kernel_dilation not in (None, 1, (1, 1))
    or module.feature_group_count != 1
  ):
    raise ValueError(f"conv precision override supports plain stride-1 convs only, got {module}")
  dtype = module.dtype or jnp.float32
  kernel = module.get_variable("params", "kernel").astype(dtype)
  x = x.astype(dtype)
  if operand_fn is not None:
    x, kernel = operand_fn(x), operand_fn(kernel)
  y = jax.lax.conv_general_dilated(
    x, kernel, (1, 1), module.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
  )
  if module.use_bias:
    y = y + module.get_variable("params", "bias").astype(dtype)
  return y


@contextlib.contextmanager
def conv_precision(precision, operand_fn: Callable[[jax.Array], jax.Array] | None = None):
  """Within the context, every flax `nn.Conv` call runs at `precision` (operands optionally transformed,
  e.g. rounded to emulate a lower-precision unit in tests). Active while a function is TRACED."""

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or not isinstance(context.module, nn.Conv):
      return next_fun(*args, **kwargs)
    return _override_conv(context.module, args[0], precision, operand_fn)

  with nn.intercept_methods(interceptor):
    yield


def tokenizer_module(config: VQGANConfig, mode: str) -> VQGAN:
  if mode not in TOKENIZER_MODES:
    raise ValueError(f"unknown tokenizer mode {mode!r}; expected one of {TOKENIZER_MODES}")
  return VQGAN(
    config, dtype=jnp.bfloat16 if mode == "bfloat16" else jnp.float32, precision="high" if mode == "tf32" else "highest"
  )


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Stands in for the `VQGAN` module where the code only calls `.apply` (generate's sampler, encode rows):
  adds chunking of the batch (`steps.map_in_chunks`, as pretraining's `tokenizer.chunks`)."""

  module: VQGAN
  mode: str = "float32"
  chunks: int = 1

  @property
  def config(self) -> VQGANConfig:
    return self.module.config

  def apply(self, variables, x, method=None):
    return steps.map_in_chunks(lambda xi: self.module.apply(variables, xi, method=method), x, self.chunks)


# ---------------------------------------------------------------------------------------------------------
# Compiled-program inspection.


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\S+)\s.*?(?<![\w.\-])([a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_ARRAY = re.compile(r"^([a-z]+[0-9]*)\[([0-9,]*)\]")
_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
HOST_OPS = ("infeed", "outfeed", "send", "recv", "send-done", "recv-done")
COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
  "all-reduce-start",
  "all-gather-start",
  "collective-permute-start",
)


def _array_bytes(hlo_type: str) -> int:
  m = _ARRAY.match(hlo_type)
  if not m or m.group(1) not in _DTYPE_BYTES:
    return 0
  return _DTYPE_BYTES[m.group(1)] * math.prod(int(d) for d in m.group(2).split(",") if d)


def hlo_summary(hlo_text: str) -> dict:
  """Counts in HLO text: fusions, while loops, collectives (also by element type), custom-call targets,
  matmuls/convs, transposes and copies (count and bytes; outside fusions they are separate memory passes), and
  anything that moves data to/from the host (infeed/outfeed, send/recv, Python callbacks: there must be none)."""
  top: dict[str, int] = {}
  fused: dict[str, int] = {}
  top_bytes: dict[str, int] = {}
  targets: dict[str, int] = {}
  collective_dtypes: dict[str, dict[str, int]] = {}
  in_fused = False
  for line in hlo_text.splitlines():
    comp = _COMPUTATION.match(line)
    if comp and " = " not in line.split("{")[0]:
      in_fused = "fused" in comp.group(1) or "fusion" in comp.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    op = m.group(2)
    counts = fused if in_fused else top
    counts[op] = counts.get(op, 0) + 1
    if not in_fused:
      top_bytes[op] = top_bytes.get(op, 0) + _array_bytes(m.group(1))
    if op in COLLECTIVES and not in_fused:
      array = _ARRAY.match(m.group(1).lstrip("("))
      dtype = array.group(1) if array else "?"
      per_op = collective_dtypes.setdefault(op, {})
      per_op[dtype] = per_op.get(dtype, 0) + 1
    if op == "custom-call":
      t = _TARGET.search(line)
      if t:
        targets[t.group(1)] = targets.get(t.group(1), 0) + 1
  callbacks = sum(n for t, n in targets.items() if "callback" in t.lower())
  both = lambda op: top.get(op, 0) + fused.get(op, 0)
  return {
    "instructions": sum(top.values()),
    "fusions": top.get("fusion", 0),
    "while_loops": top.get("while", 0),
    "dots": both("dot"),
    "convolutions": both("convolution"),
    "transposes": top.get("transpose", 0),
    "transpose_mib": top_bytes.get("transpose", 0) / 2**20,
    "transposes_in_fusions": fused.get("transpose", 0),
    "copies": top.get("copy", 0) + top.get("copy-start", 0),
    "copy_mib": (top_bytes.get("copy", 0) + top_bytes.get("copy-start", 0)) / 2**20,
    "collectives": {op: top[op] for op in COLLECTIVES if op in top},
    "collective_dtypes": collective_dtypes,  # op -> {result element type (first of a tuple): count}
    "host_transfers": sum(top.get(op, 0) for op in HOST_OPS) + callbacks,
    "custom_calls": targets,
  }


_MATMUL = re.compile(
  r"stablehlo\.(dot_general|convolution)\b.*:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*"
  r"(tensor<[^>]*>)"
)
_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z]+\d*)>")
_CONTRACTING = re.compile(r"contracting_dims = \[([\d, ]*)\]")
_RHS_SPEC = re.compile(r"dim_numbers = \[[^\]]*\]x\[([^\]]*)\]")


def _tensor(text: str) -> tuple[list[int], str]:
  m = _TENSOR.match(text)
  return [int(d) for d in m.group(1).split("x") if d], m.group(2)


def matmul_dtypes(lowered_text: str) -> dict:
  """Matmul and convolution FLOPs of a lowered (StableHLO, pre-optimisation) program by operand dtypes and
  precision, e.g. {'bf16 x bf16': ..., 'f32 x f32 HIGHEST': ...}. Device-independent: it shows float32
  operands reaching a matmul in a bf16 program (the float32 units run ~15x slower than the bf16 tensor cores),
  which the CPU's optimised HLO hides by upcasting every bf16 dot. A scanned body counts once."""
  out: dict[str, dict[str, float]] = {}
  for line in lowered_text.splitlines():
    m = _MATMUL.search(line)
    if not m:
      continue
    kind, (lhs, lhs_dtype), (rhs, rhs_dtype), (result, _) = m.group(1), *(_tensor(m.group(i)) for i in (2, 3, 4))
    if kind == "dot_general":
      contracting = _CONTRACTING.search(line)
      dims = [int(d) for d in contracting.group(1).split(",") if d.strip()] if contracting else []
      flops = 2 * math.prod(result) * math.prod(lhs[d] for d in dims)
    else:
      spec = _RHS_SPEC.search(line)
      kernel = [size for size, name in zip(rhs, spec.group(1).split(","), strict=True) if name.strip() != "o"]
      flops = 2 * math.prod(result) * math.prod(kernel)
    precision = " HIGHEST" if "HIGHEST" in line else (" HIGH" if "HIGH" in line else "")
    row = out.setdefault(f"{lhs_dtype} x {rhs_dtype}{precision}", {"ops": 0, "gflops": 0.0})
    row["ops"] += 1
    row["gflops"] += flops / 1e9
  return out


def _dump_hlo(args, name: str, compiled) -> None:
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
    with open(os.path.join(args.dump_hlo, f"{name}.hlo.txt"), "w") as f:
      f.write(compiled.as_text())


def compiled_stats(compiled) -> dict:
  """Per-device memory of a compiled executable and XLA's own FLOP count (per device; a while loop's body
  may be counted once, so scanned models under-report)."""
  out: dict[str, Any] = {}
  mem = compiled.memory_analysis()
  if mem is not None:
    live = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    out["memory"] = {
      "argument_gib": mem.argument_size_in_bytes / 2**30,
      "output_gib": mem.output_size_in_bytes / 2**30,
      "alias_gib": mem.alias_size_in_bytes / 2**30,
      "temp_gib": mem.temp_size_in_bytes / 2**30,
      "total_gib": (live + mem.temp_size_in_bytes) / 2**30,
      "reported_peak_gib": getattr(mem, "peak_memory_in_bytes", 0) / 2**30,  # CPU: arguments only
    }
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["xla_flops_per_device"] = float(cost.get("flops", float("nan")))
  except Exception:  # pylint: disable=broad-except
    out["xla_flops_per_device"] = float("nan")
  return out


def peak_flops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, value in PEAK_FLOPS:
    if name.lower() in kind:
      return value
  return None


def device_peak_bytes() -> float | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else float(stats.get("peak_bytes_in_use", 0))


def _median_time(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


# ---------------------------------------------------------------------------------------------------------
# Workloads.


@dataclasses.dataclass
class Setup:
  """What every workload of one size shares."""

  size: str
  spec: Size
  model: MAGE
  batch: int
  args: argparse.Namespace
  mesh: Any
  rules: Any
  flops: flops_lib.FlopCounts
  config: Any  # the pretraining config of this size and these flags (`pretrain_config`)


def pretrain_config(spec: Size, args: argparse.Namespace, batch: int, size: str):
  """`configs/mage_pretrain.py` with a size's model and tokenizer and the flags' dtypes, attention, remat, batch
  and mesh: the config a user would train this MAGE with (`python -m mage_jax.main --config=...`)."""
  from configs import mage_pretrain  # pylint: disable=g-import-not-at-top  (ml_collections: configs only)

  c = mage_pretrain.get_config(f"fsdp={args.fsdp}")
  with c.unlocked():
    c.seed = args.seed
    c.model.update(
      dict(spec.mage),
      variant=spec.variant,
      scan=bool(args.scan),
      remat_policy=REMAT_AUTO[size] if args.remat == "auto" else args.remat,
      attention=args.attention,
      dropout=args.dropout,
      attn_dropout=args.attn_dropout,
      dtype=args.dtype,
      param_dtype="float32",
    )
    sizes = {k: v for k, v in dataclasses.asdict(spec.tokenizer).items() if k != "resolution"}
    c.tokenizer.update(sizes, init="", chunks=args.tokenizer_chunks)
    c.tokenizer.update(
      dtype="bfloat16" if args.tokenizer == "bfloat16" else "float32",
      precision="high" if args.tokenizer == "tf32" else "highest",
    )
    c.input.update(image_size=spec.tokenizer.resolution, batch_size=batch)
    c.masking.update(MASKING)
    c.total_steps, c.optim.warmup_steps = 100_000, 1000
  return c


def build_setup(size: str, args: argparse.Namespace) -> Setup:
  spec = SIZES[size]
  tok_cfg = spec.tokenizer
  batch = args.batch or spec.batch
  config = pretrain_config(spec, args, batch, size)
  model = builders.mage_model(config, VQGAN(tok_cfg))
  mesh, rules = trainer.mesh_and_rules(config)
  counts = flops_lib.flop_counts(model.config, tok_cfg, num_steps=args.gen_steps, drop_ratio=MASKING["drop_ratio"])
  return Setup(size, spec, model, batch, args, mesh, rules, counts, config)


def _random_images(rng, batch: int, res: int, sharding_):
  # Uniform noise, not zeros: constant inputs can run faster than real data.
  return jax.device_put(np.asarray(jax.random.uniform(rng, (batch, res, res, 3), jnp.float32)), sharding_)


def _tokenizer_vars(config: VQGANConfig, seed: int):
  module = VQGAN(config)
  side = 2 ** (len(config.ch_mult) - 1)
  return jax.device_get(nn.unbox(jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, side, side, 3)))))


def _row(
  s: Setup,
  workload: str,
  *,
  batch: int,
  seconds: list[float],
  flops_per_image: float | None,
  images_per_call: int,
  extra: dict,
) -> dict:
  med = statistics.median(seconds)
  ips = images_per_call / med
  ref = REFERENCE.get((s.size, workload))
  row = {
    "size": s.size,
    "workload": workload,
    "batch": batch,
    "dtype": s.args.dtype,
    "step_ms_median": med * 1e3,
    "step_ms_min": min(seconds) * 1e3,
    "step_ms_max": max(seconds) * 1e3,
    "timed_calls": len(seconds),
    "images_per_s": ips,
    "gflop_per_image": None if flops_per_image is None else flops_per_image / 1e9,
    "tflops_per_s": None if flops_per_image is None else flops_per_image * ips / 1e12,
    "reference_images_per_s": ref[0] if ref else None,
    "reference_note": ref[1] if ref else None,
  }
  row.update(extra)
  return row


@dataclasses.dataclass
class PretrainProgram:
  """The jitted pretraining step of a Setup and what it needs (built inside `jax.set_mesh` + logical rules)."""

  step: Any  # jitted (state, tokenizer_vars, batch) -> (state, metrics), state donated
  init_state: Callable  # rng key -> TrainState (params boxed with logical axis names)
  abstract_state: Any  # boxed ShapeDtypeStruct tree of init_state
  state_sharding: Any
  replicated: Any
  batch_sharding: Any
  config: Any  # the job config it was built from


def make_pretrain(s: Setup, cached: bool = False) -> PretrainProgram:
  """The step as `python -m mage_jax.main` builds it: `jobs/pretrain.build_task` of `pretrain_config` (the image
  step with the frozen tokenizer inside, or with `cached` the step on token ids), jitted as `trainer.run` jits it
  (logical shardings, donated state)."""
  from mage_jax.jobs import pretrain  # pylint: disable=g-import-not-at-top

  config = s.config.copy_and_resolve_references()
  config.input.tokens = "cached" if cached else ""
  with tempfile.TemporaryDirectory() as workdir:
    task, mesh, rules = pretrain.build_task(config, workdir, abstract=True)
  boxed = jax.eval_shape(task.init_state, jax.random.key(s.args.seed))
  state_sh = sharding.logical_shardings(boxed, mesh, rules)
  fn = sharding.jit_train_step(task.step, state_sh, mesh)
  return PretrainProgram(
    fn, task.init_state, boxed, state_sh, sharding.replicated(mesh), sharding.batch_sharding(mesh), config
  )


def run_pretrain(s: Setup, cached: bool = False) -> dict:
  """The pretraining step on images (frozen tokenizer inside), or with `cached` on token ids (input.tokens)."""
  args, model = s.args, s.model
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    prog = make_pretrain(s, cached)
    fn, repl, batch_sh = prog.step, prog.replicated, prog.batch_sharding
    state = jax.jit(lambda r: sharding.strip_boxes(prog.init_state(r)), out_shardings=prog.state_sharding)(
      jax.random.key(args.seed)
    )
    if cached:
      tok_vars = {}
      batches = [
        {
          "ids": jax.device_put(
            np.asarray(
              jax.random.randint(
                jax.random.key(100 + i), (s.batch, model.config.num_tokens), 0, model.config.codebook_size
              )
            ),
            batch_sh,
          )
        }
        for i in range(2)
      ]
    else:
      tok_vars = jax.device_put(builders.load_tokenizer(prog.config)[1], repl)
      res = s.spec.tokenizer.resolution
      batches = [{"image": _random_images(jax.random.key(100 + i), s.batch, res, batch_sh)} for i in range(2)]
    t0 = time.perf_counter()
    lowered = fn.lower(state, tok_vars, batches[0])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state, "i": 0}

    def call():
      holder["state"], metrics = compiled(holder["state"], tok_vars, batches[holder["i"] % 2])
      holder["i"] += 1
      return metrics

    seconds = _median_time(call, args.warmup, args.steps)
    metrics = jax.device_get(call())
  workload = "pretrain_cached" if cached else "pretrain"
  _dump_hlo(args, f"{s.size}_{workload}", compiled)
  params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
  attn = model.config.attention if model.config.attn_dropout == 0.0 else "xla"
  extra = {
    "compile_s": compile_s,
    "loss": float(metrics["loss"]),
    "finite": float(metrics["finite"]),
    "params_m": params / 1e6,
    "tokenizer_mode": "cached" if cached else args.tokenizer,
    "tokenizer_chunks": args.tokenizer_chunks,
    "scan": model.config.scan,
    "remat": model.config.remat_policy,
    "attention_path": attn,
    "mesh": dict(s.mesh.shape),
    **compiled_stats(compiled),
    "hlo": hlo_summary(compiled.as_text()),
    "matmul_dtypes": matmul_dtypes(lowered.as_text()),
  }
  return _row(
    s,
    workload,
    batch=s.batch,
    seconds=seconds,
    flops_per_image=s.flops.pretrain_cached if cached else s.flops.pretrain,
    images_per_call=s.batch,
    extra=extra,
  )


def run_generate(s: Setup) -> dict:
  args, model = s.args, s.model
  tok = Tokenizer(tokenizer_module(s.spec.tokenizer, args.tokenizer), args.tokenizer)
  n = model.config.num_tokens
  mesh = sharding.data_mesh()
  repl = sharding.replicated(mesh)
  params = jax.jit(model.init, static_argnames="method")(
    jax.random.key(args.seed), jnp.zeros((1, n), jnp.int32), method=MAGE.image_token_logits
  )
  variables = {"model": nn.unbox(params), "tokenizer": _tokenizer_vars(s.spec.tokenizer, args.seed + 1)}
  sampler = sampling.make_sampler(model, tok, s.batch, args.gen_steps, mesh)
  model_vars, tok_vars = sharding.place((variables["model"], variables["tokenizer"]), repl)
  key_data, temp, label = sharding.place(
    (np.asarray(jax.random.key_data(jax.random.key(args.seed))), np.float32(6.0), np.int32(0)), repl
  )
  idx = [sharding.place(np.int32(i), repl) for i in range(2)]
  t0 = time.perf_counter()
  compiled = sampler.lower(model_vars, tok_vars, key_data, idx[0], temp, label).compile()
  compile_s = time.perf_counter() - t0
  counter = {"i": 0}

  def call():
    counter["i"] += 1
    return compiled(model_vars, tok_vars, key_data, idx[counter["i"] % 2], temp, label)

  seconds = _median_time(call, 1, args.gen_repeats)
  images, ids = jax.device_get(call())
  _dump_hlo(args, f"{s.size}_generate", compiled)
  attn = model.config.attention
  extra = {
    "compile_s": compile_s,
    "num_steps": args.gen_steps,
    "tokenizer_mode": args.tokenizer,
    "attention_path": attn,
    "ids_in_codebook": bool(np.all((ids >= 0) & (ids < model.config.codebook_size))),
    "image_mean": float(np.mean(images)),
    **compiled_stats(compiled),
    "hlo": hlo_summary(compiled.as_text()),
  }
  return _row(
    s,
    "generate",
    batch=s.batch,
    seconds=seconds,
    flops_per_image=s.flops.generation,
    images_per_call=s.batch,
    extra=extra,
  )


def run_encode(s: Setup, mode: str) -> dict:
  args = s.args
  tok = Tokenizer(tokenizer_module(s.spec.tokenizer, mode), mode)
  repl, batch_sh = sharding.replicated(s.mesh), sharding.batch_sharding(s.mesh)
  tok_vars = jax.device_put(_tokenizer_vars(s.spec.tokenizer, args.seed + 1), repl)
  res = s.spec.tokenizer.resolution
  images = [_random_images(jax.random.key(200 + i), s.batch, res, batch_sh) for i in range(2)]
  fn = jax.jit(
    lambda v, x: tok.apply(v, x, method=VQGAN.encode_to_ids), in_shardings=(repl, batch_sh), out_shardings=batch_sh
  )
  t0 = time.perf_counter()
  compiled = fn.lower(tok_vars, images[0]).compile()
  compile_s = time.perf_counter() - t0
  counter = {"i": 0}

  def call():
    counter["i"] += 1
    return compiled(tok_vars, images[counter["i"] % 2])

  seconds = _median_time(call, 1, args.encode_repeats)
  _dump_hlo(args, f"{s.size}_encode_{mode}", compiled)
  extra = {
    "compile_s": compile_s,
    "tokenizer_mode": mode,
    **compiled_stats(compiled),
    "hlo": hlo_summary(compiled.as_text()),
  }
  row = _row(
    s, "encode", batch=s.batch, seconds=seconds, flops_per_image=s.flops.encode, images_per_call=s.batch, extra=extra
  )
  row["dtype"] = mode
  return row


def run_features(s: Setup) -> dict:
  """The linear probe's frozen features (`probe.make_feature_fn`: float32 tokenizer ids, the encoder over every
  token, mean pool and fc_norm) of one batch of images, as `evaluate` extracts them."""
  from mage_jax.evals import probe  # pylint: disable=g-import-not-at-top
  from mage_jax.models.vit import MAGEViT  # pylint: disable=g-import-not-at-top

  args = s.args
  vit = MAGEViT(s.model.config, head_type="none", dtype=s.model.dtype)
  tok = VQGAN(s.spec.tokenizer, precision="highest")
  repl, batch_sh = sharding.replicated(s.mesh), sharding.batch_sharding(s.mesh)
  n = s.model.config.num_tokens
  vit_params = nn.unbox(jax.jit(vit.init)(jax.random.key(args.seed), jnp.zeros((1, n), jnp.int32)))
  variables = jax.device_put({"tokenizer": _tokenizer_vars(s.spec.tokenizer, args.seed + 1), "vit": vit_params}, repl)
  res = s.spec.tokenizer.resolution
  images = [_random_images(jax.random.key(300 + i), s.batch, res, batch_sh) for i in range(2)]
  feature_fn = probe.make_feature_fn(tok, vit)
  fn = jax.jit(lambda v, x: feature_fn(v, x, None, True), in_shardings=(repl, batch_sh), out_shardings=batch_sh)
  t0 = time.perf_counter()
  compiled = fn.lower(variables, images[0]).compile()
  compile_s = time.perf_counter() - t0
  counter = {"i": 0}

  def call():
    counter["i"] += 1
    return compiled(variables, images[counter["i"] % 2])

  seconds = _median_time(call, 1, args.encode_repeats)
  extra = {
    "compile_s": compile_s,
    "tokenizer_mode": "float32",
    **compiled_stats(compiled),
    "hlo": hlo_summary(compiled.as_text()),
  }
  flops = s.flops.encode + flops_lib.mage_forward_flops(s.model.config, n + 1, decoder=False)
  return _row(
    s, "features", batch=s.batch, seconds=seconds, flops_per_image=flops, images_per_call=s.batch, extra=extra
  )


def synthesize_jpegs(directory: str, count: int, width: int, height: int, seed: int = 0) -> str:
  """`count` smooth random JPEGs (quality 90): low-frequency colour fields plus mild noise, so the files
  have photo-like sizes (noise alone compresses badly and decodes slower than real photos)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    low = Image.fromarray(rng.integers(0, 256, (max(height // 32, 2), max(width // 32, 2), 3), np.uint8))
    img = np.asarray(low.resize((width, height), Image.BICUBIC), np.float32)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(directory, f"img_{i:05d}.JPEG"), quality=90)
  return directory


def run_input(s: Setup) -> dict:
  args = s.args
  if importlib.util.find_spec("tensorflow") is None:
    return {"size": s.size, "workload": "input", "skipped": "the input pipeline needs TensorFlow, not installed"}
  from mage_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  res = s.spec.tokenizer.resolution
  with tempfile.TemporaryDirectory() as tmp:
    root = args.jpeg_dir
    if not root:
      w, h = (500, 375) if res >= 128 else (64, 48)
      root = synthesize_jpegs(os.path.join(tmp, "jpegs"), max(args.jpeg_count, s.batch), w, h, args.seed)
    cfg = dict(
      name=f"folder:{root}",
      split="train",
      batch_size=s.batch,
      image_size=res,
      augment="pretrain",
      num_workers=args.input_workers,
    )
    stats = pipeline.measure_throughput(cfg, args.input_batches, warmup=2, seed=args.seed)
  seconds = [stats["seconds"] / stats["batches"]]
  extra = {
    "startup_s": stats["startup_s"],
    "jpeg_dir": args.jpeg_dir or "synthesized",
    "host_cpus": os.cpu_count(),
    "timed_batches": int(stats["batches"]),
  }
  row = _row(s, "input", batch=s.batch, seconds=seconds, flops_per_image=None, images_per_call=s.batch, extra=extra)
  row["dtype"] = "-"
  return row


def _tree_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def _as_trained(state, rng):
  """`state` with every floating-point array filled with noise (the bytes a trained state has)."""
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(
    treedef,
    [
      jax.random.normal(k, x.shape, x.dtype) * 1e-2 if jnp.issubdtype(x.dtype, jnp.floating) else x
      for k, x in zip(keys, leaves)
    ],
  )


def run_checkpoint(s: Setup) -> dict:
  """Seconds to save the pretraining state (its floats as a trained state's), seal it (manifest), verify the
  manifest and restore it."""
  from mage_jax.train import checkpointing  # noqa: PLC0415

  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    prog = make_pretrain(s, cached=True)
    state = jax.jit(lambda r: sharding.strip_boxes(prog.init_state(r)), out_shardings=prog.state_sharding)(
      jax.random.key(s.args.seed)
    )
    # At init AdamW's moments are zeros, which orbax's compression shrinks to nothing; a trained state's are not.
    state = jax.jit(_as_trained, out_shardings=prog.state_sharding)(state, jax.random.key(s.args.seed + 1))
    target = checkpointing.abstract_with_shardings(sharding.strip_boxes(prog.abstract_state), prog.state_sharding)
    with tempfile.TemporaryDirectory() as tmp:
      mngr = checkpointing.manager(tmp, keep=1, async_save=False)
      t0 = time.perf_counter()
      checkpointing.save(mngr, 1, state)
      mngr.wait_until_finished()
      t1 = time.perf_counter()
      checkpointing.seal(mngr)
      t2 = time.perf_counter()
      problem = checkpointing.manifest_problem(os.path.join(tmp, "checkpoints", "1"))
      t3 = time.perf_counter()
      jax.block_until_ready(checkpointing.restore(mngr, 1, target))
      t4 = time.perf_counter()
      size = _tree_bytes(os.path.join(tmp, "checkpoints", "1"))
      mngr.close()
  if problem is not None:
    raise RuntimeError(f"a freshly sealed checkpoint fails its own manifest: {problem}")
  row = _row(
    s,
    "checkpoint",
    batch=s.batch,
    seconds=[t3 - t2],
    flops_per_image=None,
    images_per_call=0,
    extra={
      "checkpoint_bytes": size,
      "save_s": t1 - t0,
      "seal_s": t2 - t1,
      "verify_s": t3 - t2,
      "restore_s": t4 - t3,
      "verify_gb_per_s": size / max(t3 - t2, 1e-9) / 1e9,
    },
  )
  row.update(images_per_s=None, dtype="-")
  return row


def _guarded(fn, s: Setup, workload: str, *args) -> dict:
  """A failing workload (e.g. out of memory) is recorded, not fatal, unless --strict."""
  try:
    return fn(s, *args)
  except Exception as e:  # pylint: disable=broad-except
    if s.args.strict:
      raise
    return {"size": s.size, "workload": workload, "error": f"{type(e).__name__}: {str(e)[:2000]}"}


def run_size(size: str, args: argparse.Namespace) -> list[dict]:
  s = build_setup(size, args)
  rows = []
  for workload in args.workloads:
    if workload in ("pretrain", "pretrain_cached"):
      rows.append(_guarded(run_pretrain, s, workload, workload == "pretrain_cached"))
    elif workload == "generate":
      rows.append(_guarded(run_generate, s, workload))
    elif workload == "encode":
      rows.extend(_guarded(run_encode, s, workload, mode) for mode in args.encode_modes)
    elif workload == "features":
      rows.append(_guarded(run_features, s, workload))
    elif workload == "input":
      rows.append(_guarded(run_input, s, workload))
    elif workload == "checkpoint":
      rows.append(_guarded(run_checkpoint, s, workload))
    peak = device_peak_bytes()
    if peak is not None and rows:
      rows[-1]["device_peak_gib_so_far"] = peak / 2**30
  return rows


# ---------------------------------------------------------------------------------------------------------
# Report.


ENV_KEYS = ("device_kind", "backend", "num_devices", "jax_version", "peak_flops_per_device")


def environment() -> dict:
  dev = jax.devices()[0]
  return {
    "device_kind": dev.device_kind,
    "backend": jax.default_backend(),
    "num_devices": jax.device_count(),
    "jax_version": jax.__version__,
    "peak_flops_per_device": peak_flops(dev.device_kind),
  }


def add_mfu(rows: list[dict], env: dict) -> None:
  peak = env["peak_flops_per_device"]
  for r in rows:
    if r.get("tflops_per_s") is not None and peak:
      r["mfu"] = r["tflops_per_s"] * 1e12 / (peak * env["num_devices"])
    else:
      r.setdefault("mfu", None)


def _fmt(value, spec: str) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return format(value, spec)


def format_table(env: dict, rows: list[dict]) -> str:
  peak = env["peak_flops_per_device"]
  head = (
    f"device: {env['device_kind']} (backend {env['backend']}, {env['num_devices']} device(s), jax "
    f"{env['jax_version']}; peak {('%.0f TFLOP/s bf16 per device' % (peak / 1e12)) if peak else 'n/a'})"
  )
  cols = (
    "size",
    "workload",
    "batch",
    "dtype",
    "ms/call",
    "img/s",
    "ref img/s",
    "GF/img",
    "TFLOP/s",
    "MFU",
    "mem GiB",
    "notes",
  )
  lines = [head, "  ".join(f"{c:>9s}" for c in cols)]
  for r in rows:
    if "error" in r or "skipped" in r:
      lines.append(
        f"{r['size']:>9s}  {r['workload']:>9s}  {('ERROR ' + r['error']) if 'error' in r else r['skipped']}"[:300]
      )
      continue
    notes = []
    if r["workload"] in ("pretrain", "pretrain_cached"):
      notes.append(f"tok={r['tokenizer_mode']} attn={r['attention_path']} scan={r['scan']} remat={r['remat']}")
    if r["workload"] == "generate":
      notes.append(f"{r['num_steps']} steps tok={r['tokenizer_mode']} attn={r['attention_path']}")
    if r["workload"] == "input":
      notes.append(f"{r['host_cpus']} host CPUs, {r['jpeg_dir']} JPEGs")
    if r["workload"] == "checkpoint":
      notes.append(
        f"{r['checkpoint_bytes'] / 1e9:.3g} GB: save {r['save_s']:.2f} s, seal {r['seal_s']:.2f} s, "
        f"verify {r['verify_s']:.2f} s ({r['verify_gb_per_s']:.2f} GB/s), restore {r['restore_s']:.2f} s"
      )
    mem = r.get("memory", {}).get("total_gib")
    vals = (
      r["size"],
      r["workload"],
      str(r["batch"]),
      r["dtype"],
      _fmt(r["step_ms_median"], ".1f"),
      _fmt(r["images_per_s"], ".1f"),
      _fmt(r["reference_images_per_s"], ".1f"),
      _fmt(r["gflop_per_image"], ".4g"),
      _fmt(r["tflops_per_s"], ".3g"),
      _fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f") + ("%" if r["mfu"] is not None else ""),
      _fmt(mem, ".2f"),
      "; ".join(notes),
    )
    lines.append("  ".join(f"{v:>9s}" for v in vals[:-1]) + "  " + vals[-1])
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--size",
    default="tiny",
    choices=("tiny", "mid", "B", "L", "all"),
    help="'all' = B and L, each in its own process (clean memory figures, an OOM stays local)",
  )
  p.add_argument("--batch", type=int, default=0, help="global batch (0: 8 for tiny, 128 for B/L)")
  p.add_argument("--steps", type=int, default=20, help="timed pretraining steps (median reported)")
  p.add_argument("--warmup", type=int, default=3, help="untimed pretraining steps after compilation")
  p.add_argument("--dtype", default="bfloat16", choices=config_views.DTYPE_NAMES, help="MAGE compute dtype")
  p.add_argument(
    "--workloads",
    default=",".join(WORKLOADS),
    help="comma-separated subset of " + ",".join(WORKLOADS + EXTRA_WORKLOADS),
  )
  p.add_argument("--json", default="", help="write the results here")
  p.add_argument(
    "--tokenizer",
    default="tf32",
    choices=TOKENIZER_MODES,
    help="tokenizer mode inside the pretraining step and generation",
  )
  p.add_argument("--tokenizer-chunks", type=int, default=1, help="tokenize the batch in this many slices")
  p.add_argument("--encode-modes", default=",".join(TOKENIZER_MODES), help="tokenizer modes the encode workload times")
  p.add_argument("--scan", type=int, default=1, help="nn.scan over layers (1) or a Python loop (0)")
  p.add_argument(
    "--remat",
    default="auto",
    help="'auto' (none for tiny/B, dots_with_no_batch_dims_saveable for L), 'none', 'full' or a "
    "jax.checkpoint_policies name",
  )
  p.add_argument(
    "--attention",
    default="fused",
    choices=layers.ATTENTION_IMPLEMENTATIONS,
    help="'fused' = jax.nn.dot_product_attention, 'cudnn' = its cuDNN kernel (NVIDIA, bf16); training "
    "falls back to 'xla' while attn dropout > 0",
  )
  p.add_argument("--dropout", type=float, default=0.1)
  p.add_argument(
    "--attn-dropout", type=float, default=0.1, help="the recipe's 0.1; 0 lets training use fused attention"
  )
  p.add_argument("--fsdp", type=int, default=1, help="size of the 'fsdp' mesh axis (the rest is 'data')")
  p.add_argument("--gen-steps", type=int, default=20)
  p.add_argument("--gen-repeats", type=int, default=5, help="timed generation batches")
  p.add_argument("--encode-repeats", type=int, default=10, help="timed encode batches per mode")
  p.add_argument("--input-batches", type=int, default=10)
  p.add_argument("--input-workers", type=int, default=0, help="tf.data parallel calls (0: AUTOTUNE)")
  p.add_argument("--jpeg-dir", default="", help="folder of JPEGs for the input workload (default: synthesised)")
  p.add_argument("--jpeg-count", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--strict", action="store_true", help="raise on the first failing workload")
  p.add_argument("--dump-hlo", default="", help="write each workload's optimized HLO text into this folder")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  args = _parser().parse_args(argv)
  args.workloads = [w for w in args.workloads.split(",") if w]
  bad = sorted(set(args.workloads) - set(WORKLOADS + EXTRA_WORKLOADS))
  if bad:
    raise ValueError(f"unknown workloads {bad}; expected a subset of {WORKLOADS + EXTRA_WORKLOADS}")
  args.encode_modes = [m for m in args.encode_modes.split(",") if m]
  bad = sorted(set(args.encode_modes) - set(TOKENIZER_MODES))
  if bad:
    raise ValueError(f"unknown encode modes {bad}; expected a subset of {TOKENIZER_MODES}")
  for name in ("steps", "gen_steps", "gen_repeats", "encode_repeats", "input_batches", "tokenizer_chunks", "fsdp"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.warmup < 0 or args.batch < 0:
    raise ValueError("--warmup and --batch must be >= 0")
  if args.remat not in ("auto", "none", "full") and not hasattr(jax.checkpoint_policies, args.remat):
    raise ValueError(f"--remat {args.remat!r} is neither 'auto', 'none', 'full' nor a jax.checkpoint_policies name")
  return args


def _strip_args(argv: list[str], names: tuple[str, ...]) -> list[str]:
  """argv without `--name=value` / `--name value` for each of `names`."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in names:
      skip = True
    elif not a.startswith(tuple(n + "=" for n in names)):
      out.append(a)
  return out


def _run_isolated(size: str, argv: list[str], workloads: list[str]) -> tuple[dict | None, list[dict]]:
  """One size in a child process (fresh allocator: its peak memory is its own; an OOM stays there).

  Returns the child's environment (None if it failed) and its rows.
  """
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, f"{size}.json")
    keep = _strip_args(argv, ("--size", "--json", "--workloads"))
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      f"--size={size}",
      f"--json={out}",
      f"--workloads={','.join(workloads)}",
      *keep,
    ]
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
      return None, [{"size": size, "workload": ",".join(workloads), "error": f"child exited with {proc.returncode}"}]
    with open(out) as f:
      result = json.load(f)
  return {k: result[k] for k in ENV_KEYS}, result["results"]


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.size == "all":
    # This process never touches the accelerator: a GPU backend would pre-allocate most of the memory the
    # children need.
    rows, env = [], None
    for i, size in enumerate(("B", "L")):
      # The input pipeline and the tokenizer do not depend on the MAGE size: time them once.
      workloads = [w for w in args.workloads if w not in ("input", "encode") or i == 0]
      child_env, child_rows = _run_isolated(size, argv, workloads)
      env = env or child_env
      rows += child_rows
    env = env or {k: None for k in ENV_KEYS}
  else:
    env = environment()
    rows = run_size(args.size, args)
  add_mfu(rows, env)
  result = {
    **env,
    "argv": argv,
    "results": rows,
    "flops_convention": "2 FLOPs/MAC; matmuls+convs only; trained part x3 (bench/flops.py)",
  }
  print(format_table(env, rows), flush=True)
  write_json(args.json, result)
  return result


def write_json(path: str | None, result: dict) -> None:
  """Writes a script's result as JSON to `path` (its directory created), when a path is given."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=1, default=float)


def run_script(main: Callable[[], Any]) -> None:
  """Runs a bench script's `main`: an int result is the exit status; a ValueError (a bad flag or input) is one
  `error:` line and status 2."""
  try:
    result = main()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
  run_script(main)
