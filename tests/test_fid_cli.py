"""`python -m mage_jax.fid`: FID of an image set against references of each accepted kind."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_cli
from mage_jax.fid import inputs, metrics, weights


@pytest.fixture(scope="module")
def have_weights():
  try:
    weights.default_weights_path()
  except FileNotFoundError:
    if os.environ.get("MAGE_JAX_REQUIRE_FID") == "1":
      raise
    pytest.skip("FID Inception weights not set up (python -m mage_jax.fid.weights setup)")


def test_batches_from_npz_and_folder_agree(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
  np.savez(tmp_path / "s.npz", images=images)
  (tmp_path / "dir" / "sub").mkdir(parents=True)
  for i, im in enumerate(images):
    Image.fromarray(im).save(tmp_path / "dir" / "sub" / f"{i:03d}.png")
  a = np.concatenate(list(inputs.image_batches(str(tmp_path / "s.npz"), batch_size=2)[1]))
  b = np.concatenate(list(inputs.image_batches(str(tmp_path / "dir"), batch_size=2)[1]))
  np.testing.assert_array_equal(a, images)
  np.testing.assert_array_equal(b, images)
  gray = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / "g.npz", images=gray)
  count, batches = inputs.image_batches(str(tmp_path / "g.npz"))
  assert count == 3 and next(batches).shape == (3, 8, 8, 3)
  np.savez(tmp_path / "f.npz", images=images.astype(np.float32))
  with pytest.raises(ValueError, match="uint8"):
    inputs.image_batches(str(tmp_path / "f.npz"))


@pytest.mark.slow
def test_cli_fid_of_a_set_with_itself_is_zero(tmp_path, have_weights):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  np.savez(tmp_path / "s.npz", images=images)
  out = tmp_path / "fid.json"
  run = run_cli("mage_jax.fid", tmp_path / "s.npz", f"--reference={tmp_path / 's.npz'}", f"--json={out}", "--extras")
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  assert abs(result["fid"]) < 1e-3 and result["num_images"] == 6
  assert abs(result["sfid"]) < 1e-3 and result["precision"] == result["recall"] == 1.0
  assert "sFID" in run.stdout
  assert result["inception_score"] is None and "unavailable" in result["inception_score_note"]
  assert "FID" in run.stdout


def test_cli_errors_name_the_problem(tmp_path, have_weights):
  stats = metrics.ImageStatistics(*metrics.statistics(np.random.default_rng(0).normal(size=(4, 2048))), 4)
  metrics.save_stats(stats, tmp_path / "stats.npz")
  np.savez(tmp_path / "s.npz", images=np.zeros((3, 8, 8, 3), np.uint8))
  for args, status, needle in (
    ([tmp_path / "missing.npz", f"--reference={tmp_path / 'stats.npz'}"], 1, "missing.npz"),
    ([tmp_path / "s.npz", "--reference=nonsense"], 1, "neither a path nor a dataset split"),
    ([tmp_path / "s.npz", f"--reference={tmp_path / 'stats.npz'}", "--extras"], 1, "need the reference images"),
    ([tmp_path / "s.npz", f"--reference={tmp_path / 'stats.npz'}", "--max_images=-1"], 2, "max_images"),
    ([tmp_path / "s.npz"], 2, "reference"),
    (["--reference=x"], 2, "SAMPLES"),
  ):
    assert_one_line_error(run_cli("mage_jax.fid", *args), status, needle)
