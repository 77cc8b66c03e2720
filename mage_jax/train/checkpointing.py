"""Training checkpoints with orbax: async saves, keep-K, resume from the latest, restore onto any mesh.

Full train states live in `<workdir>/checkpoints/<step>/`; params-only exports (params_io) are what other
binaries read. orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints intact and the partial one is never picked up. A complete step
whose files were later damaged (a truncated copy, a lost file, flipped bytes) is what `restore_newest` handles:
after orbax finalizes a step, `seal` writes a manifest of every file's size and CRC-32 into it, and a step whose
files no longer match is set aside before orbax reads it.
"""

from __future__ import annotations

import functools
import json
import logging as std_logging
import os
import sys
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from mage_jax.system import atomic

CORRUPT_POLICIES = ("fallback", "refuse")


def manager(
  workdir: str, *, keep: int = 3, save_interval_steps: int = 1, async_save: bool = True
) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save, create=True
    ),
  )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
  seal(mngr)  # orbax waits for the previous save before starting this one anyway
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


MANIFEST = "mage_jax_manifest.json"
_MANIFEST_MAX_BYTES = 1 << 24  # a crafted manifest must not make the check read without bound
_CHUNK = 1 << 23


def _crc32(path: str) -> tuple[int, str]:
  size, crc = 0, 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      size, crc = size + len(chunk), zlib.crc32(chunk, crc)
  return size, f"{crc:08x}"


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def write_manifest(step_dir: str) -> None:
  """Records the size and CRC-32 of every file under `step_dir` (a finalized step) in its MANIFEST."""
  files = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel != MANIFEST and not os.path.islink(path):
        files[rel] = list(_crc32(path))
  atomic.write_json(os.path.join(step_dir, MANIFEST), {"format": 1, "files": dict(sorted(files.items()))}, indent=0)


def seal(mngr: ocp.CheckpointManager) -> None:
  """Waits for pending saves, then writes the manifest of each step newer than the newest sealed one.

  Steps older than that without a manifest (written before manifests existed) stay unsealed: they were never
  verified, so a manifest would certify whatever they hold now (`restore_newest` seals the one it resumes from).
  Only the primary process writes.
  """
  mngr.wait_until_finished()
  if jax.process_index() != 0:
    return
  steps = sorted(mngr.all_steps())
  sealed = [s for s in steps if os.path.exists(os.path.join(_step_dir(mngr, s), MANIFEST))]
  for step in steps:
    if not sealed or step > sealed[-1]:
      write_manifest(_step_dir(mngr, step))


def manifest_problem(step_dir: str) -> str | None:
  """What differs between `step_dir` and its manifest (one phrase), or None; None too when it has no manifest."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  if os.path.getsize(path) > _MANIFEST_MAX_BYTES:
    return f"its {MANIFEST} is over {_MANIFEST_MAX_BYTES} bytes"
  try:
    with open(path) as f:
      files = json.load(f)["files"]
    entries = [(rel, int(size), str(crc)) for rel, (size, crc) in files.items()]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"its {MANIFEST} is unreadable ({type(e).__name__})"
  for rel, size, crc in entries:
    full = os.path.normpath(os.path.join(step_dir, rel))
    if os.path.isabs(rel) or not full.startswith(os.path.normpath(step_dir) + os.sep):
      return f"its {MANIFEST} names {rel!r}, outside the step"
    if not os.path.isfile(full):
      return f"{rel} is missing"
    actual = os.path.getsize(full)
    if actual != size:
      return f"{rel} is {actual} bytes, {size} when saved"
    now = _crc32(full)[1]
    if now != crc:
      return f"{rel} changed since it was saved (CRC-32 {now}, {crc} when saved)"
  return None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: restoring into them places arrays on that mesh.

  Empty nodes of `tree` (optax's MaskedNode where params are frozen), to which the logical rules assign a
  sharding all the same, stay as they are.
  """
  return jax.tree.map(
    lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if hasattr(x, "shape") else x, shardings, tree
  )


def _is_abandoned_read(exc: BaseException | None) -> bool:
  text = str(exc)
  return (isinstance(exc, RuntimeError) and text == "Event loop is closed") or (
    isinstance(exc, ValueError) and "tensorstore_spec" in text
  )


class _AbandonedReads(std_logging.Filter):
  """Silences the reads orbax abandons when one read of a damaged checkpoint fails.

  orbax then closes its event loop while tensorstore completes the other reads: each reports `RuntimeError:
  Event loop is closed` through sys.unraisablehook, and their tasks `... exception was never retrieved`
  through the asyncio logger, with tracebacks (hundreds for a damaged step) that bury the one line naming the
  bad step. Installed by the first restore (of a checkpoint or a params directory).
  """

  def __init__(self):
    super().__init__()
    self.previous_hook = sys.unraisablehook
    sys.unraisablehook = self.unraisable
    std_logging.getLogger("asyncio").addFilter(self)

  def unraisable(self, unraisable):
    if unraisable.object is not None or not _is_abandoned_read(unraisable.exc_value):
      self.previous_hook(unraisable)

  def filter(self, record):
    return not (
      str(record.msg).startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
      and record.exc_info
      and _is_abandoned_read(record.exc_info[1])
    )


@functools.cache
def silence_abandoned_reads() -> _AbandonedReads:
  return _AbandonedReads()


def read_failure(e: BaseException) -> str:
  """orbax's error for a file it could not read, without the kilobytes of tensorstore spec JSON that follow."""
  return str(e).split(" [tensorstore_spec=")[0]


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores `step` into `target` (a tree of ShapeDtypeStruct with shardings; any mesh)."""
  silence_abandoned_reads()
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(target))
  except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
    raise ValueError(
      f"checkpoint step {step} in {mngr.directory} cannot be restored into this model "
      f"(corrupt, or written by a different model/optimizer config): {read_failure(e)}"
    ) from e


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
  return mngr.latest_step()


IDENTITY_FILE = "run_identity.json"


def claim(directory: str, identity: dict) -> None:
  """Marks `directory` as the run of `identity` (JSON-able: what produced it), or checks an earlier mark.

  A directory holding checkpoints of a different model, data slice or recipe must not be resumed as if it were
  this run. Raises ValueError naming the directory and the fields that differ; a directory without a mark but
  with checkpoints is refused too (its origin is unknown).
  """
  path = os.path.join(directory, IDENTITY_FILE)
  identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
  if os.path.exists(path):
    with open(path) as f:
      earlier = json.load(f)
    differ = sorted(k for k in set(earlier) | set(identity) if earlier.get(k) != identity.get(k))
    if differ:
      raise ValueError(
        f"{directory} holds a run of a different {', '.join(differ)} (e.g. {differ[0]}: "
        f"{earlier.get(differ[0])!r} there, {identity.get(differ[0])!r} now); use another "
        "workdir, or remove that directory to start over"
      )
    return
  if os.path.isdir(os.path.join(directory, "checkpoints")) and os.listdir(os.path.join(directory, "checkpoints")):
    raise ValueError(f"{directory} holds checkpoints of an unknown run (no {IDENTITY_FILE}); use another workdir")
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    atomic.write_json(path, identity, indent=1, sort_keys=True)


def restore_newest(mngr: ocp.CheckpointManager, target: Any, *, corrupt: str = "fallback") -> tuple[int, Any] | None:
  """Restores the newest checkpoint that reads back into `target`; None when there is no checkpoint.

  A step that cannot be restored while an older one can is damaged (the older one proves the model/optimizer
  config matches): with corrupt='fallback' it is renamed `<step>.corrupt-<UTC time>` beside the others (kept
  for inspection, and out of orbax's sight, so that the run can save that step again and keep-K neither counts
  nor deletes it) and a warning names it. A step whose files differ from its manifest (see `seal`) is damaged
  too, and is not handed to orbax at all. With corrupt='refuse' the newest step's error is raised (one line
  naming the step). When no step restores, nothing is renamed and the newest step's error is raised: that is a
  config mismatch rather than damage. Every process takes the same decision: a step counts as intact only if
  it restored on all of them.

  Args:
    mngr: the run's checkpoint manager.
    target: tree of ShapeDtypeStruct with shardings (see `abstract_with_shardings`).
    corrupt: 'fallback' or 'refuse'.

  Returns:
    (step, restored state), or None.
  """
  if corrupt not in CORRUPT_POLICIES:
    raise ValueError(f"corrupt checkpoint policy must be one of {CORRUPT_POLICIES}, got {corrupt!r}")
  steps = sorted(mngr.all_steps(), reverse=True)
  newest_error = None
  for step in steps:
    problem = manifest_problem(_step_dir(mngr, step)) if jax.process_index() == 0 else None
    state, error = None, None
    if not _on_all_processes(problem is None):
      error = ValueError(
        f"checkpoint step {step} in {mngr.directory} is damaged: "
        f"{problem or 'its files differ from its manifest (checked by the primary process)'}"
      )
    else:
      try:
        state = restore(mngr, step, target)
      except ValueError as e:
        error = e
    if _on_all_processes(error is None):
      if jax.process_index() == 0 and not os.path.exists(os.path.join(_step_dir(mngr, step), MANIFEST)):
        write_manifest(_step_dir(mngr, step))  # read back whole by orbax: as verified as it can be; older ones stay
      bad = steps[: steps.index(step)]
      if bad:
        _set_aside(mngr, bad, step, newest_error)
      return step, state
    error = error or ValueError(f"checkpoint step {step} in {mngr.directory} could not be read by another process")
    if corrupt == "refuse":
      raise error
    newest_error = newest_error or error
  if newest_error is not None:
    raise newest_error
  return None


def _on_all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _set_aside(mngr: ocp.CheckpointManager, bad: list[int], restored: int, error: Exception) -> None:
  """Renames the damaged steps `bad` (newest first) out of orbax's sight and warns naming them."""
  stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
  moved = [os.path.join(mngr.directory, f"{s}.corrupt-{stamp}") for s in bad]
  if jax.process_index() == 0:
    for s, path in zip(bad, moved):
      os.rename(os.path.join(mngr.directory, str(s)), path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mage_jax:set_aside_corrupt_checkpoints")
  mngr.reload()
  logging.warning(
    "%s. Resuming from step %d, the newest intact checkpoint; set aside for inspection: %s (set "
    "corrupt_checkpoint='refuse' to stop instead)",
    error,
    restored,
    ", ".join(moved),
  )
