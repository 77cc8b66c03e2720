"""A PyTorch checkpoint file -> a params-only checkpoint directory: the work of `python -m mage_jax.convert`.

Every input is checked before anything is written: the destination first (so a refusal costs no loading), then
the config JSON, the file (see `torch_pickle`: allow-listed globals, bounded memory) and its tensors (every
key placed, every value a finite float). Nothing is written unless all of it passes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mage_jax.convert import convert, torch_pickle
from mage_jax.train import params_io


def _positive_int(value: Any, where: str) -> int | None:
  if value is None:
    return None
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{where} must be a positive integer, got {value!r:.50}")
  return value


def sizes_from_config_json(path: str) -> dict[str, int | None]:
  """`num_heads`, `decoder_num_heads` and `resolution` from a config.json (the fixtures' format).

  Raises:
    ValueError: the file is missing, not JSON, or holds a value of the wrong type (the message names the file).
  """
  try:
    with open(path) as f:
      cfg = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"config file not found: {path}") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable JSON file ({e})") from None
  sections = {name: cfg.get(name, {}) if isinstance(cfg, dict) else None for name in ("mage", "tokenizer")}
  for name, section in sections.items():
    if not isinstance(section, dict):
      raise ValueError(f"{path}: expected a JSON object with optional '{name}' object, got {type(section).__name__}")
  return {
    "num_heads": _positive_int(sections["mage"].get("num_heads"), f"{path}: mage.num_heads"),
    "decoder_num_heads": _positive_int(sections["mage"].get("decoder_num_heads"), f"{path}: mage.decoder_num_heads"),
    "resolution": _positive_int(sections["tokenizer"].get("resolution"), f"{path}: tokenizer.resolution"),
  }


def convert_file(
  src: str,
  out_dir: str,
  *,
  kind: str | None = None,
  config_json: str | None = None,
  num_heads: int | None = None,
  decoder_num_heads: int | None = None,
  resolution: int | None = None,
  strict: bool = False,
  force: bool = False,
  max_bytes: int = torch_pickle.DEFAULT_MAX_BYTES,
) -> convert.Converted:
  """Converts `src` and writes it to `out_dir` as a params-only checkpoint (see `params_io`).

  Args:
    src: a `torch.save` zip checkpoint or a safetensors file of any kind `convert.convert_state_dict` knows
      (files from `python -m mage_jax.export` carry their configs, used unless sizes are given).
    out_dir: the destination; an existing checkpoint or a non-empty other directory needs `force`.
    kind: 'tokenizer' | 'mage' | 'vit'; None detects it from the keys.
    config_json: a config.json giving head counts and image size; explicit arguments win over it.
    num_heads, decoder_num_heads, resolution: sizes the weights do not reveal (see `convert.infer_mage_config`).
    strict: refuse unexpected keys as well as missing / mis-shaped / invalid ones.
    force: replace `out_dir`'s checkpoint (its `variables/` and metadata; other files are kept).
    max_bytes: the loader's cap (see `torch_pickle.load` and `safetensors_io.load`).
  Returns:
    The conversion (kind, variables, meta, report), after it was written.
  Raises:
    torch_pickle.CheckpointError: the file or its tensors are unusable; nothing was written.
    FileExistsError, PermissionError, NotADirectoryError: `out_dir` is refused (see `params_io.check_destination`).
  """
  params_io.check_destination(out_dir, overwrite=force)
  sizes = sizes_from_config_json(config_json) if config_json else {}
  state_dict, embedded = convert.load_checkpoint(src, max_bytes=max_bytes)
  sizes = {
    "num_heads": num_heads or sizes.get("num_heads"),
    "decoder_num_heads": decoder_num_heads or sizes.get("decoder_num_heads"),
    "resolution": resolution or sizes.get("resolution"),
  }
  # Sizes given by the user win over the configs an exported file embeds.
  given = any(v is not None for v in sizes.values())
  result = convert.convert_state_dict(state_dict, kind, **sizes, meta_hint=None if given else embedded)
  report = result.report
  if not report.ok or (strict and report.unexpected):
    raise torch_pickle.CheckpointError(
      f"{src} does not match the {result.kind} model, nothing written: {'; '.join(report.describe().splitlines())}"
    )
  with open(src, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  meta = {**result.meta, "source": {"path": src, "sha256": digest}, "unexpected_keys": report.unexpected}
  params_io.save(out_dir, result.variables, meta, overwrite=force)
  return result
