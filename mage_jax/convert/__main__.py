"""`python -m mage_jax.convert SRC OUT_DIR`: a PyTorch checkpoint (.pth zip or .safetensors) -> params-only orbax
checkpoint.

Never imports torch and never runs code from the file (see torch_pickle.py). Files written by
`python -m mage_jax.export` carry their configs, which are used unless sizes are given on the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from mage_jax.convert import convert, torch_pickle


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mage_jax.convert", description=__doc__)
  parser.add_argument("src", help="PyTorch checkpoint (.pth / .ckpt / .safetensors), e.g. mage-vitb-1600.pth")
  parser.add_argument("out_dir", help="output directory for the params-only orbax checkpoint")
  parser.add_argument("--kind", choices=convert.KINDS, help="checkpoint kind (default: detected from keys)")
  parser.add_argument("--config", help="a config.json (fixture format) giving head counts and image size")
  parser.add_argument("--num-heads", type=int, help="encoder heads (default: embed_dim / 64)")
  parser.add_argument("--decoder-num-heads", type=int, help="decoder heads (default: 16)")
  parser.add_argument("--resolution", type=int, help="image size for ViT/tokenizer checkpoints (default 256)")
  parser.add_argument("--strict", action="store_true", help="fail on unexpected keys too")
  parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in OUT_DIR")
  args = parser.parse_args(argv)

  heads, dec_heads, resolution = args.num_heads, args.decoder_num_heads, args.resolution
  if args.config:
    with open(args.config) as f:
      cfg = json.load(f)
    heads = heads or cfg.get("mage", {}).get("num_heads")
    dec_heads = dec_heads or cfg.get("mage", {}).get("decoder_num_heads")
    resolution = resolution or cfg.get("tokenizer", {}).get("resolution")
  try:
    state_dict, embedded = convert.load_checkpoint(args.src)
    sizes_given = any(v is not None for v in (heads, dec_heads, resolution))
    result = convert.convert_state_dict(state_dict, args.kind, num_heads=heads, decoder_num_heads=dec_heads,
                                        resolution=resolution, meta_hint=None if sizes_given else embedded)
  except (torch_pickle.CheckpointError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.src}: kind={result.kind}, {len(state_dict)} tensors, {len(result.report.ignored)} unused "
        f"tensors dropped")
  print(result.report.describe())
  if not result.report.ok or (args.strict and result.report.unexpected):
    print("error: checkpoint does not match the model; nothing written", file=sys.stderr)
    return 1
  from mage_jax import params_io
  meta = {**result.meta, "source": {"path": args.src, "sha256": _sha256(args.src)},
          "unexpected_keys": result.report.unexpected}
  try:
    params_io.save(args.out_dir, result.variables, meta, overwrite=args.force)
  except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
