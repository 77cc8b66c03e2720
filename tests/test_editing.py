"""Tests for mage_jax.generation.editing: pixel/token masks, zeroing, and token-level editing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.generation import editing

CB = 16
MASK = 20
V = 22


def _grid(rows, cols, size=16):
  """bool[size, size] True on the inclusive row/col ranges (hand-built expectation)."""
  m = np.zeros((size, size), bool)
  m[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
  return m


def test_pixel_box_to_mask():
  m = editing.pixel_box_to_mask(6, 8, (1, 2, 4, 7))
  assert m.shape == (6, 8) and m.dtype == bool
  assert m.sum() == 3 * 5
  assert m[1, 2] and m[3, 6] and not m[4, 6] and not m[3, 7] and not m[0, 2] and not m[1, 1]
  for bad in [(0, 0, 0, 4), (2, 0, 1, 4), (0, 0, 7, 4), (-1, 0, 3, 3), (0, 0, 3)]:
    with pytest.raises(ValueError, match="box"):
      editing.pixel_box_to_mask(6, 8, bad)


def test_spec_example_hole_64_191():
  """Spec §5.5: pixel hole 64..191 of 256x256 -> token hole 4..11 -> masked tokens 3..12."""
  pixels = editing.pixel_box_to_mask(256, 256, (64, 64, 192, 192))
  assert pixels.sum() == 128 * 128
  hole = np.asarray(editing.token_mask_from_pixel_mask(pixels, (16, 16), ring=0))
  np.testing.assert_array_equal(hole, _grid((4, 11), (4, 11)))
  masked = np.asarray(editing.token_mask_from_pixel_mask(pixels, (16, 16), ring=1))
  np.testing.assert_array_equal(masked, _grid((3, 12), (3, 12)))
  assert masked.sum() == 100
  np.testing.assert_array_equal(np.asarray(editing.token_mask_from_pixel_mask(pixels)), masked)  # defaults


def test_unaligned_box_corner_and_single_pixel():
  # Rows 65..99 touch cells 4..6, cols 70..129 touch cells 4..8; ring 1 grows each side by one.
  m = editing.token_mask_from_pixel_mask(editing.pixel_box_to_mask(256, 256, (65, 70, 100, 130)))
  np.testing.assert_array_equal(np.asarray(m), _grid((3, 7), (3, 9)))
  # At the border the ring is cut off, not wrapped around.
  m = editing.token_mask_from_pixel_mask(editing.pixel_box_to_mask(256, 256, (0, 0, 16, 16)))
  np.testing.assert_array_equal(np.asarray(m), _grid((0, 1), (0, 1)))
  # An arbitrary mask: a single pixel, batched with an empty mask, ring 2.
  pix = np.zeros((2, 256, 256), bool)
  pix[0, 200, 37] = True  # cell (12, 2)
  m = np.asarray(editing.token_mask_from_pixel_mask(pix, ring=2))
  assert m.shape == (2, 16, 16)
  np.testing.assert_array_equal(m[0], _grid((10, 14), (0, 4)))
  assert not m[1].any()


def test_token_mask_other_grid_and_errors():
  pix = np.zeros((8, 12), bool)
  pix[5, 1] = True  # 2x3 cells of 4x4 pixels: cell (1, 0)
  np.testing.assert_array_equal(
    np.asarray(editing.token_mask_from_pixel_mask(pix, (2, 3), ring=0)), [[0, 0, 0], [1, 0, 0]]
  )
  np.testing.assert_array_equal(
    np.asarray(editing.token_mask_from_pixel_mask(pix, (2, 3), ring=1)), [[1, 1, 0], [1, 1, 0]]
  )
  with pytest.raises(ValueError, match="not divisible"):
    editing.token_mask_from_pixel_mask(np.zeros((10, 12), bool), (3, 3))
  with pytest.raises(ValueError, match="ring"):
    editing.token_mask_from_pixel_mask(pix, (2, 3), ring=-1)
  with pytest.raises(ValueError, match=r"\[\.\.\., H, W\]"):
    editing.token_mask_from_pixel_mask(np.zeros((8,), bool))


def test_outpaint_mask_is_complement():
  keep = (64, 64, 192, 192)
  out = editing.outpaint_mask(256, 256, keep)
  np.testing.assert_array_equal(out, ~editing.pixel_box_to_mask(256, 256, keep))
  assert out.sum() == 256 * 256 - 128 * 128
  # Kept tokens: the 8x8 block 4..11 shrinks by the ring to 5..10.
  m = np.asarray(editing.token_mask_from_pixel_mask(out))
  np.testing.assert_array_equal(~m, _grid((5, 10), (5, 10)))
  with pytest.raises(ValueError, match="box"):
    editing.outpaint_mask(256, 256, (0, 0, 300, 10))


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_zero_pixels(dtype):
  rng = np.random.default_rng(0)
  images = (rng.uniform(size=(2, 32, 32, 3)) * 200 + 1).astype(dtype)  # no pixel is 0 before
  mask = editing.pixel_box_to_mask(32, 32, (4, 8, 20, 30))
  out = np.asarray(editing.zero_pixels(images, mask))
  assert out.dtype == dtype and out.shape == images.shape
  assert np.all(out[:, mask] == 0)
  np.testing.assert_array_equal(out[:, ~mask], images[:, ~mask])
  # Per-image masks.
  masks = np.stack([mask, np.zeros_like(mask)])
  out = np.asarray(editing.zero_pixels(images, masks))
  assert np.all(out[0, mask] == 0)
  np.testing.assert_array_equal(out[1], images[1])
  with pytest.raises(ValueError, match="broadcast"):
    editing.zero_pixels(images, np.zeros((16, 16), bool))


def _shifted_target_fn(ids):
  """Logits peaked on (id + 1) % CB of the ORIGINAL ids, so every regenerated token visibly changes."""
  target = (jnp.asarray(ids).reshape(ids.shape[0], -1) + 1) % CB

  def fn(tokens):
    del tokens
    return 40.0 * jax.nn.one_hot(target, V)

  return fn, np.asarray(target)


def test_edit_changes_exactly_the_masked_tokens():
  ids = np.random.default_rng(0).integers(0, CB, (2, 16, 16)).astype(np.int32)
  pixels = editing.pixel_box_to_mask(256, 256, (64, 64, 192, 192))
  token_mask = np.asarray(editing.token_mask_from_pixel_mask(pixels))  # 3..12 x 3..12
  fn, target = _shifted_target_fn(ids)
  out = np.asarray(
    editing.edit_tokens(
      jax.random.key(0), ids, token_mask, fn, num_steps=8, choice_temperature=4.5, mask_id=MASK, codebook_size=CB
    )
  )
  assert out.shape == ids.shape and out.dtype == np.int32
  changed = out != ids
  np.testing.assert_array_equal(changed, np.broadcast_to(_grid((3, 12), (3, 12)), ids.shape))
  np.testing.assert_array_equal(out[:, token_mask], target.reshape(ids.shape)[:, token_mask])


def test_edit_per_row_masks_flat_ids():
  rng = np.random.default_rng(1)
  ids = rng.integers(0, CB, (3, 64)).astype(np.int32)
  token_mask = np.zeros((3, 64), bool)
  token_mask[0, 5:9] = True
  token_mask[1, rng.permutation(64)[:50]] = True  # different count per row
  # row 2: nothing to edit -> returned unchanged
  fn, target = _shifted_target_fn(ids)
  out = np.asarray(
    editing.edit_tokens(
      jax.random.key(1),
      jnp.asarray(ids),
      token_mask,
      fn,
      num_steps=6,
      choice_temperature=4.5,
      mask_id=MASK,
      codebook_size=CB,
    )
  )
  np.testing.assert_array_equal(out != ids, token_mask)
  np.testing.assert_array_equal(out[token_mask], target[token_mask])
  np.testing.assert_array_equal(out[2], ids[2])
  with pytest.raises(ValueError, match="token_mask"):
    editing.edit_tokens(
      jax.random.key(1),
      ids,
      np.zeros((5,), bool),
      fn,
      num_steps=6,
      choice_temperature=4.5,
      mask_id=MASK,
      codebook_size=CB,
    )


def test_edit_keeps_context_with_a_token_dependent_model():
  """With a model whose logits depend on the tokens, unmasked tokens still never change."""
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(MASK + 1, V)), jnp.float32)

  def fn(tokens):
    onehot = jax.nn.one_hot(tokens, MASK + 1)
    return onehot @ w + (onehot.mean(axis=1) @ w)[:, None, :]

  ids = rng.integers(0, CB, (2, 8, 8)).astype(np.int32)
  pix = np.zeros((64, 64), bool)
  pix[30:34, 10:12] = True
  token_mask = np.asarray(editing.token_mask_from_pixel_mask(pix, (8, 8), ring=1))
  out = np.asarray(
    editing.edit_tokens(
      jax.random.key(3), ids, token_mask, fn, num_steps=5, choice_temperature=4.5, mask_id=MASK, codebook_size=CB
    )
  )
  np.testing.assert_array_equal(out[:, ~token_mask], ids[:, ~token_mask])
  assert np.all((out >= 0) & (out < CB))
