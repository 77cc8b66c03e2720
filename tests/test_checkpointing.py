"""Checkpoint integrity: the manifest `seal` writes after orbax finalizes a step, checked before each restore.

Truncation, deletion and flipped bytes of any file of the newest step fall back to the newest intact step (or
are refused under corrupt='refuse') with one line naming the file; a crafted manifest costs bounded work.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.train import checkpointing


def _state(step):
  return {"w": jnp.full((4096,), step, jnp.float32), "b": jnp.arange(7, dtype=jnp.int32) * step}


def _target():
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {
    "w": jax.ShapeDtypeStruct((4096,), jnp.float32, sharding=dev),
    "b": jax.ShapeDtypeStruct((7,), jnp.int32, sharding=dev),
  }


def _saved(tmp_path, steps=(4, 8), async_save=True):
  mngr = checkpointing.manager(str(tmp_path), keep=3, async_save=async_save)
  for step in steps:
    checkpointing.save(mngr, step, _state(step))
  checkpointing.seal(mngr)
  return mngr


def _biggest_file(step_dir):
  files = [
    p
    for p in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
    if os.path.isfile(p) and not p.endswith(checkpointing.MANIFEST)
  ]
  return max(files, key=os.path.getsize)


def _steps(tmp_path):
  return sorted(os.listdir(tmp_path / "checkpoints"))


def test_every_finalized_step_gets_a_manifest_of_its_files(tmp_path):
  mngr = _saved(tmp_path)
  for step in (4, 8):
    step_dir = str(tmp_path / "checkpoints" / str(step))
    with open(os.path.join(step_dir, checkpointing.MANIFEST)) as f:
      files = json.load(f)["files"]
    on_disk = {
      os.path.relpath(p, step_dir)
      for p in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
      if os.path.isfile(p) and not p.endswith(checkpointing.MANIFEST)
    }
    assert set(files) == on_disk and len(on_disk) >= 3
    assert checkpointing.manifest_problem(step_dir) is None
  step, state = checkpointing.restore_newest(mngr, _target())
  assert step == 8 and np.array_equal(state["b"], np.arange(7) * 8)


def _flip(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    data = f.read(64)
    f.seek(-len(data), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in data))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)


DAMAGE = {
  "flipped": (_flip, r"changed since it was saved \(CRC-32"),
  "truncated": (_truncate, r"is \d+ bytes, \d+ when saved"),
  "deleted": (os.remove, r"is missing"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_file_of_newest_step_falls_back_or_is_refused(tmp_path, kind, caplog):
  mngr = _saved(tmp_path)
  damage, says = DAMAGE[kind]
  path = _biggest_file(str(tmp_path / "checkpoints" / "8"))
  damage(path)
  rel = os.path.relpath(path, tmp_path / "checkpoints" / "8")
  with pytest.raises(ValueError, match=f"checkpoint step 8 .* is damaged: {rel} {says}"):
    checkpointing.restore_newest(mngr, _target(), corrupt="refuse")
  assert _steps(tmp_path) == ["4", "8"]  # refusing renames nothing
  step, state = checkpointing.restore_newest(mngr, _target())
  assert step == 4 and float(state["w"][0]) == 4
  (aside,) = glob.glob(str(tmp_path / "checkpoints" / "8.corrupt-*"))
  (warning,) = [r.getMessage() for r in caplog.records if "Resuming from step 4" in r.getMessage()]
  assert rel in warning and aside in warning


def test_unsealed_older_steps_stay_unsealed_and_restore(tmp_path):
  mngr = _saved(tmp_path)
  os.remove(tmp_path / "checkpoints" / "4" / checkpointing.MANIFEST)  # as if saved before manifests existed
  os.remove(tmp_path / "checkpoints" / "8" / checkpointing.MANIFEST)
  step, _ = checkpointing.restore_newest(mngr, _target())
  assert step == 8
  checkpointing.save(mngr, 12, _state(12))
  checkpointing.seal(mngr)
  sealed = [s for s in (4, 8, 12) if os.path.exists(tmp_path / "checkpoints" / str(s) / checkpointing.MANIFEST)]
  assert sealed == [8, 12]  # the step resumed from was restored by orbax, and is sealed with the new one; 4 never


@pytest.mark.parametrize(
  "manifest, says",
  [
    ({"format": 1, "files": {"../../../../etc/passwd": [1, "00000000"]}}, "outside the step"),
    ({"format": 1, "files": {"/etc/passwd": [1, "00000000"]}}, "outside the step"),
    ({"format": 1, "files": [1, 2]}, r"unreadable \(AttributeError\)"),
    ("{not json", r"unreadable \(JSONDecodeError\)"),
  ],
)
def test_crafted_manifest_is_named_not_followed(tmp_path, manifest, says):
  mngr = _saved(tmp_path)
  with open(tmp_path / "checkpoints" / "8" / checkpointing.MANIFEST, "w") as f:
    f.write(manifest if isinstance(manifest, str) else json.dumps(manifest))
  with pytest.raises(ValueError, match=f"step 8 .* damaged: .*{says}"):
    checkpointing.restore_newest(mngr, _target(), corrupt="refuse")


def test_oversized_manifest_is_refused_unread(tmp_path, monkeypatch):
  mngr = _saved(tmp_path)
  monkeypatch.setattr(checkpointing, "_MANIFEST_MAX_BYTES", 64)
  with pytest.raises(ValueError, match="step 8 .* damaged: its mage_jax_manifest.json is over 64 bytes"):
    checkpointing.restore_newest(mngr, _target(), corrupt="refuse")


def test_params_export_is_sealed_and_damage_is_one_line(tmp_path):
  from conftest import run_cli, tiny_params_dir
  from mage_jax.train import params_io

  params = tiny_params_dir(tmp_path / "params", "mage")
  variables_dir = os.path.join(params, "variables")
  assert checkpointing.manifest_problem(variables_dir) is None
  assert os.path.exists(os.path.join(variables_dir, checkpointing.MANIFEST))
  path = _biggest_file(variables_dir)
  _flip(path)  # orbax alone reads these weights back without noticing
  rel = os.path.relpath(path, variables_dir)
  with pytest.raises(ValueError, match=f"params in .*params are damaged \\(variables/\\): {rel} changed since"):
    params_io.load(params)
  run = run_cli("mage_jax.generate", f"--params={params}", f"--out={tmp_path / 'out'}", "--num_images=2")
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert run.returncode == 1 and len(errors) == 1 and rel in errors[0], run.stderr[-3000:]
  assert "Traceback" not in run.stderr and "Event loop" not in run.stderr
  assert not list(tmp_path.glob("out/**/*.png"))
