"""sFID (Nash et al. 2021) of the model's samples against `reference`, during training or on a checkpoint as
`fid`: the Frechet distance of the spatial Inception features (the first 7 channels of mixed_6's 1x1 branch, as
the ADM evaluator takes them). Settings: `samples`' keys. Scalar `sfid`."""

from __future__ import annotations

from mage_jax.evals import samples
from mage_jax.fid import metrics


def during_training(settings, job):
  s = samples.settings_of(settings, job, reference=True)

  def score(state, step):
    stats, ref = samples.statistics(job, state, step, s).spatial, samples.reference(job, s).spatial
    return {"sfid": metrics.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)}

  return score


# On a checkpoint (`python -m mage_jax.evaluate`, settings in `config.samples`).
FEATURES = False
check, run = samples.checkpoint_entry(during_training)


def rows(result: dict) -> list[tuple[str, str]]:
  return [("sFID", f"{result['sfid']:.2f}")]
