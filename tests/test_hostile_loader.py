"""Hostile checkpoint files and careless command lines, through the real `python -m mage_jax.convert`.

Every file is built here (no binary fixtures) from the official tiny MAGE checkpoint's tensors, by a small writer
of torch's zip format. Each case checks the exit status (1 runtime, 2 usage), that stderr is one line naming the
problem, that nothing outside the output was touched (the case directory is byte-identical afterwards), and that
the converter's peak memory (ru_maxrss of that child, from os.wait4) stays within a margin of converting the valid
checkpoint: the unbounded cases used to take gigabytes.
"""

import concurrent.futures
import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from typing import Callable

import numpy as np
import pytest

from conftest import assert_one_line_error
from mage_jax.convert import torch_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGIN_MB = 64  # above the valid conversion's peak; the refused cases would need 3.6-4.3 GB


# ------------------------------------------------------------------------------ a writer of torch zip files


@dataclasses.dataclass
class View:
  """One tensor as torch pickles it: a storage (key, type, numel) and a strided view of it."""

  key: str
  storage_type: str
  numel: int
  offset: int
  size: tuple
  stride: tuple


_STORAGE_TYPES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _op(obj) -> bytes:
  """Pickle opcodes that push `obj` (a str, int, bool or tuple of ints)."""
  return pickle.dumps(obj, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor_ops(v: View) -> bytes:
  storage = b"(" + _op("storage") + _global("torch", v.storage_type) + _op(v.key) + _op("cpu") + _op(v.numel) + b"tQ"
  return (
    _global("torch._utils", "_rebuild_tensor_v2")
    + b"("
    + storage
    + _op(v.offset)
    + _op(tuple(v.size))
    + _op(tuple(v.stride))
    + _op(False)
    + _global("collections", "OrderedDict")
    + b")R"
    + b"tR"
  )


def _state_dict_pickle(views: dict) -> bytes:
  items = b"".join(_op(name) + _tensor_ops(v) for name, v in views.items())
  return b"\x80\x02" + _global("collections", "OrderedDict") + b")R" + b"(" + items + b"u."


def _member(name: str, data: bytes, *, method: int = 0, crc: int | None = None, size: int | None = None):
  """A zip member: `data` as stored in the archive, with the directory's method, CRC and uncompressed size."""
  return name, data, method, zlib.crc32(data) if crc is None else crc, len(data) if size is None else size


def _zip(path, members) -> None:
  """A plain zip (no zip64) written field by field, so a member's declared size can be anything."""
  out, central = bytearray(), bytearray()
  for name, data, method, crc, size in members:
    n = name.encode()
    central += (
      struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        20,
        20,
        0,
        method,
        0,
        0x21,
        crc,
        len(data),
        size,
        len(n),
        0,
        0,
        0,
        0,
        0,
        len(out),
      )
      + n
    )
    out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size, len(n), 0) + n + data
  eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
  with open(path, "wb") as f:
    f.write(bytes(out + central + eocd))


def _contiguous(arrays: dict) -> tuple[dict, dict]:
  """(name -> View, storage key -> bytes): each array in its own storage, as torch.save writes a state_dict."""
  views, storages = {}, {}
  for i, (name, a) in enumerate(arrays.items()):
    a = np.array(a, order="C")  # keeps 0-d arrays 0-d
    stride = tuple(int(np.prod(a.shape[d + 1 :])) for d in range(a.ndim))
    views[name] = View(str(i), _STORAGE_TYPES[a.dtype], a.size, 0, a.shape, stride)
    storages[str(i)] = a.tobytes()
  return views, storages


def _write(path, views: dict, storages: dict, extra_members=()) -> str:
  members = [_member("archive/data.pkl", _state_dict_pickle(views)), _member("archive/byteorder", b"little")]
  members += [_member(f"archive/data/{k}", data) for k, data in storages.items()]
  _zip(path, members + list(extra_members))
  return str(path)


@pytest.fixture(scope="module")
def tiny_arrays(testdata):
  return torch_pickle.flatten_state_dict(torch_pickle.load(str(testdata / "official_tiny" / "mage.pth")))


def _checkpoint(path, arrays, **replace) -> str:
  """The tiny MAGE checkpoint with some arrays replaced (a value of None drops the key)."""
  arrays = {k: v for k, v in {**arrays, **replace}.items() if v is not None}
  return _write(path, *_contiguous(arrays))


def _with_view(path, arrays, name, view: View, storage: bytes) -> str:
  """The tiny MAGE checkpoint with tensor `name` replaced by `view` of its own storage `storage`."""
  views, storages = _contiguous(arrays)
  views[name] = dataclasses.replace(view, key="hostile")
  storages["hostile"] = storage
  return _write(path, views, storages)


def _deflate_bomb_member(name: str, mib: int):
  """`mib` MiB of zeros as one deflated member (~1 kB per MiB): fully flushed 1 MiB blocks repeat exactly."""
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = c.compress(bytes(2**20)) + c.flush(zlib.Z_FULL_FLUSH)
  assert block == c.compress(bytes(2**20)) + c.flush(zlib.Z_FULL_FLUSH)
  crc, zeros = 0, bytes(64 * 2**20)
  for _ in range(mib // 64):
    crc = zlib.crc32(zeros, crc)
  data = block * mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
  return _member(name, data, method=zipfile.ZIP_DEFLATED, crc=crc, size=mib * 2**20)


# ------------------------------------------------------------------------------ running the binary


@dataclasses.dataclass
class Run:
  returncode: int
  stdout: str
  stderr: str
  peak_mb: float


def _run(module: str, *args: str) -> Run:
  """`python -m module args` with this child's own peak RSS (os.wait4), not the max over every child so far."""
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    proc = subprocess.Popen(
      [sys.executable, "-m", module, *args], stdout=out, stderr=err, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT)
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return Run(proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss / 1024)


def _snapshot(directory) -> dict:
  """Every file under `directory` -> its bytes (directories -> None)."""
  tree = {}
  for root, dirs, files in os.walk(directory):
    for d in dirs:
      tree[os.path.relpath(os.path.join(root, d), directory)] = None
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        tree[os.path.relpath(os.path.join(root, f), directory)] = fh.read()
  return tree


# ------------------------------------------------------------------------------ the cases

QKV = "blocks.0.attn.qkv.weight"  # (192, 64) in the tiny model
FC1 = "blocks.0.mlp.fc1.weight"  # sizes the MLP


def _neg_stride(stride):
  def build(tmp, arrays):
    return _with_view(
      tmp / "evil.pth", arrays, QKV, View("", "FloatStorage", 192 * 64, 0, (192, 64), stride), arrays[QKV].tobytes()
    )

  return build


def _expanded(tmp, arrays):
  return _with_view(
    tmp / "evil.pth",
    arrays,
    FC1,
    View("", "FloatStorage", 4, 0, (30000, 30000), (0, 0)),
    np.ones(4, np.float32).tobytes(),
  )


def _deflate_bomb(tmp, arrays):
  views = {"w": View("bomb", "FloatStorage", 2**29, 0, (2**29,), (1,))}  # 2 GiB of float32
  path = tmp / "evil.pth"
  _zip(
    path,
    [
      _member("archive/data.pkl", _state_dict_pickle(views)),
      _member("archive/byteorder", b"little"),
      _deflate_bomb_member("archive/data/bomb", 2048),
    ],
  )
  assert os.path.getsize(path) < 3 * 2**20
  return str(path)


def _larger_than_declared(tmp, arrays):
  views, storages = _contiguous(arrays)
  views[QKV] = dataclasses.replace(views[QKV], numel=4, size=(2, 2), stride=(2, 1))  # declares 16 bytes
  return _write(tmp / "evil.pth", views, storages)


def _pickle_only(path, pickled: bytes) -> str:
  _zip(path, [_member("archive/data.pkl", pickled), _member("archive/byteorder", b"little")])
  return str(path)


def _memo_bomb(tmp, arrays):
  # LONG_BINPUT 2^28: CPython's unpickler would size its memo to 2^29 entries (4 GiB) for these 9 bytes.
  return _pickle_only(tmp / "evil.pth", b"\x80\x02N" + b"r" + struct.pack("<I", 2**28) + b".")


def _object_bomb(tmp, arrays):
  # 4 Mi empty dicts from 4 MiB of opcodes: ~330 MB of Python objects.
  return _pickle_only(tmp / "evil.pth", b"\x80\x02(" + b"}" * (4 * 2**20) + b"l.")


def _truncated(tmp, arrays):
  with open(os.path.join(ROOT, "tests", "testdata", "official_tiny", "mage.pth"), "rb") as f:
    data = f.read()
  (tmp / "cut.pth").write_bytes(data[: len(data) // 2])
  return str(tmp / "cut.pth")


def _write_json(tmp, text):
  (tmp / "c.json").write_text(text)
  return str(tmp / "c.json")


def _bad_values(arrays, value):
  """QKV with NaN in its first three entries (value 'nan') or as int64 (value 'int')."""
  if value == "int":
    return np.ones(arrays[QKV].shape, np.int64)
  return np.where(np.arange(arrays[QKV].size).reshape(arrays[QKV].shape) < 3, np.nan, arrays[QKV]).astype(np.float32)


def _non_checkpoint_dir(tmp, arrays):
  (tmp / "work" / "variables").mkdir(parents=True)
  (tmp / "work" / "variables" / "x").write_text("user data")
  (tmp / "work" / "notes.txt").write_text("more user data")
  return [_checkpoint(tmp / "s.pth", arrays), f"{tmp}/work"]


def _verify_dir(tmp, arrays):
  for name in ("config.json", "reference.npz"):
    os.symlink(os.path.join(ROOT, "tests", "testdata", "official_tiny", name), tmp / name)
  _checkpoint(tmp / "mage.pth", arrays)
  return [str(tmp), "--max_gb=0.001"]


@dataclasses.dataclass
class Case:
  build: Callable  # (case directory, tiny arrays) -> argv after `python -m module`
  returncode: int
  needles: tuple = ()
  bounded: bool = False  # peak memory within MARGIN_MB of the baseline conversion
  module: str = "mage_jax.convert"


def _src(build_file):
  return lambda t, a: [build_file(t, a), f"{t}/out"]


HEADS = ("--num_heads=4", "--decoder_num_heads=4")
CASES = {
  "baseline": Case(lambda t, a: [_checkpoint(t / "valid.pth", a), f"{t}/out", *HEADS], 0),
  # The loader: refused before anything large is allocated.
  "negative_stride_small": Case(_src(_neg_stride((-64, 1))), 1, (f"'{QKV}' has a negative offset or stride",), True),
  "negative_stride_2pow40": Case(
    _src(_neg_stride((-(2**40), 1))), 1, (f"'{QKV}' has a negative offset or stride",), True
  ),
  "stride0_expansion": Case(_src(_expanded), 1, (f"'{FC1}'", "expanded (stride-0) view"), True),
  "deflate_bomb": Case(_src(_deflate_bomb), 1, ("'archive/data/bomb' (of tensor 'w')", "2.00 GiB", "zip bomb"), True),
  "member_larger_than_declared": Case(
    _src(_larger_than_declared),
    1,
    (f"(of tensor '{QKV}') holds 49152 bytes", "FloatStorage of 4 elements is 16 bytes"),
    True,
  ),
  "truncated_zip": Case(_src(_truncated), 1, ("cut.pth is not a PyTorch zip checkpoint (truncated or corrupt)",), True),
  "pickle_memo_bomb": Case(_src(_memo_bomb), 1, ("memo index 268435456 at opcode 3 runs ahead", "2.00 GiB"), True),
  "pickle_object_bomb": Case(
    _src(_object_bomb), 1, ("pickle record 'archive/data.pkl' holds more opcodes than its file can justify",), True
  ),
  # The converter and the command line.
  "0d_sizing_weight": Case(
    lambda t, a: [_checkpoint(t / "s.pth", a, **{FC1: np.float32(1)}), f"{t}/out"],
    1,
    (f"tensor '{FC1}' has shape ()", "2-d weight is expected"),
  ),
  "nan_weights": Case(
    lambda t, a: [_checkpoint(t / "s.pth", a, **{QKV: _bad_values(a, "nan")}), f"{t}/out", *HEADS],
    1,
    (f"{QKV}: 3 of its 12288 values are NaN/Inf", "nothing written"),
  ),
  "integer_weights": Case(
    lambda t, a: [_checkpoint(t / "s.pth", a, **{QKV: _bad_values(a, "int")}), f"{t}/out", *HEADS],
    1,
    (f"{QKV}: holds int64 values where a float weight belongs",),
  ),
  "directory_as_source": Case(lambda t, a: [str(t), f"{t}/out"], 1, ("is a directory, not a checkpoint file",)),
  "output_under_a_file": Case(
    lambda t, a: [_checkpoint(t / "s.pth", a), f"{t}/s.pth/out"], 1, ("s.pth is not a directory",)
  ),
  "non_checkpoint_dir": Case(
    _non_checkpoint_dir,
    1,
    ("work is not empty and is not a mage_jax params checkpoint (it holds notes.txt, variables)", "--force"),
  ),
  "num_heads_3": Case(
    lambda t, a: [_checkpoint(t / "s.pth", a), f"{t}/out", "--num_heads=3"],
    1,
    ("num_heads=3 does not divide embed_dim=64",),
  ),
  "bad_config_json": Case(
    lambda t, a: [_checkpoint(t / "s.pth", a), f"{t}/out", f"--config={_write_json(t, '{')}"],
    1,
    ("c.json: not a readable JSON file",),
  ),
  "hyphenated_flag": Case(
    lambda t, a: [_checkpoint(t / "s.pth", a), f"{t}/out", "--num-heads=4"],
    2,
    ("Unknown command line flag 'num-heads'",),
  ),
  # The other binaries on the same loader.
  "verify_max_gb": Case(_verify_dir, 2, ("(of tensor 'vqgan.", "raise --max_gb"), module="mage_jax.verify"),
  "fid_setup_negative_stride": Case(
    lambda t, a: ["setup", f"--weights_file={_neg_stride((-(2**40), 1))(t, a)}", f"--out={t}/w.npz"],
    1,
    (f"'{QKV}' has a negative offset or stride",),
    True,
    module="mage_jax.fid.weights",
  ),
}


@pytest.fixture(scope="module")
def results(tiny_arrays, tmp_path_factory):
  """name -> (Run, whether the case directory is unchanged): every case a child process, a few at a time."""
  jobs = {}
  for name, case in CASES.items():
    directory = tmp_path_factory.mktemp(name)
    jobs[name] = (directory, case.build(directory, tiny_arrays))
    jobs[name] += (_snapshot(directory),)
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    runs = dict(zip(jobs, pool.map(lambda name: _run(CASES[name].module, *jobs[name][1]), jobs)))
  return {name: (runs[name], name == "baseline" or _snapshot(jobs[name][0]) == jobs[name][2]) for name in jobs}


@pytest.mark.parametrize("name", [n for n in CASES if n != "baseline"])
def test_bad_input_is_one_line_touches_nothing_in_bounded_memory(name, results):
  case = CASES[name]
  run, untouched = results[name]
  assert_one_line_error(run, case.returncode, *case.needles)
  assert len(run.stderr.strip().splitlines()) == 1, run.stderr  # not even a log line before it
  assert untouched  # no output directory, the pre-existing files byte-identical
  baseline = results["baseline"][0]
  assert baseline.returncode == 0 and "all keys matched" in baseline.stdout, baseline.stderr
  if case.bounded:
    assert run.peak_mb < baseline.peak_mb + MARGIN_MB, (run.peak_mb, baseline.peak_mb)


# ------------------------------------------------------------------------------ the same checks, in process


def test_view_past_storage_and_repeated_views(tiny_arrays, tmp_path):
  past = _with_view(
    tmp_path / "past.pth",
    tiny_arrays,
    QKV,
    View("", "FloatStorage", 192 * 64, 64, (192, 64), (64, 1)),
    tiny_arrays[QKV].tobytes(),
  )
  with pytest.raises(torch_pickle.CheckpointError, match=f"'{QKV}' .* reaches element 12351 of a storage of 12288"):
    torch_pickle.load(past)
  views, storages = _contiguous({"a": np.zeros(4, np.float32)})
  storages["big"] = bytes(4 * 2**20)
  for i in range(16):  # 16 views of one 4 MiB storage: 64 MiB of tensors from 4 MiB stored
    views[f"extra.{i}"] = View("big", "FloatStorage", 2**20, 0, (2**20,), (1,))
  with pytest.raises(torch_pickle.CheckpointError, match="views repeating the same storage are refused"):
    torch_pickle.load(_write(tmp_path / "views.pth", views, storages))


def test_max_bytes_cap(tiny_arrays, tmp_path):
  src = _checkpoint(tmp_path / "s.pth", tiny_arrays)
  assert len(torch_pickle.load(src)) == len(tiny_arrays)
  with pytest.raises(torch_pickle.CheckpointError, match=r"above the loader's cap of 1048576 .*; raise --max_gb"):
    torch_pickle.load(src, max_bytes=2**20)


def test_malformed_views_and_storages(tmp_path):
  def load(views, storages):
    return torch_pickle.load(_write(tmp_path / "m.pth", views, storages))

  four = {"0": np.arange(4, dtype=np.float32).tobytes()}
  for view, match in [
    (View("0", "FloatStorage", 4, 4, (), ()), "reaches element 4"),  # 0-d past the end
    (View("0", "FloatStorage", 4, -1, (), ()), "negative offset"),  # would index from the end
    (View("0", "FloatStorage", 4, 0, (2, 2), (2,)), "malformed view"),  # rank of size != stride
    (View("0", "FloatStorage", 4, 0, (2, -2), (1, 1)), "invalid size"),
    (View("0", "FloatStorage", 5, 0, (4,), (1,)), "is 20 bytes"),  # numel disagrees with the member
  ]:
    with pytest.raises(torch_pickle.CheckpointError, match=match):
      load({"t": view}, four)
  twice = {"a": View("0", "FloatStorage", 4, 0, (4,), (1,)), "b": View("0", "LongStorage", 2, 0, (2,), (1,))}
  with pytest.raises(torch_pickle.CheckpointError, match="'b': storage 0 is declared as 4 x FloatStorage"):
    load(twice, four)
  ok = load({"s": View("0", "FloatStorage", 4, 2, (), ()), "t": View("0", "FloatStorage", 4, 1, (2,), (2,))}, four)
  assert ok["s"].shape == () and ok["s"] == 2 and ok["t"].tolist() == [1.0, 3.0]
  cyclic = torch_pickle.load(_pickle_only(tmp_path / "cyclic.pth", b"\x80\x02}q\x00" + _op("model") + b"h\x00s."))
  with pytest.raises(torch_pickle.CheckpointError, match="holds no state_dict"):  # {'model': itself}: no hang
    torch_pickle.flatten_state_dict(cyclic)
  sets = b"\x80\x02\x8f(K\x01\x90."  # EMPTY_SET, ADDITEMS
  with pytest.raises(torch_pickle.CheckpointError, match="EMPTY_SET at opcode 2 builds a set"):
    torch_pickle.load(_pickle_only(tmp_path / "set.pth", sets))
  bz2 = tmp_path / "bz2.pth"
  _zip(
    bz2,
    [
      _member("archive/data.pkl", _state_dict_pickle({"t": View("0", "FloatStorage", 4, 0, (4,), (1,))})),
      _member("archive/data/0", four["0"], method=zipfile.ZIP_BZIP2),
    ],
  )
  with pytest.raises(torch_pickle.CheckpointError, match="compression method 12"):
    torch_pickle.load(str(bz2))


def test_shared_tensor_is_built_once(tmp_path):
  """A tensor the pickle memoises and references twice (tied weights) is one array, counted once."""
  view = View("0", "FloatStorage", 2**20, 0, (2**20,), (1,))
  items = _op("a") + _tensor_ops(view) + b"q\x05" + _op("b") + b"h\x05"  # BINPUT 5, then BINGET 5
  pickled = b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + items + b"u."
  path = tmp_path / "tied.pth"
  _zip(path, [_member("archive/data.pkl", pickled), _member("archive/data/0", bytes(4 * 2**20))])
  sd = torch_pickle.load(str(path), max_bytes=4 * 2**20 + 2**16)  # two copies would exceed the cap
  assert sd["a"] is sd["b"] and sd["a"].shape == (2**20,)


def test_containers_are_never_copied_twice(tmp_path):
  """A few bytes naming one large list or dict many times (OrderedDict(x), BUILD onto many objects) allocate it
  once: 400 such copies of 20k pairs would take ~800 MB."""
  import tracemalloc

  pairs = b"(" + b"".join(b"J" + struct.pack("<i", i) + b"N\x86" for i in range(20000)) + b"l" + b"r\x01\x00\x00\x00"
  state = b"}(" + b"".join(_op(f"k{i}") + b"N" for i in range(20000)) + b"u" + b"r\x02\x00\x00\x00"
  od = _global("collections", "OrderedDict") + b"r\x03\x00\x00\x00"
  ns = _global("argparse", "Namespace") + b"r\x04\x00\x00\x00"
  copies = b"".join(
    b"j\x03\x00\x00\x00j\x01\x00\x00\x00\x85R" + b"j\x04\x00\x00\x00)Rj\x02\x00\x00\x00b" for _ in range(400)
  )
  path = _pickle_only(tmp_path / "copies.pth", b"\x80\x02" + pairs + state + od + ns + b"(" + copies + b"l.")
  tracemalloc.start()
  try:
    obj = torch_pickle.load(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert len(obj) == 800 and obj[0] is obj[2] and len(obj[0]) == 20000 and vars(obj[1]) is vars(obj[3])
  assert peak < 40 * 2**20, peak


def _safetensors(path, header: dict, data: bytes) -> str:
  text = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(text)) + text + data)
  return str(path)


def test_safetensors_overlaps_header_and_cap(tmp_path):
  from mage_jax.convert import convert, safetensors_io

  f32 = lambda begin, end: {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}  # noqa
  # 64 names for the same 4 MiB: 256 MiB of arrays from a 4 MiB file if each were read.
  views = _safetensors(
    tmp_path / "views.safetensors", {f"t{i}": f32(0, 4 * 2**20) for i in range(64)}, bytes(4 * 2**20)
  )
  with pytest.raises(torch_pickle.CheckpointError, match="tensor 't1' overlaps tensor 't0'"):
    convert.load_checkpoint(views)
  # A 4 MiB header (metadata padding) parses into up to ~40x its size in objects: more than the file justifies.
  header = _safetensors(
    tmp_path / "header.safetensors", {"__metadata__": {"x": "[]," * 2**20}, "t": f32(0, 16)}, bytes(16)
  )
  with pytest.raises(torch_pickle.CheckpointError, match="header is more than a file of"):
    safetensors_io.load(header)
  fine = _safetensors(tmp_path / "fine.safetensors", {"a": f32(0, 2**20), "b": f32(2**20, 2**21)}, bytes(2**21))
  assert set(safetensors_io.load(fine)[0]) == {"a", "b"}
  with pytest.raises(torch_pickle.CheckpointError, match="above the loader's cap of 1048576; raise --max_gb"):
    convert.load_checkpoint(fine, max_bytes=2**20)
  # An exported file's embedded meta is parsed as JSON: its length is bounded before that.
  inner = b"}(" + _op("w") + _tensor_ops(View("0", "FloatStorage", 4, 0, (4,), (1,))) + b"u"
  pickled = b"\x80\x02}(" + _op("model") + inner + _op("mage_jax") + _op("[" * (2**20 + 1)) + b"u."
  meta = tmp_path / "meta.pth"
  _zip(meta, [_member("archive/data.pkl", pickled), _member("archive/data/0", bytes(16))])
  with pytest.raises(torch_pickle.CheckpointError, match="the embedded 'mage_jax' entry holds 1048577 characters"):
    convert.load_checkpoint(str(meta))


def test_convert_refusals_in_process(tiny_arrays, tmp_path):
  from mage_jax.convert import convert, job

  nan = _bad_values(tiny_arrays, "nan")
  nan[0, 0] = np.inf
  sd = {
    **tiny_arrays,
    QKV: np.float32(1),
    QKV.replace("0", "1"): nan,
    FC1.replace("0", "1"): np.full(tiny_arrays[FC1].shape, 1e300),
  }  # float64 overflowing float32
  report = convert.convert_state_dict(sd, num_heads=4, decoder_num_heads=4).report
  assert report.mismatched == [f"{QKV}: () -> expected (64, 192) at params/blocks_0/attn/qkv/kernel"]
  assert report.invalid == [
    f"{QKV.replace('0', '1')}: 3 of its 12288 values are NaN/Inf (as float32)",
    f"{FC1.replace('0', '1')}: 16384 of its 16384 values are NaN/Inf (as float32)",
  ]
  assert not report.ok and report.describe().startswith("2 invalid: ")
  with pytest.raises(ValueError, match="c.json: mage.num_heads must be a positive integer, got '4'"):
    job.sizes_from_config_json(_write_json(tmp_path, json.dumps({"mage": {"num_heads": "4"}})))
  with pytest.raises(ValueError, match="c.json: expected a JSON object"):
    job.sizes_from_config_json(_write_json(tmp_path, "[1]"))
  with pytest.raises(FileNotFoundError, match="config file not found: .*none.json"):
    job.sizes_from_config_json(str(tmp_path / "none.json"))


def test_force_replaces_only_what_save_writes(tmp_path):
  from mage_jax.train import params_io

  out = tmp_path / "work"
  (out / "variables").mkdir(parents=True)
  (out / "variables" / "x").write_text("user data")
  (out / "notes.txt").write_text("more user data")
  with pytest.raises(FileExistsError, match="is not empty and is not a mage_jax params checkpoint"):
    params_io.save(str(out), {"model": {"params": {"w": np.ones(2, np.float32)}}}, {"kind": "mage"})
  assert (out / "variables" / "x").read_text() == "user data"
  params_io.save(str(out), {"model": {"params": {"w": np.ones(2, np.float32)}}}, {"kind": "mage"}, overwrite=True)
  assert (out / "notes.txt").read_text() == "more user data" and not (out / "variables" / "x").exists()
  assert params_io.read_meta(str(out))["kind"] == "mage"
  with pytest.raises(FileExistsError, match="already holds a mage_jax checkpoint"):
    params_io.check_destination(str(out))


def test_fid_setup_keeps_a_foreign_out_file(tmp_path):
  from mage_jax.fid import weights

  out = tmp_path / "w.npz"
  out.write_text("user data")
  with pytest.raises(FileExistsError, match="is not FID Inception weights written by setup; pass --force"):
    weights.setup(weights_file=str(tmp_path / "none.pt"), out=out)
  assert out.read_text() == "user data"
  with pytest.raises(weights.WeightsError, match="not found"):  # with overwrite, past the check to the source
    weights.setup(weights_file=str(tmp_path / "none.pt"), out=out, overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_output_parent(tmp_path):
  from mage_jax.train import params_io

  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  try:
    with pytest.raises(PermissionError, match=f"{locked} is not writable"):
      params_io.check_destination(str(locked / "out"))
  finally:
    locked.chmod(0o755)
