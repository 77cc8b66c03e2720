"""Tests for mage_jax.objectives.tokenizer_losses against hand / float64 numpy computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from mage_jax.objectives import tokenizer_losses as tl


def _rng(seed=0):
  return np.random.default_rng(seed)


def _softplus(x):
  return np.logaddexp(0.0, x)


# --- reconstruction, VQ, straight-through ------------------------------------------------------------------


def test_l1_l2():
  x, y = _rng().standard_normal((2, 3, 4, 4, 3))
  assert float(tl.l1_loss(x, y)) == pytest.approx(np.abs(x - y).mean(), rel=1e-6)
  assert float(tl.l2_loss(x, y)) == pytest.approx(((x - y) ** 2).mean(), rel=1e-6)
  assert float(tl.reconstruction_loss(x, y, "l2")) == pytest.approx(((x - y) ** 2).mean(), rel=1e-6)
  with pytest.raises(ValueError, match="'huber'"):
    tl.reconstruction_loss(x, y, "huber")


def test_quantizer_losses_values_and_gradient_routing():
  """The VQGAN quantizer: straight-through z_q, codebook term moves only the codes, commitment only z (MaskGIT's
  convention: beta on the commitment term)."""
  from mage_jax.models.vqgan import VectorQuantizer

  beta = 0.25
  vq = VectorQuantizer(codebook_size=6, embed_dim=4, commitment_cost=beta)
  z = jnp.asarray(_rng(2).standard_normal((2, 3, 5, 4)), jnp.float32)
  params = vq.init(jax.random.key(0), z)["params"]
  params = jax.tree.map(lambda x: jnp.asarray(_rng(3).standard_normal(x.shape), jnp.float32), nn.unbox(params))
  codes = np.asarray(params["embedding"]["embedding"], np.float64)
  zq_ref = codes[np.argmin(((np.asarray(z, np.float64)[..., None, :] - codes) ** 2).sum(-1), -1)]
  mse = ((zq_ref - np.asarray(z, np.float64)) ** 2).mean()
  z_q, _, losses, _ = vq.apply({"params": params}, z)
  np.testing.assert_allclose(np.asarray(z_q), zq_ref, rtol=1e-5, atol=1e-6)
  assert float(losses["codebook"]) == pytest.approx(mse, rel=1e-5)
  assert float(losses["commitment"]) == pytest.approx(beta * mse, rel=1e-5)
  w = jnp.asarray(_rng(4).standard_normal(z.shape), jnp.float32)
  g_st = jax.grad(lambda a: jnp.sum(vq.apply({"params": params}, a)[0] * w))(z)
  np.testing.assert_allclose(np.asarray(g_st), np.asarray(w), rtol=1e-6)  # identity gradient through z_q
  g_commit = jax.grad(lambda a: vq.apply({"params": params}, a)[2]["commitment"])(z)
  np.testing.assert_allclose(np.asarray(g_commit), beta * 2 * (np.asarray(z) - zq_ref) / z.size, rtol=1e-4, atol=1e-7)
  g_codes = jax.grad(lambda p: vq.apply({"params": p}, z)[2]["commitment"])(params)
  assert not np.any(np.asarray(g_codes["embedding"]["embedding"]))  # commitment never moves the codes
  g_codes = jax.grad(lambda p: vq.apply({"params": p}, z)[2]["codebook"])(params)
  assert np.any(np.asarray(g_codes["embedding"]["embedding"]))
  assert not np.any(np.asarray(jax.grad(lambda a: vq.apply({"params": params}, a)[2]["codebook"])(z)))


# --- entropy -----------------------------------------------------------------------------------------------


def _np_entropy_loss(d, t):
  logits = -d.reshape(-1, d.shape[-1]).astype(np.float64) / t
  log_p = logits - logsumexp(logits, axis=-1, keepdims=True)
  p = np.exp(log_p)
  sample = -(p * log_p).sum(-1).mean()
  avg = p.mean(0)
  nz = avg > 0
  return sample - (-(avg[nz] * np.log(avg[nz])).sum())


@pytest.mark.parametrize("temperature,scale", [(1.0, 1.0), (0.01, 0.02), (0.01, 1.0)])
def test_entropy_loss_matches_float64(temperature, scale):
  d = _rng(3).uniform(0, 1, (2, 4, 4, 16)) * scale  # [B, h, w, K]
  got = float(tl.entropy_loss(jnp.asarray(d, jnp.float32), temperature))
  assert got == pytest.approx(_np_entropy_loss(d, temperature), abs=2e-5)


def test_entropy_loss_limits_and_gradient():
  k = 8
  # Equal distances: every p is uniform, sample entropy = mean entropy = log K -> 0.
  loss = jax.jit(tl.entropy_loss, static_argnums=1)
  assert float(loss(jnp.ones((k, k)), 1.0)) == pytest.approx(0.0, abs=1e-6)
  # K latents, each confidently on its own code: 0 - log K.
  d = 10.0 * (1.0 - np.eye(k, dtype=np.float32))
  assert float(loss(jnp.asarray(d), 0.01)) == pytest.approx(-np.log(k), abs=1e-5)
  # Unused codes (p underflows to 0) keep a finite gradient.
  d = np.tile(np.arange(k, dtype=np.float32) * 50.0, (k, 1))
  g = jax.jit(jax.grad(lambda x: tl.entropy_loss(x, 0.01)))(jnp.asarray(d))
  assert np.all(np.isfinite(np.asarray(g)))
  with pytest.raises(ValueError, match="temperature"):
    tl.entropy_loss(jnp.ones((2, 3)), 0.0)


# --- adversarial -------------------------------------------------------------------------------------------


def test_non_saturating_and_hinge_losses():
  real, fake = _rng(4).standard_normal((2, 6, 1)) * 3
  assert float(tl.generator_adversarial_loss(fake)) == pytest.approx(_softplus(-fake).mean(), rel=1e-6)
  assert float(tl.discriminator_adversarial_loss(real, fake)) == pytest.approx(
    _softplus(-real).mean() + _softplus(fake).mean(), rel=1e-6
  )
  assert float(tl.generator_adversarial_loss(fake, "hinge")) == pytest.approx(-fake.mean(), rel=1e-6)
  assert float(tl.discriminator_adversarial_loss(real, fake, "hinge")) == pytest.approx(
    np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean(), rel=1e-6
  )
  with pytest.raises(ValueError, match="'wgan'"):
    tl.generator_adversarial_loss(fake, "wgan")
  # Large logits: softplus must not overflow.
  assert float(tl.generator_adversarial_loss(jnp.array([-200.0]))) == pytest.approx(200.0)


def test_adversarial_weight():
  assert float(tl.adversarial_weight(9, 10, 0.1)) == 0.0
  assert float(tl.adversarial_weight(10, 10, 0.1)) == pytest.approx(0.1)
  f = jax.jit(lambda s: tl.adversarial_weight(s, 10, 0.1))
  assert [float(f(jnp.int32(s))) for s in (0, 10, 11)] == pytest.approx([0.0, 0.1, 0.1])


def test_r1_penalty():
  rng = _rng(5)
  x = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, 4, 2)), jnp.float32)
  c = 0.3
  fn = lambda params: lambda imgs: jnp.sum(imgs * params, axis=(1, 2, 3)) + c * jnp.sum(imgs**2, (1, 2, 3))
  pen, logits = tl.r1_gradient_penalty(fn(w), x, cost=10.0)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  grad = w64[None] + 2 * c * x64  # dD(x_b)/dx_b
  assert float(pen) == pytest.approx(10.0 * (grad**2).sum(axis=(1, 2, 3)).mean(), rel=1e-5)
  np.testing.assert_allclose(np.asarray(logits), (x64 * w64).sum((1, 2, 3)) + c * (x64**2).sum((1, 2, 3)), rtol=1e-5)
  # Differentiable w.r.t. D's params (double backprop): d/dw mean_b |w + 2cx_b|^2 = 2 mean_b (w + 2cx_b).
  gw = jax.grad(lambda p: tl.r1_gradient_penalty(fn(p), x)[0])(w)
  np.testing.assert_allclose(np.asarray(gw), 2 * grad.mean(0), rtol=1e-4, atol=1e-6)


def test_lecam_ema_and_regularizer():
  rng = _rng(6)
  decay = 0.9
  state = tl.LeCamState.create()
  ema_r = ema_f = 0.0
  for _ in range(3):
    real, fake = rng.standard_normal((2, 5, 1))
    reg, state = tl.lecam_loss(state, jnp.asarray(real), jnp.asarray(fake), decay)
    ema_r = decay * ema_r + (1 - decay) * real.mean()
    ema_f = decay * ema_f + (1 - decay) * fake.mean()
    want = (np.maximum(real - ema_f, 0) ** 2).mean() + (np.maximum(ema_r - fake, 0) ** 2).mean()
    assert float(state.ema_real) == pytest.approx(ema_r, rel=1e-5)
    assert float(state.ema_fake) == pytest.approx(ema_f, rel=1e-5)
    assert float(reg) == pytest.approx(want, rel=1e-5)
  # Gradient w.r.t. the logits only (the EMAs are constants): 2·relu(real − ema_f)/n.
  real, fake = rng.standard_normal((2, 5, 1)) + np.array([1.0, -1.0])[:, None, None]
  g = jax.grad(tl.lecam_regularizer)(jnp.asarray(real, jnp.float32), jnp.asarray(fake, jnp.float32), state)
  np.testing.assert_allclose(np.asarray(g), 2 * np.maximum(real - ema_f, 0) / real.size, rtol=1e-4, atol=1e-7)
  # The state is a pytree: updates run under jit.
  new = jax.jit(tl.lecam_update)(state, jnp.ones((2, 1)), -jnp.ones((2, 1)))
  assert float(new.ema_real) == pytest.approx(0.999 * ema_r + 0.001, rel=1e-5)


# --- assembly ----------------------------------------------------------------------------------------------


def test_generator_loss_terms():
  rng = _rng(7)
  x, y = rng.uniform(size=(2, 2, 4, 4, 3))
  fake = rng.standard_normal((2, 1))
  total, terms = tl.generator_loss_terms(
    x,
    y,
    codebook_loss=0.5,
    commitment_loss=0.125,
    entropy=-0.4,
    perceptual=2.0,
    logits_fake=fake,
    rec_type="l2",
    rec_weight=2.0,
    entropy_weight=0.1,
    perceptual_weight=0.1,
    adv_weight=tl.adversarial_weight(5, 3, 0.1),
  )
  want = {
    "rec": 2.0 * ((x - y) ** 2).mean(),
    "vq": 0.5,
    "commit": 0.125,
    "entropy": -0.04,
    "perceptual": 0.2,
    "adv": 0.1 * _softplus(-fake).mean(),
  }
  assert set(terms) == set(want)
  for k, v in want.items():
    assert float(terms[k]) == pytest.approx(v, rel=1e-5), k
  assert float(total) == pytest.approx(sum(want.values()), rel=1e-5)
  # Before the discriminator starts, or with no logits, the adversarial term is 0.
  _, terms = tl.generator_loss_terms(
    x, y, codebook_loss=0.0, commitment_loss=0.0, logits_fake=fake, adv_weight=tl.adversarial_weight(2, 3, 0.1)
  )
  assert float(terms["adv"]) == 0.0
  total, terms = tl.generator_loss_terms(x, y, codebook_loss=0.0, commitment_loss=0.0)
  assert float(terms["adv"]) == 0.0 and float(total) == pytest.approx(np.abs(x - y).mean(), rel=1e-5)


def test_discriminator_loss_terms():
  rng = _rng(8)
  real, fake = rng.standard_normal((2, 4, 1))
  state = tl.LeCamState(ema_real=jnp.float32(0.2), ema_fake=jnp.float32(-0.1))
  total, terms, new = tl.discriminator_loss_terms(
    real, fake, r1_penalty=0.7, lecam_state=state, lecam_weight=0.01, lecam_decay=0.5
  )
  ema_r, ema_f = 0.5 * 0.2 + 0.5 * real.mean(), 0.5 * -0.1 + 0.5 * fake.mean()
  lecam = (np.maximum(real - ema_f, 0) ** 2).mean() + (np.maximum(ema_r - fake, 0) ** 2).mean()
  want = {"adv": _softplus(-real).mean() + _softplus(fake).mean(), "lecam": 0.01 * lecam, "r1": 0.7}
  assert set(terms) == set(want)
  for k, v in want.items():
    assert float(terms[k]) == pytest.approx(v, rel=1e-5), k
  assert float(total) == pytest.approx(sum(want.values()), rel=1e-5)
  assert float(new.ema_real) == pytest.approx(ema_r, rel=1e-5)
  # Weight 0 (before the start step) zeroes every term but still tracks the EMAs.
  total, terms, new0 = tl.discriminator_loss_terms(
    real, fake, weight=tl.adversarial_weight(0, 1, 1.0), r1_penalty=0.7, lecam_state=state, lecam_decay=0.5
  )
  assert float(total) == 0.0 and float(new0.ema_fake) == pytest.approx(ema_f, rel=1e-5)
  total, terms, none_state = tl.discriminator_loss_terms(real, fake, gan_type="hinge")
  assert none_state is None and float(terms["lecam"]) == 0.0
  assert float(total) == pytest.approx(np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean(), rel=1e-5)


# --- perceptual --------------------------------------------------------------------------------------------

_NARROW = (4, 6, 8, 8, 8)


def _np_conv3(x, k, b):
  h, w = x.shape[1:3]
  p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(np.einsum("bhwi,io->bhwo", p[:, a : a + h, c : c + w], k[a, c]) for a in range(3) for c in range(3))
  return out + b


def _np_lpips(weights, x, y, use_lin):
  """Float64 numpy transcription of the documented LPIPS computation (inputs in [0, 1])."""
  shift = np.array([-0.030, -0.088, -0.188])
  scale = np.array([0.458, 0.448, 0.450])
  feats = []
  for img in (x, y):
    h = ((img * 2 - 1) - shift) / scale
    taps = []
    for s, n in enumerate((2, 2, 3, 3, 3)):
      if s:
        b_, hh, ww, c = h.shape
        h = h.reshape(b_, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
      for i in range(n):
        name = f"conv{s + 1}_{i + 1}"
        h = np.maximum(_np_conv3(h, weights[f"{name}.kernel"], weights[f"{name}.bias"]), 0)
      taps.append(h)
    feats.append(taps)
  total = 0.0
  for k, (f0, f1) in enumerate(zip(*feats)):
    f0 = f0 / (np.sqrt((f0**2).sum(-1, keepdims=True)) + 1e-10)
    f1 = f1 / (np.sqrt((f1**2).sum(-1, keepdims=True)) + 1e-10)
    d = (f0 - f1) ** 2
    d = d @ weights[f"lin{k}.kernel"] if use_lin else d.sum(-1)
    total = total + d.mean(axis=(1, 2))
  return total


@pytest.fixture(scope="module")
def narrow_file(tmp_path_factory):
  weights = tl.random_perceptual_weights(seed=0, widths=_NARROW)
  path = tmp_path_factory.mktemp("lpips") / "vgg_lpips.npz"
  np.savez(path, **weights)
  return path, weights


@pytest.fixture(scope="module")
def images():
  return _rng(9).uniform(size=(2, 3, 16, 16, 3)).astype(np.float32)


@pytest.mark.parametrize("use_lin", [True, False])
def test_perceptual_matches_numpy(narrow_file, images, use_lin):
  path, weights = narrow_file
  loss = tl.PerceptualLoss.load(path, use_lin_heads=use_lin)
  assert loss.enabled and loss.use_lin_heads == use_lin and str(path) in loss.status
  x, y = images
  got = np.asarray(jax.jit(lambda loss_fn, a, b: loss_fn(a, b))(loss, x, y))
  want = _np_lpips(
    {k: v.astype(np.float64) for k, v in weights.items()}, x.astype(np.float64), y.astype(np.float64), use_lin
  )
  assert got.shape == (3,)
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)


def test_perceptual_properties(narrow_file, images):
  loss = tl.PerceptualLoss.load(narrow_file[0])  # auto: the file has lin heads
  assert loss.use_lin_heads
  x, y = images
  f = jax.jit(lambda loss_fn, a, b: loss_fn(a, b))
  d_xy, d_yx, d_xx = (np.asarray(f(loss, a, b)) for a, b in ((x, y), (y, x), (x, x)))
  np.testing.assert_allclose(d_xx, 0.0, atol=1e-7)
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5)
  assert np.all(d_xy > 1e-3)
  # Frozen: no gradient reaches the weights, but one reaches the images.
  g_params, g_x = jax.jit(jax.grad(lambda loss_fn, a: jnp.sum(loss_fn(a, y)), argnums=(0, 1)))(loss, x)
  assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(g_params))
  assert float(jnp.abs(g_x).max()) > 0


def test_perceptual_disabled():
  for path in (None, ""):
    loss = tl.PerceptualLoss.load(path)
    assert not loss.enabled
    assert loss.status == "perceptual loss disabled: no weights file"
    out = jax.jit(lambda loss_fn, a: loss_fn(a, a + 1))(loss, jnp.zeros((2, 16, 16, 3)))
    np.testing.assert_array_equal(np.asarray(out), [0.0, 0.0])


def test_perceptual_file_errors(tmp_path, narrow_file):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    tl.PerceptualLoss.load(tmp_path / "nope.npz")
  weights = dict(narrow_file[1])
  del weights["conv3_2.bias"]
  np.savez(tmp_path / "missing.npz", **weights)
  with pytest.raises(KeyError, match="conv3_2.bias"):
    tl.PerceptualLoss.load(tmp_path / "missing.npz")
  weights = dict(narrow_file[1])
  del weights["lin3.kernel"]
  np.savez(tmp_path / "nolin3.npz", **weights)
  with pytest.raises(KeyError, match="lin3.kernel"):
    tl.PerceptualLoss.load(tmp_path / "nolin3.npz")  # some lin keys present -> all required
  tl.PerceptualLoss.load(tmp_path / "nolin3.npz", use_lin_heads=False)  # heads ignored: fine
  weights = dict(narrow_file[1])
  weights["conv2_1.kernel"] = weights["conv2_1.kernel"][:, :, :3]
  np.savez(tmp_path / "badshape.npz", **weights)
  with pytest.raises(ValueError, match="conv2_1.kernel"):
    tl.PerceptualLoss.load(tmp_path / "badshape.npz")
  np.savez(tmp_path / "extra.npz", **narrow_file[1], **{"conv6_1.kernel": np.zeros(3)})
  with pytest.raises(ValueError, match="conv6_1.kernel"):
    tl.PerceptualLoss.load(tmp_path / "extra.npz")
  loss = tl.PerceptualLoss.load(narrow_file[0])
  with pytest.raises(ValueError, match="16x16"):
    loss(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))


def test_weights_from_torch_layout():
  rng = _rng(10)
  widths = _NARROW
  torch_sd, c_in, idx = {}, 3, iter((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28))
  for s, n in enumerate((2, 2, 3, 3, 3)):
    for _ in range(n):
      i = next(idx)
      torch_sd[f"features.{i}.weight"] = rng.standard_normal((widths[s], c_in, 3, 3))
      torch_sd[f"features.{i}.bias"] = rng.standard_normal(widths[s])
      c_in = widths[s]
  heads = {f"lin{k}.model.1.weight": rng.uniform(size=(1, w, 1, 1)) for k, w in enumerate(widths)}
  w = tl.weights_from_torch(torch_sd, heads)
  assert sorted(w) == sorted(tl.perceptual_weight_names(True))
  # conv2_1 is features.5; torch [O, I, kh, kw] -> HWIO.
  o, i_, a, b = 3, 2, 0, 1
  assert w["conv2_1.kernel"][a, b, i_, o] == pytest.approx(torch_sd["features.5.weight"][o, i_, a, b])
  np.testing.assert_allclose(w["lin2.kernel"], heads["lin2.model.1.weight"].ravel(), rtol=1e-6)
  del torch_sd["features.28.bias"]
  with pytest.raises(KeyError, match="28.bias"):
    tl.weights_from_torch(torch_sd)


def test_full_size_vgg16_file(tmp_path):
  weights = tl.random_perceptual_weights(seed=1)
  assert sum(v.size for k, v in weights.items() if not k.startswith("lin")) == 14_714_688  # VGG16 convs
  np.savez(tmp_path / "vgg.npz", **weights)
  loss = tl.PerceptualLoss.load(tmp_path / "vgg.npz")
  x = jnp.asarray(_rng(11).uniform(size=(2, 32, 32, 3)), jnp.float32)
  d = np.asarray(jax.jit(lambda loss_fn, a, b: loss_fn(a, b))(loss, x, x[::-1]))
  assert d.shape == (2,) and np.all(d > 0) and d[0] == pytest.approx(d[1], rel=1e-5)
