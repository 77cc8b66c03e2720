"""Precision and recall of the model's samples against `reference`, during training or on a checkpoint as `fid`
(Kynkaenniemi et al. 2019, k = 3 nearest neighbours, on the pool3 features FID uses; `fid.metrics.precision_recall`).
Settings: `samples`' keys, at least 4 images on each side. Scalars `precision`, `recall`."""

from __future__ import annotations

from mage_jax.evals import pct, samples
from mage_jax.fid import metrics


def during_training(settings, job):
  s = samples.settings_of(settings, job, reference=True)
  if s.num_images <= metrics.PR_NEIGHBOURS:
    raise ValueError(f"num_images must be > k = {metrics.PR_NEIGHBOURS}, got {s.num_images}")

  def score(state, step):
    stats, ref = samples.statistics(job, state, step, s), samples.reference(job, s)
    precision, recall = metrics.precision_recall(ref.features, stats.features)
    return {"precision": precision, "recall": recall}

  return score


# On a checkpoint (`python -m mage_jax.evaluate`, settings in `config.samples`).
FEATURES = False
check, run = samples.checkpoint_entry(during_training)


def rows(result: dict) -> list[tuple[str, str]]:
  return [("precision of the samples", pct(result["precision"])), ("recall of the samples", pct(result["recall"]))]
