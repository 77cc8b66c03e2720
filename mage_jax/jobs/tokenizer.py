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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mage_jax import builders, config_views, image_metrics, images as images_lib, optim, params_io, sharding
from mage_jax import tokenizer_losses as tl
from mage_jax import tokenizer_step, trainer
from mage_jax.data import pipeline
from mage_jax.models.discriminator import Discriminator
from mage_jax.models.vqgan import VQGAN, VQGANConfig

METRICS_FILE = "eval_metrics.json"


def make_models(config: ml_collections.ConfigDict) -> tuple[VQGAN, Discriminator]:
  vq = VQGAN(builders.tokenizer_config(config.tokenizer, config.input.image_size),
             dtype=config_views.dtype(config.tokenizer.get("dtype", "float32")))
  d = config.discriminator
  widths = None if not d.get("widths") else tuple((int(r), int(w)) for r, w in d.widths)
  disc = Discriminator(widths=widths, channel_multiplier=d.get("channel_multiplier", 1),
                       dtype=config_views.dtype(d.get("dtype", "float32")))
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

  def __call__(self, state: tokenizer_step.TokenizerState, step: int) -> dict:
    limit = self.num_examples if step < self.total_steps and self.num_examples > 0 else None
    totals: dict[str, float] = {}
    hist = np.zeros((self.vqgan.config.codebook_size,), np.float64)
    params = state.ema_params
    batches = pipeline.global_eval_batches(self.input_cfg, self.mesh, keys=("image",), limit=limit,
                                           source=self.source)
    for b, batch in enumerate(batches):
      sums, h = jax.device_get(self._sums(params, batch))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      hist += np.asarray(h, np.float64)
      if b == 0:
        n = min(self.num_images, self.input_cfg["batch_size"])
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
  """Params-only export {'tokenizer': {'params': EMA}} that `builders.load_tokenizer` reads."""
  meta = {"kind": "tokenizer", "tokenizer": dataclasses.asdict(vq_config), **(extra_meta or {})}
  params_io.save(directory, {"tokenizer": {"params": jax.device_get(ema_params)}}, meta, overwrite=True)


def build_task(config: ml_collections.ConfigDict, workdir: str):
  """Returns (task, mesh, rules) for `trainer.run`; everything but the loop itself."""
  mesh, rules = trainer.mesh_and_rules(config)
  steps_per_epoch = pipeline.steps_per_epoch(config.input)
  total_steps, warmup_steps = trainer.schedule_steps(config, steps_per_epoch)
  loss = config_views.from_config(tokenizer_step.LossConfig, config.loss, "config.loss")
  vqgan, disc = make_models(config)
  o = config.optim
  cb = config_views.from_config(tokenizer_step.CodebookConfig, config.get("codebook"), "config.codebook")
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
      init_state=functools.partial(tokenizer_step.init_state, vqgan=vqgan, disc=disc, g_tx=g_tx, d_tx=d_tx),
      step=functools.partial(tokenizer_step.train_step, vqgan=vqgan, disc=disc, g_tx=g_tx, d_tx=d_tx, loss=loss,
                             ema_decay=float(o.ema_decay), g_schedule=g_schedule, codebook=cb),
      extras=perceptual, data=trainer.image_data(config), batch_keys=("image",), total_steps=total_steps,
      export=lambda state: export_tokenizer(os.path.join(workdir, "params"), state.ema_params, vqgan.config,
                                            {"train_steps": total_steps, "ema_decay": float(o.ema_decay)}),
      evaluate=Evaluator(config, workdir, vqgan, mesh, total_steps) if config.get("eval") else None)
  return task, mesh, rules


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) tokenizer training in `workdir`; returns the last logged metrics."""
  start = time.perf_counter()
  task, mesh, rules = build_task(config, workdir)
  metrics, _ = trainer.run(config, workdir, task, mesh, rules)
  logging.info("tokenizer training finished in %.1f s", time.perf_counter() - start)
  return metrics
