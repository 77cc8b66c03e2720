"""Tests for mage_jax.generation.sampling: schedule, one-step pieces, and the full decoding loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mage_jax.generation import sampling

CB = 16  # codebook size in these tests
MASK = 20  # mask id, outside the codebook
V = 22  # logits width: codebook + extra (special) slots that must never be sampled

# Spec §5.1: masked tokens after each step for N = 256.
SPEC_T20 = [255, 252, 248, 243, 236, 228, 218, 207, 194, 181, 166, 150, 133, 116, 97, 79, 59, 40, 20, 1]
SPEC_T12 = [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 1]


def _expected_counts(n0, unknown0, num_steps):
  """Closed-form mask counts per step in float64 python math (the reference's numpy arithmetic)."""
  counts, unknown = [], unknown0
  for s in range(num_steps):
    n = math.floor(n0 * math.cos(math.pi / 2 * (s + 1) / num_steps))
    n = max(1, min(unknown - 1, n))
    n = min(n, unknown)  # a row cannot re-mask more than it has unknown
    counts.append(n)
    unknown = n
  return counts


def _context_logits_fn(seed=0, length=None, special_boost=0.0):
  """A fixed logits function that depends on the current tokens (so every step sees new input)."""
  rng = np.random.default_rng(seed)
  w_ctx = jnp.asarray(rng.normal(size=(MASK + 1, V)), jnp.float32)
  w_tok = jnp.asarray(rng.normal(size=(MASK + 1, V)), jnp.float32)
  pos = jnp.asarray(rng.normal(size=(length or 64, V)), jnp.float32)
  boost = jnp.zeros((V,), jnp.float32).at[CB:].set(special_boost)

  def fn(tokens):
    onehot = jax.nn.one_hot(tokens, MASK + 1, dtype=jnp.float32)
    ctx = onehot.mean(axis=1) @ w_ctx
    return pos[None, : tokens.shape[1]] + ctx[:, None, :] + onehot @ w_tok + boost

  return fn


# ----------------------------------------------------------------------------- schedule


def test_mask_schedule_closed_forms():
  r = np.array([0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(sampling.mask_schedule(r), [1.0, math.cos(math.pi / 8), math.sqrt(0.5), 0.0], atol=1e-15)
  np.testing.assert_allclose(sampling.mask_schedule(r, "linear"), [1.0, 0.75, 0.5, 0.0])
  np.testing.assert_allclose(sampling.mask_schedule(r, "uniform"), [1.0, 0.75, 0.5, 0.0])
  np.testing.assert_allclose(sampling.mask_schedule(r, "square"), [1.0, 0.9375, 0.75, 0.0])
  np.testing.assert_allclose(sampling.mask_schedule(r, "cubic"), [1.0, 1 - 1 / 64, 0.875, 0.0])
  np.testing.assert_allclose(sampling.mask_schedule(r, "pow2.5"), 1 - r**2.5)
  out = sampling.mask_schedule(jnp.asarray(r, jnp.float32))
  assert isinstance(out, jax.Array)
  np.testing.assert_allclose(out, np.cos(np.pi / 2 * r), atol=1e-6)
  with pytest.raises(ValueError, match="unknown schedule"):
    sampling.mask_schedule(r, "sigmoid")
  with pytest.raises(ValueError, match="power schedule"):
    sampling.mask_schedule(r, "powx")


def test_count_table_is_float64_exact():
  table = sampling.mask_count_table(12, 256)
  assert table.shape == (12, 257) and table.dtype == np.int32
  # float32 cos(pi/3) = 0.49999997 would give 127 here; the float64 reference gives 128.
  assert table[7, 256] == 128
  for s in range(12):
    for n0 in (0, 1, 7, 100, 255, 256):
      assert table[s, n0] == math.floor(n0 * math.cos(math.pi / 2 * (s + 1) / 12))


@pytest.mark.parametrize("num_steps,expected", [(20, SPEC_T20), (12, SPEC_T12)])
def test_decode_mask_counts_follow_spec(num_steps, expected):
  assert _expected_counts(256, 256, num_steps) == expected  # the test's own closed form agrees
  tokens = jnp.full((2, 256), MASK, jnp.int32)
  out, num_masked = sampling.decode(
    jax.random.key(0),
    tokens,
    _context_logits_fn(length=256),
    num_steps=num_steps,
    choice_temperature=4.5,
    mask_id=MASK,
    codebook_size=CB,
    return_num_masked=True,
  )
  assert num_masked.shape == (num_steps, 2)
  np.testing.assert_array_equal(np.asarray(num_masked), np.array([expected, expected]).T)
  assert not np.any(np.asarray(out) == MASK)


def test_per_row_counts_when_rows_start_differently():
  length, num_steps = 64, 8
  rng = np.random.default_rng(1)
  unknown0 = [64, 40, 13, 2, 1, 0]
  tokens = np.zeros((len(unknown0), length), np.int32) + rng.integers(0, CB, (len(unknown0), length))
  for b, u in enumerate(unknown0):
    tokens[b, rng.permutation(length)[:u]] = MASK
  _, num_masked = sampling.decode(
    jax.random.key(3),
    jnp.asarray(tokens),
    _context_logits_fn(),
    num_steps=num_steps,
    choice_temperature=3.0,
    mask_id=MASK,
    codebook_size=CB,
    return_num_masked=True,
  )
  for b, u in enumerate(unknown0):
    expected = _expected_counts(u, u, num_steps) if u else [0] * num_steps
    np.testing.assert_array_equal(np.asarray(num_masked[:, b]), expected, err_msg=f"row {b}")


def test_first_row_mode_uses_row0_count():
  length, num_steps = 64, 6
  tokens = np.random.default_rng(2).integers(0, CB, (2, length)).astype(np.int32)
  tokens[0, :40] = MASK
  tokens[1, 10:60] = MASK
  _, num_masked = sampling.decode(
    jax.random.key(0),
    jnp.asarray(tokens),
    _context_logits_fn(),
    num_steps=num_steps,
    choice_temperature=1.0,
    mask_id=MASK,
    codebook_size=CB,
    count_mode="first",
    return_num_masked=True,
  )
  expected = _expected_counts(40, 40, num_steps)
  np.testing.assert_array_equal(np.asarray(num_masked[:, 0]), expected)
  np.testing.assert_array_equal(np.asarray(num_masked[:, 1]), expected)


def test_row_and_first_modes_agree_when_rows_share_the_count():
  tokens = jnp.full((4, 64), MASK, jnp.int32)
  kw = dict(num_steps=7, choice_temperature=4.5, mask_id=MASK, codebook_size=CB)
  fn = _context_logits_fn()
  a = sampling.decode(jax.random.key(5), tokens, fn, count_mode="row", **kw)
  b = sampling.decode(jax.random.key(5), tokens, fn, count_mode="first", **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_explicit_num_unknown_sets_the_schedule_base():
  # Like MAGE's hard-coded N0 = 256: a base larger than #unknown clamps to #unknown - 1 early on.
  tokens = jnp.full((2, 64), 3, jnp.int32).at[:, 10:30].set(MASK)
  _, num_masked = sampling.decode(
    jax.random.key(0),
    tokens,
    _context_logits_fn(),
    num_steps=4,
    choice_temperature=1.0,
    mask_id=MASK,
    codebook_size=CB,
    num_unknown=64,
    return_num_masked=True,
  )
  assert list(np.asarray(num_masked[:, 0])) == _expected_counts(64, 20, 4) == [19, 18, 17, 1]
  _, per_row = sampling.decode(
    jax.random.key(0),
    tokens,
    _context_logits_fn(),
    num_steps=4,
    choice_temperature=1.0,
    mask_id=MASK,
    codebook_size=CB,
    num_unknown=jnp.asarray([64, 20]),
    return_num_masked=True,
  )
  np.testing.assert_array_equal(np.asarray(per_row).T, [[19, 18, 17, 1], _expected_counts(20, 20, 4)])
  with pytest.raises(ValueError, match="num_unknown"):
    sampling.decode(
      jax.random.key(0),
      tokens,
      _context_logits_fn(),
      num_steps=4,
      choice_temperature=1.0,
      mask_id=MASK,
      codebook_size=CB,
      num_unknown=jnp.asarray([64, 20, 3]),
    )


# ----------------------------------------------------------------------------- one step


def test_sample_tokens_confidence_is_prob_of_sampled_id():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 64, V)).astype(np.float32)
  tokens = np.full((2, 64), MASK, np.int32)
  tokens[:, ::3] = rng.integers(0, CB, (2, 22))
  sampled, log_conf = sampling.sample_tokens(
    jax.random.key(1), jnp.asarray(logits), jnp.asarray(tokens), mask_id=MASK, codebook_size=CB
  )
  sampled, log_conf = np.asarray(sampled), np.asarray(log_conf)
  known = tokens != MASK
  np.testing.assert_array_equal(sampled[known], tokens[known])
  assert np.all(np.isposinf(log_conf[known]))
  assert np.all((sampled >= 0) & (sampled < CB))
  lg = logits[..., :CB].astype(np.float64)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  ref = np.take_along_axis(logp, sampled[..., None], -1)[..., 0]
  np.testing.assert_allclose(log_conf[~known], ref[~known], rtol=1e-5, atol=1e-5)
  # The check distinguishes "prob of sampled" from "max prob": many samples are not the argmax.
  assert np.mean(sampled[~known] != lg.argmax(-1)[~known]) > 0.3


def test_sampling_frequencies_are_softmax_of_raw_logits():
  probs = np.array([0.1, 0.2, 0.3, 0.4])
  logits = np.concatenate([np.log(probs), [50.0, 50.0]]).astype(np.float32)  # 2 huge special slots

  def fn(tokens):
    return jnp.broadcast_to(jnp.asarray(logits), tokens.shape + (6,))

  tokens = jnp.full((8, 256), 10, jnp.int32)
  out = np.asarray(
    sampling.decode(jax.random.key(7), tokens, fn, num_steps=1, choice_temperature=4.5, mask_id=10, codebook_size=4)
  )
  freq = np.bincount(out.ravel(), minlength=6) / out.size
  sigma = np.sqrt(probs * (1 - probs) / out.size)
  assert freq[4] == freq[5] == 0
  np.testing.assert_array_less(np.abs(freq[:4] - probs), 4.5 * sigma)


def test_mask_by_random_topk_zero_temperature_picks_lowest():
  inf = np.inf
  log_conf = jnp.asarray(
    [[-0.5, -3.0, inf, -0.1, -2.0, -1.0], [-4.0, inf, inf, -0.2, -0.3, -9.0], [-1.0, -1.0, -1.0, -1.0, inf, -1.0]],
    jnp.float32,
  )
  n_mask = jnp.asarray([3, 5, 2])
  got = np.asarray(sampling.mask_by_random_topk(jax.random.key(0), log_conf, n_mask, 0.0))
  expected = np.array(
    [
      [False, True, False, False, True, True],
      [True, False, False, True, True, True],  # asked 5, only 4 unknown: known never masked
      [True, True, False, False, False, False],
    ]
  )  # exact count on ties, lowest index first
  np.testing.assert_array_equal(got, expected)


def test_mask_by_random_topk_noise_formula():
  rng = np.random.default_rng(4)
  log_conf = np.log(rng.uniform(size=(3, 40))).astype(np.float32)
  log_conf[:, :5] = np.inf
  key, temp = jax.random.key(11), 2.5
  got = np.asarray(sampling.mask_by_random_topk(key, jnp.asarray(log_conf), jnp.asarray([1, 10, 30]), temp))
  gumbel = np.asarray(jax.random.gumbel(key, (3, 40), jnp.float32), np.float64)
  score = log_conf.astype(np.float64) + temp * gumbel
  for b, n in enumerate([1, 10, 30]):
    expected = np.zeros(40, bool)
    expected[np.argsort(score[b], kind="stable")[:n]] = True
    np.testing.assert_array_equal(got[b], expected)
  # And the noise matters: without it the choice is the plain lowest-confidence set.
  plain = np.asarray(sampling.mask_by_random_topk(key, jnp.asarray(log_conf), jnp.asarray([1, 10, 30]), 0.0))
  assert not np.array_equal(got, plain)


# ----------------------------------------------------------------------------- full loop


def test_known_tokens_kept_and_output_valid():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CB, (4, 64)).astype(np.int32)
  unknown = rng.uniform(size=tokens.shape) < 0.6
  tokens[unknown] = MASK
  out = np.asarray(
    sampling.decode(
      jax.random.key(1),
      jnp.asarray(tokens),
      _context_logits_fn(special_boost=30.0),
      num_steps=6,
      choice_temperature=4.5,
      mask_id=MASK,
      codebook_size=CB,
    )
  )
  assert out.dtype == np.int32 and out.shape == tokens.shape
  np.testing.assert_array_equal(out[~unknown], tokens[~unknown])
  assert np.all((out >= 0) & (out < CB))


def test_peaked_logits_return_argmax():
  target = np.random.default_rng(3).integers(0, CB, (3, 64))

  def fn(tokens):
    del tokens
    return 40.0 * jax.nn.one_hot(jnp.asarray(target), V)

  out = sampling.decode(
    jax.random.key(2),
    jnp.full((3, 64), MASK, jnp.int32),
    fn,
    num_steps=5,
    choice_temperature=4.5,
    mask_id=MASK,
    codebook_size=CB,
  )
  np.testing.assert_array_equal(np.asarray(out), target)


def test_zero_temperature_is_deterministic_across_rngs():
  fixed = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, V)), jnp.float32)

  def fn(tokens):
    del tokens
    return fixed

  tokens = jnp.full((2, 64), MASK, jnp.int32)
  kw = dict(num_steps=6, choice_temperature=0.0, sample_temperature=0.0, mask_id=MASK, codebook_size=CB)
  run = jax.jit(lambda key: sampling.decode(key, tokens, fn, **kw))
  outs = [np.asarray(run(jax.random.key(k))) for k in (0, 1, 99)]
  np.testing.assert_array_equal(outs[0], np.asarray(fixed)[..., :CB].argmax(-1))
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], outs[2])


def test_same_seed_reproducible_other_seed_differs():
  tokens = jnp.full((2, 64), MASK, jnp.int32)
  kw = dict(num_steps=6, choice_temperature=4.5, mask_id=MASK, codebook_size=CB)
  fn = _context_logits_fn()
  a = np.asarray(sampling.decode(jax.random.key(0), tokens, fn, **kw))
  run = jax.jit(lambda key: sampling.decode(key, tokens, fn, **kw))
  b = np.asarray(run(jax.random.key(0)))  # eager and jitted agree bit for bit
  c = np.asarray(run(jax.random.key(1)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("count_mode", ["row", "first"])
def test_sharded_batch_matches_single_device(count_mode):
  assert jax.device_count() == 8, "conftest should provide 8 CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CB, (16, 64)).astype(np.int32)
  tokens[rng.uniform(size=tokens.shape) < 0.7] = MASK
  fn = _context_logits_fn()

  def run(key, toks):
    return sampling.decode(
      key, toks, fn, num_steps=6, choice_temperature=4.5, mask_id=MASK, codebook_size=CB, count_mode=count_mode
    )

  single = np.asarray(jax.jit(run)(jax.random.key(42), jax.device_put(tokens, jax.devices()[0])))
  sharding = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh):
    sharded_fn = jax.jit(run, in_shardings=(NamedSharding(mesh, P()), sharding), out_shardings=sharding)
    out = sharded_fn(jax.random.key(42), jax.device_put(tokens, sharding))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out), single)


def test_bad_inputs_raise():
  fn = _context_logits_fn()
  kw = dict(num_steps=3, choice_temperature=1.0, codebook_size=CB)
  tokens = jnp.full((2, 64), MASK, jnp.int32)
  with pytest.raises(ValueError, match="inside the codebook"):
    sampling.decode(jax.random.key(0), tokens, fn, mask_id=3, **kw)
  with pytest.raises(ValueError, match=r"int\[B, N\]"):
    sampling.decode(jax.random.key(0), tokens[0], fn, mask_id=MASK, **kw)
  with pytest.raises(ValueError, match="integer dtype"):
    sampling.decode(jax.random.key(0), tokens.astype(jnp.float32), fn, mask_id=MASK, **kw)
  with pytest.raises(ValueError, match="num_unknown"):
    sampling.decode(jax.random.key(0), tokens, fn, mask_id=MASK, num_unknown=65, **kw)
  with pytest.raises(ValueError, match="num_steps"):
    sampling.decode(jax.random.key(0), tokens, fn, mask_id=MASK, num_steps=0, choice_temperature=1.0, codebook_size=CB)
  with pytest.raises(ValueError, match="logits_fn must return"):
    sampling.decode(jax.random.key(0), tokens, lambda t: jnp.zeros(t.shape + (CB - 1,)), mask_id=MASK, **kw)


def test_choice_noise_is_annealed_by_step():
  """Step 0 of T=2 re-masks by log p + tau0 * (1 - 1/2) * gumbel(split(fold_in(rng, 0))[1])."""
  length, num_steps, tau0 = 64, 2, 3.0
  rng = np.random.default_rng(5)
  strength = rng.permutation(np.linspace(0.5, 4.0, length)).astype(np.float32)
  strength_j = jnp.asarray(strength)

  def fn(tokens):
    # Preferred id depends on how many tokens are masked, so the output tells which step filled it.
    n_masked = jnp.sum(tokens == MASK, axis=-1, keepdims=True)
    pref = (jnp.arange(length)[None, :] + n_masked) % CB
    return strength_j[None, :, None] * jax.nn.one_hot(pref, V)

  key = jax.random.key(9)
  out = np.asarray(
    sampling.decode(
      key,
      jnp.full((1, length), MASK, jnp.int32),
      fn,
      num_steps=num_steps,
      choice_temperature=tau0,
      sample_temperature=0.0,
      mask_id=MASK,
      codebook_size=CB,
    )
  )[0]
  n_mask0 = _expected_counts(length, length, num_steps)[0]
  s = strength.astype(np.float64)
  log_conf = s - np.log(np.exp(s) + CB - 1)
  gumbel = np.asarray(jax.random.gumbel(jax.random.split(jax.random.fold_in(key, 0))[1], (1, length)), np.float64)[0]

  def revealed_for(scale):
    revealed = np.ones(length, bool)
    revealed[np.argsort(log_conf + scale * gumbel, kind="stable")[:n_mask0]] = False
    return revealed

  revealed = revealed_for(tau0 * (1 - 1 / num_steps))
  assert not np.array_equal(revealed, revealed_for(tau0)) and not np.array_equal(revealed, revealed_for(0.0))
  pos = np.arange(length)
  expected = np.where(revealed, (pos + length) % CB, (pos + n_mask0) % CB)
  np.testing.assert_array_equal(out, expected)
