"""Evaluators of a checkpoint's representations: one module each, run by `python -m mage_jax.evaluate`.

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

Beside the evaluators, this package holds what evaluation shares with training: frozen features (`probe`), the
few-shot monitor of MAGE pretraining (`fewshot.monitor`), and the tokenizer's image metrics and held-out
reconstruction evaluation (`image_metrics`, `reconstruction`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import types
from typing import Any

import ml_collections

REQUIRED = ("FEATURES", "run", "rows")


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
def builtin() -> tuple[str, ...]:
  """The evaluators of this package: its modules that define the contract (the others are their machinery)."""
  modules = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
  return tuple(sorted(m.__name__.rsplit(".", 1)[1] for m in modules if all(hasattr(m, a) for a in REQUIRED)))


def load(name: str) -> types.ModuleType:
  """The evaluator module `name` names, checked for the contract; unknown names are refused with the list."""
  if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
    raise ValueError(f"config.evals: {name!r} is not an evaluator name; built in: {', '.join(builtin())}")
  if "." not in name and name not in builtin():
    raise ValueError(
      f"config.evals: unknown evaluator {name!r}; built in: {', '.join(builtin())}, or a dotted module path of your own"
    )
  try:
    module = importlib.import_module(name if "." in name else f"{__name__}.{name}")
  except ImportError as e:
    raise ValueError(f"config.evals: evaluator {name!r} cannot be imported ({e})") from None
  missing = [a for a in REQUIRED if not hasattr(module, a)]
  if missing:
    raise ValueError(
      f"config.evals: module {module.__name__} is not an evaluator (it lacks {', '.join(missing)}; "
      "see mage_jax/evals/__init__.py)"
    )
  return module


def pct(x: float) -> str:
  return f"{100 * x:.2f}"
