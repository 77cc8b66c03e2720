"""Reads PyTorch `.pth` / `.ckpt` / TorchScript zip files without PyTorch and without running their code.

A torch checkpoint is a zip holding `<prefix>/data.pkl` (a pickle whose tensors point at raw storages)
and `<prefix>/data/<key>` (the storages' bytes). Unpickling it with the standard `pickle` would import
and call whatever globals the file names, so anyone who can hand us a checkpoint could run code. Here
the unpickler resolves only an allow-list of globals that a state_dict needs; any other global
raises `UnsafeCheckpointError` naming it, before anything is called.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, corrupt or not what was expected."""


class UnsafeCheckpointError(CheckpointError):
  """The pickle names a global outside the allow-list."""


# torch.<Name>Storage -> element dtype (the legacy typed-storage names torch.save still writes).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands in for `torch.FloatStorage` etc.: only its dtype is needed."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(STORAGE_DTYPES[name])


class Namespace:
  """Inert stand-in for `argparse.Namespace` (self-trained checkpoints store their args)."""

  def __setstate__(self, state):
    self.__dict__.update(state)


class ScriptModule:
  """Inert record of a TorchScript module object: its attributes, nothing callable."""

  def __init__(self, qualified_name: str):
    self.qualified_name = qualified_name

  def __setstate__(self, state):
    if isinstance(state, dict):
      self.__dict__.update(state)
    else:
      self.state = state


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """The numpy twin of `torch._utils._rebuild_tensor_v2`: a strided view copied into a fresh array."""
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[storage_offset])  # a 0-d array (e.g. BatchNorm's num_batches_tracked)
  needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  if needed > storage.size:
    raise CheckpointError(
        f"tensor of size {size} and stride {stride} at offset {storage_offset} runs past its storage "
        f"of {storage.size} elements")
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  return data


def _ordered_dict(*args):
  return collections.OrderedDict(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): Namespace,
    # TorchScript archives store int/float/bool list attributes (e.g. asymmetric paddings) through these.
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _SafeUnpickler(pickle.Unpickler):

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, torchscript: bool):
    import io
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._prefix = prefix
    self._torchscript = torchscript
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if self._torchscript and module.startswith("__torch__"):
      qualified = f"{module}.{name}"
      # A class from the TorchScript archive: construct an inert record instead of importing code.
      return type(name, (ScriptModule,), {"__init__": lambda self, q=qualified: ScriptModule.__init__(self, q)})
    raise UnsafeCheckpointError(
        f"refusing to load checkpoint: its pickle names the global '{module}.{name}', which is not on "
        f"the allow-list of a state_dict (tensors, storages, OrderedDict, argparse.Namespace)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise CheckpointError(f"unsupported persistent id in checkpoint: {pid!r:.100}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f"storage {key} has an unknown type {storage_type!r:.100}")
    if key not in self._storages:
      record = f"{self._prefix}/data/{key}"
      try:
        raw = self._archive.read(record)
      except KeyError:
        raise CheckpointError(f"checkpoint is missing the storage record '{record}'") from None
      except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"storage record '{record}' is corrupt: {e}") from None
      dtype = storage_type.dtype
      if len(raw) < numel * dtype.itemsize:
        raise CheckpointError(f"storage record '{record}' holds {len(raw)} bytes, expected "
                              f"{numel * dtype.itemsize}")
      self._storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
    return self._storages[key]


def load(path: str, *, torchscript: bool = False) -> Any:
  """Loads the object pickled in a torch zip checkpoint, with tensors as numpy arrays.

  Args:
    path: a file written by `torch.save` (zip format, torch >= 1.6) or `torch.jit.save` (with
      `torchscript=True`, whose module classes come back as inert `ScriptModule` records).

  Raises:
    CheckpointError: the file is missing, truncated, not a zip checkpoint, or malformed.
    UnsafeCheckpointError: the pickle names a global outside the allow-list.
  """
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise CheckpointError(f"checkpoint file not found: {path}") from None
  except zipfile.BadZipFile:
    with open(path, "rb") as f:
      head = f.read(8)
    if head[:2] == b"\x80\x02" or head.startswith(b"\x8a\x0a"):
      raise CheckpointError(f"{path} uses PyTorch's legacy (pre-1.6, non-zip) format; re-save it with "
                            "a recent torch (torch.save(torch.load(p), p)) and convert again") from None
    raise CheckpointError(f"{path} is not a PyTorch zip checkpoint (truncated or corrupt)") from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: expected exactly one '<name>/data.pkl' record, found {pickles}")
    prefix = pickles[0].split("/")[0]
    byteorder = f"{prefix}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
      raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
    try:
      data = archive.read(pickles[0])
      return _SafeUnpickler(data, archive, prefix, torchscript).load()
    except CheckpointError:
      raise
    except (zipfile.BadZipFile, EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError,
            IndexError, AttributeError) as e:
      raise CheckpointError(f"{path}: malformed checkpoint pickle ({type(e).__name__}: {e})") from None


def flatten_state_dict(obj: Any, wrappers=("state_dict", "model", "module")) -> dict[str, np.ndarray]:
  """Returns the name -> array mapping of a loaded checkpoint, unwrapping `{'model': ...}`-style dicts."""
  while isinstance(obj, dict):
    arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if arrays and len(arrays) == len(obj):
      return dict(obj)
    inner = next((obj[w] for w in wrappers if w in obj and isinstance(obj[w], dict)), None)
    if inner is None:
      break
    obj = inner
  raise CheckpointError("checkpoint holds no state_dict (looked for a dict of tensors, possibly under "
                        f"one of {wrappers})")
