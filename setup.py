"""mage_jax: MAGE (MAsked Generative Encoder) in JAX/Flax."""

import setuptools

setuptools.setup(
  name="mage_jax",
  version="0.1.0",
  description="MAGE (Masked Generative Encoder, CVPR 2023) in JAX/Flax: tokenizer, pretraining, "
  "generation, editing and representation evals.",
  packages=setuptools.find_packages(include=["mage_jax", "mage_jax.*", "configs"]),
  python_requires=">=3.11",
  # Ranges tested: jax 0.10 (CPU, this project's CI) and jax 0.11 (CUDA builds on GPU machines).
  install_requires=[
    "jax>=0.10,<0.12",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "tensorflow-cpu>=2.21,<2.23",
    "tensorboard>=2.21,<2.23",
    "tensorflow-datasets>=4.9.10,<5",
    "importlib_resources>=6",  # TFDS lazy-imports it on Python >= 3.9 without declaring it
    "ml-collections>=1.1,<2",
    "clu>=0.0.12,<0.1",
    "numpy>=2.0",
    "ml_dtypes>=0.5",
    "scipy>=1.11",
    "pillow>=10",
    "absl-py>=2",
  ],
  extras_require={
    "test": ["pytest>=8", "chex>=0.1.90"],
    "gpu": ["jax[cuda12]>=0.10,<0.12"],
    "tpu": ["jax[tpu]>=0.10,<0.12"],
    # Only the conversion tests compare against real torch; the converter itself never imports it.
    "torch": ["torch>=2.0"],
  },
)
