"""Pretraining harness: sharded vs single device, resume after SIGKILL, mesh changes, multi-process, errors."""

import glob
import os
import signal
import subprocess
import sys
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import PartitionSpec as P

from conftest import tiny_train_config
from mage_jax.jobs import pretrain
from mage_jax.train import checkpointing, params_io, sharding, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scalars(workdir, tag="train/loss"):
  values = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          values[event.step] = float(tf.make_ndarray(v.tensor))
  return [values[k] for k in sorted(values)]


def _exported(workdir):
  variables, _ = params_io.load(os.path.join(workdir, "params"))
  return variables["model"]["params"]


def _main_cmd(image_folder, workdir, steps, *extra):
  return [
    sys.executable,
    "-m",
    "mage_jax.main",
    f"--config={REPO}/configs/fashion_mnist_tiny.py:steps={steps},batch=8",
    f"--workdir={workdir}",
    f"--config.input.name=folder:{image_folder}",
    "--config.input.image_size=16",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=4",
    *extra,
  ]


def test_sharded_mesh_matches_single_device(image_folder, tmp_path, monkeypatch):
  # One compilation per run: a retrace (e.g. a batch whose dtype or sharding drifts) fails here.
  monkeypatch.setattr(steps, "pretrain_step", chex.assert_max_traces(steps.pretrain_step, n=2))
  single = tiny_train_config(image_folder, num_devices=1, mesh="data=1,fsdp=1,model=1")
  sharded = tiny_train_config(image_folder, mesh="data=2,fsdp=2,model=2")
  pretrain.train_and_evaluate(single, str(tmp_path / "single"))
  pretrain.train_and_evaluate(sharded, str(tmp_path / "sharded"))
  a, b = _scalars(str(tmp_path / "single")), _scalars(str(tmp_path / "sharded"))
  assert len(a) == len(b) == 12
  np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
  assert a[-1] < a[0]  # it learns something
  pa, pb = _exported(str(tmp_path / "single")), _exported(str(tmp_path / "sharded"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), pa, pb)


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_identical(image_folder, tmp_path):
  """Killed after its step-8 checkpoint and re-run == uninterrupted, bit for bit (SIGTERM and Ctrl-C, which save
  first, are in test_multiprocess_faults)."""
  full = tmp_path / "full"
  subprocess.run(_main_cmd(image_folder, full, 16), check=True, capture_output=True, cwd=REPO)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(
    _main_cmd(image_folder, killed, 16), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
  )
  deadline = time.time() + 240
  while not os.path.exists(killed / "checkpoints" / "8") and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "params").exists()  # it really died before finishing
  subprocess.run(_main_cmd(image_folder, killed, 16), check=True, capture_output=True, cwd=REPO)
  pa, pb = _exported(str(full)), _exported(str(killed))
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_checkpoint_restores_onto_other_meshes(tmp_path):
  from mage_jax.models.mage import MAGE, config_for

  model = MAGE(config_for("tiny", num_tokens=16, max_position_embeddings=17))
  ids = jnp.zeros((1, 16), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, method=MAGE.encoder_features))
  rules = sharding.DEFAULT_RULES

  def on_mesh(spec, devices):
    mesh = sharding.create_mesh(spec, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      shardings = sharding.logical_shardings(boxed, mesh, rules)
    return mesh, shardings

  mesh42, sh42 = on_mesh([("data", 1), ("fsdp", 4), ("model", 2)], jax.devices())
  params = nn.unbox(model.init(jax.random.key(0), ids, method=MAGE.encoder_features))
  placed = jax.device_put(params, sh42)
  assert placed["params"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "model")
  mngr = checkpointing.manager(str(tmp_path), async_save=False)
  checkpointing.save(mngr, 1, placed)
  mngr.wait_until_finished()
  abstract = sharding.strip_boxes(boxed)
  for spec, devices in [
    ([("data", 1), ("fsdp", 8), ("model", 1)], jax.devices()),
    ([("data", 1), ("fsdp", 1), ("model", 1)], jax.devices()[:1]),
  ]:
    _, shardings = on_mesh(spec, devices)
    restored = checkpointing.restore(mngr, 1, checkpointing.abstract_with_shardings(abstract, shardings))
    leaf = restored["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert len(leaf.sharding.device_set) == len(devices)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), restored, params)


@pytest.mark.heavy  # test_multiprocess_faults checks 2-process runs against 1-process resumes in CI
def test_two_processes_match_single_process(image_folder, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  port = 23000 + os.getpid() % 1000
  procs = [
    subprocess.Popen(
      _main_cmd(
        image_folder,
        tmp_path / "multi",
        8,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  single = subprocess.run(
    _main_cmd(image_folder, tmp_path / "single", 8, "--config.num_devices=4"), cwd=REPO, capture_output=True, text=True
  )
  assert single.returncode == 0, single.stderr[-3000:]
  np.testing.assert_allclose(_scalars(str(tmp_path / "multi")), _scalars(str(tmp_path / "single")), atol=1e-5)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
    _exported(str(tmp_path / "multi")),
    _exported(str(tmp_path / "single")),
  )


def test_unknown_config_key_is_rejected(image_folder, tmp_path):
  run = subprocess.run(
    _main_cmd(image_folder, tmp_path / "w", 4, "--config.optim.blrr=0.1"), cwd=REPO, capture_output=True, text=True
  )
  assert run.returncode != 0 and "blrr" in run.stderr


def test_missing_data_dir_and_bad_images(tmp_path, image_folder):
  config = tiny_train_config(image_folder)
  config.input.name = f"folder:{tmp_path / 'nowhere'}"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    pretrain.train_and_evaluate(config, str(tmp_path / "w1"))
  config = tiny_train_config(image_folder)
  config.input.batch_size = 6
  config.mesh = "data=4,fsdp=1,model=2"
  with pytest.raises(ValueError, match="not divisible"):
    pretrain.train_and_evaluate(config, str(tmp_path / "w2"))


def _dir_digest(path):
  digest = {}
  for root, _, files in os.walk(path):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        digest[os.path.relpath(os.path.join(root, f), path)] = hash(fh.read())
  return digest


@pytest.mark.heavy  # test_multiprocess_faults damages checkpoints of real runs in CI (fallback and refusal)
def test_corrupt_checkpoint_is_named_and_others_untouched(image_folder, tmp_path):
  workdir = str(tmp_path / "w")
  pretrain.train_and_evaluate(tiny_train_config(image_folder, steps=8), workdir)
  before = _dir_digest(os.path.join(workdir, "checkpoints", "4"))
  for path in glob.glob(os.path.join(workdir, "checkpoints", "8", "**", "*"), recursive=True):
    if os.path.isfile(path) and "ocdbt" in path:
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
  with pytest.raises(ValueError, match="step 8"):
    pretrain.train_and_evaluate(tiny_train_config(image_folder, steps=12, corrupt_checkpoint="refuse"), workdir)
  assert _dir_digest(os.path.join(workdir, "checkpoints", "4")) == before


def test_fewshot_during_training_scores_the_exported_encoder(image_folder, tmp_path):
  from mage_jax.evals import fewshot, probe

  workdir = str(tmp_path / "w")
  config = tiny_train_config(image_folder, steps=4)
  config.evals.fewshot = dict(type="fewshot", train_split="train", test_split="train", shots=(5,), batch_size=16)
  metrics = pretrain.train_and_evaluate(config, workdir)
  # The same protocol on the exported checkpoint, through the evaluation path (load_backbone, extract_features).
  backbone = probe.load_backbone(os.path.join(workdir, "params"))
  mesh = sharding.create_mesh((("data", -1), ("fsdp", 1), ("model", 1)))
  shardings = probe.backbone_shardings(backbone, mesh, sharding.DEFAULT_RULES)
  cfg = dict(name=f"folder:{image_folder}", split="train", batch_size=16, image_size=16)
  x, y = probe.extract_features(backbone.feature_fn(), backbone.variables, shardings, cfg, mesh=mesh)
  want = fewshot.evaluate_fewshot(x, y, x, y, shots=(5,), trials=1, seed=config.seed, classifier="ridge")[5][0]
  assert metrics["eval/fewshot/5shot"] == pytest.approx(want, abs=1e-6)
  # Resuming past the checkpoint's step is refused, not a silent no-op.
  with pytest.raises(ValueError, match="past this run's 2 steps"):
    pretrain.train_and_evaluate(tiny_train_config(image_folder, steps=2), workdir)


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(image_folder, tmp_path):
  workdir = str(tmp_path / "w")
  pretrain.train_and_evaluate(tiny_train_config(image_folder, steps=4), workdir)
  good = _exported(workdir)
  bad = tiny_train_config(image_folder, steps=8, label_smoothing=float("nan"))
  with pytest.raises(FloatingPointError, match="step 4"):
    pretrain.train_and_evaluate(bad, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]  # the good one, nothing newer
  skip = tiny_train_config(image_folder, steps=8, label_smoothing=float("nan"), nonfinite="skip")
  metrics = pretrain.train_and_evaluate(skip, workdir)
  assert metrics["skipped_steps"] == 4
  jax.tree.map(np.testing.assert_array_equal, _exported(workdir), good)
