"""mage_jax: MAGE (MAsked Generative Encoder) in JAX/Flax.

`mage_jax.MAGE` (the Python API, `mage_jax.api.MAGE`) is imported on first use, so `import mage_jax` itself
starts nothing (no JAX, no devices).
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
  if name in ("MAGE", "api"):
    api = importlib.import_module("mage_jax.api")
    return api.MAGE if name == "MAGE" else api
  raise AttributeError(f"module 'mage_jax' has no attribute {name!r}")
