"""MAGE pretraining loop: mesh, sharded state, jitted step, clu logging, orbax checkpoints, preemption."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from mage_jax import checkpointing, masking, optim, params_io, sharding, steps
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
  dtype = _dtype(config.model.get("dtype", "float32"))
  if tcfg.init:
    variables, meta = params_io.load(tcfg.init)
    if "tokenizer" not in variables:
      raise ValueError(f"{tcfg.init} holds no tokenizer params (kind {meta.get('kind')!r})")
    tok_config = VQGANConfig(**{**meta["tokenizer"], "ch_mult": tuple(meta["tokenizer"]["ch_mult"]),
                                "resolution": image_size})
    return VQGAN(tok_config, dtype=dtype), variables["tokenizer"]
  logging.warning("tokenizer.init is empty: using a frozen RANDOM tokenizer (fine for smoke tests only)")
  tok_config = tokenizer_config_from(tcfg, image_size)
  tokenizer = VQGAN(tok_config, dtype=dtype)
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


def schedule_steps(config, steps_per_epoch: int) -> tuple[int, int]:
  total = config.total_steps if config.get("total_steps", 0) > 0 else int(config.total_epochs * steps_per_epoch)
  warmup = config.optim.warmup_steps if config.optim.get("warmup_steps", -1) >= 0 else int(
      config.optim.warmup_epochs * steps_per_epoch)
  if total <= 0:
    raise ValueError("set total_steps or total_epochs to a positive number")
  return total, min(warmup, total)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so the state is saved before exiting."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint before exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def export_params(directory: str, model: MAGE, params, tokenizer: VQGAN, tokenizer_vars, extra_meta=None):
  """Params-only export in the converter's (loop) layout, consumed by generation and probing."""
  params = jax.device_get(params)
  if model.config.scan:
    params = layers.unstack_block_params(layers.unstack_block_params(params, "blocks"), "decoder_blocks")
  meta = {"kind": "mage", "model": dataclasses.asdict(dataclasses.replace(model.config, scan=False)),
          "tokenizer": dataclasses.asdict(tokenizer.config), **(extra_meta or {})}
  params_io.save(directory, {"model": {"params": params}, "tokenizer": jax.device_get(tokenizer_vars)}, meta,
                 overwrite=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) pretraining in `workdir`; returns the last logged metrics."""
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.create_mesh([tuple(x) for x in config.mesh])
  rules = tuple(tuple(r) for r in config.sharding_rules) if config.get("sharding_rules") else sharding.DEFAULT_RULES
  sharding.check_batch_size(config.input.batch_size, mesh)
  source = pipeline.make_source(config.input)
  steps_per_epoch = pipeline.steps_per_epoch(config.input)
  total_steps, warmup_steps = schedule_steps(config, steps_per_epoch)
  lr = optim.scaled_lr(config.optim.blr, config.input.batch_size)
  optim_cfg = optim.PretrainOptim(lr=lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                  min_lr=config.optim.min_lr, b1=config.optim.b1, b2=config.optim.b2,
                                  weight_decay=config.optim.weight_decay,
                                  grad_clip_norm=config.optim.grad_clip_norm or None)
  tx = optim.pretrain_optimizer(optim_cfg)
  tokenizer, tokenizer_vars = load_tokenizer(config)
  model = mage_model(config, tokenizer)
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=True)
  logging.info("mesh %s, %d steps (%d per epoch), peak lr %.3g, warmup %d", dict(mesh.shape), total_steps,
               steps_per_epoch, lr, warmup_steps)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    num_tokens = model.config.num_tokens

    def init_state(rng):
      dummy = jnp.zeros((1, num_tokens), jnp.int32)
      plan, _ = masking.sample_plan(jax.random.key(0), 1, num_tokens, **config.masking)
      params = model.init(jax.random.fold_in(rng, 0), dummy, plan)["params"]
      return steps.TrainState.create(params, tx, jax.random.key_data(jax.random.fold_in(rng, 1)))

    boxed = jax.eval_shape(init_state, jax.random.key(config.seed))
    state_shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = sharding.strip_boxes(boxed)
    repl = sharding.replicated(mesh)
    tokenizer_vars = jax.device_put(tokenizer_vars, repl)

    mngr = checkpointing.manager(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    latest = checkpointing.latest_step(mngr)
    if latest is not None:
      logging.info("resuming from checkpoint step %d", latest)
      state = checkpointing.restore(mngr, latest,
                                    checkpointing.abstract_with_shardings(abstract, state_shardings))
    else:
      state = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=state_shardings)(
          jax.random.key(config.seed))
      if config.get("model_init"):
        variables, _ = params_io.load(config.model_init)
        params = variables["model"]["params"]
        if model.config.scan:
          params = layers.stack_block_params(layers.stack_block_params(params, "blocks"), "decoder_blocks")
        state = state.replace(params=jax.device_put(params, state_shardings.params))
        state = state.replace(opt_state=jax.jit(tx.init, out_shardings=state_shardings.opt_state)(state.params))
    start_step = int(jax.device_get(state.step))
    if is_main:
      parameter_overview.log_parameter_overview(jax.device_get(state.params))
      writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                            if isinstance(v, (int, float, str, bool))})

    step_fn = jax.jit(
        functools.partial(steps.pretrain_step, model=model, tokenizer=tokenizer, tx=tx,
                          masking_cfg=dict(config.masking), label_smoothing=config.label_smoothing,
                          schedule=optim_cfg.schedule()),
        in_shardings=(state_shardings, repl, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, repl), donate_argnums=(0,))

    data = pipeline.train_iterator(config.input, seed=config.seed, start_step=start_step,
                                   process_index=jax.process_index(), process_count=jax.process_count(),
                                   source=source)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
    hooks = [report]
    if is_main and config.get("profile_steps", 0) > 0:
      hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                            first_profile=start_step + 5))
    preemption = _Preemption()
    last_metrics: dict = {}
    try:
      for step in range(start_step, total_steps):
        batch = next(data)
        batch = sharding.global_batch({"image": batch["image"]}, mesh)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = step_fn(state, tokenizer_vars, batch)
        done = step + 1
        for hook in hooks:
          hook(done)
        save_now = done % config.checkpoint_every_steps == 0 or done == total_steps or preemption.requested
        if done % config.log_every_steps == 0 or save_now:
          _check_finite(state, config, mngr)
          last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          last_metrics["skipped_steps"] = int(jax.device_get(state.skipped_steps))
          writer.write_scalars(done, {f"train/{k}": v for k, v in last_metrics.items()})
        if save_now:
          checkpointing.save(mngr, done, state, force=True)
        if preemption.requested:
          mngr.wait_until_finished()
          logging.warning("checkpoint %d written after SIGTERM; exiting", done)
          break
    finally:
      preemption.restore()
      mngr.wait_until_finished()
      writer.flush()
    if int(jax.device_get(state.step)) == total_steps:
      export_params(os.path.join(workdir, "params"), model, state.params, tokenizer, tokenizer_vars,
                    {"train_steps": total_steps})
    mngr.close()
  return last_metrics


def _check_finite(state, config, mngr):
  first_bad = int(jax.device_get(state.first_nonfinite_step))
  if first_bad < 0:
    return
  skipped = int(jax.device_get(state.skipped_steps))
  if config.nonfinite == "skip":
    logging.warning("%d steps skipped so far for non-finite loss/gradients (first at step %d)", skipped,
                    first_bad)
    return
  raise FloatingPointError(
      f"non-finite loss or gradient at step {first_bad}; stopping (nonfinite='stop'). That update was not "
      f"applied and the last checkpoint (step {checkpointing.latest_step(mngr)}) is intact. Set "
      "--config.nonfinite=skip to skip such updates instead.")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
