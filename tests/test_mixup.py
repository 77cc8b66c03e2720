"""Tests for mage_jax.objectives.mixup (timm batch-mode Mixup/CutMix semantics)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.objectives import mixup

B, H, W, C, NC = 6, 8, 10, 2, 7


def _batch():
  # Sample i is the constant i + 1 (distinct per sample) plus a small pattern,
  # so every output pixel tells which source it came from.
  base = np.arange(1, B + 1, dtype=np.float32)[:, None, None, None]
  pattern = 1e-3 * np.arange(H * W * C, dtype=np.float32).reshape(1, H, W, C)
  images = base + pattern
  labels = np.array([0, 3, 3, 6, 1, 2], np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def _smooth_np(labels, nc, s):
  t = np.full((len(labels), nc), s / nc)
  t[np.arange(len(labels)), labels] = 1 - s + s / nc
  return t


@functools.lru_cache
def _jitted(cfg, num_groups):
  return jax.jit(functools.partial(mixup.mix_batch, cfg=cfg, num_groups=num_groups))


def _run(keys, images, labels, cfg, num_groups=1):
  """mix_batch for each key (a loop, not vmap: Beta compiles slowly in vmap)."""
  f = _jitted(cfg, num_groups)
  outs = [f(k, images, labels) for k in keys]
  return jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(outs))


def test_smooth_one_hot_values():
  t = np.asarray(mixup.smooth_one_hot(jnp.array([2, 0]), 10, 0.1))
  np.testing.assert_allclose(t[0, 2], 0.91, rtol=1e-6)
  np.testing.assert_allclose(t[0, 0], 0.01, rtol=1e-6)
  np.testing.assert_allclose(t[1], [0.91] + [0.01] * 9, rtol=1e-6)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)


def test_mix_batch_default_recipe():
  images, labels = _batch()
  cfg = mixup.MixupConfig(num_classes=NC)  # alpha .8/1.0, prob 1, switch .5
  keys = jax.random.split(jax.random.key(0), 300)
  mixed, targets, aux = _run(keys, images, labels, cfg)
  lam, use_cut, box = aux["lam"][:, 0], aux["use_cutmix"][:, 0], aux["box"][:, 0]
  x, y = np.asarray(images), np.asarray(labels)
  flip = x[::-1]
  assert np.all((lam >= 0) & (lam <= 1))
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
  # Switch probability 0.5 over 300 draws (sd ~0.03).
  assert 0.38 < use_cut.mean() < 0.62
  for i in range(len(keys)):
    want_t = lam[i] * _smooth_np(y, NC, 0.1) + (1 - lam[i]) * _smooth_np(y[::-1], NC, 0.1)
    np.testing.assert_allclose(targets[i], want_t, rtol=1e-5, atol=1e-7)
    if use_cut[i]:
      from_flip = np.isclose(mixed[i], flip) & ~np.isclose(mixed[i], x)
      # B is even, so no sample is paired with itself.
      frac = from_flip[:, :, :, 0].mean(axis=(1, 2))
      np.testing.assert_allclose(frac, 1 - lam[i], atol=1e-6)
      yl, yh, xl, xh = box[i]
      inside = np.zeros((H, W), bool)
      inside[yl:yh, xl:xh] = True
      np.testing.assert_array_equal(from_flip[0, :, :, 0], inside)
    else:
      np.testing.assert_allclose(mixed[i], lam[i] * x + (1 - lam[i]) * flip, rtol=1e-6)
  # Mixup lam ~ Beta(.8, .8): mean 0.5, sd 0.32 -> mean of ~150 within 0.1.
  assert abs(lam[~use_cut].mean() - 0.5) < 0.1


def test_cutmix_box_geometry_matches_timm():
  lam = 0.45  # floor vs ceil of side * sqrt(1 - lam) differ here.
  cut = int(H * np.sqrt(1 - lam)), int(W * np.sqrt(1 - lam))
  boxes = jax.vmap(lambda k: jnp.stack(mixup.rand_bbox(k, H, W, lam)))(jax.random.split(jax.random.key(1), 500))
  boxes = np.asarray(boxes)
  yl, yh, xl, xh = boxes.T
  # Unclipped boxes have exactly 2 * (cut // 2) rows/cols (timm's rand_bbox).
  full_y = (yl > 0) & (yh < H)
  full_x = (xl > 0) & (xh < W)
  assert full_y.any() and full_x.any()
  np.testing.assert_array_equal((yh - yl)[full_y], 2 * (cut[0] // 2))
  np.testing.assert_array_equal((xh - xl)[full_x], 2 * (cut[1] // 2))
  assert np.all((yl >= 0) & (yh <= H) & (xl >= 0) & (xh <= W))
  assert np.all(yh - yl <= 2 * (cut[0] // 2))
  # Centre uniform over [0, H): a box clipped at the top has centre yh - 3.
  top = yl == 0
  np.testing.assert_array_equal(np.unique(yh[top] - cut[0] // 2), np.arange(0, cut[0] // 2 + 1))


def test_cutmix_only_with_prob_half():
  # One compiled config covers: cutmix-only draws, the area-corrected lam, and
  # the identity (smoothed one-hot targets) when the prob coin says no mix.
  images, labels = _batch()
  keys = jax.random.split(jax.random.key(2), 60)
  cfg = mixup.MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0, prob=0.5, num_classes=NC, label_smoothing=0.2)
  mixed, targets, aux = _run(keys, images, labels, cfg)
  use_cut, lam, box = aux["use_cutmix"][:, 0], aux["lam"][:, 0], aux["box"][:, 0]
  assert 0.25 < use_cut.mean() < 0.75
  area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
  np.testing.assert_allclose(lam[use_cut], 1 - area[use_cut] / (H * W), atol=1e-6)
  x, y = np.asarray(images), np.asarray(labels)
  for i in np.flatnonzero(~use_cut):
    assert lam[i] == 1.0
    np.testing.assert_array_equal(mixed[i], x)
    np.testing.assert_allclose(targets[i], _smooth_np(y, NC, 0.2), rtol=1e-6)


def test_num_groups_mix_within_groups():
  images, labels = _batch()
  cfg = mixup.MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=NC, label_smoothing=0.0)
  mixed, targets, aux = mixup.mix_batch(jax.random.key(4), images, labels, cfg, num_groups=3)
  x, y = np.asarray(images), np.asarray(labels)
  lam = np.asarray(aux["lam"])
  assert lam.shape == (3,) and len(set(lam.tolist())) == 3
  assert not np.asarray(aux["use_cutmix"]).any()  # mixup-only config.
  for g in range(3):
    sl = slice(2 * g, 2 * g + 2)
    xf = x[sl][::-1]
    np.testing.assert_allclose(np.asarray(mixed)[sl], lam[g] * x[sl] + (1 - lam[g]) * xf, rtol=1e-6)
    want = lam[g] * np.eye(NC)[y[sl]] + (1 - lam[g]) * np.eye(NC)[y[sl][::-1]]
    np.testing.assert_allclose(np.asarray(targets)[sl], want, atol=1e-6)


def test_soft_target_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 5))
  t = rng.dirichlet(np.ones(5), size=4)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  want = np.mean(-(t * logp).sum(1))
  got = mixup.soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(t))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_errors():
  images, labels = _batch()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="even size"):
    mixup.mix_batch(key, images[:5], labels[:5])
  with pytest.raises(ValueError, match="even size"):
    mixup.mix_batch(key, images, labels, num_groups=4)
  with pytest.raises(ValueError, match="floating"):
    mixup.mix_batch(key, images.astype(jnp.uint8), labels)
  with pytest.raises(ValueError, match="labels must have shape"):
    mixup.mix_batch(key, images, labels[:4])
  with pytest.raises(ValueError, match="mode='batch'"):
    mixup.MixupConfig(mode="pair")
  with pytest.raises(ValueError, match="one of mixup_alpha"):
    mixup.MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0)
