"""FID of the model's samples against `reference`, during training (a `config.evals` entry) or on a checkpoint
(`python -m mage_jax.evaluate`, settings in `config.samples`), and their Inception Score where the FID
Inception's weights carry the classifier (settings: `samples`' keys). Scalars `fid`, `inception_score`."""

from __future__ import annotations

from mage_jax.evals import samples
from mage_jax.fid import metrics


def during_training(settings, job):
  s = samples.settings_of(settings, job, reference=True)

  def score(state, step):
    stats, ref = samples.statistics(job, state, step, s), samples.reference(job, s)
    out = {"fid": metrics.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)}
    if stats.logits is not None:
      out["inception_score"] = metrics.inception_score(stats.logits, splits=min(10, len(stats.logits)))[0]
    return out

  return score


# On a checkpoint (`python -m mage_jax.evaluate`, settings in `config.samples`).
FEATURES = False
check, run = samples.checkpoint_entry(during_training)


def rows(result: dict) -> list[tuple[str, str]]:
  out = [("FID", f"{result['fid']:.2f}")]
  if "inception_score" in result:
    out.append(("Inception Score", f"{result['inception_score']:.2f}"))
  return out
