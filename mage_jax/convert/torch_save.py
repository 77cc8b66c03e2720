"""Writes PyTorch zip checkpoints (the `torch.save` format) without PyTorch: the mirror of `torch_pickle.load`.

The file is a zip (stored, not compressed) holding, as torch >= 1.6 writes it:
  `archive/data.pkl`            a protocol-2 pickle of the object, in which every tensor is
                                `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`
                                and its storage the persistent id ('storage', torch.<T>Storage, key, 'cpu', numel)
  `archive/.format_version`     b'1'
  `archive/.storage_alignment`  b'64'
  `archive/byteorder`           b'little'
  `archive/data/<key>`          the storage's little-endian bytes, starting at a multiple of 64 in the file (torch
                                pads the local zip header with an 'FB' extra field, so `torch.load(mmap=True)` works)
  `archive/version`             b'3\n'
The pickle is emitted opcode by opcode (the standard pickler would import torch to name its globals) and names
only globals that `torch.load(weights_only=True)` allows: the rebuild function, storage types and OrderedDict.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from mage_jax.convert import torch_pickle

PREFIX = "archive"
ALIGNMENT = 64
_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in torch_pickle.STORAGE_DTYPES.items()}


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


class _Pickle:
  """Protocol-2 opcodes for dicts, OrderedDicts, tuples, str, int, bool, None and numpy arrays or scalars
  (tensors)."""

  def __init__(self):
    self.out = bytearray(pickle.PROTO + b"\x02")
    self.storages: list[np.ndarray] = []

  def emit(self, obj: Any) -> None:
    if isinstance(obj, (np.ndarray, np.generic)):
      self._tensor(np.asarray(obj))
    elif isinstance(obj, dict):
      if isinstance(obj, collections.OrderedDict):
        self.out += _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
      else:
        self.out += pickle.EMPTY_DICT
      if obj:
        self.out += pickle.MARK
        for key, value in obj.items():
          self.emit(key)
          self.emit(value)
        self.out += pickle.SETITEMS
    elif isinstance(obj, tuple):
      self.out += pickle.MARK
      for item in obj:
        self.emit(item)
      self.out += pickle.TUPLE
    elif isinstance(obj, str):
      data = obj.encode("utf-8")
      self.out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data
    elif isinstance(obj, bool):
      self.out += pickle.NEWTRUE if obj else pickle.NEWFALSE
    elif isinstance(obj, int):
      self._int(obj)
    elif obj is None:
      self.out += pickle.NONE
    else:
      raise TypeError(f"cannot write a {type(obj).__name__} into a torch checkpoint")

  def _int(self, n: int) -> None:
    if 0 <= n < 1 << 8:
      self.out += pickle.BININT1 + bytes([n])
    elif 0 <= n < 1 << 16:
      self.out += pickle.BININT2 + struct.pack("<H", n)
    elif -(1 << 31) <= n < 1 << 31:
      self.out += pickle.BININT + struct.pack("<i", n)
    else:
      data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
      self.out += pickle.LONG1 + bytes([len(data)]) + data

  def _tensor(self, array: np.ndarray) -> None:
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _STORAGE_NAMES:
      raise TypeError(f"torch has no storage type for dtype {array.dtype}")
    key = len(self.storages)
    self.storages.append(array)
    size = tuple(int(n) for n in array.shape)
    stride = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    self.out += _global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK
    self.out += pickle.MARK
    self.emit("storage")
    self.out += _global("torch", _STORAGE_NAMES[dtype])
    self.emit(str(key))
    self.emit("cpu")
    self.emit(int(array.size) if size else 1)
    self.out += pickle.TUPLE + pickle.BINPERSID
    self.emit(0)
    self.emit(size)
    self.emit(stride)
    self.emit(False)
    self.emit(collections.OrderedDict())
    self.out += pickle.TUPLE + pickle.REDUCE


def _write_record(archive: zipfile.ZipFile, name: str, data) -> None:
  """One stored zip member whose data starts at a multiple of ALIGNMENT in the file."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = len(data)
  # Local header: 30 bytes + name + our 'FB' field (4 + pad) + the zip64 field zipfile adds for huge members.
  zip64_extra = 20 if info.file_size * 1.05 > zipfile.ZIP64_LIMIT else 0
  header = 30 + len(name.encode()) + 4 + zip64_extra
  pad = -(archive.fp.tell() + header) % ALIGNMENT
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  with archive.open(info, "w") as f:
    f.write(data)


def save(path: str, obj: Any) -> None:
  """Writes `obj` (nested dicts / OrderedDicts of numpy arrays, str, int, bool, None) as `torch.save` would.

  Arrays become CPU tensors of the same dtype and shape (C-contiguous, little-endian).
  """
  pickler = _Pickle()
  pickler.emit(obj)
  pickler.out += pickle.STOP
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    _write_record(archive, f"{PREFIX}/data.pkl", bytes(pickler.out))
    for name, data in (
      (".format_version", b"1"),
      (".storage_alignment", str(ALIGNMENT).encode()),
      ("byteorder", b"little"),
    ):
      _write_record(archive, f"{PREFIX}/{name}", data)
    for key, array in enumerate(pickler.storages):
      raw = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
      _write_record(archive, f"{PREFIX}/data/{key}", memoryview(raw.reshape(-1).view(np.uint8)))
    _write_record(archive, f"{PREFIX}/version", b"3\n")
