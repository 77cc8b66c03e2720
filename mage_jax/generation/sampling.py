"""Iterative parallel (MaskGIT-style) decoding of token grids, model-agnostic.

The model enters only through `logits_fn(tokens) -> logits`, so the same loop serves unconditional
generation (every token starts as `mask_id`) and editing (only some tokens start masked). The loop is a
`lax.scan` over the steps: static shapes, no host round-trip per step, reproducible from one key
(step `s` uses `fold_in(rng, s)`), and it runs unchanged under `jax.jit` with the batch sharded over a
mesh (every operation is row-wise except the optional row-0 count of `count_mode='first'`).

One step, as in `gen_image` of MAGE's official `gen_img_uncond.py` (schedule from MaskGIT's `parallel_decode.py`):

  sampled  = categorical(logits[..., :codebook_size])          # raw logits, temperature 1
  sampled  = where(unknown, sampled, tokens)                   # known tokens are kept
  conf     = where(unknown, log p(sampled), +inf)              # prob of the SAMPLED id
  n_mask   = clamp(floor(N0 * schedule((s+1)/T)), 1, #unknown - 1)
  score    = conf + choice_temperature * (1 - (s+1)/T) * gumbel
  tokens   = where(the n_mask lowest scores, mask_id, sampled)

and the result is the last `sampled` (fully filled), not the last `tokens`.

`generate_images` is the generation protocol of `gen_img_uncond.py` on top of it: every batch starts fully
masked, the VQGAN decodes the last sampled tokens, pixels become `clip(x*255, 0, 255)` truncated to uint8
(`images.to_uint8`). Batch i uses `fold_in(key(seed), i)`, independent of the device count and of how many
images are requested, so the first k images of a run are the same for any num_images >= k; the batch is
sharded over a 1-D ('data',) mesh of all devices of all processes, and the random draws do not depend on the
sharding because `jax_threefry_partitionable` is on (JAX's default).

The mask count is taken from a table computed on the host in float64, because the PyTorch reference
evaluates `np.floor(N0 * np.cos(...))` in float64 and float32 does not reproduce it
(float32 cos(pi/3) = 0.49999997, so T=12 would give 127 instead of 128 at step 8).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mage_jax.data import images as image_io
from mage_jax.models import reductions
from mage_jax.train import sharding

# The README setting of the released ViT-B (gen_img_uncond.py's own defaults are 4.5 / 12).
DEFAULT_NUM_STEPS = 20
DEFAULT_TEMPERATURE = 6.0

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
      f"mask_schedule: unknown schedule {kind!r}; expected 'cosine', 'linear'/'uniform', 'square', 'cubic' or 'pow<k>'"
    )
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
      (as in the official `gen_img_uncond.py`: special ids must never be sampled). Computed in float32.
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
    # jax.random.categorical's draw (the same Gumbel noise, the same samples), with an argmax XLA:CPU runs faster.
    sampled = reductions.argmax(jax.random.gumbel(rng, logits.shape, jnp.float32) + logits / temperature)
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
  """Iterative parallel decoding (`gen_image` of MAGE's official `gen_img_uncond.py`), fully on device.

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
      "not be told apart from unknown positions"
    )
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
        f"decode: logits_fn must return float[{batch}, {length}, V>={codebook_size}], got {logits.shape}"
      )
    key_sample, key_choice = jax.random.split(jax.random.fold_in(rng, s))
    sampled, log_conf = sample_tokens(
      key_sample, logits, cur, mask_id=mask_id, codebook_size=codebook_size, temperature=sample_temperature
    )
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


# ---------------------------------------------------------------------------------------------------------
# Generation: fully masked batches -> images.


def _num_classes(model) -> int:
  return int(getattr(model.config, "num_classes", 0) or 0)


@functools.lru_cache(maxsize=16)
def make_sampler(
  model,
  tokenizer,
  batch_size: int,
  num_steps: int,
  mesh: Mesh,
  conditional: bool = False,
  key_impl: str = "threefry2x32",
):
  """One jitted function: iterative decoding of a fully masked batch + VQGAN decode + uint8.

  Args are static (modules and mesh are hashable); the function is cached so repeated calls reuse the
  compilation.

  Returns:
    `sample(model_vars, tok_vars, key_data, batch_index, temperature, class_id) -> (images, ids)` with
    images uint8 [batch_size, H, W, 3] and ids int32 [batch_size, N], both sharded over 'data'. Params are
    arguments (never closed over, so they are not baked into the HLO). `key_data` is the raw data of the
    base key (uint32, PRNG implementation `key_impl`); `batch_index` and `class_id` are int32 scalars,
    `temperature` a float32 scalar (traced: no recompilation per temperature). `class_id` is ignored
    unless `conditional`.
  """
  if batch_size % mesh.size:
    raise ValueError(
      f"batch_size={batch_size} must be a multiple of the number of devices ({mesh.size}): "
      "the batch is split evenly over the 'data' mesh axis"
    )
  c = model.config
  replicated = NamedSharding(mesh, P())
  batch_sharded = NamedSharding(mesh, P("data"))

  def sample(model_vars, tok_vars, key_data, batch_index, temperature, class_id):
    rng = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=key_impl), batch_index)
    tokens = jax.lax.with_sharding_constraint(jnp.full((batch_size, c.num_tokens), c.mask_id, jnp.int32), batch_sharded)
    kwargs = {}
    if conditional:
      kwargs["labels"] = jax.lax.with_sharding_constraint(jnp.full((batch_size,), class_id, jnp.int32), batch_sharded)

    def logits_fn(t):
      return model.apply(model_vars, t, method="image_token_logits", **kwargs)

    ids = decode(
      rng,
      tokens,
      logits_fn,
      num_steps=num_steps,
      choice_temperature=temperature,
      mask_id=c.mask_id,
      codebook_size=c.codebook_size,
    )
    ids = jax.lax.with_sharding_constraint(ids, batch_sharded)
    pixels = tokenizer.apply(tok_vars, ids, method="decode_ids")
    return image_io.to_uint8(pixels), ids

  return jax.jit(sample, in_shardings=(replicated,) * 6, out_shardings=(batch_sharded, batch_sharded))


def generate_images(
  model,
  tokenizer,
  variables: dict,
  rng: jax.Array,
  num_images: int,
  batch_size: int,
  num_steps: int = DEFAULT_NUM_STEPS,
  temperature: float = DEFAULT_TEMPERATURE,
  mesh: Mesh | None = None,
  *,
  class_id: int | None = None,
  return_ids: bool = False,
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
  """Generates `num_images` images in batches: an iterator of host numpy batches (every process gets all).

  Arguments are checked and the sampler built at the call; the first batch is dispatched on the first
  `next()`.

  Args:
    model: `MAGE` (or a module with the same `image_token_logits` method and `config`).
    tokenizer: a `models.tokenizer.Tokenizer` (method `decode_ids`; the shipped one is `VQGAN`).
    variables: {'model': {'params': ...}, 'tokenizer': {'params': ...}} (numpy or jax leaves).
    rng: base key (`jax.random.key(seed)`); batch i uses `fold_in(rng, i)`.
    num_images: total images; the last batch is computed in full and truncated.
    batch_size: global batch, a multiple of the mesh size.
    num_steps: decoding steps T.
    temperature: choice temperature tau0 of the annealed Gumbel noise.
    mesh: 1-D ('data',) mesh; default: all devices of all processes.
    class_id: label for every image; only for class-conditional models (`model.config.num_classes > 0`).
    return_ids: also yield the token ids.

  Returns:
    An iterator of uint8 [b, H, W, 3] batches (b = batch_size except possibly the last), or of
    (images, int32 ids [b, N]) if `return_ids`. Batch k+1 is dispatched before batch k is copied to the
    host, so device work overlaps with whatever the caller does (e.g. PNG writing).

  Raises:
    ValueError: bad sizes, missing variables, or class_id for an unconditional model.
  """
  if num_images < 1 or batch_size < 1 or num_steps < 1:
    raise ValueError(
      f"generate_images: num_images, batch_size and num_steps must be >= 1, got {num_images}, {batch_size}, {num_steps}"
    )
  for name in ("model", "tokenizer"):
    if name not in variables:
      raise ValueError(f"generate_images: variables lack the {name!r} entry (have {sorted(variables)})")
  conditional = class_id is not None
  if conditional:
    num_classes = _num_classes(model)
    if not num_classes:
      raise ValueError("class_id given, but the model is class-unconditional (config has no num_classes)")
    if not 0 <= class_id < num_classes:
      raise ValueError(f"class_id={class_id} outside [0, {num_classes})")
  mesh = sharding.create_mesh((("data", -1),)) if mesh is None else mesh
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # a legacy uint32[2] PRNGKey
  key_impl = str(jax.random.key_impl(rng))
  sampler = make_sampler(model, tokenizer, batch_size, num_steps, mesh, conditional, key_impl)
  repl = sharding.replicated(mesh)
  model_vars, tok_vars = sharding.place((variables["model"], variables["tokenizer"]), repl)
  scalars = sharding.place(
    (np.asarray(jax.random.key_data(rng)), np.float32(temperature), np.int32(class_id if conditional else 0)), repl
  )
  key_data, temp, label = scalars
  return _batches(sampler, model_vars, tok_vars, key_data, temp, label, mesh, num_images, batch_size, return_ids)


def _batches(sampler, model_vars, tok_vars, key_data, temp, label, mesh, num_images, batch_size, return_ids):
  """The generator part of `generate_images` (kept apart so that argument errors raise at the call)."""
  num_batches = math.ceil(num_images / batch_size)

  def launch(i):
    return sampler(model_vars, tok_vars, key_data, sharding.place(np.int32(i), sharding.replicated(mesh)), temp, label)

  pending = launch(0)
  for i in range(num_batches):
    current = pending
    if i + 1 < num_batches:
      pending = launch(i + 1)
    keep = min(batch_size, num_images - i * batch_size)
    imgs = np.asarray(sharding.to_host(current[0]))[:keep]
    if return_ids:
      yield imgs, np.asarray(sharding.to_host(current[1]))[:keep]
    else:
      yield imgs
