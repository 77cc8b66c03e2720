"""Params-only checkpoints: the interchange format between conversion, training, generation and probing.

Layout of a params directory:
  `<dir>/variables/`   orbax StandardCheckpointer tree {'model': {...}, 'tokenizer': {...}} (collections inside)
  `<dir>/mage_jax.json`  what the tree is (kind) and the configs that rebuild its modules
The JSON is written last, so a directory without it is an interrupted write and is refused.

`models_from_meta` rebuilds the Flax modules a directory describes: `meta['model']` (MAGEConfig fields) and
`meta['tokenizer']` (VQGANConfig fields). JSON turns tuples into lists, so sequence fields are converted back
(the modules are hashed by jit caches and must not hold lists).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mage_jax.models.mage import MAGE, MAGEConfig
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.system import atomic
from mage_jax.train import checkpointing, config_views

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


def check_destination(directory: str, *, overwrite: bool = False) -> None:
  """Refuses a destination `save` would damage or cannot write, before any work is spent on the params.

  Raises:
    FileExistsError: `directory` holds a params checkpoint, or is not empty without being one (its `variables/`
      would be replaced), and `overwrite` is False; or it is a file.
    PermissionError / NotADirectoryError: it cannot be created or written.
  """
  directory = os.path.abspath(directory)
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise FileExistsError(f"{directory} exists and is not a directory")
  entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  if META_FILE in entries and not overwrite:
    raise FileExistsError(
      f"{directory} already holds a mage_jax checkpoint; pass overwrite=True (--force) to replace it"
    )
  if entries and META_FILE not in entries and not overwrite:
    raise FileExistsError(
      f"{directory} is not empty and is not a mage_jax params checkpoint (it holds "
      f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); choose a new or empty "
      "directory, or pass overwrite=True (--force) to write into it"
    )
  existing = directory
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"cannot create {directory}: {existing} is not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"cannot write {directory}: {existing} is not writable")


def save(directory: str, variables: dict, meta: dict, *, overwrite: bool = False) -> None:
  """Writes `variables` (numpy or jax leaves) and `meta` (JSON-able) as a params-only checkpoint.

  Refuses what `check_destination` refuses: without `overwrite`, nothing that exists is replaced.
  """
  directory = os.path.abspath(directory)
  check_destination(directory, overwrite=overwrite)
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, META_FILE)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # until the new tree is complete, the directory must not look valid
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "variables"), variables, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    checkpointing.write_manifest(os.path.join(directory, "variables"))
    atomic.write_json(meta_path, {"format_version": FORMAT_VERSION, **_to_jsonable(meta)})


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, META_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"params checkpoint directory not found: {directory}")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{directory} is not a complete mage_jax params checkpoint (no {META_FILE}; an "
      "interrupted write, or a training workdir: export params from it first)"
    )
  with open(path) as f:
    return json.load(f)


def load(directory: str, target: Any = None) -> tuple[dict, dict]:
  """Returns (variables, meta). With `target` (a tree of ShapeDtypeStruct with shardings), the arrays are
  restored directly onto those shardings; without it, as host-local arrays. Files that differ from the
  manifest `save` wrote (sizes, CRC-32) are refused before orbax reads them."""
  meta = read_meta(directory)
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(os.path.abspath(directory), "variables")
  problem = checkpointing.manifest_problem(path)  # exports written before manifests existed have none
  if problem:
    raise ValueError(f"params in {directory} are damaged (variables/): {problem}")
  checkpointing.silence_abandoned_reads()
  try:
    variables = checkpointer.restore(path, target) if target is not None else checkpointer.restore(path)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise ValueError(f"cannot restore params from {directory}: {checkpointing.read_failure(e)}") from e
  return variables, meta


# ---------------------------------------------------------------------------------------------------------
# Modules described by a params directory.


def mage_config_from_meta(meta: dict) -> MAGEConfig:
  """MAGEConfig from `meta['model']`. Raises ValueError for missing/unknown fields or unsupported models."""
  if "model" not in meta:
    raise ValueError(
      f"checkpoint meta has no 'model' entry (kind={meta.get('kind')!r}); a MAGE checkpoint is "
      "needed (python -m mage_jax.convert mage-vitb-1600.pth OUT)"
    )
  fields = meta["model"]
  if isinstance(fields, dict) and fields.get("num_classes"):
    from mage_jax.models import class_cond

    return class_cond.config_from_meta(meta)
  if isinstance(fields, dict) and "num_classes" in fields:
    fields = {k: v for k, v in fields.items() if k != "num_classes"}  # num_classes 0/None: unconditional
  return config_views.from_config(MAGEConfig, fields, "checkpoint meta['model']")


def tokenizer_config_from_meta(meta: dict) -> VQGANConfig:
  """VQGANConfig from `meta['tokenizer']`."""
  if "tokenizer" not in meta:
    raise ValueError(
      f"checkpoint meta has no 'tokenizer' entry (kind={meta.get('kind')!r}); generation needs "
      "the VQGAN tokenizer inside the params directory (convert a MAGE .pth, which holds it)"
    )
  return config_views.from_config(VQGANConfig, meta["tokenizer"], "checkpoint meta['tokenizer']")


def models_from_meta(meta: dict, dtype: Any = jnp.float32) -> tuple[MAGE, VQGAN]:
  """(MAGE, VQGAN) modules matching a params checkpoint; `dtype` is the compute dtype (params stay float32).

  Raises:
    ValueError: missing entries, unknown fields, or a model/tokenizer pair whose token counts disagree.
  """
  kind = meta.get("kind", "mage")
  if kind != "mage":
    raise ValueError(
      f"checkpoint kind is {kind!r}; a MAGE pretraining checkpoint (kind 'mage', model + tokenizer) is needed"
    )
  model_config = mage_config_from_meta(meta)
  tok_config = tokenizer_config_from_meta(meta)
  if model_config.num_tokens != tok_config.num_tokens:
    raise ValueError(
      f"checkpoint meta is inconsistent: the model expects {model_config.num_tokens} tokens per "
      f"image, the tokenizer ({tok_config.resolution}px, ch_mult={tok_config.ch_mult}) makes "
      f"{tok_config.num_tokens}"
    )
  if model_config.codebook_size != tok_config.codebook_size:
    raise ValueError(
      f"checkpoint meta is inconsistent: model codebook_size={model_config.codebook_size}, "
      f"tokenizer codebook_size={tok_config.codebook_size}"
    )
  from mage_jax.models import class_cond

  cls = class_cond.ClassCondMAGE if isinstance(model_config, class_cond.ClassCondConfig) else MAGE
  return cls(model_config, dtype=dtype), VQGAN(tok_config, dtype=dtype)


def nonfinite_count(array: np.ndarray) -> int:
  """How many values of a host array are NaN or Inf."""
  return int(np.size(array) - np.count_nonzero(np.isfinite(array)))


def check_finite(variables: Any, directory: str) -> None:
  """Raises ValueError naming the first tensors of `variables` that hold NaN/Inf or are not floating point
  (such weights would silently produce black images or constant features)."""
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    array = np.asarray(leaf)
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if not np.issubdtype(array.dtype, np.floating):
      problems.append(f"{name} has dtype {array.dtype}")
    elif nonfinite_count(array):
      problems.append(f"{name} has {nonfinite_count(array)} NaN/Inf values")
    if len(problems) >= 3:
      break
  if problems:
    raise ValueError(f"params in {directory} are unusable: " + "; ".join(problems))
