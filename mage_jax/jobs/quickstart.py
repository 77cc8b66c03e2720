"""The quickstart job behind `python -m mage_jax.quickstart --workdir=W [--data=folder:DIR]` (`make quickstart`
runs it on Fashion-MNIST). Offline, on a 2-core CPU; Fashion-MNIST in about 20 minutes (docs/quickstart_recipe.md):

  1. data: Fashion-MNIST (a prepared TFDS copy, else built from Debian's `dataset-fashion-mnist` files, else a
     TFDS download when the network answers, else a message saying how to get it), or a folder of the user's
     images split into training and held-out images (see `quickstart_data`: subfolders or a hashed slice,
     checked, `data.json`; the held-out images at the training resolution, `heldout.npz`, are FID's reference);
  2. trains the tiny VQGAN tokenizer (32x32 images -> 8x8 tokens) from scratch, or fine-tunes a converted one
     (`tokenizer_init`), and writes a reconstruction PNG of held-out images;
  3. caches the frozen tokenizer's ids of K augmented views of every training image (the `cache_tokens` job);
  4. pretrains MAGE on the cached ids (`input.tokens`), with the recipe of docs/quickstart_recipe.md;
  5. samples a grid PNG with iterative decoding;
  6. linear probe and few-shot evaluation of the MAGE features beside the same classifiers on raw pixels (for
     folders when they have class subfolders with enough images; otherwise skipped, with the reason);
  7. FID of samples against the held-out images (when the FID Inception weights are set up; a folder's
     reference statistics are computed once and kept with the data stage);
  8. prints and saves a results table (results.md, results.json, with where the data came from).

Each stage's output is its completion marker, recorded in `stages.json` with what produced it (the data, the
options of that stage and the stages before it): re-running the same command continues where it stopped (the
training stages resume from their checkpoints), and a stage whose inputs changed is redone with those after it.
`--budget=ci` shrinks every stage (the test suite runs it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import time

import jax
import numpy as np
from absl import logging

from mage_jax.jobs import quickstart_data
from mage_jax.jobs.quickstart_data import Dataset
from mage_jax.system import atomic


def _cache_format() -> int:
  from mage_jax.data import cached_tokens  # pylint: disable=g-import-not-at-top  (TensorFlow: not for --help)

  return cached_tokens.FORMAT_VERSION


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
# Held-out images of the tokenizer's final eval: PSNR within about 0.05 dB of the whole 10,000 at a fifth of
# their 40 s (the metrics of the tokenizer, not of MAGE).
TOKENIZER_EVAL_IMAGES = 2000
FID_BATCH = 50  # images per Inception call (the last is padded): fewer when fewer samples are compared
PAPER = {
  "MAGE ViT-B ImageNet: FID": "11.1",
  "MAGE ViT-B ImageNet: linear probe": "74.7%",
  "MAGE-C ViT-L ImageNet: 10-shot": "71.9%",
}


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


def _stage(name: str):
  logging.info("=" * 20 + " quickstart: %s " + "=" * 20, name)
  print(f"\n=== {name} ===", flush=True)


def _network_reachable(host="storage.googleapis.com", port=443, timeout=3.0) -> bool:
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def ensure_fashion_mnist(data_dir: str | None) -> None:
  """Makes `fashion_mnist` loadable offline, preferring local files over a download (an offline download
  attempt retries for minutes before failing)."""
  from mage_jax.data import sources

  try:
    sources.load_arrays("fashion_mnist", "test", data_dir)
    return
  except FileNotFoundError as offline_error:
    if not _network_reachable():
      raise FileNotFoundError(
        f"Fashion-MNIST is not available offline ({offline_error}). Install Debian's copy with "
        "`sudo apt-get install -y dataset-fashion-mnist`, or run with internet access so TFDS can download "
        "it."
      ) from None
  sources.load_arrays("fashion_mnist", "test", data_dir, download=True)


def _batch_sizes(options: Options) -> dict:
  """The training batches of the tokenizer and MAGE configs (a training split must hold one of each)."""
  from configs import fashion_mnist_tiny, tokenizer_fashion_mnist

  return {
    "tokenizer": tokenizer_fashion_mnist.get_config().input.batch_size,
    "mage": fashion_mnist_tiny.get_config(options.recipe()).input.batch_size,
  }


def _eval_batch(num_examples: int, largest: int = 512) -> int:
  """A global eval batch for a split of `num_examples`: no larger than needed, a multiple of the devices."""
  n = jax.device_count()
  return max(n, min(largest, -(-num_examples // n) * n))


def prepare_data(workdir: str, dataset: Dataset, options: Options) -> dict:
  """Stage 1: `data.json` (the summary of `quickstart_data.summarize`) and, for folders, `heldout.npz`."""
  path = os.path.join(workdir, "data.json")
  if not os.path.exists(path):
    if not dataset.is_folder:
      ensure_fashion_mnist(dataset.data_dir)
    summary = quickstart_data.summarize(dataset, max(_batch_sizes(options).values()))
    if dataset.is_folder:
      summary["fid_reference_images"] = quickstart_data.write_reference_images(
        dataset, os.path.join(workdir, "heldout.npz")
      )
    atomic.write_json(path, summary)
  with open(path) as f:
    return json.load(f)


def _params_done(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "params", "mage_jax.json"))


def _check_trained(directory: str, what: str) -> None:
  """A training loop returns early after a SIGTERM, with a checkpoint and no export: the stage is not done."""
  if not _params_done(directory):
    raise StageInterrupted(
      f"{what} training stopped before its last step (its checkpoint is saved in "
      f"{directory}); rerun the same command to resume it"
    )


def _frequent_checkpoints(config, steps: int) -> None:
  """At least four checkpoints per training stage: an interrupted stage loses at most a quarter of its steps."""
  config.checkpoint_every_steps = max(1, min(config.checkpoint_every_steps, steps // 4))


def _use_data(config, dataset: Dataset) -> None:
  """Points a training config's input at the dataset's training split."""
  config.input.name = dataset.name
  config.input.split = dataset.train_split
  config.input.data_dir = dataset.data_dir
  config.input.image_size = dataset.image_size


def train_tokenizer(workdir: str, options: Options, dataset: Dataset, data: dict) -> dict:
  from configs import tokenizer_fashion_mnist
  from mage_jax.jobs import tokenizer as tokenizer_job

  tok_dir = os.path.join(workdir, "tokenizer")
  steps = options.steps()["tokenizer"]
  # Fine-tuning starts a fresh discriminator at mid-run (reconstruction only until then), with LeCam.
  arg = ",".join(
    filter(
      None,
      (
        f"steps={steps},eval_every={steps}",  # held-out metrics once, at the end
        "disc" if options.tokenizer_init else "",
        options.tokenizer_recipe,
      ),
    )
  )
  config = tokenizer_fashion_mnist.get_config(arg)
  _frequent_checkpoints(config, steps)
  _use_data(config, dataset)
  config.eval.split = dataset.heldout_split
  config.eval.batch_size = _eval_batch(data["splits"]["heldout"]["images"])
  config.eval.final_examples = TOKENIZER_EVAL_IMAGES
  if options.tokenizer_init:
    config.tokenizer.init = options.tokenizer_init
    config.tokenizer.update(options.tokenizer_sizes())
    config.codebook.freeze = options.freeze_codebook
    config.codebook.restart_every = options.restart_dead_codes
  if not _params_done(tok_dir):
    tokenizer_job.train_and_evaluate(config, tok_dir)
    _check_trained(tok_dir, "tokenizer")
  with open(os.path.join(tok_dir, tokenizer_job.METRICS_FILE)) as f:
    metrics = json.load(f)
  if options.tokenizer_init:
    with open(os.path.join(tok_dir, tokenizer_job.INIT_METRICS_FILE)) as f:
      metrics["before_fine_tuning"] = json.load(f)
  pngs = sorted(p for p in os.listdir(os.path.join(tok_dir, "reconstructions")) if p.startswith("step_"))
  shutil.copy(os.path.join(tok_dir, "reconstructions", pngs[-1]), os.path.join(workdir, "reconstructions.png"))
  return metrics


def cache_tokens(workdir: str, options: Options, dataset: Dataset) -> dict:
  """Stage 3: the tokenizer's ids of `views` augmented views (the pretraining crop law) of every training
  image, in `tokens/` (`configs/cache_tokens.py`); MAGE trains on them without running the tokenizer."""
  from configs import cache_tokens as cache_config
  from mage_jax.jobs import cache_tokens as cache_job

  views = options.steps()["views"]
  config = cache_config.get_config(f"base=fashion_mnist_tiny,views={views}")
  _use_data(config, dataset)
  config.input.scale = tuple(options.crop_scale())
  config.tokenizer.init = os.path.join(workdir, "tokenizer", "params")
  start = time.time()
  out = cache_job.train_and_evaluate(config, os.path.join(workdir, "tokens"))
  return {**out, "views": views, "seconds": time.time() - start}


def mage_config(options: Options, dataset: Dataset, workdir: str):
  """The MAGE stage's training config: the recipe on the cached tokens."""
  from configs import fashion_mnist_tiny
  from mage_jax.models.mage import VARIANTS

  steps = options.steps()["mage"]
  config = fashion_mnist_tiny.get_config(f"steps={steps},{options.recipe()}")
  _frequent_checkpoints(config, steps)
  # No few-shot monitor (6 s per evaluation): the representation stage measures the features on all the data.
  config.fewshot_monitor.train_split = ""
  _use_data(config, dataset)
  if options.model:
    config.model.update(VARIANTS[options.model])
  config.tokenizer.init = os.path.join(workdir, "tokenizer", "params")
  config.input.tokens = os.path.join(workdir, "tokens")
  return config


def pretrain_mage(workdir: str, options: Options, dataset: Dataset) -> dict:
  from mage_jax.jobs import pretrain

  mage_dir = os.path.join(workdir, "mage")
  steps = options.steps()["mage"]
  config = mage_config(options, dataset, workdir)
  summary_path = os.path.join(mage_dir, "train_summary.json")
  if not _params_done(mage_dir):
    start = time.time()
    metrics = pretrain.train_and_evaluate(config, mage_dir)
    _check_trained(mage_dir, "MAGE")
    with open(summary_path, "w") as f:
      json.dump({**metrics, "steps": steps, "seconds": time.time() - start}, f, indent=2)
  with open(summary_path) as f:
    return json.load(f)


def sample(workdir: str, budget: dict) -> dict:
  from mage_jax.data import images
  from mage_jax.generation import sampling
  from mage_jax.train import params_io

  out = os.path.join(workdir, "samples.npz")
  if not os.path.exists(out):
    variables, meta = params_io.load(os.path.join(workdir, "mage", "params"))
    model, tokenizer = params_io.models_from_meta(meta)
    num = max(budget["fid_samples"], budget["grid"])
    batch = 8 * max(1, min(64, num // 8)) if jax.device_count() <= 8 else jax.device_count()
    start, chunks = time.time(), []
    for chunk in sampling.generate_images(
      model,
      tokenizer,
      variables,
      jax.random.key(0),
      num_images=num,
      batch_size=batch,
      num_steps=budget["sample_steps"],
      temperature=4.5,
    ):
      chunks.append(chunk)
    seconds = time.time() - start
    samples = np.concatenate(chunks)[:num]
    images.save_png(os.path.join(workdir, "samples_grid.png"), images.make_grid(samples[: budget["grid"]], 8))
    np.savez(out + ".tmp.npz", images=samples, seconds=seconds)
    os.replace(out + ".tmp.npz", out)
  with np.load(out) as z:
    return {"num_samples": int(len(z["images"])), "images_per_sec": float(len(z["images"]) / z["seconds"])}


def _probe_batch(budget_batch: int, num_train: int) -> int:
  """The linear probe's batch: the budget's, or the largest power of two the training split fills."""
  return max(jax.device_count(), min(budget_batch, 1 << (num_train.bit_length() - 1)))


def evaluation_config(dataset: Dataset, budget: dict, data: dict):
  """The representation evals' config, or (None, {eval: reason}) when the data allows none."""
  from configs import eval_fashion_mnist

  if not dataset.is_folder:
    config = eval_fashion_mnist.get_config(
      f"train={budget['fashion_train']},test={budget['fashion_test']},"
      f"epochs={budget['probe_epochs']},batch={budget['probe_batch']}"
    )
    config.input.data_dir = dataset.data_dir
    skipped = {}
  else:
    evals, shots, skipped = quickstart_data.probe_plan(data)
    if not evals:
      return None, skipped
    num_train = data["splits"]["train"]["images"]
    config = eval_fashion_mnist.get_config(
      f"epochs={budget['probe_epochs']},batch={_probe_batch(budget['probe_batch'], num_train)}"
    )
    config.evals = evals
    config.input.name = dataset.name
    config.input.split = dataset.train_split
    config.input.batch_size = _eval_batch(max(num_train, data["splits"]["heldout"]["images"]), 256)
    config.eval_split = dataset.heldout_split
    config.num_classes = len(data["classes"])
    config.fewshot.shots = shots or quickstart_data.FEWSHOT_SHOTS
  config.fewshot.classifiers = budget["fewshot_classifiers"]
  config.fewshot.trials = budget["fewshot_trials"]
  config.evals = tuple(e for e in budget["evals"] if e in config.evals or e == "logistic")
  config.baseline_pixels = config.baseline_random = budget["controls"]
  return config, skipped


def evaluate_representations(workdir: str, budget: dict, dataset: Dataset, data: dict) -> dict:
  from mage_jax.jobs import evaluate

  eval_dir = os.path.join(workdir, "eval")
  path = os.path.join(eval_dir, "results.json")
  config, skipped = evaluation_config(dataset, budget, data)
  if config is None:
    return {"skipped": skipped}
  if not os.path.exists(path):
    evaluate.run(config, os.path.join(workdir, "mage", "params"), eval_dir)
    dump_features(eval_dir, config, os.path.join(workdir, "features"))
  with open(path) as f:
    return {**json.load(f)["results"], "skipped": skipped}


def dump_features(eval_dir: str, config, out_dir: str) -> None:
  """`features/mage_train.npz` and `mage_test.npz`: the frozen features the probes scored (`features` [N, D]
  float32, `labels` [N] int64, in the dataset's order), for re-scoring with any classifier."""
  from mage_jax.jobs import evaluate  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  for name, split in (("train", config.input.split), ("test", config.eval_split)):
    source = os.path.join(eval_dir, "features", f"mage_{evaluate._split_tag(split)}.npz")  # pylint: disable=protected-access
    if not os.path.exists(source):
      continue
    with np.load(source) as f:
      features, labels = f["features"].astype(np.float32), f["labels"].astype(np.int64)
    target = os.path.join(out_dir, f"mage_{name}.npz")
    np.savez(target + ".tmp.npz", features=features, labels=labels)
    os.replace(target + ".tmp.npz", target)


def _reference_statistics(workdir: str, model, batch_size: int):
  """FID statistics of the held-out images (`heldout.npz`), computed once into `fid_reference/`."""
  from mage_jax.fid import inputs, metrics

  images = os.path.join(workdir, "heldout.npz")
  with open(images, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]

  def batches():
    return inputs.image_batches(images)[1]

  return metrics.load_or_compute_reference_stats(
    "heldout", digest, batches, os.path.join(workdir, "fid_reference"), model=model, batch_size=batch_size, extras=True
  )


def compute_fid(workdir: str, budget: dict, dataset: Dataset) -> dict:
  from mage_jax.fid import inputs, metrics, weights

  path = os.path.join(workdir, "fid.json")
  if not os.path.exists(path):
    try:
      weights.default_weights_path()
    except FileNotFoundError as e:
      return {"fid": None, "note": str(e)}
    samples = os.path.join(workdir, "samples.npz")
    if dataset.is_folder:
      model = weights.load_inception()
      batch_size = min(FID_BATCH, budget["fid_samples"])
      reference = _reference_statistics(workdir, model, batch_size)
      count, batches = inputs.image_batches(samples, max_images=budget["fid_samples"])
      result = metrics.evaluate(batches, reference, model, batch_size=batch_size, total=count)
      summary = {
        "fid": result.fid,
        "num_images": result.num_images,
        "num_reference": reference.num_images,
        "reference": "heldout.npz",
        "sfid": result.sfid,
        "precision": result.precision,
        "recall": result.recall,
      }
    else:
      summary = inputs.compute(
        samples, "fashion_mnist:test", max_images=budget["fid_samples"], data_dir=dataset.data_dir, extras=True
      )
    atomic.write_json(path, summary)
  with open(path) as f:
    return json.load(f)


def _pct(x) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


# The feature sets of the representation table: MAGE and the controls that show what pretraining adds.
FEATURE_SETS = (
  ("mage", "MAGE"),
  ("random_init", "same encoder at random init"),
  ("pixels", "raw pixels"),
  ("random_proj", "random projection of the pixels"),
)


CLASSIFIERS = {"logreg": "logistic regression", "ridge": "ridge"}  # `fewshot`'s protocols


def representation_table(rep: dict) -> list[str]:
  """Markdown rows: one column per feature set present, one row per classifier (and shot count)."""
  sets = [(k, title) for k, title in FEATURE_SETS if isinstance(rep.get(k), dict)]
  if not sets:
    return []
  skipped = rep.get("skipped", {})
  dims = {k: rep[k].get("logistic", {}).get("train_examples") for k, _ in sets}
  rows = []

  def row(title, eval_name, value_of):
    values = [value_of(rep[k].get(eval_name) or {}) for k, _ in sets]
    if all(v is None for v in values) and eval_name not in skipped:
      return
    rows.append([title] + [_with_reason(v, skipped.get(eval_name)) for v in values])

  train = next((n for n in dims.values() if n), None)
  row(
    f"logistic regression probe top-1 (converged, {train or 'all'} train images)", "logistic", lambda r: r.get("top1")
  )
  row("linear probe top-1 (paper protocol: BN + linear, LARS)", "linear_probe", lambda r: r.get("top1"))
  fewshot = rep.get("mage", {}).get("fewshot", {})
  for classifier in ("logreg", "ridge"):
    per_shot = fewshot.get(classifier, {})
    for shot in sorted((int(k) for k in per_shot if k.isdigit()), reverse=True):
      row(
        f"{shot}-shot top-1 ({CLASSIFIERS[classifier]}, mean of {fewshot.get('trials', '?')} draws)",
        "fewshot",
        lambda r, shot=shot, c=classifier: (r.get(c, {}).get(str(shot)) or {}).get("mean"),
      )
  if "fewshot" in skipped and not fewshot:
    row("few-shot top-1", "fewshot", lambda r: None)
  lines = [
    "| frozen features, top-1 on the held-out images | " + " | ".join(t for _, t in sets) + " |",
    "|---" * (len(sets) + 1) + "|",
  ]
  return lines + ["| " + " | ".join(r) + " |" for r in rows]


def results_table(results: dict) -> str:
  tok, mage, gen, rep, fid = (results[k] for k in ("tokenizer", "mage", "samples", "representations", "fid"))
  data = results["data"]
  heldout = "test" if data["source"] == quickstart_data.FASHION_MNIST else "held-out"
  tok_images = f"{int(tok['num_examples']):,} {heldout} images"
  rows = [(f"tokenizer PSNR on {tok_images} (dB)", f"{tok['psnr']:.2f}")]
  if "before_fine_tuning" in tok:
    rows.append((f"tokenizer PSNR on {tok_images} before fine-tuning (dB)", f"{tok['before_fine_tuning']['psnr']:.2f}"))
  rows += [
    (f"tokenizer SSIM on {tok_images}", f"{tok['ssim']:.3f}"),
    ("tokenizer codebook usage", _pct(tok["codebook_usage"])),
    ("tokenizer codebook perplexity", f"{tok['codebook_perplexity']:.1f}"),
    ("MAGE final training loss", f"{mage['loss']:.3f}"),
    ("MAGE training steps/s", f"{mage['steps'] / mage['seconds']:.2f}"),
    ("generation images/s", f"{gen['images_per_sec']:.1f}"),
  ]
  fid_value = fid.get("fid")
  where = "test split" if heldout == "test" else f"{fid.get('num_reference', 0)} held-out images"
  rows.append(
    (
      f"FID vs {where} ({fid.get('num_images', 0)} samples)",
      f"{fid_value:.2f}" if fid_value is not None else "n/a (FID weights not set up)",
    )
  )
  if fid.get("sfid") is not None:
    rows += [
      ("sFID (spatial Inception features)", f"{fid['sfid']:.2f}"),
      ("precision / recall of the samples (k = 3)", f"{_pct(fid['precision'])} / {_pct(fid['recall'])}"),
    ]
  rows.append(("wall time of this invocation (min)", f"{results['seconds'] / 60:.1f}"))
  title = "Fashion-MNIST" if heldout == "test" else f"{os.path.basename(data['path'])}, {_counts(data)}"
  lines = [f"| quantity ({title}, this run) | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in rows]
  features = representation_table(rep)
  if features:
    lines += [""] + features
  elif rep.get("skipped"):
    lines += ["", "representations skipped: " + "; ".join(f"{k}: {v}" for k, v in rep["skipped"].items())]
  lines += ["", "| paper (ImageNet 256, for scale) | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in PAPER.items()]
  return "\n".join(lines)


def _with_reason(accuracy, skipped: str | None) -> str:
  """An accuracy, with why some of its eval was skipped; or why all of it was."""
  if accuracy is None and skipped:
    return f"skipped: {skipped}"
  return _pct(accuracy) + (f" ({skipped})" if skipped else "")


def _counts(data: dict) -> str:
  splits = data["splits"]
  classes = f"{len(data['classes'])} classes" if data["classes"] else "no classes"
  return f"{splits['train']['images']} train / {splits['heldout']['images']} held-out images, {classes}"


# Stage name -> the paths under the workdir it writes (what a redo removes).
STAGE_OUTPUTS = {
  "data": ("data.json", "heldout.npz", "fid_reference"),
  "tokenizer": ("tokenizer", "reconstructions.png"),
  "cache": ("tokens",),
  "mage": ("mage",),
  "samples": ("samples.npz", "samples_grid.png"),
  "representations": ("eval", "features"),
  "fid": ("fid.json",),
  "points": ("mage", "points"),  # the reference run's MAGE stage (jobs/reference.py)
}
STAGES_FILE = "stages.json"


class StageRecords:
  """`stages.json`: per stage, a hash of what produces it (its inputs and the stages before it), recorded as
  'started:<hash>' before the stage runs and '<hash>' once its outputs are complete.

  A rerun skips a finished stage with the same hash, continues a started one with the same hash (the training
  stages resume from their checkpoints, the token cache from its finished shards), and redoes a stage whose hash
  changed after removing its outputs. Outputs that exist without any record were not written by the quickstart,
  and are refused rather than touched.
  """

  STARTED = "started:"

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, STAGES_FILE)
    self.workdir = workdir
    self.records = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.records = json.load(f)

  def done(self, stage: str, identity: str) -> bool:
    return self.records.get(stage) == identity

  def prepare(self, stage: str, identity: str) -> None:
    """Makes the workdir ready for `stage`: nothing to do, resume, or start afresh (see the class)."""
    record = self.records.get(stage)
    if record in (identity, self.STARTED + identity):
      return
    present = [p for p in STAGE_OUTPUTS[stage] if os.path.exists(os.path.join(self.workdir, p))]
    if present and record is None:
      raise ValueError(
        f"{self.workdir} holds {', '.join(present)} not written by the quickstart; use another --workdir"
      )
    for p in present:
      logging.warning("quickstart: redoing stage %s (its inputs changed): removing %s", stage, p)
      path = os.path.join(self.workdir, p)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    self.records[stage] = self.STARTED + identity
    self._write()

  def finish(self, stage: str, identity: str) -> None:
    self.records[stage] = identity
    self._write()

  def _write(self):
    atomic.write_json(self.path, self.records, indent=1)


class StageInterrupted(Exception):
  """A training stage stopped before its end (SIGTERM: its checkpoint is saved); rerunning resumes it."""


def _init_identity(path: str) -> dict:
  """A tokenizer to fine-tune, as a stage input: where it is and its metadata (written last by every export)."""
  if not path:
    return {}
  from mage_jax.train import params_io  # pylint: disable=g-import-not-at-top

  return {"path": os.path.abspath(path), "meta": params_io.read_meta(path)}


class Pipeline:
  """The stages of one workdir: each runs (or is skipped, resumed or redone) through `StageRecords`, with an
  identity covering its own inputs and, through a running hash, the stages before it."""

  def __init__(self, options: Options, stage_inputs: dict | None = None):
    options.check()
    self.options, self.workdir = options, options.workdir
    self.budget = budget = BUDGETS[options.budget]
    self.dataset = quickstart_data.make_dataset(
      options.data,
      options.data_dir,
      holdout=options.holdout,
      image_size=options.image_size,
      min_train=max(_batch_sizes(options).values()),
    )
    self.stage_inputs = {
      "data": self.dataset.identity(),
      "tokenizer": {
        "steps": options.steps()["tokenizer"],
        "init": _init_identity(options.tokenizer_init),
        "freeze_codebook": options.freeze_codebook,
        "restart_dead_codes": options.restart_dead_codes,
        # Only when set: the identity of a tokenizer trained without it stays what it was.
        **({"recipe": options.tokenizer_recipe} if options.tokenizer_recipe else {}),
      },
      "cache": {"views": options.steps()["views"], "crop_scale": options.crop_scale(), "format": _cache_format()},
      "mage": {"steps": options.steps()["mage"], "model": options.model, "recipe": options.recipe()},
      "samples": {k: budget[k] for k in ("fid_samples", "grid", "sample_steps")},
      "representations": {
        k: budget[k] for k in ("evals", "controls", "probe_epochs", "probe_batch", "fashion_train", "fashion_test")
      },
      "fid": {"fid_samples": budget["fid_samples"]},
      **(stage_inputs or {}),
    }
    os.makedirs(self.workdir, exist_ok=True)
    self.records = StageRecords(self.workdir)
    self.start = time.time()
    self.results = {
      "budget": options.budget,
      "options": dataclasses.asdict(options),
      "device": jax.devices()[0].device_kind,
      "stage_seconds": {},
    }
    self._identity = hashlib.sha256()

  def stage(self, title: str, key: str, fn, *fn_args):
    _stage(title)
    stage_start = time.time()
    self._identity.update(json.dumps({key: self.stage_inputs[key]}, sort_keys=True, default=str).encode())
    self.records.prepare(key, self._identity.hexdigest())
    value = fn(*fn_args)
    self.records.finish(key, self._identity.hexdigest())
    self.results["stage_seconds"][key] = round(time.time() - stage_start, 1)
    self.results[key] = value
    return value

  def prepare_tokens(self) -> dict:
    """The data, tokenizer and token-cache stages (1-3 of 7); returns the data summary."""
    o, w, d = self.options, self.workdir, self.dataset
    data = self.stage(f"1/7 data: {d.title}", "data", prepare_data, w, d, o)
    self.stage(
      "2/7 tokenizer " + ("fine-tuning" if o.tokenizer_init else "training"),
      "tokenizer",
      train_tokenizer,
      w,
      o,
      d,
      data,
    )
    self.stage(f"3/7 token cache ({o.steps()['views']} views per image)", "cache", cache_tokens, w, o, d)
    return data


def run(options: Options) -> dict:
  """Runs (or continues) every stage in `options.workdir`; writes and returns the results (with the table)."""
  p = Pipeline(options)
  workdir, budget, dataset = p.workdir, p.budget, p.dataset
  data = p.prepare_tokens()
  p.stage("4/7 MAGE pretraining", "mage", pretrain_mage, workdir, options, dataset)
  p.stage("5/7 sampling", "samples", sample, workdir, budget)
  p.stage(
    "6/7 linear probe and few-shot vs raw pixels",
    "representations",
    evaluate_representations,
    workdir,
    budget,
    dataset,
    data,
  )
  p.stage("7/7 FID", "fid", compute_fid, workdir, budget, dataset)
  results = p.results
  results["seconds"] = time.time() - p.start
  results["table"] = results_table(results)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results["table"] + "\n")
  return results
