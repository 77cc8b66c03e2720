"""mage_jax: MAGE (MAsked Generative Encoder) in JAX/Flax.

`mage_jax.MAGE` (the Python API, `mage_jax.api.MAGE`) is imported on first use, so `import mage_jax` itself
starts nothing (no JAX, no devices). Started as `python -m mage_jax.<verb>`, a training, evaluation or
generation binary first re-executes itself under tcmalloc when the system has it (see `allocator`), and every
binary takes Ctrl-C over (see `interrupt`).
"""

import importlib
import sys

from mage_jax.system import allocator, interrupt

__version__ = "0.1.0"

allocator.maybe_reexec()  # `python -m mage_jax.<verb>`: under tcmalloc where the system has it (system/allocator.py)
interrupt.take_over(allocator.module_run(getattr(sys, "orig_argv", [])))  # Ctrl-C ends a binary at once


def __getattr__(name: str):
  if name in ("MAGE", "api"):
    api = importlib.import_module("mage_jax.api")
    return api.MAGE if name == "MAGE" else api
  raise AttributeError(f"module 'mage_jax' has no attribute {name!r}")
