"""Ctrl-C in a binary outside its training loop: the binary ends at once, with status 130.

Python's default turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be. In the first
seconds of a binary that is inside the imports of TensorFlow, JAX and orbax or a checkpoint restore: some of
them catch it there and carry on (the Ctrl-C is lost and training starts), and unwinding out of a
half-initialised extension could crash the interpreter at exit (status 139). Everything a binary writes goes
through a temporary name and a rename, so stopping it at once leaves nothing half-written; `python -m
mage_jax.<verb>` therefore takes SIGINT over as soon as the package is imported. A training loop installs its
own handler for its duration (`preemption.Stop`: a checkpoint at an agreed step, then status 130) and puts this
one back after. A program that imports mage_jax as a library keeps its own SIGINT handling, and a binary started
with SIGINT ignored (a background job of a shell, `nohup`) keeps ignoring it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_SA_RESETHAND = ctypes.c_int(0x80000000).value  # <asm-generic/signal-defs.h>


class _SigAction(ctypes.Structure):
  """glibc's `struct sigaction` on Linux (x86-64 and aarch64)."""

  _fields_ = [
    ("handler", ctypes.c_void_p),
    ("mask", ctypes.c_ulong * 16),
    ("flags", ctypes.c_int),
    ("restorer", ctypes.c_void_p),
  ]


def reset_when_delivered(signum: int) -> None:
  """Adds SA_RESETHAND to the action Python installed for `signum`: the kernel puts the default action back as it
  delivers the signal, before any Python code runs, so a second Ctrl-C kills the process even while the main
  thread is inside a long C call (XLA compiling) where Python handlers cannot run. Best effort: elsewhere than
  Linux a second Ctrl-C is only handled once the interpreter runs Python again."""
  if not sys.platform.startswith("linux"):
    return
  libc = ctypes.CDLL(None, use_errno=True)
  action = _SigAction()
  if libc.sigaction(signum, None, ctypes.byref(action)) == 0:
    action.flags |= _SA_RESETHAND
    libc.sigaction(signum, ctypes.byref(action), None)


def exit_at_once(signum, frame) -> None:
  del signum, frame
  os.write(2, b"interrupted\n")
  os._exit(130)  # no interpreter teardown: see the module docstring


def take_over(module: str) -> None:
  """Installs `exit_at_once` for SIGINT when `module` (the `-m` module this process runs) is a mage_jax binary."""
  if module.startswith("mage_jax.") and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, exit_at_once)
    reset_when_delivered(signal.SIGINT)
