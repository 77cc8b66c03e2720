"""End-to-end fine-tuning of the checkpoint's encoder with a classification head (`jobs/finetune`, the paper's
recipe in `config.finetune`); top-1 on its eval split."""

from __future__ import annotations

import os

from mage_jax.evals import pct, probe
from mage_jax.train import checkpointing

FEATURES = False


def run(context, features) -> dict:
  del features
  from mage_jax.jobs import finetune  # pylint: disable=g-import-not-at-top

  workdir = os.path.join(context.workdir, "finetune")
  checkpointing.claim(
    workdir, {"model": probe.params_identity(context.params_dir), "finetune": context.config.finetune.to_dict()}
  )
  return finetune.run(context.config.finetune, context.params_dir, workdir)


def rows(result: dict) -> list[tuple[str, str]]:
  return [("fine-tune top-1", pct(result["top1"])), ("fine-tune best top-1", pct(result["best_top1"]))]
