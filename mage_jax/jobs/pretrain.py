"""MAGE pretraining (config.mode 'pretrain', recipe of the official `main_pretrain.py`) on the shared loop, with
a few-shot monitor.

The monitor (`config.fewshot_monitor`, every `config.eval_every_steps` steps and at the end) is big_vision's
cheap representation check: frozen encoder features (global pool, as the linear probe) of a small labelled
train and test split, closed-form ridge few-shot on the host, written as `eval/fewshot_<k>shot`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from mage_jax.data import cached_tokens, pipeline
from mage_jax.evals import fewshot, probe
from mage_jax.models.mage import MAGE
from mage_jax.models.vit import MAGEViT
from mage_jax.models.vqgan import VQGAN
from mage_jax.train import builders, sharding, steps, trainer


def fewshot_monitor(
  config: ml_collections.ConfigDict,
  model: MAGE,
  tokenizer: VQGAN,
  tokenizer_vars,
  mesh,
  params_of=lambda state: state.params,
):
  """`Task.evaluate` of MAGE-like jobs, or None when `config.fewshot_monitor` names no splits.

  `config.fewshot_monitor`: train_split / test_split (empty: off), shots, trials, batch_size (global extraction
  batch), num_classes (0: from the labels). `params_of(state)` gives the MAGE params of the job's state.
  """
  m = config.get("fewshot_monitor")
  if m is None or not m.train_split or not m.test_split:
    return None
  vit = MAGEViT(
    dataclasses.replace(model.config, scan=False), num_classes=0, global_pool=True, head_type="none", dtype=model.dtype
  )
  feature_fn = probe.make_feature_fn(tokenizer, vit)
  inputs = {
    split: pipeline.eval_input_config(config.input, split=split, batch_size=m.batch_size)
    for split in (m.train_split, m.test_split)
  }
  sources = {split: pipeline.make_source(cfg) for split, cfg in inputs.items()}

  def evaluate(state, step):
    del step
    backbone = probe.backbone_params_from_mage(params_of(state), global_pool=True)
    variables = {"tokenizer": tokenizer_vars, "vit": {"params": backbone}}
    # Params stay where the training state keeps them; host arrays (the tokenizer, a fresh fc_norm) replicate.
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else sharding.replicated(mesh), variables)
    feats = {
      split: probe.extract_features(feature_fn, variables, shardings, inputs[split], mesh=mesh, source=sources[split])
      for split in inputs
    }
    (train_x, train_y), (test_x, test_y) = feats[m.train_split], feats[m.test_split]
    accs = fewshot.evaluate_fewshot(
      train_x,
      train_y,
      test_x,
      test_y,
      shots=tuple(m.shots),
      trials=m.trials,
      seed=config.seed,
      classifier="ridge",
      num_classes=m.num_classes or None,
    )
    return {f"fewshot_{s}shot": mean for s, (mean, _) in accs.items()}

  return evaluate


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
    if cache:
      cache.check_tokenizer(cached_tokens.tokenizer_fingerprint(tokenizer, tokenizer_vars, config.tokenizer))
    step, extras = functools.partial(steps.pretrain_ids_step, **update_kwargs), {}
    batch_spec = {"ids": ((config.input.batch_size, num_tokens), jnp.int32)}
    data = trainer.no_data
    if cache:
      data = cached_tokens.train_data(cache, seed=config.seed, batch_size=config.input.batch_size)
  else:
    step = functools.partial(
      steps.pretrain_step, tokenizer=tokenizer, tokenizer_chunks=config.tokenizer.get("chunks", 1), **update_kwargs
    )
    extras, batch_spec, data = tokenizer_vars, trainer.image_batch_spec(config), trainer.image_data(config, abstract)
  logging.info("mesh %s, %d steps, peak lr %.3g, warmup %d", dict(mesh.shape), total_steps, optim_cfg.lr, warmup_steps)

  def export(state):
    step = int(jax.device_get(state.step))
    meta = {"train_steps": step}
    directories = [os.path.join(workdir, "params")] if step == total_steps else []
    for directory in directories + ([export_dir] if export_dir else []):
      builders.export_params(directory, model, state.params, tokenizer, tokenizer_vars, meta)

  task = trainer.Task(
    init_state=builders.mage_init_state(model, config.masking, tx),
    step=step,
    extras=extras,
    data=data,
    batch_keys=tuple(batch_spec),
    batch_spec=batch_spec,
    total_steps=total_steps,
    stop_step=stop_step,
    export=None if abstract else export,
    initial_params=None if abstract else builders.initial_model_params(config, model),
    reinit_after_params=lambda state: state.replace(opt_state=tx.init(state.params)),
    evaluate=None if abstract else fewshot_monitor(config, model, tokenizer, tokenizer_vars, mesh),
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
  metrics, _ = trainer.run(config, workdir, task, mesh, rules)
  return metrics
