"""Token caching (config.mode 'cache_tokens'): the frozen tokenizer's ids of K augmented views per example.

The workdir becomes the cache (`mage_jax/data/cached_tokens.py` describes it); pretraining reads it with
`--config.input.tokens=DIR`. Global batches of `input.batch_size` examples (K views each, so K·B images) are
encoded sharded over the devices of every process; process p loads examples [p·B/P, (p+1)·B/P) of each batch,
process 0 writes. Shards are written atomically, so a rerun of the same command skips the finished ones.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from absl import logging

from mage_jax.data import cached_tokens, pipeline
from mage_jax.system import atomic
from mage_jax.train import builders, progress, sharding, steps


def _process_examples(meta: dict, shard: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(example index, view) int64 `[batches · B/P · K]` this process encodes for a shard, in batch order.

  The shard's last batch is padded with its last example; those ids are dropped.
  """
  start, stop = cached_tokens.shard_range(meta, shard)
  batches = -(-(stop - start) // batch_size)
  local = batch_size // jax.process_count()
  rows = np.arange(batches)[:, None] * batch_size + jax.process_index() * local + np.arange(local)
  index = np.minimum(start + rows.reshape(-1), stop - 1)
  views = meta["views"]
  return np.repeat(index, views), np.tile(np.arange(views), index.size)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes (or finishes) the token cache of `config` in `workdir`; returns {'examples', 'shards_written'}."""
  batch_size = config.input.batch_size
  tokenizer, tokenizer_vars = builders.load_tokenizer(config)
  cached_tokens.check_codebook(tokenizer.config.codebook_size)
  source = pipeline.make_source(config.input)
  meta = cached_tokens.describe(config, tokenizer, tokenizer_vars, source.num_examples)
  mesh = sharding.data_mesh(devices=jax.devices()[: config.get("num_devices", 0) or None])
  sharding.check_batch_size(batch_size, mesh)
  cached_tokens.prepare_directory(workdir, meta)
  atomic.record_config(config, workdir)
  todo = sorted(set(range(meta["num_shards"])) - cached_tokens.finished_shards(workdir, meta))
  views, tokens = meta["views"], meta["num_tokens"]
  logging.info(
    "token cache %s: %d examples x %d views, %d of %d shards to write, %d devices",
    workdir,
    meta["num_examples"],
    views,
    len(todo),
    meta["num_shards"],
    mesh.size,
  )
  encode = jax.jit(
    functools.partial(steps.tokenize, tokenizer, chunks=config.tokenizer.get("chunks", 1)),
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
    out_shardings=sharding.batch_sharding(mesh),
  )
  variables = sharding.place(tokenizer_vars, sharding.replicated(mesh))
  left = sum(b - a for a, b in (cached_tokens.shard_range(meta, s) for s in todo))
  meter = progress.Progress(left * views, "token cache", unit="images")
  for shard in todo:
    index, view = _process_examples(meta, shard, batch_size)
    batches = pipeline.example_views(
      config.input,
      seed=config.seed,
      index=index,
      view=view,
      batch=batch_size // jax.process_count() * views,
      source=source,
    )
    ids, labels = [], []
    for batch in batches:
      arrays = sharding.global_batch({"image": batch["image"], "label": batch["label"]}, mesh)
      out = sharding.to_host({"ids": encode(variables, arrays["image"]), "label": arrays["label"]})
      ids.append(out["ids"].reshape(batch_size, views, tokens))
      labels.append(out["label"].reshape(batch_size, views)[:, 0])
      meter.update(min(batch_size * views, meter.total - meter.done))  # the padded last batch counts once
    start, stop = cached_tokens.shard_range(meta, shard)
    if jax.process_index() == 0:
      cached_tokens.write_shard(
        workdir, meta, shard, np.concatenate(ids)[: stop - start], np.concatenate(labels)[: stop - start]
      )
    logging.info("shard %d/%d written; %s", shard + 1, meta["num_shards"], meter.line())
  return {"examples": meta["num_examples"], "shards_written": len(todo)}
