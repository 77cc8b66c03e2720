"""Ctrl-C at any moment of a binary's start (imports, data, state init, compilation) ends it with status 130,
one 'interrupted' line and no traceback; importing mage_jax as a library leaves SIGINT alone."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO


def _sigint_default():
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_ignored_sigint_stays_ignored():
  code = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); import mage_jax.system.interrupt as i; "
    "i.take_over('mage_jax.main'); print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
  )
  run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.stdout.strip() == "True", run.stderr[-2000:]


def test_library_import_keeps_the_default_handler():
  code = (
    "import signal, mage_jax, mage_jax.train.preemption; "
    "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
  )
  run = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=_sigint_default
  )
  assert run.stdout.strip() == "True", run.stderr[-2000:]


@pytest.mark.parametrize("delay", [1.0, 3.0, 6.0, 10.0])
def test_ctrl_c_while_starting_ends_the_binary(tmp_path, delay):
  workdir = tmp_path / "w"
  # As from a terminal: SIGINT at its default action. pytest-xdist workers (and a shell's background jobs) start
  # their children with SIGINT ignored, and a binary keeps ignoring what its parent chose to ignore.
  proc = subprocess.Popen(
    [sys.executable, "-m", "mage_jax.main", "--config=configs/fashion_mnist_tiny.py", f"--workdir={workdir}"],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=_sigint_default,
  )
  try:
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    start = time.time()
    _, stderr = proc.communicate(timeout=300)
  finally:
    proc.kill()  # a lost Ctrl-C must not leave the training running after the test
  assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
  assert "interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]
  assert time.time() - start < 120
