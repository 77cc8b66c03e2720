"""MAGE pretraining loop: mesh, sharded state, jitted step, clu logging, orbax checkpoints, preemption."""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from mage_jax import masking, optim, params_io, steps, trainer
from mage_jax.data import pipeline
from mage_jax.models import layers
from mage_jax.models.mage import MAGE, config_for
from mage_jax.models.vqgan import VQGAN, VQGANConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def tokenizer_config_from(cfg: ml_collections.ConfigDict, image_size: int) -> VQGANConfig:
  fields = {f.name for f in dataclasses.fields(VQGANConfig)}
  kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items() if k in fields}
  return VQGANConfig(**{**kw, "resolution": image_size})


def load_tokenizer(config: ml_collections.ConfigDict):
  """The frozen tokenizer: (module, variables on host). From `tokenizer.init` (a params dir holding a
  'tokenizer' tree: converted, exported from MAGE, or trained) or, when empty, seeded random weights."""
  tcfg, image_size = config.tokenizer, config.input.image_size
  # float32 activations with TF32-class convolutions by default: bf16 compute flips near-tied ids.
  kw = dict(dtype=_dtype(tcfg.get("dtype", "float32")), precision=tcfg.get("precision", "highest"))
  if tcfg.init:
    variables, meta = params_io.load(tcfg.init)
    if "tokenizer" not in variables:
      raise ValueError(f"{tcfg.init} holds no tokenizer params (kind {meta.get('kind')!r})")
    tok_config = VQGANConfig(**{**meta["tokenizer"], "ch_mult": tuple(meta["tokenizer"]["ch_mult"]),
                                "resolution": image_size})
    return VQGAN(tok_config, **kw), variables["tokenizer"]
  logging.warning("tokenizer.init is empty: using a frozen RANDOM tokenizer (fine for smoke tests only)")
  tok_config = tokenizer_config_from(tcfg, image_size)
  tokenizer = VQGAN(tok_config, **kw)
  side = 2 ** (len(tok_config.ch_mult) - 1)
  variables = jax.jit(tokenizer.init)(jax.random.key(config.seed + 1), jnp.zeros((1, side, side, 3)))
  return tokenizer, jax.device_get(nn.unbox(variables))


def mage_model(config: ml_collections.ConfigDict, tokenizer: VQGAN) -> MAGE:
  m = config.model
  num_tokens = (config.input.image_size // 2 ** (len(tokenizer.config.ch_mult) - 1)) ** 2
  overrides = {k: v for k, v in m.items() if k not in ("variant", "dtype", "param_dtype")}
  mcfg = config_for(m.variant, num_tokens=num_tokens, codebook_size=tokenizer.config.codebook_size,
                    max_position_embeddings=max(257, num_tokens + 1), **overrides)
  return MAGE(mcfg, dtype=_dtype(m.get("dtype", "float32")), param_dtype=_dtype(m.get("param_dtype", "float32")))


def export_params(directory: str, model: MAGE, params, tokenizer: VQGAN, tokenizer_vars, extra_meta=None,
                  extra_variables=None):
  """Params-only export in the converter's (loop) layout, consumed by generation and probing.

  `extra_variables` (e.g. MAGE-C's projection head) are stored beside 'model' and 'tokenizer'; binaries that do
  not know them ignore them.
  """
  params = layers.to_loop_layout(params_io.to_host(params), model.config.scan)
  meta = {"kind": "mage", "model": dataclasses.asdict(dataclasses.replace(model.config, scan=False)),
          "tokenizer": dataclasses.asdict(tokenizer.config), **(extra_meta or {})}
  variables = {"model": {"params": params}, "tokenizer": params_io.to_host(tokenizer_vars),
               **params_io.to_host(extra_variables or {})}
  params_io.save(directory, variables, meta, overwrite=True)


def pretrain_optimizer(config, total_steps: int, warmup_steps: int, frozen=None):
  """The spec §3 AdamW recipe from `config.optim` with lr = blr·batch/256; returns (tx, PretrainOptim)."""
  lr = optim.scaled_lr(config.optim.blr, config.input.batch_size)
  optim_cfg = optim.PretrainOptim(lr=lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                  min_lr=config.optim.min_lr, b1=config.optim.b1, b2=config.optim.b2,
                                  weight_decay=config.optim.weight_decay,
                                  grad_clip_norm=config.optim.grad_clip_norm or None)
  return optim.pretrain_optimizer(optim_cfg, frozen=frozen), optim_cfg


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) MAGE pretraining in `workdir`; returns the last logged metrics."""
  mesh, rules = trainer.mesh_and_rules(config)
  steps_per_epoch = pipeline.steps_per_epoch(config.input)
  total_steps, warmup_steps = trainer.schedule_steps(config, steps_per_epoch)
  tx, optim_cfg = pretrain_optimizer(config, total_steps, warmup_steps)
  tokenizer, tokenizer_vars = load_tokenizer(config)
  model = mage_model(config, tokenizer)
  logging.info("mesh %s, %d steps (%d per epoch), peak lr %.3g, warmup %d", dict(mesh.shape), total_steps,
               steps_per_epoch, optim_cfg.lr, warmup_steps)
  num_tokens = model.config.num_tokens

  def init_state(rng):
    plan, _ = masking.sample_plan(jax.random.key(0), 1, num_tokens, **config.masking)
    params = model.init(jax.random.fold_in(rng, 0), jnp.zeros((1, num_tokens), jnp.int32), plan)["params"]
    return steps.TrainState.create(params, tx, jax.random.key_data(jax.random.fold_in(rng, 1)))

  initial_params = None
  if config.get("model_init"):
    variables, _ = params_io.load(config.model_init)
    initial_params = layers.to_scan_layout(variables["model"]["params"], model.config.scan)

  task = trainer.Task(
      init_state=init_state,
      step=functools.partial(steps.pretrain_step, model=model, tokenizer=tokenizer, tx=tx,
                             masking_cfg=dict(config.masking), label_smoothing=config.label_smoothing,
                             schedule=optim_cfg.schedule(), tokenizer_chunks=config.tokenizer.get("chunks", 1)),
      extras=tokenizer_vars, batch_keys=("image",), total_steps=total_steps,
      export=lambda state: export_params(os.path.join(workdir, "params"), model, state.params, tokenizer,
                                         tokenizer_vars, {"train_steps": total_steps}),
      initial_params=initial_params,
      reinit_after_params=lambda state: state.replace(opt_state=tx.init(state.params)))
  return trainer.run(config, workdir, task, mesh, rules)
