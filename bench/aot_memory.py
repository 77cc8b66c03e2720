"""Per-device memory of the pretraining step, compiled ahead of time on CPU devices (nothing is allocated).

  python bench/aot_memory.py --size=L --devices=8 --fsdp=8                 # batch 4096: 512 per device
  python bench/aot_memory.py --size=L --devices=32 --fsdp=32               # v4-64 (32 chips): 128 per device
  python bench/aot_memory.py --size=L --devices=8 --fsdp=8 --tokenizer-chunks=8 --tokenizer=bfloat16

The step is the one `python -m mage_jax.main --config=configs/mage_pretrain.py:variant=B|L` runs
(`bench/lower.py`'s `pretrain` program: the config's dtypes, scan, remat, tokenizer precision and chunks, the
logical shardings, donated state); flags left empty keep the config's value. It is lowered on abstract inputs
over a mesh of `--devices` CPU devices and compiled, and `compiled.memory_analysis()` is printed per device.
`--no-compile` stops after lowering (then only the sharded argument sizes are known).

The figures APPROXIMATE a GPU/TPU run: the CPU backend makes its own fusion and layout decisions (convolutions
are not cuDNN calls, elementwise fusion differs), has no convolution workspace, keeps bf16 buffers in float32
where it computes (so bf16 programs read high), and its buffer assignment is not the GPU's. Arguments/outputs
(params, optimizer state, batch) are exact; temporaries can differ by tens of percent. `bench/memory_plan.py`
turns these figures into per-target batch sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench import benchmark, lower  # noqa: E402
from mage_jax.models import layers  # noqa: E402

# Tokenizer modes of the benchmark as config values: (tokenizer.dtype, tokenizer.precision).
TOKENIZER_MODES = {"float32": ("float32", "highest"), "tf32": ("float32", "high"), "bfloat16": ("bfloat16", "highest")}


def overrides_from(args: argparse.Namespace) -> dict:
  """Config overrides (dotted keys) for the flags that were given."""
  out = {"mesh": f"data=-1,fsdp={args.fsdp},model=1", "num_devices": args.devices}
  if args.batch:
    out["input.batch_size"] = args.batch
  if args.dtype:
    out["model.dtype"] = args.dtype
  if args.tokenizer:
    out["tokenizer.dtype"], out["tokenizer.precision"] = TOKENIZER_MODES[args.tokenizer]
  if args.tokenizer_chunks:
    out["tokenizer.chunks"] = args.tokenizer_chunks
  if args.scan >= 0:
    out["model.scan"] = bool(args.scan)
  if args.remat:
    out["model.remat_policy"] = args.remat
  return out


def state_gib_per_device(state) -> float:
  """Bytes of the train state one device holds (each leaf's shard under its sharding), GiB."""
  return sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(state)) / 2**30


def step_memory(size: str, overrides: dict, attention: str = "xla", compile_: bool = True) -> dict:
  """Lowers (and compiles) the pretraining step with the config `overrides`; its per-device memory figures."""
  program = lower.pretrain(size, overrides.get("num_devices", 1), attention, overrides)
  state = program.args[0]
  report = {
    "size": size,
    "mesh": program.info["mesh"],
    **program.info,
    "params_m": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
    "state_gib_per_device": state_gib_per_device(state),
  }
  devices = math.prod(program.info["mesh"].values())
  report["per_device_batch"] = report["batch"] / devices
  with program.context():
    t0 = time.perf_counter()
    lowered = program.fn.lower(*program.args)
    report["lower_s"] = time.perf_counter() - t0
    if compile_:
      t0 = time.perf_counter()
      # No LLVM optimisation: buffer assignment is decided before it.
      compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
      report["compile_s"] = time.perf_counter() - t0
      report.update(benchmark.compiled_stats(compiled))
  return report


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
  )
  p.add_argument("--size", default="L", choices=lower.SIZES)
  p.add_argument("--devices", type=int, default=8, help="CPU devices in the mesh")
  p.add_argument("--fsdp", type=int, default=8, help="'fsdp' mesh axis size (the rest is 'data')")
  p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's, 4096)")
  p.add_argument("--dtype", default="", choices=("", "bfloat16", "float32"), help="MAGE compute dtype ('': config)")
  p.add_argument("--tokenizer", default="", choices=("", *TOKENIZER_MODES), help="tokenizer mode ('': config)")
  p.add_argument("--tokenizer-chunks", type=int, default=0, help="tokenizer slices (0: config)")
  p.add_argument("--scan", type=int, default=-1, help="1/0: scan over layers or not (-1: config)")
  p.add_argument("--remat", default="", help="'none', 'full' or a jax.checkpoint_policies name ('': config)")
  p.add_argument("--attention", default="xla", choices=layers.ATTENTION_IMPLEMENTATIONS[:2])
  p.add_argument("--no-compile", action="store_true", help="lower only (sizes of the sharded arguments)")
  p.add_argument("--json", default="")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  args = _parser().parse_args(argv)
  if args.devices < 1 or args.fsdp < 1 or args.devices % args.fsdp:
    raise ValueError(f"--devices={args.devices} must be a positive multiple of --fsdp={args.fsdp}")
  if args.remat and args.remat not in ("none", "full") and not hasattr(jax.checkpoint_policies, args.remat):
    raise ValueError(f"--remat {args.remat!r} is neither 'none', 'full' nor a jax.checkpoint_policies name")
  if args.batch < 0 or args.tokenizer_chunks < 0:
    raise ValueError("--batch and --tokenizer-chunks must be >= 0")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  lower.use_cpu_devices(args.devices)
  report = step_memory(args.size, overrides_from(args), args.attention, compile_=not args.no_compile)
  report["backend_note"] = "CPU compile: an approximation of GPU/TPU memory (see module docstring)"
  print(json.dumps(report, indent=1, default=float))
  benchmark.write_json(args.json, report)
  return report


if __name__ == "__main__":
  benchmark.run_script(main)
