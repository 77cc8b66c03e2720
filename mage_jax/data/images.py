"""Images in and out of mage_jax: one checked reader and the PNG writers (the folder lister is `image_listing`).

Reading. Every image file that enters mage_jax (the folder and TFDS sources of the data pipeline, `load_arrays`,
`python -m mage_jax.edit`, `python -m mage_jax.fid`) is decoded by `read_image` into uint8 [H, W, 3] RGB:

  * Pixel budget: the size in the file's header is checked BEFORE the pixels are decoded; an image of more than
    `max_pixels` pixels (default `DEFAULT_MAX_PIXELS` = 2**26, about 67 Mpx, e.g. 8192 x 8192: 192 MiB as RGB)
    is refused with `PixelBudgetError`. Raise the budget with `max_pixels=` or, for the binaries, the
    environment variable `MAGE_JAX_MAX_IMAGE_PIXELS`. PIL's own decompression-bomb check (a warning above
    89 Mpx, an error above 179 Mpx) is raised along with a larger budget so that the budget is the one limit.
  * Modes and bit depths (PIL modes): RGB as stored; `L` repeated to three channels; `1` as 0 / 255;
    16-bit samples (`I;16*` from 16-bit PNG/TIFF, and `I`, which Pillow uses for 16-bit PGM/PPM and for which
    values outside [0, 65535] are refused) keep their high byte (`v >> 8`), as Pillow does itself for 16-bit
    RGB PNGs; `F` (float TIFF) must hold values in [0, 1] and is rounded to `round(255 v)` (PIL's own 0..255
    float convention and any other range are refused rather than guessed); `P` through its palette;
    `CMYK`, `YCbCr`, `LAB`, `HSV` by PIL's conversion (no ICC profile is applied, as in torchvision's loader).
    A naive PIL `convert("RGB")` of a 16-bit image clips every value above 255, i.e. saturates it.
  * Transparency (`RGBA`, `LA`, `PA`, palette or gray/RGB `tRNS` transparency) is composited on WHITE, exactly
    `round((c * a + 255 * (255 - a)) / 255)`: a transparent pixel shows what a viewer on a white page shows,
    not the colour that happens to be stored under alpha 0 (PIL's `convert("RGB")` drops alpha and exposes it).
  * Not applied, as in torchvision's `pil_loader` that the reference training used: EXIF orientation, ICC
    profiles; animations give their first frame.
  * Errors name the file: `ImageError` (a ValueError) for anything undecodable or out of rule; a missing file is
    FileNotFoundError.

Writing. `to_uint8` follows `gen_img_uncond.py` of LTH14/mage: `clip(x * 255, 0, 255)` then a cast,
i.e. TRUNCATION, not rounding (0.999 -> 254). FID on PNGs written this way is what the paper reports; rounding
shifts every pixel by half a level on average and changes FID measurably. Resized real images are quantised by
`round_to_uint8` instead, as PIL does when it writes a resized image.
"""

from __future__ import annotations

import collections
import io
import math
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 2**26
MAX_PIXELS_ENV = "MAGE_JAX_MAX_IMAGE_PIXELS"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_GRAY_MODES = ("1", "L", "I", "F") + _SIXTEEN_BIT_MODES
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageError(ValueError):
  """An image that cannot be read by the rules of `read_image`; the message starts with the file's name."""


class PixelBudgetError(ImageError):
  """An image larger than the pixel budget (refused from its header, before decoding)."""


# ----------------------------------------------------------------------------------------------------
# Reading.


def default_max_pixels() -> int:
  """The pixel budget: `$MAGE_JAX_MAX_IMAGE_PIXELS` when set, else `DEFAULT_MAX_PIXELS`."""
  text = os.environ.get(MAX_PIXELS_ENV)
  if text is None:
    return DEFAULT_MAX_PIXELS
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise ValueError(f"{MAX_PIXELS_ENV}={text!r}: expected a positive number of pixels")
  return value


def _budget(max_pixels: int | None) -> int:
  budget = default_max_pixels() if max_pixels is None else int(max_pixels)
  if budget < 1:
    raise ValueError(f"max_pixels must be positive, got {max_pixels}")
  # PIL refuses images above 2 * MAX_IMAGE_PIXELS inside Image.open, before we see the size: a budget raised
  # past PIL's limit raises PIL's with it (process-wide, only ever upwards).
  if Image.MAX_IMAGE_PIXELS is not None and budget > Image.MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = budget
  return budget


def _budget_message(name: str, width: int, height: int, budget: int) -> str:
  return (
    f"{name}: {width}x{height} = {width * height / 1e6:.1f} Mpx is above the pixel budget of "
    f"{budget / 1e6:.1f} Mpx (raise it with {MAX_PIXELS_ENV}=N or max_pixels=N)"
  )


def _open(source: str | os.PathLike | bytes, name: str, budget: int) -> Image.Image:
  """Opens `source` lazily (header only) and checks its size against the budget."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    fp = io.BytesIO(source)
  else:
    if not os.path.exists(source):
      raise FileNotFoundError(f"image not found: {name}")
    if not os.path.isfile(source):
      raise ImageError(f"{name}: not a regular file")
    fp = source
  try:
    im = Image.open(fp)
  except Image.DecompressionBombError as e:  # only when PIL's limit is below ours: still ours to report
    raise PixelBudgetError(
      f"{name}: {e} (pixel budget {budget / 1e6:.1f} Mpx; raise it with {MAX_PIXELS_ENV}=N or max_pixels=N)"
    ) from e
  except Image.UnidentifiedImageError as e:
    raise ImageError(f"{name}: not an image file (no image format recognised)") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError(f"{name}: cannot read image ({type(e).__name__}: {e})") from e
  width, height = im.size
  if width * height > budget:
    im.close()
    raise PixelBudgetError(_budget_message(name, width, height, budget))
  return im


def _name(source: str | os.PathLike | bytes, name: str | None) -> str:
  if name is not None:
    return name
  return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)


def read_size(
  source: str | os.PathLike | bytes, *, name: str | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
  """(height, width) from the header alone; the same checks as `read_image` short of decoding."""
  name = _name(source, name)
  with _open(source, name, _budget(max_pixels)) as im:
    return im.size[1], im.size[0]


def as_rgb(image: np.ndarray) -> np.ndarray:
  """One uint8 image [H, W] or [H, W, 1|3] -> [H, W, 3]: gray repeated to three channels."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels, got dtype {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    return np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an image [H, W] or [H, W, 1|3], got shape {image.shape}")
  return image


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """round((c * a + 255 * (255 - a)) / 255) in uint16: the numerator is 65025 - a * (255 - c) <= 65025."""
  a = alpha.astype(np.uint16)[..., None]
  num = np.uint16(65025) - a * (np.uint16(255) - rgb.astype(np.uint16))
  return ((num + np.uint16(127)) // np.uint16(255)).astype(np.uint8)


def _gray_to_8bit(im: Image.Image, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Single-channel modes -> (uint8 [H, W], raw values [H, W] for tRNS matching)."""
  raw = np.asarray(im)
  mode = im.mode
  if mode == "1":
    return raw.astype(np.uint8) * np.uint8(255), raw
  if mode == "L":
    return raw, raw
  if mode in _SIXTEEN_BIT_MODES:
    return (raw.astype(np.uint16) >> 8).astype(np.uint8), raw
  if mode == "I":
    lo, hi = int(raw.min()), int(raw.max())
    if lo < 0 or hi > 65535:
      raise ImageError(
        f"{name}: 32-bit integer image with values in [{lo}, {hi}]; only 16-bit values "
        "[0, 65535] have a defined mapping to 8 bits"
      )
    return (raw.astype(np.uint32) >> 8).astype(np.uint8), raw
  # mode "F"
  finite = np.isfinite(raw)
  lo, hi = (float(raw[finite].min()), float(raw[finite].max())) if finite.any() else (math.nan, math.nan)
  if not finite.all() or lo < 0.0 or hi > 1.0:
    raise ImageError(
      f"{name}: float image with values in [{lo:g}, {hi:g}]"
      f"{'' if finite.all() else ' and NaN/inf'}; expected values in [0, 1]"
    )
  return np.rint(raw.astype(np.float64) * 255.0).astype(np.uint8), raw


def _decode_rgb(im: Image.Image, name: str) -> np.ndarray:
  """A loaded PIL image -> uint8 [H, W, 3] by the rules of the module docstring."""
  transparency = im.info.get("transparency")
  if im.mode in _GRAY_MODES:
    gray, raw = _gray_to_8bit(im, name)
    rgb = as_rgb(gray)
    if isinstance(transparency, int) and im.mode != "F":  # gray tRNS: one raw value is transparent
      rgb = _composite_on_white(rgb, np.where(raw == transparency, 0, 255).astype(np.uint8))
    return rgb
  if im.mode in _ALPHA_MODES or transparency is not None:
    try:
      rgba = np.asarray(im.convert("RGBA"))
    except ValueError as e:
      raise ImageError(f"{name}: unsupported image mode {im.mode} ({e})") from e
    return _composite_on_white(rgba[..., :3], rgba[..., 3])
  if im.mode == "RGB":
    return np.asarray(im)
  try:
    return np.asarray(im.convert("RGB"))
  except ValueError as e:
    raise ImageError(f"{name}: unsupported image mode {im.mode} ({e})") from e


def read_image(
  source: str | os.PathLike | bytes, *, name: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
  """Reads one image file (or its encoded bytes) as RGB by the rules of the module docstring.

  Args:
    source: a path, or the encoded bytes of an image file.
    name: what error messages call the image (default: the path; pass one with bytes).
    max_pixels: the pixel budget; default `default_max_pixels()`.

  Returns:
    uint8 [H, W, 3].

  Raises:
    FileNotFoundError: no such file.
    PixelBudgetError: more than `max_pixels` pixels (checked on the header, before decoding).
    ImageError: anything else that is not a decodable image by these rules (corrupt, truncated, unsupported
      mode, out-of-range 32-bit or float values).
  """
  name = _name(source, name)
  with _open(source, name, _budget(max_pixels)) as im:
    try:
      im.load()
    except Exception as e:  # pylint: disable=broad-except
      raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    rgb = _decode_rgb(im, name)
  return np.ascontiguousarray(rgb)


def require_one_size(sizes: Iterable[tuple[str, tuple[int, ...]]], what: str, hint: str) -> tuple[int, ...]:
  """The one size of named images, or ImageError naming a file of each size.

  Args:
    sizes: (name, size) pairs, e.g. (path, (height, width)).
    what: the collection, for the message (a folder).
    hint: what to do about it, appended to the message.

  Returns:
    The common size.
  """
  first: dict[tuple[int, ...], str] = {}
  count: collections.Counter = collections.Counter()
  for name, size in sizes:
    size = tuple(size)
    first.setdefault(size, name)
    count[size] += 1
  if len(first) > 1:
    parts = [
      f"{'x'.join(map(str, s))} ({first[s]}" + (f" and {count[s] - 1} more)" if count[s] > 1 else ")")
      for s in sorted(first, key=lambda s: (-count[s], s))
    ]
    shown = "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more sizes" if len(parts) > 4 else "")
    raise ImageError(f"{what}: images differ in size (height x width): {shown}. {hint}")
  if not first:
    raise ImageError(f"{what}: no images")
  return next(iter(first))


# ----------------------------------------------------------------------------------------------------
# Writing.


def to_uint8(x):
  """Float images in [0, 1] -> uint8 by `clip(x * 255, 0, 255)` and truncation.

  Args:
    x: float array of any shape (numpy or jax; bf16 is upcast to float32 first so that values near a level
      boundary truncate as they do in float32).

  Returns:
    uint8 array of the same shape, numpy for numpy input, jax for jax input (traceable).
  """
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x)
  if not xp.issubdtype(x.dtype, xp.floating):
    raise ValueError(f"to_uint8: expected a float array in [0, 1], got dtype {x.dtype}")
  x = x.astype(xp.float32)
  return xp.clip(x * 255.0, 0.0, 255.0).astype(xp.uint8)


def round_to_uint8(x: np.ndarray) -> np.ndarray:
  """Float images in [0, 1] -> uint8 by `round(clip(x, 0, 1) * 255)`: how PIL quantises a resized image."""
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"round_to_uint8: expected a float array in [0, 1], got dtype {x.dtype}")
  return np.rint(np.clip(x.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_hwc(image: np.ndarray, name: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{name}: expected uint8 pixels, got dtype {image.dtype} (convert with to_uint8)")
  if image.ndim == 2:
    return image
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{name}: expected an image [H, W] or [H, W, C] with C in (1, 3, 4), got shape {image.shape}")
  return image[..., 0] if image.shape[-1] == 1 else image


def save_png(path: str, image: np.ndarray) -> None:
  """Writes one uint8 image [H, W, C] (C in 1, 3, 4) or [H, W] as a lossless PNG; creates parent dirs."""
  image = _check_hwc(image, "save_png")
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(image).save(path, format="PNG")


def make_grid(images: np.ndarray, cols: int = 8, pad: int = 0, pad_value: int = 0) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] row-major into one uint8 image.

  Args:
    images: uint8 [N, H, W, C], N >= 1.
    cols: images per row (fewer if N < cols).
    pad: pixels between cells and around the border.
    pad_value: value of the padding and of empty cells in the last row.

  Returns:
    uint8 [rows*H + (rows+1)*pad, cols*W + (cols+1)*pad, C] with rows = ceil(N / cols).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"make_grid: expected uint8 [N>0, H, W, C], got {images.dtype} {images.shape}")
  if cols < 1 or pad < 0:
    raise ValueError(f"make_grid: need cols >= 1 and pad >= 0, got cols={cols}, pad={pad}")
  n, h, w, c = images.shape
  cols = min(cols, n)
  rows = math.ceil(n / cols)
  grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), pad_value, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top : top + h, left : left + w] = images[i]
  return grid


def image_path(out_dir: str, index: int, num_images: int, shard_size: int) -> str:
  """OUT/images[/<shard>]/<index>.png, zero-padded (at least 5 digits, as the reference's 00000.png)."""
  width = max(5, len(str(num_images - 1)))
  name = f"{index:0{width}d}.png"
  if shard_size <= 0:
    return os.path.join(out_dir, "images", name)
  shards = math.ceil(num_images / shard_size)
  return os.path.join(out_dir, "images", f"{index // shard_size:0{max(3, len(str(shards - 1)))}d}", name)
