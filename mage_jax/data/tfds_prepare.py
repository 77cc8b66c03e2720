"""TFDS preparation that works offline: a data_dir made ready for `tfds.load` or `tfds.data_source`.

Fashion-MNIST is built from its original IDX files (the Debian package `dataset-fashion-mnist`), so the
quickstart and the tests need no network; datasets with manual download instructions (imagenet2012) are
prepared from their `manual_dir`.

Nothing here downloads by accident: TFDS is always called with `try_gcs=False`
and `DownloadConfig(try_download_gcs=False)`, and a network download happens only
when the caller passes `download=True`.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

# Debian/Ubuntu package `dataset-fashion-mnist` installs the original IDX files here.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
  "train_data": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_data": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}


class FashionMnistLocal(tfds_mnist.FashionMNIST, skip_registration=True):
  """Stock `fashion_mnist` (same name, version, features) built from local IDX files.

  Debian re-gzipped the files, so the stock builder's checksums do not match;
  this subclass only replaces where the files come from.
  """

  name = "fashion_mnist"

  def __init__(self, *, source_dir: str, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    files = dl_manager.extract({k: _fashion_file(self._source_dir, v) for k, v in FASHION_MNIST_FILES.items()})
    return [
      tfds.core.SplitGenerator(
        name=tfds.Split.TRAIN,
        gen_kwargs=dict(num_examples=60000, data_path=files["train_data"], label_path=files["train_labels"]),
      ),
      tfds.core.SplitGenerator(
        name=tfds.Split.TEST,
        gen_kwargs=dict(num_examples=10000, data_path=files["test_data"], label_path=files["test_labels"]),
      ),
    ]


def _fashion_file(source_dir: str, stem: str) -> str | None:
  """`stem.gz` or the already decompressed `stem` in source_dir, else None."""
  for fn in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(source_dir, fn)):
      return os.path.join(source_dir, fn)
  return None


def _no_download_config(manual_dir: str | None = None):
  return tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)


def _builder(name, data_dir, file_format=None):
  kwargs = {"file_format": file_format} if file_format else {}
  return tfds.builder(name, data_dir=data_dir, try_gcs=False, **kwargs)


def prepare_fashion_mnist(
  data_dir: str | None,
  source_dir: str | None = None,
  *,
  download: bool = False,
  file_format: str | None = None,
) -> tfds.core.DatasetBuilder:
  """Makes `tfds.load("fashion_mnist", data_dir=data_dir)` work, offline if possible.

  Order: already prepared -> build from the IDX files in `source_dir` (default
  the Debian package's /usr/share/datasets/fashion-mnist) -> the stock
  download, only if `download=True`.
  """
  builder = _builder("fashion_mnist", data_dir, file_format)
  if builder.is_prepared():
    return builder
  source_dir = source_dir or DEBIAN_FASHION_MNIST_DIR
  missing = [s for s in FASHION_MNIST_FILES.values() if _fashion_file(source_dir, s) is None]
  if not missing:
    kwargs = {"file_format": file_format} if file_format else {}
    local = FashionMnistLocal(source_dir=source_dir, data_dir=data_dir, **kwargs)
    local.download_and_prepare(download_config=_no_download_config())
    return _builder("fashion_mnist", data_dir, file_format)
  if download:
    builder.download_and_prepare(download_config=_no_download_config())
    return builder
  raise FileNotFoundError(
    f"fashion_mnist is not prepared in data_dir {builder.data_dir!r} and the IDX "
    f"files {missing} are missing from {source_dir!r}. Either install them "
    "(`apt-get install -y dataset-fashion-mnist`, which puts them in "
    f"{DEBIAN_FASHION_MNIST_DIR}) or run once with internet access and "
    "download=True."
  )


def prepare_tfds(
  name: str,
  data_dir: str | None,
  *,
  manual_dir: str | None = None,
  download: bool = False,
  file_format: str | None = "array_record",
) -> tfds.core.DatasetBuilder:
  """Returns a prepared builder; prepares from `manual_dir` when needed.

  Datasets with manual download instructions (imagenet2012: the ILSVRC2012 tars)
  are prepared from `manual_dir` (default `<data_dir>/downloads/manual`);
  others are downloaded only if `download=True`.
  """
  if name == "fashion_mnist":
    return prepare_fashion_mnist(data_dir, manual_dir, download=download, file_format=file_format)
  builder = _builder(name, data_dir, file_format)
  if builder.is_prepared():
    return builder
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual = manual_dir or os.path.join(data_dir or tfds.core.constants.DATA_DIR, "downloads", "manual")
    if not os.path.isdir(manual) or not os.listdir(manual):
      raise FileNotFoundError(
        f"{name} is not prepared in data_dir {str(builder.data_dir)!r} and its "
        f"manual_dir {manual!r} is missing or empty. "
        f"{name} needs: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}"
      )
    builder.download_and_prepare(download_config=_no_download_config(manual))
    return builder
  if download:
    builder.download_and_prepare(download_config=_no_download_config())
    return builder
  raise FileNotFoundError(
    f"{name} is not prepared in data_dir {str(builder.data_dir)!r} (does the "
    "path exist?). Prepare it there, or pass download=True (needs internet)."
  )
