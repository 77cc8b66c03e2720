"""Deterministic, resumable tf.data input pipelines yielding numpy batches.

Sample order (train). With N examples, global batch B and S = N // B steps per
epoch (the last partial batch of each epoch is dropped, as the official
`drop_last=True`), global step s belongs to epoch e = s // S and holds the
examples

    index(s, j) = perm_e[(s % S) * B + j],   j = 0..B-1,

where perm_e is the stateless permutation `tf.random.experimental.index_shuffle`
keyed by (seed, e). Process p of P takes the contiguous slice j in
[p * B/P, (p+1) * B/P). The augmentation of sample (s, j) is seeded by
(seed, s * B + j); with `views` = K > 1 every example yields K independent
augmentations [K, S, S, 3], view v seeded by fold_in((seed, s * B + j), VIEW_SEED_OFFSET + v) for v > 0
(view 0 keeps the single-view seed, so K = 1 runs are unchanged). Everything is therefore a pure function of
(seed, step): an iterator started at step k yields exactly the batches an uninterrupted one
yields from step k, on any number of processes (the global batch is the
concatenation of the process slices in process order).

Eval: the split in its stored order, ceil(N / B) global batches; the tail is
padded (zero image, label 0) and `_mask` marks real examples.

Config keys (ml_collections.ConfigDict, dict or `InputConfig`):
  name ('fashion_mnist' | 'imagenet2012' | 'folder:/path' | other TFDS name | 'random': uniform noise
  without files or TensorFlow, see `synthetic.py`),
  batch_size (GLOBAL), image_size, and optionally split ('train'), data_dir,
  manual_dir, augment ('pretrain' | 'probe' | 'none'), interpolation
  ('bicubic'), num_workers (0 = tf.data AUTOTUNE), download (False),
  crop_ratio (256/292), eval_interpolation ('bicubic'), scale ((0.2, 1.0)),
  ratio ((3/4, 4/3)), rand_augment ('' or a timm spec such as 'rand-m9-mstd0.5-inc1'), views (1: one
  augmented image per example; K: K views, for MAGE-C), prefetch (2 batches), tokens ('' or a directory of
  cached token ids that pretraining reads instead of images; see `mage_jax/data/cached_tokens.py`).
  See `augment.py` and `randaugment.py` for the transforms.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epy

from mage_jax import data
from mage_jax.data import augment as augment_lib, randaugment, synthetic

# TensorFlow (and TFDS, through `sources`) load when a tf.data pipeline or source is first built: the 'random'
# input, model code and benchmarks run on hosts without them.
with epy.lazy_imports(success_callback=data.tensorflow_loaded):
  import tensorflow as tf

  from mage_jax.data import sources

# Purposes mixed into the user seed so that shuffling and augmentation draw
# from unrelated streams.
_SHUFFLE_PURPOSE = 1
_AUGMENT_PURPOSE = 2
_CACHED_VIEW_PURPOSE = 5  # `example_views`: views keyed by example index, not by sample number
# Views v > 0 fold this plus v into the sample's seed; far from the small constants the transforms fold in.
VIEW_SEED_OFFSET = 1 << 20
FLIP_COIN_OFFSET = VIEW_SEED_OFFSET - 1  # `example_views`' per-example flip coin: below every view's seed


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Typed view of the input config (see the module docstring)."""

  name: str
  batch_size: int
  image_size: int
  split: str = "train"
  data_dir: str | None = None
  manual_dir: str | None = None
  augment: str = "pretrain"
  interpolation: str = "bicubic"
  num_workers: int = 0
  download: bool = False
  crop_ratio: float = augment_lib.EVAL_CROP_RATIO
  eval_interpolation: str = "bicubic"
  scale: tuple[float, float] = augment_lib.PRETRAIN_SCALE
  ratio: tuple[float, float] = augment_lib.PRETRAIN_RATIO
  rand_augment: str = ""  # timm spec, e.g. 'rand-m9-mstd0.5-inc1' (fine-tuning); '' = off
  views: int = 1
  prefetch: int = 2
  tokens: str = ""  # cached token ids (read by the jobs, not by this pipeline)

  def __post_init__(self):
    if self.views < 1 or (self.views > 1 and self.augment == "none"):
      raise ValueError(
        f"views must be >= 1, and several views need a random augment mode (got views="
        f"{self.views}, augment={self.augment!r})."
      )
    if self.batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}.")
    if self.image_size <= 0:
      raise ValueError(f"image_size must be positive, got {self.image_size}.")
    if self.augment not in augment_lib.MODES:
      raise ValueError(f"Unknown augment {self.augment!r}; expected one of {augment_lib.MODES}.")
    if self.rand_augment:
      if self.augment == "none":
        raise ValueError(f"rand_augment={self.rand_augment!r} needs a random augment mode, not 'none'.")
      randaugment.parse(self.rand_augment)
    for interp, known in (
      (self.interpolation, augment_lib.INTERPOLATIONS),
      (self.eval_interpolation, augment_lib.EVAL_INTERPOLATIONS),
    ):
      if interp not in known:
        raise ValueError(f"Unknown interpolation {interp!r}; expected one of {known}.")

  @classmethod
  def from_config(cls, cfg: Any) -> InputConfig:
    """From an InputConfig, ConfigDict or mapping; unknown keys are an error."""
    if isinstance(cfg, cls):
      return cfg
    if hasattr(cfg, "to_dict"):
      cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
      raise TypeError(f"Expected a ConfigDict or mapping, got {type(cfg).__name__}.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
      raise ValueError(f"Unknown input config keys {unknown}; known: {sorted(fields)}.")
    kw = dict(cfg)
    for k in ("scale", "ratio"):
      if k in kw:
        kw[k] = tuple(float(v) for v in kw[k])
    return cls(**kw)


def eval_input_config(cfg: Any, *, split: str, batch_size: int) -> dict:
  """The eval view of a training input config: another split and batch, the training-only augmentation (random
  crop and flip, RandAugment, several views) switched off, as `eval_iterator` applies the eval transform whatever
  they say."""
  fields = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return {**fields, "split": split, "batch_size": batch_size, "augment": "none", "rand_augment": "", "views": 1}


def make_source(cfg: Any) -> sources.Source | synthetic.RandomSource:
  c = InputConfig.from_config(cfg)
  if synthetic.is_random(c.name):
    return synthetic.RandomSource(c.split)
  return sources.get_source(c.name, c.split, c.data_dir, manual_dir=c.manual_dir, download=c.download)


def num_examples(cfg: Any) -> int:
  """Number of examples in the configured split."""
  return make_source(cfg).num_examples


def _steps_per_epoch(n: int, batch_size: int) -> int:
  if n < batch_size:
    raise ValueError(f"Global batch_size {batch_size} is larger than the dataset ({n} examples).")
  return n // batch_size


def steps_per_epoch(cfg: Any) -> int:
  """Train steps per epoch, `num_examples // batch_size` (partial batch dropped)."""
  c = InputConfig.from_config(cfg)
  return _steps_per_epoch(num_examples(c), c.batch_size)


def _local_range(batch_size: int, process_index: int, process_count: int):
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
  if batch_size % process_count:
    raise ValueError(f"Global batch_size {batch_size} is not divisible by process_count {process_count}.")
  local = batch_size // process_count
  return process_index * local, local


def _purpose_key(seed: int, purpose: int) -> int:
  """A 64-bit key from (seed, purpose); SeedSequence is stable across numpy versions."""
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}.")
  state = np.random.SeedSequence([int(seed), purpose]).generate_state(1, np.uint64)
  return int(state.astype(np.int64)[0])


def global_batch_indices(step: int, *, seed: int, num_examples: int, batch_size: int) -> np.ndarray:
  """The example indices of global batch `step`, int64 `[batch_size]` (for tests/tools)."""
  spe = _steps_per_epoch(num_examples, batch_size)
  epoch, within = divmod(step, spe)
  pos = within * batch_size + np.arange(batch_size, dtype=np.int64)
  key = tf.constant([_purpose_key(seed, _SHUFFLE_PURPOSE), epoch], tf.int64)
  return tf.random.experimental.index_shuffle(tf.constant(pos), key, tf.constant(num_examples - 1, tf.int64)).numpy()


class DataIterator(Iterator[dict[str, np.ndarray]]):
  """Iterator of numpy batches; `stats` counts skipped corrupt images so far.

  tf.data runs ahead (prefetch), so `stats` may include examples of batches
  not yet returned.
  """

  def __init__(self, dataset: tf.data.Dataset, source: sources.Source, num_batches: int | None = None):
    self.dataset = dataset
    self.source = source
    self.num_batches = num_batches
    self._it = dataset.as_numpy_iterator()

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("The train iterator is infinite.")
    return self.num_batches

  @property
  def stats(self) -> dict[str, object]:
    return self.source.stats.snapshot()


def _finish(ds: tf.data.Dataset, load_fn, c: InputConfig, local: int):
  workers = c.num_workers if c.num_workers > 0 else tf.data.AUTOTUNE
  ds = ds.unbatch()
  ds = ds.map(load_fn, num_parallel_calls=workers, deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.prefetch(c.prefetch if c.prefetch > 0 else tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _transform(c: InputConfig):
  """(image, seed, flip=None) -> the configured training transform of one image (`augment.preprocess`)."""
  rand_augment = randaugment.parse(c.rand_augment) if c.rand_augment else None
  return lambda image, seed, flip=None: augment_lib.preprocess(
    image,
    seed,
    size=c.image_size,
    mode=c.augment,
    interpolation=c.interpolation,
    scale=c.scale,
    ratio=c.ratio,
    crop_ratio=c.crop_ratio,
    eval_interpolation=c.eval_interpolation,
    rand_augment=rand_augment,
    flip=flip,
  )


def example_views(
  cfg: Any, *, seed: int, index: np.ndarray, view: np.ndarray, batch: int, source: sources.Source | None = None
) -> DataIterator:
  """View `view[m]` of example `index[m]`, m = 0..M-1 in order, `batch` images at a time (cached-token views).

  The view is the configured training transform seeded by fold_in((seed, index), VIEW_SEED_OFFSET + view): a
  pure function of (seed, example index, view), whoever computes it and in whatever batch. Its flip alternates
  with the view's parity from a coin per example (`FLIP_COIN_OFFSET`): two views of an image are never both
  flipped or both not, so K = 2 views of the flip-only law are the image and its mirror, not one of them twice
  in half of the examples.

  Args:
    cfg: input config (module docstring); its `batch_size` is not used.
    seed: data seed, non-negative.
    index: int64 `[M]` example indices in [0, N).
    view: int64 `[M]` view numbers (>= 0).
    batch: images per yielded batch; M must be a multiple of it.
    source: reuse an already built source.

  Yields:
    `M / batch` batches {'image': float32 `[batch, S, S, 3]` in [0, 1], 'label': int32 `[batch]`}.
  """
  c = InputConfig.from_config(cfg)
  src = source or make_source(c)
  index, view = np.asarray(index, np.int64), np.asarray(view, np.int64)
  if isinstance(src, synthetic.RandomSource):
    raise ValueError("input name 'random' has no images to augment; cached views need a real dataset")
  if index.shape != view.shape or index.ndim != 1 or batch <= 0 or index.size % batch:
    raise ValueError(
      f"example_views: index {index.shape} and view {view.shape} must be equal 1-D shapes, a multiple of batch={batch}"
    )
  if index.size and (index.min() < 0 or index.max() >= src.num_examples or view.min() < 0):
    raise ValueError(f"example_views: indices must lie in [0, {src.num_examples}) and views be >= 0")
  key = tf.constant(_purpose_key(seed, _CACHED_VIEW_PURPOSE), tf.int64)
  transform = _transform(c)

  def load(el):
    image, label = src.load(el["index"])
    example = tf.stack([key, el["index"]])
    seed_ = tf.random.experimental.stateless_fold_in(example, VIEW_SEED_OFFSET + el["view"])
    coin = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(example, FLIP_COIN_OFFSET)) < 0.5
    return {"image": transform(image, seed_, tf.not_equal(coin, el["view"] % 2 == 1)), "label": label}

  ds = tf.data.Dataset.from_tensor_slices({"index": index, "view": view}).batch(batch)
  return DataIterator(_finish(ds, load, c, batch), src, num_batches=index.size // batch)


def train_iterator(
  cfg: Any,
  *,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  return_index: bool = False,
  source: sources.Source | None = None,
) -> DataIterator:
  """Infinite iterator of this process's slice of global batches start_step, +1, ...

  Args:
    cfg: input config (module docstring).
    seed: data seed (shuffling and augmentation), non-negative.
    start_step: first global step to yield (resume).
    process_index, process_count: this process's slice of the global batch.
    return_index: also yield 'index' int64 `[B_local]` (example indices).
    source: reuse an already built source (e.g. from `make_source`).

  Yields:
    {'image': float32 `[B_local, S, S, 3]` in [0, 1], 'label': int32 `[B_local]`},
    B_local = batch_size // process_count, S = image_size.
  """
  c = InputConfig.from_config(cfg)
  lo, local = _local_range(c.batch_size, process_index, process_count)
  src = source or make_source(c)
  n = src.num_examples
  spe = _steps_per_epoch(n, c.batch_size)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  if isinstance(src, synthetic.RandomSource):
    return synthetic.RandomIterator(
      src,
      seed=seed,
      image_size=c.image_size,
      batch_size=c.batch_size,
      lo=lo,
      local=local,
      start_step=start_step,
      views=c.views,
      return_index=return_index,
    )
  shuffle_key = tf.constant(_purpose_key(seed, _SHUFFLE_PURPOSE), tf.int64)
  augment_key = tf.constant(_purpose_key(seed, _AUGMENT_PURPOSE), tf.int64)
  batch = tf.constant(c.batch_size, tf.int64)
  max_index = tf.constant(n - 1, tf.int64)

  def step_elements(step):
    j = tf.range(lo, lo + local, dtype=tf.int64)
    epoch = step // spe
    pos = (step % spe) * batch + j
    index = tf.random.experimental.index_shuffle(pos, tf.stack([shuffle_key, epoch]), max_index)
    return {"index": index, "sample": step * batch + j}

  transform = _transform(c)

  def load(el):
    image, label = src.load(el["index"])
    seed_ = tf.stack([augment_key, el["sample"]])

    def view(v):
      view_seed = seed_ if v == 0 else tf.random.experimental.stateless_fold_in(seed_, VIEW_SEED_OFFSET + v)
      return transform(image, view_seed)

    out = {"image": view(0) if c.views == 1 else tf.stack([view(v) for v in range(c.views)]), "label": label}
    if return_index:
      out["index"] = el["index"]
    return out

  ds = tf.data.Dataset.range(start_step, 2**62).map(step_elements)
  return DataIterator(_finish(ds, load, c, local), src)


def num_eval_batches(n: int, batch_size: int) -> int:
  return -(-n // batch_size)


def eval_iterator(
  cfg: Any,
  *,
  process_index: int = 0,
  process_count: int = 1,
  return_index: bool = False,
  source: sources.Source | None = None,
) -> DataIterator:
  """One pass over the split with the eval transform ('none'), padded batches.

  Yields `len(iterator) = ceil(N / batch_size)` batches
  {'image': float32 `[B_local, S, S, 3]`, 'label': int32 `[B_local]`,
   '_mask': bool `[B_local]`}; global batch g holds examples g*B .. g*B+B-1 in
  stored order, process p its contiguous slice; padded entries have `_mask`
  False, a zero image and label 0.
  """
  c = InputConfig.from_config(cfg)
  lo, local = _local_range(c.batch_size, process_index, process_count)
  src = source or make_source(c)
  n = src.num_examples
  steps = num_eval_batches(n, c.batch_size)
  if isinstance(src, synthetic.RandomSource):
    return synthetic.RandomIterator(
      src,
      seed=0,
      image_size=c.image_size,
      batch_size=c.batch_size,
      lo=lo,
      local=local,
      num_batches=steps,
      return_index=return_index,
    )
  batch = tf.constant(c.batch_size, tf.int64)

  def step_elements(step):
    pos = step * batch + tf.range(lo, lo + local, dtype=tf.int64)
    return {"index": tf.minimum(pos, n - 1), "mask": pos < n}

  def load(el):
    def real():
      image, label = src.load(el["index"])
      return augment_lib.preprocess(
        image, None, size=c.image_size, mode="none", crop_ratio=c.crop_ratio, eval_interpolation=c.eval_interpolation
      ), label

    def pad():
      return (tf.zeros([c.image_size, c.image_size, 3], tf.float32), tf.constant(0, tf.int32))

    image, label = tf.cond(el["mask"], real, pad)
    out = {"image": image, "label": label, "_mask": el["mask"]}
    if return_index:
      out["index"] = el["index"]
    return out

  ds = tf.data.Dataset.range(steps).map(step_elements)
  return DataIterator(_finish(ds, load, c, local), src, num_batches=steps)


def global_eval_batches(
  cfg: Any, mesh, *, keys=("image", "label"), limit: int | None = None, source: sources.Source | None = None
) -> Iterator[dict]:
  """One pass over the split (eval transform) as global arrays sharded over `mesh`'s batch axes.

  Every process iterates (the batches are collective); each batch holds `keys` and '_mask' (False for padding
  and for examples at or past `limit`, the number of leading examples to use; None: all). `cfg.batch_size`
  is the global batch.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from mage_jax.train import sharding  # pylint: disable=g-import-not-at-top

  c = InputConfig.from_config(cfg)
  src = source or make_source(c)
  n = src.num_examples if limit is None else min(limit, src.num_examples)
  lo, local = _local_range(c.batch_size, jax.process_index(), jax.process_count())
  it = eval_iterator(c, process_index=jax.process_index(), process_count=jax.process_count(), source=src)
  for b in range(num_eval_batches(n, c.batch_size)):
    batch = next(it)
    batch["_mask"] = batch["_mask"] & (b * c.batch_size + lo + np.arange(local) < n)
    yield sharding.global_batch({k: batch[k] for k in (*keys, "_mask")}, mesh)


def measure_throughput(cfg: Any, num_batches: int, *, warmup: int = 2, seed: int = 0) -> dict[str, float]:
  """Times `num_batches` train batches after `warmup` ones.

  Returns:
    {'images_per_s', 'seconds', 'batches', 'batch_size', 'startup_s'} where
    startup_s is the time to build the source and get the warmup batches.
  """
  c = InputConfig.from_config(cfg)
  t0 = time.perf_counter()
  it = train_iterator(c, seed=seed)
  for _ in range(warmup):
    next(it)
  t1 = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  dt = time.perf_counter() - t1
  return {
    "images_per_s": num_batches * c.batch_size / dt,
    "seconds": dt,
    "batches": float(num_batches),
    "batch_size": float(c.batch_size),
    "startup_s": t1 - t0,
  }
