"""`python -m mage_jax.evaluate`: linear probe, few-shot and fine-tuning of a MAGE checkpoint (see docs/evals.md).

  python -m mage_jax.evaluate --params=DIR --config=configs/eval_fashion_mnist.py[:args] --workdir=WD \
      [--config.linear_probe.epochs=...]

DIR is a params-only checkpoint (a MAGE pretraining export or `python -m mage_jax.convert mage-vitb-1600.pth
DIR`). Re-running the same command resumes (see `mage_jax/jobs/evaluate.py`). Prints the accuracy table and
writes WD/results.json.
"""

from __future__ import annotations

import os

import jax
from absl import flags
from ml_collections import config_flags

from mage_jax.jobs import evaluate
from mage_jax.system import runtime

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Eval config: a python file in configs/ [:args] (e.g. configs/eval_fashion_mnist.py).",
  lock_config=True,
)
_PARAMS = flags.DEFINE_string("params", None, "Params-only checkpoint directory to evaluate.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (results.json, caches, checkpoints).")
_DISTRIBUTED = runtime.define_distributed_flags()
flags.mark_flags_as_required(["config", "params", "workdir"])


def main(argv):
  runtime.no_positional_arguments(argv)
  config = runtime.config_value(_CONFIG)
  if "mode" in config or not isinstance(config.get("evals"), (tuple, list)):
    raise runtime.UsageError(
      f"--config={flags.FLAGS['config'].config_filename} is not an eval config (it sets config.mode, or names no "
      "evaluators in a tuple 'evals'); training configs run with python -m mage_jax.main"
    )
  runtime.start(_DISTRIBUTED)
  out = evaluate.run(config, _PARAMS.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(evaluate.format_table(out["results"]))
    print(f"results written to {os.path.join(_WORKDIR.value, 'results.json')} ({out['seconds']['total']:.0f} s)")


if __name__ == "__main__":
  runtime.run(main)
