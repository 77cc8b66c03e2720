"""Forward conformance: mage_jax computes what the official PyTorch code computed (`python -m mage_jax.verify`).

A fixture directory holds `config.json`, the `.pth` files (`tokenizer.pth`, `mage.pth`, `vit_probe.pth`, any
subset) and `reference.npz` (inputs and outputs of the official code), as `tests/testdata/official_tiny`. The
modules are built from config.json (any size: tiny, ViT-B/L at 256 px), the `.pth` files converted, every
reference input run, and per output the max abs error and relative L2 error reported; ids must match except
near-ties.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from mage_jax.convert import convert, torch_pickle
from mage_jax.models.mage import MAGE, MAGEConfig
from mage_jax.models.vit import MAGEViT
from mage_jax.models.vqgan import VQGAN, VQGANConfig, squared_distances
from mage_jax.objectives import losses, masking

REL_TOLERANCE = 1e-4
# Two codes whose distances differ by less than this (relative) are a float-rounding tie.
TIE_TOLERANCE = 1e-5


@dataclasses.dataclass
class Check:
  name: str
  max_abs: float
  rel_l2: float
  ids_equal: str = ""  # "" for float outputs; "64/64" or "63/64 (1 tie)" for ids
  passed: bool = True


def relative_l2(got, want) -> float:
  """‖got − want‖₂ / ‖want‖₂ in float64 (0 when both are zero); arrays of equal shape."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _compare(name, got, want) -> Check:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    return Check(name, float("inf"), float("inf"), f"shape {got.shape} != {want.shape}", False)
  rel = relative_l2(got, want)
  return Check(name, float(np.max(np.abs(got - want))), rel, passed=rel < REL_TOLERANCE)


def _compare_ids(name, got, want, distances) -> Check:
  got, want = np.asarray(got).reshape(-1), np.asarray(want).reshape(-1)
  d = np.asarray(distances, np.float64).reshape(got.size, -1)
  equal = got == want
  rows = np.arange(got.size)
  gap = np.abs(d[rows, got] - d[rows, want]) / np.maximum(np.abs(d[rows, want]), 1e-12)
  ties = (~equal) & (gap < TIE_TOLERANCE)
  passed = bool(np.all(equal | ties))
  note = f"{int(equal.sum())}/{got.size}" + (f" ({int(ties.sum())} ties)" if ties.any() else "")
  return Check(name, float(np.max(np.abs(got - want))), 0.0 if passed else 1.0, note, passed)


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def convert_file(
  path: str,
  kind: str,
  *,
  tokenizer_config: VQGANConfig,
  mage_config: MAGEConfig | None = None,
  max_bytes: int = torch_pickle.DEFAULT_MAX_BYTES,
) -> convert.Converted:
  """An official `.pth` converted with the sizes of config.json; ValueError naming what does not fit.

  `max_bytes` caps what the file may make the loader allocate (see `torch_pickle.load`).
  """
  sd = torch_pickle.flatten_state_dict(torch_pickle.load(path, max_bytes=max_bytes))
  result = convert.convert_state_dict(sd, kind, mage_config=mage_config, tokenizer_config=tokenizer_config)
  if not result.report.ok:
    raise ValueError(f"{os.path.basename(path)} does not match config.json:\n{result.report.describe()}")
  return result


def configs_from_json(cfg: dict) -> tuple[VQGANConfig, MAGEConfig]:
  """The tokenizer and MAGE sizes of a fixture's config.json (`tokenizer`, `mage` sections).

  `mage.dropout` / `mage.attn_dropout`, when present, set the model's dropout rates (the official defaults,
  0.1, otherwise)."""
  t = cfg["tokenizer"]
  tok = VQGANConfig(
    ch=t["ch"],
    ch_mult=tuple(t["ch_mult"]),
    num_res_blocks=t["num_res_blocks"],
    z_channels=t["z_channels"],
    in_channels=t["in_channels"],
    out_ch=t["out_ch"],
    resolution=t["resolution"],
    codebook_size=t["n_embed"],
  )
  if t.get("embed_dim", t["z_channels"]) != t["z_channels"]:
    raise ValueError("config.json: tokenizer embed_dim must equal z_channels (no quant_conv in this VQGAN)")
  m = cfg["mage"]
  model = MAGEConfig(
    embed_dim=m["embed_dim"],
    depth=m["depth"],
    num_heads=m["num_heads"],
    decoder_embed_dim=m["decoder_embed_dim"],
    decoder_depth=m["decoder_depth"],
    decoder_num_heads=m["decoder_num_heads"],
    mlp_ratio=m["mlp_ratio"],
    eps=m["layer_norm_eps"],
    codebook_size=t["n_embed"],
    vocab_size=m["vocab_size"],
    fake_class_id=m["fake_class_id"],
    mask_id=m["mask_id"],
    num_tokens=m["num_tokens"],
    max_position_embeddings=m.get("max_positions", 257),
    **{k: m[k] for k in ("dropout", "attn_dropout") if k in m},
  )
  return tok, model


# The checkpoints a fixture may hold and the outputs each one is checked on.
SOURCES = {
  "tokenizer.pth": "tokenizer/*",
  "mage.pth": "mage/tokenizer_ids, pretrain/*, generate/*",
  "vit_probe.pth": "probe/*",
}


def skipped(directory: str) -> list[str]:
  """One phrase per checkpoint the fixture lacks, naming the checks that therefore do not run."""
  return [
    f"{name} (not in the fixture): {outputs}"
    for name, outputs in SOURCES.items()
    if not os.path.exists(os.path.join(directory, name))
  ]


def _read_config(directory: str) -> tuple[dict, VQGANConfig, MAGEConfig]:
  try:
    with open(os.path.join(directory, "config.json")) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"config.json is not valid JSON ({e})") from None
  try:
    return cfg, *configs_from_json(cfg)
  except KeyError as e:
    raise ValueError(
      f"config.json has no {e.args[0]!r} entry (its tokenizer and mage sections give every size)"
    ) from None
  except (TypeError, AttributeError) as e:
    raise ValueError(f"config.json: its tokenizer and mage sections must map names to sizes ({e})") from None


def run(directory: str, max_bytes: int = torch_pickle.DEFAULT_MAX_BYTES) -> list[Check]:
  """Runs every reference the directory provides; returns one Check per output (`max_bytes`: see
  `convert_file`)."""
  cfg, tok_config, mage_config = _read_config(directory)
  ref = np.load(os.path.join(directory, "reference.npz"))
  label_smoothing = cfg["mage"].get("label_smoothing", 0.1)
  want = (tok_config.in_channels, tok_config.resolution, tok_config.resolution)
  if ref["images_nchw"].ndim != 4 or ref["images_nchw"].shape[1:] != want:
    raise ValueError(
      f"reference.npz: images_nchw is {list(ref['images_nchw'].shape)}, config.json's tokenizer "
      f"takes [N, {', '.join(map(str, want))}]"
    )
  checks: list[Check] = []

  def converted(name, kind, mage_config=None):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      return None
    return convert_file(path, kind, tokenizer_config=tok_config, mage_config=mage_config, max_bytes=max_bytes)

  images = jnp.asarray(_nhwc(ref["images_nchw"]))
  tok = converted("tokenizer.pth", "tokenizer")
  if tok is not None:
    vqgan = VQGAN(tok_config)
    tv = tok.variables["tokenizer"]
    z = vqgan.apply(tv, images, method=VQGAN.encode)
    z_q, ids, _, distances = vqgan.apply(tv, z, method=VQGAN.quantize_latents)
    checks.append(_compare("tokenizer/z", z, _nhwc(ref["tokenizer_z_nchw"])))
    checks.append(_compare_ids("tokenizer/ids", ids, ref["tokenizer_indices"], distances))
    checks.append(_compare("tokenizer/z_q", z_q, _nhwc(ref["tokenizer_zq_nchw"])))
    checks.append(
      _compare("tokenizer/decoded", vqgan.apply(tv, z_q, method=VQGAN.decode), _nhwc(ref["tokenizer_decoded_nchw"]))
    )
    ref_ids = jnp.asarray(ref["tokenizer_indices"].reshape(ref["tokenizer_indices"].shape[0], -1))
    checks.append(
      _compare(
        "tokenizer/decoded_from_ids",
        vqgan.apply(tv, ref_ids, method=VQGAN.decode_ids),
        _nhwc(ref["tokenizer_decoded_from_ids_nchw"]),
      )
    )

  mage = converted("mage.pth", "mage", mage_config=mage_config)
  if mage is not None:
    model, mv = MAGE(mage_config), mage.variables["model"]
    if "tokenizer" in mage.variables:
      vq_ids = VQGAN(tok_config).apply(mage.variables["tokenizer"], images, method=VQGAN.encode_to_ids)
      z = VQGAN(tok_config).apply(mage.variables["tokenizer"], images, method=VQGAN.encode)
      dist = squared_distances(z, mage.variables["tokenizer"]["params"]["quantize"]["embedding"]["embedding"])
      checks.append(_compare_ids("mage/tokenizer_ids", vq_ids, ref["pretrain_gt_indices"], dist))
    dropped = jnp.asarray(ref["pretrain_token_drop_mask"][:, 1:].astype(bool))
    masked = jnp.asarray(ref["pretrain_token_all_mask"][:, 1:].astype(bool))
    plan = masking.plan_from_masks(dropped, masked, int(ref["pretrain_token_drop_mask"][0].sum()))
    gt = jnp.asarray(ref["pretrain_gt_indices"])
    logits, aux = model.apply(mv, gt, plan)
    checks.append(_compare("pretrain/encoder_out", aux["encoded"], ref["pretrain_encoder_out"]))
    checks.append(_compare("pretrain/logits", logits, ref["pretrain_logits"]))
    loss = losses.masked_token_loss(
      logits, gt, masked, codebook_size=mage_config.codebook_size, label_smoothing=label_smoothing
    )
    checks.append(_compare("pretrain/loss", loss, ref["pretrain_loss"]))
    gen_logits, gen_encoded = model.apply(mv, jnp.asarray(ref["generate_input_tokens"]), method=MAGE.full_sequence)
    checks.append(_compare("generate/encoder_out", gen_encoded, ref["generate_encoder_out"]))
    checks.append(_compare("generate/logits", gen_logits, ref["generate_logits"]))

  probe = converted("vit_probe.pth", "vit", mage_config=mage_config)
  if probe is not None:
    vit = MAGEViT(mage_config, **probe.meta["vit"])
    ids = jnp.asarray(ref["tokenizer_indices"].reshape(ref["tokenizer_indices"].shape[0], -1))
    logits, aux = vit.apply(probe.variables["model"], ids)
    checks.append(_compare("probe/features", aux["features"], ref["probe_features"]))
    checks.append(_compare("probe/logits", logits, ref["probe_logits"]))
  if not checks:
    raise FileNotFoundError(f"{directory} holds none of tokenizer.pth, mage.pth, vit_probe.pth")
  return checks


def format_table(checks: list[Check]) -> str:
  rows = [f"{'output':28s} {'max abs err':>12s} {'rel L2 err':>12s}  {'ids':>14s}  status"]
  for c in checks:
    rows.append(f"{c.name:28s} {c.max_abs:12.3e} {c.rel_l2:12.3e}  {c.ids_equal:>14s}  {'ok' if c.passed else 'FAIL'}")
  return "\n".join(rows)
