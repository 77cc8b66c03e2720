"""Class-conditional MAGE (config.mode 'class_cond', paper Appendix A.2) fine-tuned from an unconditional checkpoint.

See `models/class_cond.py` for the model and its documented choices.
  * fine-tunes from an unconditional params checkpoint (`config.model_init`, required); the tokenizer comes from
    the same directory unless `config.tokenizer.init` is set;
  * encoder frozen twice over: `stop_gradient` in the model and the optimizer's `frozen=` patterns (so weight
    decay cannot move it either);
  * `config.class_cond.{num_classes, combine, label_drop_prob, guidance_scale}`; the step reads the pipeline's
    'label'. Out-of-range labels embed as NaN (jnp.take fill mode), so the non-finite check stops the run;
  * export: `builders.export_params` with the ClassCondConfig (so `meta['model']['num_classes']`),
    `meta['class_cond'] = True` and the label table at `variables['model']['params']['class_emb']`; then a PNG
    grid with one row per class (`config.class_cond.grid_*`) at `workdir/class_grid.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mage_jax.data import cached_tokens, images as image_io, pipeline
from mage_jax.generation import sampling
from mage_jax.models import layers
from mage_jax.models.class_cond import ENCODER_PARAM_PATTERNS, ClassCondMAGE, class_cond_config, init_class_embedding
from mage_jax.models.tokenizer import Tokenizer
from mage_jax.objectives import masked_tokens
from mage_jax.train import builders, params_io, sharding, steps, trainer

# Constants folded into the step key, one per use (masking and dropout match steps.pretrain_step).
_LABEL_DROP = 3  # beside masked_tokens.MASK_KEY and DROPOUT_KEY


def class_cond_loss(
  params,
  ids,
  labels,
  rng,
  *,
  model: ClassCondMAGE,
  masking_cfg: dict,
  label_smoothing: float,
  label_drop_prob: float = 0.0,
  deterministic: bool = False,
):
  """Masked-token loss of the class-conditional model.

  Args:
    params: ClassCondMAGE params.
    ids: int32 [B, N] tokenizer ids; labels: int [B] in [0, num_classes).
    rng: step key, as `masked_tokens.objective` folds it; label dropout fold_in(rng, 3).
    label_drop_prob: probability of replacing a label by the no-label id (trains the guidance branch).

  Returns:
    (loss, aux {'mask_ratio'}).
  """
  labels = labels.astype(jnp.int32)
  if label_drop_prob > 0:
    drop = jax.random.bernoulli(jax.random.fold_in(rng, _LABEL_DROP), label_drop_prob, labels.shape)
    labels = jnp.where(drop, model.config.null_class, labels)
  loss, aux = masked_tokens.objective(
    model,
    params,
    ids,
    rng,
    labels,
    masking_cfg=masking_cfg,
    label_smoothing=label_smoothing,
    deterministic=deterministic,
  )
  return loss, {"mask_ratio": aux["mask_ratio"]}


def class_cond_update(
  state: steps.TrainState,
  ids,
  labels,
  *,
  model,
  tx,
  masking_cfg: dict,
  label_smoothing: float,
  label_drop_prob: float = 0.0,
  schedule=None,
):
  """One class-conditional update from token ids int32 [B, N] and labels int [B] (no tokenizer)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  loss_fn = functools.partial(
    class_cond_loss,
    model=model,
    masking_cfg=masking_cfg,
    label_smoothing=label_smoothing,
    label_drop_prob=label_drop_prob,
  )
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, ids, labels, rng)
  return steps.finish_step(state, loss, grads, tx, schedule=schedule, metrics=aux)


def class_cond_step(state: steps.TrainState, tokenizer_vars, batch, *, tokenizer: Tokenizer, **update_kw):
  """One step on a global batch {'image': float [B, H, W, 3] in [0, 1], 'label': int [B]}."""
  ids = steps.tokenize(tokenizer, tokenizer_vars, batch["image"])
  return class_cond_update(state, ids, batch["label"], **update_kw)


def class_cond_logits_fn(model: ClassCondMAGE, params, labels, guidance_scale=None) -> Callable:
  """`sampling.decode` logits function: image tokens int32 [B, N] -> logits [B, N, V] for class `labels`.

  Args:
    model: ClassCondMAGE.
    params: its params (the 'params' collection).
    labels: int [B] (or scalar) class ids; None = unconditional.
    guidance_scale: classifier-free guidance w; None = the model config's default (0: guidance-free).
  """

  def fn(tokens):
    return model.apply({"params": params}, tokens, labels, guidance_scale, method=ClassCondMAGE.image_token_logits)

  return fn


def sample_classes(
  model: ClassCondMAGE,
  tokenizer: Tokenizer,
  variables,
  classes,
  per_class: int,
  *,
  seed: int = 0,
  num_steps: int = 12,
  choice_temperature: float = 4.5,
) -> np.ndarray:
  """`per_class` samples of each class id in `classes` (class k draws from fold_in(key(seed), k)), grouped by
  class: uint8 [len(classes) * per_class, H, W, 3]. Guidance: the model config's `guidance_scale`."""
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  mesh = sharding.data_mesh(per_class)
  return np.concatenate(
    [
      np.concatenate(
        list(
          sampling.generate_images(
            model,
            tokenizer,
            variables,
            jax.random.fold_in(jax.random.key(seed), int(k)),
            per_class,
            per_class,
            num_steps,
            choice_temperature,
            mesh,
            class_id=int(k),
          )
        )
      )
      for k in classes
    ]
  )


def write_class_grid(
  params_dir: str,
  out_path: str,
  *,
  num_classes: int | None = None,
  per_class: int = 8,
  seed: int = 0,
  num_steps: int = 12,
  choice_temperature: float = 4.5,
) -> str:
  """Samples a class-conditional checkpoint and writes a PNG grid, one row per class (the first `num_classes`).

  Every process samples (restoring is collective under multi-process orbax); process 0 writes the file.

  Returns:
    `out_path`.
  """
  meta = params_io.read_meta(params_dir)
  model, tokenizer = params_io.models_from_meta(meta)
  variables, _ = params_io.load(params_dir)
  shown = model.config.num_classes if num_classes is None else min(num_classes, model.config.num_classes)
  images = sample_classes(
    model,
    tokenizer,
    variables,
    range(shown),
    per_class,
    seed=seed,
    num_steps=num_steps,
    choice_temperature=choice_temperature,
  )
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    image_io.save_png(out_path, image_io.make_grid(images, cols=per_class, pad=2))
  return out_path


# Fields that describe the architecture (must match the init checkpoint), as opposed to runtime choices.
_RUNTIME_FIELDS = ("scan", "remat_policy", "attention", "dropout", "attn_dropout")


def check_architecture(model_config, meta: dict, source: str) -> None:
  """Raises ValueError naming every architecture field where `model_config` and the checkpoint meta differ."""
  fields = dict(meta.get("model") or {})
  if not fields:
    raise ValueError(
      f"{source} has no meta['model'] (kind={meta.get('kind')!r}); an unconditional MAGE params checkpoint is needed"
    )
  ours = dataclasses.asdict(model_config)
  diff = {
    k: (ours[k], v)
    for k, v in fields.items()
    if k in ours
    and k not in _RUNTIME_FIELDS
    and k not in ("num_classes", "class_combine", "guidance_scale")
    and (tuple(v) if isinstance(v, list) else v) != ours[k]
  }
  if diff:
    text = ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in sorted(diff.items()))
    raise ValueError(f"config.model does not match the init checkpoint {source}: {text}")


def _class_cond_initial_params(config, model: ClassCondMAGE, variables: dict) -> dict:
  params = dict(variables["model"]["params"])
  table = params.get("class_emb", {}).get("embedding")
  expected = (model.config.num_classes + 1, model.config.decoder_embed_dim)
  if table is None or tuple(table.shape) != expected:
    if table is not None:
      logging.warning(
        "init checkpoint's class_emb has shape %s, expected %s: re-initialising it", tuple(table.shape), expected
      )
    params["class_emb"] = jax.device_get(init_class_embedding(jax.random.key(config.seed + 2), model.config))
  return layers.to_scan_layout(params, model.config.scan)


def build_task(config: ml_collections.ConfigDict, workdir: str, *, abstract: bool = False):
  """(task, mesh, rules) of the class-conditional fine-tuning in `workdir` (`trainer`'s contract)."""
  cached_tokens.refuse_cached_input(config)
  if config.get("evals"):
    raise ValueError(
      f"config.evals ({', '.join(config.evals)}): class-conditional training runs no evaluator during training "
      "(its class grid comes at the end); empty the list"
    )
  cc = config.class_cond
  if not config.get("model_init") and not abstract:
    raise ValueError(
      "class-conditional training fine-tunes an unconditional MAGE: set config.model_init to its "
      "params directory (a pretraining export or python -m mage_jax.convert output)"
    )
  tok_config = config
  if not config.tokenizer.init and not abstract:
    tok_config = config.copy_and_resolve_references()
    tok_config.tokenizer.init = config.model_init  # the params dir holds the tokenizer MAGE was trained with
  tokenizer, tokenizer_vars = builders.frozen_tokenizer(tok_config, abstract)
  base = builders.mage_model(config, tokenizer)
  if not abstract:
    check_architecture(base.config, params_io.read_meta(config.model_init), config.model_init)
  model = ClassCondMAGE(
    class_cond_config(
      base.config, num_classes=cc.num_classes, class_combine=cc.combine, guidance_scale=cc.guidance_scale
    ),
    dtype=base.dtype,
    param_dtype=base.param_dtype,
  )
  if not 0.0 <= cc.label_drop_prob < 1.0:
    raise ValueError(f"class_cond.label_drop_prob must be in [0, 1), got {cc.label_drop_prob}")
  if cc.guidance_scale > 0 and cc.label_drop_prob == 0:
    logging.warning("guidance_scale > 0 but label_drop_prob = 0: the no-label embedding stays untrained")
  mesh, rules = trainer.mesh_and_rules(config)
  total_steps, warmup_steps = trainer.schedule_steps(config, lambda: pipeline.steps_per_epoch(config.input))
  tx, optim_cfg = builders.pretrain_optimizer(config, total_steps, warmup_steps, frozen=ENCODER_PARAM_PATTERNS)
  logging.info(
    "class-conditional: %d classes (%s), %d steps, peak lr %.3g, from %s",
    cc.num_classes,
    cc.combine,
    total_steps,
    optim_cfg.lr,
    config.model_init,
  )
  init_state = builders.mage_init_state(model, config.masking, tx, jnp.zeros((1,), jnp.int32))
  initial_params = None
  if not abstract:
    variables, _ = params_io.load(config.model_init)
    initial_params = _class_cond_initial_params(config, model, variables)
    builders.check_param_shapes(
      initial_params, sharding.strip_boxes(jax.eval_shape(init_state, jax.random.key(0)).params), config.model_init
    )
  params_dir = os.path.join(workdir, "params")
  task = trainer.Task(
    init_state=init_state,
    step=functools.partial(
      class_cond_step,
      tokenizer=tokenizer,
      model=model,
      tx=tx,
      masking_cfg=dict(config.masking),
      label_smoothing=config.label_smoothing,
      label_drop_prob=cc.label_drop_prob,
      schedule=optim_cfg.schedule(),
    ),
    extras=tokenizer_vars,
    data=trainer.image_data(config, abstract),
    batch_spec=trainer.image_batch_spec(config, label=jnp.int32),
    total_steps=total_steps,
    export=None
    if abstract
    else lambda state: builders.export_params(
      params_dir,
      model,
      state.params,
      tokenizer,
      tokenizer_vars,
      {"class_cond": True, "train_steps": total_steps, "init": os.path.abspath(config.model_init)},
    ),
    initial_params=initial_params,
    reinit_after_params=lambda state: state.replace(opt_state=tx.init(state.params)),
  )
  return task, mesh, rules


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes a class-conditional decoder on a frozen unconditional MAGE; returns the last logged metrics."""
  task, mesh, rules = build_task(config, workdir)
  metrics, _ = trainer.run(config, workdir, task, mesh, rules)
  cc, params_dir = config.class_cond, os.path.join(workdir, "params")
  if cc.grid_per_class > 0 and os.path.exists(os.path.join(params_dir, params_io.META_FILE)):
    path = write_class_grid(
      params_dir,
      os.path.join(workdir, "class_grid.png"),
      num_classes=cc.grid_num_classes,
      per_class=cc.grid_per_class,
      seed=config.seed,
      num_steps=cc.grid_num_steps,
      choice_temperature=cc.grid_temperature,
    )
    logging.info("class-conditional grid written to %s", path)
  return metrics
