"""Variable-ratio masking of MAGE pretraining (`models_mage.py` of LTH14/mage), with static shapes.

The official code draws one ratio per step per process from a truncated Gaussian, masks the `ceil(N·r)`
lowest-noise tokens and drops (removes from the encoder input) the `ceil(N·drop_ratio)` lowest, re-drawing
the noise on ties. Ranks of iid uniform noise give the same distribution without the loop, and a fixed drop
count keeps the encoder length static, so one compiled step serves every ratio.

The law of the ratio is `config.masking.law`, a name in `RATIO_LAWS`; every masked-token objective (MAGE, MAGE-C,
the class-conditional decoder) draws its plan through `sample_plan`, so one config line changes all three.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class MaskPlan:
  """Which image tokens are masked / dropped, for a batch.

  Attributes:
    masked: bool [B, N], True where the token is replaced by the mask id (dropped ⊆ masked).
    dropped: bool [B, N], True where the token is removed from the encoder input.
    keep_idx: int32 [B, 1 + N − n_drop], positions in the class-slot-prefixed sequence (0 = class slot) that
      the encoder sees, in their original order.
  """

  masked: jax.Array
  dropped: jax.Array
  keep_idx: jax.Array


def num_dropped(num_tokens: int, drop_ratio: float) -> int:
  return int(math.ceil(num_tokens * drop_ratio))


def truncated_gaussian(rng, *, min_ratio, max_ratio, mu, std):
  """MAGE's law: the Gaussian N(mu, std) truncated to [min_ratio, max_ratio]."""
  lower, upper = (min_ratio - mu) / std, (max_ratio - mu) / std
  return mu + std * jax.random.truncated_normal(rng, lower, upper, (), jnp.float32)


def uniform(rng, *, min_ratio, max_ratio, mu, std):
  """Uniform on [min_ratio, max_ratio] (mu and std unused)."""
  del mu, std
  return jax.random.uniform(rng, (), jnp.float32, min_ratio, max_ratio)


def cosine(rng, *, min_ratio, max_ratio, mu, std):
  """MaskGIT's law, r = cos(pi/2 u) with u ~ U(0, 1), restricted to [min_ratio, max_ratio] (mu and std unused).

  Its CDF is F(x) = 1 - (2/pi) arccos(x); the restriction draws v ~ U(F(min_ratio), F(max_ratio)) and returns
  F^-1(v) = cos(pi/2 (1 - v)).
  """
  del mu, std
  cdf = lambda x: 1.0 - 2.0 / math.pi * math.acos(x)
  v = jax.random.uniform(rng, (), jnp.float32, cdf(min_ratio), cdf(max_ratio))
  return jnp.cos(jnp.pi / 2 * (1.0 - v))


# config.masking.law -> rng, keyword bounds and shape -> scalar float32 ratio.
RATIO_LAWS = {"truncated_gaussian": truncated_gaussian, "uniform": uniform, "cosine": cosine}


def sample_ratio(rng, *, law="truncated_gaussian", min_ratio=0.5, max_ratio=1.0, mu=0.55, std=0.25):
  """One masking ratio from `RATIO_LAWS[law]`."""
  if law not in RATIO_LAWS:
    raise ValueError(f"unknown masking law {law!r}; expected one of {sorted(RATIO_LAWS)}")
  return RATIO_LAWS[law](rng, min_ratio=min_ratio, max_ratio=max_ratio, mu=mu, std=std)


def plan_from_ranks(rank, num_masked, n_drop: int) -> MaskPlan:
  """Builds the plan from per-token ranks [B, N] (a permutation of 0..N−1 per row)."""
  dropped = rank < n_drop
  masked = rank < num_masked
  return plan_from_masks(dropped, masked, n_drop)


def plan_from_masks(dropped, masked, n_drop: int) -> MaskPlan:
  """Builds the plan from boolean masks [B, N] whose rows each drop exactly `n_drop` tokens."""
  n = dropped.shape[1]
  # A stable sort puts the kept positions first in their original order; slicing keeps the shape static.
  kept = jnp.argsort(dropped.astype(jnp.int32), axis=1, stable=True)[:, : n - n_drop] + 1
  keep_idx = jnp.concatenate([jnp.zeros((dropped.shape[0], 1), jnp.int32), kept.astype(jnp.int32)], axis=1)
  return MaskPlan(masked=masked, dropped=dropped, keep_idx=keep_idx)


def sample_plan(
  rng,
  batch_size: int,
  num_tokens: int,
  *,
  law="truncated_gaussian",
  min_ratio=0.5,
  max_ratio=1.0,
  mu=0.55,
  std=0.25,
  drop_ratio=0.5,
) -> tuple[MaskPlan, jax.Array]:
  """Draws one ratio for the batch (from the law named `law`) and a random token order per sample.

  Returns:
    (plan, ratio): `ratio` is the scalar masking ratio drawn.
  """
  ratio_rng, noise_rng = jax.random.split(rng)
  ratio = sample_ratio(ratio_rng, law=law, min_ratio=min_ratio, max_ratio=max_ratio, mu=mu, std=std)
  num_masked = jnp.ceil(num_tokens * ratio).astype(jnp.int32)
  noise = jax.random.uniform(noise_rng, (batch_size, num_tokens))
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return plan_from_ranks(rank, num_masked, num_dropped(num_tokens, drop_ratio)), ratio
