"""argmin / argmax along the last axis as two plain reductions (the extremum, then the smallest index holding
it), the result of `jnp.argmin` / `jnp.argmax` for finite inputs: the first index wins ties.

jnp's versions lower to one reduction over (value, index) pairs, which XLA:CPU runs several times slower than
two ordinary reductions: the tokenizer's nearest-code search over 64x64 latents and 1,024 codes took 9.1 ms
that way and 2.4 ms this way, and the sampler's categorical draw over the codebook 35 ms per decoding step of a
64-image batch. A row whose extremum is NaN gives index 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _first_index_of(x, extremum):
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  size = x.shape[-1]
  first = jnp.min(jnp.where(x == extremum, index, size), axis=-1)
  return jnp.where(first < size, first, 0)


def argmin(x):
  """int32 index of the first minimum of each row of `x` [..., K]."""
  return _first_index_of(x, jnp.min(x, axis=-1, keepdims=True))


def argmax(x):
  """int32 index of the first maximum of each row of `x` [..., K]."""
  return _first_index_of(x, jnp.max(x, axis=-1, keepdims=True))
