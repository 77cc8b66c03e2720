"""Training jobs. Each module has `train_and_evaluate(config, workdir) -> metrics`; `config.mode` picks one."""

from __future__ import annotations

import importlib

from mage_jax.train import config_ranges

MODES = {
  "pretrain": "mage_jax.jobs.pretrain",
  "mage_c": "mage_jax.jobs.mage_c",
  "class_cond": "mage_jax.jobs.class_cond",
  "tokenizer": "mage_jax.jobs.tokenizer",
  "cache_tokens": "mage_jax.jobs.cache_tokens",
}


def run_mode(config, workdir: str) -> dict:
  """Runs (or resumes) the job of `config.mode` in `workdir`; returns its last logged metrics."""
  if config.mode not in MODES:
    raise ValueError(f"unknown config.mode {config.mode!r}; expected one of {sorted(MODES)}")
  config_ranges.check(config)  # the binaries check earlier; the quickstart and library callers come here
  return importlib.import_module(MODES[config.mode]).train_and_evaluate(config, workdir)
