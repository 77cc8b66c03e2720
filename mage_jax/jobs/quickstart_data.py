"""What the quickstart trains and evaluates on: Fashion-MNIST, or a folder of the user's own images.

`make_dataset` turns `--data` into a `Dataset`: the input name of the training configs, a training split and a
held-out split, the image size. A folder's splits are

  * its `train/` and `test/` (else `val/`, `validation/`) subfolders, when it has both (and no other);
  * otherwise (with `train/` as the only subfolder: within it) a held-out slice of `holdout` images (default: 10% of the
    images, at most 1000, at least `MIN_HELDOUT`) and the rest for training, as the folder splits `[:-N]` / `[-N:]`
    of `sources.FolderSplit`: slices of the files in a SHA-256 order of their relative paths, so the held-out set is
    the same on every machine, independent of the listing order, and spread over the classes.

Class subfolders (one per class, torchvision ImageFolder style) give labels; a flat folder has none.
`summarize` (the quickstart's data stage) reads every file's header once and applies the dataset-level checks: an
empty folder, too few images for the held-out split or for a training batch, train/test subfolders with
different classes are one-line errors; unreadable and non-image files are counted and skipped. It also decides
which representation evals the classes allow (`probe_plan`). `write_reference_images` stores the held-out images
at the training resolution, as the model sees them, which is FID's reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
from absl import logging

from mage_jax.data import images as image_io

FASHION_MNIST = "fashion_mnist"
HELDOUT_SUBFOLDERS = ("test", "val", "validation")
MAX_DEFAULT_HOLDOUT = 1000
MIN_HELDOUT = 2  # FID's covariance needs two images; fewer is no held-out evaluation at all
MAX_FID_REFERENCE = 1000
FEWSHOT_SHOTS = (1, 2, 5, 10)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The data of a quickstart run.

  Attributes:
    name: `config.input.name` ('fashion_mnist' or 'folder:/abs/path').
    data_dir: TFDS data dir (Fashion-MNIST), None for TFDS's default or for folders.
    train_split, heldout_split: split strings of the input pipeline.
    image_size: side of the square training images.
    fingerprint: for folders, a hash of every listed file's relative path, size and modification time (a stage
      whose data changed is redone); '' for Fashion-MNIST.
  """

  name: str
  data_dir: str | None
  train_split: str
  heldout_split: str
  image_size: int
  fingerprint: str = ""

  @property
  def is_folder(self) -> bool:
    return self.name != FASHION_MNIST

  @property
  def path(self) -> str | None:
    return self.name[len("folder:") :] if self.is_folder else None

  @property
  def title(self) -> str:
    return f"folder {self.path}" if self.is_folder else "Fashion-MNIST"

  @property
  def heldout_title(self) -> str:
    return "held-out split" if self.is_folder else "test split"

  def identity(self) -> dict:
    """What every stage's output depends on (JSON-able)."""
    return dataclasses.asdict(self)


def make_dataset(data: str, data_dir: str | None, *, holdout: int, image_size: int, min_train: int) -> Dataset:
  """The `Dataset` of `--data` ('fashion_mnist' or 'folder:DIR').

  Args:
    data: the flag's value.
    data_dir: TFDS data dir (Fashion-MNIST only).
    holdout: held-out images of a folder without split subfolders; < 0: the default (see the module).
    image_size: side of the training images.
    min_train: the largest training batch (a training split must hold at least one).

  Raises:
    ValueError: an unknown `data`, a missing or empty folder, or too few images for the splits.
  """
  if data == FASHION_MNIST:
    if holdout >= 0:
      raise ValueError("--holdout applies to image folders; Fashion-MNIST is held out by its test split")
    return Dataset(FASHION_MNIST, data_dir, "train", "test", image_size)
  if not data.startswith("folder:") or not data[len("folder:") :]:
    raise ValueError(
      f"--data={data!r}: expected {FASHION_MNIST} or folder:DIR (a folder of images, with one "
      "subfolder per class when there are classes)"
    )
  path = os.path.abspath(os.path.expanduser(data[len("folder:") :]))
  from mage_jax.data import sources  # pylint: disable=g-import-not-at-top  (TensorFlow)

  subdirs = (
    {d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")}
    if os.path.isdir(path)
    else set()
  )
  heldout_dir = next((d for d in HELDOUT_SUBFOLDERS if d in subdirs), None)
  if "train" in subdirs and heldout_dir and subdirs <= {"train", *HELDOUT_SUBFOLDERS}:
    if holdout >= 0:
      raise ValueError(
        f"--holdout={holdout}: {path} has train/ and {heldout_dir}/ subfolders, which are its "
        "training and held-out splits; leave --holdout out"
      )
    train_split, heldout_split = "train", heldout_dir
  else:
    base = "train" if subdirs == {"train"} else ""  # train/ alone: its images are the ones to split
    total = sources.FolderSource(path, base).num_examples  # FileNotFoundError: missing folder, or no image
    n = holdout if holdout >= 0 else max(MIN_HELDOUT, min(round(total / 10), MAX_DEFAULT_HOLDOUT))
    if n < MIN_HELDOUT:
      raise ValueError(
        f"--holdout={holdout}: the held-out split needs at least {MIN_HELDOUT} images (FID and the held-out metrics)"
      )
    if total - n < min_train:
      raise ValueError(
        f"{path} has {total} image{'s' * (total != 1)}: holding out {n} leaves {max(total - n, 0)} "
        f"for training, fewer than the training batch of {min_train}; the quickstart needs at least "
        f"{n + min_train} images (or a smaller --holdout)"
      )
    train_split, heldout_split = f"{base}[:-{n}]", f"{base}[-{n}:]"
  listed = [sources.FolderSource(path, split) for split in (train_split, heldout_split)]
  return Dataset(
    f"folder:{path}",
    None,
    train_split,
    heldout_split,
    image_size,
    _fingerprint([p for src in listed for p in src.paths], path),
  )


def _fingerprint(paths: list[str], root: str) -> str:
  """SHA-256 of (relative path, size, modification time) of every file: changes when the data does."""
  h = hashlib.sha256()
  for p in sorted(paths):
    st = os.stat(p)
    h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
  return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# The data stage: what the splits hold, checked.


def _split_summary(src, split: str) -> dict:
  """Images of one folder split: listed, readable (header), unreadable; per class; the range of sizes."""
  unreadable, sizes = [], set()
  for i, p in enumerate(src.paths):
    try:
      sizes.add(image_io.read_size(p))
    except (image_io.ImageError, OSError) as e:
      unreadable.append(i)
      logging.warning("skipping %s: %s", src.name(i), e)
  readable = np.ones(len(src.paths), bool)
  readable[unreadable] = False
  per_class = np.bincount(src.labels[readable], minlength=max(len(src.class_names), 1)).tolist()
  areas = sorted(sizes, key=lambda s: (s[0] * s[1], s))
  return {
    "split": split,
    "root": src.root,
    "images": int(readable.sum()),
    "unreadable_skipped": len(unreadable),
    "unreadable_examples": [src.name(i) for i in unreadable[:5]],
    "folder_listing": src.listing.summary(),
    "per_class": dict(zip(src.class_names or [""], per_class)),
    "sizes": "none readable"
    if not areas
    else (
      "x".join(map(str, areas[0]))
      if len(areas) == 1
      else f"{len(areas)} sizes from {'x'.join(map(str, areas[0]))} to {'x'.join(map(str, areas[-1]))} "
      "(each resized: shorter side, centre crop)"
    ),
  }


def summarize(dataset: Dataset, min_train: int) -> dict:
  """The data stage: where the data comes from, the images per split and class, checked (see the module).

  Returns:
    JSON-able {'source', 'path', 'data_dir', 'image_size', 'classes', 'splits': {'train': ..., 'heldout': ...}}.
  """
  if not dataset.is_folder:
    from mage_jax.data import tfds_prepare  # pylint: disable=g-import-not-at-top

    info = tfds_prepare.prepare_fashion_mnist(dataset.data_dir).info
    classes = list(info.features["label"].names)
    return {
      "source": FASHION_MNIST,
      "data_dir": dataset.data_dir,
      "image_size": dataset.image_size,
      "classes": classes,
      "splits": {
        role: {"split": split, "images": info.splits[split].num_examples}
        for role, split in (("train", dataset.train_split), ("heldout", dataset.heldout_split))
      },
    }
  from mage_jax.data import sources  # pylint: disable=g-import-not-at-top

  train, heldout = (sources.FolderSource(dataset.path, s) for s in (dataset.train_split, dataset.heldout_split))
  if train.class_names != heldout.class_names:
    only = lambda a, b: sorted(set(a.class_names) - set(b.class_names))
    raise ValueError(
      f"{dataset.path}: the class folders of {train.root} and {heldout.root} differ (only in "
      f"training: {only(train, heldout) or 'none'}; only held out: {only(heldout, train) or 'none'}); "
      "labels are the positions of the sorted class names, so both must have the same ones"
    )
  splits = {
    "train": _split_summary(train, dataset.train_split),
    "heldout": _split_summary(heldout, dataset.heldout_split),
  }
  for role, need in (("train", min_train), ("heldout", MIN_HELDOUT)):
    s = splits[role]
    if s["images"] < need:
      what = f"a training batch of {need}" if role == "train" else f"the {need} that FID needs"
      raise ValueError(
        f"{dataset.path}: the {role} split {s['split']!r} ({s['root']}) has {s['images']} readable "
        f"images ({s['unreadable_skipped']} unreadable skipped), fewer than {what}"
      )
  return {
    "source": "folder",
    "path": dataset.path,
    "image_size": dataset.image_size,
    "classes": train.class_names,
    "splits": splits,
  }


def probe_plan(summary: dict, shots=FEWSHOT_SHOTS) -> tuple[tuple[str, ...], tuple[int, ...], dict]:
  """Which representation evals the classes allow.

  Returns:
    (evals among 'linear_probe', 'fewshot'; the few-shot shots every class has enough training images for;
    {eval name: why it is skipped, or why some shots are}).
  """
  classes = summary["classes"]
  if len(classes) < 2:
    reason = (
      "no class subfolders (a flat folder has no labels)"
      if not classes
      else f"a single class folder ({classes[0]!r}): nothing to classify"
    )
    return (), (), {"linear_probe": reason, "fewshot": reason}
  per_class = summary["splits"]["train"]["per_class"]
  smallest = min(per_class, key=lambda c: (per_class[c], c))
  feasible = tuple(s for s in shots if s <= per_class[smallest])
  skipped = {}
  if len(feasible) < len(shots):
    skipped["fewshot"] = (
      f"class {smallest!r} has {per_class[smallest]} training image"
      f"{'s' * (per_class[smallest] != 1)}: "
      f"{', '.join(str(s) for s in shots if s not in feasible)}-shot need more"
    )
  return ("linear_probe",) + (("fewshot",) if feasible else ()), feasible, skipped


def write_reference_images(dataset: Dataset, path: str) -> int:
  """Writes the held-out images at the training resolution (uint8 [N, S, S, 3], the eval transform: shorter side
  to S, bicubic, centre crop, rounded) to the npz `path`; at most `MAX_FID_REFERENCE`, evenly spaced over the
  split. Returns the number written."""
  from mage_jax.data import sources  # pylint: disable=g-import-not-at-top

  images, _ = sources.load_arrays(dataset.name, dataset.heldout_split, image_size=dataset.image_size)
  if len(images) > MAX_FID_REFERENCE:
    images = images[np.linspace(0, len(images) - 1, MAX_FID_REFERENCE).round().astype(int)]
  np.savez(path + ".tmp.npz", images=images)
  os.replace(path + ".tmp.npz", path)
  return len(images)
