"""Cached-token pretraining: bitwise equal to in-step tokenization of the same views; resumable, checked cache."""

import dataclasses
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_MAGE, TINY_VQGAN, apply_overrides, random_variables, tiny_train_config
from mage_jax.data import cached_tokens, pipeline, sources
from mage_jax.jobs import cache_tokens, class_cond, mage_c, pretrain, tokenizer
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.train import params_io, trainer

VIEWS = 2


def _tokenizer_dir(directory, seed=0, **sizes):
  """A tiny random tokenizer export (4x4 tokens at 16 px), made from shapes: jitting its init costs seconds."""
  tok_config = VQGANConfig(**{**TINY_VQGAN, **sizes})
  variables = {"tokenizer": random_variables(VQGAN(tok_config), seed, jnp.zeros((1, 16, 16, 3)))}
  params_io.save(str(directory), variables, {"kind": "tokenizer", "tokenizer": dataclasses.asdict(tok_config)})
  return str(directory)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return _tokenizer_dir(tmp_path_factory.mktemp("tokenizer") / "params")


def _cache_config(image_folder, tokenizer, **overrides):
  """96 folder images at 16 px, 2 views, batches of 20 examples on 4 devices, shards of 40 (the last padded)."""
  from configs import cache_tokens as cache_config

  config = cache_config.get_config(f"base=fashion_mnist_tiny,views={VIEWS},batch=20,shard_batches=2")
  config.input.name = f"folder:{image_folder}"
  config.input.image_size = 16
  config.tokenizer.init = tokenizer
  config.num_devices = 4
  return apply_overrides(config, **overrides)


def _train_config(image_folder, tokenizer, **overrides):
  """A one-block MAGE on one device (the sharded step is test_trainer's subject), 3 steps: compiles in seconds."""
  model = {f"model.{k}": v for k, v in TINY_MAGE.items() if k != "num_tokens"}
  return tiny_train_config(
    image_folder, 3, num_devices=1, mesh="data=1,fsdp=1,model=1", **{"tokenizer.init": tokenizer, **model, **overrides}
  )


def _files(directory):
  names = sorted(n for n in os.listdir(directory) if n != "config.json")
  return {n: open(os.path.join(directory, n), "rb").read() for n in names}


@pytest.fixture(scope="module")
def cache_dir(image_folder, tokenizer_dir, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tokens"))
  assert cache_tokens.train_and_evaluate(_cache_config(image_folder, tokenizer_dir), directory) == {
    "examples": 96,
    "shards_written": 3,
  }
  return directory


def test_cache_contents(cache_dir, image_folder):
  cache = cached_tokens.TokenCache(cache_dir)
  meta = cache.meta
  assert (meta["num_examples"], meta["views"], meta["num_tokens"], meta["num_shards"]) == (96, VIEWS, 16, 3)
  assert meta["crop"]["scale"] == [0.2, 1.0] and meta["crop"]["augment"] == "pretrain"
  np.testing.assert_array_equal(cache.labels, sources.FolderSource(str(image_folder), "train").labels)
  ids = np.concatenate([np.load(cached_tokens.shard_path(cache_dir, s, 3, "ids")) for s in range(3)])
  assert ids.dtype == np.uint16 and ids.shape == (96, VIEWS, 16) and ids.max() < meta["codebook_size"]
  assert np.mean(ids[:, 0] != ids[:, 1]) > 0.2  # the views are different crops


def test_views_alternate_flips(image_folder, tokenizer_dir):
  """With the whole image as every crop (the flip-only law), views 0 and 1 of each example are mirror images and
  views 0 and 2 the same image: K = 2 views hold the image and its mirror, whichever the example's coin put first."""
  cfg = _cache_config(image_folder, tokenizer_dir, **{"input.scale": (1.0, 1.0)}).input
  index = np.repeat(np.arange(24), 3)
  view = np.tile(np.arange(3), 24)
  images = next(pipeline.example_views(cfg, seed=0, index=index, view=view, batch=72))["image"].reshape(
    24, 3, 16, 16, 3
  )
  asymmetric = np.any(images[:, 0] != images[:, 0, :, ::-1], axis=(1, 2, 3))
  assert asymmetric.sum() > 20  # the check below can fail
  np.testing.assert_array_equal(images[:, 1], images[:, 0, :, ::-1])
  np.testing.assert_array_equal(images[:, 2], images[:, 0])
  plain = next(pipeline.eval_iterator({**cfg.to_dict(), "augment": "none", "batch_size": 24}))["image"]
  distance = lambda a, b: np.abs(a - b).sum(axis=(1, 2, 3))
  first_flipped = distance(images[:, 0], plain[:, :, ::-1]) < distance(images[:, 0], plain)
  assert 0 < first_flipped[asymmetric].sum() < asymmetric.sum()  # each example's coin, not one for all


def _exported(workdir):
  return params_io.load(os.path.join(workdir, "params"))[0]["model"]["params"]


def test_cached_training_is_bitwise_in_step_tokenization(cache_dir, image_folder, tokenizer_dir, tmp_path, monkeypatch):
  cached = pretrain.train_and_evaluate(
    _train_config(image_folder, tokenizer_dir, **{"input.tokens": cache_dir}), str(tmp_path / "cached")
  )
  # The same (example, view) pairs as images, tokenized inside the step as uncached pretraining does.
  cache_input = _cache_config(image_folder, tokenizer_dir).input
  config = _train_config(image_folder, tokenizer_dir)

  def views_as_images(config, abstract=False):
    assert not abstract

    def data(start_step):
      for step in itertools.count(start_step):
        index, view = cached_tokens.batch_views(
          step, seed=config.seed, num_examples=96, views=VIEWS, batch_size=config.input.batch_size
        )
        yield next(pipeline.example_views(cache_input, seed=0, index=index, view=view, batch=len(index)))

    return data

  monkeypatch.setattr(trainer, "image_data", views_as_images)
  in_step = pretrain.train_and_evaluate(config, str(tmp_path / "in_step"))
  assert cached["loss"] == in_step["loss"] and np.isfinite(cached["loss"]), (cached, in_step)
  jax.tree.map(np.testing.assert_array_equal, _exported(str(tmp_path / "cached")), _exported(str(tmp_path / "in_step")))


def test_view_draws_are_pure_and_cover_every_example():
  a = [cached_tokens.batch_views(s, seed=3, num_examples=96, views=4, batch_size=8) for s in range(12)]
  b = [cached_tokens.batch_views(s, seed=3, num_examples=96, views=4, batch_size=8) for s in (5, 0)]
  np.testing.assert_array_equal(np.concatenate(a[5]), np.concatenate(b[0]))
  np.testing.assert_array_equal(np.sort(np.concatenate([i for i, _ in a])), np.arange(96))  # an epoch
  views = np.concatenate([v for _, v in a])
  assert set(views) == {0, 1, 2, 3}
  next_epoch = cached_tokens.batch_views(12, seed=3, num_examples=96, views=4, batch_size=8)
  assert not np.array_equal(next_epoch[1], a[0][1])


class _Killed(Exception):
  pass


def test_interrupted_cache_resumes_to_identical_files(cache_dir, image_folder, tokenizer_dir, tmp_path, monkeypatch):
  write_shard = cached_tokens.write_shard
  written = []

  def killed_after_first(*args, **kwargs):
    write_shard(*args, **kwargs)
    raise _Killed

  monkeypatch.setattr(cached_tokens, "write_shard", killed_after_first)
  directory = str(tmp_path / "resumed")
  with pytest.raises(_Killed):
    cache_tokens.train_and_evaluate(_cache_config(image_folder, tokenizer_dir), directory)
  with pytest.raises(ValueError, match="incomplete"):
    cached_tokens.TokenCache(directory)
  stale = cached_tokens.shard_path(directory, 1, 3, "ids") + ".tmp"
  open(stale, "wb").write(b"half a shard")  # a kill during a write leaves its temporary file behind

  monkeypatch.setattr(
    cached_tokens, "write_shard", lambda d, m, shard, *a: (written.append(shard), write_shard(d, m, shard, *a))
  )
  assert cache_tokens.train_and_evaluate(_cache_config(image_folder, tokenizer_dir), directory)["shards_written"] == 2
  assert written == [1, 2]
  assert _files(directory) == _files(cache_dir)


def test_refusals(cache_dir, image_folder, tokenizer_dir, tmp_path):
  other = _tokenizer_dir(tmp_path / "other", seed=1)
  # A rerun into the same directory with other tokenizer weights.
  with pytest.raises(ValueError, match=r"another tokenizer or config \(tokenizer.sha256 \("):
    cache_tokens.train_and_evaluate(_cache_config(image_folder, other), cache_dir)
  with pytest.raises(ValueError, match=r"another tokenizer or config \(crop.scale \(\[0.2, 1.0\] -> \[0.5, 1.0\]\)"):
    cache_tokens.train_and_evaluate(
      _cache_config(image_folder, tokenizer_dir, **{"input.scale": (0.5, 1.0)}), cache_dir
    )
  with pytest.raises(ValueError, match="written by another tokenizer than config.tokenizer gives"):
    pretrain.train_and_evaluate(
      _train_config(image_folder, other, **{"input.tokens": cache_dir}), str(tmp_path / "other_tokenizer")
    )
  big = _tokenizer_dir(tmp_path / "big", codebook_size=65537)
  with pytest.raises(ValueError, match="codebook_size 65537 does not fit the cache's uint16 ids"):
    cache_tokens.train_and_evaluate(_cache_config(image_folder, big), str(tmp_path / "big_codebook"))
  assert not os.path.exists(tmp_path / "big_codebook")
  from configs import class_cond_fashion_mnist, mage_c_fashion_mnist, tokenizer_fashion_mnist

  for job, config_module in (
    (mage_c, mage_c_fashion_mnist),
    (class_cond, class_cond_fashion_mnist),
    (tokenizer, tokenizer_fashion_mnist),
  ):
    config = apply_overrides(config_module.get_config(), **{"input.tokens": cache_dir})
    with pytest.raises(ValueError, match=f"supported by mode 'pretrain' only, not '{config.mode}'"):
      job.train_and_evaluate(config, str(tmp_path / config.mode))
  with pytest.raises(FileNotFoundError, match="is not a token cache"):
    cached_tokens.TokenCache(str(tmp_path))
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  for name, data in _files(cache_dir).items():
    (damaged / name).write_bytes(data[: len(data) // 2] if name.endswith(".ids.npy") else data)
  with pytest.raises(ValueError, match="shard-00000-of-00003.ids.npy is unreadable"):
    cached_tokens.TokenCache(str(damaged))


@pytest.mark.parametrize(
  "claim, says",
  [
    ({"num_examples": 10**9, "shard_examples": 100, "num_shards": 10**7}, r"num_shards is 10000000, expected"),
    ({"num_shards": 2}, "num_shards 2 does not cover num_examples 96 in shards of 40"),
    ({"views": True}, "views is True, expected a whole number"),
    ({"shard_examples": 0}, r"shard_examples is 0, expected a whole number in \[1, "),
    ({"tokenizer": None}, "no tokenizer fingerprint"),
  ],
)
def test_crafted_cache_description_is_refused_before_any_work(cache_dir, tmp_path, claim, says):
  crafted = tmp_path / "crafted"
  crafted.mkdir()
  meta = json.loads(_files(cache_dir)[cached_tokens.META_FILE])
  (crafted / cached_tokens.META_FILE).write_text(json.dumps({**meta, **claim}))
  with pytest.raises(ValueError, match=f"cache.json: {says}"):
    cached_tokens.TokenCache(str(crafted))


def test_cache_of_an_older_view_law_is_refused(cache_dir, tmp_path):
  old = tmp_path / "old"
  old.mkdir()
  meta = json.loads(_files(cache_dir)[cached_tokens.META_FILE])
  (old / cached_tokens.META_FILE).write_text(json.dumps({**meta, "format_version": 1}))
  with pytest.raises(ValueError, match="token cache format 1, this version reads 2 .* write the cache again"):
    cached_tokens.TokenCache(str(old))


def test_process_slices_make_the_global_batches(monkeypatch):
  """Each process encodes its contiguous slice of every global batch; in process order they are the batch."""
  meta = {"num_examples": 14, "shard_examples": 8, "views": 2}
  batch = 4
  whole = [cache_tokens._process_examples(meta, shard, batch) for shard in (0, 1)]
  np.testing.assert_array_equal(whole[1][0], [8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 13, 13, 13, 13])
  np.testing.assert_array_equal(whole[1][1], [0, 1] * 8)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for shard in (0, 1):
    parts = []
    for p in range(2):
      monkeypatch.setattr(jax, "process_index", lambda p=p: p)
      parts.append(
        [a.reshape(-1, batch // 2 * meta["views"]) for a in cache_tokens._process_examples(meta, shard, batch)]
      )
    for k in range(2):  # index, view
      np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]], axis=1).reshape(-1), whole[shard][k])
