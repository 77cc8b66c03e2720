"""k-shot classification on frozen features: k labelled train images per class, `config.fewshot.trials` seeded
draws, each of `config.fewshot.classifiers` ('ridge', 'logreg'; `fewshot.evaluate_fewshot`)."""

from __future__ import annotations

import time

from mage_jax import fewshot
from mage_jax.evals import pct, split_size

FEATURES = True


def check(config) -> None:
  split = config.fewshot.train_split or config.input.split
  n = split_size(config, split)
  need = max(config.fewshot.shots) * config.num_classes
  if n < need:
    raise ValueError(
      f"few-shot: {max(config.fewshot.shots)} shots of {config.num_classes} classes need at least "
      f"{need} training examples, the split {split!r} has {n}"
    )


def run(context, features) -> dict:
  config, f = context.config, context.config.fewshot
  train_x, train_y = context.features(features, f.train_split or config.input.split)
  test_x, test_y = context.features(features, config.eval_split)
  out = {}
  for classifier in f.classifiers:
    t0 = time.time()
    reg = f.get(f"l2_{classifier}", -1.0)
    accs = fewshot.evaluate_fewshot(
      train_x,
      train_y,
      test_x,
      test_y,
      shots=tuple(f.shots),
      trials=f.trials,
      seed=config.seed,
      classifier=classifier,
      l2_reg=None if reg is None or reg < 0 else reg,
      num_classes=config.num_classes,
    )
    out[classifier] = {str(s): {"mean": m, "std": sd} for s, (m, sd) in accs.items()}
    out[classifier]["seconds"] = time.time() - t0
  out["trials"] = f.trials
  return out


def rows(result: dict) -> list[tuple[str, str]]:
  return [
    (f"{shot}-shot {classifier}", f"{pct(v['mean'])} ± {pct(v['std'])}")
    for classifier, per_shot in result.items()
    if isinstance(per_shot, dict)
    for shot, v in per_shot.items()
    if isinstance(v, dict)
  ]
