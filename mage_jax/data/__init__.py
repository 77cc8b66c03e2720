"""Input pipeline: TFDS / image-folder sources, augmentation, deterministic iterators.

Importing this package imports TensorFlow (~2 s); the model code does not need it. TensorFlow only feeds
tf.data here, so it is kept off the accelerators (otherwise it would reserve GPU memory that JAX needs).
"""

import tensorflow as tf

tf.config.set_visible_devices([], "GPU")


from mage_jax.data.pipeline import DataIterator
from mage_jax.data.pipeline import eval_iterator
from mage_jax.data.pipeline import global_batch_indices
from mage_jax.data.pipeline import InputConfig
from mage_jax.data.pipeline import make_source
from mage_jax.data.pipeline import measure_throughput
from mage_jax.data.pipeline import num_eval_batches
from mage_jax.data.pipeline import num_examples
from mage_jax.data.pipeline import steps_per_epoch
from mage_jax.data.pipeline import train_iterator
from mage_jax.data.sources import get_source
from mage_jax.data.sources import load_arrays
from mage_jax.data.sources import prepare_fashion_mnist
from mage_jax.data.sources import prepare_tfds
