"""Reconstruction and codebook metrics for tokenizer evaluation (jit-friendly, float32).

* PSNR per image: 10·log10(max_val² / MSE) with the MSE over all pixels and channels of that image; callers
  average over images (the usual "mean PSNR", not the PSNR of the pooled MSE). An exact reconstruction
  (MSE 0) is capped at `MSE_FLOOR`, i.e. 100 dB for max_val 1.
* SSIM per image: Wang et al. 2004 with an 11×11 Gaussian window (σ 1.5), K1 0.01, K2 0.03, L = max_val,
  'valid' filtering (no padding), computed per channel and averaged over space and channels. Same definition
  as `tf.image.ssim` and skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`.
* Codebook usage: fraction of the K codes chosen at least once; perplexity: exp(entropy) of the empirical
  code distribution (K when uniform, 1 when a single code is used).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MSE_FLOOR = 1e-10
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x, y, name):
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"{name} needs two [B, H, W, C] images of one shape, got {x.shape} and {y.shape}")


def psnr(x: jax.Array, y: jax.Array, max_val: float = 1.0) -> jax.Array:
  """Per-image PSNR in dB.

  Args:
    x, y: [B, H, W, C] images (any float dtype; computed in float32).
    max_val: the dynamic range (1 for images in [0, 1]).
  Returns:
    [B] float32.
  """
  _check_pair(x, y, "psnr")
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  return 10.0 * jnp.log10(max_val**2 / jnp.maximum(mse, MSE_FLOOR))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """1-D Gaussian taps exp(−t²/2σ²), t = i − (size−1)/2, normalised to sum 1; float64 [size]."""
  if size < 1 or sigma <= 0:
    raise ValueError(f"gaussian window needs size >= 1 and sigma > 0, got size={size}, sigma={sigma}")
  t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-(t**2) / (2.0 * sigma**2))
  return g / g.sum()


def _valid_filter_matrix(n: int, taps: np.ndarray) -> np.ndarray:
  """[n − k + 1, n] matrix M with (M v)_i = Σ_j taps_j v_{i+j}: 'valid' correlation along one axis."""
  k = taps.shape[0]
  m = np.zeros((n - k + 1, n), np.float64)
  for i in range(n - k + 1):
    m[i, i : i + k] = taps
  return m


def _filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable 'valid' correlation of every channel of [B, H, W, C] with outer(taps, taps).

  Two small banded matmuls instead of a depthwise convolution: XLA's CPU depthwise conv is about as slow
  as the whole tokenizer forward pass.
  """
  mh = jnp.asarray(_valid_filter_matrix(x.shape[1], taps), jnp.float32)
  mw = jnp.asarray(_valid_filter_matrix(x.shape[2], taps), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def ssim(
  x: jax.Array,
  y: jax.Array,
  max_val: float = 1.0,
  filter_size: int = 11,
  filter_sigma: float = 1.5,
  k1: float = SSIM_K1,
  k2: float = SSIM_K2,
) -> jax.Array:
  """Per-image SSIM (module docstring).

  Args:
    x, y: [B, H, W, C] images with H, W >= filter_size.
  Returns:
    [B] float32 in [−1, 1].
  """
  _check_pair(x, y, "ssim")
  if min(x.shape[1:3]) < filter_size:
    raise ValueError(f"ssim with an {filter_size}x{filter_size} window needs images at least that large, got {x.shape}")
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  taps = gaussian_window(filter_size, filter_sigma)
  c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
  mu_x, mu_y = _filter_valid(x, taps), _filter_valid(y, taps)
  # Second moments as E[xy] − E[x]E[y] (biased, no sample-covariance correction), as Wang et al.
  var_x = _filter_valid(x * x, taps) - mu_x**2
  var_y = _filter_valid(y * y, taps) - mu_y**2
  cov = _filter_valid(x * y, taps) - mu_x * mu_y
  luminance = (2.0 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
  contrast_structure = (2.0 * cov + c2) / (var_x + var_y + c2)
  return jnp.mean(luminance * contrast_structure, axis=(1, 2, 3))


def code_histogram(ids: jax.Array, codebook_size: int, weights: jax.Array | None = None) -> jax.Array:
  """Counts of each code id.

  Args:
    ids: int [B, ...] token ids in [0, codebook_size).
    weights: optional [B] per-image weights (e.g. the eval padding mask): an image with weight 0 adds nothing.
  Returns:
    [codebook_size] float32 counts.
  """
  ids = jnp.asarray(ids)
  w = jnp.ones(ids.shape, jnp.float32)
  if weights is not None:
    w = w * jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (ids.ndim - 1))
  return jnp.zeros((codebook_size,), jnp.float32).at[ids.reshape(-1)].add(w.reshape(-1))


def codebook_usage(histogram) -> float:
  """Fraction of codes with a non-zero count."""
  h = np.asarray(histogram, np.float64)
  if h.ndim != 1 or h.size == 0:
    raise ValueError(f"codebook_usage needs a 1-D histogram, got shape {h.shape}")
  return float(np.count_nonzero(h > 0) / h.size)


def codebook_perplexity(histogram) -> float:
  """exp(−Σ p log p) of p = histogram / sum (0 log 0 = 0); nan for an empty histogram."""
  h = np.asarray(histogram, np.float64)
  if h.ndim != 1 or np.any(h < 0):
    raise ValueError(f"codebook_perplexity needs a 1-D non-negative histogram, got shape {h.shape}")
  total = h.sum()
  if total <= 0:
    return float("nan")
  p = h[h > 0] / total
  return float(np.exp(-np.sum(p * np.log(p))))
