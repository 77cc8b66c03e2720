"""MAGE-C: MAGE with contrastive co-training (config.mode 'mage_c', outlined in the MAGE paper) on the shared loop.

The MAGE-C code was never released (LTH14/mage #5): every default the paper does not give is ASSUMED and configurable:
  * two views per image from the input pipeline (`config.input.views = 2`): each an independent draw of MAGE's
    pretraining crop law (RandomResizedCrop on the original image + flip, `config.input.scale/ratio`),
    optionally followed on device by colour jitter / grayscale (`config.views`, off by default: MAGE-C is said
    to need less augmentation than SimCLR, unverified);
  * both views are tokenised by the frozen VQGAN and masked with MAGE's masking (one plan over the 2B rows, so
    one masking ratio per step, independent token orders per view), and go through MAGE as one 2B batch;
  * reconstruction loss: MAGE's masked-token cross-entropy over the masked tokens of both views;
  * contrastive loss: pool the encoder output (`pool`: 'mean' over the image-token outputs, the default; 'cls' =
    the class slot; 'mean_visible' = only positions whose token was visible), a `contrastive.ProjectionHead`, then
    SimCLR NT-Xent (2N-2 negatives) at temperature `temperature` on the GLOBAL batch: the step is jitted on
    global arrays, so the partitioner gathers the negatives from every device and host;
  * loss = rec + lam * con. Defaults (ASSUMED): lam 0.1, temperature 0.1, head Dense(2048)-ReLU-Dense(128);
  * export: the MAGE params in the pretraining layout plus `variables['projection_head']` (ignored by probing and
    generation) and `meta['mage_c']` with the contrastive settings.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from mage_jax import evals
from mage_jax.data import cached_tokens, pipeline
from mage_jax.models.mage import MAGE
from mage_jax.objectives import contrastive, masked_tokens, masking
from mage_jax.train import builders, config_views, params_io, sharding, steps, trainer

POOL_MODES = ("mean", "cls", "mean_visible")

# Constants folded into the step key, one per use (masking and dropout match steps.pretrain_step).
_COLOR = 2  # beside masked_tokens.MASK_KEY and DROPOUT_KEY


@dataclasses.dataclass(frozen=True)
class ColorAugment:
  """On-device colour augmentation of each MAGE-C view (`config.views`); all off by default (ASSUMED).

  Attributes:
    jitter_prob: probability of applying colour jitter (SimCLR: 0.8); 0 disables it.
    brightness, contrast, saturation: jitter strengths s (factor ~ U[max(0, 1-s), 1+s]), torchvision meaning,
      applied in this fixed order (no hue: it needs an HSV round trip).
    grayscale_prob: probability of converting the view to grayscale (SimCLR: 0.2).
  """

  jitter_prob: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  grayscale_prob: float = 0.0

  def __post_init__(self):
    for name in ("jitter_prob", "grayscale_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"views.{name} must be in [0, 1], got {getattr(self, name)}")
    for name in ("brightness", "contrast", "saturation"):
      if getattr(self, name) < 0:
        raise ValueError(f"views.{name} must be >= 0, got {getattr(self, name)}")

  @property
  def enabled(self) -> bool:
    return self.jitter_prob > 0 or self.grayscale_prob > 0


def _gray(x: jax.Array) -> jax.Array:
  """ITU-R 601 luma of [H, W, 3], kept as [H, W, 1] (torchvision rgb_to_grayscale)."""
  return 0.299 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]


def color_jitter(rng: jax.Array, x: jax.Array, cfg: ColorAugment) -> jax.Array:
  """Brightness, contrast, saturation jitter (fixed order) with prob `jitter_prob`, then grayscale; [H, W, 3]."""
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


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  """`config.contrastive` (every default ASSUMED: no MAGE-C code was released; the paper's values were not checked).

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
      raise ValueError(
        f"contrastive.norm must be 'none' or 'layer' (BatchNorm statistics are not part of the "
        f"train state), got {self.norm!r}"
      )
    if self.num_layers < 1 or self.hidden_dim < 1 or self.out_dim < 1:
      raise ValueError(
        f"contrastive head sizes must be >= 1, got num_layers={self.num_layers}, "
        f"hidden_dim={self.hidden_dim}, out_dim={self.out_dim}"
      )

  def head(self, dtype=jnp.float32, param_dtype=jnp.float32) -> contrastive.ProjectionHead:
    return contrastive.ProjectionHead(
      hidden_dim=self.hidden_dim,
      out_dim=self.out_dim,
      num_layers=self.num_layers,
      norm=self.norm,
      dtype=dtype,
      param_dtype=param_dtype,
    )


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


def mage_c_loss(
  params,
  ids,
  rng,
  *,
  model: MAGE,
  head: nn.Module,
  cfg: ContrastiveConfig,
  masking_cfg: dict,
  label_smoothing: float,
  deterministic: bool = False,
):
  """MAGE-C objective on the tokens of both views.

  Args:
    params: {'model': MAGE params, 'projection_head': head params}.
    ids: int32 [2B, N]: rows 0..B-1 are view 1 and rows B..2B-1 view 2 of the same B images (row i pairs with
      row B+i).
    rng: step key, as `masked_tokens.objective` folds it (one masking ratio for the 2B rows).

  Returns:
    (loss, aux) with loss = rec + lam * con (float32 scalar), aux {'rec_loss', 'con_loss', 'mask_ratio'}.
  """
  rec, aux = masked_tokens.objective(
    model,
    params["model"],
    ids,
    rng,
    masking_cfg=masking_cfg,
    label_smoothing=label_smoothing,
    deterministic=deterministic,
  )
  z = head.apply({"params": params["projection_head"]}, pool_encoded(aux["encoded"], aux["plan"], cfg.pool))
  z1, z2 = jnp.split(z, 2, axis=0)
  con = contrastive.nt_xent(z1, z2, cfg.temperature)
  return rec + cfg.lam * con, {"rec_loss": rec, "con_loss": con, "mask_ratio": aux["mask_ratio"]}


def mage_c_update(
  state: steps.TrainState,
  ids,
  *,
  model,
  head,
  tx,
  cfg: ContrastiveConfig,
  masking_cfg: dict,
  label_smoothing: float,
  schedule=None,
):
  """One MAGE-C update from the token ids of both views (int32 [2B, N], see `mage_c_loss`)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  loss_fn = functools.partial(
    mage_c_loss, model=model, head=head, cfg=cfg, masking_cfg=masking_cfg, label_smoothing=label_smoothing
  )
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, ids, rng)
  return steps.finish_step(state, loss, grads, tx, schedule=schedule, metrics=aux)


def mage_c_step(state: steps.TrainState, tokenizer_vars, batch, *, tokenizer, color: ColorAugment, **update_kw):
  """One MAGE-C step on a global batch {'image': float [B, 2, H, W, 3] in [0, 1]} (two views per image)."""
  views = jnp.concatenate([batch["image"][:, 0], batch["image"][:, 1]], axis=0)
  if color.enabled:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    keys = jax.random.split(jax.random.fold_in(rng, _COLOR), views.shape[0])
    views = jax.vmap(lambda k, x: color_jitter(k, x, color))(keys, views)
  return mage_c_update(state, steps.tokenize(tokenizer, tokenizer_vars, views), **update_kw)


def export_mage_c(
  directory: str, model: MAGE, params, tokenizer, tokenizer_vars, cfg: ContrastiveConfig, extra_meta: dict | None = None
) -> None:
  """`builders.export_params` layout (kind 'mage') plus `variables['projection_head']` and `meta['mage_c']`."""
  builders.export_params(
    directory,
    model,
    params["model"],
    tokenizer,
    tokenizer_vars,
    {"mage_c": dataclasses.asdict(cfg), **(extra_meta or {})},
    extra_variables={"projection_head": {"params": params["projection_head"]}},
  )


def build_task(config: ml_collections.ConfigDict, workdir: str, *, abstract: bool = False):
  """(task, mesh, rules) of MAGE-C in `workdir` (`trainer`'s contract)."""
  cached_tokens.refuse_cached_input(config)
  cfg = config_views.from_config(ContrastiveConfig, config.contrastive, "config.contrastive")
  color = config_views.from_config(ColorAugment, config.views, "config.views")
  if config.input.batch_size < 2:
    raise ValueError(f"MAGE-C needs a global batch of at least 2 images (for negatives), got {config.input.batch_size}")
  if config.input.get("views", 1) != 2 or config.input.get("augment", "none") == "none":
    raise ValueError(
      "MAGE-C needs two augmented views per image: set config.input.views=2 and a random "
      f"config.input.augment (got views={config.input.get('views', 1)}, "
      f"augment={config.input.get('augment')!r})"
    )
  mesh, rules = trainer.mesh_and_rules(config)
  total_steps, warmup_steps = trainer.schedule_steps(config, lambda: pipeline.steps_per_epoch(config.input))
  tx, optim_cfg = builders.pretrain_optimizer(config, total_steps, warmup_steps)
  tokenizer, tokenizer_vars = builders.frozen_tokenizer(config, abstract)
  model = builders.mage_model(config, tokenizer)
  head = cfg.head(model.dtype, model.param_dtype)
  logging.info(
    "MAGE-C: %d steps, peak lr %.3g, lam %g, temperature %g, pool %s",
    total_steps,
    optim_cfg.lr,
    cfg.lam,
    cfg.temperature,
    cfg.pool,
  )
  init_state = builders.mage_init_state(model, config.masking, tx, head=head)
  initial_params = None
  if config.get("model_init") and not abstract:
    variables, _ = params_io.load(config.model_init)
    abstract_params = sharding.strip_boxes(jax.eval_shape(init_state, jax.random.key(0)).params)
    head_params = variables.get("projection_head", {}).get("params")
    if head_params is None:  # a plain MAGE export: a fresh head, as the state's own initialisation makes it
      fresh = jax.jit(functools.partial(builders.projection_head_params, head, model))(jax.random.key(config.seed))
      head_params = jax.device_get(sharding.strip_boxes(fresh))
    initial_params = {"model": builders.initial_model_params(config, model), "projection_head": head_params}
    builders.check_param_shapes(initial_params, abstract_params, config.model_init)

  task = trainer.Task(
    init_state=init_state,
    step=functools.partial(
      mage_c_step,
      tokenizer=tokenizer,
      color=color,
      model=model,
      head=head,
      tx=tx,
      cfg=cfg,
      masking_cfg=dict(config.masking),
      label_smoothing=config.label_smoothing,
      schedule=optim_cfg.schedule(),
    ),
    extras=tokenizer_vars,
    data=trainer.image_data(config, abstract),
    batch_spec=trainer.image_batch_spec(config),
    total_steps=total_steps,
    export=None
    if abstract
    else lambda state: export_mage_c(
      os.path.join(workdir, "params"),
      model,
      state.params,
      tokenizer,
      tokenizer_vars,
      cfg,
      {"train_steps": total_steps, "views": dataclasses.asdict(color)},
    ),
    initial_params=initial_params,
    reinit_after_params=lambda state: state.replace(opt_state=tx.init(state.params)),
    evaluators=()
    if abstract
    else evals.during_training(
      config,
      evals.TrainingJob(
        config, workdir, mesh, total_steps, model, tokenizer, tokenizer_vars, params_of=lambda s: s.params["model"]
      ),
    ),
  )
  return task, mesh, rules


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) MAGE-C in `workdir`; returns the last logged metrics."""
  task, mesh, rules = build_task(config, workdir)
  metrics, _ = trainer.run(config, workdir, task, mesh, rules)
  return metrics
