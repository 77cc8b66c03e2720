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
import os
import shutil
import socket
import time

import jax
import numpy as np
from absl import logging

from mage_jax.jobs import quickstart_data
from mage_jax.jobs.quickstart_data import Dataset
from mage_jax.jobs.quickstart_options import BUDGETS, Options
from mage_jax.jobs.quickstart_report import results_table
from mage_jax.jobs.quickstart_stage_records import StageInterrupted, StageRecords
from mage_jax.system import atomic


def _cache_format() -> int:
  from mage_jax.data import cached_tokens  # pylint: disable=g-import-not-at-top  (TensorFlow: not for --help)

  return cached_tokens.FORMAT_VERSION


# Held-out images of the tokenizer's final eval: PSNR within about 0.05 dB of the whole 10,000 at a fifth of
# their 40 s (the metrics of the tokenizer, not of MAGE).
TOKENIZER_EVAL_IMAGES = 2000
FID_BATCH = 50  # images per Inception call (the last is padded): fewer when fewer samples are compared


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
  from mage_jax.evals import reconstruction
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
  config.evals.reconstruction.update(
    dict(
      split=dataset.heldout_split,
      batch_size=_eval_batch(data["splits"]["heldout"]["images"]),
      final_examples=TOKENIZER_EVAL_IMAGES,
    )
  )
  if options.tokenizer_init:
    config.tokenizer.init = options.tokenizer_init
    config.tokenizer.update(options.tokenizer_sizes())
    config.codebook.freeze = options.freeze_codebook
    config.codebook.restart_every = options.restart_dead_codes
  if not _params_done(tok_dir):
    tokenizer_job.train_and_evaluate(config, tok_dir)
    _check_trained(tok_dir, "tokenizer")
  with open(os.path.join(tok_dir, reconstruction.METRICS_FILE)) as f:
    metrics = json.load(f)
  if options.tokenizer_init:
    with open(os.path.join(tok_dir, reconstruction.INIT_METRICS_FILE)) as f:
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
  # No evaluators during training (the few-shot check costs 6 s a time): the representation stage measures the
  # features on all the data, the sampling stage draws the samples.
  config = fashion_mnist_tiny.get_config(f"steps={steps},{options.recipe()},monitor=False")
  _frequent_checkpoints(config, steps)
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
