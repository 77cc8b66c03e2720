"""Cached-token pretraining: the frozen tokenizer's ids of K augmented views per image, computed once.

MAGE's tokenizer is frozen, so re-encoding every image at every step (44 % of a ViT-B step's FLOPs at 256 px)
can be paid once: `python -m mage_jax.main --config=configs/cache_tokens.py` encodes K views of every example
(the pretraining crop + flip, view v of example i a pure function of (seed, i, v), the flip alternating from view
to view; see `pipeline.example_views`) and pretraining with `input.tokens=DIR` draws one of the K views per
example each epoch and skips the tokenizer. The trade-off: K fixed views instead of a fresh crop every epoch.

Directory layout (`DIR`):
  `cache.json`                          what the ids are (see `describe`): written first, compared on every rerun
  `shard-SSSSS-of-TTTTT.labels.npy`     int32 `[n_s]`
  `shard-SSSSS-of-TTTTT.ids.npy`        uint16 `[n_s, K, tokens]`, written last: its presence marks a finished shard
Shard s holds examples [s·E, min((s+1)·E, N)), E = `cache.shard_examples`. Every file is written to a temporary
name and renamed, so an interrupted job leaves whole shards only, and a rerun skips them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from mage_jax.data import pipeline
from mage_jax.models.vqgan import VQGAN
from mage_jax.system import atomic
from mage_jax.train import optim

META_FILE = "cache.json"
FORMAT_VERSION = 2  # 2: a view's flip alternates with its parity (`pipeline.example_views`)
MAX_CODEBOOK = 1 << 16  # ids are stored as uint16
_VIEW_CHOICE_PURPOSE = 6  # which of the K views an epoch uses: a stream apart from the pipeline's


def check_codebook(codebook_size: int) -> None:
  """Refuses codebooks whose ids do not fit the cache's uint16."""
  if not 0 < codebook_size <= MAX_CODEBOOK:
    raise ValueError(
      f"tokenizer codebook_size {codebook_size} does not fit the cache's uint16 ids (at most {MAX_CODEBOOK})"
    )


def refuse_cached_input(config: ml_collections.ConfigDict) -> None:
  """For jobs that read images (MAGE-C, class-conditional, tokenizer training): `input.tokens` would otherwise be
  silently ignored."""
  if config.input.get("tokens"):
    raise ValueError(
      f"input.tokens={config.input.tokens}: cached-token training is supported by mode 'pretrain' "
      f"only, not {config.mode!r}; unset input.tokens"
    )


def tokenizer_fingerprint(tokenizer: VQGAN, tokenizer_vars, tokenizer_cfg: ml_collections.ConfigDict) -> dict:
  """What decides the ids: the tokenizer's sizes, how it runs (dtype, precision) and the SHA-256 of its weights.

  Returns:
    {'config': VQGANConfig fields, 'dtype', 'precision', 'sha256': of every leaf's path, dtype, shape and bytes}.
  """
  h = hashlib.sha256()
  for path, leaf in sorted(
    jax.tree_util.tree_flatten_with_path(jax.device_get(tokenizer_vars))[0], key=lambda item: optim.path_str(item[0])
  ):
    array = np.ascontiguousarray(leaf)
    h.update(f"{optim.path_str(path)}\0{array.dtype.str}\0{array.shape}\n".encode())
    h.update(array.tobytes())
  config = json.loads(json.dumps(dataclasses.asdict(tokenizer.config)))  # tuples as JSON lists, as read back
  return {
    "config": config,
    "dtype": tokenizer_cfg.get("dtype", "float32"),
    "precision": tokenizer_cfg.get("precision", "highest"),
    "sha256": h.hexdigest(),
  }


def describe(config: ml_collections.ConfigDict, tokenizer: VQGAN, tokenizer_vars, num_examples: int) -> dict:
  """`cache.json` of a cache job: the ids' shapes, the tokenizer fingerprint, the crop law and the sharding."""
  c = pipeline.InputConfig.from_config(config.input)
  views, shard_examples = config.cache.views, config.cache.shard_examples
  if views < 1:
    raise ValueError(f"cache.views must be >= 1, got {views}")
  if shard_examples <= 0 or shard_examples % c.batch_size:
    raise ValueError(
      f"cache.shard_examples ({shard_examples}) must be a positive multiple of input.batch_size ({c.batch_size})"
    )
  return {
    "format_version": FORMAT_VERSION,
    "num_examples": num_examples,
    "views": views,
    "num_tokens": tokenizer.config.num_tokens,
    "codebook_size": tokenizer.config.codebook_size,
    "shard_examples": shard_examples,
    "num_shards": -(-num_examples // shard_examples),
    "tokenizer": tokenizer_fingerprint(tokenizer, tokenizer_vars, config.tokenizer),
    "input": {"name": c.name, "split": c.split},
    "crop": {
      "seed": config.seed,
      "image_size": c.image_size,
      "augment": c.augment,
      "scale": list(c.scale),
      "ratio": list(c.ratio),
      "interpolation": c.interpolation,
      "rand_augment": c.rand_augment,
      "crop_ratio": c.crop_ratio,
      "eval_interpolation": c.eval_interpolation,
    },
  }


def _differences(old, new, prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between two JSON trees."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
  return [] if old == new else [f"{prefix[:-1]} ({old!r} -> {new!r})"]


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, META_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{directory} is not a token cache (no {META_FILE}; write one with "
      "python -m mage_jax.main --config=configs/cache_tokens.py)"
    )
  if os.path.getsize(path) > _META_MAX_BYTES:
    raise ValueError(f"{path} is over {_META_MAX_BYTES} bytes: not a token cache's description")
  try:
    with open(path) as f:
      meta = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is unreadable ({e}): the token cache is damaged") from None
  problem = _meta_problem(meta)
  if problem:
    raise ValueError(f"{path}: {problem}: the token cache is damaged")
  return meta


_META_MAX_BYTES = 1 << 20
# What a cache's description may claim, so that a crafted one costs bounded work before it is refused: shard
# names have five digits, ids are uint16.
_META_RANGES = {
  "num_examples": (1, 10**11),
  "shard_examples": (1, 10**9),
  "views": (1, 1024),
  "num_tokens": (1, 1 << 16),
  "codebook_size": (1, 1 << 16),
  "num_shards": (1, 99_999),
}


def _meta_problem(meta) -> str | None:
  if not isinstance(meta, dict):
    return f"a JSON {type(meta).__name__}, not an object"
  for key, (low, high) in _META_RANGES.items():
    value = meta.get(key)
    if type(value) is not int or not low <= value <= high:  # noqa: E721 (bool is an int subclass)
      return f"{key} is {value!r}, expected a whole number in [{low}, {high}]"
  if meta["num_shards"] != -(-meta["num_examples"] // meta["shard_examples"]):
    return (
      f"num_shards {meta['num_shards']} does not cover num_examples {meta['num_examples']} in shards of "
      f"{meta['shard_examples']}"
    )
  if not isinstance(meta.get("tokenizer"), dict):
    return "no tokenizer fingerprint"
  return None


def prepare_directory(directory: str, meta: dict) -> None:
  """Starts a cache in `directory`, or accepts a rerun of the same job; refuses one that would mix ids."""
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(os.path.join(directory, META_FILE)):
    diff = _differences(read_meta(directory), meta)
    if diff:
      raise ValueError(
        f"{directory} holds a token cache of another tokenizer or config ({'; '.join(diff[:4])}): use a new directory"
      )
    return
  if jax.process_index() == 0:
    atomic.write_bytes(os.path.join(directory, META_FILE), json.dumps(meta, indent=1).encode())


def shard_path(directory: str, shard: int, num_shards: int, what: str) -> str:
  return os.path.join(directory, f"shard-{shard:05d}-of-{num_shards:05d}.{what}.npy")


def shard_range(meta: dict, shard: int) -> tuple[int, int]:
  """Examples [start, stop) of a shard."""
  start = shard * meta["shard_examples"]
  return start, min(start + meta["shard_examples"], meta["num_examples"])


def finished_shards(directory: str, meta: dict) -> set[int]:
  names = set(os.listdir(directory))
  return {
    s for s in range(meta["num_shards"]) if os.path.basename(shard_path("", s, meta["num_shards"], "ids")) in names
  }


def write_shard(directory: str, meta: dict, shard: int, ids: np.ndarray, labels: np.ndarray) -> None:
  """Writes a shard's labels then its ids (the commit), each atomically.

  Args:
    ids: int `[n_s, K, tokens]` in [0, codebook_size).
    labels: int `[n_s]`.
  """
  start, stop = shard_range(meta, shard)
  want = (stop - start, meta["views"], meta["num_tokens"])
  if ids.shape != want or labels.shape != want[:1]:
    raise ValueError(f"shard {shard}: ids {ids.shape} / labels {labels.shape}, expected {want}")
  if ids.min() < 0 or ids.max() >= meta["codebook_size"]:
    raise ValueError(f"shard {shard}: ids outside [0, {meta['codebook_size']})")
  for what, array in (("labels", labels.astype(np.int32)), ("ids", ids.astype(np.uint16))):
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic.write_bytes(shard_path(directory, shard, meta["num_shards"], what), buffer.getvalue())


def _load_npy(path: str, mmap_mode: str | None) -> np.ndarray:
  try:
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({e}): the token cache is damaged") from None


class TokenCache:
  """A finished cache, read-only: ids memory-mapped shard by shard, labels in memory."""

  def __init__(self, directory: str):
    self.directory = directory
    self.meta = meta = read_meta(directory)
    if meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(
        f"{directory}: token cache format {meta.get('format_version')}, this version reads {FORMAT_VERSION} "
        "(views whose flips alternate): write the cache again into a new directory"
      )
    missing = sorted(set(range(meta["num_shards"])) - finished_shards(directory, meta))
    if missing:
      raise ValueError(
        f"{directory}: token cache incomplete ({len(missing)} of {meta['num_shards']} shards missing, "
        f"first {missing[0]}): rerun the cache job to finish it"
      )
    self.num_examples, self.views, self.num_tokens = meta["num_examples"], meta["views"], meta["num_tokens"]
    self._ids, labels = [], []
    for s in range(meta["num_shards"]):
      start, stop = shard_range(meta, s)
      ids, lab = (
        _load_npy(shard_path(directory, s, meta["num_shards"], what), mmap)
        for what, mmap in (("ids", "r"), ("labels", None))
      )
      if (
        ids.shape != (stop - start, self.views, self.num_tokens)
        or ids.dtype != np.uint16
        or lab.shape != (stop - start,)
      ):
        raise ValueError(
          f"{directory}: shard {s} holds ids {ids.shape} {ids.dtype} and labels {lab.shape}, "
          f"expected ({stop - start}, {self.views}, {self.num_tokens}) uint16"
        )
      self._ids.append(ids)
      labels.append(lab)
    self.labels = np.concatenate(labels)

  def steps_per_epoch(self, batch_size: int) -> int:
    """`num_examples // batch_size`, as the image pipeline (the last partial batch of an epoch is dropped)."""
    if self.num_examples < batch_size:
      raise ValueError(
        f"global batch_size {batch_size} is larger than the token cache {self.directory} ({self.num_examples} examples)"
      )
    return self.num_examples // batch_size

  def check_tokenizer(self, fingerprint: dict) -> None:
    """Refuses training with another tokenizer than the one that wrote the ids."""
    diff = _differences(self.meta["tokenizer"], fingerprint)
    if diff:
      raise ValueError(
        f"input.tokens={self.directory} was written by another tokenizer than config.tokenizer gives "
        f"({'; '.join(diff[:3])})"
      )

  def ids(self, index: np.ndarray, view: np.ndarray) -> np.ndarray:
    """int32 `[M, tokens]`: view `view[m]` of example `index[m]`."""
    shard, offset = np.divmod(np.asarray(index, np.int64), self.meta["shard_examples"])
    out = np.empty((len(shard), self.num_tokens), np.int32)
    for s in np.unique(shard):
      rows = shard == s
      out[rows] = self._ids[s][offset[rows], np.asarray(view)[rows]]
    return out


@functools.lru_cache(maxsize=2)
def _epoch_views(seed: int, epoch: int, num_examples: int, views: int) -> np.ndarray:
  return np.random.default_rng([seed, _VIEW_CHOICE_PURPOSE, epoch]).integers(views, size=num_examples)


def batch_views(
  step: int, *, seed: int, num_examples: int, views: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """(example index, view) int64 `[batch_size]` each of global batch `step`: a pure function of (seed, step).

  The examples are the image pipeline's (`pipeline.global_batch_indices`: every example once per epoch); each
  epoch uses one view per example, drawn uniformly from the K.
  """
  index = pipeline.global_batch_indices(step, seed=seed, num_examples=num_examples, batch_size=batch_size)
  epoch = step // (num_examples // batch_size)
  return index, _epoch_views(seed, epoch, num_examples, views)[index]


def train_data(cache: TokenCache, *, seed: int, batch_size: int) -> Callable[[int], Iterator[dict]]:
  """`Task.data` of cached-token pretraining: this process's slice of {'ids': int32 `[B, tokens]`, 'label'}."""
  cache.steps_per_epoch(batch_size)
  local = batch_size // jax.process_count()
  lo = jax.process_index() * local

  def data(start_step: int):
    for step in range(start_step, 2**62):
      index, view = batch_views(
        step, seed=seed, num_examples=cache.num_examples, views=cache.views, batch_size=batch_size
      )
      index, view = index[lo : lo + local], view[lo : lo + local]
      yield {"ids": cache.ids(index, view), "label": cache.labels[index]}

  return data
