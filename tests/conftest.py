"""Test setup: 8 fake CPU devices, set before JAX initialises, and one XLA compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests (and the binaries they start as subprocesses) compile the same tiny programs; a persistent cache
# shared by the whole session, subprocesses included, compiles each once. It starts empty, so a test still
# compiles what it is the first to need, and it is removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mage_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

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
  return subprocess.run(
    [sys.executable, "-m", module, *map(str, args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, **env},
  )


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
        base[:, :14] = 200
      else:
        base[:14] = 200
      noise = rng.integers(0, 40, size=base.shape, dtype=np.uint8)
      Image.fromarray(base + noise).save(root / label / f"{i:03d}.png")
  return root


@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory):
  """A TFDS data dir with fashion_mnist prepared offline from Debian's IDX files (~15-30 s, once per session)."""
  from mage_jax.data import tfds_prepare

  if not all(
    os.path.exists(os.path.join(tfds_prepare.DEBIAN_FASHION_MNIST_DIR, f + ".gz"))
    for f in tfds_prepare.FASHION_MNIST_FILES.values()
  ):
    pytest.skip(
      f"Debian fashion-mnist files missing in {tfds_prepare.DEBIAN_FASHION_MNIST_DIR} "
      "(apt-get install -y dataset-fashion-mnist)"
    )
  data_dir = str(tmp_path_factory.mktemp("tfds_fashion"))
  tfds_prepare.prepare_fashion_mnist(data_dir)
  return data_dir


def write_fashion_pngs(root, data_dir, num_images: int, split: str = "test"):
  """The first `num_images` Fashion-MNIST images of `split` as gray PNGs in class subfolders `root/<label>/`."""
  from PIL import Image

  from mage_jax.data import sources

  images, labels = sources.load_arrays("fashion_mnist", split, data_dir)
  for i in range(num_images):
    folder = pathlib.Path(root) / f"{labels[i]:d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[i][..., 0]).save(folder / f"{i:05d}.png")
  return pathlib.Path(root)


@pytest.fixture(scope="session")
def fashion_png_folder(tmp_path_factory, fashion_data_dir):
  """400 Fashion-MNIST test images as PNGs in one subfolder per class (a user's own image folder)."""
  return write_fashion_pngs(tmp_path_factory.mktemp("fashion_png"), fashion_data_dir, 400)


def tiny_train_config(image_folder, steps=12, **overrides):
  """The Fashion-MNIST tiny MAGE config on the image folder at 16 px (4x4 tokens)."""
  from configs import fashion_mnist_tiny

  config = fashion_mnist_tiny.get_config(f"steps={steps},batch=8,monitor=False")
  config.input.name = f"folder:{image_folder}"
  config.input.image_size = 16
  config.log_every_steps = 1
  config.checkpoint_every_steps = 4
  config.async_checkpoints = False
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
    fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 and "embedding" not in name else 1.0 / 0.02**2
    return noise / np.sqrt(fan_in)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def fake_state_dict(shapes, value=lambda key: 0.5):
  """Zero-stride arrays of `value(key)`: full ViT-L shapes without allocating gigabytes."""
  import numpy as np

  return {k: np.broadcast_to(np.float32(value(k)), s) for k, s in shapes.items()}


def official_shapes_from_target(target, prefix=""):
  """The official key -> shape table of a param tree, by inverting the naming rules independently of
  mage_jax.convert (whose table it checks)."""
  from flax import traverse_util

  shapes = {}
  for path, leaf in traverse_util.flatten_dict(target["params"]).items():
    parts = []
    for p in path[:-1]:
      head, _, idx = p.rpartition("_")
      # Spec §1.4: `mid.block_1` / `mid.block_2` are attributes, the other indexed names ModuleList entries.
      is_index = idx.isdigit() and head in ("blocks", "decoder_blocks", "down", "up", "block") and parts[-1:] != ["mid"]
      parts.extend([head, idx] if is_index else [p])
    leaf_name = path[-1]
    shape = tuple(leaf.shape)
    if leaf_name == "kernel":
      shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf_name, leaf_name)
    key = ".".join(parts + [torch_leaf])
    shapes[prefix + key] = shape
  return shapes


# A tiny model (32 px images, 8x8 tokens, one block per stack) that compiles in seconds.
TINY_MAGE = dict(
  embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, num_tokens=64
)
TINY_VQGAN = dict(ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=8, resolution=32, num_groups=8)


def tiny_params_dir(directory, kind="mage", seed=0):
  """A params directory of a tiny random model, saved as the training exports save theirs.

  kind: 'mage', 'mage_c' (plus a projection head), 'class_cond' (ClassCondConfig with 5 classes), 'vit'
  (linear-probe ViT with BatchNorm statistics) or 'tokenizer'.
  """
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mage_jax.models.class_cond import ClassCondMAGE, class_cond_config
  from mage_jax.models.mage import MAGE, MAGEConfig
  from mage_jax.models.vit import MAGEViT
  from mage_jax.models.vqgan import VQGAN, VQGANConfig
  from mage_jax.objectives import contrastive, masking
  from mage_jax.train import params_io

  tok_config = VQGANConfig(**TINY_VQGAN)
  variables = {"tokenizer": random_variables(VQGAN(tok_config), seed, jnp.zeros((1, 32, 32, 3)))}
  meta = {"kind": "tokenizer", "tokenizer": dataclasses.asdict(tok_config)}
  config = MAGEConfig(**TINY_MAGE)
  ids = jnp.zeros((1, config.num_tokens), jnp.int32)
  if kind in ("mage", "mage_c", "class_cond"):
    plan, _ = masking.sample_plan(jax.random.key(0), 1, config.num_tokens)
    if kind == "class_cond":
      config = class_cond_config(config, num_classes=5)
      model_vars = random_variables(ClassCondMAGE(config), seed + 1, ids, plan, jnp.zeros((1,), jnp.int32))
    else:
      model_vars = random_variables(MAGE(config), seed + 1, ids, plan)
    variables["model"] = model_vars
    meta.update(kind="mage", model=dataclasses.asdict(config))
    if kind == "mage_c":
      head = contrastive.ProjectionHead(hidden_dim=24, out_dim=8, num_layers=2, norm="layer")
      variables["projection_head"] = random_variables(head, seed + 2, jnp.zeros((1, config.embed_dim)))
      meta["mage_c"] = {"hidden_dim": 24, "out_dim": 8, "num_layers": 2, "norm": "layer"}
  elif kind == "vit":
    vit = MAGEViT(config, num_classes=5, global_pool=True, head_type="bn_linear")
    variables["model"] = random_variables(vit, seed + 1, ids)
    meta.update(
      kind="vit",
      model=dataclasses.asdict(config),
      vit={"num_classes": 5, "global_pool": True, "head_type": "bn_linear"},
    )
  # float32 like a training export (random_variables' kernels come out float64).
  params_io.save(str(directory), jax.tree.map(lambda x: np.asarray(x, np.float32), variables), meta)
  return str(directory)
