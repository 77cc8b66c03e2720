"""`python -m mage_jax.export PARAMS_DIR OUT`: a params directory -> a checkpoint in the official PyTorch layout.

  python -m mage_jax.export runs/quickstart/mage/params mage.pth                  # {'model': state_dict}
  python -m mage_jax.export runs/quickstart/mage/params vqgan.pth --kind=tokenizer  # {'state_dict': ...}
  python -m mage_jax.export PARAMS_DIR model.safetensors                          # format from the extension

The layouts (pretraining MAGE with its VQGAN under `vqgan.`, fine-tuned / linear-probe ViT, tokenizer), the
recreated unused tensors and the mage_jax extras are described in mage_jax/convert/to_torch.py; the files load
with `torch.load(path, weights_only=True)` and strictly into the official modules. `python -m mage_jax.convert`
reads them back. Never imports torch.
"""

from __future__ import annotations

import os

from absl import flags

from mage_jax.convert import convert, to_torch
from mage_jax.system import runtime
from mage_jax.train import params_io

_FORMAT = flags.DEFINE_enum(
  "format", None, to_torch.FORMATS, "File format; default: 'safetensors' when OUT ends in .safetensors, else 'pth'."
)
_KIND = flags.DEFINE_enum(
  "kind", None, ["mage", "vit", "tokenizer"], "Layout to write; default: the kind of the params directory."
)
_VIT_IMG_SIZE = flags.DEFINE_integer(
  "vit_img_size",
  to_torch.DEFAULT_VIT_IMG_SIZE,
  "Image size of the official ViT module (sets the shape of its unused "
  "pos_embed when the params directory does not hold it).",
  lower_bound=1,
)
_FORCE = flags.DEFINE_bool("force", False, "Overwrite OUT if it exists.")


def _check_out(params_dir: str, out: str, force: bool) -> None:
  """OUT may not lie in PARAMS_DIR (the export would replace its own source), and --force replaces only a file
  this binary wrote (one carrying the embedded mage_jax meta), never a user's file, link or folder."""
  real_out, real_params = os.path.realpath(out), os.path.realpath(params_dir)
  if real_out == real_params or real_out.startswith(real_params.rstrip(os.sep) + os.sep):
    raise runtime.UsageError(f"OUT {out} lies inside PARAMS_DIR {params_dir}; write the export elsewhere")
  if not os.path.lexists(out):
    return
  if not force:
    raise FileExistsError(f"{out} exists; pass --force to overwrite it")
  if os.path.islink(out) or not os.path.isfile(out):
    raise runtime.UsageError(f"{out} is a link or not a regular file; --force replaces only a file export wrote")
  try:
    _, meta = convert.load_checkpoint(out)
  except (convert.CheckpointError, OSError):
    meta = None
  if meta is None:
    raise runtime.UsageError(
      f"{out} was not written by mage_jax.export (no embedded '{convert.META_KEY}' meta); "
      "--force replaces only such files: choose another OUT"
    )


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise runtime.UsageError(f"expected two arguments PARAMS_DIR OUT, got {argv[1:]}")
  params_dir, out = argv[1:]
  fmt = _FORMAT.value or ("safetensors" if out.endswith(".safetensors") else "pth")
  _check_out(params_dir, out, _FORCE.value)
  runtime.start()
  variables, meta = params_io.load(params_dir)
  kind = _KIND.value or meta.get("kind", "mage")
  sd = to_torch.state_dict(variables, meta, kind, vit_img_size=_VIT_IMG_SIZE.value)
  to_torch.write(out, sd, kind, meta, fmt, overwrite=_FORCE.value)
  megabytes = sum(a.nbytes for a in sd.values()) / 1e6
  print(f"wrote {out}: kind {kind}, {fmt}, {len(sd)} tensors, {megabytes:.1f} MB")


if __name__ == "__main__":
  runtime.run(main)
