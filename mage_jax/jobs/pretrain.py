"""MAGE pretraining (config.mode 'pretrain', recipe of the official `main_pretrain.py`) on the shared loop, measured
during training by the evaluators `config.evals` lists (`mage_jax/evals`: few-shot, samples, FID, ...).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from mage_jax import evals
from mage_jax.data import cached_tokens, pipeline
from mage_jax.train import builders, steps, trainer


def build_task(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  abstract: bool = False,
  stop_step: int | None = None,
  export_dir: str | None = None,
):
  """(task, mesh, rules) of MAGE pretraining in `workdir` (`trainer`'s contract; see `train_and_evaluate`)."""
  mesh, rules = trainer.mesh_and_rules(config)
  cache = cached_tokens.TokenCache(config.input.tokens) if config.input.get("tokens") and not abstract else None
  steps_per_epoch = (
    (lambda: cache.steps_per_epoch(config.input.batch_size))
    if cache
    else (lambda: pipeline.steps_per_epoch(config.input))
  )
  total_steps, warmup_steps = trainer.schedule_steps(config, steps_per_epoch)
  tx, optim_cfg = builders.pretrain_optimizer(config, total_steps, warmup_steps)
  tokenizer, tokenizer_vars = builders.frozen_tokenizer(config, abstract)
  model = builders.mage_model(config, tokenizer)
  update_kwargs = dict(
    model=model,
    tx=tx,
    masking_cfg=dict(config.masking),
    label_smoothing=config.label_smoothing,
    schedule=optim_cfg.schedule(),
  )
  num_tokens = model.config.num_tokens
  if config.input.get("tokens"):
    step, extras, data = functools.partial(steps.pretrain_ids_step, **update_kwargs), {}, trainer.no_data
    batch_spec = {"ids": ((config.input.batch_size, num_tokens), jnp.int32)}
    if cache:
      cache.check_tokenizer(cached_tokens.tokenizer_fingerprint(tokenizer, tokenizer_vars, config.tokenizer))
      data = cached_tokens.train_data(cache, seed=config.seed, batch_size=config.input.batch_size)
  else:
    step = functools.partial(
      steps.pretrain_step, tokenizer=tokenizer, tokenizer_chunks=config.tokenizer.get("chunks", 1), **update_kwargs
    )
    extras, batch_spec, data = tokenizer_vars, trainer.image_batch_spec(config), trainer.image_data(config, abstract)
  logging.info("mesh %s, %d steps, peak lr %.3g, warmup %d", dict(mesh.shape), total_steps, optim_cfg.lr, warmup_steps)

  def export(state):
    """Into `workdir/params` at the end of the run, and into `export_dir` wherever the run stops."""
    step = int(jax.device_get(state.step))
    directories = [os.path.join(workdir, "params")] if step == total_steps else []
    for directory in directories + ([export_dir] if export_dir else []):
      builders.export_params(directory, model, state.params, tokenizer, tokenizer_vars, {"train_steps": step})

  task = trainer.Task(
    init_state=builders.mage_init_state(model, config.masking, tx),
    step=step,
    extras=extras,
    data=data,
    batch_spec=batch_spec,
    total_steps=total_steps,
    stop_step=stop_step,
    export=None if abstract else export,
    initial_params=None if abstract else builders.initial_model_params(config, model),
    reinit_after_params=lambda state: state.replace(opt_state=tx.init(state.params)),
    evaluators=()
    if abstract
    else evals.during_training(
      config, evals.TrainingJob(config, workdir, mesh, total_steps, model, tokenizer, tokenizer_vars)
    ),
  )
  return task, mesh, rules


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, stop_step: int | None = None, export_dir: str | None = None
) -> dict:
  """Runs (or resumes) MAGE pretraining in `workdir`; returns the last logged metrics.

  With `config.input.tokens` (a token cache, see `cached_tokens`) the steps read cached ids instead of images.
  `stop_step` stops the run there with a checkpoint (the schedules still span the whole run; the next call
  resumes it), and `export_dir` then receives the params at that step (the reference run's evaluation points).
  """
  task, mesh, rules = build_task(config, workdir, stop_step=stop_step, export_dir=export_dir)
  metrics, state = trainer.run(config, workdir, task, mesh, rules)
  step = int(jax.device_get(state.step))
  if export_dir and step == stop_step and step < task.total_steps:  # the loop itself exports at the end only
    task.export(state)
  return metrics
