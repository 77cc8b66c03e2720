"""During training: sFID (Nash et al. 2021), the Frechet distance of the spatial Inception features (the first 7
channels of mixed_6's 1x1 branch, as the ADM evaluator takes them) of the model's samples and of `reference`
(settings: `samples`' keys). Scalar `sfid`."""

from __future__ import annotations

from mage_jax.evals import samples
from mage_jax.fid import metrics


def during_training(settings, job):
  s = samples.settings_of(settings, job, reference=True)

  def score(state, step):
    stats, ref = samples.statistics(job, state, step, s).spatial, samples.reference(job, s).spatial
    return {"sfid": metrics.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)}

  return score
