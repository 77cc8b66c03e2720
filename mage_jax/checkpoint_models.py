"""Rebuilds the Flax modules described by a params-only checkpoint's meta (see `params_io`).

Shared by the binaries that consume params directories (generation, editing, probing): the meta written by
`python -m mage_jax.convert` (or a training export) holds `meta['model']` (MAGEConfig fields) and
`meta['tokenizer']` (VQGANConfig fields). JSON turns tuples into lists, so sequence fields are converted back
(the modules are hashed by jit caches and must not hold lists).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from mage_jax.models.mage import MAGE, MAGEConfig
from mage_jax.models.vqgan import VQGAN, VQGANConfig

Dtype = Any


def _config(cls, fields: Any, what: str):
  if not isinstance(fields, dict):
    raise ValueError(f"checkpoint meta[{what!r}] must be a dict of {cls.__name__} fields, got "
                     f"{type(fields).__name__}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"checkpoint meta[{what!r}] has fields {unknown} that {cls.__name__} does not know "
                     "(written by a newer mage_jax?)")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  return cls(**values)


def mage_config_from_meta(meta: dict) -> MAGEConfig:
  """MAGEConfig from `meta['model']`. Raises ValueError for missing/unknown fields or unsupported models."""
  if "model" not in meta:
    raise ValueError(f"checkpoint meta has no 'model' entry (kind={meta.get('kind')!r}); a MAGE checkpoint is "
                     "needed (python -m mage_jax.convert mage-vitb-1600.pth OUT)")
  fields = meta["model"]
  if isinstance(fields, dict) and fields.get("num_classes"):
    from mage_jax.models import class_cond
    return class_cond.config_from_meta(meta)
  if isinstance(fields, dict) and "num_classes" in fields:
    fields = {k: v for k, v in fields.items() if k != "num_classes"}  # num_classes 0/None: unconditional
  return _config(MAGEConfig, fields, "model")


def tokenizer_config_from_meta(meta: dict) -> VQGANConfig:
  """VQGANConfig from `meta['tokenizer']`."""
  if "tokenizer" not in meta:
    raise ValueError(f"checkpoint meta has no 'tokenizer' entry (kind={meta.get('kind')!r}); generation needs "
                     "the VQGAN tokenizer inside the params directory (convert a MAGE .pth, which holds it)")
  return _config(VQGANConfig, meta["tokenizer"], "tokenizer")


def models_from_meta(meta: dict, dtype: Dtype = jnp.float32) -> tuple[MAGE, VQGAN]:
  """(MAGE, VQGAN) modules matching a params checkpoint; `dtype` is the compute dtype (params stay float32).

  Raises:
    ValueError: missing entries, unknown fields, or a model/tokenizer pair whose token counts disagree.
  """
  kind = meta.get("kind", "mage")
  if kind != "mage":
    raise ValueError(f"checkpoint kind is {kind!r}; a MAGE pretraining checkpoint (kind 'mage', model + "
                     "tokenizer) is needed")
  model_config = mage_config_from_meta(meta)
  tok_config = tokenizer_config_from_meta(meta)
  if model_config.num_tokens != tok_config.num_tokens:
    raise ValueError(f"checkpoint meta is inconsistent: the model expects {model_config.num_tokens} tokens per "
                     f"image, the tokenizer ({tok_config.resolution}px, ch_mult={tok_config.ch_mult}) makes "
                     f"{tok_config.num_tokens}")
  if model_config.codebook_size != tok_config.codebook_size:
    raise ValueError(f"checkpoint meta is inconsistent: model codebook_size={model_config.codebook_size}, "
                     f"tokenizer codebook_size={tok_config.codebook_size}")
  from mage_jax.models import class_cond
  cls = class_cond.ClassCondMAGE if isinstance(model_config, class_cond.ClassCondConfig) else MAGE
  return cls(model_config, dtype=dtype), VQGAN(tok_config, dtype=dtype)


def parse_dtype(name: str) -> Dtype:
  """'float32' | 'bfloat16' (also 'fp32', 'bf16') -> jnp dtype."""
  table = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
  if name not in table:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)}")
  return table[name]
