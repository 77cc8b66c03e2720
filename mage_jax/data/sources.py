"""Random-access image datasets: TFDS (imagenet2012, fashion_mnist, ...) and folders.

A `Source` maps an example index `i in [0, num_examples)` to `(image, label)`
inside a tf.data graph (`Source.load`), which lets `pipeline.py` make the sample
order a pure function of (seed, step). Three kinds:

  * `ArraySource`: uint8 arrays in memory (fashion_mnist and other small sets).
  * `FolderSource`: `folder:/path`, image files with class subfolders (labels =
    index of the sorted subfolder name, like torchvision `ImageFolder`) or a flat
    folder (label 0). Listed by `image_listing.list_images`: symlinks are followed but
    each real folder and file is listed once, files without an image extension
    are ignored and counted, and the number of images per class is logged.
    Splits: a subfolder (`train`, `val`) when it exists, and TFDS-like slices
    over a hash order of the files (`train[:-1000]`, `[90%:]`; see `FolderSplit`).
  * `TfdsSource`: a TFDS dataset prepared with `file_format="array_record"`, read
    through `tfds.data_source` (imagenet2012).

Encoded images are decoded by `images.read_image` (the rules for modes, bit
depths, transparency and the pixel budget are in its module) in a
`tf.numpy_function`; an image it refuses is skipped (the next index that decodes
takes its place, so batch shapes and the order stay deterministic) and counted
in `Source.stats`.

TFDS datasets are made ready by `tfds_prepare`, which downloads nothing unless
the caller passes `download=True`.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import logging
import math
import os
import re
import threading

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mage_jax.data import augment, image_listing, images as image_io, tfds_prepare

# TFDS datasets small enough to hold in memory as uint8 arrays.
IN_MEMORY_TFDS = frozenset({"fashion_mnist", "mnist", "cifar10", "cifar100"})
# Single-channel datasets: the pipeline repeats their one channel into RGB.
GRAYSCALE_TFDS = frozenset({"fashion_mnist", "mnist"})
FOLDER_PREFIX = "folder:"
# Give up after this many undecodable images in a row (the data is broken, not noisy).
MAX_CONSECUTIVE_CORRUPT = 1000


# ------------------------------------------------------------------------------
# Bookkeeping of corrupt files.
# ------------------------------------------------------------------------------
class CorruptStats:
  """Thread-safe count of skipped undecodable examples (decoding runs in threads)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._skipped = 0
    self._files: dict[str, str] = {}

  def add(self, name: str, reason: str) -> None:
    with self._lock:
      self._skipped += 1
      if name not in self._files:
        self._files[name] = reason
        logging.warning("Skipping undecodable image %s: %s", name, reason)

  def snapshot(self) -> dict[str, object]:
    """{'corrupt_skipped': times an example was replaced, 'corrupt_files': names}."""
    with self._lock:
      return {"corrupt_skipped": self._skipped, "corrupt_files": tuple(sorted(self._files))}


# ------------------------------------------------------------------------------
# Sources.
# ------------------------------------------------------------------------------
class Source(abc.ABC):
  """Random access to `num_examples` labelled images."""

  num_examples: int
  stats: CorruptStats

  @abc.abstractmethod
  def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Graph op: int64 scalar index -> (uint8 `[H, W, C]`, int32 scalar label).

    C is static (1 or 3); H and W may be dynamic.
    """


def _check_images(images: np.ndarray) -> np.ndarray:
  """Accepts `[N, H, W]` or `[N, H, W, C]`, C in {1, 3}; returns `[N, H, W, C]` uint8."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Expected images of shape [N, H, W], [N, H, W, 1] or [N, H, W, 3], got shape {images.shape}.")
  if images.dtype != np.uint8:
    raise ValueError(f"Expected uint8 images, got dtype {images.dtype}.")
  return images


class ArraySource(Source):
  """uint8 images held in memory; loading is a `tf.gather` (no Python per example)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = _check_images(images)
    self.labels = np.asarray(labels).astype(np.int32)
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images.")
    self.num_examples = int(self.images.shape[0])
    self.stats = CorruptStats()
    # Eager tensors: tf.data functions capture them as inputs, so the arrays
    # are not copied into (and serialised with) every dataset graph.
    with tf.init_scope():
      self._images = tf.constant(self.images)
      self._labels = tf.constant(self.labels)

  def load(self, index):
    return tf.gather(self._images, index), tf.gather(self._labels, index)


class EncodedSource(Source):
  """Examples stored as encoded images; decoded by `images.read_image` in a numpy_function."""

  def __init__(self, num_examples: int, description: str):
    self.num_examples = num_examples
    self.description = description
    self.stats = CorruptStats()
    self._bad: dict[int, str] = {}  # index -> name of known corrupt examples
    self._bad_lock = threading.Lock()

  @abc.abstractmethod
  def read(self, index: int) -> tuple[bytes | str, int, str]:
    """Returns (encoded bytes or the image file's path, label, name used in error reports)."""

  def load_numpy(self, index: int) -> tuple[np.ndarray, np.int32]:
    """Decodes example `index`, or the next decodable one after it (cyclically)."""
    n = self.num_examples
    for k in range(min(n, MAX_CONSECUTIVE_CORRUPT)):
      j = (int(index) + k) % n
      known = self._bad.get(j)
      if known is not None:
        self.stats.add(known, "known corrupt")
        continue
      name = str(j)
      try:
        data, label, name = self.read(j)
        return image_io.read_image(data, name=name), np.int32(label)
      except Exception as e:  # pylint: disable=broad-except
        # Any failure to read/decode one file means "corrupt", never fatal.
        with self._bad_lock:
          self._bad[j] = name
        self.stats.add(name, f"{type(e).__name__}: {e}")
    raise RuntimeError(
      f"No decodable image in {min(n, MAX_CONSECUTIVE_CORRUPT)} consecutive "
      f"examples starting at index {index} of {self.description}."
    )

  def load(self, index):
    image, label = tf.numpy_function(self.load_numpy, [index], (tf.uint8, tf.int32), stateful=True)
    image.set_shape([None, None, 3])
    label.set_shape([])
    return image, label


def list_image_folder(root: str) -> tuple[image_listing.ImageListing, list[str]]:
  """Lists the image files under `root` (see `image_listing.list_images`).

  If `root` has subfolders, each is a class (sorted names -> labels 0..K-1, files
  found recursively, loose files in `root` ignored and counted, as torchvision
  ImageFolder); otherwise the images directly in `root` all get label 0.

  Returns:
    (listing with one group of paths per class, or one group for a flat folder;
    class names, empty for a flat folder).

  Raises:
    FileNotFoundError: `root` is missing or holds no image.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"Image folder {root!r} does not exist.")
  entries = sorted(os.listdir(root))
  classes = [d for d in entries if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
  if classes:
    listing = image_listing.list_images(*(os.path.join(root, c) for c in classes), within=root)
    loose = len(entries) - len(classes)
    if loose:
      listing = dataclasses.replace(listing, ignored=listing.ignored + loose)
      logging.warning("Ignoring %d files or hidden folders next to the class folders of %s.", loose, root)
    for cls, group in zip(classes, listing.groups):
      if not group:
        logging.warning("Class folder %s has no images.", os.path.join(root, cls))
  else:
    listing = image_listing.list_images(root)
  if not listing.paths:
    raise FileNotFoundError(
      f"No image files ({', '.join(image_listing.IMAGE_EXTENSIONS)}) found under {root!r} ({listing.summary()})."
    )
  return listing, classes


def folder_root(path: str, split: str | None) -> str:
  """`path/NAME` when the split's name names a folder there (e.g. imagenet/{train,val}), else `path`."""
  name = parse_folder_split(split).name if split else ""
  if name and os.path.isdir(os.path.join(path, name)):
    return os.path.join(path, name)
  return path


# ------------------------------------------------------------------------------
# Folder splits: `NAME`, `NAME[START:END]`.
# ------------------------------------------------------------------------------
_FOLDER_SPLIT = re.compile(r"^([^\[\]]*?)(?:\[([^\[\]]*)\])?$")
_SLICE_BOUND = re.compile(r"^[+-]?\d+%?$")


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """A folder split (TFDS-like slices over a stable order of the files).

  Grammar: `NAME` or `NAME[START:END]`. NAME is a subfolder of the dataset folder when one of that name exists
  (`train`, `val`, ...), else the whole folder (NAME may then be anything, or empty: `[:-1000]`). START and END
  are optional integers (negative: from the end, as Python slices) or percents of the folder's images
  (`10%`, `-10%`, rounded to the nearest image). The slice is taken over the files sorted by the SHA-256 of
  their path relative to the split's folder, so which images a slice holds depends neither on the listing
  order nor on the class folders: `train[:-1000]` and `train[-1000:]` split a folder into a training set and
  a held-out set of 1000 images drawn evenly from every class, the same on every machine and after images
  are added elsewhere in the order. Within a slice the files keep the listing order (grouped by class).
  """

  name: str
  start: str = ""
  end: str = ""
  sliced: bool = False

  def bounds(self, n: int) -> tuple[int, int]:
    """[lo, hi) of the hash order for a folder of `n` images."""
    return _slice_bound(self.start, n, 0), _slice_bound(self.end, n, n)


def parse_folder_split(split: str) -> FolderSplit:
  """Parses a folder split (see `FolderSplit`); a malformed one is a ValueError naming it."""
  match = _FOLDER_SPLIT.match(split)
  if not match:
    raise ValueError(
      f"folder split {split!r} is malformed: expected NAME or NAME[START:END] (e.g. 'train[:-1000]', 'train[90%:]')"
    )
  name, inside = match.group(1), match.group(2)
  if inside is None:
    return FolderSplit(name)
  parts = [p.strip() for p in inside.split(":")]
  if len(parts) != 2 or not all(p == "" or _SLICE_BOUND.match(p) for p in parts):
    raise ValueError(
      f"folder split {split!r} has a malformed slice [{inside}]: expected [START:END] with "
      "optional integers or percents (e.g. [:-1000], [-1000:], [:90%], [90%:])"
    )
  for p in parts:
    if p.endswith("%") and abs(int(p[:-1])) > 100:
      raise ValueError(f"folder split {split!r}: {p} is not a percentage between -100% and 100%")
  return FolderSplit(name, parts[0], parts[1], sliced=True)


def _slice_bound(text: str, n: int, default: int) -> int:
  """A slice bound of a folder of `n` images, clamped to [0, n] as Python slices clamp."""
  if not text:
    return default
  if text.endswith("%"):
    percent = int(text[:-1])
    value = int(math.copysign(math.floor(abs(percent) * n / 100 + 0.5), percent))  # nearest, halves away from 0
  else:
    value = int(text)
  return slice(value, None).indices(n)[0]


def hash_order(names: list[str]) -> np.ndarray:
  """Indices that sort `names` by the SHA-256 of their UTF-8 bytes (ties, i.e. equal names, by position)."""
  keys = [hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest() for name in names]
  return np.asarray(sorted(range(len(names)), key=lambda i: (keys[i], i)), np.int64)


class FolderSource(EncodedSource):
  """A folder of image files (see `list_image_folder`).

  Attributes:
    paths, labels: the files and their int32 labels.
    class_names: sorted class folder names ([] for a flat folder).
    class_counts: {class name: number of images} ({'': n} for a flat folder).
    listing: the `image_listing.ImageListing` (ignored, repeated, unreadable entries).
  """

  def __init__(self, path: str, split: str | None = None):
    parsed = parse_folder_split(split or "")
    self.root = folder_root(path, parsed.name)
    self.listing, self.class_names = list_image_folder(self.root)
    paths = self.listing.paths
    sizes = [len(g) for g in self.listing.groups]
    labels = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    description = f"folder {self.root!r}"
    if parsed.sliced:
      lo, hi = parsed.bounds(len(paths))
      keep = np.sort(hash_order([os.path.relpath(p, self.root) for p in paths])[lo:hi])
      if not keep.size:
        raise ValueError(f"folder split {split!r} selects no image of the {len(paths)} in {self.root!r}")
      description += f" split {split!r} ({keep.size} of {len(paths)} images)"
      paths, labels = [paths[i] for i in keep], labels[keep]
      sizes = np.bincount(labels, minlength=len(sizes)).tolist()
    self.paths, self.labels = paths, labels
    self.class_counts = dict(zip(self.class_names or [""], sizes))
    super().__init__(len(self.paths), description)
    if not self.class_names:
      per_class = "no class folders (label 0)"
    elif len(sizes) <= 20:
      per_class = f"{len(sizes)} classes ({', '.join(f'{c}: {n}' for c, n in self.class_counts.items())})"
    else:
      per_class = f"{len(sizes)} classes ({min(sizes)} to {max(sizes)} images each)"
    logging.info("%s: %s; %s.", self.description, per_class, self.listing.summary())

  def read(self, index):
    # The path, not the bytes: `read_image` checks the header before reading the pixels.
    return self.paths[index], int(self.labels[index]), self.name(index)

  def name(self, index: int) -> str:
    """Path relative to the root, as reported in `stats`."""
    return os.path.relpath(self.paths[index], self.root)


class TfdsSource(EncodedSource):
  """A TFDS dataset prepared as array_record, read with `tfds.data_source`."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(
        f"{builder.name} in {builder.data_dir} was prepared as "
        f"{builder.info.file_format.value}; random access needs array_record. "
        "Convert it with `tfds convert_format --dataset_version_dir="
        f"{builder.data_dir} --out_file_format=array_record` or prepare it again "
        "in an empty data_dir."
      )
    keys = builder.info.supervised_keys or ("image", "label")
    self._image_key, self._label_key = keys[0], keys[1]
    features = builder.info.features
    if not isinstance(features[self._image_key], tfds.features.Image):
      raise ValueError(f"{builder.name}: feature {self._image_key!r} is not an image.")
    self._name_key = "file_name" if "file_name" in features else None
    self._src = builder.as_data_source(split=split, decoders={self._image_key: tfds.decode.SkipDecoding()})
    super().__init__(len(self._src), f"{builder.name} {split} in {builder.data_dir}")

  def read(self, index):
    ex = self._src[index]
    name = ex[self._name_key] if self._name_key else index
    if isinstance(name, bytes):
      name = name.decode()
    return ex[self._image_key], int(ex[self._label_key]), str(name)


# ------------------------------------------------------------------------------
# Public entry points.
# ------------------------------------------------------------------------------
def is_folder(name: str) -> bool:
  return name.startswith(FOLDER_PREFIX)


def get_source(
  name: str,
  split: str,
  data_dir: str | None = None,
  *,
  manual_dir: str | None = None,
  download: bool = False,
) -> Source:
  """Builds the `Source` for a dataset name.

  Args:
    name: 'fashion_mnist' (or another small TFDS set: in memory), 'folder:/path',
      or any TFDS name with image/label features (random access via array_record,
      e.g. 'imagenet2012').
    split: TFDS split string ('train', 'validation', 'train[:1%]'); for folders
      `NAME[START:END]` (see `FolderSplit`): the subfolder NAME when it exists,
      sliced over a hash order of the files.
    data_dir: TFDS data dir (None: TFDS default).
    manual_dir: imagenet2012: folder with the ILSVRC2012 tars;
      fashion_mnist: folder with the IDX files (default: the Debian package's).
    download: allow a network download if nothing local exists.
  """
  if is_folder(name):
    return FolderSource(name[len(FOLDER_PREFIX) :], split)
  if name in IN_MEMORY_TFDS:
    return ArraySource(*load_arrays(name, split, data_dir, manual_dir=manual_dir, download=download))
  if data_dir is not None and not os.path.isdir(data_dir) and manual_dir is None:
    raise FileNotFoundError(f"TFDS data_dir {data_dir!r} does not exist.")
  builder = tfds_prepare.prepare_tfds(name, data_dir, manual_dir=manual_dir, download=download)
  return TfdsSource(builder, split)


_ARRAY_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _tfds_arrays(name, split, data_dir, manual_dir, download):
  """Whole split as arrays; cached, since small sets are re-read by every iterator."""
  key = (name, split, os.path.abspath(data_dir) if data_dir else None)
  if key in _ARRAY_CACHE:
    return _ARRAY_CACHE[key]
  info = tfds_prepare._builder(name, data_dir).info  # pylint: disable=protected-access
  img_key, label_key = info.supervised_keys or ("image", "label")
  shape = info.features[img_key].shape
  if None in shape:
    raise ValueError(
      f"load_arrays needs fixed-size images; {name} has image shape {shape}. "
      "Use pipeline.train_iterator / eval_iterator instead."
    )
  # Prepared as tfrecord (the TFDS default) when missing: `as_dataset` below
  # cannot read array_record.
  builder = tfds_prepare.prepare_tfds(name, data_dir, manual_dir=manual_dir, download=download, file_format=None)
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    src = builder.as_data_source(split=split)
    items = src.__getitems__(range(len(src)))
    images = np.stack([ex[img_key] for ex in items])
    labels = np.asarray([ex[label_key] for ex in items])
  else:
    ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True, shuffle_files=False)
    images, labels = tfds.as_numpy(ds)
  images = _check_images(images)
  labels = labels.astype(np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  _ARRAY_CACHE[key] = (images, labels)
  return images, labels


def _folder_arrays(path, split, image_size):
  src = FolderSource(path, split)
  images, labels, names = [], [], []
  for i in range(src.num_examples):
    try:
      data, label, name = src.read(i)
      image = image_io.read_image(data, name=name)
    except Exception as e:  # pylint: disable=broad-except
      src.stats.add(src.name(i), f"{type(e).__name__}: {e}")
      continue
    if image_size is not None:
      image = image_io.round_to_uint8(augment.resize_center_crop(image, image_size, crop_ratio=1.0).numpy())
    images.append(image)
    labels.append(label)
    names.append(name)
  if not images:
    raise ValueError(f"No decodable image in {src.description}.")
  image_io.require_one_size(
    zip(names, (im.shape[:2] for im in images)), src.description, "Pass image_size=... to resize them."
  )
  skipped = src.stats.snapshot()["corrupt_skipped"]
  if skipped:
    logging.warning("load_arrays skipped %d undecodable images in %s.", skipped, src.root)
  return np.stack(images), np.asarray(labels, np.int32)


def load_arrays(
  name: str,
  split: str,
  data_dir: str | None = None,
  *,
  manual_dir: str | None = None,
  download: bool = False,
  image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """A whole small dataset in memory.

  Args:
    name: 'fashion_mnist' (or another fixed-size TFDS set) or 'folder:/path'.
    split: 'train' / 'test' / any TFDS split string; folder: see `FolderSplit`.
    data_dir: TFDS data dir (None: TFDS default). fashion_mnist is prepared there
      offline from the Debian IDX files when missing.
    manual_dir: where the fashion_mnist IDX files are (default Debian path).
    download: allow the stock TFDS download when nothing local exists.
    image_size: folders only: resize shorter side + center crop to this size
      (`augment.resize_center_crop` with crop_ratio 1, bicubic, rounded to uint8;
      needed when the files differ in size).

  Returns:
    images uint8 `[N, H, W, C]` (C = 1 for fashion_mnist, 3 for folders; read-only
    for TFDS sets since they are cached), labels int32 `[N]`. Undecodable folder
    files are skipped (logged).
  """
  if is_folder(name):
    return _folder_arrays(name[len(FOLDER_PREFIX) :], split, image_size)
  if image_size is not None:
    raise ValueError("image_size is only supported for folder datasets.")
  return _tfds_arrays(name, split, data_dir, manual_dir, download)
