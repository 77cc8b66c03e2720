"""Representation evals of a MAGE checkpoint: linear probe, few-shot, fine-tuning (spec §6.2-§6.4).

  python -m mage_jax.evaluate --params=DIR --config=configs/eval_fashion_mnist.py[:args] --workdir=WD \
      [--config.linear_probe.epochs=...]

DIR is a params-only checkpoint (a MAGE pretraining export or `python -m mage_jax.convert mage-vitb-1600.pth
DIR`). `config.evals` picks the evals; with `config.baseline_pixels=True` the linear probe and few-shot
classifiers are also run on raw pixels (the flattened eval-transformed image), reported side by side.
Re-running the same command resumes: the linear probe and fine-tuning continue from their per-epoch
checkpoints, features come from the npz cache in WD/features.

Writes (process 0) WD/results.json {'params', 'config', 'results': {features: {eval: ...}}, 'seconds'} and
prints a table. Layout of WD: features/<set>_<split>.npz, linear_probe/<set>/ (checkpoints, history, and
for MAGE features the probe as a 'vit' params export in params/), finetune/ (trainer workdir).
"""

from __future__ import annotations

import json
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mage_jax import fewshot, probe, runtime, sharding  # noqa: E402

EVALS = ("linear_probe", "fewshot", "finetune")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _input_cfg(data: ml_collections.ConfigDict, split: str, batch_size: int, image_size: int,
               augment: str = "none") -> dict:
  return dict(name=data.name, split=split, data_dir=data.data_dir, manual_dir=data.manual_dir,
              batch_size=batch_size, image_size=image_size, augment=augment, interpolation=data.interpolation,
              crop_ratio=data.crop_ratio, eval_interpolation=data.eval_interpolation,
              num_workers=data.num_workers, download=data.download, scale=tuple(data.probe_scale))


def _split_tag(split: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_")


class FeatureSet:
  """One kind of features (the MAGE backbone, or raw pixels) with per-split caching."""

  def __init__(self, name: str, feature_fn, variables, shardings, *, dim: int, cache_key: dict | None):
    self.name, self.feature_fn, self.variables, self.shardings = name, feature_fn, variables, shardings
    self.dim, self.cache_key = dim, cache_key
    self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def features(self, split: str, config, image_size: int, mesh, workdir: str):
    if split in self._memo:
      return self._memo[split]
    cfg = _input_cfg(config.data, split, config.features.batch_size, image_size)
    path = None
    key = ""
    if self.cache_key is not None and config.features.cache:
      path = os.path.join(workdir, "features", f"{self.name}_{_split_tag(split)}.npz")
      key = probe.fingerprint(**self.cache_key, input=cfg)
    t0 = time.time()
    out = probe.cached(path, key, lambda: probe.extract_features(self.feature_fn, self.variables, self.shardings,
                                                                 cfg, mesh=mesh))
    logging.info("%s features of %s: %s in %.1f s", self.name, split, out[0].shape, time.time() - t0)
    self._memo[split] = out
    return out


def feature_sets(config, params_dir: str, mesh, rules) -> tuple[list[FeatureSet], probe.Backbone]:
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
  backbone = probe.load_backbone(params_dir, global_pool=config.global_pool, dtype=DTYPES[config.dtype],
                                 image_size=config.data.image_size or None)
  shardings = probe.backbone_shardings(backbone, mesh, rules)
  with jax.set_mesh(mesh):
    variables = probe.place(backbone.variables, shardings)
  key = {**probe.params_identity(params_dir), "global_pool": config.global_pool, "dtype": config.dtype}
  sets = [FeatureSet("mage", backbone.feature_fn(), variables, shardings, dim=backbone.dim, cache_key=key)]
  if config.baseline_pixels:
    side = backbone.image_size
    sets.append(FeatureSet("pixels", probe.pixel_feature_fn, {}, {}, dim=side * side * 3, cache_key=None))
  return sets, backbone


def run_linear_probe(fs: FeatureSet, config, image_size: int, mesh, workdir: str, backbone=None) -> dict:
  lp = config.linear_probe.to_dict()
  stop = lp.pop("stop_after_epochs", 0) or None
  augment = lp.pop("augment")
  dropout = lp.pop("dropout")
  cfg = probe.ProbeConfig.from_config(lp, num_classes=config.num_classes, seed=config.seed)
  val_x, val_y = fs.features(config.data.test_split, config, image_size, mesh, workdir)
  if augment == "none":
    train_x, train_y = fs.features(config.data.train_split, config, image_size, mesh, workdir)
    data = probe.CachedFeatures(train_x, train_y)
  else:
    data = probe.OnlineImages(_input_cfg(config.data, config.data.train_split, cfg.batch_size, image_size,
                                         augment), fs.feature_fn, fs.variables, fs.shardings, dropout=dropout)
  pw = os.path.join(workdir, "linear_probe", fs.name)
  results, state = probe.train_probe(data, val_x, val_y, cfg, workdir=pw, mesh=mesh, dim=fs.dim,
                                     stop_after_epochs=stop)
  if backbone is not None and results["completed"]:
    probe.export_probe(os.path.join(pw, "params"), backbone, state, config.num_classes)
  results["protocol"] = ("official: augmented images through the backbone every step" if augment != "none"
                         else "cached features (eval transform, no augmentation, no dropout)")
  return results


def run_fewshot(fs: FeatureSet, config, image_size: int, mesh, workdir: str) -> dict:
  f = config.fewshot
  train_x, train_y = fs.features(f.train_split or config.data.train_split, config, image_size, mesh, workdir)
  test_x, test_y = fs.features(config.data.test_split, config, image_size, mesh, workdir)
  out = {}
  for classifier in f.classifiers:
    t0 = time.time()
    reg = f.get(f"l2_{classifier}", -1.0)
    accs = fewshot.evaluate_fewshot(train_x, train_y, test_x, test_y, shots=tuple(f.shots), trials=f.trials,
                                    seed=config.seed, classifier=classifier,
                                    l2_reg=None if reg is None or reg < 0 else reg,
                                    num_classes=config.num_classes)
    out[classifier] = {str(s): {"mean": m, "std": sd} for s, (m, sd) in accs.items()}
    out[classifier]["seconds"] = time.time() - t0
  out["trials"] = f.trials
  return out


def run(config: ml_collections.ConfigDict, params_dir: str, workdir: str) -> dict:
  """Runs `config.evals` on `params_dir`; returns (and on process 0 writes) the results dict."""
  unknown = sorted(set(config.evals) - set(EVALS))
  if unknown or not config.evals:
    raise ValueError(f"config.evals must name some of {EVALS}, got {tuple(config.evals)}")
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  results: dict = {}
  seconds: dict = {}
  if {"linear_probe", "fewshot"} & set(config.evals):
    mesh = sharding.create_mesh([tuple(x) for x in config.mesh])
    rules = (tuple(tuple(r) for r in config.sharding_rules) if config.get("sharding_rules")
             else sharding.DEFAULT_RULES)
    sharding.check_batch_size(config.features.batch_size, mesh)
    sets, backbone = feature_sets(config, params_dir, mesh, rules)
    for fs in sets:
      results[fs.name] = {}
      for name, fn in (("linear_probe", run_linear_probe), ("fewshot", run_fewshot)):
        if name not in config.evals:
          continue
        t0 = time.time()
        kw = {"backbone": backbone} if name == "linear_probe" and fs.name == "mage" else {}
        results[fs.name][name] = fn(fs, config, backbone.image_size, mesh, workdir, **kw)
        seconds[f"{fs.name}/{name}"] = time.time() - t0
  if "finetune" in config.evals:
    from mage_jax import finetune  # pylint: disable=g-import-not-at-top
    t0 = time.time()
    results.setdefault("mage", {})["finetune"] = finetune.finetune(config.finetune, params_dir,
                                                                   os.path.join(workdir, "finetune"))
    seconds["mage/finetune"] = time.time() - t0
  seconds["total"] = time.time() - t_start
  out = {"params": os.path.abspath(params_dir), "config": config.to_dict(), "results": results,
         "seconds": seconds}
  if jax.process_index() == 0:
    path = os.path.join(workdir, "results.json")
    with open(path + ".tmp", "w") as f:
      json.dump(out, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
  return out


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def table_rows(results: dict) -> list[tuple[str, dict[str, str]]]:
  """[(metric name, {feature set: formatted value})] in a stable order."""
  rows: dict[str, dict[str, str]] = {}
  for fs, evals in results.items():
    lp = evals.get("linear_probe")
    if lp:
      suffix = "" if lp["completed"] else f" (stopped at epoch {lp['epochs_done']})"
      rows.setdefault("linear probe top-1", {})[fs] = _pct(lp["top1"]) + suffix
      rows.setdefault("linear probe top-5", {})[fs] = _pct(lp["top5"])
      rows.setdefault("linear probe best top-1", {})[fs] = _pct(lp["best_top1"])
    for classifier, per_shot in (evals.get("fewshot") or {}).items():
      if not isinstance(per_shot, dict):
        continue
      for shot, v in per_shot.items():
        if isinstance(v, dict):
          rows.setdefault(f"{shot}-shot {classifier}", {})[fs] = f"{_pct(v['mean'])} ± {_pct(v['std'])}"
    ft = evals.get("finetune")
    if ft:
      rows.setdefault("fine-tune top-1", {})[fs] = _pct(ft["top1"])
      rows.setdefault("fine-tune best top-1", {})[fs] = _pct(ft["best_top1"])
  return list(rows.items())


def format_table(results: dict) -> str:
  """Accuracies in %, one column per feature set (e.g. mage | pixels)."""
  sets = list(results)
  rows = table_rows(results)
  width = max([len(r) for r, _ in rows] + [10])
  col = max([len(v) for _, vals in rows for v in vals.values()] + [len(s) for s in sets] + [8])
  lines = [f"{'accuracy (%)':{width}s}  " + "  ".join(f"{s:>{col}s}" for s in sets)]
  for name, vals in rows:
    lines.append(f"{name:{width}s}  " + "  ".join(f"{vals.get(s, '-'):>{col}s}" for s in sets))
  return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config (python file[:args]).", lock_config=True)
_PARAMS = flags.DEFINE_string("params", None, "Params-only checkpoint directory to evaluate.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (results.json, caches, checkpoints).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("config", "params", "workdir"):
    if flags.FLAGS[name].value is None:
      raise app.UsageError(f"--{name} is required")
  runtime.quiet_orbax_logs()
  runtime.initialize_distributed()  # TPU pods / SLURM: auto-detected
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX
  out = run(_CONFIG.value, _PARAMS.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(format_table(out["results"]))
    print(f"results written to {os.path.join(_WORKDIR.value, 'results.json')} "
          f"({out['seconds']['total']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
