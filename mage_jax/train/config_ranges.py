"""The ranges of a training config's numeric fields, checked before anything is written or compiled.

A value outside its range either trains without complaint into a meaningless run (a negative lr, a masking ratio
above 1, label smoothing of 2) or fails late inside the loop (`checkpoint_every_steps=0` divides by zero after
compilation; `keep_checkpoints=0` deletes every checkpoint). Fields a config does not have are skipped, so one
table serves every mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable

MAX_SEED = 2**63 - 1  # jax.random.key takes a C long

# (dotted field, test, what the test means)
RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
  ("optim.blr", lambda v: v >= 0, ">= 0"),
  ("optim.lr", lambda v: v >= 0, ">= 0"),
  ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
  ("optim.grad_clip_norm", lambda v: v >= 0, ">= 0 (0: off)"),
  ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.warmup_steps", lambda v: v >= -1 and v == int(v), "a whole number >= 0 (-1: from warmup_epochs)"),
  ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
  ("masking.min_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("masking.max_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("masking.std", lambda v: v > 0, "> 0"),
  ("masking.drop_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("total_steps", lambda v: v >= 0 and v == int(v), "a whole number >= 0 (0: from total_epochs)"),
  ("total_epochs", lambda v: v >= 0, ">= 0"),
  ("input.batch_size", lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
  ("log_every_steps", lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
  ("checkpoint_every_steps", lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
  ("keep_checkpoints", lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
  ("seed", lambda v: 0 <= v <= MAX_SEED and v == int(v), "a whole number in [0, 2**63 - 1]"),
)


def _lookup(config, dotted: str):
  node = config
  for key in dotted.split("."):
    if not hasattr(node, "keys") or key not in node:
      return None
    node = node[key]
  return node


def check(config) -> None:
  """Raises ValueError naming the first field outside its range (`config.<field>=<value>: must be ...`)."""
  for field, ok, meaning in RANGES:
    value = _lookup(config, field)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    if not math.isfinite(value) or not ok(value):
      raise ValueError(f"config.{field}={value!r}: must be {meaning}")
  lo, hi = _lookup(config, "masking.min_ratio"), _lookup(config, "masking.max_ratio")
  if lo is not None and hi is not None and lo > hi:
    raise ValueError(f"config.masking.min_ratio={lo!r} is above config.masking.max_ratio={hi!r}")
  _check_evals(_lookup(config, "evals"))
  law = _lookup(config, "masking.law")
  if law is not None:
    from mage_jax.objectives import masking  # pylint: disable=g-import-not-at-top  (JAX: only for masked jobs)

    if law not in masking.RATIO_LAWS:
      raise ValueError(f"config.masking.law={law!r}: must be one of {sorted(masking.RATIO_LAWS)}")


def _check_evals(entries) -> None:
  """A training config's evaluators have a type and a cadence (an eval config's `evals` is a tuple of names; the
  entries' own settings are checked when the job builds them)."""
  if not hasattr(entries, "items"):
    return
  for name, entry in entries.items():
    if not hasattr(entry, "get") or not isinstance(entry.get("type"), str) or not entry.get("type"):
      raise ValueError(f"config.evals.{name}: must be dict(type=<evaluator>, every_steps=N, ...), got {entry!r}")
    every = entry.get("every_steps", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
      raise ValueError(f"config.evals.{name}.every_steps={every!r}: must be a whole number >= 0 (0: at the end only)")
