"""Transformer pieces shared by the MAGE encoder/decoder and the probe backbone (timm 0.3.2 ViT blocks)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

xavier = nn.initializers.xavier_uniform()
normal02 = nn.initializers.normal(0.02)


def dense(features, axes, *, dtype, param_dtype, name, kernel_init=xavier):
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
  )


def layer_norm(eps, param_dtype, name, axis_name="embed"):
  # float32 statistics and output whatever the compute dtype.
  return nn.LayerNorm(
    epsilon=eps,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    name=name,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
  )


def gelu(x):
  # PyTorch nn.GELU's exact form, x·(1 + erf(x/√2))/2. jax.nn.gelu(approximate=False) goes through erfc,
  # which XLA:CPU evaluates at 2.5x the cost of erf (measured on [4160, 256]: 0.67 vs 0.27 ms).
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def attention_logits(q, k):
  """q·kᵀ in float32 for q, k [B, H, L, Dh], as the official code forces. For bf16 q and k, bf16 operands with
  float32 accumulation give the same products as float32 copies at HIGHEST precision (a bf16 x bf16 product is
  exact in float32), on the tensor cores instead of the float32 units (~15x slower on an H100)."""
  if q.dtype == jnp.float32:
    return jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)


# 'xla': explicit softmax (supports probability dropout); 'fused': jax.nn.dot_product_attention (XLA);
# 'cudnn': jax.nn.dot_product_attention on cuDNN's fused kernel (NVIDIA GPUs, bf16/fp16 compute only).
ATTENTION_IMPLEMENTATIONS = ("xla", "fused", "cudnn")


class Attention(nn.Module):
  """Fused-qkv multi-head self-attention with float32 logits and softmax (as the official code forces).

  `implementation` is one of ATTENTION_IMPLEMENTATIONS; 'fused' and 'cudnn' need no probability dropout, so
  training with `attn_dropout > 0` runs the 'xla' path.
  """

  num_heads: int
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    b, seq_len, d = x.shape
    head_dim = d // self.num_heads
    qkv = dense(3 * d, ("embed", "qkv"), dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
    # The output features are ordered (3, heads, head_dim): q block | k block | v block.
    qkv = qkv.reshape(b, seq_len, 3, self.num_heads, head_dim)
    if self.implementation != "xla" and (deterministic or self.attn_dropout == 0.0):
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      out = jax.nn.dot_product_attention(
        q, k, v, scale=head_dim**-0.5, implementation="cudnn" if self.implementation == "cudnn" else None
      )
    else:
      # Heads-major operands [B, H, L, Dh], each taken from the fused projection by its own transpose: the two
      # products become plain batched matmuls (the tiny step 10% faster than contracting [B, L, H, Dh] in
      # place on XLA:CPU, and 5% faster than one transpose of the whole [B, L, 3, H, Dh] block).
      q, k, v = (jnp.swapaxes(qkv[:, :, i], 1, 2) for i in range(3))
      logits = attention_logits(q, k) * head_dim**-0.5
      probs = jax.nn.softmax(logits, axis=-1)
      probs = nn.Dropout(self.attn_dropout)(probs, deterministic=deterministic)
      out = jnp.einsum("bhqk,bhkd->bqhd", probs.astype(self.dtype), v)
    out = out.reshape(b, seq_len, d)
    out = dense(d, ("qkv_out", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)
    return nn.Dropout(self.proj_dropout)(out, deterministic=deterministic)


class Mlp(nn.Module):
  hidden: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = x.shape[-1]
    h = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
    h = nn.Dropout(self.dropout)(gelu(h), deterministic=deterministic)
    h = dense(d, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)
    return nn.Dropout(self.dropout)(h, deterministic=deterministic)


def drop_path(x, rate, deterministic, module):
  """Per-sample stochastic depth (timm DropPath): zero whole residual branches, rescale the rest."""
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Block(nn.Module):
  """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  eps: float = 1e-6
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed_act"))
    d = x.shape[-1]
    h = layer_norm(self.eps, self.param_dtype, "norm1")(x).astype(self.dtype)
    h = Attention(
      self.num_heads, self.attn_dropout, self.dropout, self.attention, self.dtype, self.param_dtype, name="attn"
    )(h, deterministic)
    x = x + drop_path(h, self.drop_path, deterministic, self)
    h = layer_norm(self.eps, self.param_dtype, "norm2")(x).astype(self.dtype)
    h = Mlp(int(d * self.mlp_ratio), self.dropout, self.dtype, self.param_dtype, name="mlp")(h, deterministic)
    return x + drop_path(h, self.drop_path, deterministic, self)


class _ScanBlock(Block):
  """Block with the (carry, out) signature nn.scan needs; same params as Block."""

  def __call__(self, x, deterministic: bool):
    return super().__call__(x, deterministic), None


def _remat(cls, remat_policy, scan):
  if remat_policy == "none":
    return cls
  policy = None if remat_policy == "full" else getattr(jax.checkpoint_policies, remat_policy)
  return nn.remat(cls, policy=policy, prevent_cse=not scan, static_argnums=(2,))


def make_block_stack(depth, *, scan, remat_policy, **block_kw):
  """A list of Blocks (params `<attr>_<i>`, the PyTorch `blocks.i` layout) or one scanned Block (params
  `<attr>` with a leading 'layers' axis: one compiled body for any depth).

  Assign the result to a module attribute in `setup`; flax names list entries `<attr>_<i>`.
  `remat_policy`: 'none', 'full', or a name in `jax.checkpoint_policies`.
  """
  if scan:
    cls = _remat(_ScanBlock, remat_policy, scan=True)
    return nn.scan(
      cls,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,),
      length=depth,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(**block_kw)
  cls = _remat(Block, remat_policy, scan=False)
  return [cls(**block_kw) for _ in range(depth)]


def run_block_stack(stack, x, deterministic: bool):
  if isinstance(stack, (list, tuple)):
    for block in stack:
      x = block(x, deterministic)
    return x
  x, _ = stack(x, deterministic)
  return x


def stack_block_params(params: dict, prefix: str) -> dict:
  """Loop layout (`prefix_0..prefix_{n-1}`) -> scanned layout (`prefix` with a leading layer axis)."""
  names = sorted(
    (k for k in params if k.rpartition("_")[0] == prefix and k.rpartition("_")[2].isdigit()),
    key=lambda k: int(k.rpartition("_")[2]),
  )
  if not names:
    return dict(params)
  out = {k: v for k, v in params.items() if k not in names}
  out[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
  return out


def unstack_block_params(params: dict, prefix: str) -> dict:
  """Scanned layout -> loop layout; the inverse of `stack_block_params`."""
  if prefix not in params:
    return dict(params)
  stacked = params[prefix]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != prefix}
  for i in range(depth):
    out[f"{prefix}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


STACKS = ("blocks", "decoder_blocks")


def to_scan_layout(params: dict, scan: bool) -> dict:
  """Loop-layout params (checkpoints, exports) -> the layout a model with `scan` expects."""
  for prefix in STACKS if scan else ():
    params = stack_block_params(params, prefix)
  return params


def to_loop_layout(params: dict, scan: bool) -> dict:
  for prefix in STACKS if scan else ():
    params = unstack_block_params(params, prefix)
  return params
