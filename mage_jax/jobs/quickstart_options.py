"""What a quickstart run does: the budgets (the steps, recipes and evaluation sizes of every stage) and the
`Options` of one run (the binary's flags), with the checks that refuse inconsistent ones before any work.
"""

from __future__ import annotations

import dataclasses

from mage_jax.jobs import quickstart_data

BUDGETS = {
  # tokenizer steps, token views cached per image, MAGE steps and recipe (configs/fashion_mnist_tiny.py
  # arguments; docs/quickstart_recipe.md has the sweep behind them), samples for FID (and for the test-split
  # reference of Fashion-MNIST), sampling, the representation evals (`jobs/evaluate.py`) and whether the
  # controls (raw pixels, a random projection of them, the encoder at random init) run beside MAGE, linear-probe
  # epochs and batch, few-shot classifiers and trials, the Fashion-MNIST examples the probes use (0: all).
  # 'sweep' is 'full' with MAGE's evals only: the recipe sweep's rows (docs/quickstart_recipe.md).
  "full": dict(
    tokenizer_steps=1000,
    views=2,
    mage_steps=1850,
    mage_recipe="batch=128,width=64,depth=4,decoder_depth=2,heads=4,blr=0.0096,crop_min=1.0",
    fid_samples=1000,
    grid=64,
    sample_steps=12,
    evals=("logistic", "linear_probe", "fewshot"),
    controls=True,
    probe_epochs=10,
    probe_batch=256,
    fewshot_classifiers=("logreg", "ridge"),
    fewshot_trials=5,
    fashion_train=0,
    fashion_test=0,
  ),
  "ci": dict(
    tokenizer_steps=30,
    views=1,
    mage_steps=30,
    mage_recipe="batch=64",
    fid_samples=16,
    grid=16,
    sample_steps=4,
    evals=("logistic", "linear_probe", "fewshot"),
    controls=True,
    probe_epochs=1,
    probe_batch=64,
    fewshot_classifiers=("ridge",),
    fewshot_trials=2,
    fashion_train=300,
    fashion_test=200,
  ),
}
# The sweep's rows (docs/quickstart_recipe.md) are flags over this budget, fixed as it was when they ran.
BUDGETS["sweep"] = dict(
  BUDGETS["full"],
  tokenizer_steps=2000,
  views=2,
  mage_steps=700,
  mage_recipe="batch=128,width=128,depth=4,decoder_depth=2,heads=4",
  evals=("logistic", "fewshot"),
  controls=False,
  fid_samples=500,
  fewshot_classifiers=("ridge",),
)


@dataclasses.dataclass(frozen=True)
class Options:
  """What a quickstart run does (the binary's flags).

  Attributes:
    workdir: where every stage writes.
    budget: a key of `BUDGETS`.
    data: 'fashion_mnist' or 'folder:DIR'.
    data_dir: TFDS data dir (Fashion-MNIST).
    holdout: held-out images of a folder without split subfolders (< 0: 10%, at most 1000).
    image_size: side of the training images (a multiple of the tokenizer's downsampling factor).
    model: '' for the budget's recipe, or a MAGE variant (`models.mage.VARIANTS`) whose sizes replace its.
    tokenizer_init: params dir of a tokenizer to fine-tune (kind 'tokenizer' or 'mage'); '' trains from scratch.
    freeze_codebook: fine-tuning keeps the codebook bit-identical (token ids keep their meaning).
    restart_dead_codes: fine-tuning re-initialises codes unused on the new data every this many steps (0: off).
    tokenizer_steps, mage_steps: > 0 replaces the budget's number of steps.
    views: > 0 replaces the budget's number of cached views per training image.
    mage_recipe: `configs/fashion_mnist_tiny.py` arguments over the budget's recipe (e.g. 'width=96,blr=0.004').
    tokenizer_recipe: `configs/tokenizer_fashion_mnist.py` arguments for the tokenizer stage (e.g. 'disc').
  """

  workdir: str
  budget: str = "full"
  data: str = quickstart_data.FASHION_MNIST
  data_dir: str | None = None
  holdout: int = -1
  image_size: int = 32
  model: str = ""
  tokenizer_init: str = ""
  freeze_codebook: bool = False
  restart_dead_codes: int = 0
  tokenizer_steps: int = 0
  mage_steps: int = 0
  views: int = 0
  mage_recipe: str = ""
  tokenizer_recipe: str = ""

  def check(self) -> None:
    """Refuses inconsistent options before any work (ValueError)."""
    from mage_jax.models.mage import VARIANTS  # pylint: disable=g-import-not-at-top

    if self.budget not in BUDGETS:
      raise ValueError(f"unknown budget {self.budget!r}; expected one of {sorted(BUDGETS)}")
    if self.model and self.model not in VARIANTS:
      raise ValueError(f"unknown MAGE model {self.model!r}; expected one of {sorted(VARIANTS)}")
    if (self.freeze_codebook or self.restart_dead_codes) and not self.tokenizer_init:
      raise ValueError(
        "--freeze_codebook and --restart_dead_codes fine-tune the codebook of --tokenizer_init; "
        "without it the tokenizer trains from scratch"
      )
    if self.freeze_codebook and self.restart_dead_codes:
      raise ValueError("--freeze_codebook keeps every code; --restart_dead_codes replaces unused ones: choose one")
    if min(self.tokenizer_steps, self.mage_steps, self.views, self.restart_dead_codes, self.holdout + 1) < 0:
      raise ValueError("the step and view counts must be >= 0 and --holdout >= -1")
    for flag, recipe in (("mage_recipe", self.mage_recipe), ("tokenizer_recipe", self.tokenizer_recipe)):
      if "steps" in [item.partition("=")[0] for item in recipe.split(",")]:
        raise ValueError(f"--{flag} sets no steps: use --{flag.split('_')[0]}_steps")
    from configs import fashion_mnist_tiny, tokenizer_fashion_mnist  # pylint: disable=g-import-not-at-top
    from mage_jax.train import config_ranges  # pylint: disable=g-import-not-at-top

    # unknown or mistyped recipe arguments fail here, and values out of range (blr=-1, mask_min=1.5)
    config_ranges.check(fashion_mnist_tiny.get_config(self.recipe()))
    tokenizer_fashion_mnist.get_config(self.tokenizer_recipe)
    factor = 2 ** (len(self.tokenizer_sizes()["ch_mult"]) - 1)
    if self.image_size % factor or self.image_size < 2 * factor:
      raise ValueError(
        f"--image_size={self.image_size}: the tokenizer downsamples by {factor}, so the image size "
        f"must be a multiple of {factor} and at least {2 * factor} (2x2 tokens)"
      )

  def tokenizer_sizes(self) -> dict:
    """The tokenizer's `config.tokenizer` sizes: those of `tokenizer_init`, or the quickstart's own."""
    from configs import tokenizer_fashion_mnist  # pylint: disable=g-import-not-at-top
    from mage_jax.jobs import tokenizer as tokenizer_job  # pylint: disable=g-import-not-at-top

    if self.tokenizer_init:
      return tokenizer_job.init_sizes(self.tokenizer_init)
    return tokenizer_fashion_mnist.get_config().tokenizer.to_dict()

  def steps(self) -> dict:
    budget = BUDGETS[self.budget]
    return {
      "tokenizer": self.tokenizer_steps or budget["tokenizer_steps"],
      "mage": self.mage_steps or budget["mage_steps"],
      "views": self.views or budget["views"],
    }

  def recipe(self) -> str:
    """The MAGE recipe: the budget's `configs/fashion_mnist_tiny.py` arguments, then `mage_recipe`'s."""
    return ",".join(filter(None, (BUDGETS[self.budget]["mage_recipe"], self.mage_recipe)))

  def crop_scale(self) -> list[float]:
    """The recipe's random-resized-crop area range: the cached views are drawn with it."""
    from configs import fashion_mnist_tiny  # pylint: disable=g-import-not-at-top

    return list(fashion_mnist_tiny.get_config(self.recipe()).input.scale)
