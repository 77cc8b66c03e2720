"""The reference run behind `python -m mage_jax.reference` (`make reference`): how MAGE's quality on Fashion-MNIST
grows with training, in one resumable run of about 100 minutes on a 2-core CPU.

The quickstart's first three stages (data, tokenizer, token cache: `quickstart.Pipeline`), then ONE MAGE run of
the quickstart's recipe (its schedules spanning all the steps) evaluated at log-spaced steps (each twice the
last). At each point the params are exported to `points/step_<n>/mage/params` and the quickstart's own
evaluators run on them there: samples and their grid PNG, the representation evals (converged logistic probe on
all 60,000 / 10,000 features and k-shot ridge; the controls once, at the first point, since they do not depend
on MAGE's training), FID of the samples against as many test images. `results.json` holds every point (a row is
written as soon as its point is done), `results.md` the table; `plot.png` is drawn from `results.json`
(`--plot_only` redraws it). Rerunning the command resumes: finished points are kept, the training continues from
its checkpoint at the last point.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging

from mage_jax.jobs import quickstart, quickstart_options, quickstart_report, quickstart_stage_records
from mage_jax.system import atomic

BUDGETS = {
  # The quickstart's recipe for `mage_steps`, evaluated at `points` steps doubling up to it. 'full' is `make
  # reference` (~100 min on the 2-core CPU); 'ci' runs every stage at a tiny size (tests).
  "full": dict(
    quickstart_options.BUDGETS["full"],
    tokenizer_steps=3000,
    views=4,
    mage_steps=9600,
    points=6,
    fid_samples=2000,
    evals=("logistic", "fewshot"),
    controls=True,
  ),
  "ci": dict(quickstart_options.BUDGETS["ci"], mage_steps=24, points=3, evals=("logistic", "fewshot"), controls=True),
}
for _name, _budget in BUDGETS.items():
  quickstart_options.BUDGETS[f"reference_{_name}"] = _budget
RESULTS_FILE = "results.json"


def points(total: int, count: int) -> list[int]:
  """`count` steps, each twice the last, ending at `total` (fewer when the run is too short to halve)."""
  steps = sorted({max(1, round(total / 2 ** (count - 1 - i))) for i in range(count)})
  return steps


def _point_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "points", f"step_{step:06d}")


def evaluate_point(pipeline: quickstart.Pipeline, data: dict, step: int, first: bool) -> dict:
  """The quickstart's evaluators on the params exported at `step` (in the point's own folder, resumable)."""
  point = _point_dir(pipeline.workdir, step)
  budget = dict(pipeline.budget, controls=pipeline.budget["controls"] and first)
  row = {"step": step}
  for key, fn, args in (
    ("samples", quickstart.sample, (point, budget)),
    ("representations", quickstart.evaluate_representations, (point, budget, pipeline.dataset, data)),
    ("fid", quickstart.compute_fid, (point, budget, pipeline.dataset)),
  ):
    start = time.time()
    row[key] = fn(*args)
    row[f"{key}_seconds"] = round(time.time() - start, 1)
  return row


def train_and_evaluate_points(pipeline: quickstart.Pipeline, data: dict) -> list[dict]:
  """Stage 4: the MAGE run, stopped and evaluated at each point; returns the rows (one per point)."""
  from mage_jax.jobs import pretrain  # pylint: disable=g-import-not-at-top

  options, workdir = pipeline.options, pipeline.workdir
  total = options.steps()["mage"]
  config = quickstart.mage_config(options, pipeline.dataset, workdir)
  rows_path = os.path.join(workdir, "points", "rows.json")
  os.makedirs(os.path.dirname(rows_path), exist_ok=True)
  rows = []
  if os.path.exists(rows_path):
    with open(rows_path) as f:
      rows = json.load(f)
  done = {r["step"] for r in rows}
  train_seconds = rows[-1]["train_seconds"] if rows else 0.0
  for i, step in enumerate(points(total, pipeline.budget["points"])):
    if step in done:
      continue
    params = os.path.join(_point_dir(workdir, step), "mage", "params")
    logging.info("reference run: training to step %d of %d", step, total)
    start = time.time()
    pretrain.train_and_evaluate(config, os.path.join(workdir, "mage"), stop_step=step, export_dir=params)
    if not quickstart._params_done(os.path.dirname(params)):  # pylint: disable=protected-access
      raise quickstart_stage_records.StageInterrupted(
        f"MAGE training stopped before step {step} with a checkpoint; rerun the same command to resume it"
      )
    train_seconds += time.time() - start
    row = {**evaluate_point(pipeline, data, step, first=i == 0), "train_seconds": round(train_seconds, 1)}
    rows.append(row)
    atomic.write_json(rows_path, rows, indent=1)
    write_results(workdir, pipeline.results, rows)
  return rows


def _controls(rows: list[dict]) -> dict:
  rep = rows[0]["representations"] if rows else {}
  return {k: rep[k] for k in ("pixels", "random_init", "random_proj") if isinstance(rep.get(k), dict)}


def _fewshot(rep: dict, shots: str = "10"):
  """Mean k-shot accuracy of the logistic-regression protocol (ridge where that is all there is)."""
  fewshot = rep.get("fewshot", {})
  per_shot = fewshot.get("logreg") or fewshot.get("ridge") or {}
  return (per_shot.get(shots) or {}).get("mean")


def table(results: dict) -> str:
  """Markdown: one row per point (steps, training minutes, probes, FID), then the controls."""
  rows = results["points"]
  setup = sum(results["stage_seconds"].get(k, 0) for k in ("data", "tokenizer", "cache")) / 60
  lines = [
    "| MAGE steps | training minutes | logistic probe top-1 | 10-shot top-1 | FID (samples vs test images) |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    mage = r["representations"].get("mage", {})
    fid = r["fid"].get("fid")
    lines.append(
      f"| {r['step']} | {r['train_seconds'] / 60:.1f} | "
      f"{quickstart_report._pct(mage.get('logistic', {}).get('top1'))} | "  # pylint: disable=protected-access
      f"{quickstart_report._pct(_fewshot(mage))} | "  # pylint: disable=protected-access
      f"{'n/a' if fid is None else f'{fid:.1f}'} ({r['fid'].get('num_images', 0)} vs "
      f"{r['fid'].get('num_reference', 0)}) |"
    )
  titles = dict(quickstart_report.FEATURE_SETS)
  for name, rep in _controls(rows).items():
    lines.append(
      f"| {titles[name]} (control) | - | {quickstart_report._pct(rep.get('logistic', {}).get('top1'))} | "  # pylint: disable=protected-access
      f"{quickstart_report._pct(_fewshot(rep))} | - |"
    )  # pylint: disable=protected-access
  lines += ["", f"Before MAGE: data, tokenizer and token cache took {setup:.1f} min."]
  return "\n".join(lines)


def write_results(workdir: str, results: dict, rows: list[dict]) -> dict:
  results = {**results, "points": rows}
  results["table"] = table(results)
  atomic.write_json(os.path.join(workdir, RESULTS_FILE), results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results["table"] + "\n")
  return results


def plot(workdir: str) -> str:
  """`plot.png`: logistic probe, 10-shot and FID against training minutes, from `results.json`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  with open(os.path.join(workdir, RESULTS_FILE)) as f:
    results = json.load(f)
  rows = results["points"]
  if not rows:
    raise ValueError(f"{workdir}/{RESULTS_FILE} has no evaluated points yet")
  minutes = [r["train_seconds"] / 60 for r in rows]
  mage = [r["representations"].get("mage", {}) for r in rows]
  curves = [
    ("logistic probe top-1 (%)", [100 * (m.get("logistic", {}).get("top1") or float("nan")) for m in mage], "logistic"),
    ("10-shot top-1 (%)", [100 * (_fewshot(m) or float("nan")) for m in mage], "fewshot"),
    ("FID", [r["fid"].get("fid") or float("nan") for r in rows], None),
  ]
  controls = _controls(rows)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for ax, (title, values, key) in zip(axes, curves, strict=True):
    ax.plot(minutes, values, "o-", label="MAGE")
    for name, rep in controls.items() if key else ():
      value = rep.get("logistic", {}).get("top1") if key == "logistic" else _fewshot(rep)
      if value is not None:
        ax.axhline(
          100 * value,
          linestyle="--",
          linewidth=1,
          color={"pixels": "C1", "random_init": "C2", "random_proj": "C3"}[name],
          label=dict(quickstart_report.FEATURE_SETS)[name],
        )
    for m, v, r in zip(minutes, values, rows, strict=True):
      ax.annotate(str(r["step"]), (m, v), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(minutes, [f"{m:.1f}" for m in minutes], fontsize=7)
    ax.set_xlabel("MAGE training minutes (2-core CPU)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(workdir, "plot.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run(workdir: str, budget: str = "full", data_dir: str | None = None) -> dict:
  """Runs (or resumes) the reference run in `workdir`; returns the results (with the table)."""
  if budget not in BUDGETS:
    raise ValueError(f"unknown budget {budget!r}; expected one of {sorted(BUDGETS)}")
  options = quickstart_options.Options(workdir=workdir, budget=f"reference_{budget}", data_dir=data_dir)
  b = BUDGETS[budget]
  pipeline = quickstart.Pipeline(
    options,
    stage_inputs={
      "points": {
        "steps": options.steps()["mage"],
        "recipe": options.recipe(),
        "points": b["points"],
        "evals": {
          k: b[k] for k in ("evals", "controls", "fid_samples", "sample_steps", "fashion_train", "fashion_test")
        },
      }
    },
  )
  data = pipeline.prepare_tokens()
  rows = pipeline.stage(
    f"4/4 MAGE, evaluated at steps {points(options.steps()['mage'], b['points'])}",
    "points",
    train_and_evaluate_points,
    pipeline,
    data,
  )
  results = write_results(workdir, pipeline.results, rows)
  results["plot"] = plot(workdir)
  return results
