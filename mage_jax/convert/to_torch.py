"""A params directory -> the official PyTorch layouts of LTH14/mage (`python -m mage_jax.export`).

Layouts (the object a .pth holds; a .safetensors file holds the flat state_dict):
  * 'mage': `{'model': state_dict}` of `MaskedGenerativeEncoderViT` (models_mage.py) with the VQGAN under
    `vqgan.`: the released pretraining checkpoints, which `gen_img_uncond.py` loads strictly and the
    fine-tuning / linear-probe scripts take as their initialisation;
  * 'vit': `{'model': state_dict}` of `VisionTransformerMage` (models_vit_mage.py) with its head: `head.*`
    (fine-tuned) or `head.0` BatchNorm1d + `head.1` Linear (linear probe), as the released fine-tuned files;
  * 'tokenizer': `{'state_dict': state_dict}` of taming's `VQModel` (as vqgan_jax_strongaug.ckpt).
Names, shapes and dtypes are the official modules' (float32 parameters whatever the training dtype, int64
`position_ids`), including the tensors no computation reads. Those come from the params directory when it was
converted from a PyTorch file (`variables['torch_unused']`, see convert.py), so convert -> export reproduces
the file tensor for tensor; otherwise they are made as the official `__init__` makes them: `position_ids` and
MAGE's fixed 2-D sin-cos `pos_embed` / `decoder_pos_embed` exactly, the randomly initialised ones
(`cls_token`, `mask_token`, `patch_embed`, `decoder_pred`, the ViT's `pos_embed`) drawn from the official
initialisation laws with a fixed seed. The patch size is the tokenizer's downsampling factor; MAGE's image size
is the tokenizer's resolution, the ViT's is `vit_img_size` (timm's default 224, which the official
fine-tuning and probing scripts keep).

mage_jax extras: `class_emb.weight` and `projection_head.*` (see convert.py) in the state_dict, and the params
directory's meta as JSON under `convert.META_KEY` (a top-level entry of the .pth, a metadata entry of the
.safetensors file), from which `python -m mage_jax.convert` rebuilds the exact configs (head counts, for one,
are not visible in the weights).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from mage_jax.convert import convert, safetensors_io, torch_save
from mage_jax.models import layers
from mage_jax.system import atomic
from mage_jax.train import params_io

FORMATS = ("pth", "safetensors")
DEFAULT_VIT_IMG_SIZE = 224
_WRAPPERS = {"mage": "model", "vit": "model", "tokenizer": "state_dict"}
_SEED = 0


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
  """float32 [1 + grid², dim]: util/pos_embed.py's `get_2d_sincos_pos_embed(dim, grid, cls_token=True)`.

  A zero row for the class slot, then per position the sin | cos of its column coordinate times the float64
  frequencies 1 / 10000^(k / (dim/4)), then those of its row coordinate (the reference computes in float64 and
  casts to float32 when it fills the parameter).
  """
  if dim % 4:
    raise ValueError(f"the official sin-cos position table needs a width divisible by 4, got {dim}")
  coords = np.arange(grid, dtype=np.float32)
  cols, rows = np.meshgrid(coords, coords)
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def half(pos):
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([half(cols), half(rows)], axis=1)
  return np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)


def _uniform(rng, bound, shape):
  return rng.uniform(-bound, bound, shape).astype(np.float32)


def _normal02(rng, shape):
  return (0.02 * rng.standard_normal(shape)).astype(np.float32)


def unused_tensors(
  kind: str, meta: Mapping[str, Any], vit_img_size: int = DEFAULT_VIT_IMG_SIZE
) -> dict[str, np.ndarray]:
  """The tensors of the official module that mage_jax has no use for, as its `__init__` makes them.

  Args:
    kind: 'mage' | 'vit' | 'tokenizer' (the tokenizer has none).
    meta: the params directory's meta (model and tokenizer configs; 'vit' head for kind 'vit').
    vit_img_size: image size of the official ViT (sets the shape of its `pos_embed`).
  """
  if kind == "tokenizer":
    return {}
  model = params_io.mage_config_from_meta(meta)
  tok = params_io.tokenizer_config_from_meta(meta)
  patch = 2 ** (len(tok.ch_mult) - 1)
  fan_in = tok.in_channels * patch * patch
  rng = np.random.default_rng(_SEED)
  dim = model.embed_dim
  out = {"token_emb.position_ids": np.arange(model.max_position_embeddings, dtype=np.int64)[None]}
  if kind == "mage":
    grid = tok.token_grid
    dec = model.decoder_embed_dim
    out.update(
      {
        "cls_token": _normal02(rng, (1, 1, dim)),
        "pos_embed": sincos_pos_embed(dim, grid)[None],
        "mask_token": _normal02(rng, (1, 1, dec)),
        "decoder_pos_embed": sincos_pos_embed(dec, grid)[None],
        # models_mage.py: xavier_uniform on the flattened patch kernel; the bias keeps Conv2d's default.
        "patch_embed.proj.weight": _uniform(rng, (6 / (fan_in + dim)) ** 0.5, (dim, tok.in_channels, patch, patch)),
        "patch_embed.proj.bias": _uniform(rng, fan_in**-0.5, (dim,)),
        "decoder_pred.weight": _uniform(rng, (6 / (dec + fan_in)) ** 0.5, (fan_in, dec)),
        "decoder_pred.bias": np.zeros((fan_in,), np.float32),
      }
    )
    return out
  if vit_img_size < patch or vit_img_size % patch:
    raise ValueError(f"vit_img_size={vit_img_size} must be a positive multiple of the patch size {patch}")
  # timm 0.3.2: trunc_normal_(std=.02) (cut at +-2, i.e. 100 sigma) for cls_token and pos_embed; Conv2d's
  # default kaiming_uniform(a=sqrt(5)) for the patch embedding, bound 1/sqrt(fan_in) for weight and bias.
  out.update(
    {
      "cls_token": _normal02(rng, (1, 1, dim)),
      "pos_embed": _normal02(rng, (1, (vit_img_size // patch) ** 2 + 1, dim)),
      "patch_embed.proj.weight": _uniform(rng, fan_in**-0.5, (dim, tok.in_channels, patch, patch)),
      "patch_embed.proj.bias": _uniform(rng, fan_in**-0.5, (dim,)),
    }
  )
  if meta.get("vit", {}).get("head_type") == "bn_linear":
    out["head.0.num_batches_tracked"] = np.zeros((), np.int64)
  return out


def _official_dtype(array: np.ndarray) -> np.ndarray:
  return array.astype(np.float32, copy=False) if np.issubdtype(array.dtype, np.floating) else array


def _stored_unused(variables: Mapping[str, Any], kind: str, meta_kind: str) -> dict[str, np.ndarray]:
  flat = {
    ".".join(path): np.asarray(leaf)
    for path, leaf in traverse_util.flatten_dict(dict(variables.get("torch_unused", {}))).items()
  }
  if kind == "tokenizer" and meta_kind != "tokenizer":
    return {k[len("vqgan.") :]: v for k, v in flat.items() if k.startswith("vqgan.")}
  return flat


def _check_kind(kind: str, meta: Mapping[str, Any], variables: Mapping[str, Any]) -> str:
  if kind not in _WRAPPERS:
    raise ValueError(f"unknown export kind {kind!r}; expected one of {sorted(_WRAPPERS)}")
  meta_kind = meta.get("kind", "mage")
  if kind == "tokenizer":
    if "tokenizer" not in variables or "tokenizer" not in meta:
      raise ValueError(f"the params directory (kind {meta_kind!r}) holds no tokenizer")
  elif kind != meta_kind:
    raise ValueError(
      f"the params directory holds a {meta_kind!r} model; it exports as kind {meta_kind!r} (or "
      f"'tokenizer'), not {kind!r}"
    )
  elif "model" not in variables or "tokenizer" not in variables:
    raise ValueError(f"the params directory lacks the model or tokenizer variables (has {sorted(variables)})")
  return meta_kind


def state_dict(
  variables: Mapping[str, Any],
  meta: Mapping[str, Any],
  kind: str | None = None,
  *,
  vit_img_size: int = DEFAULT_VIT_IMG_SIZE,
) -> collections.OrderedDict:
  """The official state_dict of a params directory's variables (numpy, torch layouts, official dtypes).

  Args:
    variables: `params_io.load` variables ({'model', 'tokenizer', optionally 'projection_head',
      'torch_unused'}).
    meta: its meta.
    kind: 'mage' | 'vit' | 'tokenizer'; default: the meta's kind.
    vit_img_size: see `unused_tensors`.

  Raises:
    ValueError: a kind the directory cannot provide, or variables that do not match the meta's configs.
  """
  kind = kind or meta.get("kind", "mage")
  meta_kind = _check_kind(kind, meta, variables)
  tokenizer = convert.torch_arrays(variables["tokenizer"])
  if kind == "tokenizer":
    arrays = tokenizer
  else:
    model = dict(variables["model"])
    model["params"] = layers.to_loop_layout(dict(model["params"]), scan=True)
    renames = convert.vit_renames(meta.get("vit", {}).get("head_type", "linear")) if kind == "vit" else None
    arrays = {**convert.torch_arrays(model, renames), **unused_tensors(kind, meta, vit_img_size)}
    if kind == "mage" and convert.PROJECTION_HEAD in variables:
      arrays.update(convert.torch_arrays(variables[convert.PROJECTION_HEAD], prefix=f"{convert.PROJECTION_HEAD}."))
    arrays.update({f"vqgan.{k}": v for k, v in tokenizer.items()})
  arrays.update(_stored_unused(variables, kind, meta_kind))
  out = collections.OrderedDict((k, _official_dtype(v)) for k, v in arrays.items())
  _check_round_trip(out, kind, meta)
  return out


def _check_round_trip(sd: Mapping[str, np.ndarray], kind: str, meta: Mapping[str, Any]) -> None:
  """Converting the state_dict back must place every tensor: otherwise the variables do not match the meta."""
  configs = {"tokenizer_config": params_io.tokenizer_config_from_meta(meta)}
  if kind != "tokenizer":
    configs["mage_config"] = dataclasses.replace(params_io.mage_config_from_meta(meta), scan=False)
  report = convert.convert_state_dict(sd, kind, **configs).report
  if not report.ok or report.unexpected:
    raise ValueError(f"the params do not match the configs in their meta ({report.describe()})")


def embedded_meta(meta: Mapping[str, Any], kind: str) -> str:
  """The JSON a file of `kind` carries under `convert.META_KEY`: the meta (without the params format version),
  or only the tokenizer's part for a tokenizer exported from a model directory."""
  if kind == "tokenizer":
    return json.dumps({"kind": kind, "tokenizer": meta["tokenizer"]}, sort_keys=True)
  return json.dumps({k: v for k, v in meta.items() if k != "format_version"}, sort_keys=True)


def write(
  path: str,
  sd: Mapping[str, np.ndarray],
  kind: str,
  meta: Mapping[str, Any],
  fmt: str = "pth",
  *,
  overwrite: bool = False,
) -> None:
  """Writes a state_dict as a .pth (`{'model' | 'state_dict': sd, META_KEY: json}`) or .safetensors file.

  Raises:
    FileExistsError: `path` exists and not `overwrite`.
    ValueError: an unknown format.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass --force to overwrite it")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  # A fresh temporary name beside `path`: a reader never sees half a file, a failed write leaves the old one.
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
  os.close(fd)
  try:
    if fmt == "pth":
      torch_save.save(tmp, {_WRAPPERS[kind]: collections.OrderedDict(sd), convert.META_KEY: embedded_meta(meta, kind)})
    else:
      safetensors_io.save(tmp, sd, {"format": "pt", convert.META_KEY: embedded_meta(meta, kind)})
    atomic.publish(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
