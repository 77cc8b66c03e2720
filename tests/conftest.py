"""Test setup: 8 fake CPU devices, set before JAX initialises."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

TESTDATA = pathlib.Path(__file__).parent / "testdata"
REPO = pathlib.Path(__file__).parent.parent


def assert_one_line_error(run: subprocess.CompletedProcess, status: int, *needles: str) -> str:
  """The binary failed with `status`, no traceback, and one `error:` line (the last) holding every needle."""
  assert run.returncode == status, (run.returncode, run.stderr[-3000:])
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and run.stderr.strip().splitlines()[-1] == errors[0], run.stderr[-3000:]
  assert all(n in errors[0] for n in needles), errors[0]
  return errors[0]


def run_cli(module: str, *args, timeout: float = 600, **env) -> subprocess.CompletedProcess:
  """Runs `python -m <module> args...` from the repository root as a user would (text output captured)."""
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **env})


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
  config.fewshot_monitor.train_split = ""  # off unless a test turns it on
  return apply_overrides(config, **overrides)


def apply_overrides(config, **overrides):
  """Sets dotted keys (`optim.blr=...`) on a ConfigDict, as `--config.optim.blr=...` would."""
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return config


def random_variables(module, seed, *args, spread=0.1):
  """Random variables with the module's tree, from shapes only (jitting the real VQGAN/MAGE init costs tens of
  seconds on this CPU). LayerNorm scales/biases are perturbed by `spread` so a wrong param mapping shows."""
  import flax.linen as nn
  import jax
  import numpy as np
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1])
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if "scale" in name:
      return 1.0 + spread * noise
    if "bias" in name:
      return spread * noise
    fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 and "embedding" not in name else 1.0 / 0.02 ** 2
    return noise / np.sqrt(fan_in)

  return jax.tree_util.tree_map_with_path(fill, abstract)
