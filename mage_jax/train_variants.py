"""Training variants: MAGE-C (contrastive co-training, spec §4) and class-conditional MAGE (spec §5.4).

`train_and_evaluate(config, workdir)` dispatches on `config.mode` ('mage_c' | 'class_cond'); both jobs run in the
shared loop (`trainer.run`) exactly like MAGE pretraining (`train.py`), and both export params-only checkpoints
that the generation and probing binaries read (`variables['model']['params']` + `variables['tokenizer']`).

MAGE-C (spec §4; the code was never released, so every default not in the spec is ASSUMED and configurable):
  * two views per image, made ON DEVICE inside the step from the pipeline's image (`config.input.augment='none'`,
    `crop_ratio=1.0`: the full image resized to the training size). Each view is an independent torchvision-style
    RandomResizedCrop + horizontal flip (`config.views`, the same crop law as MAGE pretraining), optionally with
    colour jitter / grayscale (off by default: MAGE-C is said to need less augmentation than SimCLR, unverified).
    Doing it on device keeps the shared input pipeline unchanged; the cost is that crops come from the
    resized image rather than the original file (for ImageNet: the 256 px centre square);
  * both views are tokenised by the frozen VQGAN and masked with MAGE's masking (one plan over the 2B rows, so
    one masking ratio per step, independent token orders per view), and go through MAGE as one 2B batch;
  * reconstruction loss: MAGE's masked-token cross-entropy over the masked tokens of both views;
  * contrastive loss: pool the encoder output (`pool`: 'mean' over the image-token outputs, the default; 'cls' =
    the class slot; 'mean_visible' = only positions whose token was visible), a `contrastive.ProjectionHead`, then
    SimCLR NT-Xent (`contrastive.nt_xent`, 2N-2 negatives) at temperature `temperature` on the GLOBAL batch: the
    step is jitted on global arrays, so the partitioner gathers the negatives from every device and host;
  * loss = rec + lam * con. Defaults (ASSUMED): lam 0.1, temperature 0.1, head Dense(2048)-ReLU-Dense(128);
  * export: the MAGE params in the pretraining layout plus `variables['projection_head']` (ignored by probing and
    generation) and `meta['mage_c']` with the contrastive settings.

Class-conditional (spec §5.4; see `models/class_cond.py` for the model and its documented choices):
  * fine-tunes from an unconditional params checkpoint (`config.model_init`, required); the tokenizer comes from
    the same directory unless `config.tokenizer.init` is set;
  * encoder frozen twice over: `stop_gradient` in the model and the optimizer's `frozen=` patterns (so weight
    decay cannot move it either);
  * `config.class_cond.{num_classes, combine, label_drop_prob, guidance_scale}`; the step reads the pipeline's
    'label'. Out-of-range labels embed as NaN (jnp.take fill mode), so the non-finite check stops the run;
  * export: `train.export_params` with the ClassCondConfig (so `meta['model']['num_classes']`), `meta['class_cond']
    = True` and the label table at `variables['model']['params']['class_emb']`; then a PNG grid with one row per
    class (`config.class_cond.grid_*`) at `workdir/class_grid.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mage_jax import checkpoint_models, contrastive, images as image_io, losses, masking, optim, params_io
from mage_jax import sampling, sharding, steps, train, trainer
from mage_jax.data import pipeline
from mage_jax.models import layers
from mage_jax.models.class_cond import ENCODER_PARAM_PATTERNS, ClassCondMAGE
from mage_jax.models.class_cond import class_cond_config, init_class_embedding
from mage_jax.models.mage import MAGE
from mage_jax.models.vqgan import VQGAN

POOL_MODES = ("mean", "cls", "mean_visible")
RESIZE_METHODS = ("linear", "bilinear", "cubic", "bicubic", "lanczos3", "lanczos5")
_NUM_CROP_TRIES = 10  # torchvision RandomResizedCrop.get_params

# Constants folded into the step key, one per use (masking and dropout match steps.pretrain_step).
_MASK, _DROPOUT, _VIEWS, _LABEL_DROP = 0, 1, 2, 3


def _from_mapping(cls, cfg: Any, what: str):
  """Dataclass `cls` from a ConfigDict / mapping / instance; unknown keys are an error."""
  if isinstance(cfg, cls):
    return cfg
  values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {}))
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"unknown {what} keys {unknown}; known: {sorted(fields)}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ------------------------------------------------------------------------------------------------------------
# Two augmented views, on device.


@dataclasses.dataclass(frozen=True)
class ViewAugment:
  """Per-view augmentation of MAGE-C (`config.views`). Defaults: MAGE's pretraining crop + flip (ASSUMED).

  Attributes:
    scale: RandomResizedCrop area fraction range.
    ratio: RandomResizedCrop aspect-ratio (w/h) range, sampled log-uniformly.
    flip: random horizontal flip with probability 0.5.
    method: `jax.image.scale_and_translate` kernel ('cubic' = Keys a=-0.5, as PIL bicubic), antialiased.
    jitter_prob: probability of applying colour jitter (SimCLR: 0.8); 0 disables it.
    brightness, contrast, saturation: jitter strengths s (factor ~ U[max(0, 1-s), 1+s]), torchvision meaning,
      applied in this fixed order (no hue: it needs an HSV round trip).
    grayscale_prob: probability of converting the view to grayscale (SimCLR: 0.2).
  """
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip: bool = True
  method: str = "cubic"
  jitter_prob: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  grayscale_prob: float = 0.0

  def __post_init__(self):
    if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
      raise ValueError(f"views.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
    if not 0.0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f"views.ratio must satisfy 0 < min <= max, got {self.ratio}")
    if self.method not in RESIZE_METHODS:
      raise ValueError(f"views.method must be one of {RESIZE_METHODS}, got {self.method!r}")
    for name in ("jitter_prob", "grayscale_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"views.{name} must be in [0, 1], got {getattr(self, name)}")
    for name in ("brightness", "contrast", "saturation"):
      if getattr(self, name) < 0:
        raise ValueError(f"views.{name} must be >= 0, got {getattr(self, name)}")


def crop_box(rng: jax.Array, height: int, width: int, scale, ratio) -> jax.Array:
  """torchvision `RandomResizedCrop.get_params` for one image: 10 tries, then the clamped central crop.

  Returns:
    int32 [4] = (top, left, crop_height, crop_width), the crop inside the image.
  """
  u = jax.random.uniform(rng, (4, _NUM_CROP_TRIES), jnp.float32)
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[1])
  cw = jnp.round(jnp.sqrt(area * aspect))
  ch = jnp.round(jnp.sqrt(area / aspect))
  valid = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
  first = jnp.argmax(valid)
  ok = jnp.any(valid)
  in_ratio = width / height
  fb_w = float(round(height * ratio[1])) if in_ratio > ratio[1] else float(width)
  fb_h = float(round(width / ratio[0])) if in_ratio < ratio[0] else float(height)
  cw = jnp.where(ok, cw[first], fb_w)
  ch = jnp.where(ok, ch[first], fb_h)
  top = jnp.where(ok, jnp.floor(u[2, first] * (height - ch + 1)), jnp.floor((height - ch) / 2))
  left = jnp.where(ok, jnp.floor(u[3, first] * (width - cw + 1)), jnp.floor((width - cw) / 2))
  return jnp.stack([top, left, ch, cw]).astype(jnp.int32)


def crop_and_resize(image: jax.Array, box: jax.Array, out_hw: tuple[int, int], method: str = "cubic") -> jax.Array:
  """Resamples the crop `box` (top, left, h, w) of float [H, W, C] to [out_h, out_w, C], clipped to [0, 1].

  Static output shape for any box: the crop is expressed as a scale and translation of the whole image
  (pixel edges: output edge 0 maps to `top`/`left`, output edge `out_h`/`out_w` to `top + h`/`left + w`).
  Antialiased when shrinking, like PIL.
  """
  box = box.astype(jnp.float32)
  scale = jnp.stack([out_hw[0] / box[2], out_hw[1] / box[3]])
  translation = -box[:2] * scale
  out = jax.image.scale_and_translate(image.astype(jnp.float32), (*out_hw, image.shape[-1]), (0, 1), scale,
                                      translation, method=method, antialias=True)
  # Cubic/lanczos kernels overshoot; the pipeline's crops are clipped the same way.
  return jnp.clip(out, 0.0, 1.0)


def _gray(x: jax.Array) -> jax.Array:
  """ITU-R 601 luma of [H, W, 3], kept as [H, W, 1] (torchvision rgb_to_grayscale)."""
  return (0.299 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3])


def color_jitter(rng: jax.Array, x: jax.Array, cfg: ViewAugment) -> jax.Array:
  """Brightness, contrast, saturation jitter (fixed order) with prob `jitter_prob`, then grayscale."""
  k_apply, k_b, k_c, k_s, k_g = jax.random.split(rng, 5)

  def factor(key, s):
    return jax.random.uniform(key, (), jnp.float32, max(0.0, 1.0 - s), 1.0 + s)

  y = x
  if cfg.brightness > 0:
    y = jnp.clip(y * factor(k_b, cfg.brightness), 0.0, 1.0)
  if cfg.contrast > 0:
    y = jnp.clip(jnp.mean(_gray(y)) + (y - jnp.mean(_gray(y))) * factor(k_c, cfg.contrast), 0.0, 1.0)
  if cfg.saturation > 0:
    y = jnp.clip(_gray(y) + (y - _gray(y)) * factor(k_s, cfg.saturation), 0.0, 1.0)
  x = jnp.where(jax.random.uniform(k_apply) < cfg.jitter_prob, y, x)
  if cfg.grayscale_prob > 0:
    x = jnp.where(jax.random.uniform(k_g) < cfg.grayscale_prob, jnp.broadcast_to(_gray(x), x.shape), x)
  return x


def augment_view(rng: jax.Array, image: jax.Array, cfg: ViewAugment) -> jax.Array:
  """One random view of float [H, W, 3] in [0, 1], same shape."""
  k_crop, k_flip, k_color = jax.random.split(rng, 3)
  height, width = image.shape[:2]
  box = crop_box(k_crop, height, width, cfg.scale, cfg.ratio)
  out = crop_and_resize(image, box, (height, width), cfg.method)
  if cfg.flip:
    out = jnp.where(jax.random.uniform(k_flip) < 0.5, out[:, ::-1], out)
  if cfg.jitter_prob > 0 or cfg.grayscale_prob > 0:
    out = color_jitter(k_color, out, cfg)
  return out


def two_views(rng: jax.Array, images: jax.Array, cfg: ViewAugment) -> tuple[jax.Array, jax.Array]:
  """Two independent views of every image of float [B, H, W, 3]. Pure function of (rng, row index)."""
  keys = jax.random.split(rng, (2, images.shape[0]))
  aug = jax.vmap(lambda k, im: augment_view(k, im, cfg))
  return aug(keys[0], images), aug(keys[1], images)


# ------------------------------------------------------------------------------------------------------------
# MAGE-C.


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  """`config.contrastive` (every default ASSUMED, spec §4/§9.1).

  Attributes:
    lam: weight of the contrastive term, loss = rec + lam * con.
    temperature: NT-Xent temperature.
    pool: 'mean' (image-token outputs, class slot excluded), 'cls', or 'mean_visible' (visible tokens only).
    hidden_dim, out_dim, num_layers, norm: the `contrastive.ProjectionHead` ('none' | 'layer'; 'batch' would
      need mutable batch statistics in the train state, which it does not carry).
  """
  lam: float = 0.1
  temperature: float = contrastive.DEFAULT_TEMPERATURE
  pool: str = "mean"
  hidden_dim: int = contrastive.DEFAULT_HIDDEN_DIM
  out_dim: int = contrastive.DEFAULT_OUT_DIM
  num_layers: int = 2
  norm: str = "none"

  def __post_init__(self):
    if self.lam < 0:
      raise ValueError(f"contrastive.lam must be >= 0, got {self.lam}")
    if not self.temperature > 0:
      raise ValueError(f"contrastive.temperature must be > 0, got {self.temperature}")
    if self.pool not in POOL_MODES:
      raise ValueError(f"contrastive.pool must be one of {POOL_MODES}, got {self.pool!r}")
    if self.norm not in ("none", "layer"):
      raise ValueError(f"contrastive.norm must be 'none' or 'layer' (BatchNorm statistics are not part of the "
                       f"train state), got {self.norm!r}")
    if self.num_layers < 1 or self.hidden_dim < 1 or self.out_dim < 1:
      raise ValueError(f"contrastive head sizes must be >= 1, got num_layers={self.num_layers}, "
                       f"hidden_dim={self.hidden_dim}, out_dim={self.out_dim}")

  def head(self, dtype=jnp.float32, param_dtype=jnp.float32) -> contrastive.ProjectionHead:
    return contrastive.ProjectionHead(hidden_dim=self.hidden_dim, out_dim=self.out_dim, num_layers=self.num_layers,
                                      norm=self.norm, dtype=dtype, param_dtype=param_dtype)


def pool_encoded(encoded: jax.Array, plan: masking.MaskPlan, mode: str) -> jax.Array:
  """Pools the encoder output of a masked pass.

  Args:
    encoded: [B, K, D] encoder output; row k holds sequence position `plan.keep_idx[:, k]` (0 = class slot).
    plan: the masking plan of the pass.
    mode: 'mean' | 'cls' | 'mean_visible'.

  Returns:
    float32 [B, D].
  """
  if mode == "mean_visible":
    visible = ~jnp.take_along_axis(plan.masked, plan.keep_idx[:, 1:] - 1, axis=1)
    return contrastive.pool_tokens(encoded, "mean", valid=visible)
  return contrastive.pool_tokens(encoded, mode)


def mage_c_loss(params, ids, rng, *, model: MAGE, head: nn.Module, cfg: ContrastiveConfig, masking_cfg: dict,
                label_smoothing: float, deterministic: bool = False):
  """MAGE-C objective on the tokens of both views.

  Args:
    params: {'model': MAGE params, 'projection_head': head params}.
    ids: int32 [2B, N]: rows 0..B-1 are view 1 and rows B..2B-1 view 2 of the same B images (row i pairs with
      row B+i).
    rng: step key; masking uses fold_in(rng, 0) (one ratio for the 2B rows), dropout fold_in(rng, 1).

  Returns:
    (loss, aux) with loss = rec + lam * con (float32 scalar), aux {'rec_loss', 'con_loss', 'mask_ratio'}.
  """
  plan, ratio = masking.sample_plan(jax.random.fold_in(rng, _MASK), ids.shape[0], ids.shape[1], **masking_cfg)
  logits, aux = model.apply({"params": params["model"]}, ids, plan, deterministic,
                            rngs={"dropout": jax.random.fold_in(rng, _DROPOUT)})
  rec = losses.masked_token_loss(logits, ids, plan.masked, codebook_size=model.config.codebook_size,
                                 label_smoothing=label_smoothing)
  z = head.apply({"params": params["projection_head"]}, pool_encoded(aux["encoded"], plan, cfg.pool))
  z1, z2 = jnp.split(z, 2, axis=0)
  con = contrastive.nt_xent(z1, z2, cfg.temperature)
  return rec + cfg.lam * con, {"rec_loss": rec, "con_loss": con, "mask_ratio": ratio}


def mage_c_update(state: steps.TrainState, ids, *, model, head, tx, cfg: ContrastiveConfig, masking_cfg: dict,
                  label_smoothing: float, schedule=None):
  """One MAGE-C update from the token ids of both views (int32 [2B, N], see `mage_c_loss`)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  loss_fn = functools.partial(mage_c_loss, model=model, head=head, cfg=cfg, masking_cfg=masking_cfg,
                              label_smoothing=label_smoothing)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, ids, rng)
  return steps.finish_step(state, loss, grads, tx, schedule=schedule, metrics=aux)


def mage_c_step(state: steps.TrainState, tokenizer_vars, batch, *, tokenizer: VQGAN, views: ViewAugment,
                **update_kw):
  """One MAGE-C step on a global batch {'image': float [B, H, W, 3] in [0, 1]}: views, tokens, update."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  view1, view2 = two_views(jax.random.fold_in(rng, _VIEWS), batch["image"], views)
  ids = steps.tokenize(tokenizer, tokenizer_vars, jnp.concatenate([view1, view2], axis=0))
  return mage_c_update(state, ids, **update_kw)


def export_mage_c(directory: str, model: MAGE, params, tokenizer: VQGAN, tokenizer_vars, cfg: ContrastiveConfig,
                  extra_meta: dict | None = None) -> None:
  """`train.export_params` layout (kind 'mage') plus `variables['projection_head']` and `meta['mage_c']`."""
  train.export_params(directory, model, params["model"], tokenizer, tokenizer_vars,
                      {"mage_c": dataclasses.asdict(cfg), **(extra_meta or {})},
                      extra_variables={"projection_head": {"params": params["projection_head"]}})


def _dtypes(config) -> tuple[Any, Any]:
  """(compute dtype, param dtype) of config.model."""
  m = config.model
  return train.DTYPES[m.get("dtype", "float32")], train.DTYPES[m.get("param_dtype", "float32")]


def train_mage_c(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) MAGE-C in `workdir`; returns the last logged metrics."""
  cfg = _from_mapping(ContrastiveConfig, config.contrastive, "config.contrastive")
  views = _from_mapping(ViewAugment, config.views, "config.views")
  if config.input.batch_size < 2:
    raise ValueError(f"MAGE-C needs a global batch of at least 2 images (for negatives), got "
                     f"{config.input.batch_size}")
  if config.input.get("augment", "pretrain") != "none":
    logging.warning("MAGE-C makes its views on device; input.augment=%r adds a second crop before them "
                    "(the configs use 'none')", config.input.augment)
  mesh, rules = trainer.mesh_and_rules(config)
  total_steps, warmup_steps = trainer.schedule_steps(config, pipeline.steps_per_epoch(config.input))
  tx, optim_cfg = train.pretrain_optimizer(config, total_steps, warmup_steps)
  tokenizer, tokenizer_vars = train.load_tokenizer(config)
  model = train.mage_model(config, tokenizer)
  head = cfg.head(*_dtypes(config))
  num_tokens, embed_dim = model.config.num_tokens, model.config.embed_dim
  logging.info("MAGE-C: %d steps, peak lr %.3g, lam %g, temperature %g, pool %s", total_steps, optim_cfg.lr,
               cfg.lam, cfg.temperature, cfg.pool)

  def init_head(rng):
    return head.init(jax.random.fold_in(rng, 2), jnp.zeros((1, embed_dim), jnp.float32))["params"]

  def init_state(rng):
    plan, _ = masking.sample_plan(jax.random.key(0), 1, num_tokens, **config.masking)
    # fold_in(rng, 0/1) as train.py: the same seed gives the same initial MAGE as plain pretraining.
    model_params = model.init(jax.random.fold_in(rng, 0), jnp.zeros((1, num_tokens), jnp.int32), plan)["params"]
    params = {"model": model_params, "projection_head": init_head(rng)}
    return steps.TrainState.create(params, tx, jax.random.key_data(jax.random.fold_in(rng, 1)))

  initial_params = None
  if config.get("model_init"):
    variables, _ = params_io.load(config.model_init)
    head_params = variables.get("projection_head", {}).get("params")
    if head_params is None:
      head_params = jax.device_get(sharding.strip_boxes(jax.jit(init_head)(jax.random.key(config.seed))))
    initial_params = {"model": layers.to_scan_layout(variables["model"]["params"], model.config.scan),
                      "projection_head": head_params}
    abstract = sharding.strip_boxes(jax.eval_shape(init_state, jax.random.key(0)).params)
    _check_param_shapes(initial_params, abstract, config.model_init)

  task = trainer.Task(
      init_state=init_state,
      step=functools.partial(mage_c_step, tokenizer=tokenizer, views=views, model=model, head=head, tx=tx,
                             cfg=cfg, masking_cfg=dict(config.masking), label_smoothing=config.label_smoothing,
                             schedule=optim_cfg.schedule()),
      extras=tokenizer_vars, batch_keys=("image",), total_steps=total_steps,
      export=lambda state: export_mage_c(os.path.join(workdir, "params"), model, state.params, tokenizer,
                                         tokenizer_vars, cfg, {"train_steps": total_steps,
                                                               "views": dataclasses.asdict(views)}),
      initial_params=initial_params,
      reinit_after_params=lambda state: state.replace(opt_state=tx.init(state.params)))
  return trainer.run(config, workdir, task, mesh, rules)


# ------------------------------------------------------------------------------------------------------------
# Class-conditional MAGE.


def class_cond_loss(params, ids, labels, rng, *, model: ClassCondMAGE, masking_cfg: dict, label_smoothing: float,
                    label_drop_prob: float = 0.0, deterministic: bool = False):
  """Masked-token loss of the class-conditional model.

  Args:
    params: ClassCondMAGE params.
    ids: int32 [B, N] tokenizer ids; labels: int [B] in [0, num_classes).
    rng: step key; masking fold_in(rng, 0), dropout fold_in(rng, 1), label dropout fold_in(rng, 3).
    label_drop_prob: probability of replacing a label by the no-label id (trains the guidance branch).

  Returns:
    (loss, aux {'mask_ratio'}).
  """
  plan, ratio = masking.sample_plan(jax.random.fold_in(rng, _MASK), ids.shape[0], ids.shape[1], **masking_cfg)
  labels = labels.astype(jnp.int32)
  if label_drop_prob > 0:
    drop = jax.random.bernoulli(jax.random.fold_in(rng, _LABEL_DROP), label_drop_prob, labels.shape)
    labels = jnp.where(drop, model.config.null_class, labels)
  logits, _ = model.apply({"params": params}, ids, plan, labels, deterministic,
                          rngs={"dropout": jax.random.fold_in(rng, _DROPOUT)})
  loss = losses.masked_token_loss(logits, ids, plan.masked, codebook_size=model.config.codebook_size,
                                  label_smoothing=label_smoothing)
  return loss, {"mask_ratio": ratio}


def class_cond_update(state: steps.TrainState, ids, labels, *, model, tx, masking_cfg: dict,
                      label_smoothing: float, label_drop_prob: float = 0.0, schedule=None):
  """One class-conditional update from token ids int32 [B, N] and labels int [B] (no tokenizer)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  loss_fn = functools.partial(class_cond_loss, model=model, masking_cfg=masking_cfg,
                              label_smoothing=label_smoothing, label_drop_prob=label_drop_prob)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, ids, labels, rng)
  return steps.finish_step(state, loss, grads, tx, schedule=schedule, metrics=aux)


def class_cond_step(state: steps.TrainState, tokenizer_vars, batch, *, tokenizer: VQGAN, **update_kw):
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


@functools.lru_cache(maxsize=8)
def _class_sampler(model: ClassCondMAGE, tokenizer: VQGAN, batch: int, num_steps: int, sample_temperature: float):
  c = model.config

  @jax.jit
  def sample(params, tok_vars, rng, labels, choice_temperature, guidance_scale):
    tokens = jnp.full((batch, c.num_tokens), c.mask_id, jnp.int32)
    ids = sampling.decode(rng, tokens, class_cond_logits_fn(model, params, labels, guidance_scale),
                          num_steps=num_steps, choice_temperature=choice_temperature, mask_id=c.mask_id,
                          codebook_size=c.codebook_size, sample_temperature=sample_temperature)
    return image_io.to_uint8(tokenizer.apply(tok_vars, ids, method="decode_ids")), ids

  return sample


def sample_classes(model: ClassCondMAGE, tokenizer: VQGAN, variables: Mapping, classes, per_class: int, *,
                   seed: int = 0, num_steps: int = 12, choice_temperature: float = 4.5,
                   sample_temperature: float = 1.0, guidance_scale: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """`per_class` samples for each class id in `classes`, class by class (class k uses fold_in(key(seed), k)).

  Returns:
    (uint8 images [len(classes) * per_class, H, W, 3], int32 ids [len(classes) * per_class, N]), grouped by class.
  """
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  for k in classes:
    if not 0 <= int(k) < model.config.num_classes:
      raise ValueError(f"class id {k} outside [0, {model.config.num_classes})")
  w = model.config.guidance_scale if guidance_scale is None else guidance_scale
  sample = _class_sampler(model, tokenizer, per_class, num_steps, float(sample_temperature))
  images, ids = [], []
  for k in classes:
    img, tok = sample(variables["model"]["params"], variables["tokenizer"], jax.random.fold_in(
        jax.random.key(seed), int(k)), jnp.full((per_class,), int(k), jnp.int32), jnp.float32(choice_temperature),
        jnp.float32(w))
    images.append(np.asarray(img))
    ids.append(np.asarray(tok))
  return np.concatenate(images), np.concatenate(ids)


def write_class_grid(params_dir: str, out_path: str, *, num_classes: int | None = None, per_class: int = 8,
                     seed: int = 0, num_steps: int = 12, choice_temperature: float = 4.5,
                     guidance_scale: float | None = None) -> str:
  """Samples a class-conditional checkpoint and writes a PNG grid, one row per class (the first `num_classes`).

  Every process samples (restoring is collective under multi-process orbax); process 0 writes the file.

  Returns:
    `out_path`.
  """
  meta = params_io.read_meta(params_dir)
  model, tokenizer = checkpoint_models.models_from_meta(meta)
  variables, _ = params_io.load(params_dir)
  shown = model.config.num_classes if num_classes is None else min(num_classes, model.config.num_classes)
  images, _ = sample_classes(model, tokenizer, variables, range(shown), per_class, seed=seed,
                             num_steps=num_steps, choice_temperature=choice_temperature,
                             guidance_scale=guidance_scale)
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
    raise ValueError(f"{source} has no meta['model'] (kind={meta.get('kind')!r}); an unconditional MAGE params "
                     "checkpoint is needed")
  ours = dataclasses.asdict(model_config)
  diff = {k: (ours[k], v) for k, v in fields.items()
          if k in ours and k not in _RUNTIME_FIELDS and k not in ("num_classes", "class_combine",
                                                                  "guidance_scale")
          and (tuple(v) if isinstance(v, list) else v) != ours[k]}
  if diff:
    text = ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in sorted(diff.items()))
    raise ValueError(f"config.model does not match the init checkpoint {source}: {text}")


def _class_cond_initial_params(config, model: ClassCondMAGE, variables: dict) -> dict:
  params = dict(variables["model"]["params"])
  table = params.get("class_emb", {}).get("embedding")
  expected = (model.config.num_classes + 1, model.config.decoder_embed_dim)
  if table is None or tuple(table.shape) != expected:
    if table is not None:
      logging.warning("init checkpoint's class_emb has shape %s, expected %s: re-initialising it",
                      tuple(table.shape), expected)
    params["class_emb"] = jax.device_get(init_class_embedding(jax.random.key(config.seed + 2), model.config))
  return layers.to_scan_layout(params, model.config.scan)


def _check_param_shapes(initial, abstract, source: str) -> None:
  got = {optim.path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(initial)[0]}
  want = {optim.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  if problems:
    raise ValueError(f"params of {source} do not fit the model: " + "; ".join(problems[:10]))


def train_class_cond(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes a class-conditional decoder on a frozen unconditional MAGE; returns the last logged metrics."""
  cc = config.class_cond
  if not config.get("model_init"):
    raise ValueError("class-conditional training fine-tunes an unconditional MAGE: set config.model_init to its "
                     "params directory (a pretraining export or python -m mage_jax.convert output)")
  init_meta = params_io.read_meta(config.model_init)
  tok_config = config
  if not config.tokenizer.init:
    tok_config = config.copy_and_resolve_references()
    tok_config.tokenizer.init = config.model_init  # the params dir holds the tokenizer MAGE was trained with
  tokenizer, tokenizer_vars = train.load_tokenizer(tok_config)
  base = train.mage_model(config, tokenizer)
  check_architecture(base.config, init_meta, config.model_init)
  model = ClassCondMAGE(class_cond_config(base.config, num_classes=cc.num_classes, class_combine=cc.combine,
                                          guidance_scale=cc.guidance_scale),
                        dtype=base.dtype, param_dtype=base.param_dtype)
  if not 0.0 <= cc.label_drop_prob < 1.0:
    raise ValueError(f"class_cond.label_drop_prob must be in [0, 1), got {cc.label_drop_prob}")
  if cc.guidance_scale > 0 and cc.label_drop_prob == 0:
    logging.warning("guidance_scale > 0 but label_drop_prob = 0: the no-label embedding stays untrained")
  mesh, rules = trainer.mesh_and_rules(config)
  total_steps, warmup_steps = trainer.schedule_steps(config, pipeline.steps_per_epoch(config.input))
  tx, optim_cfg = train.pretrain_optimizer(config, total_steps, warmup_steps, frozen=ENCODER_PARAM_PATTERNS)
  num_tokens = model.config.num_tokens
  logging.info("class-conditional: %d classes (%s), %d steps, peak lr %.3g, from %s", cc.num_classes, cc.combine,
               total_steps, optim_cfg.lr, config.model_init)

  def init_state(rng):
    plan, _ = masking.sample_plan(jax.random.key(0), 1, num_tokens, **config.masking)
    params = model.init(jax.random.fold_in(rng, 0), jnp.zeros((1, num_tokens), jnp.int32), plan,
                        jnp.zeros((1,), jnp.int32))["params"]
    return steps.TrainState.create(params, tx, jax.random.key_data(jax.random.fold_in(rng, 1)))

  variables, _ = params_io.load(config.model_init)
  initial_params = _class_cond_initial_params(config, model, variables)
  _check_param_shapes(initial_params, sharding.strip_boxes(jax.eval_shape(init_state, jax.random.key(0)).params),
                      config.model_init)
  params_dir = os.path.join(workdir, "params")
  task = trainer.Task(
      init_state=init_state,
      step=functools.partial(class_cond_step, tokenizer=tokenizer, model=model, tx=tx,
                             masking_cfg=dict(config.masking), label_smoothing=config.label_smoothing,
                             label_drop_prob=cc.label_drop_prob, schedule=optim_cfg.schedule()),
      extras=tokenizer_vars, batch_keys=("image", "label"), total_steps=total_steps,
      export=lambda state: train.export_params(params_dir, model, state.params, tokenizer, tokenizer_vars,
                                               {"class_cond": True, "train_steps": total_steps,
                                                "init": os.path.abspath(config.model_init)}),
      initial_params=initial_params,
      reinit_after_params=lambda state: state.replace(opt_state=tx.init(state.params)))
  metrics = trainer.run(config, workdir, task, mesh, rules)
  if cc.grid_per_class > 0 and os.path.exists(os.path.join(params_dir, params_io.META_FILE)):
    path = write_class_grid(params_dir, os.path.join(workdir, "class_grid.png"), num_classes=cc.grid_num_classes,
                            per_class=cc.grid_per_class, seed=config.seed, num_steps=cc.grid_num_steps,
                            choice_temperature=cc.grid_temperature)
    logging.info("class-conditional grid written to %s", path)
  return metrics


# ------------------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Entry point of main.py for config.mode 'mage_c' and 'class_cond'."""
  if config.mode == "mage_c":
    return train_mage_c(config, workdir)
  if config.mode == "class_cond":
    return train_class_cond(config, workdir)
  raise ValueError(f"train_variants handles config.mode 'mage_c' and 'class_cond', got {config.mode!r}")
