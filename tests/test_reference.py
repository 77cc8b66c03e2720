"""`python -m mage_jax.reference` end to end at the ci budget: points, table, plot, resume."""

import json

import pytest
from PIL import Image

from conftest import run_cli
from mage_jax.jobs import reference


def test_points_double_up_to_the_last_step():
  assert reference.points(4800, 6) == [150, 300, 600, 1200, 2400, 4800]
  assert reference.points(24, 3) == [6, 12, 24]
  assert reference.points(3, 4) == [1, 2, 3]  # too short to halve: fewer, distinct points


@pytest.mark.slow
def test_reference_run_ci_budget_end_to_end_and_resume(tmp_path):
  workdir = tmp_path / "ref"
  args = (f"--workdir={workdir}", "--budget=ci")
  run = run_cli("mage_jax.reference", *args, timeout=1800)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
  results = json.loads((workdir / "results.json").read_text())
  rows = results["points"]
  assert [r["step"] for r in rows] == [6, 12, 24]
  assert all(0 < r["representations"]["mage"]["logistic"]["top1"] <= 1 for r in rows)
  assert [r["train_seconds"] for r in rows] == sorted(r["train_seconds"] for r in rows)
  # the controls once, at the first point; every point has its own samples grid and params
  assert "pixels" in rows[0]["representations"] and "pixels" not in rows[1]["representations"]
  for r in rows:
    point = workdir / "points" / f"step_{r['step']:06d}"
    assert (point / "samples_grid.png").exists() and (point / "mage" / "params" / "mage_jax.json").exists()
    assert json.loads((point / "mage" / "params" / "mage_jax.json").read_text())["train_steps"] == r["step"]
  table = (workdir / "results.md").read_text()
  assert "| 24 |" in table and "raw pixels (control)" in table
  assert Image.open(workdir / "plot.png").size[0] > 500
  # rerunning finds every point done; --plot_only redraws the plot from results.json
  again = run_cli("mage_jax.reference", *args, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((workdir / "results.json").read_text())["points"] == rows
  (workdir / "plot.png").unlink()
  redraw = run_cli("mage_jax.reference", *args, "--plot_only", timeout=300)
  assert redraw.returncode == 0 and (workdir / "plot.png").exists(), redraw.stderr[-2000:]
