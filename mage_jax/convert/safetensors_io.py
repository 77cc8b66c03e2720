"""safetensors files with numpy only (the runtime does not need the `safetensors` package).

The format (https://github.com/huggingface/safetensors): an unsigned little-endian 64-bit header length N, N bytes
of JSON `{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`
(padded with spaces to a multiple of 8 bytes), then the tensors' little-endian bytes, back to back, with
offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from mage_jax.convert import torch_pickle
from mage_jax.convert.torch_pickle import CheckpointError

DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
# The reference implementation refuses larger headers; so does this reader (it bounds memory, too).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Parsing JSON can allocate this many bytes of Python objects per byte of text (`{}` is a 64-byte dict), which
# counts against the same multiple of the file's size as torch_pickle's decompressed bytes.
_JSON_COST = 40
_METADATA = "__metadata__"


def _little_endian(array: np.ndarray) -> np.ndarray:
  array = np.asarray(array)
  return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))


def save(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (name -> array, in this order) and string `metadata` as a safetensors file.

  Raises:
    ValueError: an array dtype safetensors cannot hold, or non-string metadata.
  """
  header: dict = {}
  offset = 0
  for name, array in tensors.items():
    dtype = np.asarray(array).dtype.newbyteorder("<")
    if dtype not in _CODES:
      raise ValueError(f"safetensors cannot hold {name!r} of dtype {dtype}")
    nbytes = int(np.asarray(array).nbytes)
    header[name] = {"dtype": _CODES[dtype], "shape": list(np.shape(array)), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise ValueError("safetensors metadata must map strings to strings")
    header[_METADATA] = dict(metadata)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for array in tensors.values():
      f.write(memoryview(_little_endian(array).reshape(-1).view(np.uint8)))


def is_safetensors(path: str) -> bool:
  """True when the file starts like a safetensors file (a plausible header length, then '{')."""
  try:
    with open(path, "rb") as f:
      head = f.read(9)
  except OSError:
    return False
  return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES


def _entry(name: str, entry, data_bytes: int, path: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
  if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
    raise CheckpointError(f"{path}: tensor {name!r} has no known dtype (have {sorted(DTYPES)})")
  shape, offsets = entry.get("shape"), entry.get("data_offsets")
  if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
    raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape {shape!r:.100}")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
    raise CheckpointError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r:.100}")
  dtype = DTYPES[entry["dtype"]]
  begin, end = offsets
  if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * dtype.itemsize:
    raise CheckpointError(
      f"{path}: tensor {name!r} ({entry['dtype']} {shape}) claims bytes [{begin}, {end}) "
      f"of a {data_bytes}-byte data section"
    )
  return dtype, tuple(shape), begin, end


def _check_layout(entries: Mapping[str, tuple], path: str, max_bytes: int) -> None:
  """Tensors may not share bytes (each would be read again: a few header bytes could claim the data section
  many times over), and together stay within `max_bytes`."""
  end_so_far, previous = 0, None
  for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
    if begin < end_so_far:
      raise CheckpointError(f"{path}: tensor {name!r} overlaps tensor {previous!r} in the data section")
    end_so_far, previous = max(end_so_far, end), name
  total = sum(end - begin for _, _, begin, end in entries.values())
  if total > max_bytes:
    raise CheckpointError(
      f"{path}: its tensors hold {total} bytes, above the loader's cap of {max_bytes}; raise "
      "--max_gb for a larger checkpoint"
    )


def load(path: str, max_bytes: int = torch_pickle.DEFAULT_MAX_BYTES) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a safetensors file: (name -> array in file order, metadata).

  Raises:
    CheckpointError: a missing, truncated, malformed or oversized file: every offset is checked against the
      file size and no two tensors may share bytes before anything is read, the tensors may hold at most
      `max_bytes`, and the JSON header at most what `torch_pickle` allows a file of this size to decompress.
  """
  try:
    size = os.path.getsize(path)
    f = open(path, "rb")
  except OSError as e:
    raise CheckpointError(f"cannot open safetensors file {path}: {e}") from None
  with f:
    head = f.read(8)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if length is None or length > min(size - 8, MAX_HEADER_BYTES):
      raise CheckpointError(f"{path} is not a safetensors file (truncated, or a header length past its end)")
    if length * _JSON_COST > torch_pickle.MAX_INFLATION * size + torch_pickle.ALLOWANCE:
      raise CheckpointError(
        f"{path}: a {length}-byte header is more than a file of {size} bytes can justify "
        f"(parsed, it could take {_JSON_COST}x its length in memory)"
      )
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError) as e:
      raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop(_METADATA, None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
      raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
    data_start, data_bytes = 8 + length, size - 8 - length
    entries = {name: _entry(name, entry, data_bytes, path) for name, entry in header.items()}
    _check_layout(entries, path, max_bytes)
    tensors = {}
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda item: item[1][2]):
      f.seek(data_start + begin)
      count = (end - begin) // dtype.itemsize
      data = np.fromfile(f, dtype=dtype.newbyteorder("<"), count=count)
      tensors[name] = data.astype(dtype, copy=False).reshape(shape)
  return tensors, metadata
