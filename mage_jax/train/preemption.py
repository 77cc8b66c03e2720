"""Preemption (SIGTERM) and Ctrl-C (SIGINT) during training: every process stops at the same step, saved.

A signal only sets a flag in the process that gets it. Hosts of a pod or a SLURM job see a SIGTERM at
different steps, or only some of them see it; a host that entered the collective checkpoint save while
another kept stepping would hang the job. So the processes agree: after every step each one contributes its
flag to an all-reduce (max) over every device of the mesh, and all of them read the result one step later,
at the same step, and stop together if any flag was set. The all-reduce is dispatched asynchronously and read
only after the next step has been dispatched, when it has normally long finished: it costs one all-reduce of
one int per device per step on the devices (microseconds over ICI, tens to hundreds over DCN) and no host
synchronisation beyond keeping the host at most one step ahead of the devices. Agreeing only every k steps
would save that but multiply the time from signal to stop by k, against a fixed grace period (30 s on GCE
spot VMs) that must also fit the checkpoint write; so the agreement runs every step and the stop comes one or
two steps after the signal.

A second Ctrl-C kills the process at once: the kernel restores SIGINT's default action when it delivers the
first one (SA_RESETHAND, on Linux), so this holds also while XLA compiles, when Python signal handlers cannot
run.
"""

from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from mage_jax.system import interrupt

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stop:
  """Turns SIGTERM and the first SIGINT into a step every process stops after (see the module docstring).

  Attributes:
    signal: the first signal this process received (signal.SIGTERM or signal.SIGINT), or None.
  """

  def __init__(self, mesh: jax.sharding.Mesh):
    self.signal: signal.Signals | None = None
    # One flag per device of the mesh; the max is replicated, so each process reads it from its own devices.
    self._flags = NamedSharding(mesh, P(mesh.axis_names))
    self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    self._pending = None
    self._previous = {s: signal.getsignal(s) for s in _SIGNALS}
    self.reinstall()
    logging.info("from now on SIGTERM and Ctrl-C stop the run at a step all processes agree on, with a checkpoint")

  def reinstall(self):
    """Takes the signals (back).

    Called again after the first step: the XLA runtime may install its own C-level SIGTERM action while
    compiling/running it (it exits the process with status 0), silently replacing ours. After a first Ctrl-C,
    SIGINT keeps its default action so that a second one still kills the process.
    """
    signal.signal(signal.SIGTERM, self._handle)
    if self.signal != signal.SIGINT:
      signal.signal(signal.SIGINT, self._handle)
      interrupt.reset_when_delivered(signal.SIGINT)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)  # already so on Linux (SA_RESETHAND)
    if self.signal is None:
      self.signal = signal.Signals(signum)
      logging.warning(
        "%s received: saving a checkpoint at a step all processes agree on, then exiting%s",
        self.signal.name,
        " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else "",
      )

  def reached(self) -> bool:
    """Whether every process stops after the step just dispatched. Call it once per step, on every process."""
    flag = np.full((1,), self.signal is not None, np.int32)
    current = self._any(jax.make_array_from_callback((self._flags.mesh.size,), self._flags, lambda _: flag))
    previous, self._pending = self._pending, current
    return previous is not None and bool(previous)

  def restore(self):
    """Puts the previous handlers back; after a Ctrl-C, SIGINT keeps its default action (kill at once)."""
    for s, previous in self._previous.items():
      # None: a handler installed outside Python, which Python cannot put back.
      if previous is not None and not (s == signal.SIGINT and self.signal == signal.SIGINT):
        signal.signal(s, previous)
        if previous is interrupt.exit_at_once:
          interrupt.reset_when_delivered(s)
