"""The quickstart at a reduced budget: every stage runs and the results table has finite numbers."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_ci_budget(tmp_path):
  workdir = tmp_path / "qs"
  cmd = [sys.executable, "-m", "mage_jax.quickstart", f"--workdir={workdir}", "--budget=ci"]
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
  for png in ("samples_grid.png", "reconstructions.png"):
    image = np.asarray(Image.open(workdir / png))
    assert image.ndim == 3 and image.shape[-1] == 3 and image.std() > 0, png
  table = (workdir / "results.md").read_text()
  header = (
    "| frozen features, top-1 on the held-out images | MAGE | same encoder at random init | raw pixels | "
    "random projection of the pixels |"
  )
  assert header in table and "logistic regression probe top-1" in table and "10-shot top-1 (ridge" in table
  results = json.loads((workdir / "results.json").read_text())
  rep = results["representations"]
  numbers = [
    results["tokenizer"]["psnr"],
    results["mage"]["loss"],
    results["samples"]["images_per_sec"],
    rep["mage"]["linear_probe"]["top1"],
    rep["pixels"]["linear_probe"]["top1"],
  ]
  numbers += [rep[name]["logistic"]["top1"] for name in ("mage", "random_init", "pixels", "random_proj")]
  # MAGE trained on the token cache of stage 3
  assert results["cache"]["views"] == 1 and (workdir / "tokens" / "cache.json").exists()
  assert json.loads((workdir / "stages.json").read_text()).keys() >= {"cache", "mage"}
  # the features the probes scored, for re-scoring elsewhere: 300 train / 200 test images at this budget
  for split, n in (("train", 300), ("test", 200)):
    with np.load(workdir / "features" / f"mage_{split}.npz") as f:
      assert sorted(f.files) == ["features", "labels"]
      assert f["features"].shape == (n, 64) and f["features"].dtype == np.float32
      assert f["labels"].shape == (n,) and np.issubdtype(f["labels"].dtype, np.integer)
  assert rep["random_proj"]["logistic"]["train_examples"] == 300
  if os.environ.get("MAGE_JAX_REQUIRE_FID") == "1":
    numbers.append(results["fid"]["fid"])
  assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), numbers
  # Re-running resumes: every stage finds its output and the second run is quick.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((workdir / "results.json").read_text())["representations"] == results["representations"]


def test_stage_records_redo_changed_stages_and_refuse_foreign_outputs(tmp_path):
  from mage_jax.jobs import quickstart_stage_records

  (tmp_path / "tokenizer").mkdir()
  (tmp_path / "tokenizer" / "mine.txt").write_text("user data")
  with pytest.raises(ValueError, match="not written by the quickstart"):
    quickstart_stage_records.StageRecords(str(tmp_path)).prepare("tokenizer", "ci-budget")
  assert (tmp_path / "tokenizer" / "mine.txt").read_text() == "user data"  # untouched

  work = tmp_path / "qs"
  records = quickstart_stage_records.StageRecords(str(work.mkdir() or work))
  records.prepare("mage", "ci-budget")
  (work / "mage").mkdir()
  (work / "mage" / "ckpt").write_text("ci")
  records.finish("mage", "ci-budget")
  again = quickstart_stage_records.StageRecords(str(work))  # a later invocation, same inputs: the output is kept
  again.prepare("mage", "ci-budget")
  assert (work / "mage" / "ckpt").read_text() == "ci"
  again.prepare("mage", "full-budget")  # other inputs: the stage's own output is removed and redone
  assert not (work / "mage").exists()
  assert json.loads((work / "stages.json").read_text()) == {"mage": "started:full-budget"}
  # an interrupted stage (started, never finished) resumes with the same inputs: its outputs are kept
  (work / "mage").mkdir()
  (work / "mage" / "checkpoint").write_text("step 10")
  resumed = quickstart_stage_records.StageRecords(str(work))
  resumed.prepare("mage", "full-budget")
  assert (work / "mage" / "checkpoint").read_text() == "step 10"
  assert not resumed.done("mage", "full-budget")
  resumed.finish("mage", "full-budget")
  assert quickstart_stage_records.StageRecords(str(work)).done("mage", "full-budget")


def test_recipes_reach_the_stages_they_change():
  """The crop law of the MAGE recipe draws the cached views; a tokenizer recipe is checked like the MAGE one."""
  from configs import fashion_mnist_tiny
  from mage_jax.jobs import quickstart_options

  default = list(fashion_mnist_tiny.get_config(quickstart_options.BUDGETS["full"]["mage_recipe"]).input.scale)
  assert quickstart_options.Options("w").crop_scale() == default
  assert quickstart_options.Options("w", mage_recipe="crop_min=0.5").crop_scale() == [0.5, 1.0]
  with pytest.raises(ValueError, match="--tokenizer_recipe sets no steps: use --tokenizer_steps"):
    quickstart_options.Options("w", tokenizer_recipe="disc,steps=5").check()
  with pytest.raises(ValueError, match="unknown config argument 'dsic'"):
    quickstart_options.Options("w", tokenizer_recipe="dsic").check()
  with pytest.raises(ValueError, match="--mage_recipe sets no steps: use --mage_steps"):
    quickstart_options.Options("w", mage_recipe="steps=5").check()


def _wait_for(predicate, proc, timeout=600):
  import time  # pylint: disable=g-import-not-at-top

  end = time.time() + timeout
  while time.time() < end and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.5)
  return False


@pytest.mark.slow
def test_interrupted_training_stages_resume(tmp_path):
  """Ctrl-C in the tokenizer stage and a SIGTERM in the MAGE stage, each followed by the same command: the
  quickstart resumes the stage from its checkpoint and finishes; nothing is refused or marked done early."""
  import signal  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "qs"
  cmd = [
    sys.executable,
    "-m",
    "mage_jax.quickstart",
    f"--workdir={workdir}",
    "--budget=ci",
    "--tokenizer_steps=300",
    "--mage_steps=200",
  ]
  checkpoints = lambda stage: (
    list((workdir / stage / "checkpoints").glob("*")) if (workdir / stage / "checkpoints").exists() else []
  )
  for stage, sig, status in (("tokenizer", signal.SIGINT, 130), ("mage", signal.SIGTERM, 0)):
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # into the training loop: the stage is recorded as started and its first checkpoint is written
    assert _wait_for(lambda stage=stage: checkpoints(stage), proc), proc.communicate()[0][-3000:]
    proc.send_signal(sig)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == status, out[-3000:]
    records = json.loads((workdir / "stages.json").read_text())
    assert records[stage].startswith("started:"), records
    if sig == signal.SIGTERM:
      assert "rerun the same command to resume" in out
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  records = json.loads((workdir / "stages.json").read_text())
  assert not any(v.startswith("started:") for v in records.values()), records
  assert json.loads((workdir / "results.json").read_text())["mage"]["steps"] == 200
