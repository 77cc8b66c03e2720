"""Test setup: 8 fake CPU devices, set before JAX initialises."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

TESTDATA = pathlib.Path(__file__).parent / "testdata"


@pytest.fixture(scope="session")
def testdata():
  return TESTDATA


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
  """A tiny image-folder dataset (two classes of 28x28 RGB PNGs) for fast end-to-end training tests."""
  import numpy as np
  from PIL import Image
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for label in ("a", "b"):
    (root / label).mkdir()
    for i in range(48):
      base = np.zeros((28, 28, 3), np.uint8)
      if label == "a":
        base[:, : 14] = 200
      else:
        base[: 14] = 200
      noise = rng.integers(0, 40, size=base.shape, dtype=np.uint8)
      Image.fromarray(base + noise).save(root / label / f"{i:03d}.png")
  return root


def tiny_train_config(image_folder, steps=12, **overrides):
  """The Fashion-MNIST tiny MAGE config on the image folder at 16 px (4x4 tokens)."""
  from configs import fashion_mnist_tiny
  config = fashion_mnist_tiny.get_config(f"steps={steps},batch=8")
  config.input.name = f"folder:{image_folder}"
  config.input.image_size = 16
  config.log_every_steps = 1
  config.checkpoint_every_steps = 4
  config.async_checkpoints = False
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return config
