"""Images in (`images`: the checked reader and writers; `image_listing`: the folder lister), sources (TFDS, image
folders), their offline preparation (`tfds_prepare`: Fashion-MNIST IDX files, manual_dir), augmentation,
deterministic iterators, the 'random' input, and cached token ids (`cached_tokens`).

The names below load their submodule on first use, and the submodules load TensorFlow only when a tf.data
pipeline or a TFDS source is first built: model code, benchmarks and the 'random' input (`synthetic`) run on
hosts without TensorFlow. TensorFlow only feeds tf.data here, so once loaded it is kept off the accelerators
(otherwise it would reserve GPU memory that JAX needs).
"""

import importlib

_EXPORTS = {
  "DataIterator": "pipeline",
  "eval_iterator": "pipeline",
  "global_batch_indices": "pipeline",
  "InputConfig": "pipeline",
  "make_source": "pipeline",
  "measure_throughput": "pipeline",
  "num_eval_batches": "pipeline",
  "num_examples": "pipeline",
  "steps_per_epoch": "pipeline",
  "train_iterator": "pipeline",
  "get_source": "sources",
  "load_arrays": "sources",
  "prepare_fashion_mnist": "tfds_prepare",
  "prepare_tfds": "tfds_prepare",
}

__all__ = sorted(_EXPORTS)


def tensorflow_loaded(module_name: str) -> None:
  """`epy.lazy_imports` success callback of the data modules: hides the GPUs from TensorFlow once it loads."""
  del module_name
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # TensorFlow was already initialised elsewhere; its devices are fixed


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"mage_jax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'mage_jax.data' has no attribute {name!r}")
