"""VQGAN tokenizer training from scratch (spec §1.6) on the shared loop (`trainer.run`, config.mode='tokenizer').

Generator = `models.vqgan.VQGAN`; discriminator = `models.discriminator.Discriminator` (StyleGAN2 style).
One step: the generator loss (reconstruction + VQ codebook/commitment + optional entropy + optional
perceptual + adversarial from `discriminator_start_step` on) is minimised with its own Adam; then one
discriminator step (non-saturating or hinge, LeCam, optional R1) on the same real batch and the
stop-gradient reconstructions, with a second Adam. Before the discriminator starts, its forward/backward
passes are skipped entirely (`lax.cond`), so the steps before it cost no discriminator compute. The generator weights are
tracked by an EMA (exported, and used for evaluation). Optionally (`config.codebook`) the loop also scales
the codebook's learning rate and restarts dead codes from batch latents (off in both shipped configs: the
entropy loss keeps the codes in use). A step whose losses or gradients are non-finite changes nothing but
the step counter (see `steps.apply_gradients`).

Precision: `tokenizer.dtype` / `discriminator.dtype` set the conv/dense compute dtype (bfloat16 on
accelerators). Whatever they are, params, optimizer states, the EMA, GroupNorm statistics, the quantizer
distances, every loss and the LeCam EMAs stay float32.

Outputs in the workdir: `checkpoints/` (full state: both nets, both optimizers, EMA, LeCam, rng),
`reconstructions/step_XXXXXXX.png` (held-out originals | reconstructions, per eval), `eval_metrics.json`
(the latest eval: PSNR, SSIM, codebook usage and perplexity on the held-out split) and, at the end,
`params/` (params-only EMA export, kind 'tokenizer') that MAGE pretraining reads with
`--config.tokenizer.init=<workdir>/params`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mage_jax import image_metrics, images as images_lib, optim, params_io, sharding, trainer
from mage_jax import tokenizer_losses as tl
from mage_jax.data import pipeline
from mage_jax.models.discriminator import Discriminator
from mage_jax.models.vqgan import VQGAN, VQGANConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
METRICS_FILE = "eval_metrics.json"


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


# ------------------------------------------------------------------------------------------------------------
# Configuration views.


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Typed view of `config.loss` (weights multiply the terms as in `tokenizer_losses`)."""
  rec_type: str = "l2"
  rec_weight: float = 1.0
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  perceptual_weight: float = 0.0
  perceptual_weights: str = ""
  adv_weight: float = 0.1
  disc_weight: float = 1.0
  gan_type: str = "non_saturating"
  discriminator_start_step: int = 0  # < 0: no discriminator at all
  lecam_weight: float = 0.0
  lecam_decay: float = 0.999
  r1_cost: float = 0.0

  def __post_init__(self):
    if self.rec_type not in ("l1", "l2"):
      raise ValueError(f"loss.rec_type must be 'l1' or 'l2', got {self.rec_type!r}")
    if self.gan_type not in ("non_saturating", "hinge"):
      raise ValueError(f"loss.gan_type must be 'non_saturating' or 'hinge', got {self.gan_type!r}")
    if self.entropy_weight and self.entropy_temperature <= 0:
      raise ValueError(f"loss.entropy_temperature must be > 0, got {self.entropy_temperature}")
    if not 0.0 <= self.lecam_decay < 1.0:
      raise ValueError(f"loss.lecam_decay must be in [0, 1), got {self.lecam_decay}")

  @property
  def use_gan(self) -> bool:
    return self.discriminator_start_step >= 0 and (self.adv_weight > 0 or self.disc_weight > 0)

  @classmethod
  def from_config(cls, cfg) -> "LossConfig":
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown config.loss keys {unknown}; known: {sorted(fields)}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class CodebookConfig:
  """Typed view of `config.codebook`: how the training loop (not the model) looks after the codebook.

  lr_multiplier: the codebook's Adam steps are this many times the generator's.
  restart_every: every this many steps (and at step 0, i.e. a data-dependent initialisation), codes whose
    usage EMA is below `dead_ratio / K` (a fraction of the uniform share) are replaced by encoder outputs
    drawn at random from the current batch. 0 disables restarts.
  usage_decay: decay of the per-code usage EMA (fraction of the batch's latents assigned to each code).
  """
  lr_multiplier: float = 1.0
  restart_every: int = 0
  usage_decay: float = 0.99
  dead_ratio: float = 0.03

  def __post_init__(self):
    if self.lr_multiplier <= 0:
      raise ValueError(f"codebook.lr_multiplier must be > 0, got {self.lr_multiplier}")
    if self.restart_every < 0:
      raise ValueError(f"codebook.restart_every must be >= 0, got {self.restart_every}")
    if not 0.0 <= self.usage_decay < 1.0:
      raise ValueError(f"codebook.usage_decay must be in [0, 1), got {self.usage_decay}")

  @classmethod
  def from_config(cls, cfg) -> "CodebookConfig":
    if cfg is None:
      return cls()
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown config.codebook keys {unknown}; known: {sorted(fields)}")
    return cls(**d)


def vqgan_config(config: ml_collections.ConfigDict) -> VQGANConfig:
  """`config.tokenizer` sizes (+ the input resolution) as a VQGANConfig."""
  fields = {f.name for f in dataclasses.fields(VQGANConfig)}
  t = config.tokenizer
  kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in t.items() if k in fields}
  unknown = sorted(set(t.keys()) - fields - {"dtype"})
  if unknown:
    raise ValueError(f"unknown config.tokenizer keys {unknown}; known: {sorted(fields | {'dtype'})}")
  cfg = VQGANConfig(**{**kw, "resolution": config.input.image_size})
  factor = 2 ** (len(cfg.ch_mult) - 1)
  if cfg.resolution % factor:
    raise ValueError(f"input.image_size {cfg.resolution} is not a multiple of the tokenizer's downsampling "
                     f"factor {factor} (ch_mult {cfg.ch_mult})")
  for mult in cfg.ch_mult:
    if (cfg.ch * mult) % cfg.num_groups:
      raise ValueError(f"tokenizer width {cfg.ch * mult} is not divisible by num_groups {cfg.num_groups}")
  return cfg


def make_models(config: ml_collections.ConfigDict) -> tuple[VQGAN, Discriminator]:
  vq = VQGAN(vqgan_config(config), dtype=_dtype(config.tokenizer.get("dtype", "float32")))
  d = config.discriminator
  widths = None if not d.get("widths") else tuple((int(r), int(w)) for r, w in d.widths)
  disc = Discriminator(widths=widths, channel_multiplier=d.get("channel_multiplier", 1),
                       dtype=_dtype(d.get("dtype", "float32")))
  return vq, disc


def _is_codebook(path) -> bool:
  return "quantize" in optim.path_str(path)


def scale_codebook_updates(multiplier: float) -> optax.GradientTransformation:
  """Multiplies the updates of the quantizer's codebook (the path holding 'quantize') by `multiplier`."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * multiplier if _is_codebook(p) else u, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(lr: float, total_steps: int, warmup_steps: int, o,
                   codebook_lr_multiplier: float = 1.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam (β1, β2 from `config.optim`) on a warm-up + cosine schedule down to `o.min_lr` (min_lr = lr gives
  MaskGIT's constant rate), after optional global-norm clipping; codebook steps scaled by the multiplier."""
  min_lr = min(o.min_lr, lr)
  schedule = optim.warmup_cosine_schedule(lr, max(total_steps, 1), min(warmup_steps, max(total_steps, 1)), min_lr)
  chain = []
  if o.get("grad_clip_norm", 0.0):
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  chain.append(optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8)))
  if codebook_lr_multiplier != 1.0:
    chain.append(scale_codebook_updates(codebook_lr_multiplier))
  return optax.chain(*chain), schedule


# ------------------------------------------------------------------------------------------------------------
# State and step.


@flax.struct.dataclass
class TokenizerState:
  """Everything a tokenizer run needs to resume bit-exactly (arrays only).

  params: {'generator': VQGAN params, 'discriminator': Discriminator params}.
  """
  step: jax.Array
  params: Any
  g_opt_state: Any
  d_opt_state: Any
  ema_params: Any
  lecam: tl.LeCamState
  code_usage: jax.Array  # [K] EMA of the fraction of latents assigned to each code
  rng: jax.Array  # uint32 key data; step s draws from fold_in(key, s) (codebook restarts)
  first_nonfinite_step: jax.Array
  skipped_steps: jax.Array


def init_state(rng: jax.Array, *, vqgan: VQGAN, disc: Discriminator, g_tx, d_tx) -> TokenizerState:
  """Fresh state (params boxed with logical axes, so the trainer can derive shardings)."""
  res = vqgan.config.resolution
  dummy = jnp.zeros((1, res, res, vqgan.config.in_channels), jnp.float32)
  g_params = vqgan.init(jax.random.fold_in(rng, 0), dummy)["params"]
  d_params = disc.init(jax.random.fold_in(rng, 1), dummy)["params"]
  return TokenizerState(
      step=jnp.zeros((), jnp.int32),
      params={"generator": g_params, "discriminator": d_params},
      g_opt_state=g_tx.init(g_params), d_opt_state=d_tx.init(d_params),
      ema_params=jax.tree.map(jnp.copy, g_params),
      lecam=tl.LeCamState.create(),
      code_usage=jnp.zeros((vqgan.config.codebook_size,), jnp.float32),
      rng=jax.random.key_data(jax.random.fold_in(rng, 2)),
      first_nonfinite_step=jnp.full((), -1, jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))


def ema_update(ema, params, decay: float):
  """decay·ema + (1 − decay)·params, leafwise in float32."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def _zeros_like_terms(keys):
  return {k: jnp.zeros((), jnp.float32) for k in keys}


def restart_dead_codes(codebook: jax.Array, usage: jax.Array, z: jax.Array, rng: jax.Array, active: jax.Array,
                       dead_ratio: float) -> tuple[jax.Array, jax.Array]:
  """Replaces dead codes (usage < dead_ratio / K) by randomly drawn latents when `active`.

  Args:
    codebook: [K, C]. usage: [K] usage EMA (fractions). z: [..., C] encoder outputs of this batch.
    rng: key. active: bool scalar (traced).
  Returns:
    (new codebook [K, C], replaced codes: bool [K]).
  """
  k, c = codebook.shape
  z = jax.lax.stop_gradient(z.reshape(-1, c).astype(codebook.dtype))
  n = z.shape[0]
  picks = jax.random.choice(rng, n, (k,), replace=n < k)
  dead = (usage < dead_ratio / k) & active
  return jnp.where(dead[:, None], z[picks], codebook), dead


def _with_codebook(g_params, codebook):
  q = dict(g_params["quantize"])
  q["embedding"] = {**q["embedding"], "embedding": codebook}
  return {**g_params, "quantize": q}


def train_step(state: TokenizerState, perceptual: tl.PerceptualLoss, batch, *, vqgan: VQGAN,
               disc: Discriminator, g_tx, d_tx, loss: LossConfig, ema_decay: float, g_schedule=None,
               codebook: CodebookConfig = CodebookConfig()):
  """One generator + one discriminator update on a global batch {'image': [B, H, W, 3] in [0, 1]}.

  Returns (new state, metrics of float32 scalars).
  """
  images = batch["image"]
  step = state.step
  g_params, d_params = state.params["generator"], state.params["discriminator"]
  gan_active = step >= loss.discriminator_start_step if loss.use_gan else jnp.asarray(False)
  use_perceptual = perceptual.enabled and loss.perceptual_weight > 0

  def g_loss_fn(gp):
    recon, aux = vqgan.apply({"params": gp}, images)
    entropy = (tl.entropy_loss(aux["distances"], loss.entropy_temperature) if loss.entropy_weight
               else jnp.zeros((), jnp.float32))
    percep = jnp.mean(perceptual(images, recon)) if use_perceptual else jnp.zeros((), jnp.float32)
    total, terms = tl.generator_loss_terms(
        images, recon, codebook_loss=aux["codebook"], commitment_loss=aux["commitment"], entropy=entropy,
        perceptual=percep, logits_fake=None, rec_type=loss.rec_type, rec_weight=loss.rec_weight,
        entropy_weight=loss.entropy_weight, perceptual_weight=loss.perceptual_weight)
    if loss.use_gan:
      # Before the start step the adversarial term has weight 0: skip D's forward/backward altogether.
      adv = jax.lax.cond(
          gan_active,
          lambda r: loss.adv_weight * tl.generator_adversarial_loss(disc.apply({"params": d_params}, r), loss.gan_type),
          lambda r: jnp.zeros((), jnp.float32), recon)
      terms["adv"] = adv
      total = total + adv
    return total, (terms, aux, recon)

  (g_loss, (g_terms, aux, recon)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
  g_grad_norm = optax.tree.norm(g_grads)
  g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, g_params)
  new_g_params = optax.apply_updates(g_params, g_updates)

  k = vqgan.config.codebook_size
  batch_hist = image_metrics.code_histogram(aux["ids"], k)
  code_usage = (codebook.usage_decay * state.code_usage
                + (1.0 - codebook.usage_decay) * batch_hist / jnp.sum(batch_hist))
  new_ema = ema_update(state.ema_params, new_g_params, ema_decay)
  restarted = jnp.zeros((), jnp.float32)
  if codebook.restart_every:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    new_cb, dead = restart_dead_codes(
        new_g_params["quantize"]["embedding"]["embedding"], code_usage, aux["z"], rng,
        step % codebook.restart_every == 0, codebook.dead_ratio)
    # A restarted code keeps its low usage: unless picked up, it is redrawn at the next restart. The EMA
    # copy takes the new code as it is (a blend of an abandoned and a fresh code is no code at all).
    new_g_params = _with_codebook(new_g_params, new_cb)
    ema_cb = new_ema["quantize"]["embedding"]["embedding"]
    new_ema = _with_codebook(new_ema, jnp.where(dead[:, None], new_cb, ema_cb))
    restarted = jnp.sum(dead.astype(jnp.float32))

  d_keys = ("d_adv", "d_lecam", "d_r1", "d_loss", "d_grad_norm", "logits_real", "logits_fake")
  if loss.use_gan:
    fake = jax.lax.stop_gradient(recon)

    def d_loss_fn(dp, lecam_state):
      logits_fn = lambda x: disc.apply({"params": dp}, x)
      if loss.r1_cost > 0:
        r1, logits_real = tl.r1_gradient_penalty(logits_fn, images, loss.r1_cost)
      else:
        r1, logits_real = jnp.zeros((), jnp.float32), logits_fn(images)
      logits_fake = logits_fn(fake)
      total, terms, new_lecam = tl.discriminator_loss_terms(
          logits_real, logits_fake, weight=loss.disc_weight, gan_type=loss.gan_type, r1_penalty=r1,
          lecam_state=lecam_state if loss.lecam_weight > 0 else None, lecam_weight=loss.lecam_weight,
          lecam_decay=loss.lecam_decay)
      new_lecam = lecam_state if new_lecam is None else new_lecam
      stats = {"d_adv": terms["adv"], "d_lecam": terms["lecam"], "d_r1": terms["r1"],
               "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}
      return total, (stats, new_lecam)

    def d_update(operands):
      dp, d_opt, lecam_state = operands
      (d_loss, (stats, new_lecam)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(dp, lecam_state)
      updates, new_opt = d_tx.update(d_grads, d_opt, dp)
      stats = {**stats, "d_loss": d_loss, "d_grad_norm": optax.tree.norm(d_grads)}
      return optax.apply_updates(dp, updates), new_opt, new_lecam, stats

    def d_skip(operands):
      dp, d_opt, lecam_state = operands
      return dp, d_opt, lecam_state, _zeros_like_terms(d_keys)

    new_d_params, d_opt_state, lecam, d_stats = jax.lax.cond(
        gan_active, d_update, d_skip, (d_params, state.d_opt_state, state.lecam))
  else:
    new_d_params, d_opt_state, lecam, d_stats = d_params, state.d_opt_state, state.lecam, _zeros_like_terms(d_keys)

  finite = (jnp.isfinite(g_loss) & jnp.isfinite(g_grad_norm) & jnp.isfinite(d_stats["d_loss"])
            & jnp.isfinite(d_stats["d_grad_norm"]))
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_params = {"generator": new_g_params, "discriminator": new_d_params}
  new_state = state.replace(
      step=step + 1,
      params=keep_old(new_params, state.params),
      g_opt_state=keep_old(g_opt_state, state.g_opt_state),
      d_opt_state=keep_old(d_opt_state, state.d_opt_state),
      ema_params=keep_old(new_ema, state.ema_params),
      lecam=keep_old(lecam, state.lecam),
      code_usage=keep_old(code_usage, state.code_usage),
      first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, step,
                                     state.first_nonfinite_step),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))

  metrics = {"loss": g_loss, **{f"g_{n}": v for n, v in g_terms.items()}, "g_grad_norm": g_grad_norm,
             **d_stats, "batch_code_usage": jnp.mean((batch_hist > 0).astype(jnp.float32)),
             "alive_codes": jnp.mean((code_usage >= codebook.dead_ratio / k).astype(jnp.float32)),
             "restarted_codes": restarted,
             "batch_psnr": jnp.mean(image_metrics.psnr(images, jnp.clip(recon, 0.0, 1.0))),
             "gan_active": gan_active.astype(jnp.float32), "finite": finite.astype(jnp.float32)}
  if g_schedule is not None:
    metrics["lr"] = g_schedule(step)
  return new_state, metrics


# ------------------------------------------------------------------------------------------------------------
# Held-out evaluation.


def eval_sums(gen_params, batch, *, vqgan: VQGAN):
  """Per-batch sums over real (unpadded) images: psnr, ssim, l1, mse, count; and the code histogram [K].

  Reconstructions are clipped to [0, 1] before the metrics (what anyone looking at them sees).
  """
  images = batch["image"]
  mask = batch["_mask"].astype(jnp.float32)
  recon, aux = vqgan.apply({"params": gen_params}, images)
  recon = jnp.clip(recon, 0.0, 1.0)
  per_image = {
      "psnr": image_metrics.psnr(images, recon),
      "ssim": image_metrics.ssim(images, recon),
      "l1": jnp.mean(jnp.abs(images - recon), axis=(1, 2, 3)),
      "mse": jnp.mean(jnp.square(images - recon), axis=(1, 2, 3)),
  }
  sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
  sums["count"] = jnp.sum(mask)
  hist = image_metrics.code_histogram(aux["ids"], vqgan.config.codebook_size, mask)
  return sums, hist


def _reconstruct(gen_params, images, *, vqgan: VQGAN):
  """(images, clipped reconstructions), for the PNG."""
  recon, _ = vqgan.apply({"params": gen_params}, images)
  return images, jnp.clip(recon, 0.0, 1.0)


def comparison_grid(originals: np.ndarray, reconstructions: np.ndarray, cols: int = 4) -> np.ndarray:
  """uint8 grid of [original | reconstruction] pairs, `cols` pairs per row, 2-pixel white gaps."""
  pairs = np.concatenate([images_lib.to_uint8(np.asarray(originals, np.float32)),
                          images_lib.to_uint8(np.asarray(reconstructions, np.float32))], axis=2)
  return images_lib.make_grid(pairs, cols=cols, pad=2, pad_value=255)


class Evaluator:
  """`__call__(state, step)`: metrics of the EMA generator on the held-out split (every process calls it).

  Periodic evals read the first `eval.num_examples` images (0 = all); the final one (step == total) always
  reads the whole split. Process 0 writes the PNG and `eval_metrics.json`.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, vqgan: VQGAN, mesh, total_steps: int):
    e = config.eval
    self.workdir, self.vqgan, self.mesh, self.total_steps = workdir, vqgan, mesh, total_steps
    self.input_cfg = pipeline.eval_input_config(config.input, split=e.split, batch_size=e.batch_size)
    sharding.check_batch_size(e.batch_size, mesh)
    self.source = pipeline.make_source(self.input_cfg)
    self.num_examples = int(e.get("num_examples", 0))
    self.num_images = int(e.get("num_images", 16))
    repl = sharding.replicated(mesh)
    self._sums = jax.jit(functools.partial(eval_sums, vqgan=vqgan), out_shardings=repl)
    self._reconstruct = jax.jit(functools.partial(_reconstruct, vqgan=vqgan), out_shardings=repl)

  def __call__(self, state: TokenizerState, step: int) -> dict:
    limit = self.source.num_examples
    if step < self.total_steps and self.num_examples > 0:
      limit = min(limit, self.num_examples)
    batch_size = self.input_cfg["batch_size"]
    num_batches = -(-limit // batch_size)
    it = pipeline.eval_iterator(self.input_cfg, process_index=jax.process_index(),
                                process_count=jax.process_count(), source=self.source)
    totals: dict[str, float] = {}
    hist = np.zeros((self.vqgan.config.codebook_size,), np.float64)
    params = state.ema_params
    for b in range(num_batches):
      local = next(it)
      # Trim to `limit`: examples past it count as padding.
      lo = jax.process_index() * (batch_size // jax.process_count()) + b * batch_size
      local["_mask"] = local["_mask"] & (lo + np.arange(len(local["_mask"])) < limit)
      batch = sharding.global_batch({"image": local["image"], "_mask": local["_mask"]}, self.mesh)
      sums, h = jax.device_get(self._sums(params, batch))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      hist += np.asarray(h, np.float64)
      if b == 0:
        n = min(self.num_images, batch_size)
        originals, recons = jax.device_get(self._reconstruct(params, batch["image"]))
        if jax.process_index() == 0:
          images_lib.save_png(os.path.join(self.workdir, "reconstructions", f"step_{step:07d}.png"),
                              comparison_grid(originals[:n], recons[:n]))
    count = max(totals.pop("count"), 1.0)
    metrics = {k: v / count for k, v in totals.items()}
    metrics["num_examples"] = float(count)
    metrics["codebook_usage"] = image_metrics.codebook_usage(hist)
    metrics["codebook_perplexity"] = image_metrics.codebook_perplexity(hist)
    if jax.process_index() == 0:
      path = os.path.join(self.workdir, METRICS_FILE)
      with open(path + ".tmp", "w") as f:
        json.dump({"step": int(step), "split": self.input_cfg["split"], "weights": "ema", **metrics}, f, indent=2)
      os.replace(path + ".tmp", path)
    logging.info("eval at step %d (%d images): PSNR %.2f dB, SSIM %.4f, codebook usage %.1f%%, perplexity %.1f",
                 step, int(count), metrics["psnr"], metrics["ssim"], 100 * metrics["codebook_usage"],
                 metrics["codebook_perplexity"])
    return metrics


# ------------------------------------------------------------------------------------------------------------
# Export and wiring.


def export_tokenizer(directory: str, ema_params, vq_config: VQGANConfig, extra_meta: dict | None = None) -> None:
  """Params-only export {'tokenizer': {'params': EMA}} that `train.load_tokenizer` reads."""
  meta = {"kind": "tokenizer", "tokenizer": dataclasses.asdict(vq_config), **(extra_meta or {})}
  params_io.save(directory, {"tokenizer": {"params": jax.device_get(ema_params)}}, meta, overwrite=True)


def build_task(config: ml_collections.ConfigDict, workdir: str):
  """Returns (task, mesh, rules) for `trainer.run`; everything but the loop itself."""
  mesh, rules = trainer.mesh_and_rules(config)
  steps_per_epoch = pipeline.steps_per_epoch(config.input)
  total_steps, warmup_steps = trainer.schedule_steps(config, steps_per_epoch)
  loss = LossConfig.from_config(config.loss)
  vqgan, disc = make_models(config)
  o = config.optim
  cb = CodebookConfig.from_config(config.get("codebook"))
  g_tx, g_schedule = make_optimizer(o.lr, total_steps, warmup_steps, o, cb.lr_multiplier)
  # D's Adam only counts its own updates (none before the start step), so its schedule spans the rest.
  d_span = total_steps - max(loss.discriminator_start_step, 0)
  d_tx, _ = make_optimizer(o.get("d_lr", o.lr), d_span, warmup_steps, o)
  perceptual = tl.PerceptualLoss.load(loss.perceptual_weights or None)
  if perceptual.enabled and loss.perceptual_weight > 0:
    logging.info("%s, weight %g", perceptual.status, loss.perceptual_weight)
  else:
    reason = (perceptual.status if not perceptual.enabled
              else f"weights {perceptual.path} loaded but loss.perceptual_weight is 0")
    # The weights cannot be downloaded here; the offline configs are tuned to train well without them.
    logging.warning("%s (set config.loss.perceptual_weights to a local LPIPS-VGG16 .npz to enable it): "
                    "training WITHOUT the perceptual term (reconstruction + VQ%s%s)", reason,
                    " + entropy" if loss.entropy_weight else "", " + adversarial" if loss.use_gan else "")
  logging.info("tokenizer training: %d steps (%d per epoch), %s, lr %.3g (D %.3g), warmup %d, EMA %.4g, GAN %s",
               total_steps, steps_per_epoch, vqgan.config, o.lr, o.get("d_lr", o.lr), warmup_steps, o.ema_decay,
               f"from step {loss.discriminator_start_step}" if loss.use_gan else "off")
  task = trainer.Task(
      init_state=functools.partial(init_state, vqgan=vqgan, disc=disc, g_tx=g_tx, d_tx=d_tx),
      step=functools.partial(train_step, vqgan=vqgan, disc=disc, g_tx=g_tx, d_tx=d_tx, loss=loss,
                             ema_decay=float(o.ema_decay), g_schedule=g_schedule, codebook=cb),
      extras=perceptual, batch_keys=("image",), total_steps=total_steps,
      export=lambda state: export_tokenizer(os.path.join(workdir, "params"), state.ema_params, vqgan.config,
                                            {"train_steps": total_steps, "ema_decay": float(o.ema_decay)}),
      evaluate=Evaluator(config, workdir, vqgan, mesh, total_steps) if config.get("eval") else None)
  return task, mesh, rules


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) tokenizer training in `workdir`; returns the last logged metrics."""
  start = time.perf_counter()
  task, mesh, rules = build_task(config, workdir)
  metrics = trainer.run(config, workdir, task, mesh, rules)
  logging.info("tokenizer training finished in %.1f s", time.perf_counter() - start)
  return metrics
