"""`python -m mage_jax.convert SRC OUT_DIR`: a PyTorch checkpoint (.pth zip or .safetensors) -> params-only orbax
checkpoint.

Never imports torch and never runs code from the file (see torch_pickle.py). Files written by
`python -m mage_jax.export` carry their configs, which are used unless sizes are given on the command line.
"""

from __future__ import annotations

from absl import flags

from mage_jax.convert import convert, job, torch_pickle
from mage_jax.system import runtime

_KIND = flags.DEFINE_enum("kind", None, list(convert.KINDS), "Checkpoint kind (default: detected from the keys).")
_CONFIG = flags.DEFINE_string("config", None, "A config.json (fixture format) giving head counts and image size.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Encoder heads (default: embed_dim / 64).", lower_bound=1)
_DECODER_NUM_HEADS = flags.DEFINE_integer("decoder_num_heads", None, "Decoder heads (default: 16).", lower_bound=1)
_RESOLUTION = flags.DEFINE_integer(
  "resolution", None, "Image size for ViT/tokenizer checkpoints (default: 256).", lower_bound=1
)
_STRICT = flags.DEFINE_bool("strict", False, "Fail on unexpected keys too.")
_FORCE = flags.DEFINE_bool("force", False, "Replace the checkpoint in OUT_DIR, or write into a non-empty directory.")
_MAX_BYTES = torch_pickle.define_max_gb_flag()


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise runtime.UsageError(f"expected SRC and OUT_DIR, got {len(argv) - 1} positional arguments {argv[1:]}")
  src, out_dir = argv[1:]
  runtime.quiet_orbax_logs()
  result = job.convert_file(
    src,
    out_dir,
    kind=_KIND.value,
    config_json=_CONFIG.value,
    num_heads=_NUM_HEADS.value,
    decoder_num_heads=_DECODER_NUM_HEADS.value,
    resolution=_RESOLUTION.value,
    strict=_STRICT.value,
    force=_FORCE.value,
    max_bytes=_MAX_BYTES(),
  )
  print(f"{src}: kind={result.kind}, {len(result.report.ignored)} tensors the model does not use")
  print(result.report.describe())
  print(f"wrote {out_dir}")


if __name__ == "__main__":
  runtime.run(main)
