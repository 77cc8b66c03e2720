"""Reading and checking FID Inception weights: torch files and mappings to `inception.Params`, and the npz cache.

Sources in either naming (TF graph or torchvision, see `mage_jax.fid.weights`) are renamed to one canonical
naming, and every source, the npz cache included, passes the same checks in `params_from_canonical`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

from mage_jax.convert import torch_pickle
from mage_jax.fid import inception
from mage_jax.system import atomic

FORMAT = "mage_jax.fid.inception_weights/1"
# Here rather than in `install`: `load_npz`'s errors tell the reader to run it.
SETUP_COMMAND = "python -m mage_jax.fid.weights setup"

_BN_FIELDS = ("gamma", "beta", "mean", "var")


class WeightsError(ValueError):
  """A weight file or mapping is not the FID Inception (missing/unexpected/misshapen tensors)."""


@dataclasses.dataclass
class InceptionWeights:
  """Converted weights.

  Attributes:
    params: `inception.Params` as numpy float32 (kernels HWIO).
    weights_id: sha1 of the source file ("in-memory" for mappings); part of the stats cache key.
    source: human-readable origin.
  """

  params: dict[str, dict[str, np.ndarray]]
  weights_id: str
  source: str

  @property
  def has_logits(self) -> bool:
    return "fc" in self.params


# ----------------------------------------------------------------------------------------------------
# Name tables. Canonical names are the TF graph's in torch layout: "<conv>.weight" [out, in, kh, kw],
# "<conv>.{gamma,beta,mean,var}" [out], "fc.weight" [1008, 2048], "fc.bias" [1008].


def expected_shapes(with_fc: bool) -> dict[str, tuple[int, ...]]:
  shapes = {}
  for spec in inception.CONVS:
    shapes[f"{spec.name}.weight"] = spec.torch_weight_shape
    for f in _BN_FIELDS:
      shapes[f"{spec.name}.{f}"] = (spec.out_ch,)
  if with_fc:
    shapes["fc.weight"] = (inception.NUM_LOGITS, inception.FEATURE_DIM)
    shapes["fc.bias"] = (inception.NUM_LOGITS,)
  return shapes


_TORCHVISION_BLOCKS = {
  "mixed": "Mixed_5b",
  "mixed_1": "Mixed_5c",
  "mixed_2": "Mixed_5d",
  "mixed_3": "Mixed_6a",
  "mixed_4": "Mixed_6b",
  "mixed_5": "Mixed_6c",
  "mixed_6": "Mixed_6d",
  "mixed_7": "Mixed_6e",
  "mixed_8": "Mixed_7a",
  "mixed_9": "Mixed_7b",
  "mixed_10": "Mixed_7c",
}
_TORCHVISION_STEM = {
  "conv": "Conv2d_1a_3x3",
  "conv_1": "Conv2d_2a_3x3",
  "conv_2": "Conv2d_2b_3x3",
  "conv_3": "Conv2d_3b_1x1",
  "conv_4": "Conv2d_4a_3x3",
}
# Per block type: TF layer (relative to the block) -> torchvision branch module.
_TORCHVISION_BRANCHES = {
  "A": {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
  },
  "B": {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
  },
  "C": {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
  },
  "D": {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
  },
  "E": {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
  },
}
_TORCHVISION_FIELDS = {
  "weight": "conv.weight",
  "gamma": "bn.weight",
  "beta": "bn.bias",
  "mean": "bn.running_mean",
  "var": "bn.running_var",
}


def torchvision_names() -> dict[str, str]:
  """Canonical (TF-graph) name -> pytorch-fid / torch-fidelity state_dict name, for every tensor."""
  conv_map = dict(_TORCHVISION_STEM)
  for block, kind, _ in inception.BLOCKS:
    for rel, branch in _TORCHVISION_BRANCHES[kind].items():
      conv_map[f"{block}.{rel}"] = f"{_TORCHVISION_BLOCKS[block]}.{branch}"
  missing = set(inception.CONV_BY_NAME) ^ set(conv_map)
  assert not missing, missing
  names = {
    f"{tf}.{field}": f"{tv}.{tv_field}"
    for tf, tv in conv_map.items()
    for field, tv_field in _TORCHVISION_FIELDS.items()
  }
  names["fc.weight"], names["fc.bias"] = "fc.weight", "fc.bias"
  return names


def _canonical_tf_name(name: str) -> str:
  for prefix in ("net.", "layers."):  # fid-helper wraps the net in `net`; both nest it in `layers`.
    if name.startswith(prefix):
      name = name[len(prefix) :]
  if name.startswith("output."):  # StyleGAN2-ADA's classifier.
    name = "fc." + name[len("output.") :]
  return name


def _canonical_from_tf_names(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {_canonical_tf_name(k): v for k, v in flat.items()}


def _canonical_from_torchvision_names(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  back = {tv: tf for tf, tv in torchvision_names().items()}
  out = {}
  for key, value in flat.items():
    name = key[len("module.") :] if key.startswith("module.") else key
    if name.endswith(".num_batches_tracked"):
      continue
    out[back.get(name, name)] = value
  return out


def canonicalize(flat: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], str]:
  """Renames a flat state_dict to canonical names.

  Returns:
    (renamed mapping, naming): naming is "torchvision" (pytorch-fid/torch-fidelity) or "tf" (TF graph:
    default_1.pt, StyleGAN2-ADA), detected from the keys.
  """
  keys = list(flat)
  if any(k.split(".")[0] in ("Conv2d_1a_3x3", "Mixed_5b") or k.startswith("module.Conv2d_1a_3x3") for k in keys):
    return _canonical_from_torchvision_names(flat), "torchvision"
  if any(k.endswith("conv.beta") or k.endswith("conv.mean") for k in keys):
    return _canonical_from_tf_names(flat), "tf"
  raise WeightsError(
    "not an FID Inception state_dict: expected pytorch-fid/torch-fidelity names (Conv2d_1a_3x3.conv.weight, "
    f"Mixed_5b.branch1x1..., fc.weight) or TF-graph names (layers.conv.weight/beta/mean/var); first keys: "
    f"{keys[:5]}"
  )


def params_from_canonical(flat: Mapping[str, Any], source: str = "mapping", naming: str = "tf") -> dict[str, dict]:
  """Validates canonical tensors and builds `inception.Params` (float32, HWIO kernels).

  `gamma` may be absent (the TF graph has none: it is 1). The classifier is optional but must be whole.
  Error messages name tensors in the source's `naming` ("tf" or "torchvision").

  Raises:
    WeightsError: a tensor is missing, misshapen, non-finite, or unexpected.
  """
  flat = dict(flat)
  show = torchvision_names().get if naming == "torchvision" else (lambda k, d=None: k)
  flat_fc = {k for k in flat if k.startswith("fc.")}
  with_fc = bool(flat_fc)
  shapes = expected_shapes(with_fc)
  optional = {f"{s.name}.gamma" for s in inception.CONVS}
  missing = [show(k, k) for k in shapes if k not in flat and k not in optional]
  if missing:
    raise WeightsError(f"{source}: not a complete FID Inception: {len(missing)} tensor(s) missing, e.g. {missing[:6]}")
  unexpected = sorted(set(flat) - set(shapes))
  if unexpected:
    raise WeightsError(
      f"{source}: unexpected tensor(s) for the FID Inception: {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
    )
  for k, want in shapes.items():
    if k in flat and tuple(np.shape(flat[k])) != want:
      raise WeightsError(f"{source}: tensor {show(k, k)} has shape {tuple(np.shape(flat[k]))}, expected {want}")

  def f32(k):
    a = np.asarray(flat[k], dtype=np.float32)
    if not np.all(np.isfinite(a)):
      raise WeightsError(f"{source}: tensor {show(k, k)} holds non-finite values")
    return a

  params: dict[str, dict] = {}
  for spec in inception.CONVS:
    n = spec.name
    params[n] = {
      "kernel": np.ascontiguousarray(f32(f"{n}.weight").transpose(2, 3, 1, 0)),
      "gamma": f32(f"{n}.gamma") if f"{n}.gamma" in flat else np.ones(spec.out_ch, np.float32),
      "beta": f32(f"{n}.beta"),
      "mean": f32(f"{n}.mean"),
      "var": f32(f"{n}.var"),
    }
    if np.any(params[n]["var"] < 0):
      raise WeightsError(f"{source}: tensor {show(n + '.var', n + '.var')} has negative variances")
  if with_fc:
    params["fc"] = {"kernel": np.ascontiguousarray(f32("fc.weight").T), "bias": f32("fc.bias")}
  return params


# ----------------------------------------------------------------------------------------------------
# TorchScript / torch files.


def _load_torch_file(path: str, max_bytes: int) -> Any:
  try:
    return torch_pickle.load(path, torchscript=True, max_bytes=max_bytes)
  except torch_pickle.CheckpointError as e:
    raise WeightsError(str(e)) from None


def _walk_script_module(obj, prefix: str, tensors: dict, attrs: dict, kinds: dict, seen: set[int]) -> None:
  # A module tree holds each module (and attribute dict) once; a pickle can share or cycle them, and walking
  # every path of such a graph could take exponential time.
  if id(vars(obj)) in seen:
    raise WeightsError(
      f"TorchScript module '{prefix.rstrip('.')}' shares its attributes with another module "
      "(a graph, not a module tree)"
    )
  seen.add(id(vars(obj)))
  kinds[prefix.rstrip(".")] = getattr(obj, "qualified_name", "")
  for key, value in vars(obj).items():
    if isinstance(value, torch_pickle.ScriptModule):
      _walk_script_module(value, f"{prefix}{key}.", tensors, attrs, kinds, seen)
    elif isinstance(value, np.ndarray):
      tensors[prefix + key] = value
    elif key in ("stride", "padding"):
      attrs[prefix + key] = value


def _check_script_layout(attrs: Mapping[str, Any], kinds: Mapping[str, str], source: str) -> None:
  """Compares the file's conv strides/paddings and E-block pool types with `inception.CONVS`."""
  for key, value in attrs.items():
    conv, field = _canonical_tf_name(key).rsplit(".", 1)
    spec = inception.CONV_BY_NAME.get(conv)
    if spec is None:
      continue
    got = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    want = (spec.stride, spec.stride) if field == "stride" else spec.padding
    if got != want:
      raise WeightsError(f"{source}: conv {conv} has {field} {value}, but the FID Inception has {want}")
  for name, qualified in kinds.items():
    c = _canonical_tf_name(name)
    for block, pool in inception.E_BLOCK_POOL.items():
      if c == f"{block}.tower_2_pool" and qualified:
        want = "MaxPool2d" if pool == "max" else "AvgPool2d"
        if not qualified.endswith(want):
          raise WeightsError(f"{source}: {name} is a {qualified}, but the FID Inception uses {want} there")


def read_torch_file(
  path: str | os.PathLike, max_bytes: int = torch_pickle.DEFAULT_MAX_BYTES
) -> tuple[dict[str, np.ndarray], str]:
  """Reads a torch state_dict or TorchScript file: (canonical name -> array, naming); not yet validated.

  `max_bytes` caps what the file may make the loader allocate (see `torch_pickle.load`).
  """
  path = os.fspath(path)
  obj = _load_torch_file(path, max_bytes)
  if isinstance(obj, torch_pickle.ScriptModule):
    tensors, attrs, kinds = {}, {}, {}
    _walk_script_module(obj, "", tensors, attrs, kinds, set())
    if not tensors:
      raise WeightsError(f"{path}: the TorchScript module holds no tensors")
    _check_script_layout(attrs, kinds, path)
    return canonicalize(tensors)
  return canonicalize(_flatten_state_dict(obj, path))


def _flatten_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
  try:
    return torch_pickle.flatten_state_dict(obj)
  except torch_pickle.CheckpointError as e:
    raise WeightsError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# npz cache.


def save_npz(weights: InceptionWeights, path: str | os.PathLike) -> pathlib.Path:
  """Writes the converted weights atomically (a partial file never replaces a good one)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {f"{layer}/{field}": value for layer, fields in weights.params.items() for field, value in fields.items()}
  arrays["__format__"] = np.array(FORMAT)
  arrays["__weights_id__"] = np.array(weights.weights_id)
  arrays["__source__"] = np.array(weights.source)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    atomic.publish(tmp, str(path))
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def load_npz(path: str | os.PathLike) -> InceptionWeights:
  """Loads weights written by `save_npz`, checking every tensor.

  Raises:
    FileNotFoundError: no such file.
    WeightsError: wrong format, or a missing/misshapen tensor.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"FID Inception weights file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise WeightsError(f"{path}: unreadable npz ({type(e).__name__}: {e})") from None
  fmt = str(data.pop("__format__", ""))
  if fmt != FORMAT:
    raise WeightsError(
      f"{path}: not a converted FID Inception file (format {fmt!r}, expected {FORMAT!r}); rerun `{SETUP_COMMAND}`"
    )
  weights_id = str(data.pop("__weights_id__", "unknown"))
  source = str(data.pop("__source__", str(path)))
  flat = {}
  for key, value in data.items():
    layer, _, field = key.rpartition("/")
    if field == "kernel":
      # Back to torch layout so one validator serves every source.
      flat[f"{layer}.weight"] = value.T if layer == "fc" else value.transpose(3, 2, 0, 1)
    else:
      flat[f"{layer}.{field}"] = value
  return InceptionWeights(params_from_canonical(flat, str(path)), weights_id, source)


def weights_id_of(path: str | os.PathLike) -> str:
  """The weights id stored in a converted npz, read without loading the tensors."""
  with np.load(path, allow_pickle=False) as z:
    return str(z["__weights_id__"]) if "__weights_id__" in z.files else "unknown"


def _sha1(path: str | os.PathLike) -> str:
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()
