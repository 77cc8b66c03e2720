"""`python -m mage_jax.reference --workdir=DIR`: MAGE's quality against training minutes on Fashion-MNIST.

One resumable run (`make reference`: about 100 minutes of a 2-core CPU): the quickstart's tokenizer and token
cache, then one MAGE run of the quickstart's recipe evaluated at log-spaced steps with the quickstart's own
evaluators (converged logistic probe on all the features, 10-shot, FID, a sample grid), beside the raw-pixel and
random-init controls. Writes DIR/results.json (every point), results.md (the table) and plot.png; see
mage_jax/jobs/reference.py and docs/reference_run.md. Rerun the same command to resume.
"""

from __future__ import annotations

from absl import flags, logging

from mage_jax.system import runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes (keep it outside the checkout; rerun to resume).")
_BUDGET = flags.DEFINE_enum("budget", "full", ["full", "ci"], "'full': the documented run; 'ci': every stage tiny.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir for Fashion-MNIST (default: TFDS's).")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "Only redraw DIR/plot.png from DIR/results.json.")
flags.mark_flag_as_required("workdir")


def main(argv):
  runtime.no_positional_arguments(argv)
  from mage_jax.jobs import quickstart, reference  # pylint: disable=g-import-not-at-top

  if _PLOT_ONLY.value:
    print(f"wrote {reference.plot(_WORKDIR.value)}")
    return 0
  logging.set_verbosity(logging.INFO)
  runtime.start()
  try:
    results = reference.run(_WORKDIR.value, _BUDGET.value, _DATA_DIR.value)
  except quickstart.StageInterrupted as e:
    logging.warning("%s", e)
    print(f"\n{e}")
    return 0
  print("\n" + results["table"])
  print(f"\nwrote {_WORKDIR.value}/results.md, results.json, plot.png")
  return 0


if __name__ == "__main__":
  runtime.run(main)
