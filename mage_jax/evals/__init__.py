"""Evaluators: one module each, run on a checkpoint by `python -m mage_jax.evaluate` or during training by the loop.

On a checkpoint (`python -m mage_jax.evaluate`):

An eval config lists them by name, `config.evals = ("logistic", "fewshot", "my_package.nearest_mean")`: a name
without a dot is the module `mage_jax.evals.<name>`, a dotted name is imported as it stands, so an evaluator of
your own needs no change in this package. Its settings, when it has any, are the config section of the same name
(`config.fewshot`). An evaluator module defines:

  FEATURES: bool                 True: it runs once per feature set on frozen features (MAGE's and each control's:
                                 raw pixels, their random projection, the encoder at random init); False: once on
                                 the params directory (`finetune`).
  run(context, features) -> dict its results, JSON-ready (`features` is None when FEATURES is False).
  rows(result) -> [(name, text)] the lines it adds to the printed table, one column per feature set.
  check(config)                  optional: refuses settings the data cannot serve, before any work.
  start(context, sets)           optional: after the feature sets are built, before any evaluator runs.

Built in: `logistic`, `linear_probe`, `fewshot` (on features), `finetune`, and on samples of the checkpoint (the
settings of all four in `config.samples`: one generation serves them) `fid`, `sfid`, `precision_recall`,
`sample_grid`.

During training, a training config lists what to measure by name, each with its type, its cadence and its
settings (`every_steps` 0: at the end only; every entry also runs at the last step):

  config.evals.fewshot = dict(type="fewshot", every_steps=500, train_split="train[:2000]", test_split="test")
  config.evals.fid = dict(type="fid", every_steps=0, reference="fashion_mnist:test", num_images=1000)

A type names a module as above (`mage_jax.evals.<type>`, or a dotted path of your own) that defines

  during_training(settings, job) -> (state, step) -> dict   `settings` is the entry, `job` a `TrainingJob`; the
                                 function returns scalars, written as `eval/<name>/<key>` (TensorBoard and the
                                 returned metrics). Built once, before the first step: refuse bad settings here.

Built in: `fewshot` (ridge few-shot on frozen encoder features), `reconstruction` (a tokenizer's held-out PSNR,
SSIM and codebook use), and on samples of the model being trained (`samples`: one generation per step shared by
them) `sample_grid` (a PNG), `fid` (FID and Inception Score), `precision_recall` and `sfid`.

Beside the evaluators, this package holds their machinery: frozen features (`probe`), samples of a training
state (`samples`) and image metrics (`image_metrics`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import types
from typing import Any, Callable

import ml_collections

REQUIRED = ("FEATURES", "run", "rows")
TRAINING_REQUIRED = ("during_training",)


def input_config(
  config: ml_collections.ConfigDict, split: str, batch_size: int, image_size: int, augment: str = "none"
) -> dict:
  """`config.input` for one split, batch and augmentation at the checkpoint's resolution."""
  return {
    **config.input.to_dict(),
    "split": split,
    "batch_size": batch_size,
    "image_size": image_size,
    "augment": augment,
  }


@dataclasses.dataclass(frozen=True)
class Context:
  """What an evaluator may use: the eval config, the checkpoint, its workdir and the feature machinery."""

  config: ml_collections.ConfigDict
  params_dir: str
  workdir: str
  image_size: int = 0
  mesh: Any = None
  backbone: Any = None  # `probe.Backbone` of the checkpoint (None for evaluators without FEATURES)
  shared: dict = dataclasses.field(default_factory=dict)  # what evaluators compute once for all (`samples`)

  def features(self, feature_set, split: str):
    """(features [N, D] float32, labels [N]) of a split, computed once per set and split (and cached on disk)."""
    return feature_set.features(split, self.config, self.image_size, self.mesh, self.workdir)

  def input_config(self, split: str, batch_size: int, augment: str = "none") -> dict:
    return input_config(self.config, split, batch_size, self.image_size, augment)


def split_size(config: ml_collections.ConfigDict, split: str) -> int:
  """Examples in `split` of the eval config's dataset (reading it: a missing split is refused here)."""
  from mage_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow: not for --help)

  return pipeline.num_examples(input_config(config, split, 1, 32))


@functools.cache
def builtin(required: tuple[str, ...] = REQUIRED) -> tuple[str, ...]:
  """The evaluators of this package: its modules that define the contract (`REQUIRED` for checkpoints,
  `TRAINING_REQUIRED` for training); the others are their machinery."""
  modules = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
  return tuple(sorted(m.__name__.rsplit(".", 1)[1] for m in modules if all(hasattr(m, a) for a in required)))


def load(name: str, required: tuple[str, ...] = REQUIRED, where: str = "config.evals") -> types.ModuleType:
  """The evaluator module `name` names, checked for the contract; unknown names are refused with the list."""
  known = ", ".join(builtin(required))
  if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
    raise ValueError(f"{where}: {name!r} is not an evaluator name; built in: {known}")
  if "." not in name and name not in builtin(required):
    raise ValueError(f"{where}: unknown evaluator {name!r}; built in: {known}, or a dotted module path of your own")
  try:
    module = importlib.import_module(name if "." in name else f"{__name__}.{name}")
  except ImportError as e:
    raise ValueError(f"{where}: evaluator {name!r} cannot be imported ({e})") from None
  missing = [a for a in required if not hasattr(module, a)]
  if missing:
    raise ValueError(
      f"{where}: module {module.__name__} is not an evaluator (it lacks {', '.join(missing)}; "
      "see mage_jax/evals/__init__.py)"
    )
  return module


@dataclasses.dataclass(frozen=True)
class TrainingJob:
  """What an evaluator during training may use: the job's config and workdir, its mesh and length, and the models
  it trains. `params_of(state)` gives the params of `model` in the job's training state."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  total_steps: int
  model: Any = None  # the MAGE being trained (None for the tokenizer job)
  tokenizer: Any = None  # the VQGAN: frozen beside a MAGE, or the one being trained
  tokenizer_vars: Any = None
  params_of: Callable[[Any], Any] = lambda state: state.params
  shared: dict = dataclasses.field(default_factory=dict)  # what its evaluators compute once for all (`samples`)


def entry_settings(cls, settings):
  """The frozen dataclass `cls` of an entry's settings (its keys but `type` and `every_steps`), checked."""
  from mage_jax.train import config_views  # pylint: disable=g-import-not-at-top

  return config_views.from_config(cls, {k: v for k, v in settings.items() if k not in ("type", "every_steps")}, "entry")


def during_training(config: ml_collections.ConfigDict, job: TrainingJob) -> tuple:
  """The `trainer.Evaluator`s of a training config's `evals` entries, built (and their settings checked) now."""
  from mage_jax.train import trainer  # pylint: disable=g-import-not-at-top  (the loop does not import evals)

  out = []
  for name, settings in (config.get("evals") or {}).items():
    where = f"config.evals.{name}"
    module = load(settings.get("type", ""), TRAINING_REQUIRED, f"{where}.type")
    every = settings.get("every_steps", 0)  # checked by config_ranges, as every cadence
    try:
      run = module.during_training(settings, job)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    out.append(trainer.Evaluator(name, run, every))
  return tuple(out)


def pct(x: float) -> str:
  return f"{100 * x:.2f}"
