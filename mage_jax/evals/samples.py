"""Samples of the MAGE being trained, for the evaluators that score them (`sample_grid`, `fid`, `sfid`,
`precision_recall`): the images, their FID Inception features and the reference's, each computed once per step
however many evaluators ask, as `python -m mage_jax.generate` and `python -m mage_jax.fid` compute them.

An entry's settings (every key optional but `reference` where the reference is scored):
  num_images, batch_size, num_steps, temperature, seed   the generation (`sampling.generate_images`; a fixed seed,
                                                         so that steps are compared on the same noise)
  reference            what the samples are scored against: a dataset split ('fashion_mnist:test'), a folder or
                       .npz of images, or saved statistics with features (`python -m mage_jax.fid`'s)
  reference_images     images of the reference to use (0: all)
  weights, inception_batch   the FID Inception's weights file ('': the installed ones) and batch
  cols                 images per row of `sample_grid`'s PNG
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mage_jax import evals
from mage_jax.generation import sampling


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  num_images: int = 1000
  batch_size: int = 64  # a multiple of any power-of-two device count
  num_steps: int = sampling.DEFAULT_NUM_STEPS
  temperature: float = sampling.DEFAULT_TEMPERATURE
  seed: int = 0
  reference: str = ""
  reference_images: int = 0
  weights: str = ""
  inception_batch: int = 64
  cols: int = 8  # images per row of a grid

  def generation(self) -> tuple:
    return (self.num_images, self.batch_size, self.num_steps, self.temperature, self.seed)


def settings_of(settings, job, *, reference: bool) -> SampleSettings:
  """The checked sample settings of an entry of `job`; `reference`: the entry scores against one (and the FID
  Inception is loaded now, so missing weights stop the job before its first step)."""
  if job.model is None or job.tokenizer is None:
    raise ValueError("samples need the MAGE a job trains; this job trains none")
  if getattr(job.model.config, "num_classes", 0):
    raise ValueError("samples are unconditional; this MAGE is class-conditional")
  s = checked(settings, reference=reference)
  if reference:
    inception(job, s)
  return s


def checked(settings, *, reference: bool) -> SampleSettings:
  """`SampleSettings` of an entry (or of an eval config's `samples` section), in range."""
  s = evals.entry_settings(SampleSettings, settings)
  devices = jax.device_count()
  if s.num_images < 1 or s.num_steps < 1 or s.cols < 1:
    raise ValueError(f"num_images, num_steps and cols must be >= 1, got {s.num_images}, {s.num_steps}, {s.cols}")
  if s.batch_size < 1 or s.batch_size % devices or s.inception_batch < 1:
    raise ValueError(
      f"batch_size must be a positive multiple of the {devices} devices and inception_batch >= 1, got "
      f"{s.batch_size} and {s.inception_batch}"
    )
  if not np.isfinite(s.temperature) or s.temperature < 0:
    raise ValueError(f"temperature must be a finite number >= 0, got {s.temperature}")
  if s.reference_images < 0:
    raise ValueError(f"reference_images must be >= 0 (0: all), got {s.reference_images}")
  if reference and not s.reference:
    raise ValueError("set reference: a dataset split such as fashion_mnist:test, or a folder or .npz of images")
  return s


def images(job, state, step: int, s: SampleSettings) -> np.ndarray:
  """uint8 [num_images, H, W, 3]: the samples of `state` at `step`, generated once per step and settings."""
  key = ("images", step, s.generation())
  cache = job.shared.setdefault("samples", {})
  if key not in cache:
    cache.clear()  # one step's samples at a time
    variables = {"model": {"params": job.params_of(state)}, "tokenizer": job.tokenizer_vars}
    batches = sampling.generate_images(
      job.model,
      job.tokenizer,
      variables,
      jax.random.key(s.seed),
      s.num_images,
      s.batch_size,
      s.num_steps,
      s.temperature,
      mesh=job.mesh,  # the training mesh the loop has set: the batch is split over its 'data' axis
    )
    cache[key] = np.concatenate(list(batches))
  return cache[key]


def inception(job, s: SampleSettings):
  from mage_jax.fid import weights  # pylint: disable=g-import-not-at-top

  key = ("inception", s.weights)
  if key not in job.shared:
    try:
      job.shared[key] = _DataParallel(weights.load_inception(s.weights or None), job.mesh)
    except (FileNotFoundError, weights.WeightsError) as e:
      raise ValueError(f"the FID Inception cannot be loaded: {e}") from None
  return job.shared[key]


class _DataParallel:
  """The FID Inception with each batch split over the mesh's 'data' axis. Inside the loop's mesh an unplaced
  batch would be computed whole on every device (8 times over on 8 devices)."""

  def __init__(self, model, mesh):
    self.model, self.batch_sharding, self.parts = model, NamedSharding(mesh, P("data")), mesh.shape["data"]
    self.cache_tag = model.cache_tag  # what the reference statistics of a dataset split are cached under

  def __call__(self, images, spatial: bool = False):
    from mage_jax.train import sharding  # pylint: disable=g-import-not-at-top

    images = np.asarray(images)
    n = len(images)
    padded = np.concatenate([images, np.zeros((-n % self.parts,) + images.shape[1:], images.dtype)])
    out = self.model(jax.device_put(padded, self.batch_sharding), spatial=spatial)
    # Gathered on every process: with several, the outputs are not all addressable from one.
    return tuple(None if x is None else sharding.to_host(x)[:n] for x in out)


def statistics(job, state, step: int, s: SampleSettings):
  """The samples' `metrics.ImageStatistics` with sFID's spatial moments and the pool3 features (and the logits
  where the weights carry the classifier), once per step and settings."""
  from mage_jax.fid import metrics  # pylint: disable=g-import-not-at-top

  key = ("statistics", step, s.generation(), s.weights)
  cache = job.shared.setdefault("statistics", {})
  if key not in cache:
    cache.clear()
    pixels = images(job, state, step, s)
    cache[key] = metrics.compute_stats_for_images(
      [pixels], inception(job, s), batch_size=s.inception_batch, total=len(pixels), extras=True
    )
  return cache[key]


def reference(job, s: SampleSettings):
  """The reference's statistics with spatial moments and features, computed (or read from the cache) once."""
  from mage_jax.fid import inputs  # pylint: disable=g-import-not-at-top

  key = ("reference", s.reference, s.reference_images, s.weights)
  if key not in job.shared:
    data_dir = job.config.input.get("data_dir") or None
    job.shared[key] = inputs.reference_statistics(
      s.reference, inception(job, s), s.reference_images or None, data_dir, extras=True
    )
  return job.shared[key]


# ---------------------------------------------------------------------------------------------------------
# On a checkpoint: `python -m mage_jax.evaluate` with 'sample_grid', 'fid', 'sfid' or 'precision_recall' in its
# `config.evals` runs the same functions, with the eval config's `samples` section as their settings (one
# generation for all of them) and the params directory as the state.


def check_section(config, *, reference: bool) -> None:
  if "samples" not in config:
    raise ValueError("config.samples: the sample evaluators need a samples section (see mage_jax/evals/samples.py)")
  try:
    checked(config.samples, reference=reference)
  except ValueError as e:
    raise ValueError(f"config.samples: {e}") from None


def checkpoint_entry(during_training, *, reference: bool = True):
  """(check, run) of the evaluator contract for a sample evaluator of training (its module adds `rows`)."""

  def check(config) -> None:
    check_section(config, reference=reference)

  def run(context, features) -> dict:
    del features
    return on_checkpoint(during_training, context)

  return check, run


def on_checkpoint(during_training, context) -> dict:
  """What `during_training(config.samples, job)` measures on the eval binary's params directory."""
  from mage_jax.train import params_io, sharding  # pylint: disable=g-import-not-at-top

  if "job" not in context.shared:
    meta = params_io.read_meta(context.params_dir)
    model, tokenizer = params_io.models_from_meta(meta)
    variables, _ = params_io.load(context.params_dir)
    kept = {"model": variables["model"], "tokenizer": variables["tokenizer"]}
    params_io.check_finite(kept, context.params_dir)
    job = evals.TrainingJob(
      context.config,
      context.workdir,
      sharding.data_mesh(),
      0,
      model,
      tokenizer,
      kept["tokenizer"],
      params_of=lambda state: kept["model"]["params"],
    )
    context.shared["job"] = job, int(meta.get("train_steps", 0))
  job, step = context.shared["job"]
  with jax.set_mesh(job.mesh):
    return during_training(context.config.samples, job)(None, step)
