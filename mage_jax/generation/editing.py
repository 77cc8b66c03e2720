"""Image editing with MAGE (inpainting, outpainting, uncropping): mask logic on pixels and tokens.

Recipe (from the maintainer in LTH14/mage issues #3 and #49):

  1. Build a boolean pixel mask of the region to regenerate (`pixel_box_to_mask`, `outpaint_mask`, or
     any bool[H, W] array).
  2. Zero those pixels (`zero_pixels`) BEFORE tokenising, so the tokens outside the hole carry no
     information about its content.
  3. Tokenise, then mask every token whose cell overlaps the pixel mask plus one extra ring of tokens
     (`token_mask_from_pixel_mask`): tokens next to the hole still "see" the zeroed pixels through the
     tokenizer's receptive field. Example: pixel hole 64..191 of 256x256 -> token hole 4..11 ->
     masked tokens 3..12.
  4. Run the iterative decoding with only those tokens unknown (`edit_tokens`); the schedule's N0 is
     each row's number of masked tokens, as in MaskGIT's `unknown_number_in_the_beginning`.

Boxes are `(top, left, bottom, right)` in pixels with exclusive bottom/right, like Python slices:
issue #3's hole "64..191" is `(64, 64, 192, 192)`. Box helpers run on the host and return numpy
arrays; the mask functions are jnp (traceable, accept numpy or jax inputs).

`edit_image` is the whole edit of one image in one jitted call, and `load_image` reads a file as evaluation sees
it: `images.read_image` (16-bit, palette, transparent (composited on white) and other modes handled; an image
above the pixel budget is refused before decoding), then the evaluation transform of the data pipeline, the same
function on the same pixels: shorter side to floor(R * 292 / 256), bicubic, then the centre R x R crop (the
official eval transform of `main_linprobe.py` / `main_finetune.py`: Resize(292) + CenterCrop(256) for R = 256),
kept in float32 as evaluation feeds it to the tokenizer. Samples are the full VQGAN decodes; pixels outside the
edit are the tokenizer's reconstruction, not pasted back from the input (the reference shows no compositing step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mage_jax.data import images as image_io
from mage_jax.generation import sampling


def _check_box(h: int, w: int, box: Sequence[int], name: str) -> tuple[int, int, int, int]:
  if len(box) != 4:
    raise ValueError(f"{name}: box must be (top, left, bottom, right), got {box!r}")
  top, left, bottom, right = (int(v) for v in box)
  if not (0 <= top < bottom <= h and 0 <= left < right <= w):
    raise ValueError(
      f"{name}: box (top, left, bottom, right)={box!r} must satisfy 0 <= top < bottom <= {h} and "
      f"0 <= left < right <= {w} (bottom/right are exclusive)"
    )
  return top, left, bottom, right


def pixel_box_to_mask(h: int, w: int, box: Sequence[int]) -> np.ndarray:
  """bool[h, w], True inside `box` = (top, left, bottom, right) (bottom/right exclusive)."""
  top, left, bottom, right = _check_box(h, w, box, "pixel_box_to_mask")
  mask = np.zeros((h, w), dtype=bool)
  mask[top:bottom, left:right] = True
  return mask


def outpaint_mask(h: int, w: int, keep_box: Sequence[int]) -> np.ndarray:
  """bool[h, w], True everywhere except inside `keep_box` (outpainting / uncropping: regenerate outside)."""
  _check_box(h, w, keep_box, "outpaint_mask")
  return ~pixel_box_to_mask(h, w, keep_box)


def _dilate(mask: jax.Array, ring: int) -> jax.Array:
  """Square (Chebyshev) dilation by `ring` cells over the last two axes; separable, so rows then columns."""
  for axis in (-2, -1):
    size = mask.shape[axis]
    pad = [(0, 0)] * mask.ndim
    pad[axis] = (ring, ring)
    padded = jnp.pad(mask, pad)
    out = jnp.zeros_like(mask)
    for k in range(2 * ring + 1):
      out = out | jax.lax.slice_in_dim(padded, k, k + size, axis=axis % mask.ndim)
    mask = out
  return mask


def token_mask_from_pixel_mask(
  pixel_mask: jax.Array | np.ndarray,
  token_grid: tuple[int, int] = (16, 16),
  ring: int = 1,
) -> jax.Array:
  """Token cells to regenerate for a pixel mask.

  A token is masked if its cell (H/gh x W/gw pixels) overlaps the pixel mask in at least one pixel;
  the result is then grown by `ring` tokens in every direction, diagonals included.

  Args:
    pixel_mask: bool[..., H, W] (any leading batch dims); H, W divisible by the grid.
    token_grid: (gh, gw), MAGE: (16, 16) for 256x256 images.
    ring: extra rings of tokens (MAGE: 1); 0 gives the plain overlap mask.

  Returns:
    bool[..., gh, gw].

  Raises:
    ValueError: bad rank, indivisible size, or negative ring.
  """
  pixel_mask = jnp.asarray(pixel_mask).astype(bool)
  if pixel_mask.ndim < 2:
    raise ValueError(f"token_mask_from_pixel_mask: pixel_mask must be bool[..., H, W], got shape {pixel_mask.shape}")
  gh, gw = token_grid
  h, w = pixel_mask.shape[-2:]
  if gh < 1 or gw < 1 or h % gh or w % gw:
    raise ValueError(f"token_mask_from_pixel_mask: image {h}x{w} is not divisible by the token grid {gh}x{gw}")
  if ring < 0:
    raise ValueError(f"token_mask_from_pixel_mask: ring must be >= 0, got {ring}")
  lead = pixel_mask.shape[:-2]
  cells = pixel_mask.reshape(*lead, gh, h // gh, gw, w // gw).any(axis=(-3, -1))
  return _dilate(cells, ring) if ring else cells


def zero_pixels(images: jax.Array | np.ndarray, pixel_mask: jax.Array | np.ndarray) -> jax.Array:
  """Sets the pixels to edit to 0 (before tokenisation, so no information leaks into the kept tokens).

  Args:
    images: [..., H, W, C] any dtype (MAGE tokenizer input: float in [0, 1]).
    pixel_mask: bool[H, W] or bool[..., H, W] broadcastable to images.shape[:-1].

  Returns:
    Same shape and dtype as `images`, zero where the mask is True.
  """
  images = jnp.asarray(images)
  pixel_mask = jnp.asarray(pixel_mask).astype(bool)
  if images.ndim < 3:
    raise ValueError(f"zero_pixels: images must be [..., H, W, C], got shape {images.shape}")
  try:
    mask = jnp.broadcast_to(pixel_mask, images.shape[:-1])
  except ValueError:
    raise ValueError(
      f"zero_pixels: pixel_mask shape {pixel_mask.shape} does not broadcast to the image's "
      f"[..., H, W] = {images.shape[:-1]}"
    ) from None
  return jnp.where(mask[..., None], jnp.zeros((), images.dtype), images)


def edit_tokens(
  rng: jax.Array,
  ids: jax.Array,
  token_mask: jax.Array | np.ndarray,
  logits_fn: sampling.LogitsFn,
  *,
  num_steps: int,
  choice_temperature: float,
  mask_id: int,
  codebook_size: int,
  schedule: str = "cosine",
  sample_temperature: float = 1.0,
) -> jax.Array:
  """Regenerates the masked tokens of `ids` with iterative decoding; the others are kept exactly.

  Args:
    rng: PRNG key (`jax.random.key`).
    ids: int[B, N] or int[B, gh, gw] token ids of the (zeroed) images, all in [0, codebook_size).
    token_mask: bool, True = regenerate; shape [N], [gh, gw] (shared by the batch), or [B, N],
      [B, gh, gw] (one per row; rows may mask different numbers of tokens).
    logits_fn: int32[B, N] -> float[B, N, V >= codebook_size], see `sampling.decode`.
    num_steps: T.
    choice_temperature: tau0 of the annealed Gumbel noise.
    mask_id: unknown-token id (MAGE: 2024).
    codebook_size: number of real ids (MAGE: 1024).
    schedule: mask schedule name.
    sample_temperature: logit temperature (MAGE: 1.0).

  Returns:
    int32 ids, same shape as `ids`. A row with nothing masked is returned unchanged.
  """
  ids = jnp.asarray(ids)
  if ids.ndim not in (2, 3):
    raise ValueError(f"edit_tokens: ids must be int[B, N] or int[B, gh, gw], got shape {ids.shape}")
  batch = ids.shape[0]
  length = int(np.prod(ids.shape[1:]))
  token_mask = jnp.asarray(token_mask).astype(bool)
  if token_mask.size == length:
    mask = jnp.broadcast_to(token_mask.reshape(1, length), (batch, length))
  elif token_mask.size == batch * length and token_mask.shape[0] == batch:
    mask = token_mask.reshape(batch, length)
  else:
    raise ValueError(
      f"edit_tokens: token_mask shape {token_mask.shape} matches neither one grid of {length} tokens "
      f"nor one per row for ids of shape {ids.shape}"
    )
  tokens = jnp.where(mask, jnp.int32(mask_id), ids.reshape(batch, length).astype(jnp.int32))
  out = sampling.decode(
    rng,
    tokens,
    logits_fn,
    num_steps=num_steps,
    choice_temperature=choice_temperature,
    mask_id=mask_id,
    codebook_size=codebook_size,
    num_unknown=None,
    schedule=schedule,
    sample_temperature=sample_temperature,
    count_mode="row",
  )
  return out.reshape(ids.shape)


# ---------------------------------------------------------------------------------------------------------
# One image.


MODES = ("inpaint", "outpaint")


def load_image(path: str, resolution: int) -> np.ndarray:
  """Reads an image file as evaluation sees it: float32 [resolution, resolution, 3] in [0, 1].

  `images.read_image`, then the eval transform of the data pipeline with its defaults
  (`augment.preprocess(mode="none")`: crop_ratio 256/292, bicubic), i.e. what `pipeline.eval_iterator` yields
  for the same file. TensorFlow is imported here, when an image is loaded (one image, eagerly: about 10 ms).
  """
  image = image_io.read_image(path)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from mage_jax.data import augment  # pylint: disable=import-outside-toplevel

  return augment.preprocess(tf.constant(image), None, size=resolution, mode="none").numpy()


def parse_box(text: str) -> tuple[int, int, int, int]:
  """'top,left,bottom,right' -> ints (bottom/right exclusive)."""
  parts = text.split(",")
  try:
    box = tuple(int(p) for p in parts)
  except ValueError:
    box = ()
  if len(box) != 4:
    raise ValueError(f"--box must be four integers top,left,bottom,right, got {text!r}")
  return box


def pixel_mask_for(mode: str, resolution: int, box) -> np.ndarray:
  """bool[R, R], True where pixels are regenerated: inside `box` (inpaint) or outside it (outpaint)."""
  if mode == "inpaint":
    return pixel_box_to_mask(resolution, resolution, box)
  if mode == "outpaint":
    return outpaint_mask(resolution, resolution, box)
  raise ValueError(f"unknown edit mode {mode!r}; expected one of {MODES}")


@dataclasses.dataclass
class EditResult:
  """Outputs of `edit_image` (host numpy)."""

  input_ids: np.ndarray  # int32 [N]: tokens of the zeroed input, the known tokens of every sample
  token_mask: np.ndarray  # bool [g, g]: tokens that were regenerated (overlap + ring)
  sample_ids: np.ndarray  # int32 [S, N]
  masked_image: np.ndarray  # uint8 [H, W, 3]: input with the edited pixels zeroed
  samples: np.ndarray  # uint8 [S, H, W, 3]


@functools.lru_cache(maxsize=8)
def _edit_fn(model, tokenizer, num_samples: int, num_steps: int, ring: int, mesh: Mesh | None):
  c = model.config
  grid = tokenizer.config.token_grid

  def run(model_vars, tok_vars, rng, image, pixel_mask, temperature):
    zeroed = zero_pixels(image[None], pixel_mask)
    ids = tokenizer.apply(tok_vars, zeroed, method="encode_to_ids")  # [1, N]
    token_mask = token_mask_from_pixel_mask(pixel_mask, (grid, grid), ring)  # [g, g]
    logits_fn = lambda t: model.apply(model_vars, t, method="image_token_logits")
    tiled = jnp.tile(ids, (num_samples, 1))
    if mesh is not None:
      tiled = jax.lax.with_sharding_constraint(tiled, NamedSharding(mesh, P("data")))
    sample_ids = edit_tokens(
      rng,
      tiled,
      token_mask,
      logits_fn,
      num_steps=num_steps,
      choice_temperature=temperature,
      mask_id=c.mask_id,
      codebook_size=c.codebook_size,
    )
    samples = image_io.to_uint8(tokenizer.apply(tok_vars, sample_ids, method="decode_ids"))
    return ids[0], token_mask, sample_ids, samples

  return jax.jit(run)


def edit_image(
  model,
  tokenizer,
  variables: dict,
  rng: jax.Array,
  image: np.ndarray,
  pixel_mask: np.ndarray,
  *,
  num_samples: int = 4,
  num_steps: int = sampling.DEFAULT_NUM_STEPS,
  temperature: float = sampling.DEFAULT_TEMPERATURE,
  ring: int = 1,
  mesh: Mesh | None = None,
) -> EditResult:
  """Regenerates the masked region of one image `num_samples` times (one jitted call).

  Args:
    model: `MAGE`; tokenizer: a `models.tokenizer.Tokenizer` (`VQGAN`); variables: {'model': ..., 'tokenizer': ...}.
    rng: PRNG key.
    image: uint8 [R, R, 3] or float [R, R, 3] in [0, 1], R = the tokenizer's resolution.
    pixel_mask: bool [R, R], True = regenerate.
    num_samples: samples drawn (the batch of the decoding).
    num_steps, temperature: decoding steps T and choice temperature tau0.
    ring: extra rings of masked tokens around the overlap (MAGE: 1).
    mesh: a 1-D ('data',) mesh to split the samples over (`sharding.data_mesh(num_samples)`); None: the default
      device.

  Returns:
    EditResult; `sample_ids[:, ~token_mask.ravel()]` equals `input_ids[~token_mask.ravel()]` exactly.
  """
  res = tokenizer.config.resolution
  image = np.asarray(image)
  if image.shape != (res, res, 3):
    raise ValueError(
      f"edit_image: image must be [{res}, {res}, 3] (the tokenizer's resolution), got {image.shape}; use load_image"
    )
  pixel_mask = np.asarray(pixel_mask, dtype=bool)
  if pixel_mask.shape != (res, res):
    raise ValueError(f"edit_image: pixel_mask must be bool[{res}, {res}], got {pixel_mask.shape}")
  if not pixel_mask.any():
    raise ValueError("edit_image: pixel_mask selects no pixel; nothing to edit")
  if num_samples < 1 or num_steps < 1 or ring < 0:
    raise ValueError(
      f"edit_image: need num_samples >= 1, num_steps >= 1, ring >= 0; got {num_samples}, {num_steps}, {ring}"
    )
  if mesh is not None and num_samples % mesh.size:
    raise ValueError(f"edit_image: num_samples={num_samples} must be a multiple of the mesh size {mesh.size}")
  if image.dtype == np.uint8:
    masked_u8 = np.where(pixel_mask[..., None], np.uint8(0), image)
    image = image.astype(np.float32) / 255.0
  else:
    image = image.astype(np.float32)
    masked_u8 = image_io.to_uint8(np.where(pixel_mask[..., None], 0.0, image))
  fn = _edit_fn(model, tokenizer, num_samples, num_steps, ring, mesh)
  ids, token_mask, sample_ids, samples = jax.device_get(
    fn(variables["model"], variables["tokenizer"], rng, image, pixel_mask, np.float32(temperature))
  )
  return EditResult(np.asarray(ids), np.asarray(token_mask), np.asarray(sample_ids), masked_u8, np.asarray(samples))
