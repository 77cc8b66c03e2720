"""Optimizers and learning-rate schedules for MAGE (optax).

Matches the recipes of LTH14/mage (`main_pretrain.py`, `main_linprobe.py`,
`main_finetune.py`):

* `warmup_cosine_schedule`: `util/lr_sched.py` (linear warm-up, half-cycle
  cosine), expressed per optimizer step instead of per fractional epoch.
* `pretrain_optimizer`: AdamW(0.9, 0.95, wd 0.05) after global-norm clipping
  at 3.0, timm-0.3.2 `add_weight_decay` exclusions (`weight_decay_mask`).
* `probe_optimizer`: LARS (`mage_jax.train.lars`: MoCo v3 `util/lars.py`) for linear probing.
* `finetune_optimizer`: AdamW(0.9, 0.999, wd 0.05) with `util/lr_decay.py`
  layer-wise lr decay (`layerwise_lr_scales`).

Parameter trees are flax param dicts (plain dicts, FrozenDicts or trees of
`nn.LogicallyPartitioned` boxes; ShapeDtypeStructs work wherever only shapes
are needed). Names are read from the dict keys of each leaf's path: the leaf
name is the last dict key (`kernel`, `bias`, `scale`, `embedding`, ...).
Layer stacks made by `nn.scan` live under a key in `scanned_keys` (default
`blocks`, `decoder_blocks`) and carry a leading layer axis; every per-layer
rule (1-D exemption, layer id) is applied per slice of that axis.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mage_jax.train import config_views, lars

PyTree = Any
# `frozen` arguments: None (train everything), a predicate on the '/'-joined
# path string, or regular expressions searched in that string.
FrozenSpec = None | Callable[[str], bool] | Iterable[str]

SCANNED_KEYS = ("blocks", "decoder_blocks")
# Top-level names that timm's `get_layer_id_for_vit` puts in layer 0.
EMBED_NAMES = ("token_emb", "cls_token", "pos_embed", "patch_embed")
# timm `VisionTransformer.no_weight_decay()`; absent from the MAGE probe tree
# (`models_vit_mage.py` never uses them) but kept so a port that adds them gets the reference rule.
FINETUNE_NO_DECAY_NAMES = ("pos_embed", "cls_token")


# ---------------------------------------------------------------------------
# Schedules.


def scaled_lr(blr: float, global_batch: int) -> float:
  """Linear scaling rule of the reference: `lr = blr * batch / 256`."""
  if global_batch <= 0:
    raise ValueError(f"global_batch must be positive, got {global_batch}")
  return blr * global_batch / 256


def warmup_cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0, then half-cycle cosine from `base_lr` to `min_lr`.

  For `step < warmup_steps`: `base_lr * step / warmup_steps`; afterwards
  `min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - warmup_steps) /
  (total_steps - warmup_steps))) / 2`, held at `min_lr` past `total_steps`.
  The reference evaluates this at fractional epochs `t = epoch +
  it / iters_per_epoch` before each iteration; with `warmup_steps =
  warmup_epochs * iters_per_epoch` and `total_steps = epochs *
  iters_per_epoch` the two agree exactly (both give lr 0 on the first step,
  since optax calls the schedule with the number of updates done so far).

  Args:
    base_lr: peak learning rate (already batch-scaled).
    total_steps: number of optimizer steps of the run (> warmup_steps unless
      both are equal, which gives warm-up only).
    warmup_steps: length of the linear warm-up (>= 0).
    min_lr: final learning rate.

  Returns:
    A function of the integer step returning a float32 scalar. Not
    `optax.warmup_cosine_decay_schedule`: its float32 `1 + cos` loses 2.8e-4
    relative near the end of the decay, and the replay of the official run
    (mage_jax/conformance/trajectory.py) needs the lr within 1e-6.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
  warmup = float(warmup_steps)
  decay_span = float(max(total_steps - warmup_steps, 1))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base_lr * step / max(warmup, 1.0)
    # (1 + cos(pi * progress)) / 2 == sin(pi / 2 * remaining)^2 with remaining = 1 - progress taken from the
    # integer step count: float32 1 + cos(.) cancels near the end of the decay (relative error 2.8e-4 at the
    # last of 300 steps); this form stays within 1e-6 of the float64 reference at every step.
    remaining = jnp.clip((total_steps - step) / decay_span, 0.0, 1.0)
    cosine = min_lr + (base_lr - min_lr) * jnp.square(jnp.sin(0.5 * math.pi * remaining))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


# ---------------------------------------------------------------------------
# Path helpers and masks.


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def path_str(path) -> str:
  """'/'-joined dict keys of a `tree_map_with_path` path ('blocks_0/attn')."""
  return "/".join(_dict_keys(path))


def _shape(leaf) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def _is_scanned(names: tuple[str, ...], scanned_keys: Iterable[str]) -> bool:
  return any(n in scanned_keys for n in names)


def weight_decay_mask(
  params: PyTree, *, no_decay_names: Iterable[str] = (), scanned_keys: Iterable[str] = SCANNED_KEYS
) -> PyTree:
  """Which params get weight decay (True) — timm 0.3.2 `add_weight_decay`.

  Exempt: every param that is 1-D (or 0-D) per layer, every leaf named `bias`
  whatever its rank (`mlm_layer/bias` is 3-D), and every param with a path
  component in `no_decay_names`. Decayed: all other >=2-D weights, including
  the word/position embeddings and `decoder_pos_embed_learned` (timm 0.3.2
  `add_weight_decay`, as the official `main_pretrain.py` calls it).
  Under a scanned stack (a key in `scanned_keys`) the leading layer axis is
  not counted, so stacked LayerNorm scales (shape [depth, d]) are exempt.

  Args:
    params: param tree (arrays or ShapeDtypeStructs).
    no_decay_names: extra names to exempt (e.g. `pos_embed`, `cls_token`).
    scanned_keys: names of `nn.scan` layer stacks.

  Returns:
    A tree of Python bools with the structure of `params`.
  """
  no_decay_names = frozenset(no_decay_names)
  scanned_keys = tuple(scanned_keys)

  def decide(path, leaf):
    names = _dict_keys(path)
    if not names:
      raise ValueError(f"param at path {path} has no dict-key name")
    ndim = len(_shape(leaf)) - int(_is_scanned(names, scanned_keys))
    if ndim <= 1 or names[-1] == "bias":
      return False
    return not any(n in no_decay_names for n in names)

  return jax.tree_util.tree_map_with_path(decide, params)


def _frozen_predicate(frozen: FrozenSpec) -> Callable[[str], bool]:
  if frozen is None:
    return lambda path: False
  if callable(frozen):
    return frozen
  if isinstance(frozen, str):
    raise ValueError(f"frozen must be a predicate or a list of regexes, got the bare string {frozen!r}")
  patterns = [re.compile(p) for p in frozen]
  return lambda path: any(p.search(path) for p in patterns)


def trainable_mask(params: PyTree, frozen: FrozenSpec) -> PyTree:
  """Tree of bools, True where the param is trained (not matched by `frozen`).

  Args:
    params: param tree.
    frozen: None, a predicate on the '/'-joined path (e.g.
      'blocks_0/attn/qkv/kernel'), or regexes `re.search`-ed in that path.
  """
  is_frozen = _frozen_predicate(frozen)
  return jax.tree_util.tree_map_with_path(lambda path, _: not is_frozen(path_str(path)), params)


def with_frozen(tx: optax.GradientTransformation, frozen: FrozenSpec) -> optax.GradientTransformation:
  """Runs `tx` on the trainable params only; frozen params get zero updates.

  Frozen params are invisible to `tx`: no optimizer state, no weight decay
  and no share of the clipping norm — like PyTorch params without gradient
  (e.g. the unused tensors of the official `models_mage.py`), which AdamW
  skips entirely.
  """
  if frozen is None:
    return tx
  is_frozen = _frozen_predicate(frozen)

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: "freeze" if is_frozen(path_str(path)) else "train", params)

  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------
# Layer-wise lr decay (util/lr_decay.py).


def _layer_ids(
  names: tuple[str, ...], shape: tuple[int, ...], depth: int, scanned_keys: tuple[str, ...]
) -> np.ndarray | int:
  """timm `get_layer_id_for_vit` on a flax path; array for scanned stacks."""
  num_layers = depth + 1
  for name in names:
    if name in EMBED_NAMES:
      return 0
    m = re.fullmatch(r"blocks_(\d+)", name)
    if m:
      i = int(m.group(1))
      if i >= depth:
        raise ValueError(f"param {'/'.join(names)} is block {i} but depth is {depth}")
      return i + 1
    if name == "blocks" and name in scanned_keys:
      if not shape or shape[0] != depth:
        raise ValueError(
          f"scanned param {'/'.join(names)} has shape {shape}; expected a leading layer axis of size {depth}"
        )
      return np.arange(1, depth + 1)
  return num_layers


def _check_layer_decay(depth: int, decay: float) -> None:
  if depth <= 0:
    raise ValueError(f"depth must be positive, got {depth}")
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"layer decay must be in (0, 1], got {decay}")


def layerwise_lr_scales(
  params: PyTree, depth: int, decay: float, *, scanned_keys: Iterable[str] = SCANNED_KEYS
) -> PyTree:
  """Per-param lr multipliers `decay ** (depth + 1 - layer_id)`.

  Layer id 0: `token_emb` (and `cls_token`, `pos_embed`, `patch_embed`);
  `i + 1`: `blocks_i`; `depth + 1`: everything else (`fc_norm`, `norm`,
  `head`), which therefore gets scale 1. For a scanned `blocks` stack the
  scale is a float32 array of shape [depth, 1, ..., 1] that broadcasts over the
  stacked leaf.

  Args:
    params: param tree (arrays or ShapeDtypeStructs).
    depth: number of encoder blocks.
    decay: layer decay factor (0.65 ViT-B, 0.75 ViT-L).
    scanned_keys: names of `nn.scan` layer stacks.

  Returns:
    A tree with the structure of `params` whose leaves are Python floats or
    float32 arrays.
  """
  _check_layer_decay(depth, decay)
  scanned_keys = tuple(scanned_keys)
  num_layers = depth + 1

  def scale(path, leaf):
    shape = _shape(leaf)
    ids = _layer_ids(_dict_keys(path), shape, depth, scanned_keys)
    if isinstance(ids, np.ndarray):
      s = (decay ** (num_layers - ids)).astype(np.float32)
      return s.reshape((depth,) + (1,) * (len(shape) - 1))
    return float(decay ** (num_layers - ids))

  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layerwise_lr_decay(
  depth: int, decay: float, *, scanned_keys: Iterable[str] = SCANNED_KEYS
) -> optax.GradientTransformation:
  """Multiplies each update by its `layerwise_lr_scales` factor, read off the update tree.

  The scales depend only on paths and shapes, so they are computed at trace
  time from the update tree; no param tree is needed to build the optimizer.
  """
  _check_layer_decay(depth, decay)
  scanned_keys = tuple(scanned_keys)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    scales = layerwise_lr_scales(updates, depth, decay, scanned_keys=scanned_keys)
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scales), state

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Recipes.


@dataclasses.dataclass(frozen=True)
class PretrainOptim:
  """MAGE pre-training optimizer (official `main_pretrain.py`). `lr` is the batch-scaled peak."""

  lr: float
  total_steps: int
  warmup_steps: int
  min_lr: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.05
  grad_clip_norm: float | None = 3.0

  def schedule(self) -> optax.Schedule:
    return warmup_cosine_schedule(self.lr, self.total_steps, self.warmup_steps, self.min_lr)

  def decay_mask(self, params: PyTree, scanned_keys: Iterable[str] = SCANNED_KEYS) -> PyTree:
    """The params AdamW decays (timm `add_weight_decay`, no extra names)."""
    return weight_decay_mask(params, scanned_keys=scanned_keys)


@dataclasses.dataclass(frozen=True)
class FinetuneOptim:
  """Fine-tuning optimizer (official `main_finetune.py`). `lr` is the batch-scaled peak."""

  lr: float
  total_steps: int
  warmup_steps: int
  depth: int
  layer_decay: float
  min_lr: float = 1e-6
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.05
  no_decay_names: tuple[str, ...] = FINETUNE_NO_DECAY_NAMES
  grad_clip_norm: float | None = None

  def schedule(self) -> optax.Schedule:
    return warmup_cosine_schedule(self.lr, self.total_steps, self.warmup_steps, self.min_lr)

  def decay_mask(self, params: PyTree, scanned_keys: Iterable[str] = SCANNED_KEYS) -> PyTree:
    """The params AdamW decays: 1-D params, biases and `no_decay_names` are exempt."""
    return weight_decay_mask(params, no_decay_names=self.no_decay_names, scanned_keys=scanned_keys)


@dataclasses.dataclass(frozen=True)
class ProbeOptim:
  """Linear-probe optimizer (official `main_linprobe.py`): LARS, 10/90 epochs warm-up/cosine."""

  lr: float
  total_steps: int
  warmup_steps: int
  min_lr: float = 0.0
  momentum: float = 0.9
  weight_decay: float = 0.0
  trust_coefficient: float = 0.001

  def schedule(self) -> optax.Schedule:
    return warmup_cosine_schedule(self.lr, self.total_steps, self.warmup_steps, self.min_lr)


def pretrain_optimizer(
  cfg: PretrainOptim | Mapping[str, Any] | None = None,
  *,
  frozen: FrozenSpec = None,
  scanned_keys: Iterable[str] = SCANNED_KEYS,
  **kwargs,
) -> optax.GradientTransformation:
  """clip_by_global_norm(3.0) -> AdamW(0.9, 0.95, 1e-8, wd 0.05, timm mask).

  Args:
    cfg: a `PretrainOptim`, a mapping/ConfigDict with its field names, or None;
      `kwargs` override or complete it (`lr`, `total_steps`, `warmup_steps`
      are required).
    frozen: params kept out of the optimizer (see `with_frozen`): e.g. unused
      params (tensors `models_mage.py` defines but never reads) or a frozen tokenizer if it shares the tree.
    scanned_keys: names of `nn.scan` layer stacks.

  Returns:
    The optax transformation (the schedule is `PretrainOptim.schedule()`).
  """
  c = config_views.from_config(PretrainOptim, cfg, "PretrainOptim", **kwargs)
  scanned_keys = tuple(scanned_keys)
  mask = lambda p: c.decay_mask(p, scanned_keys)
  parts = []
  if c.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
  parts.append(optax.adamw(c.schedule(), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask))
  return with_frozen(optax.chain(*parts), frozen)


def finetune_optimizer(
  cfg: FinetuneOptim | Mapping[str, Any] | None = None,
  *,
  frozen: FrozenSpec = None,
  scanned_keys: Iterable[str] = SCANNED_KEYS,
  **kwargs,
) -> optax.GradientTransformation:
  """AdamW(0.9, 0.999, wd 0.05) with layer-wise lr decay and warmup-cosine.

  Per param: `p <- p - lr_t * scale * (adam(g) + wd * mask * p)` where `scale`
  is `layerwise_lr_scales` — PyTorch scales the group lr, which multiplies
  the decoupled decay as well. No decay for 1-D params, biases and
  `no_decay_names` (timm `no_weight_decay`: `pos_embed`, `cls_token`); the
  2-D `token_emb` matrices are decayed (LTH14/mage `util/lr_decay.py`). No clipping by default.

  Args:
    cfg: a `FinetuneOptim`, a mapping/ConfigDict with its field names, or None;
      `kwargs` override or complete it.
    frozen: params kept out of the optimizer (see `with_frozen`).
    scanned_keys: names of `nn.scan` layer stacks.
  """
  c = config_views.from_config(FinetuneOptim, cfg, "FinetuneOptim", **kwargs)
  scanned_keys = tuple(scanned_keys)
  mask = lambda p: c.decay_mask(p, scanned_keys)
  parts = []
  if c.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
  parts += [
    optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps),
    optax.add_decayed_weights(c.weight_decay, mask),
    scale_by_layerwise_lr_decay(c.depth, c.layer_decay, scanned_keys=scanned_keys),
    optax.scale_by_learning_rate(c.schedule()),
  ]
  return with_frozen(optax.chain(*parts), frozen)


def probe_optimizer(
  cfg: ProbeOptim | Mapping[str, Any] | None = None, *, frozen: FrozenSpec = None, **kwargs
) -> optax.GradientTransformation:
  """LARS(momentum 0.9, wd 0, trust 0.001) with warmup-cosine (official `main_linprobe.py`).

  Pass only the head params, or the whole tree with `frozen` matching the
  backbone (the reference freezes every non-head param).
  """
  c = config_views.from_config(ProbeOptim, cfg, "ProbeOptim", **kwargs)
  tx = lars.lars(c.schedule(), momentum=c.momentum, weight_decay=c.weight_decay, trust_coefficient=c.trust_coefficient)
  return with_frozen(tx, frozen)
