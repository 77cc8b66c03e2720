"""What FID compares: generated samples and reference sets, as uint8 image batches, and the whole computation.

Samples: an `.npz` with uint8 images [N, H, W, 3] under `images` (what `mage_jax.generate` writes), or a folder of
image files of one size (searched recursively, like torch-fidelity's --samples-find-deep; read by
`mage_jax.data.images`: a corrupt file, mixed sizes or an image above the pixel budget is an error naming the file).
Reference: `fashion_mnist:test` / `imagenet2012:validation` (a dataset split: its statistics are cached per split;
the small fixed-size sets at their stored size, any other set, e.g. ImageNet, as the paper's reference images:
Resize(256) bilinear + CenterCrop(256), as the official `prepare_imgnet_val.py`), a folder or `.npz` of images, or a
statistics `.npz` holding `mu` and `sigma`.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from mage_jax.data import image_listing, images as image_io
from mage_jax.fid import metrics, weights

# The official prepare_imgnet_val.py (LTH14/mage) makes the reference images Resize(256) (shorter side,
# torchvision's default bilinear) + CenterCrop(256).
REFERENCE_SIZE = 256


def image_batches(source: str, batch_size: int = 50, max_images: int | None = None) -> tuple[int, Iterator]:
  """(number of images, iterator of uint8 [B, H, W, 3] batches) of an npz (key 'images' or the only array) or an
  image folder.

  Checked at the call, before any network runs: a folder is listed by `image_listing.list_images` and every file's
  header is read (one size, within the pixel budget); an npz must hold uint8 images. A corrupt file met while
  iterating is an ImageError naming it.
  """
  if os.path.isdir(source):
    listing = image_listing.list_images(source)
    if listing.unreadable:
      raise image_io.ImageError(
        f"{listing.unreadable[0]}: not a readable image file (a broken link, a special "
        "file or a folder that cannot be listed)"
      )
    files = listing.paths[:max_images]
    if not files:
      raise FileNotFoundError(
        f"no images ({', '.join(image_listing.IMAGE_EXTENSIONS)}) found under {source} ({listing.summary()})"
      )
    image_io.require_one_size(
      ((f, image_io.read_size(f)) for f in files), source, "FID compares images of one size: resize them first."
    )
    return len(files), (
      np.stack([image_io.read_image(f) for f in files[start : start + batch_size]])
      for start in range(0, len(files), batch_size)
    )
  if not os.path.isfile(source):
    raise FileNotFoundError(f"no such images file or folder: {source}")
  with np.load(source, allow_pickle=False) as z:
    key = "images" if "images" in z.files else (z.files[0] if len(z.files) == 1 else None)
    if key is None:
      raise ValueError(f"{source}: expected an array 'images', found {z.files}")
    images = z[key][:max_images]
  if images.dtype != np.uint8:
    raise ValueError(f"{source}: images must be uint8 (as written to PNG), got {images.dtype}")
  return len(images), (
    np.stack([image_io.as_rgb(im) for im in images[start : start + batch_size]])
    for start in range(0, len(images), batch_size)
  )


def reference_protocol_batches(name: str, split: str, data_dir: str | None, batch_size: int = 50):
  """Yields uint8 [B, 256, 256, 3] batches of a dataset split prepared as the paper's FID reference.

  The official prepare_imgnet_val.py saves each validation image as torchvision Resize(256) (bilinear) +
  CenterCrop(256) PNG. Here the same geometry and filter come from the data pipeline's one resize/centre-crop
  (`augment.resize_center_crop`, crop_ratio 1, bilinear: the one place mage_jax resizes with another filter
  than the bicubic of evaluation, because the reference protocol says so), rounded to uint8 as PIL rounds.
  Undecodable images are skipped and counted as in training.
  """
  from mage_jax.data import pipeline

  cfg = dict(
    name=name,
    split=split,
    data_dir=data_dir,
    image_size=REFERENCE_SIZE,
    batch_size=batch_size,
    augment="none",
    crop_ratio=1.0,
    eval_interpolation="bilinear",
  )
  for batch in pipeline.eval_iterator(cfg):
    yield image_io.round_to_uint8(batch["image"][batch["_mask"]])


def reference_statistics(reference: str, model, max_images: int | None, data_dir: str | None, extras: bool = False):
  if os.path.isfile(reference) and reference.endswith(".npz"):
    with np.load(reference, allow_pickle=False) as z:
      is_stats = "mu" in z.files and "sigma" in z.files
    if is_stats:
      stats = metrics.load_stats(reference)
      if extras and (stats.spatial is None or stats.features is None):
        raise ValueError(
          f"{reference}: statistics without spatial moments (mu_s, sigma_s) and features: sFID and "
          "precision/recall need the reference images, or statistics saved with them"
        )
      return stats
  if os.path.exists(reference):
    count, batches = image_batches(reference, max_images=max_images)
    return metrics.compute_stats_for_images(batches, model, keep_logits=False, total=count, extras=extras)
  name, _, split = reference.partition(":")
  if not split:
    raise ValueError(f"reference {reference!r} is neither a path nor a dataset split like fashion_mnist:test")

  def images_fn():
    from mage_jax.data import sources

    if name not in sources.IN_MEMORY_TFDS:
      return reference_protocol_batches(name, split, data_dir)
    images, _ = sources.load_arrays(name, split, data_dir)
    return (np.stack([image_io.as_rgb(im) for im in images[i : i + 50]]) for i in range(0, len(images), 50))

  return metrics.load_or_compute_reference_stats(
    name, split, images_fn, model=model, max_images=max_images, extras=extras
  )


def compute(
  samples: str,
  reference: str,
  *,
  max_images: int | None = None,
  weights_path: str | None = None,
  resize: str = "tf1",
  data_dir: str | None = None,
  extras: bool = False,
) -> dict:
  """FID (and IS when the weights carry the classifier) of `samples` against `reference` (see the module); with
  `extras` also sFID, precision and recall (k = 3).

  The samples are checked before the network is loaded, so a bad folder fails in a second.

  Returns:
    {'fid', 'num_images', 'num_reference', 'inception_score', 'inception_score_std', 'inception_score_note'}, and
    'sfid', 'precision', 'recall' with `extras`.
  """
  count, batches = image_batches(samples, max_images=max_images)
  model = weights.load_inception(weights_path, resize_method=resize)
  ref = reference_statistics(reference, model, max_images, data_dir, extras)
  result = metrics.evaluate(batches, ref, model, total=count)
  summary = {
    "fid": result.fid,
    "num_images": result.num_images,
    "num_reference": ref.num_images,
    "inception_score": result.inception_score,
    "inception_score_std": result.inception_score_std,
    "inception_score_note": result.inception_score_note,
  }
  if extras:
    summary.update(sfid=result.sfid, precision=result.precision, recall=result.recall)
  return summary
