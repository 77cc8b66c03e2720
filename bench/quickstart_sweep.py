"""The quickstart recipe sweep: each row is one `python -m mage_jax.quickstart --budget=sweep` run.

  python bench/quickstart_sweep.py --root=~/mage_runs/sweep --rows=base,w96      # run rows (resumable)
  python bench/quickstart_sweep.py --root=~/mage_runs/sweep --table              # the markdown table so far
  python bench/quickstart_sweep.py --list                                         # every row and its command

A row's stages that equal an earlier row's (the same data, tokenizer steps and views) are linked from that row's
workdir instead of recomputed (hard links; the quickstart's stage records then find them done), so a row costs
its own stages only; its `minutes` column adds the linked stages' recorded seconds, i.e. what a fresh
`make quickstart` with these settings would take. Rerunning a row is its printed command, on its own workdir.
Run nothing else on the machine meanwhile (the minutes are wall time). Results: ROOT/<row>/results.json, and
ROOT/sweep.json with every finished row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
  sys.path.insert(0, ROOT)

from bench import benchmark  # noqa: E402  (write_json, run_script)

# name -> quickstart flags over `--budget=sweep` (whose recipe is the quickstart's 'full' budget).
ROWS = {
  # The first base recipe (the quickstart's 'full' budget of the time, without its controls), then one change at
  # a time at about the same MAGE minutes (steps scaled by the measured step time); w64 won, and the rows after
  # it change one thing from w64.
  "base": {"mage_recipe": "width=128", "mage_steps": 700},
  "w96": {"mage_recipe": "width=96", "mage_steps": 1150},
  "w64": {"mage_recipe": "width=64", "mage_steps": 1850},
  "b64": {"mage_recipe": "width=128,batch=64", "mage_steps": 1350},
  "w64_blr2x": {"mage_recipe": "width=64,blr=0.0048", "mage_steps": 1850},
  "w64_blr4x": {"mage_recipe": "width=64,blr=0.0096", "mage_steps": 1850},
  "w64_mask_low": {"mage_recipe": "width=64,mask_min=0.3,mask_mu=0.4", "mage_steps": 1850},
  "w64_d6": {"mage_recipe": "width=64,depth=6", "mage_steps": 1450},
  "w64_b256": {"mage_recipe": "width=64,batch=256", "mage_steps": 950},
  "w64_k4": {"mage_recipe": "width=64", "mage_steps": 1850, "views": 4},
  "w64_tok4k": {"mage_recipe": "width=64", "mage_steps": 1850, "tokenizer_steps": 4000},
  # The crop law: ImageNet's area range (0.2, 1) zooms a centred garment, and samples imitate the zoom.
  "w64_blr4x_crop80": {"mage_recipe": "width=64,blr=0.0096,crop_min=0.8", "mage_steps": 1850},
  "w64_blr4x_crop100": {"mage_recipe": "width=64,blr=0.0096,crop_min=1.0", "mage_steps": 1850},
  # The tokenizer's adversarial loss from mid-run: sharper reconstructions are FID's floor.
  "w64_crop100_tokdisc": {
    "mage_recipe": "width=64,blr=0.0096,crop_min=1.0",
    "mage_steps": 1850,
    "tokenizer_recipe": "disc",
  },
  # A shorter tokenizer: 4,000 steps made the masked-token task harder and the features worse.
  "w64_crop100_tok1k": {"mage_recipe": "width=64,blr=0.0096,crop_min=1.0", "mage_steps": 1850, "tokenizer_steps": 1000},
  # From here on a row's cached views alternate flips (`pipeline.example_views`, cache format 2): K = 2 views are the
  # image and its mirror; the rows above drew each view's flip by itself (both views the same in half the images).
  "w64_crop100_mirror": {"mage_recipe": "width=64,blr=0.0096,crop_min=1.0", "mage_steps": 1850},
  "w64_crop100_tok1k_mirror": {
    "mage_recipe": "width=64,blr=0.0096,crop_min=1.0",
    "mage_steps": 1850,
    "tokenizer_steps": 1000,
  },
  "w64_crop100_tok500_mirror": {
    "mage_recipe": "width=64,blr=0.0096,crop_min=1.0",
    "mage_steps": 1850,
    "tokenizer_steps": 500,
  },
  "full": {"budget": "full"},  # `make quickstart` itself: the controls and the paper-protocol probe too
}
SHARED = (("data", ("data.json",)), ("tokenizer", ("tokenizer", "reconstructions.png")), ("cache", ("tokens",)))


def command(root: str, name: str) -> list[str]:
  flags = [f"--{k}={v}" for k, v in sorted(ROWS[name].items())]
  return [
    sys.executable,
    "-m",
    "mage_jax.quickstart",
    "--budget=sweep",
    f"--workdir={os.path.join(root, name)}",
    *flags,
  ]


def _stage_inputs(name: str) -> tuple:
  """What the shareable stages of a row depend on, stage by stage (prefixes match ⇒ those stages match)."""
  from mage_jax.jobs import quickstart_options  # pylint: disable=g-import-not-at-top

  row = ROWS[name]
  crop = quickstart_options.Options(
    "", budget=row.get("budget", "sweep"), mage_recipe=row.get("mage_recipe", "")
  ).crop_scale()
  return (
    ("data",),
    ("tokenizer", row.get("tokenizer_steps", 0), row.get("tokenizer_recipe", "")),
    ("cache", row.get("views", 0), *crop),
  )


def _current_cache_format(tokens_dir: str) -> bool:
  from mage_jax.data import cached_tokens  # pylint: disable=g-import-not-at-top

  try:
    with open(os.path.join(tokens_dir, cached_tokens.META_FILE)) as f:
      return json.load(f).get("format_version") == cached_tokens.FORMAT_VERSION
  except (OSError, ValueError, AttributeError):
    return False


def seed_from_earlier(root: str, name: str) -> str | None:
  """Links the longest run of shareable stages a finished earlier row has in common; returns that row."""
  mine = _stage_inputs(name)
  target = os.path.join(root, name)
  if os.path.exists(os.path.join(target, "stages.json")):
    return None  # the row has started already: it resumes by itself
  best, depth = None, 0
  for other in ROWS:
    if other == name or not os.path.exists(os.path.join(root, other, "results.json")):
      continue
    common = 0
    while common < len(mine) and _stage_inputs(other)[common] == mine[common]:
      common += 1
    if common == len(SHARED) and not _current_cache_format(os.path.join(root, other, "tokens")):
      common -= 1  # the cache of an older view law: its tokenizer still serves
    if common > depth:
      best, depth = other, common
  if best is None:
    return None
  source = os.path.join(root, best)
  with open(os.path.join(source, "stages.json")) as f:
    records = json.load(f)
  os.makedirs(target, exist_ok=True)
  kept = {}
  for stage, paths in SHARED[:depth]:
    for p in paths:
      src = os.path.join(source, p)
      if os.path.isdir(src):
        shutil.copytree(src, os.path.join(target, p), copy_function=os.link)
      elif os.path.exists(src):
        os.link(src, os.path.join(target, p))
    kept[stage] = records[stage]
  with open(os.path.join(target, "stages.json"), "w") as f:
    json.dump(kept, f, indent=1)
  with open(os.path.join(target, "seeded_from.json"), "w") as f:
    json.dump({"row": best, "stages": list(kept)}, f)
  return best


def row_result(root: str, name: str) -> dict | None:
  path = os.path.join(root, name, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    r = json.load(f)
  seconds = dict(r["stage_seconds"])
  seeded = os.path.join(root, name, "seeded_from.json")
  if os.path.exists(seeded):
    with open(seeded) as f:
      origin = json.load(f)
    earlier = row_result(root, origin["row"])
    for stage in origin["stages"]:
      seconds[stage] = earlier["stage_seconds"][stage]
  rep = r["representations"].get("mage", {})
  fewshot = rep.get("fewshot", {})
  shots = fewshot.get("logreg") or logreg_fewshot(os.path.join(root, name))
  return {
    "row": name,
    "flags": ROWS.get(name, {}),
    "stage_seconds": seconds,
    "minutes": sum(seconds.values()) / 60,
    "logistic": rep.get("logistic", {}).get("top1"),
    **{f"{k}_shot": (shots.get(k) or {}).get("mean") for k in ("1", "5", "10")},
    "10_shot_ridge": (fewshot.get("ridge", {}).get("10") or {}).get("mean"),
    "fid": r["fid"].get("fid"),
    "psnr": r["tokenizer"]["psnr"],
    "loss": r["mage"]["loss"],
    "mage_steps_per_s": r["mage"]["steps"] / r["mage"]["seconds"],
  }


def logreg_fewshot(row_dir: str) -> dict:
  """k-shot accuracies of the logistic-regression protocol from a row's dumped features, for rows whose budget
  ran ridge only (computed once, kept in the row's folder)."""
  path = os.path.join(row_dir, "fewshot_logreg.json")
  if not os.path.exists(path):
    import numpy as np  # pylint: disable=g-import-not-at-top

    from mage_jax.evals import fewshot  # pylint: disable=g-import-not-at-top

    with (
      np.load(os.path.join(row_dir, "features", "mage_train.npz")) as tr,
      np.load(os.path.join(row_dir, "features", "mage_test.npz")) as te,
    ):
      acc = fewshot.evaluate_fewshot(
        tr["features"],
        tr["labels"],
        te["features"],
        te["labels"],
        shots=(1, 5, 10),
        trials=5,
        seed=0,
        classifier="logreg",
        num_classes=10,
      )
    with open(path, "w") as f:
      json.dump({str(k): {"mean": m, "std": sd} for k, (m, sd) in acc.items()}, f)
  with open(path) as f:
    return json.load(f)


def _pct(x):
  return "-" if x is None else f"{100 * x:.1f}"


def table(root: str) -> str:
  lines = [
    "| row | settings (over the base recipe) | minutes | MAGE min | logistic | 10-shot | 5-shot | 1-shot | "
    "10-shot ridge | FID |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in ROWS:
    r = row_result(root, name)
    if r is None:
      continue
    settings = ", ".join(f"{k}={v}" for k, v in sorted(r["flags"].items())) or "base"
    lines.append(
      f"| {name} | {settings} | {r['minutes']:.1f} | {r['stage_seconds'].get('mage', 0) / 60:.1f} | "
      f"{_pct(r['logistic'])} | {_pct(r['10_shot'])} | {_pct(r['5_shot'])} | {_pct(r['1_shot'])} | "
      f"{_pct(r['10_shot_ridge'])} | {'-' if r['fid'] is None else format(r['fid'], '.1f')} |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  p.add_argument("--root", default=os.path.expanduser("~/mage_runs/sweep"))
  p.add_argument("--rows", default="", help="comma-separated row names to run, in order")
  p.add_argument("--table", action="store_true", help="print the table of the finished rows")
  p.add_argument("--list", action="store_true", help="print every row's command")
  args = p.parse_args(argv)
  root = os.path.abspath(os.path.expanduser(args.root))
  names = [n for n in args.rows.split(",") if n]
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    raise ValueError(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
  if args.list:
    for name in ROWS:
      print(f"{name}: {' '.join(command(root, name))}")
  for name in names:
    seeded = seed_from_earlier(root, name)
    print(
      f"[{time.strftime('%H:%M:%S')}] row {name}" + (f" (stages linked from {seeded})" if seeded else ""), flush=True
    )
    log = os.path.join(root, f"{name}.log")
    os.makedirs(root, exist_ok=True)
    with open(log, "a") as f:
      status = subprocess.run(command(root, name), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if status.returncode != 0:
      print(f"row {name} failed ({status.returncode}); see {log}", flush=True)
      continue
    r = row_result(root, name)
    print(f"[{time.strftime('%H:%M:%S')}] row {name}: {json.dumps(r)}", flush=True)
    done = [row_result(root, n) for n in ROWS]
    benchmark.write_json(os.path.join(root, "sweep.json"), {"rows": [d for d in done if d]})
  if args.table or names:
    print(table(root))
  return 0


if __name__ == "__main__":
  benchmark.run_script(main)
