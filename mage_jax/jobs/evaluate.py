"""Representation evals of a MAGE checkpoint: linear probe, few-shot, fine-tuning (protocols: docs/evals.md).

The job behind `python -m mage_jax.evaluate`. The params directory is a params-only checkpoint (a MAGE
pretraining export or `python -m mage_jax.convert mage-vitb-1600.pth DIR`). `config.evals` picks the evals:
'logistic' (a converged logistic regression on all the features, `logistic_probe`), 'linear_probe' (the
paper's LARS probe), 'fewshot', 'finetune'. Controls, reported side by side with the same classifiers:
`config.baseline_pixels=True` adds raw pixels (the flattened eval-transformed image; one channel of a grayscale
dataset, whose three are copies: the same information at a third of the probe's cost); `config.baseline_random=True`
adds 'random_proj' (the pixels through a fixed Gaussian projection to the backbone's width) and 'random_init'
(the same encoder at its random initialisation, behind the same tokenizer): what pretraining adds.
Re-running the same command resumes: the linear probe and fine-tuning continue from their per-epoch
checkpoints, features come from the npz cache in WD/features.

Writes (process 0) WD/results.json {'params', 'config', 'results': {features: {eval: ...}}, 'seconds'} and
prints a table. Layout of WD: features/<set>_<split>.npz, linear_probe/<set>/ (checkpoints, history, and
for MAGE features the probe as a 'vit' params export in params/), finetune/ (trainer workdir).
"""

from __future__ import annotations

import functools
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mage_jax import atomic, checkpointing, config_views, fewshot, logistic_probe, probe, sharding
from mage_jax.jobs import linear_probe
from mage_jax.models.vit import MAGEViT
from mage_jax.models.vqgan import VQGAN

EVALS = ("logistic", "linear_probe", "fewshot", "finetune")
FEATURE_EVALS = ("logistic", "linear_probe", "fewshot")
CONTROL_SEED = 1234  # the random projection and the random initialisation


def _input_cfg(config: ml_collections.ConfigDict, split: str, batch_size: int, image_size: int,
               augment: str = "none") -> dict:
  """`config.input` for one split, batch and augmentation at the checkpoint's resolution."""
  return {**config.input.to_dict(), "split": split, "batch_size": batch_size, "image_size": image_size,
          "augment": augment}


def _split_tag(split: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_")


class FeatureSet:
  """One kind of features (the MAGE backbone, or raw pixels) with per-split caching.

  With `parent` (a set whose features hold these as `columns`), a split's features are sliced from the
  parent's: several encoders behind one tokenizer pass (`feature_sets`).
  """

  def __init__(self, name: str, feature_fn, variables, shardings, *, dim: int, cache_key: dict | None,
               parent: "FeatureSet | None" = None, columns: slice | None = None):
    self.name, self.feature_fn, self.variables, self.shardings = name, feature_fn, variables, shardings
    self.dim, self.cache_key, self.parent, self.columns = dim, cache_key, parent, columns
    self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def features(self, split: str, config, image_size: int, mesh, workdir: str):
    if split in self._memo:
      return self._memo[split]
    cfg = _input_cfg(config, split, config.input.batch_size, image_size)
    path = None
    key = ""
    if self.cache_key is not None and config.features.cache:
      path = os.path.join(workdir, "features", f"{self.name}_{_split_tag(split)}.npz")
      key = probe.fingerprint(**self.cache_key, input=cfg)
    t0 = time.time()

    def compute():
      if self.parent is not None:
        feats, labels = self.parent.features(split, config, image_size, mesh, workdir)
        return np.ascontiguousarray(feats[:, self.columns]), labels
      return probe.extract_features(self.feature_fn, self.variables, self.shardings, cfg, mesh=mesh)

    out = probe.cached(path, key, compute)
    logging.info("%s features of %s: %s in %.1f s", self.name, split, out[0].shape, time.time() - t0)
    self._memo[split] = out
    return out


def feature_sets(config, params_dir: str, mesh, rules) -> tuple[list[FeatureSet], probe.Backbone]:
  backbone = probe.load_backbone(params_dir, global_pool=config.global_pool, dtype=config_views.dtype(config.dtype),
                                 image_size=config.input.image_size or None)
  shardings = probe.backbone_shardings(backbone, mesh, rules)
  with jax.set_mesh(mesh):
    variables = sharding.place(backbone.variables, shardings)
  key = {**probe.params_identity(params_dir), "global_pool": config.global_pool, "dtype": config.dtype}
  mage = FeatureSet("mage", backbone.feature_fn(), variables, shardings, dim=backbone.dim, cache_key=key)
  sets = [mage]
  side, channels = backbone.image_size, _pixel_channels(config)
  pixel_fn = functools.partial(probe.pixel_feature_fn, channels=channels)
  if config.baseline_pixels:
    sets.append(FeatureSet("pixels", pixel_fn, {}, {}, dim=side * side * channels, cache_key=None))
  if config.get("baseline_random", False):
    sets += control_sets(backbone, mage, mesh, pixel_fn, channels)
  return sets, backbone


def _pixel_channels(config) -> int:
  from mage_jax.data import sources  # pylint: disable=g-import-not-at-top  (TensorFlow: not for --help)
  return 1 if config.input.name in sources.GRAYSCALE_TFDS else 3


def control_sets(backbone: probe.Backbone, mage: FeatureSet, mesh, pixel_fn, channels: int) -> list[FeatureSet]:
  """'random_proj': pixels [P] @ R [P, D] / √P with R ~ N(0, 1) seeded; 'random_init': the backbone's encoder
  at a fresh initialisation (the laws training starts from), behind the trained tokenizer. D = backbone width.

  The random encoder and MAGE's share one pass of the tokenizer over each split (`mage` becomes a column slice
  of their joint features): the tokenizer is most of the cost of a feature pass.
  """
  side, dim = backbone.image_size, backbone.dim
  pixels = side * side * channels
  projection = np.random.default_rng(CONTROL_SEED).standard_normal((pixels, dim)).astype(np.float32)
  projection /= np.sqrt(pixels)
  repl = sharding.replicated(mesh)

  def projected(v, images, rng, deterministic):
    return pixel_fn({}, images, rng, deterministic) @ v["projection"]

  ids = jnp.zeros((1, backbone.vit.config.num_tokens), jnp.int32)
  fresh = nn.unbox(jax.jit(backbone.vit.init)(jax.random.key(CONTROL_SEED), ids))
  trained = mage.variables["vit"]["params"]
  fresh_params = jax.tree.map(lambda _, x: x, trained, probe._match(fresh["params"], trained))  # pylint: disable=protected-access
  vit_shardings = mage.shardings["vit"]
  with jax.set_mesh(mesh):
    joint_vars = {**mage.variables, "vit_random": {"params": sharding.place(fresh_params, vit_shardings["params"])}}
    proj_vars = {"projection": sharding.place(projection, repl)}
  tokenizer, vit = backbone.tokenizer, backbone.vit

  def both(v, images, rng, deterministic):
    ids = tokenizer.apply(v["tokenizer"], images, method=VQGAN.encode_to_ids)
    feats = [vit.apply(v[name], ids, True, method=MAGEViT.features)[0] for name in ("vit", "vit_random")]
    return jax.lax.stop_gradient(jnp.concatenate(feats, axis=-1).astype(jnp.float32))

  joint = FeatureSet("mage_and_random_init", both, joint_vars, {**mage.shardings, "vit_random": vit_shardings},
                     dim=2 * dim, cache_key=None)
  mage.parent, mage.columns = joint, slice(0, dim)
  random_vars = {"tokenizer": mage.variables["tokenizer"], "vit": joint_vars["vit_random"]}
  return [FeatureSet("random_proj", projected, proj_vars, {"projection": repl}, dim=dim, cache_key=None),
          FeatureSet("random_init", backbone.feature_fn(), random_vars,
                     {"tokenizer": mage.shardings["tokenizer"], "vit": vit_shardings}, dim=dim, cache_key=None,
                     parent=joint, columns=slice(dim, 2 * dim))]


def _probe_identity(config, params_dir: str, fs: FeatureSet, image_size: int) -> dict:
  """What a linear-probe workdir's checkpoints depend on: the features (model, data) and the recipe."""
  model = probe.params_identity(params_dir) if fs.name == "mage" else "raw pixels"
  return {"features": fs.name, "model": model, "input": _input_cfg(config, config.input.split, 0, image_size),
          "eval_split": config.eval_split, "linear_probe": config.linear_probe.to_dict(), "seed": config.seed}


def run_linear_probe(fs: FeatureSet, config, image_size: int, mesh, workdir: str, backbone=None) -> dict:
  lp = config.linear_probe.to_dict()
  stop = lp.pop("stop_after_epochs", 0) or None
  augment = lp.pop("augment")
  dropout = lp.pop("dropout")
  cfg = config_views.from_config(linear_probe.ProbeConfig, lp, "config.linear_probe",
                                 num_classes=config.num_classes, seed=config.seed)
  val_x, val_y = fs.features(config.eval_split, config, image_size, mesh, workdir)
  if augment == "none":
    train_x, train_y = fs.features(config.input.split, config, image_size, mesh, workdir)
    data = linear_probe.CachedFeatures(train_x, train_y)
  else:
    data = linear_probe.OnlineImages(_input_cfg(config, config.input.split, cfg.batch_size, image_size, augment),
                                     fs.feature_fn, fs.variables, fs.shardings, dropout=dropout)
  pw = os.path.join(workdir, "linear_probe", fs.name)
  results, _ = linear_probe.train_probe(data, val_x, val_y, cfg, workdir=pw, mesh=mesh, dim=fs.dim,
                                        stop_after_epochs=stop, export_dir=os.path.join(pw, "params"),
                                        backbone=backbone)
  results["protocol"] = ("official: augmented images through the backbone every step" if augment != "none"
                         else "cached features (eval transform, no augmentation, no dropout)")
  return results


def run_logistic(fs: FeatureSet, config, image_size: int, mesh, workdir: str) -> dict:
  train_x, train_y = fs.features(config.input.split, config, image_size, mesh, workdir)
  test_x, test_y = fs.features(config.eval_split, config, image_size, mesh, workdir)
  out = logistic_probe.evaluate(train_x, train_y, test_x, test_y, num_classes=config.num_classes, seed=config.seed)
  logging.info("%s logistic probe: top-1 %.4f (l2 %g, %d train examples, %.1f s)", fs.name, out["top1"], out["l2"],
               out["train_examples"], out["seconds"])
  return out


def run_fewshot(fs: FeatureSet, config, image_size: int, mesh, workdir: str) -> dict:
  f = config.fewshot
  train_x, train_y = fs.features(f.train_split or config.input.split, config, image_size, mesh, workdir)
  test_x, test_y = fs.features(config.eval_split, config, image_size, mesh, workdir)
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


def check_feasible(config: ml_collections.ConfigDict) -> None:
  """Refuses, before any work, evals whose splits cannot serve them (e.g. fewer examples than the shots need)."""
  from mage_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(config.evals) - set(EVALS))
  if unknown or not config.evals:
    raise ValueError(f"config.evals must name some of {EVALS}, got {tuple(config.evals)}")
  if set(FEATURE_EVALS) & set(config.evals):
    pipeline.num_examples(_input_cfg(config, config.eval_split, 1, 32))  # the split exists and can be read
  if "linear_probe" in config.evals:
    n = pipeline.num_examples(_input_cfg(config, config.input.split, 1, 32))
    if n < config.linear_probe.batch_size:
      raise ValueError(f"linear probe: batch_size {config.linear_probe.batch_size} is larger than the train "
                       f"split {config.input.split!r} ({n} examples)")
  if "fewshot" in config.evals:
    split = config.fewshot.train_split or config.input.split
    n = pipeline.num_examples(_input_cfg(config, split, 1, 32))
    need = max(config.fewshot.shots) * config.num_classes
    if n < need:
      raise ValueError(f"few-shot: {max(config.fewshot.shots)} shots of {config.num_classes} classes need at least "
                       f"{need} training examples, the split {split!r} has {n}")


def _write(workdir: str, out: dict) -> None:
  if jax.process_index() == 0:
    path = os.path.join(workdir, "results.json")
    atomic.write_json(path, out)


def run(config: ml_collections.ConfigDict, params_dir: str, workdir: str) -> dict:
  """Runs `config.evals` on `params_dir`; returns (and on process 0 writes, after each eval) the results dict.

  Linear-probe and fine-tuning workdirs are claimed for this model and config (`checkpointing.claim`), so a
  workdir left by another model or data slice is refused instead of resumed.
  """
  check_feasible(config)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  out = {"params": os.path.abspath(params_dir), "config": config.to_dict(), "results": {}, "seconds": {}}
  results, seconds = out["results"], out["seconds"]
  if set(FEATURE_EVALS) & set(config.evals):
    mesh, rules = sharding.mesh_from_config(config)
    sharding.check_batch_size(config.input.batch_size, mesh)
    sets, backbone = feature_sets(config, params_dir, mesh, rules)
    if "linear_probe" in config.evals:
      for fs in sets:
        checkpointing.claim(os.path.join(workdir, "linear_probe", fs.name),
                            _probe_identity(config, params_dir, fs, backbone.image_size))
    for fs in sets:
      results[fs.name] = {}
      for name, fn in (("logistic", run_logistic), ("linear_probe", run_linear_probe), ("fewshot", run_fewshot)):
        if name not in config.evals:
          continue
        t0 = time.time()
        kw = {"backbone": backbone} if name == "linear_probe" and fs.name == "mage" else {}
        results[fs.name][name] = fn(fs, config, backbone.image_size, mesh, workdir, **kw)
        seconds[f"{fs.name}/{name}"] = time.time() - t0
        _write(workdir, out)
  if "finetune" in config.evals:
    from mage_jax.jobs import finetune  # pylint: disable=g-import-not-at-top
    t0 = time.time()
    ft_dir = os.path.join(workdir, "finetune")
    checkpointing.claim(ft_dir, {"model": probe.params_identity(params_dir), "finetune": config.finetune.to_dict()})
    results.setdefault("mage", {})["finetune"] = finetune.run(config.finetune, params_dir, ft_dir)
    seconds["mage/finetune"] = time.time() - t0
  seconds["total"] = time.time() - t_start
  _write(workdir, out)
  return out


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def table_rows(results: dict) -> list[tuple[str, dict[str, str]]]:
  """[(metric name, {feature set: formatted value})] in a stable order."""
  rows: dict[str, dict[str, str]] = {}
  for fs, evals in results.items():
    if evals.get("logistic"):
      rows.setdefault("logistic probe top-1", {})[fs] = _pct(evals["logistic"]["top1"])
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
