"""Reading the official code's recorded training runs, so that a replay starts only from inputs it can trust.

A fixture is recorded by another code base (formats: the READMEs of `tests/testdata/official_train_tiny` and
`tests/testdata/official_probe_tiny`), so every input is validated against config.json before any of it is
replayed: an unusable fixture raises `FixtureError` naming the file and the problem, rather than failing as a
shape error deep inside a jitted step. Official checkpoints and parameter names reach project parameters
through the converter's key mapping only, so a replay also exercises the mapping real checkpoints go through.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import zipfile
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from mage_jax.conformance import forward as conformance
from mage_jax.convert import convert
from mage_jax.evals import probe
from mage_jax.jobs import linear_probe
from mage_jax.models.mage import MAGEConfig
from mage_jax.models.vqgan import VQGANConfig

PRETRAIN_FILE = "trajectory.npz"
# Numbers of config.json's `train` section that the replay uses (besides steps and grad_clip_norm).
RECIPE_KEYS = (
  "batch",
  "steps_per_epoch",
  "epochs",
  "warmup_epochs",
  "blr",
  "lr",
  "min_lr",
  "b1",
  "b2",
  "eps",
  "weight_decay",
)
PROBE_FILE = "probe_trajectory.npz"


class FixtureError(ValueError):
  """A fixture file is missing, unreadable, or inconsistent with its config.json."""


def fixture_kind(directory: str) -> str:
  """'pretrain', 'probe' or 'forward' from the files in `directory`; FixtureError when it holds none."""
  for kind, name in (("pretrain", PRETRAIN_FILE), ("probe", PROBE_FILE), ("forward", "reference.npz")):
    if os.path.isfile(os.path.join(directory, name)):
      return kind
  if not os.path.isdir(directory):
    raise FixtureError(f"{directory}: no such directory")
  raise FixtureError(f"{directory} holds none of reference.npz, {PRETRAIN_FILE}, {PROBE_FILE}")


def _read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise FixtureError(f"{path}: {e}") from e
  if not isinstance(cfg, dict):
    raise FixtureError(f"{path}: expected a JSON object")
  return cfg


def _field(cfg: dict, dotted: str, default: Any = dataclasses.MISSING) -> Any:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      if default is not dataclasses.MISSING:
        return default
      raise FixtureError(f"config.json has no {dotted!r}")
    node = node[part]
  return node


def _number(cfg: dict, dotted: str, *, integer: bool = False, minimum: float = 0.0, default: Any = None) -> Any:
  value = _field(cfg, dotted, dataclasses.MISSING if default is None else default)
  kinds = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < minimum:
    raise FixtureError(
      f"config.json: {dotted} must be a finite {'integer' if integer else 'number'} >= {minimum:g}, got {value!r}"
    )
  return value


def _snapshots(cfg: dict, dotted: str, steps_: int) -> tuple[int, ...]:
  snaps = _field(cfg, dotted)
  if (
    not isinstance(snaps, list)
    or not snaps
    or any(isinstance(s, bool) or not isinstance(s, int) for s in snaps)
    or sorted(set(snaps)) != snaps
    or snaps[0] < 1
    or snaps[-1] > steps_
  ):
    raise FixtureError(f"config.json: {dotted} must be increasing step counts in [1, {steps_}], got {snaps!r}")
  return tuple(snaps)


def _model_configs(cfg: dict) -> tuple[VQGANConfig, MAGEConfig]:
  try:
    return conformance.configs_from_json(cfg)
  except (KeyError, TypeError, ValueError) as e:
    raise FixtureError(f"config.json: unusable tokenizer/mage sizes ({type(e).__name__}: {e})") from e


def _arrays(path: str, expected: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
  """The arrays of an npz, each checked for shape and dtype kind ('i' integer, 'b' bool, 'f' float)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = sorted(set(expected) - set(f.files))
      if missing:
        raise FixtureError(f"{path} lacks {missing}")
      out = {k: f[k] for k in expected}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    if isinstance(e, FixtureError):
      raise
    raise FixtureError(f"{path}: {e}") from e
  for k, (shape, kind) in expected.items():
    a = out[k]
    kind_ok = a.dtype.kind in ("iu" if kind == "i" else kind)
    if a.shape != shape or not kind_ok:
      raise FixtureError(
        f"{path}: {k} is {a.dtype}{list(a.shape)}, config.json implies "
        f"{ {'i': 'int', 'b': 'bool', 'f': 'float'}[kind] }{list(shape)}"
      )
    if kind == "f" and not np.all(np.isfinite(a)):
      raise FixtureError(f"{path}: {k} holds non-finite values")
  return out


def _converted(
  directory: str, name: str, kind: str, tok_config: VQGANConfig, mage_config: MAGEConfig
) -> convert.Converted:
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise FixtureError(f"{path}: no such file")
  try:
    return conformance.convert_file(path, kind, tokenizer_config=tok_config, mage_config=mage_config)
  except (OSError, ValueError, KeyError) as e:  # torch_pickle.CheckpointError is a ValueError
    raise FixtureError(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------------------
# Official parameter names -> project parameters.


@dataclasses.dataclass
class NameMatch:
  """How a list of official parameter names covers a project param tree (through the converter's mapping)."""

  paths: dict[str, str]  # official name -> project param path ('blocks_0/attn/qkv/kernel')
  no_gradient: list[str]  # official tensors the converter drops: no computation reads them
  unmapped: list[str]  # official names with no project param
  shared: list[str]  # project params named by more than one official name
  left_out: list[str]  # project params no official name covers

  def problems(self) -> list[str]:
    return (
      [f"{n}: no project param" for n in self.unmapped]
      + [f"{p}: named twice" for p in self.shared]
      + [f"{p}: not in the official groups" for p in self.left_out]
    )


def match_names(names: Sequence[str], params, renames=None) -> NameMatch:
  """Maps official (torch) parameter names onto `params` through the converter's name table (`convert.torch_key`,
  with `renames` for the probe head)."""
  flat = {("params",) + k: v for k, v in traverse_util.flatten_dict(params).items()}
  by_torch_name = {convert.torch_key(path, renames): path for path in flat}
  paths, no_grad, unmapped = {}, [], []
  for name in names:
    if convert.UNUSED_KEYS.match(name):
      no_grad.append(name)
      continue
    dest = by_torch_name.get(name)
    if dest is None:
      unmapped.append(name)
    else:
      paths[name] = "/".join(dest[1:])
  counts = collections.Counter(paths.values())
  every = ["/".join(k[1:]) for k in flat]
  return NameMatch(
    paths, no_grad, unmapped, sorted(p for p, c in counts.items() if c > 1), [p for p in every if p not in counts]
  )


# ---------------------------------------------------------------------------------------------------------
# Pretraining.


@dataclasses.dataclass(frozen=True)
class PretrainFixture:
  """A recorded official pretraining run (trajectory.npz + config.json + init/after_<n>.pth)."""

  directory: str
  config: dict
  tok_config: VQGANConfig
  mage_config: MAGEConfig
  arrays: dict  # ids int [S,B,N], dropped/masked bool [S,B,N], loss/lr/grad_norm float [S]
  snapshots: tuple[int, ...]
  label_smoothing: float
  recipe: dict  # config.json `train` numbers (RECIPE_KEYS), validated; grad_clip_norm may be None
  decayed: tuple[str, ...]  # official parameter names with weight decay
  undecayed: tuple[str, ...]  # and without

  @property
  def num_steps(self) -> int:
    return int(self.arrays["loss"].shape[0])

  @property
  def num_dropped(self) -> int:
    return int(self.arrays["dropped"][0, 0].sum())

  def params(self, name: str) -> dict:
    """The project-layout params of `init.pth` / `after_<n>.pth`."""
    converted = _converted(self.directory, name, "mage", self.tok_config, self.mage_config)
    return converted.variables["model"]["params"]


def load_pretrain_fixture(directory: str) -> PretrainFixture:
  """Reads and validates a pretraining trajectory fixture; FixtureError naming the first problem."""
  cfg = _read_config(directory)
  tok_config, mage_config = _model_configs(cfg)
  if mage_config.dropout or mage_config.attn_dropout:
    raise FixtureError(
      "config.json: a replay needs mage.dropout = mage.attn_dropout = 0 (the official dropout masks are not recorded)"
    )
  if _field(cfg, "train.optimizer") != "AdamW" or _field(cfg, "train.dtype") != "float32":
    raise FixtureError("config.json: train.optimizer must be 'AdamW' and train.dtype 'float32'")
  num_steps = _number(cfg, "train.steps", integer=True, minimum=1)
  batch = _number(cfg, "train.batch", integer=True, minimum=1)
  n = mage_config.num_tokens
  arrays = _arrays(
    os.path.join(directory, PRETRAIN_FILE),
    {
      "ids": ((num_steps, batch, n), "i"),
      "dropped": ((num_steps, batch, n), "b"),
      "masked": ((num_steps, batch, n), "b"),
      "loss": ((num_steps,), "f"),
      "lr": ((num_steps,), "f"),
      "grad_norm": ((num_steps,), "f"),
    },
  )
  path = os.path.join(directory, PRETRAIN_FILE)
  ids, dropped, masked = arrays["ids"], arrays["dropped"], arrays["masked"]
  if ids.min() < 0 or ids.max() >= mage_config.codebook_size:
    raise FixtureError(f"{path}: ids outside [0, {mage_config.codebook_size})")
  if np.any(dropped & ~masked):
    raise FixtureError(f"{path}: a dropped token is not masked (dropped must be a subset of masked)")
  per_row = dropped.sum(axis=-1)
  if np.any(per_row != per_row.flat[0]):
    raise FixtureError(f"{path}: every row must drop the same number of tokens, found {np.unique(per_row)}")
  arrays["ids"] = ids.astype(np.int32)
  snapshots = _snapshots(cfg, "snapshots", num_steps)
  _require_files(directory, ["init.pth"] + [f"after_{s}.pth" for s in snapshots])
  counts = ("batch", "steps_per_epoch")
  recipe = {k: _number(cfg, f"train.{k}", integer=k in counts, minimum=int(k in counts)) for k in RECIPE_KEYS}
  clip = _field(cfg, "train.grad_clip_norm")
  recipe["grad_clip_norm"] = None if clip is None else _number(cfg, "train.grad_clip_norm")
  return PretrainFixture(
    directory,
    cfg,
    tok_config,
    mage_config,
    arrays,
    snapshots,
    float(_number(cfg, "mage.label_smoothing")),
    recipe,
    _names(cfg, "train.decayed_params"),
    _names(cfg, "train.undecayed_params"),
  )


def _names(cfg: dict, dotted: str) -> tuple[str, ...]:
  names = _field(cfg, dotted)
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise FixtureError(f"config.json: {dotted} must be a list of parameter names")
  return tuple(names)


def _require_files(directory: str, names: Sequence[str]) -> None:
  missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
  if missing:
    raise FixtureError(f"{directory} lacks {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------------------
# Linear probe.


@dataclasses.dataclass(frozen=True)
class ProbeFixture:
  """A recorded official linear-probe run (probe_trajectory.npz + config.json + vit.pth)."""

  directory: str
  config: dict
  probe_config: linear_probe.ProbeConfig
  steps_per_epoch: int
  arrays: dict  # features [N,D], labels [N], index [S,B], loss/lr [S], head_<snap>/<torch key>
  snapshots: tuple[int, ...]

  @property
  def num_steps(self) -> int:
    return int(self.arrays["loss"].shape[0])

  def head(self, name: str) -> dict:
    """The recorded head `name` ('init', 'after_10') in `probe.init_head`'s layout, params and batch_stats
    merged: {'head': {'kernel', 'bias'}, 'head_bn': {'mean', 'var'}} (numpy float32)."""
    dim, classes = self.arrays["features"].shape[1], self.probe_config.num_classes
    params, stats = jax.eval_shape(lambda: probe.init_head(jax.random.key(0), dim, classes))
    prefix = f"head_{name}/"
    sd = {"head." + k[len(prefix) :]: v for k, v in self.arrays.items() if k.startswith(prefix)}
    variables, report = convert.convert_tree(sd, {"params": params, "batch_stats": stats}, convert.PROBE_HEAD_RENAMES)
    if not report.ok or report.unexpected:
      raise FixtureError(f"{PROBE_FILE}: head_{name}: {report.describe()}")
    return {**variables["params"], **variables["batch_stats"]}


def load_probe_fixture(directory: str) -> ProbeFixture:
  """Reads and validates a linear-probe fixture; FixtureError naming the first problem."""
  cfg = _read_config(directory)
  p = lambda key, **kw: _number(cfg, f"probe.{key}", **kw)
  num_steps, batch = p("steps", integer=True, minimum=1), p("batch", integer=True, minimum=2)
  spe, classes = p("steps_per_epoch", integer=True, minimum=1), p("num_classes", integer=True, minimum=2)
  defaults = linear_probe.ProbeConfig(num_classes=classes)
  try:
    pcfg = linear_probe.ProbeConfig(
      num_classes=classes,
      epochs=p("epochs", integer=True, minimum=1),
      warmup_epochs=p("warmup_epochs"),
      batch_size=batch,
      blr=p("blr"),
      min_lr=p("min_lr"),
      weight_decay=p("weight_decay"),
      # Stated in words by the official fixture; numbers here when a fixture gives them.
      momentum=p("momentum", default=defaults.momentum),
      trust_coefficient=p("trust_coefficient", default=defaults.trust_coefficient),
      bn_eps=p("bn_eps", default=defaults.bn_eps),
      bn_momentum=1.0 - p("bn_momentum", default=1.0 - defaults.bn_momentum),
    )  # torch's convention
  except ValueError as e:
    raise FixtureError(f"config.json: {e}") from e
  path = os.path.join(directory, PROBE_FILE)
  try:
    with np.load(path, allow_pickle=False) as f:
      n, dim = f["features"].shape
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise FixtureError(f"{path}: no readable [N, D] features ({e})") from e
  if n // batch != spe:
    raise FixtureError(
      f"{path}: {n} features in batches of {batch} give {n // batch} steps per epoch, config.json says {spe}"
    )
  snapshots = _snapshots(cfg, "probe.snapshots", num_steps)
  # The head's torch state_dict: 0 = BatchNorm1d, 1 = Linear.
  shapes = {"0.running_mean": (dim,), "0.running_var": (dim,), "1.weight": (classes, dim), "1.bias": (classes,)}
  heads = {
    f"head_{h}/{k}": (shape, "f")
    for h in ("init",) + tuple(f"after_{s}" for s in snapshots)
    for k, shape in shapes.items()
  }
  arrays = _arrays(
    path,
    {
      "features": ((n, dim), "f"),
      "labels": ((n,), "i"),
      "index": ((num_steps, batch), "i"),
      "loss": ((num_steps,), "f"),
      "lr": ((num_steps,), "f"),
      **heads,
    },
  )
  if arrays["labels"].min() < 0 or arrays["labels"].max() >= classes:
    raise FixtureError(f"{path}: labels outside [0, {classes})")
  if arrays["index"].min() < 0 or arrays["index"].max() >= n:
    raise FixtureError(f"{path}: index outside [0, {n})")
  if "finetune_groups" in cfg:
    _require_files(directory, ["vit.pth"])
  return ProbeFixture(directory, cfg, pcfg, spe, arrays, snapshots)
