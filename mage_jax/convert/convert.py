"""PyTorch state_dicts of LTH14/mage (tokenizer, MAGE/MAGE-C pretraining, fine-tuned and linear-probe ViT)
-> flax param trees, with missing / unexpected / mis-shaped keys reported by name.

Module names in mage_jax follow the PyTorch keys, so a key maps by merging ModuleList indices into the name
(`blocks.3.attn.qkv.weight` -> `blocks_3/attn/qkv`) and renaming the leaf to what the target tree holds
(`kernel` transposed, `scale`, `embedding`, or the param itself).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from mage_jax.convert.torch_pickle import CheckpointError
from mage_jax.models.mage import MAGE, MAGEConfig
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.models.vit import MAGEViT

# Tensors of the official modules that no computation reads (spec §2.10); conversion drops them silently.
UNUSED_KEYS = re.compile(
    r"^(cls_token|pos_embed|mask_token|decoder_pos_embed|token_emb\.position_ids|patch_embed\..*|"
    r"decoder_pred\..*|.*num_batches_tracked)$")

KINDS = ("tokenizer", "mage", "vit")
# The official ViT's `head` is `Sequential(BatchNorm1d, Linear)` for linear probing.
VIT_RENAMES = {"head_0": "head_bn", "head_1": "head"}


@dataclasses.dataclass
class Report:
  """What a conversion consumed and what it could not place."""
  missing: list[str] = dataclasses.field(default_factory=list)      # flax paths nobody provided
  unexpected: list[str] = dataclasses.field(default_factory=list)   # torch keys with no flax home
  mismatched: list[str] = dataclasses.field(default_factory=list)   # "key: torch shape -> expected shape"
  ignored: list[str] = dataclasses.field(default_factory=list)      # known-unused torch keys

  def merge(self, other: "Report"):
    for f in dataclasses.fields(self):
      getattr(self, f.name).extend(getattr(other, f.name))

  @property
  def ok(self) -> bool:
    return not (self.missing or self.mismatched)

  def describe(self) -> str:
    lines = []
    for name in ("missing", "mismatched", "unexpected"):
      items = getattr(self, name)
      if items:
        lines.append(f"{len(items)} {name}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
    return "\n".join(lines) or "all keys matched"


def flax_path(torch_key: str) -> tuple[str, ...]:
  """`decoder.up.3.block.0.conv1.weight` -> ('decoder', 'up_3', 'block_0', 'conv1', 'weight')."""
  out: list[str] = []
  for part in torch_key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def _transform(leaf: str, array: np.ndarray, target_ndim: int) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return array.T  # Linear [out, in] -> Dense [in, out]
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # Conv2d [O, I, kh, kw] -> [kh, kw, I, O]; both cross-correlate
  return array


def _leaf_candidates(torch_leaf: str) -> tuple[tuple[str, str], ...]:
  """(collection, flax leaf) pairs a torch leaf name may land on."""
  return {
      "weight": (("params", "kernel"), ("params", "scale"), ("params", "embedding")),
      "bias": (("params", "bias"),),
      "running_mean": (("batch_stats", "mean"),),
      "running_var": (("batch_stats", "var"),),
  }.get(torch_leaf, ())


def flax_destination(torch_key: str, expected: Mapping[tuple[str, ...], Any],
                     renames: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
  """The path ('params', ..., leaf) where `torch_key` lands in a flattened variables tree, or None."""
  path = tuple((renames or {}).get(p, p) for p in flax_path(torch_key))
  candidates = [("params",) + path] + [(col,) + path[:-1] + (leaf,) for col, leaf in
                                       _leaf_candidates(path[-1])]
  return next((c for c in candidates if c in expected), None)


def convert_tree(state_dict: Mapping[str, np.ndarray], target: Mapping[str, Any],
                 renames: Mapping[str, str] | None = None) -> tuple[dict, Report]:
  """Maps torch arrays onto `target` ({'params': tree, optionally 'batch_stats': tree} of shapes).

  Args:
    state_dict: flat torch key -> numpy array (already stripped of any module prefix).
    target: variables tree whose leaves have `.shape` (e.g. from `jax.eval_shape(model.init, ...)`).
    renames: flax path-prefix renames applied after index merging (e.g. {'head_0': 'head_bn'}).
  Returns:
    (variables with numpy leaves in the target structure, report).
  """
  expected = {path: leaf for path, leaf in traverse_util.flatten_dict(target).items()}
  result: dict[tuple[str, ...], np.ndarray] = {}
  report = Report()
  for key, array in state_dict.items():
    if UNUSED_KEYS.match(key):
      report.ignored.append(key)
      continue
    dest = flax_destination(key, expected, renames)
    if dest is None:
      report.unexpected.append(key)
      continue
    value = _transform(dest[-1], np.asarray(array), len(expected[dest].shape))
    if tuple(value.shape) != tuple(expected[dest].shape):
      report.mismatched.append(f"{key}: {tuple(array.shape)} -> expected {tuple(expected[dest].shape)} "
                               f"at {'/'.join(dest)}")
      continue
    result[dest] = value.astype(expected[dest].dtype)
  report.missing = ["/".join(p) for p in expected if p not in result]
  return traverse_util.unflatten_dict(result), report


# ---------------------------------------------------------------------------------------------------------
# Inferring sizes from a state_dict (shapes do not reveal head counts: see `infer_*`).


def _count(sd, pattern):
  rx = re.compile(pattern)
  return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_tokenizer_config(sd: Mapping[str, np.ndarray], resolution: int = 256) -> VQGANConfig:
  ch = sd["encoder.conv_in.weight"].shape[0]
  levels = _count(sd, r"encoder\.down\.(\d+)\.")
  ch_mult = tuple(sd[f"encoder.down.{l}.block.0.conv1.weight"].shape[0] // ch for l in range(levels))
  codebook = sd["quantize.embedding.weight"]
  return VQGANConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
                     z_channels=sd["encoder.conv_out.weight"].shape[0], in_channels=sd["encoder.conv_in.weight"]
                     .shape[1], out_ch=sd["decoder.conv_out.weight"].shape[0], resolution=resolution,
                     codebook_size=codebook.shape[0])


def infer_mage_config(sd: Mapping[str, np.ndarray], num_heads=None, decoder_num_heads=None) -> MAGEConfig:
  """Sizes from shapes. Head counts are invisible in the weights: defaults are the released models' (head dim
  64 in the encoder, 16 decoder heads); pass them for other models (e.g. from a config.json)."""
  vocab, dim = sd["token_emb.word_embeddings.weight"].shape
  positions = sd["token_emb.position_embeddings.weight"].shape[0]
  kw = dict(embed_dim=dim, depth=_count(sd, r"blocks\.(\d+)\."), num_heads=num_heads or max(dim // 64, 1),
            mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, vocab_size=vocab,
            max_position_embeddings=positions)
  if "decoder_pos_embed_learned" in sd:
    dec_dim = sd["decoder_embed.weight"].shape[0]
    kw.update(decoder_embed_dim=dec_dim, decoder_depth=_count(sd, r"decoder_blocks\.(\d+)\."),
              decoder_num_heads=decoder_num_heads or 16,
              num_tokens=sd["decoder_pos_embed_learned"].shape[1] - 1)
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
  raise CheckpointError("cannot tell the checkpoint kind from its keys (no tokenizer, MAGE or ViT-head keys); "
                        f"name it with --kind {{{','.join(KINDS)}}}")


def _abstract(module, *args, collections=("params", "batch_stats"), **kwargs):
  variables = nn.unbox(jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args))
  return {k: v for k, v in variables.items() if k in collections}


def tokenizer_target(config: VQGANConfig):
  # The reconstruction pass touches encoder, quantizer and decoder, so its init holds every tokenizer param.
  side = 2 ** (len(config.ch_mult) - 1)
  return _abstract(VQGAN(config), jax.ShapeDtypeStruct((1, side, side, config.in_channels), np.float32))


def mage_target(config: MAGEConfig):
  ids = jax.ShapeDtypeStruct((1, config.num_tokens + 1), np.int32)
  return _abstract(MAGE(config), ids, method=MAGE.full_sequence)


def vit_target(config: MAGEConfig, num_classes: int, global_pool: bool, head_type: str):
  ids = jax.ShapeDtypeStruct((2, config.num_tokens), np.int32)
  return _abstract(MAGEViT(config, num_classes=num_classes, global_pool=global_pool, head_type=head_type), ids)


def split_prefix(sd: Mapping[str, np.ndarray], prefix: str):
  inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  rest = {k: v for k, v in sd.items() if not k.startswith(prefix)}
  return inner, rest


@dataclasses.dataclass
class Converted:
  kind: str
  variables: dict           # {'model': {...variables}, 'tokenizer': {...variables}} (each may be absent)
  meta: dict                # JSON-able: kind and the configs needed to rebuild the modules
  report: Report


def convert_tokenizer(sd, resolution=256, config: VQGANConfig | None = None) -> Converted:
  config = config or infer_tokenizer_config(sd, resolution)
  variables, report = convert_tree(sd, tokenizer_target(config))
  return Converted("tokenizer", {"tokenizer": variables}, {"kind": "tokenizer",
                                                           "tokenizer": dataclasses.asdict(config)}, report)


def _vit_head(model_sd):
  head_type = "bn_linear" if "head.1.weight" in model_sd else ("linear" if "head.weight" in model_sd else "none")
  weight = model_sd.get("head.1.weight", model_sd.get("head.weight"))
  return {"num_classes": int(weight.shape[0]) if weight is not None else 0,
          "global_pool": "fc_norm.weight" in model_sd, "head_type": head_type}


def convert_state_dict(sd: Mapping[str, np.ndarray], kind: str | None = None, *, num_heads=None,
                       decoder_num_heads=None, resolution: int | None = None,
                       mage_config: MAGEConfig | None = None,
                       tokenizer_config: VQGANConfig | None = None) -> Converted:
  """Converts a flat torch state_dict of any supported kind (detected from the keys unless given).

  Sizes are inferred from the shapes unless `mage_config` / `tokenizer_config` are given; head counts and the
  image size are not visible in weights (see `infer_mage_config`), hence `num_heads`, `resolution`.
  """
  kind = kind or detect_kind(sd)
  if kind not in KINDS:
    raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
  if kind == "tokenizer":
    return convert_tokenizer(sd, resolution or 256, tokenizer_config)
  tok_sd, model_sd = split_prefix(sd, "vqgan.")
  config = mage_config or infer_mage_config(model_sd, num_heads, decoder_num_heads)
  if tok_sd and tokenizer_config is None:
    factor = 2 ** (_count(tok_sd, r"encoder\.down\.(\d+)\.") - 1)
    if kind == "mage" or resolution is None:
      # The learned decoder positions (MAGE) or the full position table (official ViTs) fix the grid.
      resolution = int(round(config.num_tokens ** 0.5)) * factor
    elif mage_config is None:
      config = dataclasses.replace(config, num_tokens=(resolution // factor) ** 2)
  meta: dict[str, Any] = {"kind": kind, "model": dataclasses.asdict(config)}
  if kind == "mage":
    variables, report = convert_tree(model_sd, mage_target(config))
  else:
    meta["vit"] = _vit_head(model_sd)
    variables, report = convert_tree(model_sd, vit_target(config, **meta["vit"]),
                                     renames=VIT_RENAMES)
  out = {"model": variables}
  if tok_sd:
    tok = convert_tokenizer(tok_sd, resolution, tokenizer_config)
    out["tokenizer"] = tok.variables["tokenizer"]
    meta["tokenizer"] = tok.meta["tokenizer"]
    report.merge(Report(**{f.name: [f"vqgan.{k}" if f.name != "missing" else f"tokenizer/{k}"
                                    for k in getattr(tok.report, f.name)] for f in dataclasses.fields(Report)}))
  return Converted(kind, out, meta, report)
