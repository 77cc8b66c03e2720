"""End-to-end fine-tuning of a MAGE encoder for classification (`main_finetune.py`), on the shared `trainer` loop.

Recipe of `main_finetune.py` (LTH14/mage): the frozen VQGAN tokenises each (mixed) image, `MAGEViT` with
global pooling + a fresh trainable `fc_norm` + a Linear head (trunc-normal std 2e-5) is trained with AdamW
(0.9, 0.999, wd 0.05, no decay for 1-D params) under layer-wise lr decay (0.65 B / 0.75 L), warm-up + cosine
to 1e-6, drop path (0.1 B / 0.2 L), the token-embedding dropout (0.1) active, Mixup 0.8 / CutMix 1.0 in timm
batch mode with label smoothing 0.1 folded into soft targets, soft-target cross-entropy, no grad clipping.
Mixup runs on [0, 1] pixels BEFORE tokenisation (the reference mixes the normalised tensor, which commutes
with the affine normalisation, then denormalises before the VQGAN).

Augmentation: the timm transform of the reference, i.e. RandomResizedCrop (scale (0.2, 1), bicubic) + flip
+ RandAugment 'rand-m9-mstd0.5-inc1' (`input.rand_augment`, mage_jax/data/randaugment.py), no random erasing.

Resumable like every trainer job: re-running with the same workdir continues from the latest checkpoint
(saved every epoch by default). The final params are exported as a params-only checkpoint of kind 'vit'
(`<workdir>/params`), loadable by `probe.load_backbone` and `MAGEViT(head_type='linear')`. Run through
`python -m mage_jax.evaluate` with 'finetune' in `config.evals`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mage_jax.data import pipeline
from mage_jax.evals import probe
from mage_jax.models.tokenizer import Tokenizer
from mage_jax.models.vit import MAGEViT
from mage_jax.objectives import mixup
from mage_jax.train import config_views, optim, params_io, sharding, steps, trainer

HISTORY_FILE = "finetune_history.json"


def mixup_config(cfg: ml_collections.ConfigDict, num_classes: int) -> mixup.MixupConfig | None:
  """MixupConfig from `config.mixup`, or None when both alphas are 0 (label smoothing only)."""
  if cfg.mixup_alpha == 0 and cfg.cutmix_alpha == 0:
    return None
  return mixup.MixupConfig(
    mixup_alpha=cfg.mixup_alpha,
    cutmix_alpha=cfg.cutmix_alpha,
    prob=cfg.prob,
    switch_prob=cfg.switch_prob,
    label_smoothing=cfg.label_smoothing,
    num_classes=num_classes,
  )


def finetune_step(
  state: steps.TrainState,
  tokenizer_vars,
  batch,
  *,
  model: MAGEViT,
  tokenizer: Tokenizer,
  tx: optax.GradientTransformation,
  mix: mixup.MixupConfig | None,
  mix_groups: int,
  label_smoothing: float,
  schedule,
):
  """One step on a global batch {'image': [B,H,W,3] in [0,1], 'label': [B]}; pure (jitted by the trainer)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images, labels = batch["image"], batch["label"]
  if mix is not None:
    images, targets, _ = mixup.mix_batch(jax.random.fold_in(rng, 0), images, labels, mix, mix_groups)
  else:
    targets = mixup.smooth_one_hot(labels, model.num_classes, label_smoothing)
  ids = steps.tokenize(tokenizer, tokenizer_vars, images)

  def loss_fn(params):
    logits, _ = model.apply({"params": params}, ids, False, rngs={"dropout": jax.random.fold_in(rng, 1)})
    return mixup.soft_target_cross_entropy(logits, targets), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # Accuracy against the unmixed labels: only a rough training signal under mixup.
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return steps.finish_step(state, loss, grads, tx, schedule=schedule, metrics={"train_accuracy": acc})


def _counts(params, tokenizer_vars, images, labels, mask, *, model, tokenizer, k):
  ids = steps.tokenize(tokenizer, tokenizer_vars, images)
  logits, _ = model.apply({"params": params}, ids, True)
  top = jax.lax.top_k(logits.astype(jnp.float32), k)[1]
  hit1 = (top[:, 0] == labels) & mask
  hitk = jnp.any(top == labels[:, None], axis=1) & mask
  return jnp.sum(hit1), jnp.sum(hitk), jnp.sum(mask)


def make_evaluator(model: MAGEViT, tokenizer: Tokenizer, tokenizer_vars, eval_input: dict, mesh, workdir: str):
  """(state, step) -> {'top1', 'top5'} on the whole eval split (exact counts over the padded batches).

  Each result is also recorded in `<workdir>/finetune_history.json`, kept across resumes.
  """
  source = pipeline.make_source(eval_input)
  k = min(5, model.num_classes)
  counts = jax.jit(functools.partial(_counts, model=model, tokenizer=tokenizer, k=k))
  tok_vars = sharding.place(tokenizer_vars, sharding.replicated(mesh))
  history = trainer.History(os.path.join(workdir, HISTORY_FILE))

  def evaluate(state, step):
    c1 = ck = n = 0
    for b in pipeline.global_eval_batches(eval_input, mesh, source=source):
      r = jax.device_get(counts(state.params, tok_vars, b["image"], b["label"], b["_mask"]))
      c1, ck, n = c1 + int(r[0]), ck + int(r[1]), n + int(r[2])
    result = {"top1": c1 / n, "top5": ck / n}
    history.record(step, result)
    return result

  return evaluate


def resolved_config(config: ml_collections.ConfigDict, backbone: probe.Backbone) -> ml_collections.ConfigDict:
  """A copy with what is derived filled in: the backbone's image size, the total and warmup steps, and, where not
  set, per-epoch checkpoints and evals. The config the loop runs on; resolving it again changes nothing. The
  dataset is read once, and only where an epoch count is used."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.input.image_size = backbone.image_size
    steps_per_epoch = functools.cache(lambda: pipeline.steps_per_epoch(c.input))
    c.total_steps, c.optim.warmup_steps = trainer.schedule_steps(c, steps_per_epoch)
    for key in ("checkpoint_every_steps", "eval_every_steps"):
      if c.get(key, 0) <= 0:
        c[key] = steps_per_epoch()
  return c


def initial_params(model: MAGEViT, backbone_params: dict, num_tokens: int, seed: int) -> dict:
  """A fresh MAGEViT init (head, fc_norm) overwritten by the pretrained backbone params (host numpy)."""
  fresh = jax.device_get(
    nn.unbox(jax.jit(model.init)(jax.random.key(seed + 7), jnp.zeros((1, num_tokens), jnp.int32))["params"])
  )
  for k, v in backbone_params.items():
    if k not in fresh:
      raise ValueError(f"pretrained param {k!r} does not exist in the fine-tune model")
    shapes_new = jax.tree.map(np.shape, fresh[k])
    shapes_old = jax.tree.map(np.shape, v)
    if shapes_new != shapes_old:
      raise ValueError(f"pretrained param {k!r} has shapes {shapes_old}, the model expects {shapes_new}")
    fresh[k] = jax.tree.map(np.asarray, v)
  return fresh


def build_task(config: ml_collections.ConfigDict, workdir: str, backbone: probe.Backbone, *, abstract: bool = False):
  """(task, mesh, rules) of fine-tuning `backbone` (`probe.load_backbone`, or abstract variables with `abstract`)
  in `workdir` (`trainer`'s contract); the loop runs on `resolved_config(config, backbone)`."""
  compute_dtype = config_views.dtype(config.dtype)
  mcfg = backbone.vit.config
  model = MAGEViT(
    mcfg,
    num_classes=config.num_classes,
    global_pool=config.global_pool,
    head_type="linear",
    head_init_std=config.head_init_std,
    drop_path=config.drop_path,
    dtype=compute_dtype,
  )
  cfg = resolved_config(config, backbone)
  mesh, rules = trainer.mesh_and_rules(cfg)
  total, warmup = cfg.total_steps, cfg.optim.warmup_steps
  o = cfg.optim
  ocfg = optim.FinetuneOptim(
    lr=optim.scaled_lr(o.blr, cfg.input.batch_size),
    total_steps=total,
    warmup_steps=warmup,
    depth=mcfg.depth,
    layer_decay=o.layer_decay,
    min_lr=o.min_lr,
    b1=o.b1,
    b2=o.b2,
    weight_decay=o.weight_decay,
  )
  tx = optim.finetune_optimizer(ocfg)
  mix = mixup_config(cfg.mixup, config.num_classes)
  group = cfg.mixup.get("group_size", 0)
  mix_groups = cfg.input.batch_size // group if group else 1
  if mix is not None and (cfg.input.batch_size % max(mix_groups, 1) or (cfg.input.batch_size // mix_groups) % 2):
    raise ValueError(
      f"batch {cfg.input.batch_size} must split into mixup groups of mixup.group_size={group} "
      "(even, dividing the batch)"
    )
  logging.info(
    "fine-tune: %d steps, peak lr %.3g, warmup %d, layer decay %.2f",
    total,
    ocfg.lr,
    warmup,
    o.layer_decay,
  )

  def init_state(rng):
    params = model.init(jax.random.fold_in(rng, 0), jnp.zeros((1, mcfg.num_tokens), jnp.int32))["params"]
    return steps.TrainState.create(params, tx, jax.random.key_data(jax.random.fold_in(rng, 1)))

  tokenizer_vars = backbone.variables["tokenizer"]

  def export(state):
    meta = {
      "kind": "vit",
      "model": dataclasses.asdict(mcfg),
      "tokenizer": dataclasses.asdict(backbone.tokenizer.config),
      "vit": {"num_classes": config.num_classes, "global_pool": config.global_pool, "head_type": "linear"},
      "finetune_steps": total,
    }
    params_io.save(
      os.path.join(workdir, "params"),
      {"model": {"params": jax.device_get(state.params)}, "tokenizer": tokenizer_vars},
      meta,
      overwrite=True,
    )

  evaluators = ()
  if not abstract:
    eval_input = pipeline.eval_input_config(cfg.input, split=cfg.eval_split, batch_size=cfg.eval_batch_size)
    validation = make_evaluator(model, backbone.tokenizer, tokenizer_vars, eval_input, mesh, workdir)
    evaluators = (trainer.Evaluator("validation", validation, cfg.eval_every_steps),)
  task = trainer.Task(
    init_state=init_state,
    step=functools.partial(
      finetune_step,
      model=model,
      tokenizer=backbone.tokenizer,
      tx=tx,
      mix=mix,
      mix_groups=mix_groups,
      label_smoothing=cfg.mixup.label_smoothing,
      schedule=ocfg.schedule(),
    ),
    extras=tokenizer_vars,
    data=trainer.image_data(cfg, abstract),
    batch_spec=trainer.image_batch_spec(cfg, label=jnp.int32),
    total_steps=total,
    export=None if abstract else export,
    initial_params=None
    if abstract
    else initial_params(model, backbone.variables["vit"]["params"], mcfg.num_tokens, cfg.seed),
    reinit_after_params=lambda state: state.replace(opt_state=tx.init(state.params)),
    evaluators=evaluators,
  )
  return task, mesh, rules


def run(config: ml_collections.ConfigDict, params_dir: str, workdir: str) -> dict:
  """Fine-tunes (or resumes) the MAGE encoder of `params_dir` in `workdir`.

  Args:
    config: the `finetune` section (see configs/finetune_imagenet.py): trainer keys (seed, mesh,
      sharding_rules, input, total_epochs|total_steps, log/checkpoint/eval cadence, ...) plus num_classes,
      global_pool, drop_path, head_init_std, dtype, optim {blr, warmup_epochs, min_lr, layer_decay,
      weight_decay, b1, b2}, mixup {mixup_alpha, cutmix_alpha, prob, switch_prob, label_smoothing,
      group_size}, eval_split, eval_batch_size.
    params_dir: params-only MAGE (or ViT) checkpoint.
    workdir: checkpoints, logs, `finetune_history.json`, and the final `params` export.

  Returns:
    {'top1', 'top5' (last eval), 'best_top1', 'steps', 'completed', 'history'}.
  """
  backbone = probe.load_backbone(
    params_dir,
    global_pool=config.global_pool,
    dtype=config_views.dtype(config.dtype),
    image_size=config.input.get("image_size") or None,
  )
  config = resolved_config(config, backbone)
  task, mesh, rules = build_task(config, workdir, backbone)
  total = task.total_steps
  last, _ = trainer.run(config, workdir, task, mesh, rules)
  history = trainer.History(os.path.join(workdir, HISTORY_FILE)).read()
  if not history:
    raise RuntimeError(f"fine-tuning in {workdir} produced no evaluation")
  done = history[-1]["step"]
  return {
    "top1": history[-1]["top1"],
    "top5": history[-1]["top5"],
    "best_top1": max(h["top1"] for h in history),
    "steps": done,
    "completed": done >= total,
    "train_loss": last.get("loss"),
    "history": history,
  }
