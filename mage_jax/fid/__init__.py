"""FID and Inception Score with the standard FID InceptionV3 (TF 2015-12-05 graph), in JAX, without torch.

Setup once: `python -m mage_jax.fid.weights setup` (see `weights`). Then:

  from mage_jax.fid import metrics, weights
  model = weights.load_inception()                                   # the cached npz
  ref = metrics.load_or_compute_reference_stats("imagenet256_val", "validation", images_fn)
  result = metrics.evaluate(generated_batches, ref, model)           # FID; IS when a classifier is loaded
  # extras=True in load_or_compute_reference_stats: result.sfid, .precision, .recall too

Submodules are imported lazily so that `python -m mage_jax.fid.weights` runs cleanly.
"""

import importlib

_EXPORTS = {
  "FIDInception": "inception",
  "preprocess": "inception",
  "resize_bilinear": "inception",
  "FidIsResult": "metrics",
  "ImageStatistics": "metrics",
  "compute_stats_for_images": "metrics",
  "evaluate": "metrics",
  "frechet_distance": "metrics",
  "inception_score": "metrics",
  "load_or_compute_reference_stats": "metrics",
  "statistics": "metrics",
  "precision_recall": "metrics",
  "default_weights_path": "weights",
  "load_inception": "weights",
  "load_weights": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"mage_jax.fid.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'mage_jax.fid' has no attribute {name!r}")
