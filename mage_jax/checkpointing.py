"""Training checkpoints with orbax: async saves, keep-K, resume from the latest, restore onto any mesh.

Full train states live in `<workdir>/checkpoints/<step>/`; params-only exports (params_io) are what other
binaries read. orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints intact and the partial one is never picked up.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, keep: int = 3, save_interval_steps: int = 1, async_save: bool = True
            ) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: restoring into them places arrays on that mesh.

  Empty nodes of `tree` (optax's MaskedNode where params are frozen), to which the logical rules assign a
  sharding all the same, stay as they are.
  """
  return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if hasattr(x, "shape") else x,
                      shardings, tree)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores `step` into `target` (a tree of ShapeDtypeStruct with shardings; any mesh)."""
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(target))
  except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
    raise ValueError(f"checkpoint step {step} in {mngr.directory} cannot be restored into this model "
                     f"(corrupt, or written by a different model/optimizer config): {e}") from e


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
      raise ValueError(f"{directory} holds a run of a different {', '.join(differ)} (e.g. {differ[0]}: "
                       f"{earlier.get(differ[0])!r} there, {identity.get(differ[0])!r} now); use another "
                       "workdir, or remove that directory to start over")
    return
  if os.path.isdir(os.path.join(directory, "checkpoints")) and os.listdir(os.path.join(directory, "checkpoints")):
    raise ValueError(f"{directory} holds checkpoints of an unknown run (no {IDENTITY_FILE}); use another workdir")
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(identity, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
