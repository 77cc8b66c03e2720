"""The jobs' `build_task` contract (mage_jax/jobs): the abstract task that `bench/lower.py`, the memory plans and the
benchmark build is the task that trains."""

import importlib

import jax
import numpy as np
import pytest

from conftest import apply_overrides
from mage_jax.jobs import MODES
from mage_jax.train import sharding, trainer

# (job module, config module, config argument) of every mode that trains without a checkpoint to start from.
JOBS = [
  ("pretrain", "fashion_mnist_tiny", "steps=4,batch=8"),
  ("mage_c", "mage_c_fashion_mnist", "steps=4,batch=8"),
  ("tokenizer", "tokenizer_fashion_mnist", "steps=4,batch=8"),
]


def _config(module: str, arg: str, image_folder):
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  return apply_overrides(config, **{"input.name": f"folder:{image_folder}", "input.image_size": 32})


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), sharding.strip_boxes(tree))


@pytest.mark.parametrize("mode,module,arg", JOBS, ids=[j[0] for j in JOBS])
def test_abstract_task_is_the_task_that_trains(mode, module, arg, image_folder, tmp_path):
  job = importlib.import_module(MODES[mode])
  config = _config(module, arg, image_folder)
  real, mesh, rules = job.build_task(config, str(tmp_path / "real"))
  abstract, abstract_mesh, abstract_rules = job.build_task(config, str(tmp_path / "abstract"), abstract=True)
  assert (abstract_mesh.shape, abstract_rules) == (mesh.shape, rules)
  assert abstract.total_steps == real.total_steps and abstract.batch_spec == real.batch_spec
  key = jax.random.key(0)
  assert _shapes(jax.eval_shape(abstract.init_state, key)) == _shapes(jax.eval_shape(real.init_state, key))
  assert _shapes(abstract.extras) == _shapes(real.extras)
  # The batches the loop feeds are what the spec says (one process: its slice is the global batch).
  batch = next(real.data(0))
  assert {k: (batch[k].shape, batch[k].dtype) for k in real.batch_spec} == {
    k: (shape, np.dtype(dtype)) for k, (shape, dtype) in real.batch_spec.items()
  }
  # Nothing of the abstract task reads data or writes files.
  assert abstract.export is None and abstract.evaluators == () and abstract.initial_params is None
  with pytest.raises(RuntimeError, match="abstract task has no data"):
    abstract.data(0)
  assert not (tmp_path / "abstract").exists()


def test_every_training_mode_has_build_task():
  for mode, module in MODES.items():
    job = importlib.import_module(module)
    assert mode == "cache_tokens" or callable(job.build_task), mode  # the token cache is a pass, not a loop


def test_loop_settings_are_typed_and_checked():
  from configs import fashion_mnist_tiny

  config = fashion_mnist_tiny.get_config("steps=4")
  loop = trainer.Loop.of(config)
  assert (loop.seed, loop.checkpoint_every_steps, loop.nonfinite) == (
    config.seed,
    config.checkpoint_every_steps,
    "stop",
  )
  assert loop.hparams == config.to_dict()
  config.nonfinite = "ignore"
  with pytest.raises(ValueError, match="config.nonfinite must be 'stop' or 'skip'"):
    trainer.Loop.of(config)
