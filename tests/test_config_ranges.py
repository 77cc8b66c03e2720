"""Config values outside their ranges are refused before anything is written or compiled."""

import importlib.util

import pytest

from conftest import REPO, assert_one_line_error, run_cli
from mage_jax.train import config_ranges


def _training_configs():
  for path in sorted((REPO / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "get_config") and "mode" in (config := module.get_config()):
      yield path.name, config


@pytest.mark.parametrize("name,config", list(_training_configs()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_shipped_training_config_is_in_range(name, config):
  config_ranges.check(config)


@pytest.mark.parametrize(
  "override,field",
  [
    ("--config.optim.blr=-1", "config.optim.blr=-1"),
    ("--config.masking.min_ratio=1.5", "config.masking.min_ratio=1.5"),
    ("--config.label_smoothing=2", "config.label_smoothing=2"),
    ("--config.keep_checkpoints=0", "config.keep_checkpoints=0"),
    ("--config.checkpoint_every_steps=0", "config.checkpoint_every_steps=0"),
    ("--config.optim.b2=nan", "config.optim.b2=nan"),
    ("--config.masking.law=linear", "config.masking.law='linear'"),
  ],
)
def test_main_refuses_out_of_range_values_before_writing(override, field, tmp_path):
  workdir = tmp_path / "run"
  run = run_cli("mage_jax.main", "--config=configs/fashion_mnist_tiny.py", f"--workdir={workdir}", override)
  assert_one_line_error(run, 2, field, "must be")
  assert not workdir.exists()  # no config.json replacing an earlier run's record


def test_min_ratio_above_max_ratio():
  from configs import fashion_mnist_tiny  # pylint: disable=g-import-not-at-top

  config = fashion_mnist_tiny.get_config("mask_min=0.9")
  config.masking.max_ratio = 0.8
  with pytest.raises(ValueError, match="min_ratio=0.9 is above config.masking.max_ratio=0.8"):
    config_ranges.check(config)


def test_quickstart_refuses_an_out_of_range_recipe(tmp_path):
  run = run_cli("mage_jax.quickstart", f"--workdir={tmp_path / 'qs'}", "--budget=ci", "--mage_recipe=blr=-1")
  assert run.returncode != 0 and "config.optim.blr=-1" in run.stderr, run.stderr[-2000:]
  assert not (tmp_path / "qs" / "tokenizer").exists()
