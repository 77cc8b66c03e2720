"""Representation evals of a MAGE checkpoint (protocols: docs/evals.md): the job behind `python -m mage_jax.evaluate`.

The params directory is a params-only checkpoint (a MAGE pretraining export or `python -m mage_jax.convert
mage-vitb-1600.pth DIR`). `config.evals` names the evaluators (`mage_jax/evals/`: 'logistic', 'linear_probe',
'fewshot', 'finetune', or a module of your own); this job builds the feature sets they run on and prints what
they return. Controls, reported side by side with the same evaluators: `config.baseline_pixels=True` adds raw
pixels (the flattened eval-transformed image; one channel of a grayscale dataset, whose three are copies: the
same information at a third of the probe's cost); `config.baseline_random=True` adds 'random_proj' (the pixels
through a fixed Gaussian projection to the backbone's width) and 'random_init' (the same encoder at its random
initialisation, behind the same tokenizer): what pretraining adds. Re-running the same command resumes: the
linear probe and fine-tuning continue from their per-epoch checkpoints, features come from the npz cache in
WD/features.

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

from mage_jax import evals
from mage_jax.evals import probe
from mage_jax.models.vit import MAGEViT
from mage_jax.system import atomic
from mage_jax.train import config_views, sharding

CONTROL_SEED = 1234  # the random projection and the random initialisation


def _split_tag(split: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_")


class FeatureSet:
  """One kind of features (the MAGE backbone, or raw pixels) with per-split caching.

  With `parent` (a set whose features hold these as `columns`), a split's features are sliced from the
  parent's: several encoders behind one tokenizer pass (`feature_sets`).
  """

  def __init__(
    self,
    name: str,
    feature_fn,
    variables,
    shardings,
    *,
    dim: int,
    cache_key: dict | None,
    parent: "FeatureSet | None" = None,
    columns: slice | None = None,
  ):
    self.name, self.feature_fn, self.variables, self.shardings = name, feature_fn, variables, shardings
    self.dim, self.cache_key, self.parent, self.columns = dim, cache_key, parent, columns
    self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def features(self, split: str, config, image_size: int, mesh, workdir: str):
    if split in self._memo:
      return self._memo[split]
    cfg = evals.input_config(config, split, config.input.batch_size, image_size)
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
  backbone = probe.load_backbone(
    params_dir,
    global_pool=config.global_pool,
    dtype=config_views.dtype(config.dtype),
    image_size=config.input.image_size or None,
  )
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
    ids = tokenizer.apply(v["tokenizer"], images, method="encode_to_ids")
    feats = [vit.apply(v[name], ids, True, method=MAGEViT.features)[0] for name in ("vit", "vit_random")]
    return jax.lax.stop_gradient(jnp.concatenate(feats, axis=-1).astype(jnp.float32))

  joint = FeatureSet(
    "mage_and_random_init",
    both,
    joint_vars,
    {**mage.shardings, "vit_random": vit_shardings},
    dim=2 * dim,
    cache_key=None,
  )
  mage.parent, mage.columns = joint, slice(0, dim)
  random_vars = {"tokenizer": mage.variables["tokenizer"], "vit": joint_vars["vit_random"]}
  return [
    FeatureSet("random_proj", projected, proj_vars, {"projection": repl}, dim=dim, cache_key=None),
    FeatureSet(
      "random_init",
      backbone.feature_fn(),
      random_vars,
      {"tokenizer": mage.shardings["tokenizer"], "vit": vit_shardings},
      dim=dim,
      cache_key=None,
      parent=joint,
      columns=slice(dim, 2 * dim),
    ),
  ]


def evaluators(config: ml_collections.ConfigDict) -> list[tuple[str, object]]:
  """(name, module) of each of `config.evals`, after each one's feasibility check: refusals come before any work."""
  names = tuple(config.evals)
  if not names or len(set(names)) != len(names):
    raise ValueError(
      f"config.evals must name evaluators once each (built in: {', '.join(evals.builtin())}), got {names}"
    )
  chosen = [(name, evals.load(name)) for name in names]
  if any(ev.FEATURES for _, ev in chosen):
    evals.split_size(config, config.eval_split)  # the split exists and can be read
  for _, ev in chosen:
    if hasattr(ev, "check"):
      ev.check(config)
  return chosen


def _write(workdir: str, out: dict) -> None:
  if jax.process_index() == 0:
    path = os.path.join(workdir, "results.json")
    atomic.write_json(path, out)


def run(config: ml_collections.ConfigDict, params_dir: str, workdir: str) -> dict:
  """Runs `config.evals` on `params_dir`; returns (and on process 0 writes, after each eval) the results dict."""
  chosen = evaluators(config)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  out = {"params": os.path.abspath(params_dir), "config": config.to_dict(), "results": {}, "seconds": {}}
  results, seconds = out["results"], out["seconds"]

  def record(set_name: str, name: str, ev, context, fs) -> None:
    t0 = time.time()
    results.setdefault(set_name, {})[name] = ev.run(context, fs)
    seconds[f"{set_name}/{name}"] = time.time() - t0
    _write(workdir, out)

  on_features = [(name, ev) for name, ev in chosen if ev.FEATURES]
  if on_features:
    mesh, rules = sharding.mesh_from_config(config)
    sharding.check_batch_size(config.input.batch_size, mesh)
    sets, backbone = feature_sets(config, params_dir, mesh, rules)
    context = evals.Context(config, params_dir, workdir, backbone.image_size, mesh, backbone)
    for _, ev in on_features:
      if hasattr(ev, "start"):
        ev.start(context, sets)
    for fs in sets:
      for name, ev in on_features:
        record(fs.name, name, ev, context, fs)
  on_params = evals.Context(config, params_dir, workdir)
  for name, ev in chosen:
    if not ev.FEATURES:
      record("mage", name, ev, on_params, None)
  seconds["total"] = time.time() - t_start
  _write(workdir, out)
  return out


def table_rows(results: dict) -> list[tuple[str, dict[str, str]]]:
  """[(metric name, {feature set: formatted value})]: each evaluator's `rows`, in the order they first appear."""
  rows: dict[str, dict[str, str]] = {}
  for fs, per_eval in results.items():
    for name, result in per_eval.items():
      if result:
        for metric, text in evals.load(name).rows(result):
          rows.setdefault(metric, {})[fs] = text
  return list(rows.items())


def format_table(results: dict) -> str:
  """Each evaluator's rows (accuracies in %), one column per feature set (e.g. mage | pixels)."""
  sets = list(results)
  rows = table_rows(results)
  header = "metric (accuracies in %)"
  width = max([len(r) for r, _ in rows] + [len(header)])
  col = max([len(v) for _, vals in rows for v in vals.values()] + [len(s) for s in sets] + [8])
  lines = [f"{header:{width}s}  " + "  ".join(f"{s:>{col}s}" for s in sets)]
  for name, vals in rows:
    lines.append(f"{name:{width}s}  " + "  ".join(f"{vals.get(s, '-'):>{col}s}" for s in sets))
  return "\n".join(lines)
