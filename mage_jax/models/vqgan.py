"""The MaskGIT-architecture VQGAN tokenizer used by MAGE (MaskGIT's `nets/vqgan_tokenizer.py`).

Matches `taming/models/vqgan.py` + `taming/modules/diffusionmodules/model.py` + `quantize.py` of LTH14/mage
(module names follow the PyTorch keys, so `encoder.down.2.block.0.conv1.weight` lives at
`encoder/down_2/block_0/conv1/kernel`). Images are NHWC float in [0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mage_jax.models import reductions

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  """Sizes of the tokenizer; the defaults are the released ImageNet-256 tokenizer."""

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 256
  in_channels: int = 3
  out_ch: int = 3
  resolution: int = 256
  codebook_size: int = 1024
  num_groups: int = 32
  commitment_cost: float = 0.25

  def __post_init__(self):
    sizes = {
      "ch": self.ch,
      "num_res_blocks": self.num_res_blocks,
      "z_channels": self.z_channels,
      "in_channels": self.in_channels,
      "out_ch": self.out_ch,
      "resolution": self.resolution,
      "codebook_size": self.codebook_size,
      "num_groups": self.num_groups,
    }
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
    if bad or not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
      raise ValueError(f"tokenizer sizes must be positive integers: {bad or {'ch_mult': self.ch_mult}}")
    factor = 2 ** (len(self.ch_mult) - 1)
    if self.resolution % factor:
      raise ValueError(
        f"tokenizer resolution {self.resolution} is not a multiple of its downsampling factor "
        f"{factor} (ch_mult {tuple(self.ch_mult)})"
      )
    for width in [self.ch * m for m in self.ch_mult]:
      if width % self.num_groups:
        raise ValueError(f"tokenizer width {width} is not divisible by num_groups {self.num_groups}")

  @property
  def token_grid(self) -> int:
    return self.resolution // 2 ** (len(self.ch_mult) - 1)

  @property
  def num_tokens(self) -> int:
    return self.token_grid**2


PRECISIONS = {
  "highest": jax.lax.Precision.HIGHEST,
  "high": jax.lax.Precision.HIGH,
  "default": jax.lax.Precision.DEFAULT,
}


def _conv(features, kernel, *, use_bias, dtype, param_dtype, name, precision="highest"):
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    padding=((pad, pad), (pad, pad)),
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    precision=PRECISIONS[precision],
    name=name,
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), ("conv_h", "conv_w", "conv_in", "conv_out")
    ),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
  )


class PatchConv(nn.Module):
  """A stride-1 'same' convolution computed as one matmul over the k·k patches (im2col), with nn.Conv's
  parameters (`kernel` [k, k, in, out] HWIO, `bias` [out]). For the image-facing conv_in: with 3 input
  channels XLA:CPU's convolution runs at a fifth of its usual rate (64 images of 32x32: 5.4 ms against 1.9 ms
  this way); wider inputs are faster as convolutions."""

  features: int
  kernel: int
  use_bias: bool
  dtype: Dtype
  param_dtype: Dtype
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel, x.shape[-1]
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), ("conv_h", "conv_w", "conv_in", "conv_out")
      ),
      (k, k, c, self.features),
      self.param_dtype,
    )
    pad = k // 2
    h, w = x.shape[1], x.shape[2]
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    # Feature (i·k + j)·c + ch of a patch is kernel[i, j, ch]: the HWIO kernel flattened row-major.
    patches = jnp.concatenate([x[:, i : i + h, j : j + w] for i in range(k) for j in range(k)], axis=-1)
    y = jnp.einsum(
      "bhwp,po->bhwo",
      patches,
      kernel.reshape(k * k * c, self.features).astype(self.dtype),
      precision=PRECISIONS[self.precision],
    )
    if self.use_bias:
      bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (self.features,), self.param_dtype
      )
      y = y + bias.astype(self.dtype)
    return y


def _group_norm(num_groups, param_dtype, name):
  # Statistics in float32 whatever the compute dtype: bf16 group means drift visibly.
  return nn.GroupNorm(
    num_groups=num_groups,
    epsilon=1e-6,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    name=name,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
  )


class ResBlock(nn.Module):
  """GN-swish-conv twice. Channel-changing blocks apply the 1x1 shortcut to the block OUTPUT and drop the
  input: MaskGIT's JAX ResBlock reassigns its input variable before the shortcut, and the released weights
  were trained that way (MaskGIT's `nets/vqgan_tokenizer.py`), so a textbook shortcut would not reproduce them."""

  out_channels: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda k, name: _conv(
      self.out_channels,
      k,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
      precision=self.precision,
    )
    h = nn.swish(_group_norm(self.num_groups, self.param_dtype, "norm1")(x)).astype(self.dtype)
    h = conv(3, "conv1")(h)
    h = nn.swish(_group_norm(self.num_groups, self.param_dtype, "norm2")(h)).astype(self.dtype)
    h = conv(3, "conv2")(h)
    if x.shape[-1] == self.out_channels:
      return x + h
    return h + conv(1, "nin_shortcut")(h)


class _Level(nn.Module):
  """One resolution level: `num_blocks` ResBlocks named block_0.. plus the optional resampling."""

  out_channels: int
  num_blocks: int
  resample: str | None  # 'down' | 'up' | None
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    for b in range(self.num_blocks):
      x = ResBlock(self.out_channels, self.num_groups, self.dtype, self.param_dtype, self.precision, name=f"block_{b}")(
        x
      )
    if self.resample == "down":
      x = nn.avg_pool(x, (2, 2), (2, 2))
    elif self.resample == "up":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = _Upsample(self.out_channels, self.dtype, self.param_dtype, self.precision, name="upsample")(x)
    return x


class _Upsample(nn.Module):
  channels: int
  dtype: Dtype
  param_dtype: Dtype
  precision: str

  @nn.compact
  def __call__(self, x):
    return _conv(
      self.channels,
      3,
      use_bias=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
      precision=self.precision,
    )(x)


class _Mid(nn.Module):
  channels: int
  num_groups: int
  dtype: Dtype
  param_dtype: Dtype
  precision: str

  @nn.compact
  def __call__(self, x):
    for name in ("block_1", "block_2"):
      x = ResBlock(self.channels, self.num_groups, self.dtype, self.param_dtype, self.precision, name=name)(x)
    return x


class Encoder(nn.Module):
  config: VQGANConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(num_groups=c.num_groups, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = PatchConv(c.ch, 3, False, self.dtype, self.param_dtype, self.precision, name="conv_in")(x)
    last = len(c.ch_mult) - 1
    for level, mult in enumerate(c.ch_mult):
      x = _Level(c.ch * mult, c.num_res_blocks, None if level == last else "down", name=f"down_{level}", **kw)(x)
    x = _Mid(c.ch * c.ch_mult[-1], name="mid", **kw)(x)
    x = nn.swish(_group_norm(c.num_groups, self.param_dtype, "norm_out")(x)).astype(self.dtype)
    return _conv(
      c.z_channels,
      1,
      use_bias=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv_out",
      precision=self.precision,
    )(x)


class Decoder(nn.Module):
  config: VQGANConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: str = "highest"

  @nn.compact
  def __call__(self, z):
    c = self.config
    kw = dict(num_groups=c.num_groups, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = _conv(
      c.ch * c.ch_mult[-1],
      3,
      use_bias=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv_in",
      precision=self.precision,
    )(z.astype(self.dtype))
    x = _Mid(c.ch * c.ch_mult[-1], name="mid", **kw)(x)
    for level in reversed(range(len(c.ch_mult))):
      x = _Level(c.ch * c.ch_mult[level], c.num_res_blocks, None if level == 0 else "up", name=f"up_{level}", **kw)(x)
    x = nn.swish(_group_norm(c.num_groups, self.param_dtype, "norm_out")(x)).astype(self.dtype)
    x = _conv(
      c.out_ch,
      3,
      use_bias=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv_out",
      precision=self.precision,
    )(x)
    return x.astype(jnp.float32)


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """‖z‖² + ‖e‖² − 2 z·eᵀ in float32 at full precision: token ids are an argmin, so bf16 distances flip them.

  Args:
    z: [..., C] latents. codebook: [K, C].
  Returns:
    [..., K] float32 squared Euclidean distances.
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  cross = jnp.einsum("...c,kc->...k", z, codebook, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(z**2, -1, keepdims=True) + jnp.sum(codebook**2, -1) - 2.0 * cross


class VectorQuantizer(nn.Module):
  """Nearest-codebook quantizer (taming `VectorQuantizer2` / MaskGIT `VectorQuantizer`)."""

  codebook_size: int
  embed_dim: int
  commitment_cost: float = 0.25
  param_dtype: Dtype = jnp.float32

  def setup(self):
    # An Embed submodule so the codebook sits at `quantize/embedding/embedding` like torch's nn.Embedding.
    self.embedding = nn.Embed(
      self.codebook_size,
      self.embed_dim,
      param_dtype=self.param_dtype,
      embedding_init=nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), ("codebook", "code_dim")
      ),
    )

  def __call__(self, z):
    """Returns (z_q with straight-through gradient, ids [...], losses dict, distances [..., K]).

    Losses follow MaskGIT's JAX convention (β on the commitment term): `codebook` = mean((q − sg(z))²),
    `commitment` = β·mean((sg(q) − z)²), `quantizer` = their sum.
    """
    distances = squared_distances(z, self.embedding.embedding)
    ids = reductions.argmin(distances)
    quantized = self.lookup(ids)
    z32 = z.astype(jnp.float32)
    codebook_loss = jnp.mean((quantized - jax.lax.stop_gradient(z32)) ** 2)
    commitment = self.commitment_cost * jnp.mean((jax.lax.stop_gradient(quantized) - z32) ** 2)
    z_q = z32 + jax.lax.stop_gradient(quantized - z32)
    losses = {"codebook": codebook_loss, "commitment": commitment, "quantizer": codebook_loss + commitment}
    return z_q, ids, losses, distances

  def lookup(self, ids):
    return jnp.take(self.embedding.embedding.astype(jnp.float32), ids, axis=0)


class VQGAN(nn.Module):
  """Tokenizer: `encode_to_ids` images [B,H,W,3] in [0,1] -> ids [B, h*w]; `decode_ids` ids -> images.

  `precision` of the convolutions: 'highest' (exact float32), 'high' (TF32 on GPUs, bf16x3 on TPUs: ids still
  match float32 on the fixtures, unlike bf16 compute, which flips near-tied ids), or 'default'.
  """

  config: VQGANConfig = VQGANConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: str = "highest"

  def setup(self):
    c = self.config
    if self.precision not in PRECISIONS:
      raise ValueError(f"unknown conv precision {self.precision!r}; expected one of {sorted(PRECISIONS)}")
    self.encoder = Encoder(c, self.dtype, self.param_dtype, self.precision)
    self.decoder = Decoder(c, self.dtype, self.param_dtype, self.precision)
    self.quantize = VectorQuantizer(c.codebook_size, c.z_channels, c.commitment_cost, self.param_dtype)

  def __call__(self, images):
    """Reconstruction pass for tokenizer training: returns (reconstruction, aux dict)."""
    z = self.encode(images)
    z_q, ids, losses, distances = self.quantize(z)
    return self.decode(z_q), {"ids": ids, "z": z, "distances": distances, **losses}

  def _check_images(self, images):
    c = self.config
    if images.ndim != 4 or images.shape[-1] != c.in_channels:
      raise ValueError(f"tokenizer expects NHWC images with {c.in_channels} channels, got shape {images.shape}")
    factor = 2 ** (len(c.ch_mult) - 1)
    if images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(f"tokenizer image size must be a multiple of {factor}, got shape {images.shape}")

  def encode(self, images):
    self._check_images(images)
    return self.encoder(images.astype(self.dtype)).astype(jnp.float32)

  def quantize_latents(self, z):
    return self.quantize(z)

  def encode_to_ids(self, images):
    """[B,H,W,C] in [0,1] -> int32 [B, (H/f)*(W/f)], row-major over the latent grid."""
    _, ids, _, _ = self.quantize(self.encode(images))
    return ids.reshape(ids.shape[0], -1)

  def decode(self, z_q):
    return self.decoder(z_q)

  def decode_ids(self, ids):
    """int32 [B, N] (N = grid²) or [B, h, w] -> images [B, H, W, 3] (not clipped, like the reference)."""
    if ids.ndim == 2:
      grid = int(round(ids.shape[1] ** 0.5))
      if grid * grid != ids.shape[1]:
        raise ValueError(f"decode_ids needs a square token grid, got {ids.shape[1]} tokens")
      ids = ids.reshape(ids.shape[0], grid, grid)
    return self.decode(self.quantize.lookup(ids))
