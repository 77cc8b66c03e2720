"""Static checks: no undefined names, unused imports or unused variables anywhere in the repository."""
import subprocess
import sys

import pytest
from conftest import REPO


def test_pyflakes_checks_pass():
  pytest.importorskip("ruff")
  run = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache", "."], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
