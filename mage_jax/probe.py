"""Linear probing of frozen MAGE features (spec §6.1, §6.2), as `main_linprobe.py` of LTH14/mage.

Pieces, usable on their own:
  * `backbone_params_from_mage` / `load_backbone`: a params-only MAGE export (or a converted ViT checkpoint)
    -> the frozen feature extractor: VQGAN ids -> `MAGEViT.features` (global pool + a fresh identity
    `fc_norm`, or the pretrained `norm` at the class slot).
  * `extract_features`: one jitted, batch-sharded pass over a split with the eval transform; optional npz
    cache keyed by a fingerprint of everything that changes the features.
  * `bn_linear_head` + `train_probe`: BatchNorm1d(affine=False, eps 1e-6) -> Linear trained with LARS
    (`optim.probe_optimizer`), warm-up + half-cycle cosine, plain cross-entropy; an own small jitted loop
    with an orbax checkpoint of the head state every epoch, so a killed run resumes exactly.

Two data modes for the head:
  * `OnlineImages` (the official protocol): every step draws augmented images ('probe' crop + flip) and
    recomputes features through the frozen backbone, with the token-embedding dropout ACTIVE (the official
    model is in train() mode during probing, spec §8.17).
  * `CachedFeatures`: features computed once with the eval transform (no augmentation, no dropout) and
    held in memory; an epoch is a seeded permutation of them. Much cheaper; not the paper's protocol.
Validation features are always computed once (eval transform, dropout off), as the official eval loop sees
them, and the head is evaluated on the host.

Known, deliberate deviations: BatchNorm statistics are taken over groups of `bn_group_size` examples
(the reference's per-GPU batch of 128; 0 = the whole global batch) and the running statistics average the
groups (the reference keeps rank 0's); the head weight is drawn from N(0, 0.01²) truncated at ±2 absolute,
as timm's `trunc_normal_(std=0.01)` (effectively untruncated).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mage_jax import checkpoint_models, checkpointing, optim, params_io, sharding
from mage_jax.data import pipeline
from mage_jax.models import layers
from mage_jax.models.vit import MAGEViT
from mage_jax.models.vqgan import VQGAN

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
  tokenizer: VQGAN
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
def make_feature_fn(tokenizer: VQGAN, vit: MAGEViT) -> FeatureFn:
  """Frozen features of images: VQGAN ids (float32 tokenizer) -> `MAGEViT.features`; no gradient.

  Cached per module pair, so the jitted functions built on it are reused (no recompilation)."""

  def fn(variables, images, rng, deterministic):
    ids = tokenizer.apply(variables["tokenizer"], images, method=VQGAN.encode_to_ids)
    rngs = {} if deterministic else {"dropout": rng}
    feats, _ = vit.apply(variables["vit"], ids, deterministic, method=MAGEViT.features, rngs=rngs)
    return jax.lax.stop_gradient(feats.astype(jnp.float32))

  return fn


def pixel_feature_fn(variables, images, rng, deterministic):
  """Raw-pixel baseline: the flattened image the backbone would see, [B, H*W*3] f32."""
  del variables, rng, deterministic
  return images.reshape(images.shape[0], -1).astype(jnp.float32)


def load_backbone(params_dir: str, *, global_pool: bool = True, dtype=jnp.float32,
                  image_size: int | None = None) -> Backbone:
  """Reads a params-only checkpoint (kind 'mage', or a converted/exported 'vit') as a frozen backbone.

  The tokenizer runs in float32 whatever `dtype` (the compute dtype of the ViT): low-precision tokenisation
  changes ids (spec §8.19). `image_size` defaults to the tokenizer's resolution in the meta.
  """
  variables, meta = params_io.load(params_dir)
  kind = meta.get("kind", "mage")
  if kind not in ("mage", "vit"):
    raise ValueError(f"{params_dir}: checkpoint kind {kind!r} has no MAGE encoder; expected 'mage' or 'vit'")
  if "tokenizer" not in variables or "tokenizer" not in meta:
    raise ValueError(f"{params_dir}: no tokenizer in the checkpoint; probing needs the VQGAN that made the ids")
  config = dataclasses.replace(checkpoint_models.mage_config_from_meta(meta), scan=False)
  tok_config = checkpoint_models.tokenizer_config_from_meta(meta)
  if image_size:
    tok_config = dataclasses.replace(tok_config, resolution=int(image_size))
  if tok_config.num_tokens != config.num_tokens:
    raise ValueError(f"image_size {tok_config.resolution} gives {tok_config.num_tokens} tokens but the model "
                     f"expects {config.num_tokens}")
  params = backbone_params_from_mage(variables["model"]["params"], global_pool)
  vit = MAGEViT(config, num_classes=0, global_pool=global_pool, head_type="none", dtype=dtype)
  return Backbone(VQGAN(tok_config, dtype=jnp.float32), vit,
                  {"tokenizer": variables["tokenizer"], "vit": {"params": params}}, tok_config.resolution,
                  meta)


def backbone_shardings(backbone: Backbone, mesh: Mesh, rules) -> PyTree:
  """NamedShardings of the backbone variables from the modules' logical axis names."""
  ids = jnp.zeros((1, backbone.vit.config.num_tokens), jnp.int32)
  side = backbone.image_size
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = {"tokenizer": jax.eval_shape(backbone.tokenizer.init, jax.random.key(0),
                                         jnp.zeros((1, side, side, 3))),
             "vit": jax.eval_shape(backbone.vit.init, jax.random.key(0), ids)}
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


def place(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) if not isinstance(x, jax.Array) else x, s),
                      tree, shardings)


# ---------------------------------------------------------------------------------------------------------
# Feature extraction.


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _agree(flag: bool) -> bool:
  """Process 0's decision, on every process (cache hits must agree or the collectives deadlock)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def extract_features(feature_fn: FeatureFn, variables: PyTree, variable_shardings: PyTree, input_cfg: dict,
                     *, mesh: Mesh, source=None) -> tuple[np.ndarray, np.ndarray]:
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
  cfg = {k: v for k, v in dict(input_cfg).items() if k != "augment"}
  sharding.check_batch_size(cfg["batch_size"], mesh)
  it = pipeline.eval_iterator(cfg, process_index=jax.process_index(), process_count=jax.process_count(),
                              source=source)
  n = it.source.num_examples
  fn = _extract_fn(feature_fn, sharding.batch_sharding(mesh))
  variables = place(variables, variable_shardings)  # no-op when already placed
  feats, labels = [], []
  with jax.set_mesh(mesh):
    for local in it:
      batch = sharding.global_batch({"image": local["image"], "label": local["label"]}, mesh)
      feats.append(_gather(fn(variables, batch["image"])))
      labels.append(_gather(batch["label"]))
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


def cached(path: str | None, key: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]]
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


@flax.struct.dataclass
class ProbeState:
  """Head training state: arrays only (orbax-saveable, donatable)."""
  step: jax.Array
  params: PyTree        # {'head': {'kernel': [D, C], 'bias': [C]}}
  batch_stats: PyTree   # {'head_bn': {'mean': [D], 'var': [D]}}
  opt_state: PyTree
  rng: jax.Array        # raw uint32 key data
  first_nonfinite_step: jax.Array
  skipped_steps: jax.Array

  @classmethod
  def create(cls, params, batch_stats, tx: optax.GradientTransformation, rng):
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
               rng=rng, first_nonfinite_step=jnp.full((), -1, jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))


def init_head(key: jax.Array, dim: int, num_classes: int, init_std: float = 0.01) -> tuple[dict, dict]:
  """(params, batch_stats) of the probe head; layout of `MAGEViT(head_type='bn_linear')`.

  Weight ~ N(0, std²) truncated to [-2, 2] (absolute bounds, as timm's trunc_normal_), bias 0; running
  mean 0, var 1 (torch BatchNorm1d init).
  """
  kernel = init_std * jax.random.truncated_normal(key, -2.0 / init_std, 2.0 / init_std, (dim, num_classes),
                                                  jnp.float32)
  params = {"head": {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}}
  stats = {"head_bn": {"mean": jnp.zeros((dim,), jnp.float32), "var": jnp.ones((dim,), jnp.float32)}}
  return params, stats


def bn_linear_head(params: dict, batch_stats: dict, feats: jax.Array, *, train: bool, bn_group_size: int = 0,
                   momentum: float = 0.9, eps: float = 1e-6) -> tuple[jax.Array, dict]:
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
    stats = {"mean": momentum * stats["mean"] + (1 - momentum) * jnp.mean(mean[:, 0], axis=0),
             "var": momentum * stats["var"] + (1 - momentum) * jnp.mean(unbiased, axis=0)}
  else:
    y = (x - stats["mean"]) * jax.lax.rsqrt(stats["var"] + eps)
  head = params["head"]
  logits = jnp.dot(y, head["kernel"], precision=jax.lax.Precision.HIGHEST) + head["bias"]
  return logits, {"head_bn": stats}


def head_predict_numpy(params: dict, batch_stats: dict, feats: np.ndarray, eps: float = 1e-6,
                       chunk: int = 8192) -> np.ndarray:
  """Eval-mode logits on the host (float32 numpy), [N, C]: no device collectives, same on every process."""
  p = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
  s = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), batch_stats)["head_bn"]
  inv = 1.0 / np.sqrt(s["var"] + eps)
  out = [((np.asarray(feats[i:i + chunk], np.float32) - s["mean"]) * inv) @ p["head"]["kernel"]
         + p["head"]["bias"] for i in range(0, len(feats), chunk)]
  return np.concatenate(out) if out else np.zeros((0, p["head"]["bias"].shape[0]), np.float32)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
  """{'top1': .., 'top5': ..} in [0, 1]; k is capped at the number of classes."""
  labels = np.asarray(labels)
  if len(labels) == 0:
    raise ValueError("cannot compute accuracy on an empty set")
  order = np.argsort(-logits, axis=1, kind="stable")
  out = {}
  for k in ks:
    hit = (order[:, :min(k, logits.shape[1])] == labels[:, None]).any(axis=1)
    out[f"top{k}"] = float(np.mean(hit))
  return out


# ---------------------------------------------------------------------------------------------------------
# Training data for the head.


@dataclasses.dataclass
class CachedFeatures:
  """Precomputed features; the epoch-e order is `default_rng((seed, e)).permutation(N)`."""
  features: np.ndarray  # [N, D] float32
  labels: np.ndarray    # [N] int32

  def __post_init__(self):
    if self.features.ndim != 2 or self.labels.shape != (self.features.shape[0],):
      raise ValueError(f"features must be [N, D] with labels [N]; got {self.features.shape} and "
                       f"{self.labels.shape}")

  @property
  def num_examples(self) -> int:
    return int(self.features.shape[0])

  def iterator(self, *, batch_size: int, seed: int, start_step: int):
    spe = self.num_examples // batch_size
    lo, local = _local_range(batch_size)
    step = start_step
    perm, perm_epoch = None, -1
    while True:
      epoch, within = divmod(step, spe)
      if epoch != perm_epoch:
        perm, perm_epoch = np.random.default_rng((seed, epoch)).permutation(self.num_examples), epoch
      idx = perm[within * batch_size + lo: within * batch_size + lo + local]
      yield {"features": self.features[idx], "label": self.labels[idx]}
      step += 1


@dataclasses.dataclass
class OnlineImages:
  """Augmented images through the frozen backbone every step (the official protocol)."""
  input_cfg: dict                    # pipeline.InputConfig fields; augment 'probe' for the official crop
  feature_fn: FeatureFn
  variables: PyTree                  # placed backbone variables
  variable_shardings: PyTree
  dropout: bool = True               # token-embedding dropout on, as the official model.train()
  source: Any = None

  def __post_init__(self):
    if self.source is None:
      self.source = pipeline.make_source(self.input_cfg)

  @property
  def num_examples(self) -> int:
    return int(self.source.num_examples)

  def iterator(self, *, batch_size: int, seed: int, start_step: int):
    cfg = {**dict(self.input_cfg), "batch_size": batch_size}
    for local in pipeline.train_iterator(cfg, seed=seed, start_step=start_step,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count(), source=self.source):
      yield {"image": local["image"], "label": local["label"]}


def _local_range(batch_size: int) -> tuple[int, int]:
  p, n = jax.process_index(), jax.process_count()
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by {n} processes")
  return p * (batch_size // n), batch_size // n


# ---------------------------------------------------------------------------------------------------------
# Training loop.


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Linear-probe recipe; defaults are the paper's ViT-B settings (spec §6.2)."""
  num_classes: int
  epochs: int = 90
  warmup_epochs: float = 10.0
  batch_size: int = 4096
  blr: float = 0.1  # lr = blr * batch_size / 256; 0.05 for ViT-L
  min_lr: float = 0.0
  momentum: float = 0.9
  weight_decay: float = 0.0
  trust_coefficient: float = 0.001
  bn_group_size: int = 0  # reference: 128 (per-GPU batch, no SyncBN); 0 = whole batch
  bn_momentum: float = 0.9
  bn_eps: float = 1e-6
  head_init_std: float = 0.01
  eval_every_epochs: int = 1
  seed: int = 0
  keep_checkpoints: int = 2

  def __post_init__(self):
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f"epochs and batch_size must be positive, got {self.epochs}, {self.batch_size}")
    if self.bn_group_size and self.batch_size % self.bn_group_size:
      raise ValueError(f"batch_size {self.batch_size} is not a multiple of bn_group_size {self.bn_group_size}")

  @classmethod
  def from_config(cls, cfg, **overrides) -> ProbeConfig:
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown linear-probe config keys {unknown}; known: {sorted(known)}")
    return cls(**values)


def probe_optim(cfg: ProbeConfig, steps_per_epoch: int) -> optim.ProbeOptim:
  """The LARS recipe of `cfg` with its schedule in steps: lr = blr·batch/256, epochs × steps_per_epoch."""
  total = cfg.epochs * steps_per_epoch
  return optim.ProbeOptim(lr=optim.scaled_lr(cfg.blr, cfg.batch_size), total_steps=total,
                          warmup_steps=min(int(round(cfg.warmup_epochs * steps_per_epoch)), total),
                          min_lr=cfg.min_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          trust_coefficient=cfg.trust_coefficient)


def probe_step(state: ProbeState, extras, batch, *, tx: optax.GradientTransformation, cfg: ProbeConfig,
               feature_fn: FeatureFn | None, dropout: bool, schedule):
  """One head update on a global batch ({'features'} or {'image'}, plus 'label'); pure."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if feature_fn is None:
    feats = batch["features"]
  else:
    feats = feature_fn(extras, batch["image"], rng, not dropout)
  labels = batch["label"]

  def loss_fn(params):
    logits, stats = bn_linear_head(params, state.batch_stats, feats, train=True,
                                   bn_group_size=cfg.bn_group_size, momentum=cfg.bn_momentum, eps=cfg.bn_eps)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return loss, (logits, stats)

  (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params), batch_stats=keep(stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                     state.first_nonfinite_step),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return new_state, {"loss": loss, "accuracy": acc, "lr": schedule(state.step)}


@functools.lru_cache(maxsize=16)
def _step_fn(cfg: ProbeConfig, steps_per_epoch: int, feature_fn: FeatureFn | None, dropout: bool, replicated):
  """The jitted head step; cached on its static inputs so repeated / resumed runs reuse the compilation.
  Inputs arrive placed (state replicated, batch on the batch sharding, backbone on its shardings)."""
  ocfg = probe_optim(cfg, steps_per_epoch)
  step = functools.partial(probe_step, tx=optim.probe_optimizer(ocfg), cfg=cfg, feature_fn=feature_fn,
                           dropout=dropout, schedule=ocfg.schedule())
  return jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=(0,))


def _history_path(workdir):
  return os.path.join(workdir, "probe_history.json")


def _load_history(workdir) -> list:
  path = _history_path(workdir)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return []


def _save_history(workdir, history):
  if jax.process_index() == 0:
    with open(_history_path(workdir) + ".tmp", "w") as f:
      json.dump(history, f, indent=1)
    os.replace(_history_path(workdir) + ".tmp", _history_path(workdir))


def train_probe(train_data: CachedFeatures | OnlineImages, val_features: np.ndarray, val_labels: np.ndarray,
                cfg: ProbeConfig, *, workdir: str, mesh: Mesh, dim: int | None = None,
                stop_after_epochs: int | None = None, log: Callable[[str], None] = logging.info
                ) -> tuple[dict, ProbeState]:
  """Trains (or resumes) the BN+linear head in `workdir`; evaluates on the cached validation features.

  Args:
    train_data: `CachedFeatures` or `OnlineImages`.
    val_features, val_labels: [M, D] / [M] evaluation set (eval transform, dropout off).
    cfg: the recipe.
    workdir: holds `checkpoints/<step>` (one per epoch) and `probe_history.json`.
    mesh: the batch is sharded over its batch axes; the head state is replicated.
    dim: feature dimension (default: from the data).
    stop_after_epochs: stop once this many epochs (counted from the start of the run, not of this call)
      are done, leaving a checkpoint; the schedule still spans `cfg.epochs`. For tests and chunked jobs.
    log: progress printer.

  Returns:
    (results, final state): results = {'top1', 'top5' (last state), 'best_top1', 'epochs_done',
    'completed', 'steps_per_epoch', 'lr', 'history': [{'epoch', 'top1', 'top5', 'train_loss'}]}.
  """
  os.makedirs(workdir, exist_ok=True)
  n = train_data.num_examples
  if n < cfg.batch_size:
    raise ValueError(f"linear-probe batch_size {cfg.batch_size} is larger than the train set ({n} examples)")
  sharding.check_batch_size(cfg.batch_size, mesh)
  if dim is None:
    if not isinstance(train_data, CachedFeatures):
      raise ValueError("pass dim= for OnlineImages")
    dim = train_data.features.shape[1]
  if val_features.shape[1] != dim:
    raise ValueError(f"validation features have dim {val_features.shape[1]}, train features {dim}")
  if val_labels.size and (val_labels.min() < 0 or val_labels.max() >= cfg.num_classes):
    raise ValueError(f"validation labels outside [0, {cfg.num_classes})")
  spe = n // cfg.batch_size
  ocfg = probe_optim(cfg, spe)
  total, lr = ocfg.total_steps, ocfg.lr
  tx = optim.probe_optimizer(ocfg)
  online = isinstance(train_data, OnlineImages)

  def init(key):
    params, stats = init_head(jax.random.fold_in(key, 0), dim, cfg.num_classes, cfg.head_init_std)
    return ProbeState.create(params, stats, tx, jax.random.key_data(jax.random.fold_in(key, 1)))

  repl = sharding.replicated(mesh)
  abstract = jax.eval_shape(init, jax.random.key(cfg.seed))
  state_sh = jax.tree.map(lambda _: repl, abstract)
  mngr = checkpointing.manager(workdir, keep=cfg.keep_checkpoints, async_save=True)
  latest = checkpointing.latest_step(mngr)
  history = _load_history(workdir) if latest is not None else []
  extras = train_data.variables if online else None
  extras_sh = train_data.variable_shardings if online else None
  with jax.set_mesh(mesh):
    if latest is not None:
      state = checkpointing.restore(mngr, latest, checkpointing.abstract_with_shardings(abstract, state_sh))
      log(f"linear probe: resumed at step {latest} (epoch {latest // spe})")
    else:
      state = jax.jit(init, out_shardings=state_sh)(jax.random.key(cfg.seed))
    history = [h for h in history if h["epoch"] * spe <= int(jax.device_get(state.step))]
    if online:
      extras = place(extras, extras_sh)
    step_fn = _step_fn(cfg, spe, train_data.feature_fn if online else None, online and train_data.dropout,
                       repl)
    start = int(jax.device_get(state.step))
    last_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, stop_after_epochs)
    data = train_data.iterator(batch_size=cfg.batch_size, seed=cfg.seed, start_step=start) \
        if start < last_epoch * spe else iter(())
    try:
      for step in range(start, last_epoch * spe):
        local = next(data)
        state, metrics = step_fn(state, extras, sharding.global_batch(local, mesh))
        done = step + 1
        if done % spe:
          continue
        epoch = done // spe
        m = jax.device_get(metrics)
        if int(jax.device_get(state.first_nonfinite_step)) >= 0:
          raise FloatingPointError(f"linear probe: non-finite loss/gradient at step "
                                   f"{int(jax.device_get(state.first_nonfinite_step))}")
        if epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs:
          acc = topk_accuracy(head_predict_numpy(state.params, state.batch_stats, val_features, cfg.bn_eps),
                              val_labels)
          history.append({"epoch": epoch, **acc, "train_loss": float(m["loss"])})
          log(f"linear probe epoch {epoch}/{cfg.epochs}: loss {m['loss']:.4f} lr {m['lr']:.4g} "
              f"val top1 {acc['top1']:.4f} top5 {acc['top5']:.4f}")
        # History first: a kill between the two leaves extra entries, which the resume filter drops.
        _save_history(workdir, history)
        checkpointing.save(mngr, done, state, force=True)
        mngr.wait_until_finished()
    finally:
      mngr.wait_until_finished()
      mngr.close()
  done_steps = int(jax.device_get(state.step))
  final = topk_accuracy(head_predict_numpy(state.params, state.batch_stats, val_features, cfg.bn_eps),
                        val_labels)
  return {**final, "best_top1": max([h["top1"] for h in history] + [final["top1"]]),
          "epochs_done": done_steps // spe, "completed": done_steps >= total, "steps_per_epoch": spe,
          "lr": lr, "history": history}, state


def export_probe(directory: str, backbone: Backbone, state: ProbeState, num_classes: int) -> None:
  """The backbone with its trained head as a params-only checkpoint of kind 'vit' (head_type 'bn_linear'):
  `MAGEViT(config, num_classes, global_pool, head_type='bn_linear')` applies it directly."""
  params = {**backbone.variables["vit"]["params"], **jax.device_get(state.params)}
  meta = {"kind": "vit", "model": dataclasses.asdict(backbone.vit.config),
          "tokenizer": dataclasses.asdict(backbone.tokenizer.config),
          "vit": {"num_classes": num_classes, "global_pool": backbone.vit.global_pool, "head_type": "bn_linear"}}
  params_io.save(directory, {"model": {"params": params, "batch_stats": jax.device_get(state.batch_stats)},
                             "tokenizer": backbone.variables["tokenizer"]}, meta, overwrite=True)
