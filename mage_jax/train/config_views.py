"""Typed views of config sections: a ConfigDict (or mapping) becomes a frozen dataclass, a dtype name a dtype.

Modules take dataclasses, never ConfigDicts; every job converts its sections with these two helpers, so an
unknown key is rejected the same way everywhere instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax.numpy as jnp

T = TypeVar("T")

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
DTYPE_NAMES = ("bfloat16", "float32")  # what flags offer; DTYPES also takes the short names


def dtype(name: str):
  """'float32' | 'bfloat16' (also 'fp32', 'bf16') -> jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def from_config(cls: type[T], cfg: Any, what: str, **overrides) -> T:
  """The frozen dataclass `cls` from a ConfigDict, mapping or instance (None: the defaults) plus `overrides`.

  Unknown and missing required keys are errors naming `what` (e.g. 'config.contrastive'); lists become tuples
  (dataclasses are hashed by jit caches and JSON turns tuples into lists).
  """
  if isinstance(cfg, cls) and not overrides:
    return cfg
  if dataclasses.is_dataclass(cfg):
    cfg = dataclasses.asdict(cfg)
  if cfg is not None and not hasattr(cfg, "to_dict") and not isinstance(cfg, dict):
    raise ValueError(f"{what} must be a mapping of {cls.__name__} fields, got {type(cfg).__name__}")
  values = {**dict(cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {})), **overrides}
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"unknown {what} keys {unknown}; known: {sorted(fields)}")
  missing = sorted(
    n
    for n, f in fields.items()
    if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
  )
  if missing:
    raise ValueError(f"{what}: missing required keys {missing}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
