"""The quickstart job behind `python -m mage_jax.quickstart --workdir=runs/quickstart` (what `make quickstart`
runs). Offline, on a 2-core CPU, in about 14 minutes (the budget is 20):

  1. Fashion-MNIST: a prepared TFDS copy, else built from Debian's `dataset-fashion-mnist` files, else a TFDS
     download when the network answers, else a message saying how to get it;
  2. trains the tiny VQGAN tokenizer (32x32 images -> 8x8 tokens) and writes a reconstruction PNG;
  3. pretrains tiny MAGE on the tokens;
  4. samples a grid PNG with iterative decoding;
  5. linear probe and 10-shot evaluation of the MAGE features beside the same classifiers on raw pixels;
  6. FID of samples against the test split (when the FID Inception weights are set up);
  7. prints and saves a results table (results.md, results.json).

Each stage's output is its completion marker, recorded in `stages.json` with what produced it (the budget, the
data and the stages before it): re-running the same command continues where it stopped (the training stages
resume from their checkpoints), and a stage whose inputs changed (another budget, other data) is redone.
`--budget=ci` shrinks every stage (the test suite runs it).
"""

from __future__ import annotations

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

BUDGETS = {
    # tokenizer steps, MAGE steps, samples for FID (and for the test-split reference), eval args. 'full' ran in
    # 13.9 min on the idle 2-core CPU (tokenizer 339 s, MAGE 325 s, sampling 31 s, probes 44 s, FID 92 s); the
    # tokenizer stops at 3,000 of its recipe's 4,000 steps to leave the 20-minute budget some margin.
    "full": dict(tokenizer_steps=3000, mage_steps=1200, fid_samples=500, grid=64, sample_steps=12,
                 eval_arg="train=10000,test=2000,epochs=10"),
    "ci": dict(tokenizer_steps=30, mage_steps=30, fid_samples=16, grid=16, sample_steps=4,
               eval_arg="train=300,test=200,epochs=1,batch=64"),
}
PAPER = {"MAGE ViT-B ImageNet: FID": "11.1", "MAGE ViT-B ImageNet: linear probe": "74.7%",
         "MAGE-C ViT-L ImageNet: 10-shot": "71.9%"}


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
          "it.") from None
  sources.load_arrays("fashion_mnist", "test", data_dir, download=True)


def _params_done(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "params", "mage_jax.json"))


def train_tokenizer(workdir: str, budget: dict, data_dir) -> dict:
  from configs import tokenizer_fashion_mnist
  from mage_jax.jobs import tokenizer as tokenizer_job
  tok_dir = os.path.join(workdir, "tokenizer")
  steps = budget["tokenizer_steps"]
  config = tokenizer_fashion_mnist.get_config(f"steps={steps},eval_every={max(steps // 3, 1)}")
  config.input.data_dir = data_dir
  if not _params_done(tok_dir):
    tokenizer_job.train_and_evaluate(config, tok_dir)
  with open(os.path.join(tok_dir, tokenizer_job.METRICS_FILE)) as f:
    metrics = json.load(f)
  pngs = sorted(os.listdir(os.path.join(tok_dir, "reconstructions")))
  shutil.copy(os.path.join(tok_dir, "reconstructions", pngs[-1]), os.path.join(workdir, "reconstructions.png"))
  return metrics


def pretrain_mage(workdir: str, budget: dict, data_dir) -> dict:
  from configs import fashion_mnist_tiny
  from mage_jax.jobs import pretrain
  mage_dir = os.path.join(workdir, "mage")
  config = fashion_mnist_tiny.get_config(f"steps={budget['mage_steps']}")
  config.input.data_dir = data_dir
  config.tokenizer.init = os.path.join(workdir, "tokenizer", "params")
  summary_path = os.path.join(mage_dir, "train_summary.json")
  if not _params_done(mage_dir):
    start = time.time()
    metrics = pretrain.train_and_evaluate(config, mage_dir)
    with open(summary_path, "w") as f:
      json.dump({**metrics, "steps": budget["mage_steps"], "seconds": time.time() - start}, f, indent=2)
  with open(summary_path) as f:
    return json.load(f)


def sample(workdir: str, budget: dict) -> dict:
  from mage_jax import images, params_io, sampling
  out = os.path.join(workdir, "samples.npz")
  if not os.path.exists(out):
    variables, meta = params_io.load(os.path.join(workdir, "mage", "params"))
    model, tokenizer = params_io.models_from_meta(meta)
    num = max(budget["fid_samples"], budget["grid"])
    batch = 8 * max(1, min(64, num // 8)) if jax.device_count() <= 8 else jax.device_count()
    start, chunks = time.time(), []
    for chunk in sampling.generate_images(model, tokenizer, variables, jax.random.key(0), num_images=num,
                                          batch_size=batch, num_steps=budget["sample_steps"], temperature=4.5):
      chunks.append(chunk)
    seconds = time.time() - start
    samples = np.concatenate(chunks)[:num]
    images.save_png(os.path.join(workdir, "samples_grid.png"), images.make_grid(samples[: budget["grid"]], 8))
    np.savez(out + ".tmp.npz", images=samples, seconds=seconds)
    os.replace(out + ".tmp.npz", out)
  with np.load(out) as z:
    return {"num_samples": int(len(z["images"])), "images_per_sec": float(len(z["images"]) / z["seconds"])}


def evaluate_representations(workdir: str, budget: dict, data_dir) -> dict:
  from configs import eval_fashion_mnist
  from mage_jax.jobs import evaluate
  eval_dir = os.path.join(workdir, "eval")
  path = os.path.join(eval_dir, "results.json")
  if not os.path.exists(path):
    config = eval_fashion_mnist.get_config(budget["eval_arg"])
    config.input.data_dir = data_dir
    evaluate.run(config, os.path.join(workdir, "mage", "params"), eval_dir)
  with open(path) as f:
    return json.load(f)["results"]


def compute_fid(workdir: str, budget: dict, data_dir) -> dict:
  from mage_jax.fid import inputs, weights
  path = os.path.join(workdir, "fid.json")
  if not os.path.exists(path):
    try:
      weights.default_weights_path()
    except FileNotFoundError as e:
      return {"fid": None, "note": str(e)}
    summary = inputs.compute(os.path.join(workdir, "samples.npz"), "fashion_mnist:test",
                             max_images=budget["fid_samples"], data_dir=data_dir)
    with open(path + ".tmp", "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
  with open(path) as f:
    return json.load(f)


def _pct(x) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _fewshot_10(results: dict, classifier="ridge"):
  shot = results.get("fewshot", {}).get(classifier, {}).get("10")
  return shot["mean"] if isinstance(shot, dict) else None


def results_table(results: dict) -> str:
  tok, mage, gen, rep, fid = (results[k] for k in ("tokenizer", "mage", "samples", "representations", "fid"))
  rows = [
      ("tokenizer PSNR on test (dB)", f"{tok['psnr']:.2f}"),
      ("tokenizer SSIM on test", f"{tok['ssim']:.3f}"),
      ("tokenizer codebook usage", _pct(tok["codebook_usage"])),
      ("tokenizer codebook perplexity", f"{tok['codebook_perplexity']:.1f}"),
      ("MAGE final training loss", f"{mage['loss']:.3f}"),
      ("MAGE training steps/s", f"{mage['steps'] / mage['seconds']:.2f}"),
      ("generation images/s", f"{gen['images_per_sec']:.1f}"),
  ]
  for name in ("mage", "pixels"):
    r = rep.get(name, {})
    rows.append((f"linear probe top-1, {name}", _pct(r.get("linear_probe", {}).get("top1"))))
    rows.append((f"10-shot top-1 (ridge), {name}", _pct(_fewshot_10(r))))
  fid_value = fid.get("fid")
  rows.append((f"FID vs test split ({fid.get('num_images', 0)} samples)",
               f"{fid_value:.2f}" if fid_value is not None else "n/a (FID weights not set up)"))
  rows.append(("wall time of this invocation (min)", f"{results['seconds'] / 60:.1f}"))
  lines = ["| quantity (Fashion-MNIST, this run) | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in rows]
  lines += ["", "| paper (ImageNet 256, for scale) | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in PAPER.items()]
  return "\n".join(lines)


# Stage name -> the paths under the workdir it writes (what a redo removes).
STAGE_OUTPUTS = {
    "tokenizer": ("tokenizer", "reconstructions.png"),
    "mage": ("mage",),
    "samples": ("samples.npz", "samples_grid.png"),
    "representations": ("eval",),
    "fid": ("fid.json",),
}
STAGES_FILE = "stages.json"


class StageRecords:
  """`stages.json`: for each finished stage, a hash of what produced it (budget, data, the stages before it).

  A stage whose recorded hash differs from the current one is redone after removing its outputs; outputs that
  exist without a record were not written by the quickstart, and are refused rather than touched.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, STAGES_FILE)
    self.workdir = workdir
    self.records = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.records = json.load(f)

  def prepare(self, stage: str, identity: str) -> None:
    if self.records.get(stage) == identity:
      return
    present = [p for p in STAGE_OUTPUTS[stage] if os.path.exists(os.path.join(self.workdir, p))]
    if present and stage not in self.records:
      raise ValueError(f"{self.workdir} holds {', '.join(present)} not written by the quickstart; use another "
                       "--workdir")
    for p in present:
      logging.warning("quickstart: redoing stage %s (its inputs changed): removing %s", stage, p)
      path = os.path.join(self.workdir, p)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    self.records.pop(stage, None)
    self._write()

  def finish(self, stage: str, identity: str) -> None:
    self.records[stage] = identity
    self._write()

  def _write(self):
    with open(self.path + ".tmp", "w") as f:
      json.dump(self.records, f, indent=1)
    os.replace(self.path + ".tmp", self.path)


def run(workdir: str, budget_name: str, data_dir: str | None) -> dict:
  """Runs (or continues) every stage in `workdir`; writes and returns the results (with the table)."""
  if budget_name not in BUDGETS:
    raise ValueError(f"unknown budget {budget_name!r}; expected one of {sorted(BUDGETS)}")
  budget = BUDGETS[budget_name]
  os.makedirs(workdir, exist_ok=True)
  records = StageRecords(workdir)
  start = time.time()
  results = {"budget": budget_name, "data_dir": data_dir, "device": jax.devices()[0].device_kind,
             "stage_seconds": {}}
  identity = hashlib.sha256(json.dumps({"budget": budget, "data_dir": data_dir}, sort_keys=True).encode())

  def run_stage(title, key, fn, *fn_args):
    _stage(title)
    stage_start = time.time()
    if key in STAGE_OUTPUTS:
      identity.update(key.encode())  # each stage's identity covers the stages before it
      records.prepare(key, identity.hexdigest())
    value = fn(*fn_args)
    if key in STAGE_OUTPUTS:
      records.finish(key, identity.hexdigest())
    results["stage_seconds"][key] = round(time.time() - stage_start, 1)
    if value is not None:
      results[key] = value

  run_stage("1/6 data: Fashion-MNIST", "data", ensure_fashion_mnist, data_dir)
  run_stage("2/6 tokenizer training", "tokenizer", train_tokenizer, workdir, budget, data_dir)
  run_stage("3/6 MAGE pretraining", "mage", pretrain_mage, workdir, budget, data_dir)
  run_stage("4/6 sampling", "samples", sample, workdir, budget)
  run_stage("5/6 linear probe and few-shot vs raw pixels", "representations", evaluate_representations, workdir,
            budget, data_dir)
  run_stage("6/6 FID", "fid", compute_fid, workdir, budget, data_dir)
  results["seconds"] = time.time() - start
  results["table"] = results_table(results)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results["table"] + "\n")
  return results
