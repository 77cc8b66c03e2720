"""`python -m mage_jax.quickstart`: the main job for a new user (what `make quickstart` runs).

On Fashion-MNIST (the default) or on a folder of your own images (`--data=folder:DIR`, one subfolder per class
when there are classes): a tiny VQGAN tokenizer (trained, or fine-tuned from `--tokenizer_init`), tiny MAGE,
samples, reconstructions of held-out images, linear probe and few-shot beside raw pixels, FID against the
held-out images; prints and saves a results table (`WORKDIR/results.md`, `results.json`). Offline on a 2-core CPU
in about 20 minutes for Fashion-MNIST. Re-running continues where it stopped; see mage_jax/jobs/quickstart.py
for the stages.
"""

from __future__ import annotations

from absl import flags, logging

from mage_jax.jobs import quickstart, quickstart_options, quickstart_stage_records
from mage_jax.system import runtime

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Where every stage writes (re-run to resume).")
_BUDGET = flags.DEFINE_enum(
  "budget",
  "full",
  sorted(quickstart_options.BUDGETS),
  "'full': the recorded run (README); 'sweep': 'full' without the controls and the "
  "paper-protocol probe (the recipe sweep's rows); 'ci': every stage tiny (tests).",
)
_DATA = flags.DEFINE_string(
  "data",
  "fashion_mnist",
  "'fashion_mnist', or folder:DIR for your own images "
  "(class subfolders give labels; train/ and test/ or val/ subfolders give the splits).",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir for Fashion-MNIST (default: TFDS's).")
_HOLDOUT = flags.DEFINE_integer(
  "holdout",
  -1,
  "Images of a folder held out for evaluation and FID, drawn by a "
  "hash of their paths (-1: 10% of the folder, at most 1000).",
  lower_bound=-1,
)
_IMAGE_SIZE = flags.DEFINE_integer(
  "image_size",
  32,
  "Side of the training images (shorter side resized, centre "
  "crop); tokens per side: image_size / 4 (the released VQGAN: / 16).",
  lower_bound=8,
)
_MODEL = flags.DEFINE_string(
  "model",
  "",
  "MAGE size: '' for the quickstart's recipe (docs/quickstart_recipe.md), or "
  "a variant of mage_jax/models/mage.py (tiny, B, L).",
)
_TOKENIZER_INIT = flags.DEFINE_string(
  "tokenizer_init",
  "",
  "Params dir of a tokenizer to fine-tune instead of "
  "training one (python -m mage_jax.convert output, kind tokenizer or mage).",
)
_FREEZE_CODEBOOK = flags.DEFINE_bool(
  "freeze_codebook", False, "With --tokenizer_init: keep its codebook bit-identical, so token ids keep their meaning."
)
_RESTART_DEAD_CODES = flags.DEFINE_integer(
  "restart_dead_codes",
  0,
  "With --tokenizer_init: every this many steps, re-initialise codes the new images leave unused (0: never).",
  lower_bound=0,
)
_TOKENIZER_STEPS = flags.DEFINE_integer("tokenizer_steps", 0, "Tokenizer steps (0: the budget's).", lower_bound=0)
_MAGE_STEPS = flags.DEFINE_integer("mage_steps", 0, "MAGE pretraining steps (0: the budget's).", lower_bound=0)
_VIEWS = flags.DEFINE_integer(
  "views", 0, "Augmented views of each training image in the token cache (0: the budget's).", lower_bound=0
)
_TOKENIZER_RECIPE = flags.DEFINE_string(
  "tokenizer_recipe",
  "",
  "configs/tokenizer_fashion_mnist.py arguments for "
  "the tokenizer stage, e.g. 'disc' (its adversarial loss from mid-run).",
)
_MAGE_RECIPE = flags.DEFINE_string(
  "mage_recipe",
  "",
  "configs/fashion_mnist_tiny.py arguments over the budget's "
  "MAGE recipe, e.g. 'width=96,blr=0.004' (docs/quickstart_recipe.md).",
)


def main(argv):
  runtime.no_positional_arguments(argv)
  logging.set_verbosity(logging.INFO)
  options = quickstart_options.Options(
    workdir=_WORKDIR.value,
    budget=_BUDGET.value,
    data=_DATA.value,
    data_dir=_DATA_DIR.value,
    holdout=_HOLDOUT.value,
    image_size=_IMAGE_SIZE.value,
    model=_MODEL.value,
    tokenizer_init=_TOKENIZER_INIT.value,
    freeze_codebook=_FREEZE_CODEBOOK.value,
    restart_dead_codes=_RESTART_DEAD_CODES.value,
    tokenizer_steps=_TOKENIZER_STEPS.value,
    mage_steps=_MAGE_STEPS.value,
    views=_VIEWS.value,
    mage_recipe=_MAGE_RECIPE.value,
    tokenizer_recipe=_TOKENIZER_RECIPE.value,
  )
  try:
    options.check()
  except ValueError as e:
    raise runtime.UsageError(str(e)) from None
  runtime.start()
  try:
    results = quickstart.run(options)
  except quickstart_stage_records.StageInterrupted as e:
    # A preemption notice (SIGTERM): the stage saved a checkpoint; status 0 as for any preempted training job.
    logging.warning("%s", e)
    print(f"\n{e}")
    return 0
  print("\n" + results["table"])
  print(
    f"\nwrote {_WORKDIR.value}/results.md, results.json, samples_grid.png, reconstructions.png "
    f"({results['seconds'] / 60:.1f} min this invocation)"
  )


if __name__ == "__main__":
  runtime.run(main)
