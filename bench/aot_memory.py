"""Per-device memory of the ViT-L pretraining step at batch 4096, compiled ahead of time on fake CPU devices.

  python bench/aot_memory.py --devices=8 --fsdp=8                     # 8×H100-like: batch 512 per device
  python bench/aot_memory.py --devices=32 --fsdp=32                   # v4-64 (32 chips): 128 per device
  python bench/aot_memory.py --devices=8 --fsdp=8 --tokenizer-chunks=8 --tokenizer=bfloat16

Nothing is allocated: the step (bench/benchmark.py `make_pretrain`, i.e. `steps.pretrain_step` with the
config's logical shardings and donated state) is lowered on abstract inputs (`jax.ShapeDtypeStruct` with
shardings) over a mesh of N fake CPU devices and compiled, and `compiled.memory_analysis()` is printed per
device. `--no-compile` stops after lowering (then only the sharded argument sizes are known).

The figures are an APPROXIMATION of a GPU/TPU run: the CPU backend makes its own fusion and layout
decisions (convolutions are not cuDNN calls, elementwise fusion differs), has no convolution workspace,
and its buffer assignment is not the GPU's. Arguments/outputs (params, optimizer state, batch) are exact;
temporaries can differ by tens of percent. Check on the real device with the same script's numbers in hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", type=int, default=8, help="number of fake CPU devices in the mesh")
  p.add_argument("--fsdp", type=int, default=8, help="'fsdp' mesh axis size (the rest is 'data')")
  p.add_argument("--batch", type=int, default=4096, help="global batch")
  p.add_argument("--size", default="L", choices=("tiny", "B", "L"))
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--tokenizer", default="tf32", choices=("float32", "tf32", "bfloat16"))
  p.add_argument("--tokenizer-chunks", type=int, default=1)
  p.add_argument("--scan", type=int, default=1)
  p.add_argument("--remat", default="nothing_saveable", help="configs/mage_pretrain.py uses this for ViT-L")
  p.add_argument("--attention", default="xla", choices=("xla", "fused"))
  p.add_argument("--no-compile", action="store_true", help="lower only (sizes of the sharded arguments)")
  p.add_argument("--json", default="")
  p.add_argument("--dump-hlo", default="", help="write the optimized HLO text to this file")
  return p


def main(argv=None) -> dict:
  args = _parser().parse_args(argv)
  if args.devices < 1 or args.devices % args.fsdp:
    raise ValueError(f"--devices={args.devices} must be a positive multiple of --fsdp={args.fsdp}")
  # The device count is fixed when JAX starts, so it is set before the first jax import.
  if "jax" in sys.modules:
    raise RuntimeError("bench/aot_memory.py must start its own process (jax is already imported)")
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from bench import benchmark  # pylint: disable=g-import-not-at-top
  from mage_jax import sharding  # pylint: disable=g-import-not-at-top

  bargs = benchmark.parse_args([
      f"--size={args.size}", f"--batch={args.batch}", f"--dtype={args.dtype}", f"--tokenizer={args.tokenizer}",
      f"--tokenizer-chunks={args.tokenizer_chunks}", f"--scan={args.scan}", f"--remat={args.remat}",
      f"--attention={args.attention}", f"--fsdp={args.fsdp}"])
  s = benchmark.build_setup(args.size, bargs)
  res = s.spec.tokenizer.resolution
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    prog = benchmark.make_pretrain(s)
    with_sharding = lambda tree, shardings: jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
    state = with_sharding(sharding.strip_boxes(prog.abstract_state), prog.state_sharding)
    tok_shapes = jax.eval_shape(lambda: nn.unbox(benchmark.VQGAN(s.spec.tokenizer).init(
        jax.random.key(0), jnp.zeros((1, res, res, 3)))))
    tok_vars = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=prog.replicated), tok_shapes)
    batch = {"image": jax.ShapeDtypeStruct((s.batch, res, res, 3), jnp.float32, sharding=prog.batch_sharding)}
    t0 = time.perf_counter()
    lowered = prog.step.lower(state, tok_vars, batch)
    lower_s = time.perf_counter() - t0
    param_count = sum(x.size for x in jax.tree.leaves(state.params))
    # Bytes of the state one device holds: a leaf's shard shape under its sharding.
    per_device_state = sum(
        x.dtype.itemsize * _prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(state))
    report = {
        "size": args.size, "batch": s.batch, "devices": args.devices, "mesh": dict(s.mesh.shape),
        "per_device_batch": s.batch // args.devices, "dtype": args.dtype, "tokenizer": args.tokenizer,
        "tokenizer_chunks": args.tokenizer_chunks, "scan": bool(args.scan), "remat": args.remat,
        "attention": args.attention, "params_m": param_count / 1e6,
        "state_gib_per_device": per_device_state / 2**30, "lower_s": lower_s,
        "backend_note": "CPU compile: an approximation of GPU/TPU memory (see module docstring)",
    }
    if not args.no_compile:
      t0 = time.perf_counter()
      compiled = lowered.compile()
      report["compile_s"] = time.perf_counter() - t0
      report.update(benchmark.compiled_stats(compiled))
      report["hlo"] = benchmark.hlo_summary(compiled.as_text())
      if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
          f.write(compiled.as_text())
  print(json.dumps(report, indent=1, default=float))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1, default=float)
  return report


def _prod(shape) -> int:
  out = 1
  for d in shape:
    out *= int(d)
  return out


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
