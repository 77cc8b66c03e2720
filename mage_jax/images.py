"""Image output helpers: float -> uint8 as the reference does, PNG files, grids for people.

`to_uint8` follows `gen_img_uncond.py` of LTH14/mage (spec §5.3): `clip(x * 255, 0, 255)` then a cast, i.e.
TRUNCATION, not rounding (0.999 -> 254). FID on PNGs written this way is what the paper reports; rounding
shifts every pixel by half a level on average and changes FID measurably.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


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
    grid[top:top + h, left:left + w] = images[i]
  return grid


def image_path(out_dir: str, index: int, num_images: int, shard_size: int) -> str:
  """OUT/images[/<shard>]/<index>.png, zero-padded (at least 5 digits, as the reference's 00000.png)."""
  width = max(5, len(str(num_images - 1)))
  name = f"{index:0{width}d}.png"
  if shard_size <= 0:
    return os.path.join(out_dir, "images", name)
  shards = math.ceil(num_images / shard_size)
  return os.path.join(out_dir, "images", f"{index // shard_size:0{max(3, len(str(shards - 1)))}d}", name)
