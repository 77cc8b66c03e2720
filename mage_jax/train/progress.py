"""Progress reports: of long host loops (`Progress`: generation, feature extraction, FID) and of the training
loop (`writer`, `training_hooks`).

Host loops are not steps of a train state: `Progress` logs counts, items/s and ETA, leaving out the first update,
which includes compilation. The training loop reports through clu's metric writer and `ReportProgress`; those
import TensorFlow (for TensorBoard summaries), so on a host without it (a GPU/TPU image training on the 'random'
input) metrics and progress go to the absl log only (`LogWriter`, `ReportProgress` here) and profiling windows
are skipped with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable

from absl import logging


@functools.cache
def _clu():
  """clu's (metric_writers, periodic_actions), or (None, None) without TensorFlow. Imported on first use: they
  import TensorFlow, which binaries that only read images or run a network (edit, fid) should not pay for."""
  try:
    from clu import metric_writers, periodic_actions
  except ImportError:
    return None, None
  return metric_writers, periodic_actions


class Progress:
  """`update(n)` after each chunk of work; logs `done/total unit, rate, ETA` at most every `interval` s."""

  def __init__(
    self,
    total: int | None,
    what: str,
    *,
    unit: str = "images",
    interval: float = 10.0,
    log: Callable[[str], None] | None = None,
  ):
    self.total = None if total is None else int(total)
    self.what, self.unit, self.interval = what, unit, interval
    self.log = log or (lambda line: logging.info("%s", line))
    self.start = time.perf_counter()
    self.done = 0
    self._first: tuple[float, int] | None = None  # (time, count) after the first update
    self._last_log = -float("inf")

  def rate(self) -> float | None:
    """Items/s after the first update; None until a second update."""
    if self._first is None or self.done <= self._first[1]:
      return None
    return (self.done - self._first[1]) / max(time.perf_counter() - self._first[0], 1e-9)

  def line(self) -> str:
    count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
    rate = self.rate()
    if rate is None:
      return (
        f"{self.what}: {count} {self.unit}; the first chunk (with compilation) took "
        f"{time.perf_counter() - self.start:.1f} s"
      )
    eta = "" if self.total is None else f", ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s"
    return f"{self.what}: {count} {self.unit}, {rate:.1f} {self.unit}/s{eta}"

  def update(self, count: int) -> str:
    """Records `count` more items; logs the progress line when due (and at the end). Returns the line."""
    now = time.perf_counter()
    self.done += int(count)
    if self.total is not None:
      self.done = min(self.done, self.total)  # a padded last batch counts only its real items
    if self._first is None:
      self._first = (now, self.done)
    text = self.line()
    if now - self._last_log >= self.interval or (self.total is not None and self.done >= self.total):
      self._last_log = now
      self.log(text)
    return text


class LogWriter:
  """`write_scalars` / `write_hparams` / `flush` of a clu MetricWriter, to the absl log."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())))

  def write_hparams(self, hparams: dict) -> None:
    logging.info("hparams: %s", hparams)

  def flush(self) -> None:
    pass


class ReportProgress:
  """clu's ReportProgress without TensorBoard: every `every_steps` steps, logs and writes steps/s and the ETA;
  `timed(name)` measures a phase (e.g. evaluation) and leaves it out of the rate."""

  def __init__(self, num_train_steps: int, writer_, every_steps: int):
    self.total, self.writer, self.every = num_train_steps, writer_, every_steps
    self._last_step, self._last_time, self._excluded = None, time.perf_counter(), 0.0

  def __call__(self, step: int) -> None:
    now = time.perf_counter()
    if self._last_step is None:
      self._last_step, self._last_time = step, now
      return
    if step % self.every and step != self.total:
      return
    rate = (step - self._last_step) / max(now - self._last_time - self._excluded, 1e-9)
    logging.info("step %d/%d: %.3g steps/s, ETA %.0f s", step, self.total, rate, (self.total - step) / rate)
    self.writer.write_scalars(step, {"steps_per_sec": rate})
    self._last_step, self._last_time, self._excluded = step, now, 0.0

  @contextlib.contextmanager
  def timed(self, name: str):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - t0
      logging.info("%s took %.1f s", name, time.perf_counter() - t0)


def writer(workdir: str, is_main: bool):
  """The training loop's metric writer: clu's default (log + TensorBoard on the main process, asynchronous), or
  `LogWriter` where clu's writers cannot import."""
  metric_writers, _ = _clu()
  if metric_writers is None:
    logging.warning("clu's metric writers need TensorFlow, which is not installed: metrics go to the log only")
    return LogWriter()
  return metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=True)


def training_hooks(
  total_steps: int, writer_, every_steps: int, *, profile_dir: str | None, profile_steps: int, first_profile: int
) -> list:
  """[progress report, optional profiler window (with `profile_dir` and `profile_steps` > 0)]; the first one's
  `timed(name)` times other phases."""
  _, periodic_actions = _clu()
  if periodic_actions is None:
    if profile_dir and profile_steps > 0:
      logging.warning("profiling needs clu's periodic actions (TensorFlow): profile_steps ignored")
    return [ReportProgress(total_steps, writer_, every_steps)]
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer_, every_steps=every_steps)]
  if profile_dir and profile_steps > 0:
    hooks.append(
      periodic_actions.Profile(logdir=profile_dir, num_profile_steps=profile_steps, first_profile=first_profile)
    )
  return hooks
