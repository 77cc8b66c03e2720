"""The converged logistic-regression probe: optimality in float64, standardisation, l2 selection."""

import numpy as np
import pytest

from mage_jax.evals import logistic as logistic_probe


def _blobs(n, d, classes, seed, spread=1.0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, d)) * 2.0
  y = rng.integers(0, classes, n)
  return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def test_fit_reaches_the_float64_optimum():
  x, y = _blobs(400, 6, 3, 0, spread=3.0)
  (xs,) = logistic_probe._standardize(x)  # pylint: disable=protected-access
  l2 = 1e-2
  w, iterations = logistic_probe._fit(xs, y, 3, l2, max_iter=500, tol=1e-6)  # pylint: disable=protected-access
  assert iterations < 500
  # gradient of mean CE + l2/2 |W|^2, recomputed in float64 from its definition
  x64, w64 = xs.astype(np.float64), w.astype(np.float64)
  z = x64 @ w64
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = x64.T @ (p - np.eye(3)[y]) / len(y) + l2 * w64
  assert np.abs(grad).max() < 1e-4


def test_standardisation_zeroes_constant_dimensions_and_adds_a_bias():
  train = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
  test = np.array([[2.0, 7.0]], np.float32)
  a, b = logistic_probe._standardize(train, test)  # pylint: disable=protected-access
  np.testing.assert_allclose(a, [[-1, 0, 1], [1, 0, 1]])
  np.testing.assert_allclose(b, [[0, 0, 1]])  # the constant training dimension stays 0, never NaN


def test_evaluate_picks_l2_on_validation_and_scores_the_test_split():
  x, y = _blobs(1200, 10, 4, 1)
  out = logistic_probe.evaluate(x[:1000], y[:1000], x[1000:], y[1000:], num_classes=4)
  assert out["top1"] > 0.95 and out["l2"] in logistic_probe.L2_GRID
  assert set(out["val_top1"]) == {str(v) for v in logistic_probe.L2_GRID}
  assert out["val_top1"][str(out["l2"])] == max(out["val_top1"].values())
  assert out["train_examples"] == 1000
  with pytest.raises(ValueError, match="equal d"):
    logistic_probe.evaluate(x[:10], y[:10], x[:5, :3], y[:5], num_classes=4)
