"""`python -m mage_jax.fid SAMPLES --reference=REF [--extras]`: FID (and IS when the weights allow) of generated
images; `--extras` adds sFID, precision and recall.

SAMPLES: an `.npz` of uint8 images (what `mage_jax.generate` writes) or a folder of image files of one size.
REF: a dataset split (`fashion_mnist:test`, `imagenet2012:validation`: statistics cached per split), a folder or
`.npz` of images, or a statistics `.npz` holding `mu` and `sigma` (details: mage_jax/fid/inputs.py). Images are
resized to 299 with the TF1 bilinear resize of torch-fidelity (`--resize=pytorch` for pytorch-fid's).
"""

from __future__ import annotations

import json

from absl import flags

from mage_jax.fid import inputs
from mage_jax.system import runtime

_REFERENCE = flags.DEFINE_string(
  "reference", None, "Dataset split (name:split), folder, image .npz or stats .npz.", required=True
)
_MAX_IMAGES = flags.DEFINE_integer(
  "max_images", None, "Use at most this many images of each set (default: all).", lower_bound=2
)
_WEIGHTS = flags.DEFINE_string("weights", None, "FID Inception weights (default: the cached setup npz).")
_RESIZE = flags.DEFINE_enum(
  "resize", "tf1", ["tf1", "pytorch"], "Resize to 299: torch-fidelity's TF1 bilinear or pytorch-fid's."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir for dataset references.")
_JSON = flags.DEFINE_string("json", None, "Also write the result to this JSON file.")
_EXTRAS = flags.DEFINE_bool(
  "extras",
  False,
  "Also sFID (spatial Inception features) and precision/recall (k=3 "
  "nearest neighbours of pool3 features); keeps every image's features in memory.",
)


def main(argv):
  if len(argv) != 2:
    raise runtime.UsageError("give exactly one SAMPLES argument (an .npz of images or a folder)")
  runtime.start()
  summary = inputs.compute(
    argv[1],
    _REFERENCE.value,
    max_images=_MAX_IMAGES.value,
    weights_path=_WEIGHTS.value,
    resize=_RESIZE.value,
    data_dir=_DATA_DIR.value,
    extras=_EXTRAS.value,
  )
  print(f"FID {summary['fid']:.3f} ({summary['num_images']} samples vs {summary['num_reference']} reference images)")
  if summary["inception_score"] is None:
    print(summary["inception_score_note"])
  else:
    print(f"IS {summary['inception_score']:.3f} ± {summary['inception_score_std']:.3f}")
  if _EXTRAS.value:
    print(f"sFID {summary['sfid']:.3f}, precision {summary['precision']:.4f}, recall {summary['recall']:.4f}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  runtime.run(main)
