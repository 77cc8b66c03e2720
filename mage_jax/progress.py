"""Progress of long host loops (generation, feature extraction, FID): counts, items/s and ETA in the log.

Training loops report through clu's `ReportProgress`; these loops are not steps of a train state, so they use
this. The rate leaves out the first update, which includes compilation.
"""

from __future__ import annotations

import time
from typing import Callable

from absl import logging


class Progress:
  """`update(n)` after each chunk of work; logs `done/total unit, rate, ETA` at most every `interval` s."""

  def __init__(self, total: int | None, what: str, *, unit: str = "images", interval: float = 10.0,
               log: Callable[[str], None] | None = None):
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
      return (f"{self.what}: {count} {self.unit}; the first chunk (with compilation) took "
              f"{time.perf_counter() - self.start:.1f} s")
    eta = "" if self.total is None else f", ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s"
    return f"{self.what}: {count} {self.unit}, {rate:.1f} {self.unit}/s{eta}"

  def update(self, count: int) -> str:
    """Records `count` more items; logs the progress line when due (and at the end). Returns the line."""
    now = time.perf_counter()
    self.done += int(count)
    if self._first is None:
      self._first = (now, self.done)
    text = self.line()
    if now - self._last_log >= self.interval or (self.total is not None and self.done >= self.total):
      self._last_log = now
      self.log(text)
    return text
