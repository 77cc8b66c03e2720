"""Params-only checkpoints: the interchange format between conversion, training, generation and probing.

Layout of a params directory:
  `<dir>/variables/`   orbax StandardCheckpointer tree {'model': {...}, 'tokenizer': {...}} (collections inside)
  `<dir>/mage_jax.json`  what the tree is (kind) and the configs that rebuild its modules
The JSON is written last, so a directory without it is an interrupted write and is refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

META_FILE = "mage_jax.json"
FORMAT_VERSION = 1


def _to_jsonable(obj):
  if isinstance(obj, dict):
    return {k: _to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_to_jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def to_host(tree):
  """Global (possibly sharded, multi-process) arrays -> numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def save(directory: str, variables: dict, meta: dict, *, overwrite: bool = False) -> None:
  """Writes `variables` (numpy or jax leaves) and `meta` (JSON-able) as a params-only checkpoint."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, META_FILE)) and not overwrite:
    raise FileExistsError(f"{directory} already holds a mage_jax checkpoint; pass overwrite=True (--force) to "
                          "replace it")
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, META_FILE)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # until the new tree is complete, the directory must not look valid
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "variables"), variables, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(meta_path + ".tmp", "w") as f:
      json.dump({"format_version": FORMAT_VERSION, **_to_jsonable(meta)}, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, META_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"params checkpoint directory not found: {directory}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a complete mage_jax params checkpoint (no {META_FILE}; an "
                            "interrupted write, or a training workdir: export params from it first)")
  with open(path) as f:
    return json.load(f)


def load(directory: str, target: Any = None) -> tuple[dict, dict]:
  """Returns (variables, meta). With `target` (a tree of ShapeDtypeStruct with shardings), the arrays are
  restored directly onto those shardings; without it, as host-local arrays."""
  meta = read_meta(directory)
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(os.path.abspath(directory), "variables")
  try:
    variables = checkpointer.restore(path, target) if target is not None else checkpointer.restore(path)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise ValueError(f"cannot restore params from {directory}: {e}") from e
  return variables, meta
