"""Mixup / CutMix with label smoothing, as timm's `Mixup` in batch mode.

Fine-tuning recipe (LTH14/mage `main_finetune.py` with timm 0.3.2):
mixup alpha 0.8, cutmix alpha 1.0, prob 1.0, switch prob 0.5, mode 'batch',
label smoothing 0.1 folded into the soft targets, soft-target cross-entropy.

timm batch mode, reproduced here:
* one draw per batch: with probability `prob` mix at all; then CutMix with
  probability `switch_prob` (when both alphas > 0), `lam ~ Beta(a, a)` with
  the chosen method's alpha;
* the batch is mixed with itself flipped along the batch axis (sample i with
  sample b-1-i);
* CutMix: box side `int(side * sqrt(1 - lam))`, centre uniform over the image,
  edges `centre -/+ cut // 2` clipped to the image; `lam` is then corrected to
  `1 - box_area / image_area` (`correct_lam=True`);
* targets: `lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(flip(y)))`
  with `off = smoothing / C`, `on = 1 - smoothing + off`.

Differences from timm, by design: images are NHWC; randomness comes from a
`jax.random` key (not numpy's global state); `num_groups` splits the global
batch into independently mixed groups, which reproduces PyTorch DDP (every GPU
mixes its own local batch with its own draw) when set to the number of data
shards. Mixup/CutMix commute with the per-channel affine
normalise/denormalise of the reference, so they can be applied to [0, 1]
images directly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  """timm `Mixup` arguments used by the MAGE/MAE fine-tuning recipe."""

  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5
  mode: str = "batch"
  label_smoothing: float = 0.1
  num_classes: int = 1000
  correct_lam: bool = True

  def __post_init__(self):
    if self.mode != "batch":
      raise ValueError(f"only mode='batch' is implemented, got {self.mode!r}")
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
      raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
    if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
      raise ValueError("one of mixup_alpha, cutmix_alpha must be > 0")
    if not 0 <= self.prob <= 1 or not 0 <= self.switch_prob <= 1:
      raise ValueError(f"prob and switch_prob must be in [0, 1], got {self.prob}, {self.switch_prob}")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm one_hot with `off = smoothing / C`, `on = 1 - smoothing + off`.

  Args:
    labels: [b] int class ids.
    num_classes: C.
    smoothing: label smoothing in [0, 1).

  Returns:
    [b, C] float32, each row summing to 1.
  """
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on, off).astype(jnp.float32)


def mixup_target(labels: jax.Array, num_classes: int, lam: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """`lam * smooth(y) + (1 - lam) * smooth(flip(y))`: [b, C] float32."""
  y1 = smooth_one_hot(labels, num_classes, smoothing)
  y2 = smooth_one_hot(labels[::-1], num_classes, smoothing)
  return lam * y1 + (1.0 - lam) * y2


def rand_bbox(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, ...]:
  """timm `rand_bbox` (margin 0): (y_lo, y_hi, x_lo, x_hi) int32 scalars."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  yl = jnp.clip(cy - cut_h // 2, 0, height)
  yh = jnp.clip(cy + cut_h // 2, 0, height)
  xl = jnp.clip(cx - cut_w // 2, 0, width)
  xh = jnp.clip(cx + cut_w // 2, 0, width)
  return yl, yh, xl, xh


def box_mask(box: tuple[jax.Array, ...], height: int, width: int) -> jax.Array:
  """[h, w] bool, True inside the half-open box [yl, yh) x [xl, xh)."""
  yl, yh, xl, xh = box
  ys = jnp.arange(height)[:, None]
  xs = jnp.arange(width)[None, :]
  return (ys >= yl) & (ys < yh) & (xs >= xl) & (xs < xh)


def _draw(key: jax.Array, cfg: MixupConfig, num_groups: int):
  """timm `_params_per_batch` per group: (lam [g] f32, use_cutmix [g] bool)."""
  k_apply, k_switch, k_lam = jax.random.split(key, 3)
  shape = (num_groups,)
  apply = jax.random.uniform(k_apply, shape) < cfg.prob
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch, shape) < cfg.switch_prob
  else:
    use_cutmix = jnp.full(shape, cfg.cutmix_alpha > 0)
  # One Beta draw with the chosen alpha (Beta sampling is costly to compile,
  # so it is drawn once for all groups, outside any vmap).
  alpha = jnp.where(use_cutmix, cfg.cutmix_alpha, cfg.mixup_alpha)
  lam_mix = jax.random.beta(k_lam, alpha, alpha, shape)
  lam = jnp.where(apply, lam_mix, 1.0).astype(jnp.float32)
  return lam, use_cutmix & apply


def _mix_group(key, images, labels, lam, use_cutmix, cfg: MixupConfig):
  _, h, w, _ = images.shape
  flipped = images[::-1]
  box = rand_bbox(key, h, w, lam)
  inside = box_mask(box, h, w)
  if cfg.correct_lam:
    area = jnp.sum(inside).astype(jnp.float32)
    lam_cut = 1.0 - area / float(h * w)
  else:
    lam_cut = lam
  cut = jnp.where(inside[None, :, :, None], flipped, images)
  blend = (images * lam + flipped * (1.0 - lam)).astype(images.dtype)
  mixed = jnp.where(use_cutmix, cut, blend)
  lam = jnp.where(use_cutmix, lam_cut, lam)
  targets = mixup_target(labels, cfg.num_classes, lam, cfg.label_smoothing)
  return mixed, targets, {"lam": lam, "use_cutmix": use_cutmix, "box": jnp.stack(box)}


def mix_batch(
  key: jax.Array, images: jax.Array, labels: jax.Array, cfg: MixupConfig = MixupConfig(), num_groups: int = 1
):
  """Applies timm batch-mode Mixup/CutMix and builds smoothed soft targets.

  Args:
    key: a jax.random key.
    images: [b, h, w, c] floating images.
    labels: [b] int class ids in [0, cfg.num_classes).
    cfg: mixing parameters.
    num_groups: independent mixing groups (contiguous, equal slices of the
      batch): 1 = one draw for the global batch; the number of data shards =
      PyTorch DDP behaviour. Each group must have an even size (timm asserts
      an even batch).

  Returns:
    (mixed images [b, h, w, c] same dtype, targets [b, C] float32 summing to
    1 per row, aux dict with per-group `lam` [g] (label weight of the
    unflipped sample, after the CutMix area correction), `use_cutmix` [g]
    bool and `box` [g, 4] int32 (y_lo, y_hi, x_lo, x_hi; only meaningful
    where use_cutmix)).
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [b, h, w, c], got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floating point, got {images.dtype}")
  b = images.shape[0]
  if labels.shape != (b,):
    raise ValueError(f"labels must have shape ({b},), got {labels.shape}")
  if num_groups < 1 or b % num_groups or (b // num_groups) % 2:
    raise ValueError(f"batch {b} must split into num_groups={num_groups} groups of even size")
  g = num_groups
  k_draw, k_box = jax.random.split(key)
  lam, use_cutmix = _draw(k_draw, cfg, g)
  mixed, targets, aux = jax.vmap(lambda k, x, y, lam_g, c: _mix_group(k, x, y, lam_g, c, cfg))(
    jax.random.split(k_box, g),
    images.reshape((g, b // g) + images.shape[1:]),
    labels.reshape(g, b // g),
    lam,
    use_cutmix,
  )
  return (mixed.reshape(images.shape), targets.reshape(b, cfg.num_classes), aux)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """timm `SoftTargetCrossEntropy`: mean over the batch of -sum(t log p).

  Args:
    logits: [b, C] (any float dtype; log-softmax in float32).
    targets: [b, C] soft targets.

  Returns:
    float32 scalar.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(targets * logp, axis=-1))
