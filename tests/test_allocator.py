"""mage_jax.system.allocator: which processes re-execute under tcmalloc, with what command and environment."""

import os
import subprocess
import sys

import pytest

from mage_jax.system import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "argv, module",
  [
    (["python", "-m", "mage_jax.main", "--config=x"], "mage_jax.main"),
    (["python", "-u", "-X", "dev", "-m", "mage_jax.fid", "a.npz"], "mage_jax.fid"),
    (["python", "-W", "ignore", "-m", "mage_jax.quickstart"], "mage_jax.quickstart"),
    (["python", "script.py", "-m", "mage_jax.main"], ""),  # a script's own '-m' argument
    (["python", "-c", "import mage_jax"], ""),
    (["python"], ""),
    (["python", "-m"], ""),
  ],
)
def test_module_run_reads_the_interpreter_options_only(argv, module):
  assert allocator.module_run(argv) == module


def test_reexec_command_preloads_tcmalloc_once(monkeypatch):
  monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
  monkeypatch.setattr(sys, "platform", "linux")
  argv = ["python", "-m", "mage_jax.main"]
  got = allocator.reexec_command(argv, {"LD_PRELOAD": "/lib/other.so", "PATH": "/bin"})
  assert got is not None
  new_argv, env = got
  assert new_argv == argv
  assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4 /lib/other.so" and env["PATH"] == "/bin"
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no 'large alloc' lines on stderr
  # the re-executed process finds tcmalloc preloaded and carries on; so do the opt-out and other allocators
  assert allocator.reexec_command(argv, env) is None
  assert allocator.reexec_command(argv, {allocator.ENV: "0"}) is None
  assert allocator.reexec_command(argv, {"LD_PRELOAD": "libjemalloc.so.2"}) is None
  monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
  assert allocator.reexec_command(argv, {}) is None
  monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
  monkeypatch.setattr(sys, "platform", "darwin")
  assert allocator.reexec_command(argv, {}) is None


@pytest.mark.parametrize(
  "argv, expected",
  [
    (["python", "-m", "mage_jax.main", "--workdir=w"], True),
    (["python", "-m", "mage_jax.convert", "in.pth", "out"], False),  # not a compute-heavy binary
    (["python", "-m", "mage_jax.verify", "dir"], False),
    (["python", "my_script.py"], False),  # a library user's program chooses its allocator itself
  ],
)
def test_maybe_reexec_only_for_the_training_and_evaluation_binaries(monkeypatch, argv, expected):
  calls = []
  monkeypatch.setattr(sys, "orig_argv", argv, raising=False)
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.delenv(allocator.ENV, raising=False)
  monkeypatch.setattr(os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
  allocator.maybe_reexec()
  assert bool(calls) == expected
  if expected:
    exe, args, env = calls[0]
    assert exe == sys.executable and args == argv and "libtcmalloc" in env["LD_PRELOAD"]
  calls.clear()
  allocator.maybe_reexec(script=True)  # the benchmarks re-execute whatever their command line
  assert len(calls) == 1


def test_a_binary_runs_after_the_reexec():
  """The re-executed binary keeps its arguments and exit status (under tcmalloc where the system has it)."""
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
  proc = subprocess.run(
    [sys.executable, "-m", "mage_jax.main", "--config=configs/fashion_mnist_tiny.py", "--workdir=unused"],
    cwd=ROOT,
    env={**env, "MAGE_JAX_PARSE_ONLY": "1"},
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "flags parsed" in proc.stdout
