"""Tests for mage_jax.data: sources, augmentation, deterministic iterators.

All fixtures are generated in tmp_path; the only outside files are the Debian
`dataset-fashion-mnist` IDX files (test skipped when absent) and the label
lists shipped inside the tensorflow_datasets wheel.
"""

import collections
import gzip
import io
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mage_jax.data import augment, pipeline, sources, tfds_prepare

DEBIAN_DIR = tfds_prepare.DEBIAN_FASHION_MNIST_DIR


# ------------------------------------------------------------------------------
# Fixture helpers.
# ------------------------------------------------------------------------------
def _jpeg_bytes(h, w, seed, gray=False):
  rng = np.random.default_rng(seed)
  shape = (h, w) if gray else (h, w, 3)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _make_folder(root, counts, corrupt=None, size=(20, 24)):
  """counts: {class_name: n}; corrupt: relative path of an undecodable file."""
  for c, (cls, n) in enumerate(sorted(counts.items())):
    os.makedirs(root / cls, exist_ok=True)
    for k in range(n):
      (root / cls / f"im{k}.jpg").write_bytes(_jpeg_bytes(size[0], size[1], 100 * c + k, gray=(k == 0)))
  if corrupt:
    (root / corrupt).write_bytes(b"this is not an image")
  return root


def _tar_add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _make_ilsvrc_manual_dir(manual, synsets, per_class, num_val, corrupt=None):
  """Tiny ILSVRC2012_img_{train,val}.tar in the layout the TFDS builder reads."""
  os.makedirs(manual, exist_ok=True)
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as tar:
    for s, syn in enumerate(synsets):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as sub:
        for k in range(per_class):
          name = f"{syn}_{k}.JPEG"
          data = b"\xff\xd8 broken" if name == corrupt else _jpeg_bytes(30 + 3 * k, 40, 10 * s + k)
          _tar_add(sub, name, data)
      _tar_add(tar, f"{syn}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
    for k in range(1, num_val + 1):
      _tar_add(tar, f"ILSVRC2012_val_{k:08d}.JPEG", _jpeg_bytes(36, 28, 1000 + k))


def _array_source(n=50, h=8, w=8, c=1, seed=0):
  rng = np.random.default_rng(seed)
  return sources.ArraySource(rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), np.arange(n) % 7)


def _take(it, k):
  return [next(it) for _ in range(k)]


# ------------------------------------------------------------------------------
# Augmentation.
# ------------------------------------------------------------------------------
def _coordinate_image(h, w):
  """uint8 image whose channel 0 is the row and channel 1 the column index."""
  rows, cols = np.mgrid[0:h, 0:w]
  return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


def _boxes(h, w, n, single_draw=False):
  out = []
  for s in range(n):
    box = augment.random_resized_crop_box(
      tf.constant([7, s], tf.int64), tf.constant(h), tf.constant(w), single_draw=single_draw
    )
    out.append([int(v) for v in box])
  return np.array(out)


def test_random_resized_crop_box_respects_scale_and_ratio():
  h = w = 100
  boxes = _boxes(h, w, 300)
  top, left, ch, cw = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + ch <= h).all() and (left + cw <= w).all()
  area = ch * cw / (h * w)
  # w, h are rounded to integers: +-0.5 px on ~45..100 px sides.
  assert area.min() >= 0.2 * (1 - 0.03) and area.max() <= 1.0
  assert area.min() < 0.3 and area.max() > 0.8  # the whole range is used
  aspect = cw / ch
  assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
  # Offsets are uniform over the valid range, not always centred.
  assert len({(top, left) for top, left, _, _ in boxes}) > 250


def test_random_resized_crop_box_fallback_is_torchvision_center_crop():
  h, w = 60, 200  # aspect 3.3 > 4/3: large areas never fit -> fallback
  boxes = _boxes(h, w, 200)
  fallback = (60 - 60) // 2, (200 - 80) // 2, 60, 80  # h, round(h*4/3) centred
  is_fb = np.all(boxes == fallback, axis=1)
  assert is_fb.any()
  top, left, ch, cw = boxes[~is_fb].T
  assert (top + ch <= h).all() and (left + cw <= w).all()
  area = ch * cw / (h * w)
  assert area.min() >= 0.2 * 0.97 and area.max() <= 1.0
  assert (cw / ch >= 0.75 * 0.97).all() and (cw / ch <= 4 / 3 * 1.03).all()


def test_probe_crop_single_draw_is_clipped_to_image():
  h, w = 60, 200
  boxes = _boxes(h, w, 200, single_draw=True)
  top, left, ch, cw = boxes.T
  assert (ch >= 1).all() and (ch <= h).all() and (cw <= w).all()
  assert (top + ch <= h).all() and (left + cw <= w).all()
  assert (ch == h).any()  # clipping happened (would be > h unclipped)
  assert (ch * cw <= h * w).all()


def test_random_resized_crop_pixels_come_from_the_box():
  h, w, size = 120, 90, 32
  image = tf.constant(_coordinate_image(h, w))
  for s in range(5):
    seed = tf.constant([3, s], tf.int64)
    top, left, ch, cw = (int(v) for v in augment.random_resized_crop_box(seed, tf.constant(h), tf.constant(w)))
    out = augment.random_resized_crop(image, seed, size, interpolation="nearest").numpy()
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    # Nearest with half-pixel centres: source = floor((dst + 0.5) * in / out).
    rows = top + np.floor((np.arange(size) + 0.5) * ch / size).astype(int)
    cols = left + np.floor((np.arange(size) + 0.5) * cw / size).astype(int)
    np.testing.assert_allclose(out[:, 0, 0] * 255, rows, atol=1e-3)
    np.testing.assert_allclose(out[0, :, 1] * 255, cols, atol=1e-3)


@pytest.mark.parametrize("mode", ["pretrain", "probe", "none"])
def test_preprocess_range_shape_and_grayscale(mode):
  rng = np.random.default_rng(1)
  gray = tf.constant(rng.integers(0, 256, (37, 53, 1), dtype=np.uint8))
  out = augment.preprocess(gray, tf.constant([1, 2], tf.int64), size=24, mode=mode).numpy()
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_to_rgb_rejects_two_channels():
  with pytest.raises(ValueError, match=r"\(4, 4, 2\)"):
    augment.to_rgb(tf.zeros([4, 4, 2], tf.uint8))
  with pytest.raises(ValueError, match=r"\(5, 4, 4, 2\)"):
    sources.ArraySource(np.zeros((5, 4, 4, 2), np.uint8), np.zeros(5))


def test_flip_is_either_identity_or_mirror_and_both_occur():
  image = tf.constant(_coordinate_image(4, 6))
  flipped = 0
  for s in range(40):
    out = augment.random_flip(image, tf.constant([5, s], tf.int64)).numpy()
    if np.array_equal(out, image.numpy()[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image.numpy())
  assert 8 <= flipped <= 32


def test_eval_resize_center_crop():
  assert augment.eval_resize_size(256) == 292
  assert augment.eval_resize_size(32) == 36
  # 40x60 -> shorter side 32 -> 32x48 -> centre 32x32 starting at column 8.
  image = tf.constant(_coordinate_image(40, 60))
  out = augment.resize_center_crop(image, 32, crop_ratio=1.0, interpolation="nearest").numpy()
  rows = np.floor((np.arange(32) + 0.5) * 40 / 32)
  cols = np.floor((np.arange(8, 40) + 0.5) * 60 / 48)
  np.testing.assert_allclose(out[:, 0, 0] * 255, rows, atol=1e-3)
  np.testing.assert_allclose(out[0, :, 1] * 255, cols, atol=1e-3)
  # Default ratio on a constant image: bicubic keeps the constant.
  const = tf.fill([300, 400, 3], tf.constant(200, tf.uint8))
  out = augment.resize_center_crop(const, 256).numpy()
  assert out.shape == (256, 256, 3)
  np.testing.assert_allclose(out, 200 / 255, atol=1e-5)


# ------------------------------------------------------------------------------
# Determinism, resume, process slices.
# ------------------------------------------------------------------------------
CFG = dict(name="unused", batch_size=8, image_size=16, augment="pretrain")


def test_same_seed_same_batches_and_resume_equals_tail():
  src = _array_source()  # 50 examples, 8 per batch -> 6 steps per epoch
  a = _take(pipeline.train_iterator(CFG, seed=11, source=src, return_index=True), 10)
  b = _take(pipeline.train_iterator(CFG, seed=11, source=src, return_index=True), 10)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for k0 in (4, 7):  # inside epoch 0 and after the epoch boundary
    resumed = _take(pipeline.train_iterator(CFG, seed=11, source=src, start_step=k0, return_index=True), 3)
    for x, y in zip(resumed, a[k0 : k0 + 3]):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  other = next(pipeline.train_iterator(CFG, seed=12, source=src, return_index=True))
  assert not np.array_equal(other["index"], a[0]["index"])


def test_epochs_are_permutations_and_labels_match_indices():
  src = _array_source()
  batches = _take(pipeline.train_iterator(CFG, seed=3, source=src, return_index=True), 12)
  idx = np.stack([b["index"] for b in batches])
  for epoch in (idx[:6], idx[6:]):
    flat = epoch.ravel()
    assert len(set(flat.tolist())) == 48 and flat.min() >= 0 and flat.max() < 50
  assert not np.array_equal(idx[:6], idx[6:])  # a new permutation per epoch
  for b in batches:
    np.testing.assert_array_equal(b["label"], b["index"] % 7)
  np.testing.assert_array_equal(idx[7], pipeline.global_batch_indices(7, seed=3, num_examples=50, batch_size=8))


def test_process_slices_concatenate_to_global_batch():
  src = _array_source()
  full = _take(pipeline.train_iterator(CFG, seed=5, source=src, start_step=2, return_index=True), 3)
  parts = [
    _take(
      pipeline.train_iterator(
        CFG, seed=5, source=src, start_step=2, process_index=p, process_count=2, return_index=True
      ),
      3,
    )
    for p in (0, 1)
  ]
  for s in range(3):
    assert parts[0][s]["image"].shape == (4, 16, 16, 3)
    for k in full[s]:
      np.testing.assert_array_equal(np.concatenate([parts[0][s][k], parts[1][s][k]]), full[s][k])


def test_batch_not_divisible_by_process_count():
  with pytest.raises(ValueError, match=r"batch_size 8 .*process_count 3"):
    pipeline.train_iterator(CFG, seed=0, source=_array_source(), process_count=3)


def test_unknown_config_key_and_batch_larger_than_data():
  with pytest.raises(ValueError, match="batchsize"):
    pipeline.train_iterator(dict(CFG, batchsize=3), seed=0, source=_array_source())
  with pytest.raises(ValueError, match="64 is larger than the dataset"):
    pipeline.train_iterator(dict(CFG, batch_size=64), seed=0, source=_array_source())


def test_eval_iterator_covers_split_once_with_mask():
  src = _array_source(n=21)
  cfg = dict(CFG, batch_size=8)
  seen = []
  for p in (0, 1):
    it = pipeline.eval_iterator(cfg, source=src, process_index=p, process_count=2, return_index=True)
    batches = list(it)
    assert len(it) == len(batches) == 3
    for g, b in enumerate(batches):
      pos = g * 8 + p * 4 + np.arange(4)
      np.testing.assert_array_equal(b["_mask"], pos < 21)
      seen += b["index"][b["_mask"]].tolist()
      assert (b["image"][~b["_mask"]] == 0).all()
      np.testing.assert_array_equal(b["label"][b["_mask"]], b["index"][b["_mask"]] % 7)
  assert sorted(seen) == list(range(21))


# ------------------------------------------------------------------------------
# Folder source.
# ------------------------------------------------------------------------------
def test_folder_source_labels_and_corrupt_file_is_skipped(tmp_path):
  root = _make_folder(tmp_path / "imgs", {"b_cls": 3, "a_cls": 4}, corrupt="b_cls/zz_bad.jpg")
  (tmp_path / "imgs" / "notes.txt").write_text("ignored")
  cfg = dict(name=f"folder:{root}", batch_size=4, image_size=16, num_workers=3)
  it = pipeline.eval_iterator(cfg, return_index=True)
  batches = list(it)
  src = it.source
  assert src.num_examples == 8 and src.class_names == ["a_cls", "b_cls"]
  for b in batches:
    for i, label, m in zip(b["index"], b["label"], b["_mask"]):
      if m and "zz_bad" not in src.paths[i]:
        assert label == (0 if "/a_cls/" in src.paths[i] else 1)
  assert it.stats["corrupt_skipped"] == 1
  assert it.stats["corrupt_files"] == (os.path.join("b_cls", "zz_bad.jpg"),)
  # The corrupt (last) index was replaced by the next one cyclically (index 0).
  last = batches[-1]
  np.testing.assert_array_equal(last["image"][-1], batches[0]["image"][0])
  # A second pass over the same source skips it again without re-reading it.
  again = list(pipeline.eval_iterator(cfg, source=src))
  np.testing.assert_array_equal(again[-1]["image"], last["image"])
  assert src.stats.snapshot() == {"corrupt_skipped": 2, "corrupt_files": ("b_cls/zz_bad.jpg",)}
  images, labels = sources.load_arrays(f"folder:{root}", "train")
  assert images.shape == (7, 20, 24, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [4, 3])


def test_folder_pipeline_is_deterministic_with_threads(tmp_path):
  root = _make_folder(tmp_path / "flat_parent", {"x": 12}) / "x"  # flat folder
  cfg = dict(name=f"folder:{root}", batch_size=6, image_size=16, num_workers=4)
  a = _take(pipeline.train_iterator(cfg, seed=1), 4)
  b = _take(pipeline.train_iterator(cfg, seed=1), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], np.zeros(6))


def test_folder_split_subdir_and_mixed_sizes(tmp_path):
  root = tmp_path / "ds"
  _make_folder(root / "train", {"c": 2}, size=(10, 12))
  (root / "train" / "c" / "big.png").write_bytes(b"")  # empty file: corrupt
  Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(root / "train" / "c" / "z.png")
  assert sources.FolderSource(str(root), "train").root == str(root / "train")
  with pytest.raises(ValueError, match=r"differ in size .*: 10x12 \(c/im0.jpg and 1 more\); 30x20 \(c/z.png\)"):
    sources.load_arrays(f"folder:{root}", "train")
  images, _ = sources.load_arrays(f"folder:{root}", "train", image_size=8)
  assert images.shape == (3, 8, 8, 3)


def test_missing_paths_give_errors_naming_them(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    pipeline.num_examples(dict(name=f"folder:{missing}", batch_size=2, image_size=8))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.get_source("imagenet2012", "train", missing)
  empty = tmp_path / "empty_data"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no_tars"):
    sources.get_source("imagenet2012", "train", str(empty), manual_dir=str(tmp_path / "no_tars"))
  with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
    tfds_prepare.prepare_fashion_mnist(str(empty), str(tmp_path / "no_idx"))


def test_load_arrays_refuses_variable_size_tfds_before_preparing(tmp_path):
  with pytest.raises(ValueError, match="fixed-size"):
    sources.load_arrays("imagenet2012", "train", str(tmp_path))
  assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------
# imagenet2012 through the real TFDS builder on a hand-made manual dir.
# ------------------------------------------------------------------------------
def test_imagenet2012_from_tiny_manual_dir(tmp_path):
  synsets = ["n01440764", "n01443537", "n01484850"]
  manual = tmp_path / "manual"
  _make_ilsvrc_manual_dir(manual, synsets, per_class=3, num_val=5, corrupt="n01443537_2.JPEG")
  data_dir = str(tmp_path / "tfds")
  cfg = dict(name="imagenet2012", data_dir=data_dir, manual_dir=str(manual), batch_size=4, image_size=32, num_workers=2)
  assert pipeline.num_examples(cfg) == 9
  assert pipeline.steps_per_epoch(cfg) == 2
  it = pipeline.train_iterator(cfg, seed=0, return_index=True)
  names = tfds.builder("imagenet2012", data_dir=data_dir).info.features["label"].names
  for b in _take(it, 4):
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    for i, label in zip(b["index"], b["label"]):
      _, want, name = it.source.read(int(i))
      if name != "n01443537_2.JPEG":
        assert names[label] == name.split("_")[0] == names[want]
  assert it.stats["corrupt_files"] == ("n01443537_2.JPEG",)
  assert it.stats["corrupt_skipped"] >= 1
  again = pipeline.train_iterator(cfg, seed=0, source=it.source)
  for x, y in zip(_take(again, 4), _take(pipeline.train_iterator(cfg, seed=0), 4)):
    np.testing.assert_array_equal(x["image"], y["image"])
  # Validation labels: line k of the wheel's validation_labels.txt is the synset
  # of ILSVRC2012_val_0000000{k+1}.
  lines = (
    open(os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "validation_labels.txt"))
    .read()
    .split()
  )
  ev = pipeline.eval_iterator(dict(cfg, split="validation", batch_size=2), return_index=True)
  got = {}
  for b in ev:
    for i, label, m in zip(b["index"], b["label"], b["_mask"]):
      if m:
        got[ev.source.read(int(i))[2]] = names[label]
  assert got == {f"ILSVRC2012_val_{k:08d}.JPEG": lines[k - 1] for k in range(1, 6)}


# ------------------------------------------------------------------------------
# fashion_mnist prepared offline from the Debian IDX files (conftest.fashion_data_dir, ~15-30 s).
# ------------------------------------------------------------------------------
def _read_idx(stem, header, shape):
  with gzip.open(os.path.join(DEBIAN_DIR, stem + ".gz")) as f:
    return np.frombuffer(f.read()[header:], np.uint8).reshape(shape)


@pytest.mark.slow
def test_fashion_mnist_offline_stock_name(fashion_data_dir):
  ds = tfds.load("fashion_mnist", split="test", data_dir=fashion_data_dir, download=False, try_gcs=False)
  assert ds.element_spec["image"].shape == (28, 28, 1)
  images, labels = sources.load_arrays("fashion_mnist", "test", fashion_data_dir)
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  # TFDS reorders examples; match them to the IDX files by content.
  ref_images = _read_idx("t10k-images-idx3-ubyte", 16, (10000, 28, 28))
  ref_labels = _read_idx("t10k-labels-idx1-ubyte", 8, (10000,))
  ref = collections.defaultdict(list)
  for im, lab in zip(ref_images, ref_labels):
    ref[im.tobytes()].append(int(lab))
  for im, lab in zip(images, labels):
    assert int(lab) in ref[im[..., 0].tobytes()]
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(ref_labels))


@pytest.mark.slow
def test_fashion_mnist_iterator(fashion_data_dir):
  cfg = dict(name="fashion_mnist", data_dir=fashion_data_dir, batch_size=64, image_size=32, split="train")
  assert pipeline.steps_per_epoch(cfg) == 60000 // 64
  b = next(pipeline.train_iterator(cfg, seed=0))
  assert b["image"].shape == (64, 32, 32, 3) and b["label"].dtype == np.int32
  assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
  np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 2])


def test_eval_input_config_turns_training_augmentation_off():
  from configs import finetune_imagenet

  train = finetune_imagenet.get_config("variant=B").finetune.input
  assert train.rand_augment and train.augment == "pretrain"
  view = pipeline.eval_input_config(train, split="validation", batch_size=256)
  # a valid config (no RandAugment left beside augment 'none'); image_size 0 means "the checkpoint's" here
  c = pipeline.InputConfig.from_config({**view, "image_size": 256})
  assert (c.split, c.batch_size, c.augment, c.rand_augment) == ("validation", 256, "none", "")
  assert (c.name, c.crop_ratio, c.eval_interpolation) == (train.name, train.crop_ratio, train.eval_interpolation)
  assert train.rand_augment == "rand-m9-mstd0.5-inc1" and train.split == "train"  # the source is not modified
