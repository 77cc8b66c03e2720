"""RandAugment (timm 'rand-m9-mstd0.5-inc1') against Pillow, op by op, and the sampling of ops."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from mage_jax.data import augment, pipeline, randaugment

FILL = randaugment.IMAGENET_FILL


def _images():
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (29, 37, 3), dtype=np.uint8)
  # low contrast, distinct per-channel ranges: autocontrast and equalize have work to do
  narrow = (rng.integers(0, 40, (29, 37, 3)) + np.array([30, 90, 150])).astype(np.uint8)
  # smooth gradients: bicubic interpolation between neighbours is exercised, not only noise
  yy, xx = np.mgrid[0:29, 0:37]
  smooth = np.stack([xx * 6, yy * 8, (xx + yy) * 3], -1).clip(0, 255).astype(np.uint8)
  constant = np.full((29, 37, 3), 77, np.uint8)
  return {"noise": noise, "narrow": narrow, "smooth": smooth, "constant": constant}


def _ours(fn, image, *args):
  return fn(tf.constant(image, tf.int32), *args).numpy()


def _pil(fn, image, *args):
  return np.asarray(fn(Image.fromarray(image), *args))


PIXEL_OPS = (
  [
    ("auto_contrast", randaugment.auto_contrast, ImageOps.autocontrast, []),
    ("equalize", randaugment.equalize, ImageOps.equalize, []),
    ("invert", randaugment.invert, ImageOps.invert, []),
  ]
  + [
    (f"posterize{b}", lambda x, b=b: randaugment.posterize(x, b), lambda im, b=b: ImageOps.posterize(im, b), [])
    for b in (1, 2, 4, 8)
  ]
  + [
    (f"solarize{t}", lambda x, t=t: randaugment.solarize(x, t), lambda im, t=t: ImageOps.solarize(im, t), [])
    for t in (0, 26, 128, 256)
  ]
)


@pytest.mark.parametrize("name,ours,theirs,args", PIXEL_OPS, ids=[p[0] for p in PIXEL_OPS])
def test_lookup_ops_match_pillow_exactly(name, ours, theirs, args):
  for label, image in _images().items():
    np.testing.assert_array_equal(_ours(ours, image, *args), _pil(theirs, image, *args), err_msg=label)


def test_solarize_add_matches_timm_definition():
  image = _images()["noise"]
  add = 99
  expected = np.where(image < 128, np.minimum(image.astype(int) + add, 255), image)
  np.testing.assert_array_equal(_ours(randaugment.solarize_add, image, add), expected)


@pytest.mark.parametrize("name", ["color", "contrast", "brightness", "sharpness"])
@pytest.mark.parametrize("factor", [0.1, 0.19, 0.5, 1.0, 1.37, 1.9])
def test_enhance_ops_match_pillow_exactly(name, factor):
  ours = getattr(randaugment, name)
  theirs = getattr(ImageEnhance, name.capitalize())
  for label, image in _images().items():
    np.testing.assert_array_equal(
      _ours(ours, image, factor), _pil(lambda im: theirs(im).enhance(factor), image), err_msg=label
    )


def _pil_affine(matrix):
  return lambda im: im.transform(
    im.size, Image.Transform.AFFINE, tuple(matrix), Image.Resampling.BICUBIC, fillcolor=FILL
  )


GEOMETRIC = [
  (
    "rotate+",
    lambda x: randaugment.rotate(x, 27.3, FILL),
    lambda im: im.rotate(27.3, resample=Image.Resampling.BICUBIC, fillcolor=FILL),
  ),
  (
    "rotate-",
    lambda x: randaugment.rotate(x, -8.0, FILL),
    lambda im: im.rotate(-8.0, resample=Image.Resampling.BICUBIC, fillcolor=FILL),
  ),
  ("shear_x", lambda x: randaugment.shear_x(x, 0.27, FILL), _pil_affine((1, 0.27, 0, 0, 1, 0))),
  ("shear_y", lambda x: randaugment.shear_y(x, -0.19, FILL), _pil_affine((1, 0, 0, -0.19, 1, 0))),
  ("translate_x", lambda x: randaugment.translate_x(x, 13.05, FILL), _pil_affine((1, 0, 13.05, 0, 1, 0))),
  ("translate_y", lambda x: randaugment.translate_y(x, -11.6, FILL), _pil_affine((1, 0, 0, 0, 1, -11.6))),
]


@pytest.mark.parametrize("name,ours,theirs", GEOMETRIC, ids=[g[0] for g in GEOMETRIC])
def test_geometric_ops_match_pillow_bicubic(name, ours, theirs):
  for label, image in _images().items():
    mine, ref = _ours(ours, image), _pil(theirs, image)
    diff = np.abs(mine.astype(int) - ref.astype(int))
    # float64 here vs PIL's own double arithmetic: only values sitting on an integer boundary may differ
    assert diff.max() <= 1, (label, diff.max())
    assert (diff == 0).mean() >= 0.995, (label, (diff == 0).mean())
    # the same pixels fall outside the source and take the fill colour
    np.testing.assert_array_equal(np.all(mine == FILL, -1), np.all(ref == FILL, -1), err_msg=label)


def test_level_functions_follow_timm():
  """Arguments timm derives from magnitude 9 (increasing set): checked through the ops' effect."""
  config = randaugment.parse("rand-m9-mstd0.5-inc1")
  image = _images()["noise"]
  x = tf.constant(image, tf.int32)
  m, no = tf.constant(9.0), tf.constant(False)
  cases = {
    "posterize_increasing": randaugment.posterize(x, 4 - 3),  # 4 - int(0.9 * 4)
    "solarize_increasing": randaugment.solarize(x, 256 - 230),  # 256 - int(0.9 * 256)
    "solarize_add": randaugment.solarize_add(x, 99),  # int(0.9 * 110)
    "brightness_increasing": randaugment.brightness(x, 1.0 + 0.81),  # 1 + 0.9 * 0.9
    "rotate": randaugment.rotate(x, 27.0, FILL),  # 0.9 * 30
    "shear_x": randaugment.shear_x(x, 0.27, FILL),  # 0.9 * 0.3
    "translate_x": randaugment.translate_x(x, 0.405 * 37, FILL),  # 0.9 * 0.45 * width
    "translate_y": randaugment.translate_y(x, 0.405 * 29, FILL),  # 0.9 * 0.45 * height
  }
  for name, expected in cases.items():
    np.testing.assert_array_equal(randaugment.apply_op(name, x, m, no, config).numpy(), expected.numpy(), err_msg=name)
  negated = randaugment.apply_op("brightness_increasing", x, m, tf.constant(True), config).numpy()
  np.testing.assert_array_equal(negated, randaugment.brightness(x, 1.0 - 0.81).numpy())


def test_parse():
  c = randaugment.parse("rand-m9-mstd0.5-inc1")
  assert (c.magnitude, c.magnitude_std, c.num_layers, c.increasing, c.prob) == (9.0, 0.5, 2, True, 0.5)
  assert c.ops == randaugment.INCREASING_OPS and len(c.ops) == 15
  c = randaugment.parse("rand-n3-m5")
  assert (c.num_layers, c.magnitude, c.magnitude_std, c.increasing) == (3, 5.0, 0.0, False)
  assert randaugment.parse("rand").magnitude == 10.0
  for bad in ("rand-m9-w0", "augmix-m5", "rand-mX"):
    with pytest.raises(ValueError, match="RandAugment spec"):
      randaugment.parse(bad)


@tf.function
def _apply(image, seed, num_layers, prob):
  config = randaugment.RandAugmentConfig(num_layers=num_layers, prob=prob)
  return randaugment.rand_augment(image, seed, config)


def test_rand_augment_is_seeded_and_skips_with_probability_one_minus_prob():
  image = tf.constant(_images()["smooth"])
  seeds = [tf.constant([7, i], tf.int64) for i in range(240)]
  outs = [_apply(image, s, 2, 0.5).numpy() for s in seeds]
  np.testing.assert_array_equal(outs[3], _apply(image, seeds[3], 2, 0.5).numpy())
  unchanged = np.mean([np.array_equal(o, image.numpy()) for o in outs])
  # both ops skipped with probability 0.25; every op changes this image at magnitude ~9
  assert abs(unchanged - 0.25) < 0.09, unchanged
  assert len({o.tobytes() for o in outs}) > 100
  never = [_apply(image, s, 2, 0.0).numpy() for s in seeds[:5]]
  for o in never:
    np.testing.assert_array_equal(o, image.numpy())


def test_preprocess_with_rand_augment():
  image = tf.constant(_images()["noise"])
  config = randaugment.parse("rand-m9-mstd0.5-inc1")
  seed = tf.constant([3, 4], tf.int64)
  plain = augment.preprocess(image, seed, size=24, mode="pretrain")
  augmented = augment.preprocess(image, seed, size=24, mode="pretrain", rand_augment=config)
  assert augmented.shape == (24, 24, 3)
  assert not np.array_equal(augmented.numpy(), plain.numpy())  # RandAugment changed the pixels
  values = augmented.numpy() * 255.0
  np.testing.assert_allclose(values, np.round(values), atol=1e-3)  # uint8 grid, as PIL's images
  np.testing.assert_array_equal(
    augmented.numpy(), augment.preprocess(image, seed, size=24, mode="pretrain", rand_augment=config).numpy()
  )
  # the crop and flip draws are those of the run without RandAugment: with every op skipped, the result is
  # the plain transform on the uint8 grid
  skip_all = randaugment.RandAugmentConfig(prob=0.0)
  for i in range(4):
    seed_i = tf.constant([3, i], tf.int64)
    np.testing.assert_allclose(
      augment.preprocess(image, seed_i, size=24, mode="pretrain", rand_augment=skip_all).numpy(),
      np.round(augment.preprocess(image, seed_i, size=24, mode="pretrain").numpy() * 255) / 255,
      atol=1e-6,
    )
  changed = [
    not np.allclose(
      augment.preprocess(image, tf.constant([3, i], tf.int64), size=24, mode="pretrain", rand_augment=config),
      np.round(augment.preprocess(image, tf.constant([3, i], tf.int64), size=24, mode="pretrain") * 255) / 255,
    )
    for i in range(8)
  ]
  assert sum(changed) >= 3, changed  # both ops are skipped a quarter of the time


def test_input_config_validates_rand_augment():
  base = dict(name="fashion_mnist", batch_size=8, image_size=32)
  pipeline.InputConfig(**base, rand_augment="rand-m9-mstd0.5-inc1")
  with pytest.raises(ValueError, match="RandAugment spec"):
    pipeline.InputConfig(**base, rand_augment="rand-q9")
  with pytest.raises(ValueError, match="needs a random augment mode"):
    pipeline.InputConfig(**base, augment="none", rand_augment="rand-m9")
