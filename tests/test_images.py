"""Every image that enters mage_jax: `images.read_image` (modes, bit depths, transparency, the pixel budget),
`image_listing.list_images` (links, cycles, non-image files), the folder source and `load_arrays`,
`python -m mage_jax.edit` and `python -m mage_jax.fid` on hostile inputs, the one resize/centre-crop, and edit's
pixels == evaluation's.

Every file is built here, in tmp_path.
"""

import dataclasses
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import assert_one_line_error, run_cli
from mage_jax.data import augment, image_listing, images, pipeline, sources
from mage_jax.fid import inputs as fid_inputs, weights as fid_weights
from mage_jax.generation import editing
from mage_jax.models.mage import MAGEConfig
from mage_jax.models.vqgan import VQGANConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------
# File builders.


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width, height, bit_depth, color_type, rows=None, extra=b"") -> bytes:
  """A PNG from raw scanlines: `rows` is one row's bytes (repeated `height` times, streamed through zlib, so a
  9000x9000 image never exists in memory here) or None for a header with a token IDAT (a size claim only)."""
  if rows is None:
    idat = zlib.compress(b"\x00" * 16)
  else:
    z = zlib.compressobj()
    idat = b"".join(z.compress(b"\x00" + rows) for _ in range(height)) + z.flush()
  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_rows(array: np.ndarray, color_type: int, extra=b"") -> bytes:
  """A 16-bit PNG of a uint16 [H, W] or [H, W, C] array (PIL cannot write 16-bit RGB or a 16-bit tRNS)."""
  h, w = array.shape[:2]
  raw = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(h))
  ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
  )


def _truncated_png() -> bytes:
  """A PNG whose header is intact and whose pixel data stops half way."""
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()[: len(buf.getvalue()) // 2]


def _save(path, image: Image.Image, **kw) -> str:
  image.save(path, **kw)
  return str(path)


def _white_composite(rgb, alpha):
  """Float64 recomputation of compositing on white, rounded."""
  a = alpha.astype(np.float64)[..., None] / 255.0
  return np.rint(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# read_image: modes and bit depths.

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
ALPHA = np.concatenate([[0, 255, 128, 1], RNG.integers(0, 256, 31)]).astype(np.uint8).reshape(5, 7)


def test_eight_bit_modes(tmp_path):
  gray3 = np.repeat(GRAY[..., None], 3, -1)
  np.testing.assert_array_equal(images.read_image(_save(tmp_path / "l.png", Image.fromarray(GRAY))), gray3)
  np.testing.assert_array_equal(images.read_image(_save(tmp_path / "rgb.png", Image.fromarray(RGB))), RGB)
  bits = GRAY > 127
  got = images.read_image(_save(tmp_path / "one.png", Image.fromarray(bits)))
  assert Image.open(tmp_path / "one.png").mode == "1"
  np.testing.assert_array_equal(got, np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, -1))
  out = images.read_image(_save(tmp_path / "cmyk.tif", Image.fromarray(np.dstack([RGB, GRAY]), "CMYK")))
  np.testing.assert_array_equal(out, np.asarray(Image.open(tmp_path / "cmyk.tif").convert("RGB")))  # PIL's rule
  assert out.dtype == np.uint8 and out.shape == (5, 7, 3)


def test_alpha_and_transparency_composite_on_white(tmp_path):
  rgba = np.dstack([RGB, ALPHA])
  got = images.read_image(_save(tmp_path / "rgba.png", Image.fromarray(rgba)))
  np.testing.assert_array_equal(got, _white_composite(RGB, ALPHA))
  assert (got[0, 0] == 255).all() and (got[0, 1] == RGB[0, 1]).all()  # alpha 0 -> white, 255 -> the colour
  got = images.read_image(_save(tmp_path / "la.png", Image.fromarray(np.dstack([GRAY, ALPHA]), "LA")))
  np.testing.assert_array_equal(got, _white_composite(np.repeat(GRAY[..., None], 3, -1), ALPHA))
  # Palette: without transparency a lookup; with it, the transparent index becomes white.
  palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
  index = (GRAY % 16).astype(np.uint8)
  p = Image.fromarray(index, "P")
  p.putpalette(palette.tobytes())
  np.testing.assert_array_equal(images.read_image(_save(tmp_path / "p.png", p)), palette[index])
  got = images.read_image(_save(tmp_path / "pt.png", p, transparency=int(index[0, 0])))
  want = np.where((index == index[0, 0])[..., None], 255, palette[index])
  np.testing.assert_array_equal(got, want)
  # Gray tRNS (8 and 16 bit): one sample value is transparent.
  got = images.read_image(_save(tmp_path / "lt.png", Image.fromarray(GRAY), transparency=int(GRAY[0, 0])))
  np.testing.assert_array_equal(got, np.where((GRAY == GRAY[0, 0])[..., None], 255, np.repeat(GRAY[..., None], 3, -1)))
  g16 = np.array([[100, 40000], [40000, 65535]], np.uint16)
  data = _png_rows(g16, 0, extra=_chunk(b"tRNS", struct.pack(">H", 40000)))
  np.testing.assert_array_equal(images.read_image(data)[..., 0], [[0, 255], [255, 255]])


def test_sixteen_bit_gray_keeps_its_values_instead_of_saturating(tmp_path):
  # The reported case: a 16-bit gray PNG through PIL's convert("RGB") clips every value above 255.
  values = RNG.integers(0, 65536, (64, 64), dtype=np.uint16)
  path = _save(tmp_path / "g16.png", Image.fromarray(values))
  assert Image.open(path).mode == "I;16"
  naive = np.asarray(Image.open(path).convert("RGB"))
  assert (naive == 255).mean() > 0.99  # what edit used to see
  got = images.read_image(path)
  np.testing.assert_array_equal(got, np.repeat((values >> 8).astype(np.uint8)[..., None], 3, -1))
  assert (got == 255).mean() < 0.01
  # 16-bit TIFF and 16-bit PGM (PIL mode I) by the same rule; a 16-bit RGB PNG by Pillow's own high byte.
  np.testing.assert_array_equal(images.read_image(_save(tmp_path / "g16.tif", Image.fromarray(values))), got)
  pgm = tmp_path / "g16.pgm"
  pgm.write_bytes(b"P5\n64 64\n65535\n" + values.astype(">u2").tobytes())
  assert Image.open(pgm).mode == "I"
  np.testing.assert_array_equal(images.read_image(str(pgm)), got)
  rgb16 = RNG.integers(0, 65536, (3, 4, 3), dtype=np.uint16)
  np.testing.assert_array_equal(images.read_image(_png_rows(rgb16, 2)), (rgb16 >> 8).astype(np.uint8))


def test_32_bit_and_float_modes(tmp_path):
  floats = RNG.random((4, 6)).astype(np.float32)
  floats[0, 0], floats[0, 1] = 0.0, 1.0
  got = images.read_image(_save(tmp_path / "f.tif", Image.fromarray(floats)))
  assert Image.open(tmp_path / "f.tif").mode == "F"
  np.testing.assert_array_equal(got[..., 0], np.rint(floats.astype(np.float64) * 255).astype(np.uint8))
  with pytest.raises(images.ImageError, match=r"f255.tif: float image with values in \[0, 255\]; expected"):
    images.read_image(_save(tmp_path / "f255.tif", Image.fromarray(floats * 255)))
  with pytest.raises(images.ImageError, match="NaN"):
    images.read_image(_save(tmp_path / "fnan.tif", Image.fromarray(np.where(floats > 0.5, np.nan, floats))))
  wide = np.array([[0, 70000, -5]], np.int32)
  with pytest.raises(images.ImageError, match=r"i32.tif: 32-bit integer image with values in \[-5, 70000\]"):
    images.read_image(_save(tmp_path / "i32.tif", Image.fromarray(wide)))
  ok = np.array([[0, 256, 65535]], np.int32)
  np.testing.assert_array_equal(images.read_image(_save(tmp_path / "i.tif", Image.fromarray(ok)))[0, :, 0], [0, 1, 255])


def test_corrupt_and_missing_files_are_named_errors(tmp_path):
  (tmp_path / "trunc.png").write_bytes(_truncated_png())
  (tmp_path / "junk.png").write_bytes(b"not an image at all")
  (tmp_path / "empty.jpg").write_bytes(b"")
  with pytest.raises(images.ImageError, match=r"trunc.png: cannot decode image"):
    images.read_image(str(tmp_path / "trunc.png"))
  assert images.read_size(str(tmp_path / "trunc.png")) == (32, 32)  # the header alone is fine
  for name in ("junk.png", "empty.jpg"):
    with pytest.raises(images.ImageError, match=f"{name}: not an image file"):
      images.read_image(str(tmp_path / name))
  with pytest.raises(FileNotFoundError, match="image not found: .*nope.png"):
    images.read_image(str(tmp_path / "nope.png"))
  with pytest.raises(images.ImageError, match="<bytes>: not an image file"):
    images.read_image(b"\x00\x01")
  with pytest.raises(images.ImageError, match=": not a regular file"):
    images.read_image(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# The pixel budget.


def test_pixel_budget_refuses_from_the_header(tmp_path, monkeypatch):
  path = tmp_path / "g.png"
  path.write_bytes(_png(3000, 2000, 8, 0, rows=bytes(3000)))
  assert images.read_image(str(path), max_pixels=6_000_000).shape == (2000, 3000, 3)
  with pytest.raises(
    images.PixelBudgetError,
    match=r"g.png: 3000x2000 = 6.0 Mpx is above the pixel budget of "
    r"6.0 Mpx \(raise it with MAGE_JAX_MAX_IMAGE_PIXELS=N",
  ):
    images.read_image(str(path), max_pixels=5_999_999)
  monkeypatch.setenv(images.MAX_PIXELS_ENV, "1000000")
  with pytest.raises(images.PixelBudgetError, match="budget of 1.0 Mpx"):
    images.read_size(str(path))
  monkeypatch.setenv(images.MAX_PIXELS_ENV, "lots")
  with pytest.raises(ValueError, match="MAGE_JAX_MAX_IMAGE_PIXELS='lots'"):
    images.read_image(str(path))
  monkeypatch.delenv(images.MAX_PIXELS_ENV)
  # Headers claiming 81 Mpx (PIL would decode it) and 10 Gpx (PIL raises first): both our named refusal, at once.
  for w, h in ((9000, 9000), (100000, 100000)):
    start = time.perf_counter()
    with pytest.raises(images.PixelBudgetError, match=f"bomb{w}.png: .*budget"):
      images.read_image(_png(w, h, 8, 0), name=f"bomb{w}.png")
    assert time.perf_counter() - start < 1.0


def _cli(module, args, env_extra=None) -> subprocess.Popen:
  """Starts `python -m module args` (runpy, as -m does) after importing its libraries, so that the growth of the
  peak RSS over the run (printed on stderr, with whether TensorFlow got imported) is what the run itself used."""
  # The libraries the binary uses are imported first (a binary's absl flags can only be defined once).
  code = (
    "import importlib, resource, runpy, sys\n"
    "for lib in ('mage_jax.system.runtime', 'mage_jax.generation.editing', 'mage_jax.train.params_io',\n"
    "            'mage_jax.fid.inputs'):\n"
    "  importlib.import_module(lib)\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    f"sys.argv = [{module!r}] + {list(args)!r}\n"
    "try:\n"
    f"  runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    "  status = 0\n"
    "except SystemExit as e:\n"
    "  status = e.code\n"
    "grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
    "print('RUN', grow // 1024, 'tensorflow' in sys.modules, file=sys.stderr)\n"
    "sys.exit(status)\n"
  )
  env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
  return subprocess.Popen(
    [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )


def _finish(proc: subprocess.Popen):
  """(exit status, the error lines, peak RSS growth MiB over the run, whether TensorFlow was imported)."""
  _, err = proc.communicate(timeout=300)
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  _, grow, tf_imported = err.strip().splitlines()[-1].split()
  return proc.returncode, lines, int(grow), tf_imported == "True"


def _edit_params(tmp_path):
  """A params directory with the meta alone: edit reads the image before it loads any weight."""
  folder = tmp_path / "params"
  folder.mkdir()
  meta = {"kind": "mage", "model": dataclasses.asdict(MAGEConfig()), "tokenizer": dataclasses.asdict(VQGANConfig())}
  (folder / "mage_jax.json").write_text(json.dumps(meta))
  return str(folder)


_WIDE_SCRIPT = """
import resource, sys, time
from mage_jax.generation import editing
editing.load_image(sys.argv[2], 8)  # imports TensorFlow and warms its kernels up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = editing.load_image(sys.argv[1], 256)
print(out.shape, out.dtype, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024,
      time.perf_counter() - start, file=sys.stderr)
"""


def test_hostile_images_through_the_cli_with_bounded_memory(tmp_path):
  """`python -m mage_jax.edit` on a 9000x9000 PNG (81 Mpx in 80 KB of zlib) above the default budget and on the
  500000x1 PNG of the report under a budget of 0.1 Mpx: one line, exit 1, no TensorFlow import, and the run's
  peak RSS grows by less than 20 MiB (decoding the first would take 81 MB gray + 243 MB RGB). And the 500000x1
  PNG accepted (0.5 Mpx is within the default budget): edit's `load_image` computes the 256x256 crop from the
  source window it reads, where resizing first would make 292 x 146,000,000 floats. The processes run at once."""
  (tmp_path / "bomb.png").write_bytes(_png(9000, 9000, 8, 0, rows=bytes(9000)))
  Image.fromarray((np.arange(500000) % 256).astype(np.uint8)[None]).save(tmp_path / "wide.png")
  Image.fromarray(RGB).save(tmp_path / "small.png")
  params = _edit_params(tmp_path)
  common = [f"--params={params}", "--box=0,0,8,8", f"--out={tmp_path / 'out'}"]
  accepted = subprocess.Popen(
    [sys.executable, "-c", _WIDE_SCRIPT, str(tmp_path / "wide.png"), str(tmp_path / "small.png")],
    env=dict(os.environ, PYTHONPATH=REPO),
    stderr=subprocess.PIPE,
    text=True,
  )
  runs = {
    "bomb": _cli("mage_jax.edit", common + [f"--image={tmp_path / 'bomb.png'}"]),
    "wide": _cli("mage_jax.edit", common + [f"--image={tmp_path / 'wide.png'}"], {images.MAX_PIXELS_ENV: "100000"}),
  }
  for key, want in (
    ("bomb", "bomb.png: 9000x9000 = 81.0 Mpx is above the pixel budget of 67.1 Mpx"),
    ("wide", "wide.png: 500000x1 = 0.5 Mpx is above the pixel budget of 0.1 Mpx"),
  ):
    status, lines, grow_mib, tf_imported = result = _finish(runs[key])
    assert status == 1 and len(lines) == 1 and re.search(want, lines[0]), (key, result)
    assert not tf_imported and grow_mib < 20, (key, result)
  assert not (tmp_path / "out").exists()
  _, err = accepted.communicate(timeout=300)
  assert accepted.returncode == 0, err[-2000:]
  shape, rest = err.strip().splitlines()[-1].split(")")
  dtype, grow_mib, seconds = rest.split()
  assert shape == "(256, 256, 3" and dtype == "float32"
  assert int(grow_mib) < 50 and float(seconds) < 5, err


# ---------------------------------------------------------------------------------------------------------
# One resize/centre-crop.


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (31, 47), (1000, 17)])
def test_crop_first_equals_resize_then_crop(shape):
  """The eval transform computes only the crop; it matches tf.image.resize of the whole image then the crop
  (the previous implementation) to float32 rounding of the sample positions."""
  image = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
  for method in ("bicubic", "bilinear", "lanczos3"):
    for size, ratio in ((64, augment.EVAL_CROP_RATIO), (32, 1.0)):
      short = augment.eval_resize_size(size, ratio)
      h, w = shape
      nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
      full = tf.clip_by_value(
        tf.image.resize(tf.cast(image, tf.float32) / 255, [nh, nw], method=method, antialias=True), 0, 1
      ).numpy()
      top, left = round((nh - size) / 2), round((nw - size) / 2)
      got = augment.resize_center_crop(image, size, crop_ratio=ratio, interpolation=method).numpy()
      np.testing.assert_allclose(got, full[top : top + size, left : left + size], atol=1e-4)
  with pytest.raises(ValueError, match="eval interpolation 'area'"):
    augment.resize_center_crop(image, 32, interpolation="area")
  with pytest.raises(ValueError, match="Unknown interpolation 'area'"):
    pipeline.InputConfig(name="x", batch_size=1, image_size=8, eval_interpolation="area")


def test_edit_pixels_equal_evaluation_pixels(tmp_path):
  """editing.load_image of a file == what pipeline.eval_iterator yields for that file (default eval transform)."""
  folder = tmp_path / "one"
  folder.mkdir()
  rgba = np.dstack([RNG.integers(0, 256, (45, 61, 3), dtype=np.uint8), RNG.integers(0, 256, (45, 61), dtype=np.uint8)])
  path = _save(folder / "x.png", Image.fromarray(rgba))
  batch = next(pipeline.eval_iterator(dict(name=f"folder:{folder}", batch_size=1, image_size=32)))
  got = editing.load_image(path, 32)
  assert got.dtype == np.float32 and got.shape == (32, 32, 3)
  np.testing.assert_array_equal(got, batch["image"][0])


def test_fid_reference_protocol_matches_torchvision_resize_256(tmp_path):
  """Spec §6.5: Resize(256) (bilinear) + CenterCrop(256), what prepare_imgnet_val.py saves, within PIL's
  integer rounding; here through a folder split (the CLI uses it for imagenet2012:validation)."""
  folder = tmp_path / "val"
  folder.mkdir()
  rng = np.random.default_rng(3)
  for i, (h, w) in enumerate(((300, 400), (257, 190))):
    smooth = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((w, h), Image.BICUBIC).save(folder / f"{i}.png")
  got = np.concatenate(list(fid_inputs.reference_protocol_batches(f"folder:{folder}", "val", None, batch_size=2)))
  assert got.shape == (2, 256, 256, 3) and got.dtype == np.uint8
  for i in range(2):
    im = Image.open(folder / f"{i}.png")
    w, h = im.size
    nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    top, left = round((nh - 256) / 2), round((nw - 256) / 2)
    crop = (slice(top, top + 256), slice(left, left + 256))
    # torchvision's own PNG: PIL rounds in two uint8 passes, so +-1 levels on a fifth of the pixels.
    diff = np.abs(got[i].astype(int) - np.asarray(im.resize((nw, nh), Image.BILINEAR))[crop])
    assert diff.max() <= 1 and diff.mean() < 0.25, (diff.max(), diff.mean())
    # The same filter in float ('F' mode, no intermediate rounding): ours is it, rounded once.
    pixels = np.asarray(im)
    exact = np.stack(
      [
        np.asarray(Image.fromarray(pixels[..., c].astype(np.float32), "F").resize((nw, nh), Image.BILINEAR))[crop]
        for c in range(3)
      ],
      -1,
    )
    assert np.abs(got[i] - exact).max() <= 0.5 + 1e-3


# ---------------------------------------------------------------------------------------------------------
# Folders: listing, the training source, load_arrays, fid.


def _tree(root, files):
  for rel in files:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RGB).save(root / rel)


def test_symlink_cycles_terminate_and_list_each_image_once(tmp_path):
  one = tmp_path / "one"
  _tree(one, ["a/x.png", "a/y.png"])
  os.symlink("..", one / "a" / "up")  # a/up -> one: one cycle
  listing = image_listing.list_images(str(one))
  assert listing.paths == [str(one / "a" / "x.png"), str(one / "a" / "y.png")]
  assert listing.repeats == 1
  two = tmp_path / "two"
  _tree(two, ["a/x.png", "b/y.png", "b/c/z.png"])
  os.symlink("../b", two / "a" / "to_b")
  os.symlink("../../a", two / "b" / "c" / "to_a")
  os.symlink(".", two / "b" / "self")
  outside = tmp_path / "outside"
  _tree(outside, ["o.png"])
  os.symlink(str(two), outside / "back")  # outside -> two: a cycle through a folder outside the root
  os.symlink(str(outside), two / "a" / "ext")
  os.symlink(str(outside / "o.png"), two / "b" / "o_again.png")  # the same real file twice
  start = time.perf_counter()
  listing = image_listing.list_images(str(two))
  assert time.perf_counter() - start < 2
  assert listing.paths == [
    str(two / "a" / "ext" / "o.png"),
    str(two / "a" / "x.png"),
    str(two / "b" / "c" / "z.png"),
    str(two / "b" / "y.png"),
  ]
  # As class folders: each class keeps the images that really are in it.
  src = sources.FolderSource(str(two))
  assert src.class_names == ["a", "b"] and src.class_counts == {"a": 2, "b": 2}
  np.testing.assert_array_equal(src.labels, [0, 0, 1, 1])
  assert [os.path.basename(p) for p in src.paths] == ["o.png", "x.png", "z.png", "y.png"]


def test_listing_counts_what_it_leaves_out(tmp_path):
  _tree(tmp_path, ["c1/a.png", "c1/B.JPG", "c2/d.png"])
  (tmp_path / "c1" / "notes.txt").write_text("x")
  (tmp_path / "c1" / ".hidden.png").write_bytes(b"")
  (tmp_path / "c2" / "data.npy").write_bytes(b"")
  os.symlink(str(tmp_path / "gone.png"), tmp_path / "c2" / "broken.png")
  os.mkfifo(tmp_path / "c2" / "fifo.png")  # reading it would block forever
  os.link(tmp_path / "c1" / "a.png", tmp_path / "c2" / "hard.png")  # one real file
  (tmp_path / "README").write_text("loose file next to the class folders")
  src = sources.FolderSource(str(tmp_path))
  assert src.class_counts == {"c1": 2, "c2": 1}
  assert src.listing.ignored == 4 and src.listing.repeats == 1
  assert sorted(map(os.path.basename, src.listing.unreadable)) == ["broken.png", "fifo.png"]
  assert "3 images; 4 non-image or hidden files ignored" in src.listing.summary()


def test_folder_edge_cases_give_errors_or_counts(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"No image files .* found under .*empty.*1 non-image"):
    sources.FolderSource(str(empty))
  with pytest.raises(FileNotFoundError, match="no images .* found under .*empty"):
    fid_inputs.image_batches(str(empty))
  single = tmp_path / "single"
  _tree(single, ["only.png"])
  src = sources.FolderSource(str(single))
  assert src.num_examples == 1 and src.class_names == [] and src.class_counts == {"": 1}
  assert next(fid_inputs.image_batches(str(single))[1]).shape == (1, 5, 7, 3)
  # One image per class: usable for eval; a training batch larger than the data is one clear error.
  per_class = tmp_path / "per_class"
  _tree(per_class, ["k0/a.png", "k1/b.png", "k2/c.png"])
  cfg = dict(name=f"folder:{per_class}", batch_size=2, image_size=8)
  batches = list(pipeline.eval_iterator(cfg))
  np.testing.assert_array_equal(np.concatenate([b["label"][b["_mask"]] for b in batches]), [0, 1, 2])
  with pytest.raises(ValueError, match=r"batch_size 4 is larger than the dataset \(3 examples\)"):
    next(pipeline.train_iterator(dict(cfg, batch_size=4), seed=0))


def test_training_source_skips_and_counts_hostile_files(tmp_path):
  """Mixed sizes and modes are decoded; corrupt, truncated and over-budget files are skipped and counted."""
  root = tmp_path / "mixed"
  root.mkdir()
  Image.fromarray(GRAY).save(root / "a_gray.png")
  Image.fromarray(np.dstack([RGB, ALPHA])).resize((9, 4)).save(root / "b_rgba.png")
  Image.fromarray(RNG.integers(0, 65536, (6, 6), dtype=np.uint16)).save(root / "c_g16.png")
  p = Image.fromarray((GRAY % 4).astype(np.uint8), "P")
  p.putpalette(bytes(range(12)) * 64)
  p.save(root / "d_palette.png", transparency=0)
  (root / "e_junk.png").write_bytes(b"junk")
  (root / "f_trunc.png").write_bytes(_truncated_png())
  (root / "g_bomb.png").write_bytes(_png(9000, 9000, 8, 0))
  it = pipeline.eval_iterator(dict(name=f"folder:{root}", batch_size=7, image_size=8))
  batch = next(it)
  assert batch["image"].shape == (7, 8, 8, 3)
  assert it.stats["corrupt_files"] == ("e_junk.png", "f_trunc.png", "g_bomb.png")
  assert it.stats["corrupt_skipped"] == 3 + 2 + 1  # indices 4, 5, 6 each replaced by the next decodable (0)
  images_, labels = sources.load_arrays(f"folder:{root}", "train", image_size=8)
  assert images_.shape == (4, 8, 8, 3) and images_.dtype == np.uint8
  with pytest.raises(
    ValueError,
    match=r"differ in size .*: 5x7 \(a_gray.png and 1 more\); 4x9 \(b_rgba.png\); "
    r"6x6 \(c_g16.png\)\. Pass image_size",
  ):
    sources.load_arrays(f"folder:{root}", "train")


def test_fid_folders_refuse_hostile_sets_with_one_named_error(tmp_path, capsys):
  def folder(name, files):
    path = tmp_path / name
    path.mkdir()
    for fn, data in files.items():
      (path / fn).write_bytes(data)
    return str(path)

  def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()

  ok = png(RGB)
  mixed = folder("mixed", {"a.png": ok, "b.png": ok, "c.png": png(RGB[:4]), "d.png": png(np.dstack([RGB, ALPHA]))})
  with pytest.raises(
    images.ImageError,
    match=r"mixed: images differ in size \(height x width\): 5x7 "
    r"\(.*a.png and 2 more\); 4x7 \(.*c.png\)\. FID compares",
  ):
    fid_inputs.image_batches(mixed)
  corrupt = folder("corrupt", {"a.png": png(np.zeros((32, 32, 3), np.uint8)), "b.png": _truncated_png()})
  with pytest.raises(images.ImageError, match="b.png: cannot decode image"):
    list(fid_inputs.image_batches(corrupt)[1])
  broken = folder("broken", {"a.png": ok})
  os.symlink("nowhere.png", os.path.join(broken, "b.png"))
  with pytest.raises(images.ImageError, match="b.png: not a readable image file"):
    fid_inputs.image_batches(broken)
  # Mixed modes of one size are fine: gray, RGBA, 16-bit and palette all come out RGB.
  p = Image.fromarray((GRAY % 4).astype(np.uint8), "P")
  p.putpalette(bytes(range(12)) * 64)
  buf = io.BytesIO()
  p.save(buf, "PNG")
  modes = folder(
    "modes",
    {
      "a.png": png(GRAY),
      "b.png": png(np.dstack([RGB, ALPHA])),
      "c.png": png(RNG.integers(0, 65536, (5, 7), dtype=np.uint16)),
      "d.png": buf.getvalue(),
    },
  )
  assert next(fid_inputs.image_batches(modes)[1]).shape == (4, 5, 7, 3)
  # Through the CLI: one line, exit 1 (the weights are only loaded after the samples pass; give it some anyway).
  shapes = fid_weights.expected_shapes(False)
  zeros = fid_weights.params_from_canonical({k: np.zeros(s, np.float32) for k, s in shapes.items()})
  w = fid_weights.InceptionWeights(zeros, "zeros", "test")
  fid_weights.save_npz(w, tmp_path / "w.npz")
  stats = tmp_path / "stats.npz"
  np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
  for samples, want in ((mixed, "images differ in size"), (corrupt, "b.png: cannot decode image")):
    assert_one_line_error(
      run_cli("mage_jax.fid", samples, f"--reference={stats}", f"--weights={tmp_path / 'w.npz'}"), 1, want
    )


def test_links_to_a_folder_above_the_dataset_are_skipped_and_counted(tmp_path):
  """Through a link to its parent (or to /), the walk would list the dataset again under another class and
  everything beside it: such links are not followed, and the summary says how many."""
  data = tmp_path / "data"
  _tree(data, ["c1/x.png", "c2/y.png"])
  _tree(tmp_path, ["beside.png"])
  os.symlink("../..", data / "c2" / "up")  # -> tmp_path, the dataset's parent
  os.symlink("/", data / "c1" / "root")
  listing = image_listing.list_images(str(data))
  assert listing.paths == [str(data / "c1" / "x.png"), str(data / "c2" / "y.png")]
  assert listing.above == 2 and "2 links to a folder above the dataset skipped" in listing.summary()
  src = sources.FolderSource(str(data))
  assert src.class_counts == {"c1": 1, "c2": 1}
