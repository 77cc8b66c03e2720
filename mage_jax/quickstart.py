"""`python -m mage_jax.quickstart`: the main job for a new user (what `make quickstart` runs).

Offline on a 2-core CPU in about 14 minutes: Fashion-MNIST, a tiny VQGAN tokenizer, tiny MAGE, samples, linear
probe and few-shot beside raw pixels, FID; prints and saves a results table (`WORKDIR/results.md`,
`results.json`). Re-running continues where it stopped; see mage_jax/jobs/quickstart.py for the stages.
"""

from __future__ import annotations

from absl import flags, logging

from mage_jax import runtime
from mage_jax.jobs import quickstart

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Where every stage writes (re-run to resume).")
_BUDGET = flags.DEFINE_enum("budget", "full", sorted(quickstart.BUDGETS),
                            "'full': the recorded run (~14 min on 2 cores); 'ci': every stage tiny (tests).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS's).")


def main(argv):
  runtime.no_positional_arguments(argv)
  logging.set_verbosity(logging.INFO)
  runtime.start()
  results = quickstart.run(_WORKDIR.value, _BUDGET.value, _DATA_DIR.value)
  print("\n" + results["table"])
  print(f"\nwrote {_WORKDIR.value}/results.md, results.json, samples_grid.png, reconstructions.png "
        f"({results['seconds'] / 60:.1f} min this invocation)")


if __name__ == "__main__":
  runtime.run(main)
