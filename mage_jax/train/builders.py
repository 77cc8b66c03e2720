"""Builders that jobs share: config views, dtypes, the frozen tokenizer, the MAGE model, its optimizer, exports.

Jobs (mage_jax/jobs/*) translate their ConfigDict into modules and optax transformations here, so a
ConfigDict never reaches a module and every job reads a config section the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mage_jax.models import layers
from mage_jax.models.mage import MAGE, config_for
from mage_jax.models.tokenizer import Tokenizer
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.objectives import masking
from mage_jax.train import config_views, optim, params_io, sharding, steps

# config.tokenizer keys that say how the frozen tokenizer runs or where it comes from, not what it is.
TOKENIZER_RUNTIME_KEYS = ("init", "dtype", "precision", "chunks")


def tokenizer_config(tokenizer_cfg: Any, image_size: int) -> VQGANConfig:
  """`config.tokenizer` sizes at the input resolution, checked (runtime keys such as `init` are skipped)."""
  values = dict(tokenizer_cfg.to_dict() if hasattr(tokenizer_cfg, "to_dict") else tokenizer_cfg)
  sizes = {k: v for k, v in values.items() if k not in TOKENIZER_RUNTIME_KEYS}
  return config_views.from_config(VQGANConfig, {**sizes, "resolution": image_size}, "config.tokenizer")


def tokenizer_module(config: ml_collections.ConfigDict, tok_config: VQGANConfig) -> VQGAN:
  """The frozen tokenizer as the steps run it (`config.tokenizer.dtype` / `precision`)."""
  tcfg = config.tokenizer
  return VQGAN(
    tok_config, dtype=config_views.dtype(tcfg.get("dtype", "float32")), precision=tcfg.get("precision", "highest")
  )


def load_tokenizer(config: ml_collections.ConfigDict) -> tuple[VQGAN, dict]:
  """The frozen tokenizer: (module, variables on host).

  From `config.tokenizer.init` (a params dir holding a 'tokenizer' tree: converted, exported from MAGE, or
  trained) at `config.input.image_size`, or, when `init` is empty, seeded random weights of the configured sizes.
  It runs in float32 activations with TF32-class convolutions by default: bf16 compute flips near-tied ids.
  """
  tcfg, image_size = config.tokenizer, config.input.image_size
  if tcfg.init:
    variables, meta = params_io.load(tcfg.init)
    if "tokenizer" not in variables:
      raise ValueError(f"{tcfg.init} holds no tokenizer params (kind {meta.get('kind')!r})")
    tok_config = dataclasses.replace(params_io.tokenizer_config_from_meta(meta), resolution=image_size)
    return tokenizer_module(config, tok_config), variables["tokenizer"]
  logging.warning("tokenizer.init is empty: using a frozen RANDOM tokenizer (fine for smoke tests only)")
  tokenizer = tokenizer_module(config, tokenizer_config(tcfg, image_size))
  variables = jax.jit(_tokenizer_init(tokenizer))(jax.random.key(config.seed + 1))
  return tokenizer, jax.device_get(nn.unbox(variables))


def _tokenizer_init(tokenizer: VQGAN):
  """rng -> the tokenizer's variables (initialised on one patch of the input: the sizes do not depend on it)."""
  side = 2 ** (len(tokenizer.config.ch_mult) - 1)
  return lambda rng: tokenizer.init(rng, jnp.zeros((1, side, side, 3)))


def frozen_tokenizer(config: ml_collections.ConfigDict, abstract: bool = False) -> tuple[VQGAN, Any]:
  """`load_tokenizer`, or with `abstract` the module of `config.tokenizer`'s sizes with its variables' shapes: no
  file is read, so an init checkpoint's own sizes are not either."""
  if not abstract:
    return load_tokenizer(config)
  tokenizer = tokenizer_module(config, tokenizer_config(config.tokenizer, config.input.image_size))
  return tokenizer, sharding.strip_boxes(jax.eval_shape(_tokenizer_init(tokenizer), jax.random.key(0)))


def projection_head_params(head, model: MAGE, rng):
  """MAGE-C's projection head, initialised as `mage_init_state` initialises it from the same rng."""
  return head.init(jax.random.fold_in(rng, 2), jnp.zeros((1, model.config.embed_dim), jnp.float32))["params"]


def mage_init_state(model: MAGE, masking_cfg, tx, *extra_inputs, head=None):
  """`Task.init_state` of every MAGE-like job: rng -> TrainState of `model` (plus `extra_inputs` to its call, e.g.
  the class-conditional model's labels), with `head` (MAGE-C's projection head) its params are {'model', and
  'projection_head'}.

  The rng is folded in as 0 for the model, 1 for the state's dropout/masking key and 2 for the head, so one seed
  gives the same initial MAGE to plain pretraining and to MAGE-C.
  """
  n = model.config.num_tokens

  def init_state(rng):
    plan, _ = masking.sample_plan(jax.random.key(0), 1, n, **masking_cfg)
    params = model.init(jax.random.fold_in(rng, 0), jnp.zeros((1, n), jnp.int32), plan, *extra_inputs)["params"]
    if head is not None:
      params = {"model": params, "projection_head": projection_head_params(head, model, rng)}
    return steps.TrainState.create(params, tx, jax.random.key_data(jax.random.fold_in(rng, 1)))

  return init_state


def mage_model(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> MAGE:
  """MAGE of `config.model` (variant + overrides) for the tokenizer's token grid and codebook."""
  m = config.model
  num_tokens = tokenizer.config.num_tokens
  overrides = {k: v for k, v in m.items() if k not in ("variant", "dtype", "param_dtype")}
  mcfg = config_for(
    m.variant,
    num_tokens=num_tokens,
    codebook_size=tokenizer.config.codebook_size,
    max_position_embeddings=max(257, num_tokens + 1),
    **overrides,
  )
  return MAGE(
    mcfg,
    dtype=config_views.dtype(m.get("dtype", "float32")),
    param_dtype=config_views.dtype(m.get("param_dtype", "float32")),
  )


def pretrain_optimizer(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int, frozen=None):
  """AdamW of `main_pretrain.py` from `config.optim` with lr = blr·batch/256; returns (tx, PretrainOptim)."""
  o = config.optim
  optim_cfg = optim.PretrainOptim(
    lr=optim.scaled_lr(o.blr, config.input.batch_size),
    total_steps=total_steps,
    warmup_steps=warmup_steps,
    min_lr=o.min_lr,
    b1=o.b1,
    b2=o.b2,
    weight_decay=o.weight_decay,
    grad_clip_norm=o.grad_clip_norm or None,
  )
  return optim.pretrain_optimizer(optim_cfg, frozen=frozen), optim_cfg


def initial_model_params(config: ml_collections.ConfigDict, model: MAGE) -> dict | None:
  """`config.model_init` (a params dir) as host params in the model's layout, or None."""
  if not config.get("model_init"):
    return None
  variables, _ = params_io.load(config.model_init)
  if "model" not in variables:
    raise ValueError(
      f"config.model_init={config.model_init} holds no MAGE model (keys {sorted(variables)}); "
      "a tokenizer export cannot initialise MAGE"
    )
  return layers.to_scan_layout(variables["model"]["params"], model.config.scan)


def export_params(
  directory: str, model: MAGE, params, tokenizer: VQGAN, tokenizer_vars, extra_meta=None, extra_variables=None
) -> None:
  """Params-only export in the converter's (loop) layout, consumed by generation and probing.

  `extra_variables` (e.g. MAGE-C's projection head) are stored beside 'model' and 'tokenizer'; binaries that do
  not know them ignore them.
  """
  params = layers.to_loop_layout(sharding.to_host(params), model.config.scan)
  meta = {
    "kind": "mage",
    "model": dataclasses.asdict(dataclasses.replace(model.config, scan=False)),
    "tokenizer": dataclasses.asdict(tokenizer.config),
    **(extra_meta or {}),
  }
  variables = {
    "model": {"params": params},
    "tokenizer": sharding.to_host(tokenizer_vars),
    **sharding.to_host(extra_variables or {}),
  }
  params_io.save(directory, variables, meta, overwrite=True)


def check_param_shapes(initial, abstract, source: str) -> None:
  """Raises ValueError naming (up to 10) missing, unexpected or mis-shaped params of `initial` vs `abstract`."""
  got = {optim.path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(initial)[0]}
  want = {optim.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  if problems:
    raise ValueError(f"params of {source} do not fit the model: " + "; ".join(problems[:10]))
