"""One entry point: `python -m mage_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--config.k=v]`.

`config.mode` picks the job: 'pretrain' (MAGE) or 'tokenizer' (VQGAN training). Re-running the same command
resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mage_jax import runtime  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (python file[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and exports.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs without auto-detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])

# mode -> module with `train_and_evaluate(config, workdir)`.
MODES = {
    "pretrain": "mage_jax.train",
    "tokenizer": "mage_jax.tokenizer_train",
    "mage_c": "mage_jax.train_variants",
    "class_cond": "mage_jax.train_variants",
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.quiet_orbax_logs()
  runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX
  config = _CONFIG.value
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)
  if config.mode not in MODES:
    raise app.UsageError(f"unknown config.mode {config.mode!r}; expected one of {sorted(MODES)}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
  import importlib
  importlib.import_module(MODES[config.mode]).train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
