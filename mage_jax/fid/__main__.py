"""`python -m mage_jax.fid SAMPLES --reference=REF`: FID (and IS when the weights allow) of generated images.

SAMPLES: an `.npz` with uint8 images [N, H, W, 3] under `images` (what `mage_jax.generate` writes), or a folder of
PNG/JPEG files (searched recursively, like torch-fidelity's --samples-find-deep).
REF: `fashion_mnist:test` / `imagenet2012:validation` (a dataset split: its statistics are cached per split),
a folder or `.npz` of images, or a statistics `.npz` holding `mu` and `sigma`.
Images are resized to 299 with the TF1 bilinear resize of torch-fidelity (`--resize=pytorch` for pytorch-fid's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from mage_jax.fid import metrics, weights

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _folder_files(folder: str) -> list[str]:
  files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                 if f.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
  return files


def _rgb(image: np.ndarray) -> np.ndarray:
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected images of shape [H, W, 1|3], got {image.shape}")
  return image


def image_batches(source: str, batch_size: int = 50, max_images: int | None = None):
  """Yields uint8 [B, H, W, 3] batches from an npz (key 'images' or the only array) or an image folder."""
  if os.path.isdir(source):
    from PIL import Image
    files = _folder_files(source)[:max_images]
    for start in range(0, len(files), batch_size):
      yield np.stack([_rgb(np.asarray(Image.open(f).convert("RGB"))) for f in files[start:start + batch_size]])
    return
  if not os.path.isfile(source):
    raise FileNotFoundError(f"no such images file or folder: {source}")
  with np.load(source, allow_pickle=False) as z:
    key = "images" if "images" in z.files else (z.files[0] if len(z.files) == 1 else None)
    if key is None:
      raise ValueError(f"{source}: expected an array 'images', found {z.files}")
    images = z[key][:max_images]
  if images.dtype != np.uint8:
    raise ValueError(f"{source}: images must be uint8 (as written to PNG), got {images.dtype}")
  for start in range(0, len(images), batch_size):
    yield np.stack([_rgb(im) for im in images[start:start + batch_size]])


def reference_statistics(reference: str, model, max_images: int | None, data_dir: str | None):
  if os.path.isfile(reference) and reference.endswith(".npz"):
    with np.load(reference, allow_pickle=False) as z:
      is_stats = "mu" in z.files and "sigma" in z.files
    if is_stats:
      return metrics.load_stats(reference)
  if os.path.exists(reference):
    return metrics.compute_stats_for_images(image_batches(reference, max_images=max_images), model,
                                            keep_logits=False)
  name, _, split = reference.partition(":")
  if not split:
    raise ValueError(f"--reference {reference!r} is neither a path nor a dataset split like fashion_mnist:test")

  def images_fn():
    from mage_jax.data import sources
    images, _ = sources.load_arrays(name, split, data_dir)
    return (np.stack([_rgb(im) for im in images[i:i + 50]]) for i in range(0, len(images), 50))

  return metrics.load_or_compute_reference_stats(name, split, images_fn, model=model, max_images=max_images)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mage_jax.fid", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("samples", help="generated images: .npz or folder")
  parser.add_argument("--reference", required=True, help="dataset:split, folder, image .npz or stats .npz")
  parser.add_argument("--max_images", type=int, default=None, help="use at most this many of each set")
  parser.add_argument("--weights", default=None, help="Inception weights (default: the cached setup npz)")
  parser.add_argument("--resize", default="tf1", choices=("tf1", "pytorch"))
  parser.add_argument("--data_dir", default=None, help="TFDS data dir for dataset references")
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args(argv)
  try:
    model = weights.load_inception(args.weights, resize_method=args.resize)
    reference = reference_statistics(args.reference, model, args.max_images, args.data_dir)
    result = metrics.evaluate(image_batches(args.samples, max_images=args.max_images), reference, model)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary = {"fid": result.fid, "num_images": result.num_images, "num_reference": reference.num_images,
             "inception_score": result.inception_score, "inception_score_std": result.inception_score_std,
             "inception_score_note": result.inception_score_note}
  print(f"FID {result.fid:.3f} ({result.num_images} samples vs {reference.num_images} reference images)")
  if result.inception_score is None:
    print(result.inception_score_note)
  else:
    print(f"IS {result.inception_score:.3f} ± {result.inception_score_std:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
