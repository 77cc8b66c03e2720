"""`input.name='random'`: uniform random images and labels, without files or TensorFlow.

For smoke runs, benchmarks and device checks on hosts without a dataset or without TensorFlow. Every image is
uniform noise in [0, 1) and every label uniform in [0, NUM_CLASSES), drawn from (seed, global example
position), so batches are a pure function of (seed, step) like the tf.data pipeline's: a resumed run sees the
batches an uninterrupted one would, on any number of processes. Nothing is augmented (the config's `augment`
does not apply). Split sizes are ImageNet-1k's, so epoch-based schedules keep their lengths; a TFDS-style slice
(`train[:2000]`, `validation[100:200]`) takes that many.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

NAME = "random"
NUM_CLASSES = 1000
TRAIN_EXAMPLES = 1_281_167  # ImageNet-1k train; any other split has EVAL_EXAMPLES
EVAL_EXAMPLES = 50_000
# Mixed into the seed: streams unrelated to the pipeline's shuffling and augmentation, train apart from eval.
TRAIN_PURPOSE, EVAL_PURPOSE = 3, 4


def is_random(name: str) -> bool:
  return name == NAME


class _NoCorruptFiles:
  """`Source.stats` of the file-backed sources: random images are never corrupt."""

  @staticmethod
  def snapshot() -> dict[str, object]:
    return {"corrupt_skipped": 0, "corrupt_files": ()}


def split_size(split: str) -> int:
  """Examples of a split name: ImageNet-1k's sizes, or the length of a slice `name[a:b]` (absolute bounds)."""
  total = TRAIN_EXAMPLES if split.startswith("train") else EVAL_EXAMPLES
  sliced = re.fullmatch(r"[\w]+\[(\d*):(\d*)\]", split)
  if not sliced:
    if "[" in split:
      raise ValueError(f"input split {split!r}: the 'random' input takes a name or a slice name[a:b]")
    return total
  lo, hi = int(sliced.group(1) or 0), min(int(sliced.group(2) or total), total)
  if hi <= lo:
    raise ValueError(f"input split {split!r} is empty")
  return hi - lo


class RandomSource:
  """The 'random' dataset: `num_examples` of a split, no storage."""

  def __init__(self, split: str):
    self.split = split
    self.num_examples = split_size(split)
    self.stats = _NoCorruptFiles()


def _example(seed: int, purpose: int, position: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.int32]:
  rng = np.random.default_rng([seed, purpose, position])
  return rng.random(shape, dtype=np.float32), np.int32(rng.integers(NUM_CLASSES))


class RandomIterator(Iterator[dict[str, np.ndarray]]):
  """This process's slice [lo, lo + local) of consecutive global batches, as `pipeline.DataIterator` yields them.

  Train: 'image' float32 [local, S, S, 3] ([local, views, S, S, 3] for several views), 'label' int32 [local],
  optionally 'index'. Eval (`num_batches` set, seed 0): also '_mask'; positions past the split are zero images
  with label 0 and mask False.
  """

  def __init__(
    self,
    source: RandomSource,
    *,
    seed: int,
    image_size: int,
    batch_size: int,
    lo: int,
    local: int,
    start_step: int = 0,
    views: int = 1,
    num_batches: int | None = None,
    return_index: bool = False,
  ):
    self.source = source
    self.num_batches = num_batches
    self._seed, self._batch, self._lo, self._local = seed, batch_size, lo, local
    self._shape = (image_size, image_size, 3) if views == 1 else (views, image_size, image_size, 3)
    self._step, self._return_index = start_step, return_index

  @property
  def stats(self) -> dict[str, object]:
    return self.source.stats.snapshot()

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("The train iterator is infinite.")
    return self.num_batches

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self._step >= self.num_batches:
      raise StopIteration
    positions = self._step * self._batch + self._lo + np.arange(self._local, dtype=np.int64)
    self._step += 1
    evaluating = self.num_batches is not None
    n = self.source.num_examples
    purpose = EVAL_PURPOSE if evaluating else TRAIN_PURPOSE
    examples = [
      _example(self._seed, purpose, int(p) % n, self._shape)
      if not evaluating or p < n
      else (np.zeros(self._shape, np.float32), np.int32(0))
      for p in positions
    ]
    out = {"image": np.stack([e[0] for e in examples]), "label": np.array([e[1] for e in examples], np.int32)}
    if evaluating:
      out["_mask"] = positions < n
    if self._return_index:
      out["index"] = np.minimum(positions, n - 1) if evaluating else positions % n
    return out
