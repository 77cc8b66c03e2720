"""mage_jax.api.MAGE agrees with the library and binary paths it wraps; the README's example runs as written.

One tiny random model (conftest.tiny_params_dir) serves every call; the settings match the README example's
(16 images, 12 steps, batch 32; edit with the defaults), so the example reuses the compilations.
"""

import json
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_params_dir
from mage_jax import api
from mage_jax.convert import convert, torch_pickle
from mage_jax.data import images as image_io, sources
from mage_jax.evals import probe
from mage_jax.generation import editing
from mage_jax.models.vqgan import VQGAN
from mage_jax.train import params_io, sharding

README = pathlib.Path(__file__).parent.parent / "README.md"
README_PARAMS = "runs/quickstart/mage/params"


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory):
  return tiny_params_dir(tmp_path_factory.mktemp("api") / "params", "mage")


@pytest.fixture(scope="module")
def model(params_dir):
  return api.MAGE.load(params_dir, batch_size=16)


# The README example's settings; the binaries run them in the background while the other tests run.
GENERATE_FLAGS = ("--num_images=16", "--batch_size=32", "--num_steps=12", "--temperature=4.5", "--seed=0")
EDIT_FLAGS = ("--box=8,8,24,24", "--num_samples=4", "--seed=0")


@pytest.fixture(scope="module", autouse=True)
def binaries(params_dir, tmp_path_factory):
  """`python -m mage_jax.generate` and `python -m mage_jax.edit` on the tiny model, started at module set-up:
  {'generate': (process, out dir), 'edit': (process, out dir, the input image as the binary reads it)}."""
  root = tmp_path_factory.mktemp("binaries")
  image = _images(1, seed=2)[0]
  Image.fromarray(image).save(root / "in.png")
  start = lambda *args: subprocess.Popen(
    [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  procs = {
    "generate": (
      start(
        "mage_jax.generate",
        f"--params={params_dir}",
        f"--out={root / 'gen'}",
        *GENERATE_FLAGS,
        "--nopng",
        "--npz",
        "--grid=0",
      ),
      root / "gen",
    ),
    "edit": (
      start(
        "mage_jax.edit", f"--params={params_dir}", f"--image={root / 'in.png'}", f"--out={root / 'edit'}", *EDIT_FLAGS
      ),
      root / "edit",
      editing.load_image(root / "in.png", 32),
    ),
  }
  yield procs
  for proc, *_ in procs.values():
    proc.kill()
    proc.communicate()


def _finished(proc):
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_encode_decode_agree_with_the_vqgan(model, params_dir):
  images = _images(20)  # two batches of 16 over 8 devices, the second padded
  ids = model.encode(images)
  variables, meta = params_io.load(params_dir)
  tokenizer = VQGAN(params_io.tokenizer_config_from_meta(meta))
  ref_ids = np.asarray(
    jax.jit(lambda v, x: tokenizer.apply(v, x, method="encode_to_ids"))(
      variables["tokenizer"], images.astype(np.float32) / 255.0
    )
  )
  assert ids.shape == (20, 64) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(model.encode(images.astype(np.float32) / 255.0), ids)
  assert len(np.unique(ids)) > 10  # a collapsed tokenizer would make the comparison vacuous
  pixels = model.decode(ids)
  ref_pixels = np.asarray(
    image_io.to_uint8(jax.jit(lambda v, i: tokenizer.apply(v, i, method="decode_ids"))(variables["tokenizer"], ref_ids))
  )
  assert pixels.shape == (20, 32, 32, 3) and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, ref_pixels)
  np.testing.assert_array_equal(model.decode(ids.reshape(20, 8, 8)), pixels)


def test_features_agree_with_the_probe_extraction(model, params_dir):
  images = _images(20, seed=1)
  feats = model.features(images)
  mesh = sharding.create_mesh()
  backbone = probe.load_backbone(params_dir)
  shardings = probe.backbone_shardings(backbone, mesh, sharding.DEFAULT_RULES)
  ref, _ = probe.extract_features(
    backbone.feature_fn(),
    sharding.place(backbone.variables, shardings),
    shardings,
    dict(name="arrays", split="train", batch_size=8, image_size=32, augment="none", crop_ratio=1.0),
    mesh=mesh,
    source=sources.ArraySource(images, np.zeros(20, np.int32)),
  )
  assert feats.shape == (20, 32) and feats.dtype == np.float32
  np.testing.assert_allclose(feats, ref, rtol=0, atol=1e-5)


def test_features_of_the_official_probe_model(testdata, tmp_path):
  """A converted official ViT: the API's features are the official code's (reference.npz)."""
  cfg = json.loads((testdata / "official_tiny" / "config.json").read_text())
  sd = torch_pickle.flatten_state_dict(torch_pickle.load(str(testdata / "official_tiny" / "vit_probe.pth")))
  result = convert.convert_state_dict(sd, num_heads=cfg["mage"]["num_heads"], resolution=cfg["tokenizer"]["resolution"])
  params_io.save(str(tmp_path / "vit"), result.variables, result.meta)
  ref = np.load(testdata / "official_tiny" / "reference.npz")
  feats = api.MAGE.load(str(tmp_path / "vit")).features(ref["images_nchw"].transpose(0, 2, 3, 1))
  rel = np.linalg.norm(feats - ref["probe_features"]) / np.linalg.norm(ref["probe_features"])
  assert rel < 1e-4, rel


def test_generate_matches_the_binary(model, binaries):
  images = model.generate(16, steps=12, temperature=4.5, seed=0, batch_size=32)
  proc, out = binaries["generate"]
  _finished(proc)
  with np.load(out / "images.npz") as f:
    np.testing.assert_array_equal(images, f["images"])
  assert images.shape == (16, 32, 32, 3) and len(np.unique(images.reshape(16, -1), axis=0)) == 16


def test_edit_matches_the_binary(model, binaries):
  proc, out, image = binaries["edit"]
  samples = model.edit(image, box=(8, 8, 24, 24), num_samples=4, seed=0)
  _finished(proc)
  for i, sample in enumerate(samples):
    np.testing.assert_array_equal(sample, np.asarray(Image.open(out / f"sample_{i}.png")))
  mask = np.zeros((32, 32), bool)
  mask[8:24, 8:24] = True
  np.testing.assert_array_equal(model.edit(image, mask=mask, num_samples=4, seed=0), samples)


def test_bad_inputs_are_one_clear_value_error(model, tmp_path):
  cases = [
    (lambda: model.encode(_images(2)[..., :1]), r"images: expected \[N, 32, 32, 3\].*shape \(2, 32, 32, 1\)"),
    (lambda: model.encode(np.full((1, 32, 32, 3), 1.5)), r"values in \[1.5, 1.5\]"),
    (lambda: model.encode(np.full((1, 32, 32, 3), np.nan)), r"values in \[nan, nan\]"),
    (lambda: model.features(_images(1).astype(np.int16)), "dtype int16"),
    (lambda: model.decode(np.full((1, 64), 1024)), r"values must lie in \[0, 1024\)"),
    (lambda: model.decode(np.zeros((1, 63), np.int32)), r"ids: expected integers \[N, 64\]"),
    (lambda: model.generate(0), "n must be an integer >= 1"),
    (lambda: model.generate(2, temperature=float("inf")), "temperature"),
    (lambda: model.generate(2, class_id=3), "class-unconditional"),
    (lambda: model.edit(_images(1)[0], box=(0, 0, 8, 8), mask=np.ones((32, 32), bool)), "exactly one"),
    (lambda: model.edit(_images(1)), r"one image \[32, 32, 3\]"),
    (lambda: model.edit(_images(1)[0], box=(8, 8, 40, 40)), "box"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
  tok = api.MAGE.load(tiny_params_dir(tmp_path / "tok", "tokenizer"))
  with pytest.raises(ValueError, match="features need a MAGE encoder"):
    tok.features(_images(1))
  with pytest.raises(ValueError, match="need a MAGE pretraining checkpoint"):
    tok.generate(1)
  with pytest.raises(FileNotFoundError):
    api.MAGE.load(str(tmp_path / "missing"))


def test_arguments_and_weights_are_checked_as_the_binaries_do(model, params_dir, tmp_path):
  cases = [
    (lambda: model.generate(2, seed=2**70), r"seed must be an integer in \[0, 9223372036854775807\], got 1180"),
    (lambda: model.generate(2, seed=-1), r"seed must be an integer in \[0, "),
    (lambda: model.generate(2, batch_size=2.5), "batch_size must be an integer >= 1, got 2.5"),
    (lambda: model.edit(_images(1)[0], box=(8, 8, 24, 24), seed=2**64), "seed must be an integer in"),
    (lambda: api.MAGE.load(params_dir, batch_size=2.5), "batch_size must be an integer >= 1, got 2.5"),
    (lambda: api.MAGE.load(params_dir, devices=[]), r"devices must be a non-empty sequence of jax.Device"),
    (lambda: api.MAGE.load(params_dir, devices="cpu"), r"devices must be a non-empty sequence"),
    (lambda: api.MAGE.load(params_dir, devices=[0]), r"devices must be a non-empty sequence"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
  assert api.MAGE.load(params_dir, devices=jax.local_devices()[:1]).mesh.size == 1
  variables, meta = params_io.load(params_dir)
  head = variables["model"]["params"]["mlm_layer"]
  head["bias"] = np.full_like(head["bias"], np.nan)
  params_io.save(str(tmp_path / "nan"), variables, meta)
  with pytest.raises(ValueError, match=r"params in .*nan are unusable: model/params/mlm_layer/bias has \d+ NaN/Inf"):
    api.MAGE.load(str(tmp_path / "nan"))


def test_import_is_lazy_and_top_level_reexport():
  code = (
    "import sys, mage_jax; assert 'jax' not in sys.modules, 'import mage_jax started JAX'; "
    "from mage_jax.api import MAGE; assert mage_jax.MAGE is MAGE"
  )
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _readme_section():
  text = README.read_text()
  return text[text.index("## Exporting to PyTorch") : text.index("## Reproducing the paper's numbers")]


def test_readme_example_runs(params_dir, capsys):
  code = re.search(r"```python\n(.*?)```", _readme_section(), re.S).group(1)
  assert README_PARAMS in code and len(code.strip().splitlines()) <= 10
  exec(compile(code.replace(README_PARAMS, params_dir), "README.md", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.split("\n")[0] == "(16, 32, 32, 3) (16, 64) (16, 32, 32, 3) (16, 32) (4, 32, 32, 3)"


def test_readme_export_commands_parse():
  """Every export command of the section parses as written: its flags, and the two arguments."""
  commands = re.search(r"```bash\n(.*?)```", _readme_section(), re.S).group(1)
  argvs = [shlex.split(line.split("#")[0]) for line in commands.strip().splitlines()]
  assert len(argvs) == 3 and all(argv[:3] == [".venv/bin/python", "-m", "mage_jax.export"] for argv in argvs)
  # One process parses them all with the binary's flags (argv[0] = the module, as under `python -m`).
  code = (
    "import json, sys; from absl import flags; import mage_jax.export\n"
    "for argv in json.loads(sys.argv[1]):\n"
    "  flags.FLAGS.unparse_flags()\n"
    "  assert len(flags.FLAGS(argv)) == 3, argv"
  )
  run = subprocess.run(
    [sys.executable, "-c", code, json.dumps([argv[2:] for argv in argvs])], capture_output=True, text=True
  )
  assert run.returncode == 0, run.stderr
