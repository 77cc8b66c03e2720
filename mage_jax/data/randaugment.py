"""RandAugment as timm builds it for the official fine-tuning (`main_finetune.py`: `rand-m9-mstd0.5-inc1`), in TF ops.

The official code runs timm's RandAugment on PIL images after the random crop and flip; this module reproduces
timm's op list, magnitude sampling and level functions, and PIL's pixel arithmetic, on `uint8 [H, W, 3]`
tensors inside tf.data, with stateless randomness so an example's draw is a pure function of its seed.

Per application (timm `RandAugment`): `num_layers` ops drawn uniformly *with replacement*; each is skipped with
probability 1 - `prob`; its magnitude is N(m, mstd) clipped to [0, 10]; signed ops (rotate, shear, translate,
enhance factors in the increasing set) flip their sign with probability 1/2.

Exactness against PIL (tests/test_randaugment.py compares every op with Pillow): the lookup-table ops
(autocontrast, equalize, invert, posterize, solarize, solarize-add) and brightness/color/contrast are bit-exact;
the geometric ops reproduce PIL's affine bicubic filter (a = -1 cubic, edge-clamped taps, fill outside the
source, truncation to uint8) with float64 coordinates and float32 interpolation, so they differ from PIL's
double arithmetic only where a value lands within float32 rounding of an integer (1 level, rarely).
"""

from __future__ import annotations

import dataclasses
import math
import re

from etils import epy

from mage_jax import data

with epy.lazy_imports(success_callback=data.tensorflow_loaded):
  import tensorflow as tf  # loads where a transform is built: importing this module needs no TensorFlow

MAX_LEVEL = 10.0
# timm's orders; the op drawn is an index into one of these.
INCREASING_OPS = (
  "auto_contrast",
  "equalize",
  "invert",
  "rotate",
  "posterize_increasing",
  "solarize_increasing",
  "solarize_add",
  "color_increasing",
  "contrast_increasing",
  "brightness_increasing",
  "sharpness_increasing",
  "shear_x",
  "shear_y",
  "translate_x",
  "translate_y",
)
ORIGINAL_OPS = (
  "auto_contrast",
  "equalize",
  "invert",
  "rotate",
  "posterize",
  "solarize",
  "solarize_add",
  "color",
  "contrast",
  "brightness",
  "sharpness",
  "shear_x",
  "shear_y",
  "translate_x",
  "translate_y",
)
IMAGENET_FILL = (124, 116, 104)  # timm: round(255 * ImageNet mean), the colour geometric ops fill with


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
  magnitude: float = 9.0
  magnitude_std: float = 0.5
  num_layers: int = 2
  increasing: bool = True
  prob: float = 0.5
  translate_pct: float = 0.45
  fill: tuple[int, int, int] = IMAGENET_FILL

  @property
  def ops(self) -> tuple[str, ...]:
    return INCREASING_OPS if self.increasing else ORIGINAL_OPS


def parse(spec: str, fill: tuple[int, int, int] = IMAGENET_FILL) -> RandAugmentConfig:
  """timm's config string, e.g. 'rand-m9-mstd0.5-inc1' (keys m, n, mstd, inc; 'w' weights are not supported).
  Keys left out take timm's defaults (m10, n2, mstd0, inc0), not this dataclass's."""
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment spec {spec!r} must start with 'rand' (e.g. 'rand-m9-mstd0.5-inc1')")
  kwargs = dict(magnitude=MAX_LEVEL, magnitude_std=0.0, num_layers=2, increasing=False)  # timm's defaults
  for part in parts[1:]:
    match = re.fullmatch(r"(mstd|inc|m|n)([0-9.]+)", part)
    if not match:
      raise ValueError(f"RandAugment spec {spec!r}: unknown or malformed part {part!r} (known: m, n, mstd, inc)")
    key, value = match.groups()
    if key == "m":
      kwargs["magnitude"] = float(value)
    elif key == "n":
      kwargs["num_layers"] = int(value)
    elif key == "mstd":
      kwargs["magnitude_std"] = float(value)
    else:
      kwargs["increasing"] = bool(int(value))
  return RandAugmentConfig(fill=tuple(fill), **kwargs)


# ---- PIL's pixel operations on uint8 images (held as int32 [H, W, C]) --------------------------------------


def _channel_bins(image: tf.Tensor) -> tf.Tensor:
  """[H*W, C] indices into per-channel 256-entry tables laid end to end (value + 256 * channel)."""
  channels = tf.shape(image)[-1]
  return tf.reshape(image, [-1, channels]) + tf.range(channels) * 256


def _lut(image: tf.Tensor, luts: tf.Tensor) -> tf.Tensor:
  """Applies one 256-entry table per channel: luts [C, 256]."""
  return tf.reshape(tf.gather(tf.reshape(luts, [-1]), _channel_bins(image)), tf.shape(image))


def _histograms(image: tf.Tensor) -> tf.Tensor:
  """[C, 256] counts."""
  size = 256 * tf.shape(image)[-1]
  counts = tf.math.bincount(tf.reshape(_channel_bins(image), [-1]), minlength=size, maxlength=size, dtype=tf.int64)
  return tf.reshape(counts, [-1, 256])


def auto_contrast(image):
  """ImageOps.autocontrast (cutoff 0): each channel's [min, max] stretched to [0, 255]."""
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  ix = tf.range(256, dtype=tf.float64)[None, :]
  stretched = tf.clip_by_value(tf.cast(ix * scale[:, None] - lo[:, None] * scale[:, None], tf.int32), 0, 255)
  identity = tf.broadcast_to(tf.range(256), tf.shape(stretched))
  return _lut(image, tf.where((hi > lo)[:, None], stretched, identity))


def equalize(image):
  """ImageOps.equalize: per-channel histogram equalisation with PIL's step and rounding."""
  hist = _histograms(image)
  nonzero = hist > 0
  # the count of the last non-empty bin
  last_index = 255 - tf.argmax(tf.cast(tf.reverse(nonzero, [1]), tf.int32), axis=1, output_type=tf.int32)
  last_count = tf.gather(hist, last_index, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
  safe_step = tf.maximum(step, 1)
  before = tf.cumsum(hist, axis=1, exclusive=True)
  equalized = tf.cast(tf.minimum((safe_step[:, None] // 2 + before) // safe_step[:, None], 255), tf.int32)
  keep = (tf.reduce_sum(tf.cast(nonzero, tf.int32), axis=1) <= 1) | (step == 0)
  identity = tf.broadcast_to(tf.range(256), tf.shape(equalized))
  return _lut(image, tf.where(keep[:, None], identity, equalized))


def invert(image):
  return 255 - image


def posterize(image, bits):
  """Keeps the top `bits` bits (0..8) of every value."""
  shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold):
  return tf.where(image < tf.cast(threshold, tf.int32), image, 255 - image)


def solarize_add(image, add, threshold=128):
  return tf.where(image < threshold, tf.minimum(image + tf.cast(add, tf.int32), 255), image)


def _luma(image):
  """PIL's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point, rounded)."""
  r, g, b = tf.unstack(image, axis=-1)
  return (r * 19595 + g * 38470 + b * 7471 + 0x8000) // 65536


def _blend(degenerate, image, factor):
  """Image.blend(degenerate, image, factor): single-precision arithmetic, clipped, truncated."""
  alpha = tf.cast(factor, tf.float32)
  a = tf.cast(degenerate, tf.float32)
  mixed = a + alpha * (tf.cast(image, tf.float32) - a)
  return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.int32)


def color(image, factor):
  gray = tf.broadcast_to(_luma(image)[..., None], tf.shape(image))
  return _blend(gray, image, factor)


def contrast(image, factor):
  luma = _luma(image)
  mean = tf.cast(tf.reduce_mean(tf.cast(luma, tf.float64)) + 0.5, tf.int32)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13), whose border
  pixels are copied unfiltered."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)[:, :, None, None]
  x = tf.cast(image, tf.float32)
  channels = tf.unstack(tf.transpose(x, [2, 0, 1])[..., None], axis=0)
  smoothed = [tf.nn.conv2d(c[None], kernel, 1, "VALID")[0, :, :, 0] / 13.0 for c in channels]
  smoothed = tf.cast(tf.clip_by_value(tf.floor(tf.stack(smoothed, -1) + 0.5), 0, 255), tf.int32)
  degenerate = tf.pad(smoothed, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  interior = tf.pad(tf.ones([h - 2, w - 2], tf.bool), [[1, 1], [1, 1]])[..., None]
  return _blend(tf.where(interior, degenerate, image), image, factor)


def _cubic(v1, v2, v3, v4, d):
  """PIL's transform filter: the a = -1 cubic through taps at -1, 0, 1, 2, in PIL's Horner order (so that a
  flat region interpolates to exactly its value, which truncation to uint8 would otherwise expose)."""
  p2 = -v1 + v3
  p3 = 2 * (v1 - v2) + v3 - v4
  p4 = -v1 + v2 - v3 + v4
  return v2 + d * (p2 + d * (p3 + d * p4))


def affine(image, matrix, fill):
  """Image.transform(AFFINE, matrix, BICUBIC, fillcolor=fill): output pixel (x, y) reads the source at
  matrix @ (x + 0.5, y + 0.5, 1) (pixel-corner coordinates); outside the source it is `fill`."""
  a = tf.unstack(tf.cast(matrix, tf.float64))
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float64) + 0.5, tf.range(w, dtype=tf.float64) + 0.5, indexing="ij")
  sx = a[0] * xs + a[1] * ys + a[2]
  sy = a[3] * xs + a[4] * ys + a[5]
  h_f, w_f = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  inside = (sx >= 0) & (sx < w_f) & (sy >= 0) & (sy < h_f)
  cx, cy = sx - 0.5, sy - 0.5
  x0, y0 = tf.floor(cx), tf.floor(cy)
  # Coordinates in float64 (tap choice), interpolation in float32: flat regions stay exact (the cubic's
  # higher terms vanish) and elsewhere a value lands within float32 rounding of an integer only rarely.
  dx, dy = tf.cast(cx - x0, tf.float32)[..., None], tf.cast(cy - y0, tf.float32)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  flat = tf.reshape(tf.cast(image, tf.float32), [-1, shape[2]])
  columns = [tf.clip_by_value(x0 + t, 0, w - 1) for t in range(-1, 3)]
  rows = []
  for t in range(-1, 3):
    row_start = tf.clip_by_value(y0 + t, 0, h - 1) * w
    rows.append(_cubic(*[tf.gather(flat, row_start + column) for column in columns], dx))
  out = _cubic(*rows, dy)
  out = tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.int32)
  return tf.where(inside[..., None], out, tf.constant(fill, tf.int32))


def rotate(image, degrees, fill):
  """Image.rotate(degrees) (counter-clockwise) about the image centre, bicubic."""
  h, w = tf.cast(tf.shape(image)[0], tf.float64), tf.cast(tf.shape(image)[1], tf.float64)
  angle = -tf.cast(degrees, tf.float64) * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = w / 2.0, h / 2.0
  # source = R (out - centre) + centre, R = [[cos, sin], [-sin, cos]]
  matrix = tf.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])
  return affine(image, matrix, fill)


def shear_x(image, factor, fill):
  return affine(image, tf.stack([1.0, tf.cast(factor, tf.float64), 0.0, 0.0, 1.0, 0.0]), fill)


def shear_y(image, factor, fill):
  return affine(image, tf.stack([1.0, 0.0, 0.0, tf.cast(factor, tf.float64), 1.0, 0.0]), fill)


def translate_x(image, pixels, fill):
  return affine(image, tf.stack([1.0, 0.0, tf.cast(pixels, tf.float64), 0.0, 1.0, 0.0]), fill)


def translate_y(image, pixels, fill):
  return affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, tf.cast(pixels, tf.float64)]), fill)


# ---- timm's level functions: magnitude in [0, 10] (and a random sign) -> op argument ----------------------


def apply_op(name: str, image, magnitude, negate, config: RandAugmentConfig):
  """One timm op at `magnitude` (float scalar tensor); `negate` (bool tensor) flips signed arguments."""
  level = tf.cast(magnitude, tf.float64) / MAX_LEVEL
  signed = lambda v: tf.where(negate, -v, v)  # noqa: E731
  size = tf.cast(tf.shape(image), tf.float64)
  if name == "auto_contrast":
    return auto_contrast(image)
  if name == "equalize":
    return equalize(image)
  if name == "invert":
    return invert(image)
  if name == "rotate":
    return rotate(image, signed(level * 30.0), config.fill)
  if name == "posterize_increasing":
    return posterize(image, 4 - tf.cast(level * 4.0, tf.int32))
  if name == "posterize":
    return posterize(image, tf.cast(level * 4.0, tf.int32))
  if name == "solarize_increasing":
    return solarize(image, 256 - tf.cast(level * 256.0, tf.int32))
  if name == "solarize":
    return solarize(image, tf.cast(level * 256.0, tf.int32))
  if name == "solarize_add":
    return solarize_add(image, tf.cast(level * 110.0, tf.int32))
  enhance = {"color": color, "contrast": contrast, "brightness": brightness, "sharpness": sharpness}
  base = name.removesuffix("_increasing")
  if base in enhance:
    factor = 1.0 + signed(level * 0.9) if name.endswith("_increasing") else level * 1.8 + 0.1
    return enhance[base](image, factor)
  if name in ("shear_x", "shear_y"):
    return (shear_x if name == "shear_x" else shear_y)(image, signed(level * 0.3), config.fill)
  if name == "translate_x":
    return translate_x(image, signed(level * config.translate_pct) * size[1], config.fill)
  if name == "translate_y":
    return translate_y(image, signed(level * config.translate_pct) * size[0], config.fill)
  raise ValueError(f"unknown RandAugment op {name!r}")


def rand_augment(image: tf.Tensor, seed: tf.Tensor, config: RandAugmentConfig) -> tf.Tensor:
  """uint8 [H, W, 3] -> uint8 [H, W, 3]; `seed` is an int64 [2] stateless seed."""
  out = tf.cast(image, tf.int32)
  ops = config.ops
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, config.num_layers)):
    op_seed, apply_seed, magnitude_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 4))
    index = tf.random.stateless_uniform([], op_seed, 0, len(ops), dtype=tf.int32)
    applied = tf.random.stateless_uniform([], apply_seed) < config.prob
    magnitude = config.magnitude + config.magnitude_std * tf.random.stateless_normal([], magnitude_seed)
    magnitude = tf.clip_by_value(magnitude, 0.0, MAX_LEVEL)
    negate = tf.random.stateless_uniform([], sign_seed) < 0.5
    # tf.cond and tf.switch_case call the branches at once; the defaults bind this layer's values explicitly.
    branches = [lambda name=name, x=out, m=magnitude, neg=negate: apply_op(name, x, m, neg, config) for name in ops]
    out = tf.cond(applied, lambda branches=branches, index=index: tf.switch_case(index, branches), lambda x=out: x)
    out = tf.ensure_shape(out, image.shape)
  return tf.cast(out, tf.uint8)
