"""Static checks: the project's ruff rules (E, W, F, I and B, configured in ruff.toml) pass everywhere, and the tree is
as ruff's formatter writes it."""

import subprocess
import sys

import pytest

from conftest import REPO


def test_ruff_checks_pass():
  pytest.importorskip("ruff")
  run = subprocess.run(
    [sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]


def test_tree_is_formatted():
  pytest.importorskip("ruff")
  run = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
