"""StyleGAN2-style image discriminator for VQGAN training (MaskGIT's `nets/discriminator.py`).

3x3 conv -> lrelu -> one ResBlock per halving from the input resolution down to 4x4 -> 3x3 conv -> lrelu ->
flatten -> Dense -> lrelu -> Dense(1). Each ResBlock: conv3x3 (same width), lrelu, BlurPool([1,3,3,1], /2),
conv3x3 to the next width, lrelu; skip = BlurPool then 1x1 conv without bias; the two are summed and divided
by sqrt(2). Images are NHWC; the output is float32 logits [B, 1] whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# StyleGAN2 / MaskGIT width table (channel_multiplier scales only the >= 64 entries, as there).
_BASE_WIDTHS = {4: 512, 8: 512, 16: 512, 32: 512}
_MULTIPLIED_WIDTHS = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}

# A cheap table for 32x32 test / CIFAR-scale inputs (about 0.3M params).
TINY_WIDTHS = ((32, 32), (16, 64), (8, 64), (4, 64))

_xavier = nn.initializers.xavier_uniform()
_CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def default_widths(channel_multiplier: int = 1) -> dict[int, int]:
  """The ImageNet table {1024:16m, 512:32m, 256:64m, 128:128m, 64:256m, 32..4:512}, m = channel_multiplier."""
  table = dict(_BASE_WIDTHS)
  table.update({r: w * channel_multiplier for r, w in _MULTIPLIED_WIDTHS.items()})
  return table


def blur_filter(taps: Sequence[float] = (1.0, 3.0, 3.0, 1.0)) -> np.ndarray:
  """Separable binomial low-pass: outer(taps, taps) normalised to sum 1, shape [k, k] float32."""
  t = np.asarray(taps, np.float64)
  f = np.outer(t, t)
  return (f / f.sum()).astype(np.float32)


def blur_pool(x: jax.Array, taps: Sequence[float] = (1.0, 3.0, 3.0, 1.0), stride: int = 2) -> jax.Array:
  """Depthwise blur with `blur_filter(taps)` then subsample by `stride`, zero 'SAME' padding (as MaskGIT).

  For a 4-tap filter, stride 2 and an even size H this pads one zero row/column on each side, so output
  pixel (i, j) = sum_{a,b} f[a,b] * x[2i-1+a, 2j-1+b].

  Args:
    x: [B, H, W, C] any float dtype.
  Returns:
    [B, ceil(H/stride), ceil(W/stride), C] in x's dtype.
  """
  channels = x.shape[-1]
  f = jnp.asarray(blur_filter(taps), x.dtype)
  kernel = jnp.tile(f[:, :, None, None], (1, 1, 1, channels))  # HWIO with I=1: one filter per channel.
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(stride, stride),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=channels,
  )


def _lrelu(x):
  return jax.nn.leaky_relu(x, negative_slope=0.2)


def _conv(features, kernel, *, use_bias, dtype, param_dtype, name):
  return nn.Conv(
    features,
    (kernel, kernel),
    padding="SAME",
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(_xavier, _CONV_AXES),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
  )


def _dense(features, axes, *, dtype, param_dtype, name):
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(_xavier, axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
  )


class DiscriminatorResBlock(nn.Module):
  """Halves the resolution and maps the width to `features`; output = (main + skip) / sqrt(2)."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
    h = _lrelu(conv(x.shape[-1], 3, use_bias=True, name="conv1")(x))
    h = blur_pool(h)
    h = _lrelu(conv(self.features, 3, use_bias=True, name="conv2")(h))
    skip = conv(self.features, 1, use_bias=False, name="skip")(blur_pool(x))
    return (h + skip) / math.sqrt(2.0)


class Discriminator(nn.Module):
  """StyleGAN2 discriminator returning float32 logits [B, 1] for NHWC images [B, R, R, C].

  Attributes:
    widths: resolution -> width table (a mapping or a tuple of (resolution, width) pairs) covering every
      power of two from the input resolution down to 4. None uses `default_widths(channel_multiplier)`.
    channel_multiplier: only used when `widths` is None.
    dtype: compute dtype of convs/denses (e.g. bfloat16); logits are returned in float32.
    param_dtype: parameter dtype.
  """

  widths: Mapping[int, int] | tuple[tuple[int, int], ...] | None = None
  channel_multiplier: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def width_table(self) -> dict[int, int]:
    if self.widths is None:
      return default_widths(self.channel_multiplier)
    return dict(self.widths.items() if isinstance(self.widths, Mapping) else self.widths)

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(f"discriminator expects NHWC images [B,H,W,C], got shape {images.shape}")
    res = images.shape[1]
    if images.shape[2] != res or res < 4 or res & (res - 1):
      raise ValueError(f"discriminator needs square power-of-two images >= 4, got shape {images.shape}")
    table = self.width_table()
    needed = [res >> i for i in range(int(math.log2(res)) - 1)]  # res, res/2, ..., 4
    missing = [r for r in needed if r not in table]
    if missing:
      raise ValueError(
        f"discriminator width table {sorted(table)} lacks resolutions {missing} needed for {res}x{res} inputs"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _lrelu(_conv(table[res], 3, use_bias=True, name="conv_in", **kw)(images.astype(self.dtype)))
    for r in needed[1:]:
      x = DiscriminatorResBlock(table[r], name=f"block_{r}", **kw)(x)
    x = _lrelu(_conv(table[4], 3, use_bias=True, name="conv_out", **kw)(x))
    x = x.reshape(x.shape[0], -1)
    x = _lrelu(_dense(table[4], ("embed", "mlp"), name="dense", **kw)(x))
    x = _dense(1, ("mlp", None), name="logits", **kw)(x)
    return x.astype(jnp.float32)
