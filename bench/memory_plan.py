"""Memory plans: the largest per-device pretraining batch that fits each accelerator, per remat policy.

  python bench/memory_plan.py --sizes=B,L --json=memory_plan.json     # a CPU compile per point (minutes each)
  python bench/memory_plan.py --sizes=tiny --batches=2,4              # CI-sized

COMPUTED, NOT MEASURED. For each size and remat policy, the pretraining step of the ImageNet config
(`bench/aot_memory.py`: its dtypes, scan, tokenizer precision and chunks; the configs' data-parallel mesh, so
every device holds the whole train state) is compiled for one CPU device at two per-device batches, and the
per-device memory is taken as the line through them: fixed (params, optimizer state, code) + batch x per image
(activations). For each target, a batch fits when its estimate is within HEADROOM of the device's memory. The
plan takes the least recomputation (no remat, then `dots_with_no_batch_dims_saveable`, then `nothing_saveable`)
whose largest fitting power-of-two batch is at least MIN_BUSY_BATCH (enough to keep one chip busy), else the
policy that fits the most; the paper's global batch 4096 then needs 4096 / batch devices (no gradient
accumulation). The CPU compile reads high for bf16 programs (see aot_memory.py): the plans are conservative
estimates to check on the device (`bench/benchmark.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import aot_memory, benchmark, lower  # noqa: E402

# Device memory in GiB as the runtimes report it (nvidia-smi: H100 SXM 81,559 MiB, H200 143,771 MiB; Cloud TPU
# docs: v4 32 GiB, v5e 16 GiB, v5p 95 GiB per chip).
TARGETS = (("H100 80GB", 79.6), ("H200 141GB", 140.4), ("TPU v4", 32.0), ("TPU v5e", 16.0), ("TPU v5p", 95.0))
POLICIES = ("none", "dots_with_no_batch_dims_saveable", "nothing_saveable")  # least recomputation first
# Share of device memory a plan may use (on GPUs with XLA_PYTHON_CLIENT_MEM_FRACTION=.95; JAX's default .75
# leaves less).
HEADROOM = 0.9
GLOBAL_BATCH = 4096
MIN_BUSY_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Fit:
  """Per-device GiB = fixed + per_image * batch, from two compiled points."""

  fixed: float
  per_image: float

  @classmethod
  def through(cls, b1: int, m1: float, b2: int, m2: float) -> "Fit":
    per_image = (m2 - m1) / (b2 - b1)
    return cls(m1 - per_image * b1, per_image)

  def gib(self, batch: int) -> float:
    return self.fixed + self.per_image * batch

  def max_batch(self, capacity_gib: float, multiple: int = 1) -> int:
    """Largest power-of-two batch (a multiple of `multiple`, at most GLOBAL_BATCH) that fits; 0 if none."""
    best, b = 0, 1
    while b <= GLOBAL_BATCH:
      if b % multiple == 0 and self.gib(b) <= HEADROOM * capacity_gib:
        best = b
      b *= 2
    return best


def fit_policy(size: str, policy: str, batches: tuple[int, int], overrides: dict | None = None) -> dict:
  """Compiles the step at both batches with `policy` (and config `overrides`); the points and their line."""
  points = []
  for b in batches:
    points.append(
      aot_memory.step_memory(
        size, {"num_devices": 1, "input.batch_size": b, "model.remat_policy": policy, **(overrides or {})}
      )
    )
    print(
      f"ViT-{size} remat {policy} batch {b}: {points[-1]['memory']['total_gib']:.2f} GiB "
      f"(compiled in {points[-1]['compile_s']:.0f} s)",
      file=sys.stderr,
      flush=True,
    )
  gib = [p["memory"]["total_gib"] for p in points]
  fit = Fit.through(batches[0], gib[0], batches[1], gib[1])
  return {
    "batches": list(batches),
    "total_gib": gib,
    "fixed_gib": fit.fixed,
    "per_image_gib": fit.per_image,
    "state_gib": points[0]["state_gib_per_device"],
    "tokenizer": points[0]["tokenizer"],
    "compile_s": [p["compile_s"] for p in points],
  }


def plan_target(fits: dict[str, Fit], capacity_gib: float, multiple: int) -> dict:
  """The plan for one target from the policies' lines (see the module docstring)."""
  best = {policy: fit.max_batch(capacity_gib, multiple) for policy, fit in fits.items()}
  busy = [p for p in fits if best[p] >= MIN_BUSY_BATCH]
  chosen = busy[0] if busy else max(fits, key=lambda p: best[p])
  batch = best[chosen]
  return {
    "max_batch": best,
    "remat": chosen,
    "batch": batch,
    "devices_for_4096": GLOBAL_BATCH // batch if batch else None,
    "gib_at_plan": fits[chosen].gib(batch) if batch else None,
  }


def plan(sizes, batches: tuple[int, int], policies=POLICIES, targets=TARGETS, tokenizer_chunks: int = 0) -> dict:
  """Per size: the policies' lines and the plan for each target; `tokenizer_chunks` > 0 replaces the config's."""
  out = {"headroom": HEADROOM, "global_batch": GLOBAL_BATCH, "min_busy_batch": MIN_BUSY_BATCH, "sizes": {}}
  overrides = {"tokenizer.chunks": tokenizer_chunks} if tokenizer_chunks else {}
  for size in sizes:
    # The tokenizer encodes the batch in chunks (ViT-L's config: 4): the batch must split evenly.
    multiple = lower.mage_config("mage_pretrain", size, 1, overrides).tokenizer.get("chunks", 1)
    policy_fits = {p: fit_policy(size, p, batches, overrides) for p in policies}
    fits = {p: Fit(f["fixed_gib"], f["per_image_gib"]) for p, f in policy_fits.items()}
    out["sizes"][size] = {
      "policies": policy_fits,
      "chunks": multiple,
      "targets": {name: {"gib": gib, **plan_target(fits, gib, multiple)} for name, gib in targets},
    }
  return out


def markdown(result: dict) -> str:
  """The plan as a markdown table (one row per target and size)."""
  short = {"none": "none", "dots_with_no_batch_dims_saveable": "dots", "nothing_saveable": "nothing"}
  lines = [
    "| target (GiB) | model | largest per-device batch: no remat / dots saveable / nothing saveable | "
    "plan: batch, remat | devices for 4096 | est. GiB at plan |",
    "|---|---|---|---|---|---|",
  ]
  for size, s in result["sizes"].items():
    for name, t in s["targets"].items():
      maxes = " / ".join(str(t["max_batch"].get(p, "-")) for p in POLICIES)
      planned = f"{t['batch']}, {short[t['remat']]}" if t["batch"] else "does not fit"
      gib = f"{t['gib_at_plan']:.1f}" if t["batch"] else "-"
      lines.append(
        f"| {name} ({t['gib']:g}) | ViT-{size} | {maxes} | {planned} | {t['devices_for_4096'] or '-'} | {gib} |"
      )
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
  )
  p.add_argument("--sizes", default="B,L", help="comma-separated subset of tiny,B,L")
  p.add_argument("--batches", default="16,64", help="the two per-device batches compiled per policy")
  p.add_argument("--tokenizer-chunks", type=int, default=0, help="frozen tokenizer slices (0: the config's)")
  p.add_argument("--json", default="", help="write the plan here")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  args = _parser().parse_args(argv)
  args.sizes = [s for s in args.sizes.split(",") if s]
  bad = sorted(set(args.sizes) - set(lower.SIZES))
  if bad or not args.sizes:
    raise ValueError(f"--sizes: unknown {bad or 'empty list'}; expected a subset of {lower.SIZES}")
  try:
    batches = tuple(int(b) for b in args.batches.split(","))
  except ValueError:
    batches = ()
  if len(batches) != 2 or not 0 < batches[0] < batches[1]:
    raise ValueError(f"--batches={args.batches!r}: expected two increasing positive integers, e.g. 16,64")
  if args.tokenizer_chunks < 0 or (args.tokenizer_chunks and any(b % args.tokenizer_chunks for b in batches)):
    raise ValueError(f"--tokenizer-chunks={args.tokenizer_chunks} must be >= 0 and divide --batches")
  args.batches = batches
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  lower.use_cpu_devices(1, exact=False)
  result = plan(args.sizes, args.batches, tokenizer_chunks=args.tokenizer_chunks)
  print(markdown(result))
  benchmark.write_json(args.json, result)
  return result


if __name__ == "__main__":
  benchmark.run_script(main)
