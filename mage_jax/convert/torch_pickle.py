"""Reads PyTorch `.pth` / `.ckpt` / TorchScript zip files without PyTorch and without running their code.

A torch checkpoint is a zip holding `<prefix>/data.pkl` (a pickle whose tensors point at raw storages)
and `<prefix>/data/<key>` (the storages' bytes). Unpickling it with the standard `pickle` would import
and call whatever globals the file names, so anyone who can hand us a checkpoint could run code. Here
the unpickler resolves only an allow-list of globals that a state_dict needs; any other global
raises `UnsafeCheckpointError` naming it, before anything is called.

The file is also hostile to memory. Before unpickling, the opcodes are walked without building anything: each
is charged as one Python object of up to `OP_COST` bytes, sets are refused, and a memo index beyond the opcodes
read so far is refused (the C unpickler sizes its memo by the largest index: 9 bytes can ask for gigabytes). The allowed
callables never copy an argument twice (a few bytes can name one large list many times). A tensor is
(storage, offset, size, stride), all chosen by the file: the unpickler only records them, then tensors are
built one by one under their key path, and each is refused (naming it) unless its view lies inside its storage
(offsets and strides non-negative, as torch writes them) and it has no more elements than its storage (a
stride-0 expansion of a few stored bytes could claim gigabytes). Running totals stay within the budget:
decompressed bytes plus pickle objects at most `MAX_INFLATION` times the file's size (a deflated member of
zeros can inflate a thousandfold), tensor bytes at most `MAX_VIEW_FACTOR` times the stored bytes, and both at
most `max_bytes` (`--max_gb` in the binaries). A member is read only after its size in the zip directory
matches the size its storage declares, and never beyond it. So peak memory stays within a small multiple of
the file's size (plus `ALLOWANCE`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import pickletools
import zipfile
import zlib
from typing import Any, Callable

import ml_dtypes
import numpy as np

from mage_jax.system import runtime

DEFAULT_MAX_BYTES = 4 * 2**30  # ViT-L + tokenizer is 1.7 GB of float32 tensors
# Decompressed members may hold this many times the file's own size, plus the allowance. torch writes
# members stored (ratio 1) and deflated float weights shrink by ~10%, so only zip bombs come near it.
MAX_INFLATION = 4
# Tensors may total this many times the stored bytes, plus the allowance: tied weights share a storage.
MAX_VIEW_FACTOR = 4
ALLOWANCE = 16 * 2**20
# Bytes one pickle opcode may allocate beyond its own: at most an empty dict or 3-tuple and its slot in a list
# (measured: 81 bytes per `}` in a list of empty dicts). Sets (216 bytes each) are refused outright.
OP_COST = 96
_SET_OPCODES = ("EMPTY_SET", "ADDITEMS", "FROZENSET")
# data.pkl of a ViT-L state_dict is ~70 kB (25k opcodes); walking its opcodes takes ~3 us each.
MAX_PICKLE_BYTES = 8 * 2**20
_MAX_DIM = 2**40
_CHUNK = 16 * 2**20


def define_max_gb_flag() -> Callable[[], int]:
  """Defines `--max_gb` (the cap `load` takes) for a binary that reads torch files; returns its `max_bytes`."""
  holder = runtime.define_float(
    "max_gb",
    DEFAULT_MAX_BYTES / 2**30,
    "Refuse torch files whose tensors (or decompressed bytes) exceed this many GiB.",
    lower=0,
  )
  return lambda: int(holder.value * 2**30)


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

  # Objects the pickle can reach must not take a BUILD opcode's state into a __dict__: one large dict could be
  # copied into many of them for a few bytes each. Hence slots here and on the refs below.
  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(STORAGE_DTYPES[name])


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class _StorageRef:
  """A storage named by the pickle, not read yet: `<prefix>/data/<key>` of `numel` elements of `type`."""

  type: _StorageType
  key: str
  numel: Any


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class _TensorRef:
  """The arguments of `torch._utils._rebuild_tensor_v2`, unchecked until `_Reader.tensor` builds it."""

  storage: Any
  offset: Any
  size: Any
  stride: Any


def _share_state(obj, state) -> None:
  # The state becomes the instance's attributes without a copy: the pickle may hand one large dict to many
  # objects for a few bytes each.
  obj.__dict__ = state if isinstance(state, dict) else {"state": state}


class Namespace:
  """Inert stand-in for `argparse.Namespace` (self-trained checkpoints store their args)."""

  __setstate__ = _share_state


class ScriptModule:
  """Inert record of a TorchScript module object: its attributes, nothing callable.

  `qualified_name` (e.g. '__torch__.torch.nn.modules.conv.Conv2d') is a class attribute of the record class
  made for each name.
  """

  qualified_name = ""
  __setstate__ = _share_state


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  return data


_ALLOWED = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("argparse", "Namespace"): Namespace,
}


class _Dict(dict):
  """What `collections.OrderedDict` builds: a dict (insertion-ordered) whose BUILD state (torch pickles a
  state_dict's `_metadata` there) is kept by reference in a slot; an OrderedDict's __dict__ would copy it."""

  __slots__ = ("state",)

  def __setstate__(self, state):
    self.state = state


# Container constructors: the `_SafeUnpickler` method that stands in for each.
_CONTAINERS = {
  ("collections", "OrderedDict"): "_dict",
  # TorchScript archives store int/float/bool list attributes (e.g. asymmetric paddings) through these.
  ("torch.jit._pickle", "build_intlist"): "_list",
  ("torch.jit._pickle", "build_doublelist"): "_list",
  ("torch.jit._pickle", "build_boollist"): "_list",
  ("torch.jit._pickle", "build_tensorlist"): "_list",
}


class _SafeUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; storages and tensors come back as unchecked references."""

  def __init__(self, data: bytes, torchscript: bool):
    super().__init__(io.BytesIO(data))
    self._torchscript = torchscript
    self._converted: dict[int, tuple[Any, Any]] = {}
    self._script_classes: dict[str, type] = {}

  def _container(self, kind: type, args: tuple):
    """`kind(*args)` that returns an argument already of that kind itself and converts any other argument
    once, so naming the same large list many times costs nothing."""
    if not args:
      return kind()
    if len(args) > 1:
      raise CheckpointError(f"a {kind.__name__} constructor called with {len(args)} arguments")
    arg = args[0]
    if isinstance(arg, kind):
      return arg
    if id(arg) not in self._converted:
      self._converted[id(arg)] = (arg, kind(arg))  # holding `arg` keeps its id from being reused
    return self._converted[id(arg)][1]

  # Bound methods rather than partials: a partial's __setstate__ copies a non-plain dict it is given.
  def _dict(self, *args):
    return self._container(_Dict, args)

  def _list(self, *args):
    return self._container(list, args)

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if (module, name) in _CONTAINERS:
      return getattr(self, _CONTAINERS[(module, name)])
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if self._torchscript and module.startswith("__torch__"):
      qualified = f"{module}.{name}"
      # A class from the TorchScript archive: an inert record class instead of imported code, one per name.
      if qualified not in self._script_classes:
        self._script_classes[qualified] = type(name, (ScriptModule,), {"qualified_name": qualified})
      return self._script_classes[qualified]
    raise UnsafeCheckpointError(
      f"refusing to load checkpoint: its pickle names the global '{module}.{name}', which is not on "
      f"the allow-list of a state_dict (tensors, storages, OrderedDict, argparse.Namespace)"
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise CheckpointError(f"unsupported persistent id in checkpoint: {pid!r:.100}")
    if not isinstance(pid[1], _StorageType):
      raise CheckpointError(f"storage {pid[2]!r:.100} has an unknown type {pid[1]!r:.100}")
    return _StorageRef(pid[1], str(pid[2]), pid[4])


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _size(nbytes: int) -> str:
  if nbytes >= 2**30:
    return f"{nbytes / 2**30:.2f} GiB"
  return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


@dataclasses.dataclass
class _Budget:
  """Running byte totals of one load against its caps (see the module docstring)."""

  max_bytes: int
  file_size: int
  inflated: int = 0  # decompressed member bytes: the pickle and every storage read
  objects: int = 0  # OP_COST per pickle opcode: what unpickling may allocate
  materialised: int = 0  # bytes of the tensors built

  def _inflation_limit(self) -> int:
    return MAX_INFLATION * self.file_size + ALLOWANCE

  def inflate(self, what: str, nbytes: int) -> None:
    if self.inflated + self.objects + nbytes > self._inflation_limit():
      raise CheckpointError(
        f"{what} decompresses to {_size(nbytes)}, which brings the file's decompressed total above "
        f"{MAX_INFLATION}x its {_size(self.file_size)} on disk (+{_size(ALLOWANCE)}): a member inflating far "
        "beyond its compressed size (zip bomb) is refused"
      )
    self._check_max(what, self.inflated + nbytes, "decompressed")
    self.inflated += nbytes

  def unpickle(self, what: str, opcodes: int) -> None:
    nbytes = opcodes * OP_COST
    if self.inflated + self.objects + nbytes > self._inflation_limit():
      raise CheckpointError(
        f"{what} holds more opcodes than its file can justify: at up to {OP_COST} bytes of Python objects "
        f"each they would take the file's decompressed total above {MAX_INFLATION}x its "
        f"{_size(self.file_size)} on disk (+{_size(ALLOWANCE)}); refused"
      )
    self.objects += nbytes

  def materialise(self, what: str, nbytes: int) -> None:
    limit = MAX_VIEW_FACTOR * self.inflated + ALLOWANCE
    if self.materialised + nbytes > limit:
      raise CheckpointError(
        f"{what} brings the tensors to {_size(self.materialised + nbytes)}, more than {MAX_VIEW_FACTOR}x the "
        f"{_size(self.inflated)} stored (+{_size(ALLOWANCE)}): views repeating the same storage are refused"
      )
    self._check_max(what, self.materialised + nbytes, "tensor")
    self.materialised += nbytes

  def _check_max(self, what: str, total: int, kind: str) -> None:
    if total > self.max_bytes:
      raise CheckpointError(
        f"{what} brings the {kind} bytes to {total} ({_size(total)}), above the loader's cap "
        f"of {self.max_bytes} ({_size(self.max_bytes)}); raise --max_gb for a larger checkpoint"
      )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget, what: str) -> np.ndarray:
  """The member's bytes as uint8, never decompressing more than its directory entry declares.

  `what` names the member in errors (e.g. "storage record 'a/data/3' (of tensor 'blocks.0.norm1.weight')").
  """
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    # bzip2/lzma members decompress without an output bound in zipfile; torch only writes stored members.
    raise CheckpointError(
      f"{what} uses zip compression method {info.compress_type}; only stored and deflated members are read"
    )
  budget.inflate(what, info.file_size)
  out = np.empty(info.file_size, np.uint8)
  pos = 0
  try:
    with archive.open(info) as f:
      while pos < info.file_size:
        chunk = f.read(min(_CHUNK, info.file_size - pos))
        if not chunk:
          break
        out[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
        pos += len(chunk)
  except (zipfile.BadZipFile, EOFError, OSError, zlib.error, RuntimeError, NotImplementedError) as e:
    raise CheckpointError(f"{what} is corrupt: {e}") from None
  if pos != info.file_size:
    raise CheckpointError(f"{what} ends after {pos} of its {info.file_size} bytes (truncated)")
  return out


def _walk_opcodes(data: bytes, budget: _Budget, what: str) -> None:
  """Charges every opcode to the budget before anything is built, and refuses memo indices that run ahead.

  Picklers number memo entries 0, 1, 2, ...; CPython's unpickler sizes its memo array by the largest index
  it is given, so an index far beyond the opcodes read is a memory bomb, never a real checkpoint.
  """
  opcodes = 0
  for opcode, arg, _ in pickletools.genops(data):
    opcodes += 1
    if opcode.name in _SET_OPCODES:
      raise CheckpointError(f"{what}: opcode {opcode.name} at opcode {opcodes} builds a set, which no checkpoint holds")
    if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (_is_int(arg) and 0 <= arg < opcodes):
      raise CheckpointError(
        f"{what}: memo index {arg!r:.30} at opcode {opcodes} runs ahead of the pickle "
        f"(the unpickler would allocate {_size(8 * arg) if _is_int(arg) else 'for it'})"
      )
    if opcodes % 4096 == 0:  # charged in blocks, so a pickle bomb stops early
      budget.unpickle(what, 4096)
  budget.unpickle(what, opcodes % 4096)


class _Reader:
  """Builds the tensors of one archive, reading each storage once, under the budget."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, budget: _Budget):
    self._archive = archive
    self._prefix = prefix
    self._budget = budget
    self._storages: dict[str, tuple[_StorageRef, np.ndarray]] = {}

  def storage(self, ref: _StorageRef, tensor: str) -> np.ndarray:
    if ref.key in self._storages:
      first, array = self._storages[ref.key]
      if (first.type.dtype, first.numel) != (ref.type.dtype, ref.numel):
        raise CheckpointError(
          f"tensor '{tensor}': storage {ref.key} is declared as {first.numel} x "
          f"{first.type.name} and as {ref.numel!r:.50} x {ref.type.name}"
        )
      return array
    record = f"{self._prefix}/data/{ref.key}"
    if not _is_int(ref.numel) or ref.numel < 0:
      raise CheckpointError(f"tensor '{tensor}': storage '{record}' has an invalid size {ref.numel!r:.50}")
    try:
      info = self._archive.getinfo(record)
    except KeyError:
      raise CheckpointError(f"checkpoint is missing the storage record '{record}' (of tensor '{tensor}')") from None
    what = f"storage record '{record}' (of tensor '{tensor}')"
    declared = ref.numel * ref.type.dtype.itemsize
    if info.file_size != declared:
      raise CheckpointError(
        f"{what} holds {info.file_size} bytes, but its {ref.type.name} of {ref.numel} elements is {declared} bytes"
      )
    array = _read_member(self._archive, info, self._budget, what).view(ref.type.dtype)
    array.flags.writeable = False  # tensors are views of it
    self._storages[ref.key] = (ref, array)
    return array

  def tensor(self, ref: _TensorRef, name: str) -> np.ndarray:
    """The numpy twin of `torch._utils._rebuild_tensor_v2`, after checking the view against its storage."""
    if not isinstance(ref.storage, _StorageRef):
      raise CheckpointError(f"tensor '{name}' is built from {type(ref.storage).__name__}, not a storage")
    offset, size, stride = ref.offset, ref.size, ref.stride
    if not (
      isinstance(size, (tuple, list))
      and isinstance(stride, (tuple, list))
      and len(size) == len(stride)
      and all(map(_is_int, (offset, *size, *stride)))
    ):
      raise CheckpointError(
        f"tensor '{name}' has a malformed view (offset {offset!r:.50}, size {size!r:.80}, stride {stride!r:.80})"
      )
    size, stride = tuple(size), tuple(stride)
    if offset < 0 or min(stride, default=0) < 0:
      raise CheckpointError(
        f"tensor '{name}' has a negative offset or stride (offset {offset}, stride {stride}); "
        "torch never writes one, refused"
      )
    if min(size, default=0) < 0 or max(size, default=0) > _MAX_DIM:
      raise CheckpointError(f"tensor '{name}' has an invalid size {size}")
    storage = self.storage(ref.storage, name)
    numel = math.prod(size)
    if numel == 0:
      return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))  # exact: Python ints do not overflow
    if last >= storage.size:
      raise CheckpointError(
        f"tensor '{name}' of size {size} and stride {stride} at offset {offset} reaches "
        f"element {last} of a storage of {storage.size} elements"
      )
    if numel > storage.size:
      raise CheckpointError(
        f"tensor '{name}' of size {size} and stride {stride} has {numel} elements but its "
        f"storage only {storage.size}: an expanded (stride-0) view, refused; save "
        "tensor.contiguous() instead"
      )
    self._budget.materialise(f"tensor '{name}'", numel * storage.dtype.itemsize)
    if not size:
      return np.array(storage[offset])  # 0-d (e.g. BatchNorm's num_batches_tracked)
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.ascontiguousarray(view)

  def build(self, obj: Any, name: str, seen: dict[int, tuple[Any, Any]]) -> Any:
    """`obj` with every tensor reference replaced by its array; `name` is the key path used in errors.

    `seen` maps id(original) -> (original, built): shared objects (tied weights memoised by the pickle) and
    cycles are built once, and holding the original keeps its id from being reused.
    """
    if not isinstance(obj, (_TensorRef, dict, list, tuple, Namespace, ScriptModule)):
      return obj
    if id(obj) in seen:
      return seen[id(obj)][1]
    if isinstance(obj, _TensorRef):
      seen[id(obj)] = (obj, self.tensor(obj, name))
      return seen[id(obj)][1]
    seen[id(obj)] = (obj, obj)
    child = lambda key: f"{name}.{key}" if name else str(key)  # noqa: E731
    if isinstance(obj, dict):
      for key in list(obj):
        obj[key] = self.build(obj[key], child(key), seen)
    elif isinstance(obj, list):
      for i, value in enumerate(obj):
        obj[i] = self.build(value, child(i), seen)
    elif isinstance(obj, tuple):
      seen[id(obj)] = (obj, tuple(self.build(v, child(i), seen) for i, v in enumerate(obj)))
    else:  # Namespace / ScriptModule: its attributes are a dict, possibly shared with many others (walked once)
      self.build(vars(obj), name, seen)
    return seen[id(obj)][1]


def _open(path: str) -> zipfile.ZipFile:
  if os.path.isdir(path):
    raise CheckpointError(f"{path} is a directory, not a checkpoint file")
  if os.path.exists(path) and not os.path.isfile(path):
    raise CheckpointError(f"{path} is not a regular file")  # a FIFO or device would block or never end
  try:
    return zipfile.ZipFile(path)
  except FileNotFoundError:
    raise CheckpointError(f"checkpoint file not found: {path}") from None
  except (zipfile.BadZipFile, ValueError, EOFError):
    with open(path, "rb") as f:
      head = f.read(8)
    if head[:2] == b"\x80\x02" or head.startswith(b"\x8a\x0a"):
      raise CheckpointError(
        f"{path} uses PyTorch's legacy (pre-1.6, non-zip) format; re-save it with "
        "a recent torch (torch.save(torch.load(p), p)) and convert again"
      ) from None
    raise CheckpointError(f"{path} is not a PyTorch zip checkpoint (truncated or corrupt)") from None


def load(path: str, *, torchscript: bool = False, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
  """Loads the object pickled in a torch zip checkpoint, with tensors as numpy arrays.

  Args:
    path: a file written by `torch.save` (zip format, torch >= 1.6) or `torch.jit.save` (with
      `torchscript=True`, whose module classes come back as inert `ScriptModule` records).
    max_bytes: cap on the decompressed bytes and, separately, on the tensor bytes the file may produce.

  Raises:
    CheckpointError: the file is missing, truncated, not a zip checkpoint, malformed, or over a cap (the
      message names the tensor or record).
    UnsafeCheckpointError: the pickle names a global outside the allow-list.
  """
  with _open(path) as archive:
    budget = _Budget(max_bytes=max_bytes, file_size=os.path.getsize(path))
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: expected exactly one '<name>/data.pkl' record, found {pickles[:5]}")
    prefix = pickles[0].split("/")[0]
    names = set(archive.namelist())
    if f"{prefix}/byteorder" in names:
      info = archive.getinfo(f"{prefix}/byteorder")
      if info.file_size > 16 or _read_member(archive, info, budget, path).tobytes().strip() != b"little":
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
    info = archive.getinfo(pickles[0])
    if info.file_size > MAX_PICKLE_BYTES:
      raise CheckpointError(
        f"{path}: its pickle '{info.filename}' is {_size(info.file_size)}, above the "
        f"{_size(MAX_PICKLE_BYTES)} a checkpoint's pickle needs"
      )
    what = f"{path}: pickle record '{info.filename}'"
    data = _read_member(archive, info, budget, what).tobytes()
    try:
      _walk_opcodes(data, budget, what)
      obj = _SafeUnpickler(data, torchscript).load()
      return _Reader(archive, prefix, budget).build(obj, "", {})
    except CheckpointError:
      raise
    except RecursionError:
      raise CheckpointError(f"{path}: objects in the pickle are nested too deeply") from None
    except (
      pickle.UnpicklingError,
      EOFError,
      ValueError,
      TypeError,
      IndexError,
      AttributeError,
      KeyError,
      MemoryError,
    ) as e:
      raise CheckpointError(f"{path}: malformed checkpoint pickle ({type(e).__name__}: {e})") from None


def flatten_state_dict(obj: Any, wrappers=("state_dict", "model", "module")) -> dict[str, np.ndarray]:
  """Returns the name -> array mapping of a loaded checkpoint, unwrapping `{'model': ...}`-style dicts."""
  seen = set()
  while isinstance(obj, dict) and id(obj) not in seen:  # a pickle can make {'model': itself}
    seen.add(id(obj))
    arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if arrays and len(arrays) == len(obj):
      bad = [k for k in arrays if not isinstance(k, str)]
      if bad:
        raise CheckpointError(f"state_dict key {bad[0]!r:.100} is not a string")
      return dict(obj)
    inner = next((obj[w] for w in wrappers if w in obj and isinstance(obj[w], dict)), None)
    if inner is None:
      break
    obj = inner
  raise CheckpointError(
    f"checkpoint holds no state_dict (looked for a dict of tensors, possibly under one of {wrappers})"
  )
