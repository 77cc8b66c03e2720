"""The Flax modules compute what the official PyTorch code computed (fixtures in testdata/official_tiny)."""

import subprocess
import sys

import jax
import pytest

from mage_jax.conformance import forward as conformance

EXPECTED = {
  "tokenizer/z",
  "tokenizer/ids",
  "tokenizer/z_q",
  "tokenizer/decoded",
  "tokenizer/decoded_from_ids",
  "mage/tokenizer_ids",
  "pretrain/encoder_out",
  "pretrain/logits",
  "pretrain/loss",
  "generate/encoder_out",
  "generate/logits",
  "probe/features",
  "probe/logits",
}


@pytest.fixture(scope="module")
def checks(testdata):
  with jax.default_matmul_precision("highest"):
    return {c.name: c for c in conformance.run(str(testdata / "official_tiny"))}


def test_every_reference_output_is_checked(checks):
  assert set(checks) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_output_matches_official_code(checks, name):
  check = checks[name]
  assert check.passed, f"{name}: rel L2 {check.rel_l2:.3e}, max abs {check.max_abs:.3e} {check.ids_equal}"
  if check.ids_equal:
    n = int(check.ids_equal.split("/")[1].split()[0])
    assert check.ids_equal.startswith(f"{n}/{n}"), check.ids_equal  # fixture has no near-ties: exact
  else:
    assert check.rel_l2 < 1e-4


def test_verify_cli_exit_status(testdata, tmp_path):
  ok = subprocess.run(
    [sys.executable, "-m", "mage_jax.verify", str(testdata / "official_tiny")], capture_output=True, text=True
  )
  assert ok.returncode == 0, ok.stderr
  assert "13/13 outputs within tolerance" in ok.stdout
  # A reference perturbed beyond tolerance must make the command fail.
  import shutil

  import numpy as np

  bad = tmp_path / "bad"
  shutil.copytree(testdata / "official_tiny", bad)
  ref = dict(np.load(bad / "reference.npz"))
  ref["pretrain_logits"] = ref["pretrain_logits"] * 1.01
  np.savez(bad / "reference.npz", **ref)
  fail = subprocess.run([sys.executable, "-m", "mage_jax.verify", str(bad)], capture_output=True, text=True)
  assert fail.returncode == 1
  assert "pretrain/logits" in fail.stdout and "FAIL" in fail.stdout


def test_verify_names_what_is_wrong_with_a_fixture_and_what_it_skips(testdata, tmp_path):
  import json
  import shutil

  import numpy as np

  from conftest import assert_one_line_error, run_cli

  fixture = tmp_path / "f"
  shutil.copytree(testdata / "official_tiny", fixture)
  config = json.loads((fixture / "config.json").read_text())
  (fixture / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "mage"}))
  assert_one_line_error(run_cli("mage_jax.verify", fixture), 2, "config.json has no 'mage' entry")
  (fixture / "config.json").write_text("{bad")
  assert_one_line_error(run_cli("mage_jax.verify", fixture), 2, "config.json is not valid JSON (Expecting")
  (fixture / "config.json").write_text(json.dumps(config))
  ref = dict(np.load(fixture / "reference.npz"))
  small = ref["images_nchw"][:, :, ::2, ::2]
  np.savez(fixture / "reference.npz", **{**ref, "images_nchw": small})
  assert_one_line_error(
    run_cli("mage_jax.verify", fixture),
    2,
    f"images_nchw is {list(small.shape)}, config.json's tokenizer takes [N, 3, 32, 32]",
  )
  np.savez(fixture / "reference.npz", **ref)
  (fixture / "vit_probe.pth").unlink()
  run = run_cli("mage_jax.verify", fixture)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "skipped: vit_probe.pth (not in the fixture): probe/*" in run.stdout
  assert "11/11 outputs within tolerance" in run.stdout
