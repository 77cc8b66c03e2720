"""A converged logistic regression on all the frozen features of the train split, scored on the eval split
(regularisation chosen on a held-out part of the train split; `logistic_probe`)."""

from __future__ import annotations

from absl import logging

from mage_jax import logistic_probe
from mage_jax.evals import pct

FEATURES = True


def run(context, features) -> dict:
  config = context.config
  train_x, train_y = context.features(features, config.input.split)
  test_x, test_y = context.features(features, config.eval_split)
  out = logistic_probe.evaluate(train_x, train_y, test_x, test_y, num_classes=config.num_classes, seed=config.seed)
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
