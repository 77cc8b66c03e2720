"""mage_jax beside the official PyTorch MAGE on the same CPU, in one run: one table of images/s and ratios.

  python bench/side_by_side.py                          # tiny sizes (the official_tiny fixture), batch 64
  python bench/side_by_side.py --size=mid --rounds=2    # 192 wide, 6+4 layers, 64x64 images
  python bench/side_by_side.py --anchor=''              # mage_jax alone

Each round runs every program once, alternating the two implementations (official, mage_jax, official,
mage_jax, ...), each in a fresh process limited to `--threads` cores, and the table gives the median over rounds
of each program's median step. Rows:

  pretrain         one training step on images: frozen tokenizer encode + masked encoder/decoder forward and
                   backward + clip + AdamW (the official `model(x)`, `loss.backward()`, `clip_grad_norm_`,
                   `opt.step()`; mage_jax's jitted `steps.pretrain_step`), float32, dropout off;
  pretrain_cached  mage_jax's step on cached token ids (`input.tokens`), against the official step above, which
                   has no cached-token mode and must encode;
  encode           the tokenizer alone, images -> ids;
  generate         12-step iterative decoding plus the VQGAN decode, batch `--batch` (the official
                   `gen_img_uncond.gen_image` loop; mage_jax's `sampling.make_sampler`);
  features         the linear probe's frozen features: ids, encoder over every token, mean pool, fc_norm (the
                   official modules driven by `bench/official_features.py`).

The official rows need `--anchor` (default `../shared/anchor`, the official code with its `setup.sh` and
`official_step.py`); where it is absent only mage_jax is timed. `--official-allocators=default,tcmalloc` also
times the official code under tcmalloc, the allocator the mage_jax binaries run under (mage_jax/system/allocator.py).
Nothing else should run on the machine meanwhile: a concurrent job makes both sides' threads fight and the
figures meaningless. Prints the table (with the load average before and after) and writes `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
  sys.path.insert(0, ROOT)

from bench import benchmark  # noqa: E402
from mage_jax.models.mage import config_for  # noqa: E402
from mage_jax.system import allocator  # noqa: E402

SIZES = ("tiny", "mid")
# The official code reads its sizes from a fixture-style config.json; these describe benchmark.SIZES.
OFFICIAL_TOKENIZER = {
  "double_z": False,
  "z_channels": 16,
  "in_channels": 3,
  "out_ch": 3,
  "ch": 32,
  "ch_mult": [1, 1, 2],
  "num_res_blocks": 1,
  "attn_resolutions": [],
  "dropout": 0.0,
  "n_embed": 1024,
  "embed_dim": 16,
}
OFFICIAL_MAGE = {
  "tiny": dict(
    embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, img_size=32
  ),
  "mid": dict(
    embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3, img_size=64
  ),
}
GENERATE_STEPS = 12
GENERATE_TEMPERATURE = 4.5


def official_config(size: str) -> dict:
  mage = dict(OFFICIAL_MAGE[size])
  res = mage["img_size"]
  mage.update(
    mlp_ratio=4,
    layer_norm_eps=1e-6,
    patch_size=4,
    num_tokens=(res // 4) ** 2,
    vocab_size=2025,
    fake_class_id=1100,
    mask_id=2024,
    label_smoothing=0.1,
  )
  return {"tokenizer": {**OFFICIAL_TOKENIZER, "resolution": res}, "mage": mage}


def _check_sizes_agree(size: str) -> None:
  """The official config above and mage_jax's benchmark size describe the same models."""
  spec = benchmark.SIZES[size]
  mage = OFFICIAL_MAGE[size]
  ours = dict(config_for(spec.variant, **dict(spec.mage)).__dict__)
  mismatched = {k: (v, ours[k]) for k, v in mage.items() if k in ours and ours[k] != v}
  tok = spec.tokenizer
  if (
    mismatched
    or mage["img_size"] != tok.resolution
    or list(tok.ch_mult) != OFFICIAL_TOKENIZER["ch_mult"]
    or tok.ch != OFFICIAL_TOKENIZER["ch"]
    or tok.z_channels != OFFICIAL_TOKENIZER["z_channels"]
  ):
    raise ValueError(f"official and mage_jax sizes differ for {size}: {mismatched or 'tokenizer'}")


def _pinned(command: list[str], threads: int) -> list[str]:
  """The command limited to `threads` cores (taskset) where the machine has more."""
  if threads < (os.cpu_count() or threads) and _has("taskset"):
    return ["taskset", "-c", f"0-{threads - 1}", *command]
  return command


def _has(program: str) -> bool:
  return any(os.access(os.path.join(d, program), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


def _run_json(command: list[str], env: dict | None = None, output: str | None = None) -> dict:
  """Runs a timing child; its JSON result is `output`'s content or the last stdout line."""
  proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"{' '.join(command[:4])} ... exited with {proc.returncode}: {' | '.join(tail)}")
  if output:
    with open(output) as f:
      return json.load(f)
  return json.loads(proc.stdout.strip().splitlines()[-1])


class Official:
  """The official code through the anchor's scripts and venv."""

  def __init__(self, anchor: str, size: str, batch: int, threads: int, steps: int, tmp: str, allocator_name: str):
    self.anchor, self.batch, self.threads, self.steps = anchor, batch, threads, steps
    self.python = (
      subprocess.run(["bash", os.path.join(anchor, "setup.sh")], capture_output=True, text=True, check=True)
      .stdout.strip()
      .splitlines()[-1]
    )
    self.config = os.path.join(tmp, f"official_{size}.json")
    with open(self.config, "w") as f:
      json.dump(official_config(size), f)
    self.env = dict(os.environ)
    self.env.pop("LD_PRELOAD", None)
    if allocator_name == "tcmalloc":
      library = allocator.find_tcmalloc()
      if library is None:
        raise ValueError("--official-allocators=tcmalloc: no tcmalloc on this system")
      self.env["LD_PRELOAD"] = library

  def step(self) -> dict:
    return _run_json(
      _pinned(
        [
          self.python,
          os.path.join(self.anchor, "official_step.py"),
          "--config",
          self.config,
          "--batch",
          str(self.batch),
          "--steps",
          str(self.steps),
          "--threads",
          str(self.threads),
        ],
        self.threads,
      ),
      self.env,
    )

  def generate(self) -> dict:
    return _run_json(
      _pinned(
        [
          self.python,
          os.path.join(self.anchor, "official_step.py"),
          "--config",
          self.config,
          "--batch",
          str(self.batch),
          "--steps",
          str(max(self.steps // 4, 3)),
          "--threads",
          str(self.threads),
          "--what",
          "generate",
          "--num_iter",
          str(GENERATE_STEPS),
          "--temperature",
          str(GENERATE_TEMPERATURE),
        ],
        self.threads,
      ),
      self.env,
    )

  def features(self) -> dict:
    return _run_json(
      _pinned(
        [
          self.python,
          os.path.join(ROOT, "bench", "official_features.py"),
          "--anchor",
          self.anchor,
          "--config",
          self.config,
          "--batch",
          str(self.batch),
          "--steps",
          str(self.steps),
          "--threads",
          str(self.threads),
        ],
        self.threads,
      ),
      self.env,
    )


def mage_jax_rows(size: str, batch: int, threads: int, steps: int, tmp: str) -> dict:
  """mage_jax's rows from one `bench/benchmark.py` child (float32, dropout off, the loop layout): name -> s/call."""
  out = os.path.join(tmp, "mage_jax.json")
  command = [
    sys.executable,
    os.path.join(ROOT, "bench", "benchmark.py"),
    f"--size={size}",
    f"--batch={batch}",
    "--dtype=float32",
    "--tokenizer=float32",
    "--encode-modes=float32",
    "--dropout=0",
    "--attn-dropout=0",
    "--attention=xla",
    "--scan=0",
    f"--steps={steps}",
    f"--encode-repeats={steps}",
    f"--gen-steps={GENERATE_STEPS}",
    f"--gen-repeats={max(steps // 4, 3)}",
    "--workloads=pretrain,pretrain_cached,encode,generate,features",
    f"--json={out}",
  ]
  result = _run_json(_pinned(command, threads), output=out)
  rows = {}
  for row in result["results"]:
    if "error" in row:
      raise RuntimeError(f"mage_jax {row['workload']}: {row['error']}")
    rows[row["workload"]] = row["step_ms_median"] / 1e3
  return rows


def _official_rows(official: Official) -> dict:
  step = official.step()
  return {
    "pretrain": step["median_s"],
    "encode": step["encode_median_s"],
    "generate": official.generate()["median_s"],
    "features": official.features()["median_s"],
  }


def load_average() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


# Which official row each mage_jax row is compared with.
AGAINST = {
  "pretrain": "pretrain",
  "pretrain_cached": "pretrain",
  "encode": "encode",
  "generate": "generate",
  "features": "features",
}


def summarize(rounds: dict[str, list[dict]], batch: int) -> list[dict]:
  """Per mage_jax row: median seconds over rounds, images/s, and per official variant its images/s and ratio."""
  ours = rounds["mage_jax"]
  table = []
  for name, against in AGAINST.items():
    seconds = statistics.median(r[name] for r in ours)
    row = {"row": name, "mage_jax_s": seconds, "mage_jax_img_s": batch / seconds, "official": {}}
    for label, results in rounds.items():
      if label == "mage_jax":
        continue
      official_s = statistics.median(r[against] for r in results)
      row["official"][label] = {"s": official_s, "img_s": batch / official_s, "ratio": official_s / seconds}
    table.append(row)
  return table


def format_table(table: list[dict], header: str) -> str:
  labels = list(table[0]["official"]) if table else []
  cols = ["row", "mage_jax img/s"] + [f"{x} img/s" for x in labels] + [f"ratio vs {x}" for x in labels]
  lines = [header, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in table:
    vals = [r["row"], f"{r['mage_jax_img_s']:.1f}"]
    vals += [f"{r['official'][x]['img_s']:.1f}" for x in labels]
    vals += [f"{r['official'][x]['ratio']:.2f}x" for x in labels]
    lines.append("| " + " | ".join(vals) + " |")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  p.add_argument("--size", default="tiny", choices=SIZES)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--steps", type=int, default=20, help="timed calls per program per round (median)")
  p.add_argument("--rounds", type=int, default=2, help="alternations of the two implementations")
  p.add_argument(
    "--anchor",
    default=os.path.join(ROOT, "..", "shared", "anchor"),
    help="the official code (setup.sh, official_step.py); '' or a missing folder: mage_jax alone",
  )
  p.add_argument(
    "--official-allocators", default="default", help="comma-separated: 'default' (glibc) and/or 'tcmalloc'"
  )
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  for name in ("batch", "threads", "steps", "rounds"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
  args.official_allocators = [a for a in args.official_allocators.split(",") if a]
  bad = sorted(set(args.official_allocators) - {"default", "tcmalloc"})
  if bad or not args.official_allocators:
    raise ValueError(f"--official-allocators: expected 'default' and/or 'tcmalloc', got {bad or 'nothing'}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  _check_sizes_agree(args.size)
  anchor = os.path.abspath(args.anchor) if args.anchor else ""
  has_anchor = bool(anchor) and os.path.isfile(os.path.join(anchor, "official_step.py"))
  load_before = load_average()
  with tempfile.TemporaryDirectory() as tmp:
    officials = (
      {
        f"official ({a})": Official(anchor, args.size, args.batch, args.threads, args.steps, tmp, a)
        for a in args.official_allocators
      }
      if has_anchor
      else {}
    )
    rounds: dict[str, list[dict]] = {"mage_jax": [], **{k: [] for k in officials}}
    for i in range(args.rounds):
      for label, official in officials.items():
        rounds[label].append(_official_rows(official))
        print(f"round {i + 1}: {label}: {rounds[label][-1]}", file=sys.stderr, flush=True)
      rounds["mage_jax"].append(mage_jax_rows(args.size, args.batch, args.threads, args.steps, tmp))
      print(f"round {i + 1}: mage_jax: {rounds['mage_jax'][-1]}", file=sys.stderr, flush=True)
  table = summarize(rounds, args.batch)
  header = (
    f"{args.size} sizes, batch {args.batch}, float32, {args.threads} threads, {args.rounds} rounds x "
    f"{args.steps} calls, {time.strftime('%Y-%m-%d')}, load average {load_before} -> {load_average()}"
    + ("" if has_anchor else "; official code not found: mage_jax alone")
  )
  print(format_table(table, header), flush=True)
  result = {
    "args": vars(args),
    "header": header,
    "table": table,
    "rounds": rounds,
    "mage_jax_allocator": "tcmalloc" if allocator.find_tcmalloc() else "default",
  }
  benchmark.write_json(args.json, result)
  return result


if __name__ == "__main__":
  benchmark.run_script(main)
