"""Iterative parallel (MaskGIT-style) decoding of token grids, model-agnostic.

The model enters only through `logits_fn(tokens) -> logits`, so the same loop serves unconditional
generation (every token starts as `mask_id`) and editing (only some tokens start masked). The loop is a
`lax.scan` over the steps: static shapes, no host round-trip per step, reproducible from one key
(step `s` uses `fold_in(rng, s)`), and it runs unchanged under `jax.jit` with the batch sharded over a
mesh (every operation is row-wise except the optional row-0 count of `count_mode='first'`).

One step, as in MAGE's `gen_img_uncond.py` (spec §5.1):

  sampled  = categorical(logits[..., :codebook_size])          # raw logits, temperature 1
  sampled  = where(unknown, sampled, tokens)                   # known tokens are kept
  conf     = where(unknown, log p(sampled), +inf)              # prob of the SAMPLED id
  n_mask   = clamp(floor(N0 * schedule((s+1)/T)), 1, #unknown - 1)
  score    = conf + choice_temperature * (1 - (s+1)/T) * gumbel
  tokens   = where(the n_mask lowest scores, mask_id, sampled)

and the result is the last `sampled` (fully filled), not the last `tokens`.

The mask count is taken from a table computed on the host in float64, because the PyTorch reference
evaluates `np.floor(N0 * np.cos(...))` in float64 and float32 does not reproduce it
(float32 cos(pi/3) = 0.49999997, so T=12 would give 127 instead of 128 at step 8).
"""

from __future__ import annotations

import math
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array], jax.Array]
ArrayLike = Union[jax.Array, np.ndarray, float]

_COUNT_MODES = ("row", "first")


def mask_schedule(ratio: ArrayLike, kind: str = "cosine") -> ArrayLike:
  """Fraction of the initially unknown tokens that stay masked after a fraction `ratio` of the steps.

  Names follow MaskGIT (`libml/mask_schedule.py`) and its common PyTorch ports: 'cosine'
  (cos(pi/2 * r), MAGE's and MaskGIT's default), 'linear' (alias 'uniform', 1 - r), 'square'
  (alias 'pow2', 1 - r^2), 'cubic' (alias 'pow3', 1 - r^3) and 'pow<k>' for any float k (1 - r^k).
  No clipping is applied (MAGE does not clip; MaskGIT clips to [1e-6, 1], which only matters for the
  clamp that `decode` applies anyway).

  Args:
    ratio: step fraction (s+1)/T in [0, 1]; a Python float, a numpy array (evaluated in numpy, float64)
      or a jax array (evaluated in jnp, its own dtype).
    kind: schedule name, see above.

  Returns:
    Mask ratio, same shape as `ratio`; numpy/float for numpy/Python input, jax array for jax input.

  Raises:
    ValueError: unknown `kind`.
  """
  xp = jnp if isinstance(ratio, jax.Array) else np
  if kind == "cosine":
    return xp.cos(math.pi / 2.0 * ratio)
  if kind in ("linear", "uniform"):
    return 1.0 - ratio
  aliases = {"square": 2.0, "cubic": 3.0}
  if kind in aliases:
    exponent = aliases[kind]
  elif kind.startswith("pow"):
    try:
      exponent = float(kind[3:])
    except ValueError:
      raise ValueError(f"mask_schedule: bad power schedule name {kind!r}; expected e.g. 'pow2'") from None
  else:
    raise ValueError(
        f"mask_schedule: unknown schedule {kind!r}; expected 'cosine', 'linear'/'uniform', "
        "'square', 'cubic' or 'pow<k>'")
  return 1.0 - ratio**exponent


def mask_count_table(num_steps: int, max_unknown: int, kind: str = "cosine") -> np.ndarray:
  """Scheduled mask counts before clamping: `floor(n0 * schedule((s+1)/T))` in float64.

  Args:
    num_steps: T >= 1.
    max_unknown: largest initial unknown count n0 the table must cover (the sequence length N).
    kind: schedule name, see `mask_schedule`.

  Returns:
    int32[T, max_unknown + 1]; entry [s, n0] is the count for step s and initial unknown count n0
    (negative values, e.g. from float64 cos(pi/2) < 0 rounding, are kept: the clamp fixes them).
  """
  ratios = (np.arange(num_steps, dtype=np.float64) + 1.0) / num_steps
  m = np.asarray(mask_schedule(ratios, kind), dtype=np.float64)
  n0 = np.arange(max_unknown + 1, dtype=np.float64)
  return np.floor(n0[None, :] * m[:, None]).astype(np.int32)


def sample_tokens(
    rng: jax.Array,
    logits: jax.Array,
    tokens: jax.Array,
    *,
    mask_id: int,
    codebook_size: int,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Samples every position and scores it by the log-probability of the sampled id.

  Args:
    rng: PRNG key.
    logits: float[B, N, V] with V >= codebook_size; only the first `codebook_size` entries are used
      (spec pitfall 1: special ids must never be sampled). Computed in float32.
    tokens: int[B, N] current tokens, `mask_id` where unknown.
    mask_id: id of unknown positions.
    codebook_size: number of real token ids.
    temperature: logit temperature (MAGE: 1.0, raw logits). 0 means argmax (deterministic); must be
      a Python number because it selects the code path.

  Returns:
    (sampled int32[B, N], log_conf float32[B, N]): `sampled` keeps known tokens; `log_conf` is
    log p(sampled id) at unknown positions and +inf at known ones (they can never be re-masked).
  """
  logits = logits[..., :codebook_size].astype(jnp.float32)
  if temperature == 0:
    sampled = jnp.argmax(logits, axis=-1)
  else:
    sampled = jax.random.categorical(rng, logits / temperature, axis=-1)
  sampled = sampled.astype(jnp.int32)
  unknown = tokens == mask_id
  sampled = jnp.where(unknown, sampled, tokens.astype(jnp.int32))
  # log_softmax rather than log(softmax): same ordering, no log(0) = -inf for very unlikely samples.
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  safe = jnp.clip(sampled, 0, codebook_size - 1)  # known ids are gathered too, then overwritten by +inf
  log_sel = jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  log_conf = jnp.where(unknown, log_sel, jnp.inf)
  return sampled, log_conf


def mask_by_random_topk(
    rng: jax.Array,
    log_conf: jax.Array,
    n_mask: jax.Array,
    temperature: ArrayLike,
) -> jax.Array:
  """Chooses the `n_mask` positions per row with the lowest Gumbel-perturbed log-confidence.

  Selection is by rank (stable argsort; ties go to the lower position index), so exactly `n_mask`
  positions are chosen even with tied scores (e.g. temperature 0 and equal confidences), and shapes
  stay static. Positions with +inf confidence (known tokens) are never chosen, even if `n_mask`
  exceeds the number of finite entries.

  Args:
    rng: PRNG key for the Gumbel noise.
    log_conf: float32[B, N] log-confidence, +inf at known positions.
    n_mask: int[B] (or scalar) positions to mask per row.
    temperature: noise scale (MAGE: choice_temperature * (1 - (s+1)/T)); scalar, may be traced.

  Returns:
    bool[B, N], True where the token is re-masked.
  """
  gumbel = jax.random.gumbel(rng, log_conf.shape, dtype=jnp.float32)
  score = log_conf + jnp.asarray(temperature, jnp.float32) * gumbel
  order = jnp.argsort(score, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  n_mask = jnp.broadcast_to(jnp.asarray(n_mask, jnp.int32).reshape(-1, 1), (log_conf.shape[0], 1))
  return (ranks < n_mask) & jnp.isfinite(log_conf)


def _initial_unknown(tokens: jax.Array, mask_id: int, num_unknown) -> jax.Array:
  """int32[B] schedule base N0 per row (see `decode`)."""
  batch, length = tokens.shape
  if num_unknown is None:
    return jnp.sum(tokens == mask_id, axis=-1, dtype=jnp.int32)
  if isinstance(num_unknown, (int, np.integer)):
    if not 0 <= num_unknown <= length:
      raise ValueError(f"decode: num_unknown={num_unknown} must be in [0, {length}] (the sequence length)")
    return jnp.full((batch,), num_unknown, jnp.int32)
  n0 = jnp.asarray(num_unknown, jnp.int32)
  if n0.ndim > 1 or (n0.ndim == 1 and n0.shape[0] != batch):
    raise ValueError(f"decode: num_unknown must be an int or int[{batch}], got shape {n0.shape}")
  return jnp.clip(jnp.broadcast_to(n0, (batch,)), 0, length)


def decode(
    rng: jax.Array,
    tokens: jax.Array,
    logits_fn: LogitsFn,
    *,
    num_steps: int,
    choice_temperature: ArrayLike,
    mask_id: int,
    codebook_size: int,
    num_unknown: int | jax.Array | None = None,
    schedule: str = "cosine",
    sample_temperature: float = 1.0,
    count_mode: str = "row",
    return_num_masked: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Iterative parallel decoding (MAGE `gen_image`, spec §5.1), fully on device.

  To jit with model parameters, build `logits_fn` inside the jitted function so the parameters are
  arguments, not baked-in constants:

    @jax.jit
    def generate(params, rng, tokens):
      fn = lambda t: model.apply(params, t)          # caller adds/strips the class slot
      return decode(rng, tokens, fn, num_steps=20, choice_temperature=6.0, mask_id=2024,
                    codebook_size=1024)

  Args:
    rng: PRNG key (`jax.random.key`); step s uses `fold_in(rng, s)`.
    tokens: int[B, N], `mask_id` at unknown positions; any sharding (rows are independent).
    logits_fn: int32[B, N] -> float[B, N, V] with V >= codebook_size. Called once per step with the
      current tokens (mask_id at unknown positions). Must be traceable (no host syncs).
    num_steps: T >= 1, static.
    choice_temperature: tau0 of the annealed Gumbel noise tau0 * (1 - (s+1)/T) (MAGE: 4.5 default,
      6.0 in the README command). 0 gives pure confidence ordering. May be traced.
    mask_id: unknown-token id (MAGE: 2024); must lie outside [0, codebook_size).
    codebook_size: number of real ids (MAGE: 1024); only these logits are sampled.
    num_unknown: schedule base N0. None (default): each row's initial unknown count (for
      unconditional generation N0 = N = 256, exactly as the reference's hard-coded 256; for editing,
      the masked count as in MaskGIT's `unknown_number_in_the_beginning`). An int applies to all rows;
      an int[B] array gives one per row.
    schedule: mask schedule name, see `mask_schedule`.
    sample_temperature: logit temperature of the token sampling; MAGE uses 1.0 (raw logits). 0 means
      argmax, which together with choice_temperature=0 makes decoding independent of `rng`.
    count_mode: 'row' (default): each row uses its own count clamp(floor(N0_b * m), 1, #unknown_b - 1),
      correct when rows start with different unknown counts (editing). 'first': every row uses row
      0's clamped count, as the reference does (`mask_len[0]`). The two are identical when all rows
      share N0 and the initial unknown count, as in unconditional generation.
    return_num_masked: also return the number of masked tokens after each step.

  Returns:
    sampled: int32[B, N], every position filled with an id in [0, codebook_size); known tokens are
      unchanged. If `return_num_masked`, the tuple (sampled, num_masked int32[T, B]) where
      num_masked[s, b] counts mask_id tokens of row b after step s (for T=20, N=256 it runs
      255, 252, ..., 20, 1; the last step re-masks 1 token that the returned `sampled` has filled).

  Raises:
    ValueError: bad shapes, dtypes, or arguments.
  """
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"decode: tokens must be int[B, N], got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"decode: tokens must have an integer dtype, got {tokens.dtype}")
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"decode: num_steps must be a positive int, got {num_steps!r}")
  if codebook_size < 1:
    raise ValueError(f"decode: codebook_size must be >= 1, got {codebook_size}")
  if 0 <= mask_id < codebook_size:
    raise ValueError(
        f"decode: mask_id={mask_id} lies inside the codebook [0, {codebook_size}); sampled ids could "
        "not be told apart from unknown positions")
  if count_mode not in _COUNT_MODES:
    raise ValueError(f"decode: count_mode must be one of {_COUNT_MODES}, got {count_mode!r}")
  if sample_temperature < 0:
    raise ValueError(f"decode: sample_temperature must be >= 0, got {sample_temperature}")

  tokens = tokens.astype(jnp.int32)
  batch, length = tokens.shape
  n0 = _initial_unknown(tokens, mask_id, num_unknown)
  table = jnp.asarray(mask_count_table(num_steps, length, schedule))  # int32[T, N+1]

  def step(carry, s):
    cur, _ = carry
    logits = logits_fn(cur)
    if logits.shape[:2] != (batch, length) or logits.ndim != 3 or logits.shape[-1] < codebook_size:
      raise ValueError(
          f"decode: logits_fn must return float[{batch}, {length}, V>={codebook_size}], got {logits.shape}")
    key_sample, key_choice = jax.random.split(jax.random.fold_in(rng, s))
    sampled, log_conf = sample_tokens(
        key_sample, logits, cur, mask_id=mask_id, codebook_size=codebook_size,
        temperature=sample_temperature)
    unknown_count = jnp.sum(cur == mask_id, axis=-1, dtype=jnp.int32)
    n_mask = jnp.maximum(1, jnp.minimum(unknown_count - 1, table[s, n0]))
    if count_mode == "first":
      n_mask = jnp.broadcast_to(n_mask[0], (batch,))
    ratio = (s + 1).astype(jnp.float32) / num_steps
    remask = mask_by_random_topk(key_choice, log_conf, n_mask, choice_temperature * (1.0 - ratio))
    new_tokens = jnp.where(remask, jnp.int32(mask_id), sampled)
    return (new_tokens, sampled), jnp.sum(new_tokens == mask_id, axis=-1, dtype=jnp.int32)

  (_, sampled), num_masked = jax.lax.scan(step, (tokens, tokens), jnp.arange(num_steps, dtype=jnp.int32))
  if return_num_masked:
    return sampled, num_masked
  return sampled
