"""Tests for mage_jax.evals.fewshot (support sampling, ridge, logreg, protocol)."""

import numpy as np
import pytest

from mage_jax.evals import fewshot


def _clusters(num_classes=5, per_class=40, dim=16, sep=8.0, seed=0, shift=3.0):
  rng = np.random.default_rng(seed)
  # Random directions plus a common offset: row-centering and standardising
  # must not destroy the class information.
  centers = sep * rng.normal(size=(num_classes, dim)) / np.sqrt(dim) * 3
  labels = np.repeat(np.arange(num_classes), per_class)
  feats = centers[labels] + rng.normal(size=(labels.size, dim)) + shift
  perm = rng.permutation(labels.size)
  return feats[perm].astype(np.float32), labels[perm]


# ---------------------------------------------------------------------------
# Support sampling.


def test_sample_support_balanced_and_reproducible():
  labels = np.array([0] * 7 + [1] * 3 + [2] * 5 + [5] * 4)
  np.random.default_rng(0).shuffle(labels)
  idx = fewshot.sample_support(labels, 3, seed=11)
  assert idx.shape == (12,) and len(set(idx.tolist())) == 12
  np.testing.assert_array_equal(labels[idx], np.repeat([0, 1, 2, 5], 3))
  np.testing.assert_array_equal(idx, fewshot.sample_support(labels, 3, 11))
  draws = {tuple(fewshot.sample_support(labels, 3, s)) for s in range(5)}
  assert len(draws) > 1  # Different seeds give different supports.
  # Nested: fewer shots take a per-class prefix of the same permutation.
  idx2 = fewshot.sample_support(labels, 2, seed=11)
  np.testing.assert_array_equal(idx2, idx.reshape(4, 3)[:, :2].reshape(-1))


def test_sample_support_uniform_over_class_members():
  labels = np.array([0] * 4 + [1] * 2)
  hits = np.zeros(4)
  for s in range(400):
    hits[fewshot.sample_support(labels, 1, seed=s)[0]] += 1
  # Each of the 4 class-0 items should be drawn ~100 times.
  assert hits.min() > 60 and hits.max() < 140


def test_sample_support_errors():
  labels = np.array([0, 0, 1, 1, 1])
  with pytest.raises(ValueError, match="fewer than shots=3.*class 0: 2"):
    fewshot.sample_support(labels, 3, seed=0)
  with pytest.raises(ValueError, match="class 2: 0"):
    fewshot.sample_support(labels, 1, seed=0, num_classes=3)
  with pytest.raises(ValueError, match=r"labels must be in \[0, 1\)"):
    fewshot.sample_support(labels, 1, seed=0, num_classes=1)
  with pytest.raises(ValueError, match="positive integer"):
    fewshot.sample_support(labels, 0, seed=0)
  with pytest.raises(ValueError, match="1-D"):
    fewshot.sample_support(labels[None], 1, seed=0)


# ---------------------------------------------------------------------------
# Classifiers.


@pytest.mark.parametrize("n", [6, 40])  # dual (n < d+1) and primal branches.
def test_fit_ridge_solves_normal_equations(n):
  rng = np.random.default_rng(n)
  d, c, l2 = 12, 3, 5.0
  x = rng.normal(size=(n, d)) * 3 + 1
  y = rng.integers(0, c, size=n)
  m = fewshot.fit_ridge(x, y, c, l2)
  xs = (x - x.mean(0)) / (x.std(0) + 1e-5)
  xs = np.concatenate([xs, np.full((n, 1), 100.0)], axis=1)
  yt = np.where(np.arange(c)[None] == y[:, None], 1.0, -1.0)
  lhs = (xs.T @ xs + l2 * np.eye(d + 1)) @ m["w"]
  np.testing.assert_allclose(lhs, xs.T @ yt, rtol=1e-8, atol=1e-8)
  scores = xs @ m["w"]
  np.testing.assert_array_equal(fewshot.predict_ridge(m, x), scores.argmax(1))


# The logreg tests share one problem shape (n=20, d=16, C=4) so the L-BFGS
# loop compiles once (~5 s on CPU) for the whole file.


def test_fit_logreg_reaches_stationary_point():
  x, y = _clusters(num_classes=4, per_class=5, dim=16, sep=0.3, seed=3)
  lam = 0.5  # Strong enough for a well-conditioned optimum.
  m = fewshot.fit_logreg(x, y, 4, lambd=lam, tol=1e-6)
  # float64 gradient of mean CE + (lam/n)/2 ||W||^2 on row-normalised x.
  xr = x.astype(np.float64) - x.mean(1, keepdims=True)
  xr /= np.linalg.norm(xr, axis=1, keepdims=True)
  w = m["w"].astype(np.float64)
  z = xr @ w
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(4)[y]
  grad = xr.T @ (p - onehot) / len(y) + lam / len(y) * w
  assert np.linalg.norm(grad) < 1e-4, np.linalg.norm(grad)
  assert m["iterations"] > 1
  np.testing.assert_array_equal(fewshot.predict_logreg(m, x), z.argmax(1))


# ---------------------------------------------------------------------------
# Protocol.


@pytest.mark.parametrize("classifier,shots", [("ridge", (1, 5)), ("logreg", (5,))])
def test_evaluate_fewshot_separable_clusters(classifier, shots):
  x, y = _clusters(num_classes=4, seed=1)
  xt, yt = _clusters(num_classes=4, seed=1, per_class=30)  # Same centers.
  res = fewshot.evaluate_fewshot(x, y, xt, yt, shots=shots, trials=3, seed=0, classifier=classifier)
  assert set(res) == set(shots)
  assert res[5][0] >= 0.99, res
  if 1 in res:
    assert res[1][0] >= 0.9, res
  for mean, std in res.values():
    assert 0.0 <= std <= 0.1 and 0.0 <= mean <= 1.0


@pytest.mark.parametrize("classifier", ["ridge", "logreg"])
def test_evaluate_fewshot_random_labels_is_chance(classifier):
  rng = np.random.default_rng(7)
  c, d = 4, 16
  x = rng.normal(size=(200, d)).astype(np.float32)
  y = rng.integers(0, c, size=200)
  xt = rng.normal(size=(2000, d)).astype(np.float32)
  yt = rng.integers(0, c, size=2000)
  shots = (2, 10) if classifier == "ridge" else (5,)
  res = fewshot.evaluate_fewshot(x, y, xt, yt, shots=shots, trials=4, seed=3, classifier=classifier)
  # Test labels are independent of everything: accuracy ~ Binomial(2000,
  # 1/4) / 2000 per trial, std ~0.01; 0.05 is > 4 sigma.
  for mean, _ in res.values():
    assert abs(mean - 1 / c) < 0.05, res


def test_evaluate_fewshot_reproducible_and_seed_dependent():
  x, y = _clusters(sep=0.6, seed=4)
  xt, yt = _clusters(sep=0.6, seed=4, per_class=20)
  a = fewshot.evaluate_fewshot(x, y, xt, yt, shots=(1,), trials=3, seed=0)
  b = fewshot.evaluate_fewshot(x, y, xt, yt, shots=(1,), trials=3, seed=0)
  c = fewshot.evaluate_fewshot(x, y, xt, yt, shots=(1,), trials=3, seed=1)
  assert a == b
  assert a != c
  assert a[1][1] > 0  # Hard task: trials differ.


def test_evaluate_fewshot_errors():
  x, y = _clusters(num_classes=2, per_class=3, dim=4)
  with pytest.raises(ValueError, match="not among the 2 train classes"):
    fewshot.evaluate_fewshot(x, y, x[:2], np.array([0, 7]), shots=(1,))
  with pytest.raises(ValueError, match="classifier"):
    fewshot.evaluate_fewshot(x, y, x, y, shots=(1,), classifier="svm")
  with pytest.raises(ValueError, match="feature dims differ"):
    fewshot.evaluate_fewshot(x, y, x[:, :3], y, shots=(1,))
  with pytest.raises(ValueError, match="fewer than shots=4"):
    fewshot.evaluate_fewshot(x, y, x, y, shots=(4,))
  with pytest.raises(ValueError, match="rows"):
    fewshot.evaluate_fewshot(x, y[:-1], x, y, shots=(1,))
