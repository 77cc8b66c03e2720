"""The Flax modules compute what the official PyTorch code computed (fixtures in testdata/official_tiny)."""

import subprocess
import sys

import jax
import pytest

from mage_jax import conformance

EXPECTED = {
    "tokenizer/z", "tokenizer/ids", "tokenizer/z_q", "tokenizer/decoded", "tokenizer/decoded_from_ids",
    "mage/tokenizer_ids", "pretrain/encoder_out", "pretrain/logits", "pretrain/loss", "generate/encoder_out",
    "generate/logits", "probe/features", "probe/logits",
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
  ok = subprocess.run([sys.executable, "-m", "mage_jax.verify", str(testdata / "official_tiny")],
                      capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  assert "13/13 outputs within tolerance" in ok.stdout
  # A reference perturbed beyond tolerance must make the command fail.
  import numpy as np
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(testdata / "official_tiny", bad)
  ref = dict(np.load(bad / "reference.npz"))
  ref["pretrain_logits"] = ref["pretrain_logits"] * 1.01
  np.savez(bad / "reference.npz", **ref)
  fail = subprocess.run([sys.executable, "-m", "mage_jax.verify", str(bad)], capture_output=True, text=True)
  assert fail.returncode == 1
  assert "pretrain/logits" in fail.stdout and "FAIL" in fail.stdout
