"""The paper's linear probe: BatchNorm without affine, then a linear head trained with LARS (`jobs/linear_probe`),
on cached features of the eval transform, or (`config.linear_probe.augment` != 'none') on augmented images through
the frozen backbone every step, as the official code does. Resumes from its per-epoch checkpoints."""

from __future__ import annotations

import os

from mage_jax.evals import pct, probe, split_size
from mage_jax.train import checkpointing, config_views

FEATURES = True


def check(config) -> None:
  n = split_size(config, config.input.split)
  if n < config.linear_probe.batch_size:
    raise ValueError(
      f"linear probe: batch_size {config.linear_probe.batch_size} is larger than the train "
      f"split {config.input.split!r} ({n} examples)"
    )


def _workdir(context, features) -> str:
  return os.path.join(context.workdir, "linear_probe", features.name)


def start(context, sets) -> None:
  """Claims each set's probe workdir for this model and recipe before any feature is computed: a workdir left by
  another model or data slice is refused, not resumed."""
  config = context.config
  for fs in sets:
    model = probe.params_identity(context.params_dir) if fs.name == "mage" else "raw pixels"
    checkpointing.claim(
      _workdir(context, fs),
      {
        "features": fs.name,
        "model": model,
        "input": context.input_config(config.input.split, 0),
        "eval_split": config.eval_split,
        "linear_probe": config.linear_probe.to_dict(),
        "seed": config.seed,
      },
    )


def run(context, features) -> dict:
  from mage_jax.jobs import linear_probe  # pylint: disable=g-import-not-at-top

  config = context.config
  lp = config.linear_probe.to_dict()
  stop = lp.pop("stop_after_epochs", 0) or None
  augment = lp.pop("augment")
  dropout = lp.pop("dropout")
  cfg = config_views.from_config(
    linear_probe.ProbeConfig, lp, "config.linear_probe", num_classes=config.num_classes, seed=config.seed
  )
  val_x, val_y = context.features(features, config.eval_split)
  if augment == "none":
    data = linear_probe.CachedFeatures(*context.features(features, config.input.split))
  else:
    data = linear_probe.OnlineImages(
      context.input_config(config.input.split, cfg.batch_size, augment),
      features.feature_fn,
      features.variables,
      features.shardings,
      dropout=dropout,
    )
  workdir = _workdir(context, features)
  results, _ = linear_probe.train_probe(
    data,
    val_x,
    val_y,
    cfg,
    workdir=workdir,
    mesh=context.mesh,
    dim=features.dim,
    stop_after_epochs=stop,
    export_dir=os.path.join(workdir, "params"),
    backbone=context.backbone if features.name == "mage" else None,
  )
  results["protocol"] = (
    "official: augmented images through the backbone every step"
    if augment != "none"
    else "cached features (eval transform, no augmentation, no dropout)"
  )
  return results


def rows(result: dict) -> list[tuple[str, str]]:
  suffix = "" if result["completed"] else f" (stopped at epoch {result['epochs_done']})"
  return [
    ("linear probe top-1", pct(result["top1"]) + suffix),
    ("linear probe top-5", pct(result["top5"])),
    ("linear probe best top-1", pct(result["best_top1"])),
  ]
