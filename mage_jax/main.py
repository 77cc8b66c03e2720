"""One entry point: `python -m mage_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--config.k=v]`.

`config.mode` picks the job: 'pretrain' (MAGE) or 'tokenizer' (VQGAN training). Re-running the same command
resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mage_jax import runtime  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (python file[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and exports.")
_DISTRIBUTED = runtime.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])

# mode -> module with `train_and_evaluate(config, workdir)`.
MODES = {
    "pretrain": "mage_jax.train",
    "tokenizer": "mage_jax.tokenizer_train",
    "mage_c": "mage_jax.train_variants",
    "class_cond": "mage_jax.train_variants",
}


def main(argv):
  runtime.no_positional_arguments(argv)
  config = _CONFIG.value
  runtime.start(_DISTRIBUTED, **config.get("distributed", {}))
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX
  if config.mode not in MODES:
    raise app.UsageError(f"unknown config.mode {config.mode!r}; expected one of {sorted(MODES)}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
  import importlib
  importlib.import_module(MODES[config.mode]).train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  runtime.run(main)
