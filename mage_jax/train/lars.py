"""LARS for linear probing: MoCo v3 / MAGE `util/lars.py` (LTH14/mage) as an optax transformation.

`optim.probe_optimizer` wraps it with the probe's warmup-cosine schedule and frozen backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


class LarsState(NamedTuple):
  count: jax.Array  # int32 scalar, number of updates done
  mu: PyTree  # momentum buffers, like params


def lars(
  learning_rate: ScalarOrSchedule, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 0.001
) -> optax.GradientTransformation:
  """LARS exactly as MoCo v3 / MAGE `util/lars.py` (LTH14/mage).

  Not `optax.lars`: that one scales by the learning rate before the momentum
  accumulates, while the reference keeps the momentum of unscaled steps and
  multiplies it by the current learning rate, which differs under a schedule.

  Per leaf with `ndim > 1`: `g <- g + wd * p`, then `g <- g * (trust *
  ||p|| / ||g||)` if both norms are > 0 (else unscaled). Leaves with `ndim
  <= 1` (biases) use the raw gradient: no decay, no trust ratio. Then
  `mu <- momentum * mu + g` and the update is `-lr * mu`. The learning rate
  multiplies the momentum buffer at update time (as in the reference), so a
  schedule's change applies to the whole buffer. Norms are Frobenius norms
  of the whole leaf, so a transposed (flax vs torch) kernel gives the same
  result; the literal `ndim` is used (no scanned-stack handling: LARS is only
  used for the probe head).

  Args:
    learning_rate: float or schedule of the update count.
    momentum: momentum factor.
    weight_decay: L2 coefficient added to >1-D gradients.
    trust_coefficient: LARS trust coefficient.

  Returns:
    An optax transformation; `update` requires `params`.
  """

  def init_fn(params):
    return LarsState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("lars needs params in update(updates, state, params)")

    def precondition(g, p):
      if g.ndim <= 1:
        return g
      g = g + weight_decay * p
      p_norm = jnp.linalg.norm(p.astype(jnp.float32))
      g_norm = jnp.linalg.norm(g.astype(jnp.float32))
      ok = (p_norm > 0) & (g_norm > 0)
      q = jnp.where(ok, trust_coefficient * p_norm / jnp.where(ok, g_norm, 1.0), 1.0)
      return (g * q).astype(g.dtype)

    g = jax.tree.map(precondition, updates, params)
    mu = jax.tree.map(lambda m, gi: momentum * m + gi, state.mu, g)
    lr = learning_rate(state.count) if callable(learning_rate) else (learning_rate)
    new_updates = jax.tree.map(lambda m: (-lr * m).astype(m.dtype), mu)
    count = optax.safe_increment(state.count)
    return new_updates, LarsState(count=count, mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)
