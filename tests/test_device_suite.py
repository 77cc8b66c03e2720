"""bench/device_suite.sh and what it needs: its dry run, the programs it runs on a host without TensorFlow (or
ml-collections and clu), and the 'random' input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from bench import device_suite
from conftest import REPO as ROOT
from mage_jax.data import pipeline, synthetic

SUPPORT = ROOT / "tests" / "support"  # sitecustomize.py: MAGE_JAX_BLOCK_IMPORTS makes packages look uninstalled
NO_TF = "tensorflow,tensorflow_datasets"


def _step(name: str, out: str = "/tmp/out") -> device_suite.Step:
  return next(s for s in device_suite.steps(out) if s.name == name)


def _run_blocked(args, blocked: str, tmp_path, timeout=900):
  env = {
    **os.environ,
    "PYTHONPATH": f"{SUPPORT}{os.pathsep}{ROOT}",
    "MAGE_JAX_BLOCK_IMPORTS": blocked,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
  }
  return subprocess.run(
    [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, check=False
  )


@pytest.mark.slow
def test_dry_run_checks_every_step_and_launches_nothing(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(
    ["bash", str(ROOT / "bench" / "device_suite.sh"), "--dry-run", f"--out={out}"],
    env={**os.environ, "PYTHON": sys.executable},
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for step in device_suite.steps(str(out)):
    assert f"[{step.name}]" in proc.stdout
  assert proc.stdout.count("  ok: ") == len(device_suite.steps(str(out)))
  assert "dry run: 0 problem(s)" in proc.stdout
  assert not out.exists()  # nothing ran: no output folder, no training workdir


def test_dry_run_names_a_bad_flag_or_path():
  step = device_suite.Step("bench_X", ["bench/benchmark.py", "--size=XL"], 1, check="benchmark")
  with pytest.raises(SystemExit):
    device_suite.check_step(step, sys.executable)
  step = device_suite.Step("lower_X", ["bench/lower.py", "--programs=nope"], 1, check="lower")
  with pytest.raises(ValueError, match="--programs"):
    device_suite.check_step(step, sys.executable)
  bad_override = [*_step("train").argv, "--config.input.nmae=random"]
  with pytest.raises(ValueError, match="nmae"):
    device_suite.check_step(device_suite.Step("train", bad_override, 1, check="main"), sys.executable)


def test_suite_refuses_a_used_output_folder(tmp_path):
  (tmp_path / "suite.json").write_text("{}")
  with pytest.raises(ValueError, match="--force"):
    device_suite.main([f"--out={tmp_path}"])


@pytest.mark.slow
def test_verify_and_benchmark_run_without_tensorflow(tmp_path):
  """The suite's verify (forward fixtures; the trajectory replays build ml_collections configs, which the suite
  installs from its wheels) and benchmark steps with TensorFlow and TFDS unimportable."""
  code = (
    "import sys, json\n"
    "from mage_jax.conformance import forward as conformance, trajectory\n"
    "from mage_jax.fid import inception\n"
    "from bench import benchmark\n"
    f"checks = conformance.run({str(ROOT / 'tests' / 'testdata' / 'official_tiny')!r})\n"
    "assert all(c.passed for c in checks), conformance.format_table(checks)\n"
    "r = benchmark.main(['--size=tiny', '--steps=1', '--warmup=0', '--workloads=pretrain,input'])\n"
    "rows = {row['workload']: row for row in r['results']}\n"
    "assert 'error' not in rows['pretrain'], rows\n"
    "assert 'TensorFlow' in rows['input']['skipped'], rows\n"
    "banned = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]\n"
    "assert not banned, banned\n"
    "print('OK', len(checks))\n"
  )
  proc = _run_blocked(["-c", code], NO_TF, tmp_path)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_training_resumes_on_random_data_without_tensorflow(tmp_path):
  """The suite's training check on this CPU: ml-collections and clu present (the suite installs them), no
  TensorFlow; 4 steps, then a second run resumes from the step-4 checkpoint and finishes at 6."""
  workdir = tmp_path / "run"

  def train(steps):
    args = _step("train").argv
    args = [a for a in args if not a.startswith(("--workdir=", "--config.total_steps=", "--config.checkpoint_"))]
    return _run_blocked(
      [
        *args,
        f"--workdir={workdir}",
        f"--config.total_steps={steps}",
        "--config.checkpoint_every_steps=4",
        "--config.input.batch_size=8",
      ],
      NO_TF,
      ROOT,
    )

  first = train(4)
  assert first.returncode == 0, first.stderr[-3000:]
  second = train(6)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming from checkpoint step 4" in second.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
  assert (workdir / "params").is_dir()


def _random_cfg(**kw):
  return {"name": "random", "batch_size": 8, "image_size": 4, **kw}


def test_random_input_is_a_pure_function_of_seed_and_step():
  it = pipeline.train_iterator(_random_cfg(), seed=3)
  batches = [next(it) for _ in range(3)]
  resumed = next(pipeline.train_iterator(_random_cfg(), seed=3, start_step=2))
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
  np.testing.assert_array_equal(resumed["label"], batches[2]["label"])
  halves = [
    next(pipeline.train_iterator(_random_cfg(), seed=3, start_step=2, process_index=p, process_count=2))
    for p in range(2)
  ]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), batches[2]["image"])
  other = next(pipeline.train_iterator(_random_cfg(), seed=4))
  assert not np.array_equal(other["image"], batches[0]["image"])
  b = batches[0]
  assert b["image"].shape == (8, 4, 4, 3) and b["image"].dtype == np.float32
  assert 0.0 <= b["image"].min() and b["image"].max() < 1.0 and b["label"].dtype == np.int32
  assert 0 <= b["label"].min() and b["label"].max() < synthetic.NUM_CLASSES
  assert pipeline.steps_per_epoch(_random_cfg(batch_size=4096)) == synthetic.TRAIN_EXAMPLES // 4096
  assert pipeline.make_source(_random_cfg(split="train[:2000]")).num_examples == 2000
  assert pipeline.make_source(_random_cfg(split="test[100:150]")).num_examples == 50
  with pytest.raises(ValueError, match="empty"):
    pipeline.make_source(_random_cfg(split="train[5:5]"))
  with pytest.raises(ValueError, match="slice"):
    pipeline.make_source(_random_cfg(split="train[:10%]"))


def test_random_eval_split_is_padded_and_masked():
  source = pipeline.make_source(_random_cfg(split="validation"))
  assert source.num_examples == synthetic.EVAL_EXAMPLES
  it = pipeline.eval_iterator(_random_cfg(split="validation", batch_size=49_999), source=source)
  assert len(it) == 2
  next(it)
  last = next(it)
  assert last["_mask"].tolist() == [True] + [False] * 49_998
  assert not last["image"][1:].any() and not last["label"][1:].any()
  with pytest.raises(StopIteration):
    next(it)
