"""Frozen MAGE features for linear probing, few-shot and monitoring (as `models_vit_mage.py` / `main_linprobe.py`).

Pieces, usable on their own:
  * `backbone_params_from_mage` / `load_backbone`: a params-only MAGE export (or a converted ViT checkpoint)
    -> the frozen feature extractor: VQGAN ids -> `MAGEViT.features` (global pool + a fresh identity
    `fc_norm`, or the pretrained `norm` at the class slot).
  * `extract_features`: one jitted, batch-sharded pass over a split with the eval transform (dropout off, as
    the official eval loop sees them); optional npz cache (`cached`) keyed by a fingerprint of everything that
    changes the features.
  * the probe head: `init_head` + `bn_linear_head` (BatchNorm1d(affine=False, eps 1e-6) -> Linear), evaluated on
    the host by `head_predict_numpy`; `jobs/linear_probe.py` trains it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mage_jax.models import layers
from mage_jax.models.tokenizer import Tokenizer
from mage_jax.models.vit import MAGEViT
from mage_jax.models.vqgan import VQGAN
from mage_jax.train import params_io, progress as progress_lib, sharding

PyTree = Any
# (variables, images [B,H,W,3] f32 in [0,1], dropout rng or None, deterministic) -> features [B, D] f32.
FeatureFn = Callable[[PyTree, jax.Array, jax.Array | None, bool], jax.Array]


# ---------------------------------------------------------------------------------------------------------
# Backbone.


def backbone_params_from_mage(mage_params: PyTree, global_pool: bool) -> dict:
  """MAGE pretraining params -> `MAGEViT` backbone params (no head).

  `token_emb` and `blocks_<i>` are shared names (a scanned `blocks` stack is unstacked). With global
  pooling the pretrained final `norm` is dropped and `fc_norm` is a fresh LayerNorm at identity (scale 1,
  bias 0), as `models_vit_mage.py` deletes `norm` and creates `fc_norm`; without it, `norm` is kept and
  read at the class slot. Decoder / MLM params are ignored. A ViT checkpoint (converted probe or
  fine-tune model) passes its own `fc_norm` / `norm` through.

  Args:
    mage_params: the 'params' collection of `MAGE` (or of `MAGEViT`), host or device arrays.
    global_pool: pooling of the backbone these params are for.

  Returns:
    {'token_emb', 'blocks_0'.. 'blocks_{depth-1}', 'fc_norm' | 'norm'} (leaves are the input arrays, or
    new float32 numpy arrays for a fresh `fc_norm`).
  """
  params = dict(mage_params)
  if "blocks" in params:
    params = layers.unstack_block_params(params, "blocks")
  blocks = sorted((k for k in params if k.startswith("blocks_")), key=lambda k: int(k.split("_")[1]))
  if "token_emb" not in params or not blocks:
    raise ValueError(f"params have no MAGE encoder (token_emb, blocks_<i>); top-level keys: {sorted(params)}")
  out = {"token_emb": params["token_emb"], **{k: params[k] for k in blocks}}
  if global_pool:
    if "fc_norm" in params:
      out["fc_norm"] = params["fc_norm"]
    else:
      dim = np.shape(params["token_emb"]["LayerNorm"]["scale"])[-1]
      out["fc_norm"] = {"scale": np.ones((dim,), np.float32), "bias": np.zeros((dim,), np.float32)}
  else:
    if "norm" not in params:
      raise ValueError("global_pool=False reads the pretrained final `norm`, which these params lack")
    out["norm"] = params["norm"]
  return out


@dataclasses.dataclass(frozen=True)
class Backbone:
  """The frozen feature extractor: tokenizer + `MAGEViT(head_type='none')` and their host variables."""

  tokenizer: Tokenizer
  vit: MAGEViT
  variables: dict  # {'tokenizer': tokenizer variables, 'vit': {'params': backbone params}}
  image_size: int
  meta: dict

  @property
  def dim(self) -> int:
    return self.vit.config.embed_dim

  def feature_fn(self) -> FeatureFn:
    return make_feature_fn(self.tokenizer, self.vit)


@functools.lru_cache(maxsize=16)
def make_feature_fn(tokenizer: Tokenizer, vit: MAGEViT) -> FeatureFn:
  """Frozen features of images: VQGAN ids (float32 tokenizer) -> `MAGEViT.features`; no gradient.

  Cached per module pair, so the jitted functions built on it are reused (no recompilation)."""

  def fn(variables, images, rng, deterministic):
    ids = tokenizer.apply(variables["tokenizer"], images, method="encode_to_ids")
    rngs = {} if deterministic else {"dropout": rng}
    feats, _ = vit.apply(variables["vit"], ids, deterministic, method=MAGEViT.features, rngs=rngs)
    return jax.lax.stop_gradient(feats.astype(jnp.float32))

  return fn


def pixel_feature_fn(variables, images, rng, deterministic, channels: int = 3):
  """Raw-pixel baseline: the flattened image the backbone would see, [B, H*W*channels] f32 (channels=1 keeps
  the first of a grayscale image's three repeated channels)."""
  del variables, rng, deterministic
  return images[..., :channels].reshape(images.shape[0], -1).astype(jnp.float32)


def backbone_tokenizer(tok_config, dtype) -> VQGAN:
  """The frozen tokenizer of a backbone whose ViT computes in `dtype`.

  Float32 activations whatever `dtype`: low-precision tokenisation changes ids (they are an argmin). Next to a bfloat16
  ViT the convolutions run at TF32-class precision ('high', as pretraining's `tokenizer.precision`), which keeps
  the float32 ids on the fixtures; a float32 run keeps them exact ('highest').
  """
  return VQGAN(tok_config, dtype=jnp.float32, precision="highest" if dtype == jnp.float32 else "high")


def load_backbone(
  params_dir: str, *, global_pool: bool = True, dtype=jnp.float32, image_size: int | None = None
) -> Backbone:
  """Reads a params-only checkpoint (kind 'mage', or a converted/exported 'vit') as a frozen backbone.

  `dtype` is the ViT's compute dtype (see `backbone_tokenizer` for the tokenizer's). `image_size` defaults to
  the tokenizer's resolution in the meta.
  """
  variables, meta = params_io.load(params_dir)
  # 'torch_unused' holds the source file's unused tensors (integer position ids among them) for exports only.
  params_io.check_finite({k: v for k, v in variables.items() if k != "torch_unused"}, params_dir)
  kind = meta.get("kind", "mage")
  if kind not in ("mage", "vit"):
    raise ValueError(f"{params_dir}: checkpoint kind {kind!r} has no MAGE encoder; expected 'mage' or 'vit'")
  if "tokenizer" not in variables or "tokenizer" not in meta:
    raise ValueError(f"{params_dir}: no tokenizer in the checkpoint; probing needs the VQGAN that made the ids")
  config = dataclasses.replace(params_io.mage_config_from_meta(meta), scan=False)
  tok_config = params_io.tokenizer_config_from_meta(meta)
  if image_size:
    tok_config = dataclasses.replace(tok_config, resolution=int(image_size))
  if tok_config.num_tokens != config.num_tokens:
    raise ValueError(
      f"image_size {tok_config.resolution} gives {tok_config.num_tokens} tokens but the model "
      f"expects {config.num_tokens}"
    )
  params = backbone_params_from_mage(variables["model"]["params"], global_pool)
  vit = MAGEViT(config, num_classes=0, global_pool=global_pool, head_type="none", dtype=dtype)
  return Backbone(
    backbone_tokenizer(tok_config, dtype),
    vit,
    {"tokenizer": variables["tokenizer"], "vit": {"params": params}},
    tok_config.resolution,
    meta,
  )


def backbone_shardings(backbone: Backbone, mesh: Mesh, rules) -> PyTree:
  """NamedShardings of the backbone variables from the modules' logical axis names."""
  ids = jnp.zeros((1, backbone.vit.config.num_tokens), jnp.int32)
  side = backbone.image_size
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = {
      "tokenizer": jax.eval_shape(backbone.tokenizer.init, jax.random.key(0), jnp.zeros((1, side, side, 3))),
      "vit": jax.eval_shape(backbone.vit.init, jax.random.key(0), ids),
    }
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  # Only what the checkpoint holds (e.g. no batch_stats).
  return jax.tree.map(lambda _, s: s, backbone.variables, _match(shardings, backbone.variables))


def _match(tree, like):
  """Sub-tree of `tree` with the dict keys of `like` (raises naming the first missing key)."""
  if isinstance(like, dict):
    out = {}
    for k, v in like.items():
      if k not in tree:
        raise ValueError(f"checkpoint entry {k!r} does not exist in the model (keys {sorted(tree)})")
      out[k] = _match(tree[k], v)
    return out
  return tree


# ---------------------------------------------------------------------------------------------------------
# Feature extraction.


def _agree(flag: bool) -> bool:
  """Process 0's decision, on every process (cache hits must agree or the collectives deadlock)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def extract_features(
  feature_fn: FeatureFn, variables: PyTree, variable_shardings: PyTree, input_cfg: dict, *, mesh: Mesh, source=None
) -> tuple[np.ndarray, np.ndarray]:
  """Features of a whole split with the eval transform, dropout off.

  Args:
    feature_fn: see `FeatureFn`.
    variables: its (placed) variables.
    variable_shardings: their shardings.
    input_cfg: `pipeline.InputConfig` fields; `batch_size` is the GLOBAL extraction batch (divisible by the
      mesh's batch shards); `augment` is ignored (the eval iterator uses the 'none' transform).
    mesh: device mesh; the batch is sharded over its batch axes.
    source: optional prebuilt `sources.Source`.

  Returns:
    (features float32 [N, D], labels int32 [N]) in the split's stored order, on every process.
  """
  from mage_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg = {k: v for k, v in dict(input_cfg).items() if k != "augment"}
  sharding.check_batch_size(cfg["batch_size"], mesh)
  source = source or pipeline.make_source(cfg)
  fn = _extract_fn(feature_fn, sharding.batch_sharding(mesh))
  variables = sharding.place(variables, variable_shardings)  # no-op when already placed
  progress = progress_lib.Progress(source.num_examples, f"features of {cfg.get('split')}")
  feats, labels = [], []
  with jax.set_mesh(mesh):
    for batch in pipeline.global_eval_batches(cfg, mesh, source=source):
      feats.append(np.asarray(sharding.to_host(fn(variables, batch["image"]))))
      labels.append(np.asarray(sharding.to_host(batch["label"])))
      progress.update(len(labels[-1]))
  n = source.num_examples
  return np.concatenate(feats)[:n].astype(np.float32), np.concatenate(labels)[:n].astype(np.int32)


@functools.lru_cache(maxsize=16)
def _extract_fn(feature_fn: FeatureFn, batch_sharding):
  # Inputs arrive placed (variables on their shardings, images on the batch sharding); cached so that
  # every split and every call reuses one compilation per shape.
  return jax.jit(lambda v, im: feature_fn(v, im, None, True), out_shardings=batch_sharding)


def fingerprint(**fields) -> str:
  """A short hash of JSON-able fields: what the cached features depend on."""
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def params_identity(params_dir: str) -> dict:
  """Path plus the meta file's size/mtime: a re-export into the same directory invalidates caches."""
  st = os.stat(os.path.join(params_dir, params_io.META_FILE))
  return {"params": os.path.abspath(params_dir), "meta_size": st.st_size, "meta_mtime_ns": st.st_mtime_ns}


def cached(
  path: str | None, key: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
  """`compute()` through an npz cache at `path` (None: no cache); a different `key` recomputes.

  Process 0 decides hit or miss for all processes; on a hit every process reads `path`, so with several
  processes it must be on a filesystem they all see (as the workdir is)."""
  hit = False
  if path is not None and jax.process_index() == 0 and os.path.exists(path):
    try:
      with np.load(path) as f:
        hit = str(f["fingerprint"]) == key
    except (OSError, ValueError, KeyError) as e:
      logging.warning("ignoring unreadable feature cache %s: %s", path, e)
  if _agree(hit):
    with np.load(path) as f:
      logging.info("features from cache %s", path)
      return f["features"], f["labels"]
  feats, labels = compute()
  if path is not None and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=feats, labels=labels, fingerprint=np.asarray(key))
    os.replace(tmp, path)  # a reader never sees a half-written cache
  return feats, labels


# ---------------------------------------------------------------------------------------------------------
# BN + linear head.


def init_head(key: jax.Array, dim: int, num_classes: int, init_std: float = 0.01) -> tuple[dict, dict]:
  """(params, batch_stats) of the probe head; layout of `MAGEViT(head_type='bn_linear')`.

  Weight ~ N(0, std²) truncated to [-2, 2] (absolute bounds, as timm's trunc_normal_), bias 0; running
  mean 0, var 1 (torch BatchNorm1d init).
  """
  kernel = init_std * jax.random.truncated_normal(key, -2.0 / init_std, 2.0 / init_std, (dim, num_classes), jnp.float32)
  params = {"head": {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}}
  stats = {"head_bn": {"mean": jnp.zeros((dim,), jnp.float32), "var": jnp.ones((dim,), jnp.float32)}}
  return params, stats


def bn_linear_head(
  params: dict,
  batch_stats: dict,
  feats: jax.Array,
  *,
  train: bool,
  bn_group_size: int = 0,
  momentum: float = 0.9,
  eps: float = 1e-6,
) -> tuple[jax.Array, dict]:
  """BatchNorm1d(affine=False) then Linear, as `torch.nn.Sequential(BatchNorm1d(D, affine=False), head)`.

  Training normalises with the biased variance of each group of `bn_group_size` consecutive examples
  (0: the whole batch) and moves the running stats towards the group average of (mean, UNBIASED variance),
  as torch does: `running = momentum * running + (1 - momentum) * batch` (torch's momentum 0.1). Eval uses
  the running statistics.

  Args:
    params, batch_stats: see `init_head`.
    feats: [B, D] features.
    train: batch statistics (and updated running stats) or running statistics.

  Returns:
    (logits [B, C] f32, new batch_stats).
  """
  x = feats.astype(jnp.float32)
  stats = batch_stats["head_bn"]
  if train:
    b, d = x.shape
    group = bn_group_size or b
    if b % group or group < 2:
      raise ValueError(f"batch {b} must split into BatchNorm groups of bn_group_size={group} >= 2 examples")
    xg = x.reshape(b // group, group, d)
    mean = jnp.mean(xg, axis=1, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=1, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, d)
    unbiased = var[:, 0] * (group / (group - 1))
    stats = {
      "mean": momentum * stats["mean"] + (1 - momentum) * jnp.mean(mean[:, 0], axis=0),
      "var": momentum * stats["var"] + (1 - momentum) * jnp.mean(unbiased, axis=0),
    }
  else:
    y = (x - stats["mean"]) * jax.lax.rsqrt(stats["var"] + eps)
  head = params["head"]
  # Default precision, as every other product of the step (the reference runs its head under fp16 autocast).
  logits = jnp.dot(y, head["kernel"]) + head["bias"]
  return logits, {"head_bn": stats}


def head_predict_numpy(
  params: dict, batch_stats: dict, feats: np.ndarray, eps: float = 1e-6, chunk: int = 8192
) -> np.ndarray:
  """Eval-mode logits on the host (float32 numpy), [N, C]: no device collectives, same on every process."""
  p = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
  s = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), batch_stats)["head_bn"]
  inv = 1.0 / np.sqrt(s["var"] + eps)
  out = [
    ((np.asarray(feats[i : i + chunk], np.float32) - s["mean"]) * inv) @ p["head"]["kernel"] + p["head"]["bias"]
    for i in range(0, len(feats), chunk)
  ]
  return np.concatenate(out) if out else np.zeros((0, p["head"]["bias"].shape[0]), np.float32)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
  """{'top1': .., 'top5': ..} in [0, 1]; k is capped at the number of classes."""
  labels = np.asarray(labels)
  if len(labels) == 0:
    raise ValueError("cannot compute accuracy on an empty set")
  order = np.argsort(-logits, axis=1, kind="stable")
  out = {}
  for k in ks:
    hit = (order[:, : min(k, logits.shape[1])] == labels[:, None]).any(axis=1)
    out[f"top{k}"] = float(np.mean(hit))
  return out
