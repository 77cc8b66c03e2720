"""PyTorch state_dicts of LTH14/mage (tokenizer, MAGE/MAGE-C pretraining, fine-tuned and linear-probe ViT)
<-> flax param trees, with missing / unexpected / mis-shaped keys reported by name.

Module names in mage_jax follow the PyTorch keys, so one table (`torch_key`, `to_flax_layout` /
`to_torch_layout`) maps names both ways: ModuleList indices merge into the name (`blocks.3.attn.qkv.weight`
<-> `blocks_3/attn/qkv`) and the leaf is renamed to what the flax tree holds (`kernel` transposed, `scale`,
`embedding`, or the param itself). Import (`convert_tree`) looks torch keys up in the table built from the
target tree; export (`torch_arrays`) applies it to a variables tree.

Beyond the official keys (mage_jax extras, read back by `convert_state_dict`):
  * `class_emb.weight` [C+1, Dd]: the label table of a class-conditional MAGE (`models/class_cond.py`);
  * `projection_head.<name>.{weight,bias}`: a MAGE-C projection head (`contrastive.ProjectionHead`, layers
    `hidden_<i>`, `norm_<i>`, `out`; Linear weights in torch's [out, in] layout).
Tensors of the official modules that no computation reads (`UNUSED_KEYS`) are kept beside the model, under
`variables['torch_unused']` (nested by the dots of their keys), so an export reproduces the source file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from mage_jax.convert import safetensors_io, torch_pickle
from mage_jax.convert.torch_pickle import CheckpointError
from mage_jax.models.class_cond import ClassCondConfig, ClassCondMAGE, class_cond_config
from mage_jax.models.mage import MAGE, MAGEConfig
from mage_jax.models.vit import MAGEViT
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.objectives import contrastive
from mage_jax.train import params_io

# Tensors of the official modules (`models_mage.py`) that no computation reads; conversion drops them silently.
UNUSED_KEYS = re.compile(
  r"^(cls_token|pos_embed|mask_token|decoder_pos_embed|token_emb\.position_ids|patch_embed\..*|"
  r"decoder_pred\..*|.*num_batches_tracked)$"
)

KINDS = ("tokenizer", "mage", "vit")
# mage_jax extras beside the official keys (module docstring) and the entry of an exported file that holds the
# params directory's meta as JSON (top-level key of a .pth, `__metadata__` key of a .safetensors file).
CLASS_EMBEDDING = "class_emb.weight"
PROJECTION_HEAD = "projection_head"
META_KEY = "mage_jax"


@dataclasses.dataclass
class Report:
  """What a conversion consumed and what it could not place."""

  missing: list[str] = dataclasses.field(default_factory=list)  # flax paths nobody provided
  unexpected: list[str] = dataclasses.field(default_factory=list)  # torch keys with no flax home
  mismatched: list[str] = dataclasses.field(default_factory=list)  # "key: torch shape -> expected shape"
  ignored: list[str] = dataclasses.field(default_factory=list)  # known-unused torch keys
  invalid: list[str] = dataclasses.field(default_factory=list)  # "key: why its values are unusable"

  def merge(self, other: "Report"):
    for f in dataclasses.fields(self):
      getattr(self, f.name).extend(getattr(other, f.name))

  @property
  def ok(self) -> bool:
    return not (self.missing or self.mismatched or self.invalid)

  def describe(self) -> str:
    lines = []
    for name in ("invalid", "missing", "mismatched", "unexpected"):
      items = getattr(self, name)
      if items:
        lines.append(f"{len(items)} {name}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
    return "\n".join(lines) or "all keys matched"


# nn.ModuleList attributes of the official modules: entry i is `name.i` in a torch key and `name_i` in flax.
MODULE_LISTS = frozenset({"blocks", "decoder_blocks", "down", "up", "block"})
# ... except under the VQGAN's `mid`, whose `block_1` / `block_2` are attributes spelt the same in both.
_ATTRIBUTE_PARENTS = frozenset({"mid"})
# (collection, flax leaf) -> torch leaf; every other leaf keeps its name (`bias`, `decoder_pos_embed_learned`).
TORCH_LEAVES = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "embedding"): "weight",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}
# torch -> flax axis order of kernels by rank: Linear [out, in] -> Dense [in, out]; Conv2d [O, I, kh, kw] ->
# Conv [kh, kw, I, O] (no spatial flip: both cross-correlate).
_KERNEL_AXES = {2: (1, 0), 4: (2, 3, 1, 0)}
# Torch spellings of the linear probe's head (`Sequential(BatchNorm1d, Linear)`).
PROBE_HEAD_RENAMES = {"head_bn": "head.0", "head": "head.1"}


def torch_key(path: tuple[str, ...], renames: Mapping[str, str] | None = None) -> str:
  """The torch key of a flax variable: ('params', 'decoder', 'up_3', 'block_0', 'conv1', 'kernel') ->
  'decoder.up.3.block.0.conv1.weight'.

  Args:
    path: (collection, *module names, leaf).
    renames: torch spellings of top-level flax modules (e.g. `PROBE_HEAD_RENAMES`).
  """
  collection, *modules, leaf = path
  parts: list[str] = []
  for i, name in enumerate(modules):
    base, _, index = name.rpartition("_")
    if i == 0 and renames and name in renames:
      parts.append(renames[name])
    elif index.isdigit() and base in MODULE_LISTS and not (parts and parts[-1] in _ATTRIBUTE_PARENTS):
      parts += [base, index]
    else:
      parts.append(name)
  return ".".join(parts + [TORCH_LEAVES.get((collection, leaf), leaf)])


def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  axes = _KERNEL_AXES.get(array.ndim) if leaf == "kernel" else None
  return array.transpose(axes) if axes else array


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  axes = _KERNEL_AXES.get(array.ndim) if leaf == "kernel" else None
  return array.transpose(np.argsort(axes)) if axes else array


def _unusable(source: np.ndarray, value: np.ndarray) -> str | None:
  """Why a tensor cannot be a float weight (integer/bool source, NaN/Inf after the cast), or None."""
  if source.dtype.kind in "biu":
    return f"holds {source.dtype} values where a float weight belongs"
  bad = params_io.nonfinite_count(value)
  if bad:
    return f"{bad} of its {value.size} values are NaN/Inf (as {value.dtype})"
  return None


def convert_tree(
  state_dict: Mapping[str, np.ndarray], target: Mapping[str, Any], renames: Mapping[str, str] | None = None
) -> tuple[dict, Report]:
  """Maps torch arrays onto `target` ({'params': tree, optionally 'batch_stats': tree} of shapes).

  Args:
    state_dict: flat torch key -> numpy array (already stripped of any module prefix).
    target: variables tree whose leaves have `.shape` (e.g. from `jax.eval_shape(model.init, ...)`).
    renames: see `torch_key`.
  Returns:
    (variables with numpy leaves in the target structure, report). Leaves are views of the inputs where the
    layout allows (no copy of full-size checkpoints).
  """
  expected = traverse_util.flatten_dict(target)
  names = {torch_key(path, renames): path for path in expected}
  result: dict[tuple[str, ...], np.ndarray] = {}
  report = Report()
  for key, array in state_dict.items():
    if UNUSED_KEYS.match(key):
      report.ignored.append(key)
      continue
    dest = names.get(key)
    if dest is None:
      report.unexpected.append(key)
      continue
    value = to_flax_layout(dest[-1], np.asarray(array))
    if tuple(value.shape) != tuple(expected[dest].shape):
      report.mismatched.append(
        f"{key}: {tuple(array.shape)} -> expected {tuple(expected[dest].shape)} at {'/'.join(dest)}"
      )
      continue
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
      result[dest] = value.astype(expected[dest].dtype, copy=False)
    problem = _unusable(array, result[dest])
    if problem:
      report.invalid.append(f"{key}: {problem}")
  report.missing = ["/".join(p) for p in expected if p not in result]
  return traverse_util.unflatten_dict(result), report


def torch_arrays(
  variables: Mapping[str, Any], renames: Mapping[str, str] | None = None, prefix: str = ""
) -> dict[str, np.ndarray]:
  """The inverse of `convert_tree`: a variables tree -> {prefix + torch key: array in torch layout}."""
  return {
    prefix + torch_key(path, renames): to_torch_layout(path[-1], np.asarray(leaf))
    for path, leaf in traverse_util.flatten_dict(dict(variables)).items()
  }


# ---------------------------------------------------------------------------------------------------------
# Inferring sizes from a state_dict (shapes do not reveal head counts: see `infer_*`).


def _count(sd, pattern):
  rx = re.compile(pattern)
  return len({m.group(1) for k in sd if (m := rx.match(k))})


def _shape(sd: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
  """The shape of the tensor that sizes part of the model, refusing one that cannot (absent, wrong rank, empty)."""
  if key not in sd:
    raise CheckpointError(f"checkpoint has no tensor '{key}', which the model's size is read from")
  shape = tuple(np.shape(sd[key]))
  if len(shape) != ndim or 0 in shape:
    raise CheckpointError(f"tensor '{key}' has shape {shape}; a non-empty {ndim}-d weight is expected there")
  return shape


def infer_tokenizer_config(sd: Mapping[str, np.ndarray], resolution: int = 256) -> VQGANConfig:
  ch, in_channels = _shape(sd, "encoder.conv_in.weight", 4)[:2]
  levels = _count(sd, r"encoder\.down\.(\d+)\.")
  if not levels:
    raise CheckpointError("tokenizer checkpoint has no 'encoder.down.*' tensors")
  ch_mult = tuple(_shape(sd, f"encoder.down.{level}.block.0.conv1.weight", 4)[0] // ch for level in range(levels))
  return VQGANConfig(
    ch=ch,
    ch_mult=ch_mult,
    num_res_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
    z_channels=_shape(sd, "encoder.conv_out.weight", 4)[0],
    in_channels=in_channels,
    out_ch=_shape(sd, "decoder.conv_out.weight", 4)[0],
    resolution=resolution,
    codebook_size=_shape(sd, "quantize.embedding.weight", 2)[0],
  )


def infer_mage_config(sd: Mapping[str, np.ndarray], num_heads=None, decoder_num_heads=None) -> MAGEConfig:
  """Sizes from shapes. Head counts are invisible in the weights: defaults are the released models' (head dim
  64 in the encoder, 16 decoder heads); pass them for other models (e.g. from a config.json)."""
  vocab, dim = _shape(sd, "token_emb.word_embeddings.weight", 2)
  positions = _shape(sd, "token_emb.position_embeddings.weight", 2)[0]
  kw = dict(
    embed_dim=dim,
    depth=_count(sd, r"blocks\.(\d+)\."),
    num_heads=num_heads or max(dim // 64, 1),
    mlp_ratio=_shape(sd, "blocks.0.mlp.fc1.weight", 2)[0] / dim,
    vocab_size=vocab,
    max_position_embeddings=positions,
  )
  if "decoder_pos_embed_learned" in sd:
    dec_dim = _shape(sd, "decoder_embed.weight", 2)[0]
    kw.update(
      decoder_embed_dim=dec_dim,
      decoder_depth=_count(sd, r"decoder_blocks\.(\d+)\."),
      decoder_num_heads=decoder_num_heads or 16,
      num_tokens=_shape(sd, "decoder_pos_embed_learned", 3)[1] - 1,
    )
  else:
    kw.update(num_tokens=positions - 1)
  return MAGEConfig(**kw)


def detect_kind(sd: Mapping[str, np.ndarray]) -> str:
  if "quantize.embedding.weight" in sd and "token_emb.word_embeddings.weight" not in sd:
    return "tokenizer"
  if "mlm_layer.fc.weight" in sd or "decoder_embed.weight" in sd:
    return "mage"
  if any(k.startswith("head.") for k in sd) or "fc_norm.weight" in sd:
    return "vit"
  raise CheckpointError(
    "cannot tell the checkpoint kind from its keys (no tokenizer, MAGE or ViT-head keys); "
    f"name it with --kind {{{','.join(KINDS)}}}"
  )


# Targets are cached per config (tracing a full-size init takes seconds); callers must not mutate them.
def _abstract(module, *args, collections=("params", "batch_stats"), **kwargs):
  variables = nn.unbox(jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args))
  return {k: v for k, v in variables.items() if k in collections}


@functools.lru_cache(maxsize=8)
def tokenizer_target(config: VQGANConfig):
  # The reconstruction pass touches encoder, quantizer and decoder, so its init holds every tokenizer param.
  side = 2 ** (len(config.ch_mult) - 1)
  return _abstract(VQGAN(config), jax.ShapeDtypeStruct((1, side, side, config.in_channels), np.float32))


@functools.lru_cache(maxsize=8)
def mage_target(config: MAGEConfig):
  ids = jax.ShapeDtypeStruct((1, config.num_tokens + 1), np.int32)
  module = ClassCondMAGE(config) if isinstance(config, ClassCondConfig) else MAGE(config)
  return _abstract(module, ids, method="full_sequence")


@functools.lru_cache(maxsize=8)
def vit_target(config: MAGEConfig, num_classes: int, global_pool: bool, head_type: str):
  ids = jax.ShapeDtypeStruct((2, config.num_tokens), np.int32)
  return _abstract(MAGEViT(config, num_classes=num_classes, global_pool=global_pool, head_type=head_type), ids)


def projection_head_target(head_sd: Mapping[str, np.ndarray], embed_dim: int):
  """Target of a MAGE-C projection head from its keys (`hidden_<i>`, `norm_<i>`, `out`, prefix stripped).

  LayerNorm and BatchNorm hold the same params (scale, bias), so a head with `norm_<i>` is read as 'layer'."""
  hidden = _count(head_sd, r"hidden_(\d+)\.")
  head = contrastive.ProjectionHead(
    hidden_dim=_shape(head_sd, "hidden_0.weight", 2)[0] if hidden else contrastive.DEFAULT_HIDDEN_DIM,
    out_dim=_shape(head_sd, "out.weight", 2)[0],
    num_layers=hidden + 1,
    norm="layer" if "norm_0.weight" in head_sd else "none",
    use_bias="out.bias" in head_sd,
  )
  return _abstract(head, jax.ShapeDtypeStruct((1, embed_dim), np.float32))


def split_prefix(sd: Mapping[str, np.ndarray], prefix: str):
  inner = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
  rest = {k: v for k, v in sd.items() if not k.startswith(prefix)}
  return inner, rest


def unused_tree(sd: Mapping[str, np.ndarray]) -> dict:
  """The `UNUSED_KEYS` tensors of a state_dict as a tree nested by the dots of their keys."""
  return traverse_util.unflatten_dict(
    {tuple(k.split(".")): np.asarray(v) for k, v in sd.items() if UNUSED_KEYS.match(k)}
  )


@dataclasses.dataclass
class Converted:
  kind: str
  variables: dict  # {'model', 'tokenizer', 'projection_head', 'torch_unused'}: each may be absent
  meta: dict  # JSON-able: kind and the configs needed to rebuild the modules
  report: Report


def convert_tokenizer(sd, resolution=256, config: VQGANConfig | None = None) -> Converted:
  config = config or infer_tokenizer_config(sd, resolution)
  variables, report = convert_tree(sd, tokenizer_target(config))
  return Converted(
    "tokenizer", {"tokenizer": variables}, {"kind": "tokenizer", "tokenizer": dataclasses.asdict(config)}, report
  )


def _vit_head(model_sd):
  head_type = "bn_linear" if "head.1.weight" in model_sd else ("linear" if "head.weight" in model_sd else "none")
  key = {"bn_linear": "head.1.weight", "linear": "head.weight"}.get(head_type)
  return {
    "num_classes": _shape(model_sd, key, 2)[0] if key else 0,
    "global_pool": "fc_norm.weight" in model_sd,
    "head_type": head_type,
  }


def _merge_prefixed(report: Report, part: Report, torch_prefix: str, flax_prefix: str) -> None:
  report.merge(
    Report(
      **{
        f.name: [(flax_prefix if f.name == "missing" else torch_prefix) + k for k in getattr(part, f.name)]
        for f in dataclasses.fields(Report)
      }
    )
  )


def convert_state_dict(
  sd: Mapping[str, np.ndarray],
  kind: str | None = None,
  *,
  num_heads=None,
  decoder_num_heads=None,
  resolution: int | None = None,
  mage_config: MAGEConfig | None = None,
  tokenizer_config: VQGANConfig | None = None,
  meta_hint: Mapping[str, Any] | None = None,
) -> Converted:
  """Converts a flat torch state_dict of any supported kind (detected from the keys unless given).

  Sizes are inferred from the shapes unless `mage_config` / `tokenizer_config` are given; head counts and the
  image size are not visible in weights (see `infer_mage_config`), hence `num_heads`, `resolution`.
  `meta_hint`: the mage_jax meta that `python -m mage_jax.export` embeds in its files (`META_KEY`); its
  configs replace the inferred ones and its other entries (e.g. 'mage_c') are carried into the result's meta.
  """
  hint = dict(meta_hint or {})
  kind = kind or hint.get("kind") or detect_kind(sd)
  if kind not in KINDS:
    raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
  if "tokenizer" in hint and tokenizer_config is None:
    tokenizer_config = params_io.tokenizer_config_from_meta(hint)
  unused = unused_tree(sd)
  if kind == "tokenizer":
    result = convert_tokenizer(sd, resolution or 256, tokenizer_config)
  else:
    result = _convert_model(
      sd,
      kind,
      num_heads,
      decoder_num_heads,
      resolution,
      tokenizer_config,
      mage_config or (params_io.mage_config_from_meta(hint) if "model" in hint else None),
    )
  if unused:
    result.variables["torch_unused"] = unused
  result.meta = {**hint, **result.meta}
  return result


def _convert_model(sd, kind, num_heads, decoder_num_heads, resolution, tokenizer_config, mage_config):
  tok_sd, model_sd = split_prefix(sd, "vqgan.")
  head_sd = {}
  if f"{PROJECTION_HEAD}.out.weight" in model_sd:
    head_sd, model_sd = split_prefix(model_sd, f"{PROJECTION_HEAD}.")
  config = mage_config or infer_mage_config(model_sd, num_heads, decoder_num_heads)
  if CLASS_EMBEDDING in model_sd and not isinstance(config, ClassCondConfig):
    config = class_cond_config(config, num_classes=_shape(model_sd, CLASS_EMBEDDING, 2)[0] - 1)
  if tok_sd and tokenizer_config is None:
    factor = 2 ** (_count(tok_sd, r"encoder\.down\.(\d+)\.") - 1)
    if kind == "mage" or resolution is None:
      # The learned decoder positions (MAGE) or the full position table (official ViTs) fix the grid.
      resolution = int(round(config.num_tokens**0.5)) * factor
    elif mage_config is None:
      config = dataclasses.replace(config, num_tokens=(resolution // factor) ** 2)
  meta: dict[str, Any] = {"kind": kind, "model": dataclasses.asdict(config)}
  if kind == "mage":
    variables, report = convert_tree(model_sd, mage_target(config))
  else:
    meta["vit"] = _vit_head(model_sd)
    variables, report = convert_tree(
      model_sd, vit_target(config, **meta["vit"]), renames=vit_renames(meta["vit"]["head_type"])
    )
  out = {"model": variables}
  if head_sd:
    out[PROJECTION_HEAD], head_report = convert_tree(head_sd, projection_head_target(head_sd, config.embed_dim))
    _merge_prefixed(report, head_report, f"{PROJECTION_HEAD}.", f"{PROJECTION_HEAD}/")
  if tok_sd:
    tok = convert_tokenizer(tok_sd, resolution, tokenizer_config)
    out["tokenizer"] = tok.variables["tokenizer"]
    meta["tokenizer"] = tok.meta["tokenizer"]
    _merge_prefixed(report, tok.report, "vqgan.", "tokenizer/")
  return Converted(kind, out, meta, report)


def vit_renames(head_type: str) -> dict[str, str] | None:
  return PROBE_HEAD_RENAMES if head_type == "bn_linear" else None


def load_checkpoint(
  path: str, max_bytes: int = torch_pickle.DEFAULT_MAX_BYTES
) -> tuple[dict[str, np.ndarray], dict | None]:
  """A PyTorch zip checkpoint or a safetensors file -> (flat state_dict, embedded mage_jax meta or None).

  Never imports torch or runs code from the file (see torch_pickle). `max_bytes` caps what the file may make
  the reader allocate.

  Raises:
    CheckpointError: unreadable, unsafe, oversized or malformed files, or a malformed embedded meta.
  """
  if safetensors_io.is_safetensors(path):
    tensors, metadata = safetensors_io.load(path, max_bytes=max_bytes)
    return tensors, _parse_meta(metadata.get(META_KEY), path)
  obj = torch_pickle.load(path, max_bytes=max_bytes)
  return torch_pickle.flatten_state_dict(obj), _parse_meta(obj.get(META_KEY) if isinstance(obj, dict) else None, path)


# An exported meta is a few kB of JSON; parsing can take ~40x its length in Python objects, so bound it.
_MAX_META_CHARS = 2**20


def _parse_meta(text: Any, path: str) -> dict | None:
  if text is None:
    return None
  if isinstance(text, str) and len(text) > _MAX_META_CHARS:
    raise CheckpointError(
      f"{path}: the embedded '{META_KEY}' entry holds {len(text)} characters; a meta is a "
      f"few kB (at most {_MAX_META_CHARS})"
    )
  try:
    meta = json.loads(text)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: the embedded '{META_KEY}' entry is not JSON ({e})") from None
  if not isinstance(meta, dict):
    raise CheckpointError(f"{path}: the embedded '{META_KEY}' entry is not a JSON object")
  return meta
