"""The FID Inception's convolution, as XLA's convolution and as the matmuls that run faster on CPU.

`inception._conv_bn_relu` runs the matmuls on CPU and XLA's convolution elsewhere (`as_matmuls` says why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from mage_jax.fid.inception import ConvSpec  # at run time inception imports this module

_HIGHEST = jax.lax.Precision.HIGHEST


def xla(spec: ConvSpec, x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(spec.stride, spec.stride),
    padding=((spec.padding[0], spec.padding[0]), (spec.padding[1], spec.padding[1])),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=_HIGHEST,
  )


def as_matmuls(spec: ConvSpec, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same convolution as kh matmuls over row-shifted windows, each window's kw column shifts side by side.

  XLA:CPU runs this network's convolutions at about 30 GFLOP/s on an AVX-512 core pair. As matmuls the whole
  network (pool3 and sFID's features, batch 50) is 1.42x faster under glibc's allocator (5.9 -> 8.4 images/s) and
  1.05x faster under tcmalloc, which the binaries use (8.7 -> 9.1). GPUs and TPUs keep the convolution.
  """
  (kh, kw), stride = spec.kernel, spec.stride
  ph, pw = spec.padding
  x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  # Channel j·C + c of a window is input channel c shifted j columns: kernel[i] [kw, C, O] flattened row-major.
  windows = jnp.concatenate([x[:, :, j : j + span_w : stride] for j in range(kw)], axis=-1)
  rows = kernel.reshape(kh, kw * spec.in_ch, spec.out_ch)
  y = jnp.einsum("bhwc,co->bhwo", windows[:, :span_h:stride], rows[0], precision=_HIGHEST)
  for i in range(1, kh):
    y = y + jnp.einsum("bhwc,co->bhwo", windows[:, i : i + span_h : stride], rows[i], precision=_HIGHEST)
  return y
