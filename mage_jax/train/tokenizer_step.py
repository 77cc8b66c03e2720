"""One VQGAN tokenizer training step (MaskGIT's recipe + LeCam): generator + discriminator updates, EMA, codebook care.

The generator loss (reconstruction + VQ codebook/commitment + optional entropy + optional perceptual +
adversarial from `discriminator_start_step` on) is minimised with its own Adam; then one discriminator step
(non-saturating or hinge, LeCam, optional R1) on the same real batch and the stop-gradient reconstructions,
with a second Adam. Before the discriminator starts, its forward/backward passes are skipped entirely
(`lax.cond`). The generator weights are tracked by an EMA. A step whose losses or gradients are non-finite
changes nothing but the step counter (`steps.commit`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mage_jax.evals import image_metrics
from mage_jax.models.discriminator import Discriminator
from mage_jax.models.vqgan import VQGAN
from mage_jax.objectives import tokenizer_losses as tl
from mage_jax.train import steps


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


@dataclasses.dataclass(frozen=True)
class CodebookConfig:
  """Typed view of `config.codebook`: how the training loop (not the model) looks after the codebook.

  lr_multiplier: the codebook's Adam steps are this many times the generator's.
  restart_every: every this many steps (and at step 0 when `restart_at_start`, i.e. a data-dependent
    initialisation), codes whose usage EMA is below `dead_ratio / K` (a fraction of the uniform share) are
    replaced by encoder outputs drawn at random from the current batch. 0 disables restarts.
  usage_decay: decay of the per-code usage EMA (fraction of the batch's latents assigned to each code).
  freeze: the codebook gets no update at all (no optimizer step, no restart, and its EMA copy is kept as it
    is), so the token ids of a fine-tuned tokenizer keep their meaning for a MAGE trained on the original.
  restart_at_start: also restart at step 0. Right for a fresh codebook; the tokenizer job turns it off when
    it starts from trained weights (`tokenizer.init`), since at step 0 no usage has been seen yet and every
    code would count as dead.
  """

  lr_multiplier: float = 1.0
  restart_every: int = 0
  usage_decay: float = 0.99
  dead_ratio: float = 0.03
  freeze: bool = False
  restart_at_start: bool = True

  def __post_init__(self):
    if self.lr_multiplier <= 0:
      raise ValueError(f"codebook.lr_multiplier must be > 0, got {self.lr_multiplier}")
    if self.restart_every < 0:
      raise ValueError(f"codebook.restart_every must be >= 0, got {self.restart_every}")
    if self.freeze and self.restart_every:
      raise ValueError(
        f"codebook.freeze keeps every code as it is; it cannot be combined with "
        f"codebook.restart_every={self.restart_every} (restarts replace dead codes)"
      )
    if not 0.0 <= self.usage_decay < 1.0:
      raise ValueError(f"codebook.usage_decay must be in [0, 1), got {self.usage_decay}")


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
    g_opt_state=g_tx.init(g_params),
    d_opt_state=d_tx.init(d_params),
    ema_params=jax.tree.map(jnp.copy, g_params),
    lecam=tl.LeCamState.create(),
    code_usage=jnp.zeros((vqgan.config.codebook_size,), jnp.float32),
    rng=jax.random.key_data(jax.random.fold_in(rng, 2)),
    first_nonfinite_step=jnp.full((), -1, jnp.int32),
    skipped_steps=jnp.zeros((), jnp.int32),
  )


def ema_update(ema, params, decay: float):
  """decay·ema + (1 − decay)·params, leafwise in float32."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def _zeros_like_terms(keys):
  return {k: jnp.zeros((), jnp.float32) for k in keys}


def restart_dead_codes(
  codebook: jax.Array, usage: jax.Array, z: jax.Array, rng: jax.Array, active: jax.Array, dead_ratio: float
) -> tuple[jax.Array, jax.Array]:
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


def is_codebook(path: str) -> bool:
  """Whether a '/'-joined generator param path (`optim.path_str`) is the quantizer's codebook."""
  return "quantize" in path


def codebook_of(g_params) -> jax.Array:
  return g_params["quantize"]["embedding"]["embedding"]


def _with_codebook(g_params, codebook):
  q = dict(g_params["quantize"])
  q["embedding"] = {**q["embedding"], "embedding": codebook}
  return {**g_params, "quantize": q}


def train_step(
  state: TokenizerState,
  perceptual: tl.PerceptualLoss,
  batch,
  *,
  vqgan: VQGAN,
  disc: Discriminator,
  g_tx,
  d_tx,
  loss: LossConfig,
  ema_decay: float,
  g_schedule=None,
  codebook: CodebookConfig = CodebookConfig(),
):
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
    entropy = (
      tl.entropy_loss(aux["distances"], loss.entropy_temperature) if loss.entropy_weight else jnp.zeros((), jnp.float32)
    )
    percep = jnp.mean(perceptual(images, recon)) if use_perceptual else jnp.zeros((), jnp.float32)
    total, terms = tl.generator_loss_terms(
      images,
      recon,
      codebook_loss=aux["codebook"],
      commitment_loss=aux["commitment"],
      entropy=entropy,
      perceptual=percep,
      logits_fake=None,
      rec_type=loss.rec_type,
      rec_weight=loss.rec_weight,
      entropy_weight=loss.entropy_weight,
      perceptual_weight=loss.perceptual_weight,
    )
    if loss.use_gan:
      # Before the start step the adversarial term has weight 0: skip D's forward/backward altogether.
      adv = jax.lax.cond(
        gan_active,
        lambda r: loss.adv_weight * tl.generator_adversarial_loss(disc.apply({"params": d_params}, r), loss.gan_type),
        lambda r: jnp.zeros((), jnp.float32),
        recon,
      )
      terms["adv"] = adv
      total = total + adv
    return total, (terms, aux, recon)

  (g_loss, (g_terms, aux, recon)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
  g_grad_norm = optax.tree.norm(g_grads)
  g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, g_params)
  new_g_params = optax.apply_updates(g_params, g_updates)

  k = vqgan.config.codebook_size
  batch_hist = image_metrics.code_histogram(aux["ids"], k)
  code_usage = codebook.usage_decay * state.code_usage + (1.0 - codebook.usage_decay) * batch_hist / jnp.sum(batch_hist)
  new_ema = ema_update(state.ema_params, new_g_params, ema_decay)
  restarted = jnp.zeros((), jnp.float32)
  if codebook.freeze:
    # decay·c + (1 − decay)·c need not round back to c: the EMA copy of a frozen codebook is kept as it is.
    new_ema = _with_codebook(new_ema, codebook_of(state.ema_params))
  if codebook.restart_every:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    due = step % codebook.restart_every == 0
    if not codebook.restart_at_start:
      due = due & (step > 0)
    new_cb, dead = restart_dead_codes(codebook_of(new_g_params), code_usage, aux["z"], rng, due, codebook.dead_ratio)
    # A restarted code keeps its low usage: unless picked up, it is redrawn at the next restart. The EMA
    # copy takes the new code as it is (a blend of an abandoned and a fresh code is no code at all).
    new_g_params = _with_codebook(new_g_params, new_cb)
    new_ema = _with_codebook(new_ema, jnp.where(dead[:, None], new_cb, codebook_of(new_ema)))
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
        logits_real,
        logits_fake,
        weight=loss.disc_weight,
        gan_type=loss.gan_type,
        r1_penalty=r1,
        lecam_state=lecam_state if loss.lecam_weight > 0 else None,
        lecam_weight=loss.lecam_weight,
        lecam_decay=loss.lecam_decay,
      )
      new_lecam = lecam_state if new_lecam is None else new_lecam
      stats = {
        "d_adv": terms["adv"],
        "d_lecam": terms["lecam"],
        "d_r1": terms["r1"],
        "logits_real": jnp.mean(logits_real),
        "logits_fake": jnp.mean(logits_fake),
      }
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
      gan_active, d_update, d_skip, (d_params, state.d_opt_state, state.lecam)
    )
  else:
    new_d_params, d_opt_state, lecam, d_stats = d_params, state.d_opt_state, state.lecam, _zeros_like_terms(d_keys)

  finite = steps.all_finite(g_loss, g_grad_norm, d_stats["d_loss"], d_stats["d_grad_norm"])
  new_state = steps.commit(
    state,
    finite,
    params={"generator": new_g_params, "discriminator": new_d_params},
    g_opt_state=g_opt_state,
    d_opt_state=d_opt_state,
    ema_params=new_ema,
    lecam=lecam,
    code_usage=code_usage,
  )

  metrics = {
    "loss": g_loss,
    **{f"g_{n}": v for n, v in g_terms.items()},
    "g_grad_norm": g_grad_norm,
    **d_stats,
    "batch_code_usage": jnp.mean((batch_hist > 0).astype(jnp.float32)),
    "alive_codes": jnp.mean((code_usage >= codebook.dead_ratio / k).astype(jnp.float32)),
    "restarted_codes": restarted,
    "batch_psnr": jnp.mean(image_metrics.psnr(images, jnp.clip(recon, 0.0, 1.0))),
    "gan_active": gan_active.astype(jnp.float32),
    "finite": finite.astype(jnp.float32),
  }
  if g_schedule is not None:
    metrics["lr"] = g_schedule(step)
  return new_state, metrics
