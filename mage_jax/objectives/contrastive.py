"""MAGE-C contrastive co-training: pooling, projection head and NT-Xent loss.

The MAGE-C code was never released (LTH14/mage issue #5). What the MAGE paper
is recalled to describe (only "a contrastive loss on the encoder output" was
checked, in its Fig. 3 caption): a SimCLR-style InfoNCE loss on the encoder
output, a 2-layer MLP projection head on the global average pool, total loss
`L_rec + lambda * L_con`, two augmented views per image, no momentum encoder.
Every default below that the sources do not state is marked ASSUMED and is
configurable.

Negatives are gathered across all devices and hosts by calling `nt_xent` on
GLOBAL arrays inside `jax.jit`: the batch may be sharded over any mesh axes, and
XLA's SPMD partitioner inserts the all-gathers the (2N, 2N) similarity matrix
needs.
"""

from __future__ import annotations

import numbers
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# ASSUMED defaults: SimCLR v1 values (Chen et al. 2020), not MAGE-C's.
DEFAULT_TEMPERATURE = 0.1
DEFAULT_HIDDEN_DIM = 2048
DEFAULT_OUT_DIM = 128


def nt_xent(
  z1: jax.Array,
  z2: jax.Array,
  temperature: float | jax.Array = DEFAULT_TEMPERATURE,
) -> jax.Array:
  """SimCLR NT-Xent (normalised-temperature cross-entropy) over a global batch.

  Row i of `z1` and row i of `z2` are the two views of image i. Each of the 2N
  embeddings is an anchor whose positive is the other view of the same image
  and whose 2N-2 negatives are every other embedding of both views; the
  similarity is cosine / temperature. The loss is the mean over the 2N anchors,
  so it is symmetric in (z1, z2). Computed in float32 whatever the input dtype.

  Pass global (possibly sharded) arrays: under jax.jit the partitioner gathers
  the keys across devices and hosts, so negatives come from the whole batch.

  Args:
    z1: [n, d] embeddings of view 1 (any float dtype), n >= 2.
    z2: [n, d] embeddings of view 2.
    temperature: scalar > 0 (ASSUMED default 0.1).

  Returns:
    float32 scalar loss. Its infimum for aligned pairs with orthogonal
    negatives is log(1 + (2n - 2) * exp(-1 / T)).
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(f"nt_xent expects two [n, d] views of the same shape; got z1 {z1.shape}, z2 {z2.shape}.")
  if isinstance(temperature, numbers.Real) and not temperature > 0:  # a traced temperature cannot be checked
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  n = z1.shape[0]
  if n < 2:
    raise ValueError(f"nt_xent needs at least 2 pairs to have negatives; got n={n}.")
  # optax.ntxent with one label per image: each anchor's only positive is the other view of its image.
  z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
  labels = jnp.concatenate([jnp.arange(n), jnp.arange(n)])
  return optax.ntxent(z, labels, jnp.asarray(temperature, jnp.float32))


def pool_tokens(
  h: jax.Array,
  mode: Literal["mean", "cls"] = "mean",
  valid: jax.Array | None = None,
) -> jax.Array:
  """Pools encoder outputs whose slot 0 is the class ("fake class" 1100) token.

  Args:
    h: [b, 1 + L, d] encoder output, class slot first.
    mode: 'mean' averages the L image-token outputs, class slot excluded (like
      the probe's global_pool of `models_vit_mage.py`); 'cls' returns slot 0. ASSUMED
      default 'mean' ("global average pool", recalled from the paper, unverified).
    valid: optional bool [b, L]; with 'mean', only True positions are averaged
      (e.g. to leave [MASK] positions out). Rows with no True average to 0.

  Returns:
    float32 [b, d].
  """
  if h.ndim != 3 or h.shape[1] < 2:
    raise ValueError(f"pool_tokens expects [b, 1 + L, d] with L >= 1; got shape {h.shape}.")
  h = h.astype(jnp.float32)
  if mode == "cls":
    if valid is not None:
      raise ValueError("pool_tokens: `valid` only applies to mode='mean'.")
    return h[:, 0]
  if mode != "mean":
    raise ValueError(f"pool_tokens: unknown mode {mode!r}; expected 'mean' or 'cls'.")
  tokens = h[:, 1:]
  if valid is None:
    return jnp.mean(tokens, axis=1)
  if valid.shape != tokens.shape[:2]:
    raise ValueError(
      f"pool_tokens: valid has shape {valid.shape}, expected {tokens.shape[:2]} (the class slot is excluded)."
    )
  w = valid.astype(jnp.float32)[..., None]
  return jnp.sum(tokens * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


class ProjectionHead(nn.Module):
  """SimCLR-style MLP projection head: (Dense -> [norm] -> ReLU) x (L-1) -> Dense.

  With the ASSUMED defaults this is SimCLR v1's Dense(2048)-ReLU-Dense(128)
  (MAGE-C's widths are unknown). `num_layers=1` is a
  linear projection. norm='batch' gives SimCLR v2 / MoCo v3-style BatchNorm;
  under jax.jit on global arrays its statistics are over the global batch.

  Attributes:
    hidden_dim: width of the hidden layers (ASSUMED 2048).
    out_dim: output width (ASSUMED 128).
    num_layers: number of Dense layers, >= 1 (ASSUMED 2, as the paper is recalled to say; unverified).
    norm: 'none' | 'batch' | 'layer', after each hidden Dense (ASSUMED 'none').
    use_bias: bias on the Dense layers (dropped automatically before a norm).
    dtype: compute dtype of the Dense layers.
    param_dtype: parameter dtype.
  """

  hidden_dim: int = DEFAULT_HIDDEN_DIM
  out_dim: int = DEFAULT_OUT_DIM
  num_layers: int = 2
  norm: Literal["none", "batch", "layer"] = "none"
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Projects pooled features.

    Args:
      x: [b, d] pooled encoder features.
      train: BatchNorm uses batch statistics (and updates `batch_stats`) if True.

    Returns:
      [b, out_dim] projections in `dtype` (nt_xent upcasts to float32).
    """
    if self.num_layers < 1:
      raise ValueError(f"ProjectionHead.num_layers must be >= 1, got {self.num_layers}.")
    if self.norm not in ("none", "batch", "layer"):
      raise ValueError(f"ProjectionHead.norm must be 'none', 'batch' or 'layer', got {self.norm!r}.")
    init = nn.initializers.lecun_normal()
    for i in range(self.num_layers - 1):
      x = nn.Dense(
        self.hidden_dim,
        use_bias=self.use_bias and self.norm == "none",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(init, ("embed" if i == 0 else None, "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        name=f"hidden_{i}",
      )(x)
      if self.norm == "batch":
        # Statistics in float32 even for bf16 activations.
        x = nn.BatchNorm(
          use_running_average=not train,
          momentum=0.9,
          epsilon=1e-5,
          dtype=jnp.float32,
          param_dtype=self.param_dtype,
          name=f"norm_{i}",
        )(x)
      elif self.norm == "layer":
        x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=self.param_dtype, name=f"norm_{i}")(x)
      x = nn.relu(x).astype(self.dtype)
    return nn.Dense(
      self.out_dim,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(init, ("mlp" if self.num_layers > 1 else "embed", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
      name="out",
    )(x)
