"""The held-out reconstruction metrics of a tokenizer, as tokenizer training evaluates its EMA generator: PSNR,
SSIM, L1 and MSE per image (`image_metrics`), codebook usage and perplexity over the split, and a PNG of
originals beside reconstructions. During tokenizer training (type 'reconstruction' in `config.evals`) it scores
the EMA generator after every `every_steps` steps and at the end; `jobs/tokenizer.py` also runs it once on the
tokenizer a fine-tuning starts from.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mage_jax import evals
from mage_jax.data import images as images_lib, pipeline
from mage_jax.evals import image_metrics
from mage_jax.models.vqgan import VQGAN
from mage_jax.system import atomic
from mage_jax.train import sharding

METRICS_FILE = "eval_metrics.json"
INIT_METRICS_FILE = "eval_metrics_init.json"


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
  pairs = np.concatenate(
    [
      images_lib.to_uint8(np.asarray(originals, np.float32)),
      images_lib.to_uint8(np.asarray(reconstructions, np.float32)),
    ],
    axis=2,
  )
  return images_lib.make_grid(pairs, cols=cols, pad=2, pad_value=255)


@dataclasses.dataclass(frozen=True)
class Settings:
  split: str
  batch_size: int
  num_examples: int = 0  # images of each periodic eval (0: the whole split)
  final_examples: int = 0  # images of the eval at the last step (0: the whole split)
  num_images: int = 16  # reconstructions in the PNG


def during_training(settings: ml_collections.ConfigDict, job) -> "Evaluator":
  if job.model is not None or job.tokenizer is None:
    raise ValueError("reconstruction during training scores the tokenizer a tokenizer job trains")
  settings = evals.entry_settings(Settings, settings)
  if settings.batch_size < 1 or min(settings.num_examples, settings.final_examples, settings.num_images) < 0:
    raise ValueError("batch_size must be >= 1 and num_examples, final_examples and num_images >= 0")
  return Evaluator(settings, job.config.input, job.workdir, job.tokenizer, job.mesh, job.total_steps, job.params_of)


class Evaluator:
  """`__call__(state, step)`: metrics of the EMA generator on the held-out split (every process calls it).

  Periodic evals read the first `num_examples` images, the final one (step == total) the first `final_examples`
  (0 = all, for both). Process 0 writes the PNG and `eval_metrics.json`.
  """

  def __init__(self, e, input_config, workdir: str, vqgan: VQGAN, mesh, total_steps: int, params_of):
    self.workdir, self.vqgan, self.mesh, self.total_steps, self.params_of = workdir, vqgan, mesh, total_steps, params_of
    self.input_cfg = pipeline.eval_input_config(input_config, split=e.split, batch_size=e.batch_size)
    sharding.check_batch_size(e.batch_size, mesh)
    self.source = pipeline.make_source(self.input_cfg)
    self.num_examples, self.final_examples, self.num_images = e.num_examples, e.final_examples, e.num_images
    repl = sharding.replicated(mesh)
    self._sums = jax.jit(functools.partial(eval_sums, vqgan=vqgan), out_shardings=repl)
    self._reconstruct = jax.jit(functools.partial(_reconstruct, vqgan=vqgan), out_shardings=repl)

  def __call__(self, state, step: int) -> dict:
    limit = (self.num_examples if step < self.total_steps else self.final_examples) or None
    return self.evaluate(
      self.params_of(state), f"step_{step:07d}.png", METRICS_FILE, {"step": int(step), "weights": "ema"}, limit
    )

  def evaluate(self, params, png_name: str, metrics_file: str, header: dict, limit: int | None = None) -> dict:
    """Metrics of generator `params` on the first `limit` held-out images (None: all); writes the PNG of the
    first batch as reconstructions/`png_name` and the metrics as `metrics_file` (with `header`)."""
    totals: dict[str, float] = {}
    hist = np.zeros((self.vqgan.config.codebook_size,), np.float64)
    batches = pipeline.global_eval_batches(self.input_cfg, self.mesh, keys=("image",), limit=limit, source=self.source)
    for b, batch in enumerate(batches):
      sums, h = jax.device_get(self._sums(params, batch))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      hist += np.asarray(h, np.float64)
      if b == 0:
        n = min(self.num_images, self.input_cfg["batch_size"])
        originals, recons = jax.device_get(self._reconstruct(params, batch["image"]))
        if jax.process_index() == 0:
          images_lib.save_png(
            os.path.join(self.workdir, "reconstructions", png_name), comparison_grid(originals[:n], recons[:n])
          )
    count = max(totals.pop("count"), 1.0)
    metrics = {k: v / count for k, v in totals.items()}
    metrics["num_examples"] = float(count)
    metrics["codebook_usage"] = image_metrics.codebook_usage(hist)
    metrics["codebook_perplexity"] = image_metrics.codebook_perplexity(hist)
    if jax.process_index() == 0:
      path = os.path.join(self.workdir, metrics_file)
      atomic.write_json(path, {**header, "split": self.input_cfg["split"], **metrics})
    logging.info(
      "eval %s (%d images): PSNR %.2f dB, SSIM %.4f, codebook usage %.1f%%, perplexity %.1f",
      header,
      int(count),
      metrics["psnr"],
      metrics["ssim"],
      100 * metrics["codebook_usage"],
      metrics["codebook_perplexity"],
    )
    return metrics
