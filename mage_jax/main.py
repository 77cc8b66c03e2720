"""`python -m mage_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--config.key=value ...]`: training.

`config.mode` picks the job (mage_jax/jobs): 'pretrain' (MAGE), 'mage_c' (MAGE-C), 'class_cond'
(class-conditional MAGE from an unconditional checkpoint), 'tokenizer' (VQGAN training) or 'cache_tokens' (the
frozen tokenizer's ids of augmented views, for `input.tokens`). Re-running the same command resumes from the
latest checkpoint (or the last finished token shard) in the workdir. Every config field can be set on the command line;
`--config.mesh=data=2,fsdp=4,model=1` sets the device mesh (see mage_jax/train/sharding.py).
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from mage_jax.jobs import MODES, run_mode
from mage_jax.system import runtime
from mage_jax.train import config_ranges

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Training config: a python file in configs/ [:args] (e.g. configs/fashion_mnist_tiny.py:steps=200).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and exports.")
_DISTRIBUTED = runtime.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  runtime.no_positional_arguments(argv)
  config = runtime.config_value(_CONFIG)
  if "mode" not in config:
    hint = (
      "it is an evaluation config: run python -m mage_jax.evaluate --params=DIR --config=... --workdir=..."
      if isinstance(config.get("evals"), (tuple, list))
      else f"it sets no config.mode ({', '.join(MODES)})"
    )
    raise runtime.UsageError(f"--config={flags.FLAGS['config'].config_filename} is not a training config: {hint}")
  if config.mode not in MODES:
    raise runtime.UsageError(f"unknown config.mode {config.mode!r}; expected one of {', '.join(MODES)}")
  try:
    config_ranges.check(config)
  except ValueError as e:
    raise runtime.UsageError(str(e)) from None
  workdir = _WORKDIR.value
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise runtime.UsageError(f"--workdir={workdir} is a file, not a directory")
  runtime.start(_DISTRIBUTED, **dict(config.get("distributed", {})))
  run_mode(config, workdir)  # the job writes config.json once it has checked the config against the data


if __name__ == "__main__":
  runtime.run(main)
