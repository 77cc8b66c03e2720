"""Tests for mage_jax.models.discriminator against hand/numpy computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.models import discriminator as disc

_FILT = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0


def _np_blur_pool(x):
  """Zero-pad one pixel each side, 4x4 binomial correlation, stride 2; x [B,H,W,C] float64."""
  b, h, w, c = x.shape
  p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h // 2, w // 2, c))
  for i in range(h // 2):
    for j in range(w // 2):
      out[:, i, j] = np.einsum("bhwc,hw->bc", p[:, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4], _FILT)
  return out


def _np_conv(x, kernel, bias=None):
  """'SAME' stride-1 correlation with an odd HWIO kernel; float64."""
  k = kernel.shape[0]
  r = k // 2
  p = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[3],))
  for a in range(k):
    for c in range(k):
      out += np.einsum("bhwi,io->bhwo", p[:, a : a + h, c : c + w], kernel[a, c])
  return out if bias is None else out + bias


def _np_lrelu(x):
  return np.where(x >= 0, x, 0.2 * x)


def test_blur_pool_matches_numpy_hand_example():
  x = np.random.default_rng(0).standard_normal((2, 6, 8, 3))
  got = disc.blur_pool(jnp.asarray(x, jnp.float32))
  assert got.shape == (2, 3, 4, 3)
  np.testing.assert_allclose(np.asarray(got), _np_blur_pool(x), rtol=1e-5, atol=1e-6)


def test_blur_pool_constant_image():
  c = 0.7
  got = np.asarray(disc.blur_pool(jnp.full((1, 8, 8, 2), c, jnp.float32)))
  assert got.shape == (1, 4, 4, 2)
  # Interior output pixels see no padding: a normalised low-pass keeps a constant.
  np.testing.assert_allclose(got[0, 1:3, 1:3], c, rtol=1e-6)
  # Borders see one zero row/col with 1-D weight 1/8: 7/8 at edges, (7/8)^2 at corners.
  np.testing.assert_allclose(got[0, 0, 1:3], 7 / 8 * c, rtol=1e-6)
  np.testing.assert_allclose(got[0, 0, 0], 49 / 64 * c, rtol=1e-6)


def test_default_width_table():
  assert disc.default_widths(1) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
  assert disc.default_widths(2)[256] == 128 and disc.default_widths(2)[32] == 512


def test_res_block_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  block = disc.DiscriminatorResBlock(5)
  shapes = nn.unbox(jax.eval_shape(block.init, jax.random.key(0), x)["params"])
  assert "bias" not in shapes["skip"]
  # Hand-filled params (random init compiles slowly on CPU); non-zero biases test their placement too.
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  got = np.asarray(jax.jit(block.apply)({"params": params}, x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x64 = x.astype(np.float64)
  h = _np_lrelu(_np_conv(x64, p["conv1"]["kernel"], p["conv1"]["bias"]))
  h = _np_lrelu(_np_conv(_np_blur_pool(h), p["conv2"]["kernel"], p["conv2"]["bias"]))
  skip = _np_conv(_np_blur_pool(x64), p["skip"]["kernel"])
  want = (h + skip) / np.sqrt(2.0)
  assert got.shape == (2, 4, 4, 5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_variables():
  # jit + an rbg key: eager init compiles every initializer separately, and threefry's multi-dim random
  # ops compile ~3x slower than rbg's on this CPU (11 s vs 4 s for this model).
  model = disc.Discriminator(widths=disc.TINY_WIDTHS)
  return jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))


def test_tiny_discriminator_output_and_params(tiny_variables):
  model = disc.Discriminator(widths=disc.TINY_WIDTHS)
  x = jnp.asarray(np.random.default_rng(2).uniform(size=(3, 32, 32, 3)), jnp.float32)
  variables = tiny_variables
  out = jax.jit(model.apply)(variables, x)
  assert out.shape == (3, 1) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  boxed = variables["params"]
  assert boxed["conv_in"]["kernel"].names == ("conv_h", "conv_w", "conv_in", "conv_out")
  assert boxed["dense"]["kernel"].names == ("embed", "mlp")
  params = nn.unbox(boxed)
  assert sorted(params) == ["block_16", "block_4", "block_8", "conv_in", "conv_out", "dense", "logits"]
  assert params["conv_in"]["kernel"].shape == (3, 3, 3, 32)
  assert params["block_16"]["conv1"]["kernel"].shape == (3, 3, 32, 32)
  assert params["block_16"]["conv2"]["kernel"].shape == (3, 3, 32, 64)
  assert params["dense"]["kernel"].shape == (4 * 4 * 64, 64)
  # Xavier-uniform: bound sqrt(6 / (fan_in + fan_out)) with receptive field 3x3.
  k = np.asarray(params["block_8"]["conv1"]["kernel"])
  bound = np.sqrt(6.0 / (9 * 64 + 9 * 64))
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound


def _expected_param_count(res, table):
  def conv(k, i, o, bias=True):
    return k * k * i * o + (o if bias else 0)

  n = conv(3, 3, table[res])
  r = res
  while r > 4:
    c_in, c_out = table[r], table[r // 2]
    n += conv(3, c_in, c_in) + conv(3, c_in, c_out) + conv(1, c_in, c_out, bias=False)
    r //= 2
  n += conv(3, table[4], table[4])
  n += 16 * table[4] * table[4] + table[4] + table[4] + 1
  return n


def test_imagenet256_discriminator_shapes_only():
  model = disc.Discriminator()
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert out.shape == (2, 1) and out.dtype == jnp.float32
  params = nn.unbox(variables["params"])
  assert params["conv_in"]["kernel"].shape == (3, 3, 3, 64)
  assert params["block_128"]["conv2"]["kernel"].shape == (3, 3, 64, 128)
  assert params["block_4"]["skip"]["kernel"].shape == (1, 1, 512, 512)
  count = sum(a.size for a in jax.tree.leaves(params))
  assert count == _expected_param_count(256, disc.default_widths(1))


def test_bf16_compute_keeps_fp32_params_and_logits(tiny_variables):
  model = disc.Discriminator(widths=disc.TINY_WIDTHS, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 32, 32, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.unbox(shapes)))
  out_bf16 = jax.jit(model.apply)(tiny_variables, x)
  out_f32 = jax.jit(disc.Discriminator(widths=disc.TINY_WIDTHS).apply)(tiny_variables, x)
  assert out_bf16.dtype == jnp.float32
  # Same params, lower-precision compute: close but not bit-identical.
  np.testing.assert_allclose(np.asarray(out_bf16), np.asarray(out_f32), rtol=0.1, atol=0.05)


@pytest.mark.parametrize(
  "shape,match", [((1, 24, 24, 3), "power-of-two"), ((1, 32, 16, 3), "square"), ((32, 32, 3), "NHWC")]
)
def test_bad_input_shape(shape, match):
  with pytest.raises(ValueError, match=match):
    disc.Discriminator(widths=disc.TINY_WIDTHS).init(jax.random.key(0), jnp.zeros(shape))


def test_missing_width_entry():
  with pytest.raises(ValueError, match=r"lacks resolutions \[64\]"):
    disc.Discriminator(widths=disc.TINY_WIDTHS).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_r1_double_backprop_through_discriminator(tiny_variables):
  # R1 needs grad-of-grad through the grouped blur convs; its penalty must also match a direct computation.
  from mage_jax.objectives import tokenizer_losses as tl  # pylint: disable=g-import-not-at-top

  model = disc.Discriminator(widths=disc.TINY_WIDTHS)
  x = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 32, 32, 3)), jnp.float32)

  def penalty(v):
    return tl.r1_gradient_penalty(lambda a: model.apply(v, a), x, cost=10.0)[0]

  pen, grads = jax.jit(jax.value_and_grad(penalty))(tiny_variables)
  single = jax.jit(jax.grad(lambda a: model.apply(tiny_variables, a[None])[0, 0]))
  per_sample = [single(x[b]) for b in range(2)]
  want = 10.0 * np.mean([np.sum(np.square(np.asarray(g, np.float64))) for g in per_sample])
  assert float(pen) == pytest.approx(want, rel=1e-4)
  leaves = jax.tree.leaves(nn.unbox(grads))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
