"""A converged linear probe: multinomial logistic regression on all the frozen features of a split.

The paper's linear probe (`jobs/linear_probe.py`: BN + linear head, LARS, a fixed epoch budget) measures a
recipe as much as the features; this one is the standard convex probe, trained to convergence, so that two
feature sets (MAGE, raw pixels, a random projection, a randomly initialised encoder) are compared on the
features alone:

  * features standardised per dimension with the training split's mean and standard deviation (a dimension that
    never varies becomes 0), plus a constant feature for the bias;
  * objective: mean cross-entropy + l2/2·‖W‖², solved full-batch by L-BFGS (`fewshot`'s solver) to a gradient
    norm of `tol` or `max_iter` iterations;
  * l2 chosen from `L2_GRID` by accuracy on a validation slice of the training split (a seeded `val_fraction`),
    fitting on at most `search_examples` of the rest (the choice costs a fraction of the final fit: at 60,000 x
    3,072 raw pixels each fit is a minute on two cores), then refitted on the whole training split and scored
    once on the test split.

As an evaluator of the `evals` registry (`run`, `rows`): fitted on the train split, scored on the eval split.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
from absl import logging

from mage_jax.evals import fewshot, pct

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  mean = train.mean(axis=0, dtype=np.float64)
  std = train.std(axis=0, dtype=np.float64)
  scale = np.where(std > 1e-6, 1.0 / np.maximum(std, 1e-6), 0.0)
  return [
    np.concatenate([((x - mean) * scale).astype(np.float32), np.ones((len(x), 1), np.float32)], axis=1)
    for x in (train, *others)
  ]


def _fit(x, y, num_classes: int, l2: float, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
  # pylint: disable=protected-access
  w, iterations = fewshot._lbfgs_logreg(
    jnp.asarray(x),
    jnp.asarray(y, jnp.int32),
    jnp.float32(l2),
    jnp.float32(tol),
    num_classes=num_classes,
    max_iter=max_iter,
  )
  return np.asarray(w), int(iterations)


def _accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
  return float(np.mean(np.argmax(x @ w, axis=1) == y))


def evaluate(
  train_x,
  train_y,
  test_x,
  test_y,
  *,
  num_classes: int,
  l2_grid=L2_GRID,
  val_fraction: float = 0.1,
  search_examples: int = 10000,
  seed: int = 0,
  max_iter: int = 300,
  tol: float = 1e-3,
) -> dict:
  """Test top-1 of the probe fitted on all of `train` with the l2 that did best on a validation slice of it.

  Returns:
    {'top1', 'l2', 'val_top1' {l2: accuracy}, 'iterations' (of the final fit), 'train_examples', 'seconds'}.
  """
  start = time.time()
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
  if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"features must be [n, d] with equal d, got {train_x.shape} and {test_x.shape}")
  if len(train_x) != len(train_y) or len(test_x) != len(test_y):
    raise ValueError("features and labels differ in length")
  if not 0 < val_fraction < 1 or not l2_grid:
    raise ValueError(f"need 0 < val_fraction < 1 and some l2 values, got {val_fraction}, {l2_grid}")
  order = np.random.default_rng(seed).permutation(len(train_x))
  n_val = max(1, int(len(train_x) * val_fraction))
  fit_idx, val_idx = order[n_val:][:search_examples], order[:n_val]
  x_fit, x_val = _standardize(train_x[fit_idx], train_x[val_idx])
  val_top1 = {}
  for l2 in l2_grid:
    w, _ = _fit(x_fit, train_y[fit_idx], num_classes, l2, max_iter, tol)
    val_top1[l2] = _accuracy(w, x_val, train_y[val_idx])
  best = max(l2_grid, key=lambda l2: (val_top1[l2], l2))  # ties: the stronger regularisation
  x_train, x_test = _standardize(train_x, test_x)
  w, iterations = _fit(x_train, train_y, num_classes, best, max_iter, tol)
  return {
    "top1": _accuracy(w, x_test, test_y),
    "l2": best,
    "val_top1": {str(k): v for k, v in val_top1.items()},
    "iterations": iterations,
    "train_examples": int(len(train_x)),
    "seconds": time.time() - start,
  }


# ---------------------------------------------------------------------------------------------------------
# The evaluator entry.
FEATURES = True


def run(context, features) -> dict:
  config = context.config
  train_x, train_y = context.features(features, config.input.split)
  test_x, test_y = context.features(features, config.eval_split)
  out = evaluate(train_x, train_y, test_x, test_y, num_classes=config.num_classes, seed=config.seed)
  logging.info(
    "%s logistic probe: top-1 %.4f (l2 %g, %d train examples, %.1f s)",
    features.name,
    out["top1"],
    out["l2"],
    out["train_examples"],
    out["seconds"],
  )
  return out


def rows(result: dict) -> list[tuple[str, str]]:
  return [("logistic probe top-1", pct(result["top1"]))]
