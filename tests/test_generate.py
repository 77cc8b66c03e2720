"""Generation binary, editing CLI, image helpers and checkpoint->module rebuilding, on the tiny official fixture."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_cli
from mage_jax.convert import job as convert_job
from mage_jax.data import images
from mage_jax.generation import editing, sampling
from mage_jax.models.mage import MAGE, MAGEConfig
from mage_jax.train import params_io, sharding

SEED = 0
STEPS = 2
TEMPERATURE = 6.0


@pytest.fixture(scope="session")
def params_dir(testdata, tmp_path_factory):
  out = tmp_path_factory.mktemp("tiny_params") / "ckpt"
  src = testdata / "official_tiny"
  convert_job.convert_file(str(src / "mage.pth"), str(out), config_json=str(src / "config.json"))
  return str(out)


@pytest.fixture(scope="session")
def loaded(params_dir):
  meta = params_io.read_meta(params_dir)
  model, tokenizer = params_io.models_from_meta(meta)
  variables, _ = params_io.load(params_dir)
  return model, tokenizer, variables


def _generate(loaded, mesh, num_images=8, batch_size=8, seed=SEED):
  model, tokenizer, variables = loaded
  out = list(
    sampling.generate_images(
      model,
      tokenizer,
      variables,
      jax.random.key(seed),
      num_images,
      batch_size,
      STEPS,
      TEMPERATURE,
      mesh,
      return_ids=True,
    )
  )
  return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def _reference_batch(loaded, batch_index, batch_size=8, seed=SEED):
  """The documented recipe, unjitted and unsharded: decode from fold_in(key(seed), i), VQGAN, truncate."""
  model, tokenizer, variables = loaded
  c = model.config
  tokens = jnp.full((batch_size, c.num_tokens), c.mask_id, jnp.int32)
  logits_fn = lambda t: model.apply(variables["model"], t, method="image_token_logits")
  ids = sampling.decode(
    jax.random.fold_in(jax.random.key(seed), batch_index),
    tokens,
    logits_fn,
    num_steps=STEPS,
    choice_temperature=TEMPERATURE,
    mask_id=c.mask_id,
    codebook_size=c.codebook_size,
  )
  pixels = np.asarray(tokenizer.apply(variables["tokenizer"], ids, method="decode_ids"), np.float64)
  return np.floor(np.clip(pixels * 255.0, 0, 255)).astype(np.uint8), np.asarray(ids)


# ---------------------------------------------------------------------------------------------------------
# images.py


def test_to_uint8_truncates():
  x = np.array([0.999, 1.5, -0.2, 0.0, 1.0, 0.5, 0.9999], np.float32)
  want = np.array([254, 255, 0, 0, 255, 127, 254], np.uint8)  # 0.5*255 = 127.5 -> 127 (no rounding)
  np.testing.assert_array_equal(images.to_uint8(x), want)
  got = images.to_uint8(jnp.asarray(x))
  assert isinstance(got, jax.Array) and got.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(got), want)
  with pytest.raises(ValueError, match="float"):
    images.to_uint8(np.zeros(3, np.uint8))


def test_make_grid_layout_and_png_roundtrip(tmp_path):
  imgs = np.stack([np.full((2, 3, 3), 10 * (i + 1), np.uint8) for i in range(3)])
  grid = images.make_grid(imgs, cols=2, pad=1, pad_value=255)
  assert grid.shape == (2 * 2 + 3, 2 * 3 + 3, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[1:3, 1:4], imgs[0])
  np.testing.assert_array_equal(grid[1:3, 5:8], imgs[1])
  np.testing.assert_array_equal(grid[4:6, 1:4], imgs[2])
  assert (grid[4:6, 5:8] == 255).all() and (grid[0] == 255).all() and (grid[:, 4] == 255).all()
  path = tmp_path / "a" / "g.png"
  images.save_png(str(path), grid)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
  with pytest.raises(ValueError, match="uint8"):
    images.save_png(str(path), grid.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# checkpoint_models.py


def test_models_from_meta(params_dir):
  meta = params_io.read_meta(params_dir)
  model, tokenizer = params_io.models_from_meta(meta, jnp.bfloat16)
  assert tokenizer.config.ch_mult == (1, 1, 2) and isinstance(tokenizer.config.ch_mult, tuple)
  assert model.config.num_tokens == tokenizer.config.num_tokens == 64 and model.dtype == jnp.bfloat16
  hash((model, tokenizer))  # jit caches key on them
  with pytest.raises(ValueError, match=r"unknown checkpoint meta\['model'\] keys \['bogus'\]"):
    params_io.models_from_meta({**meta, "model": {**meta["model"], "bogus": 1}})
  from mage_jax.models.class_cond import ClassCondMAGE

  cond, _ = params_io.models_from_meta({**meta, "model": {**meta["model"], "num_classes": 1000}})
  assert isinstance(cond, ClassCondMAGE) and cond.config.num_classes == 1000
  with pytest.raises(ValueError, match="64 tokens"):
    params_io.models_from_meta({**meta, "tokenizer": {**meta["tokenizer"], "resolution": 64}})
  with pytest.raises(ValueError, match="kind"):
    params_io.models_from_meta({**meta, "kind": "vit"})
  with pytest.raises(ValueError, match="tokenizer"):
    params_io.models_from_meta({k: v for k, v in meta.items() if k != "tokenizer"})


# ---------------------------------------------------------------------------------------------------------
# generate.py


def test_generate_sharded_matches_single_device_and_reference(loaded):
  assert len(jax.devices()) == 8
  imgs1, ids1 = _generate(loaded, sharding.create_mesh((("data", -1),), jax.devices()[:1]))
  imgs8, ids8 = _generate(loaded, sharding.create_mesh((("data", -1),)))
  assert imgs8.shape == (8, 32, 32, 3) and imgs8.dtype == np.uint8 and ids8.shape == (8, 64)
  np.testing.assert_array_equal(ids1, ids8)
  np.testing.assert_array_equal(imgs1, imgs8)
  # Batch 0 is decode(fold_in(key(seed), 0)) -> VQGAN -> truncation, computed here without jit/sharding.
  ref_imgs, ref_ids = _reference_batch(loaded, 0)
  np.testing.assert_array_equal(ids8, ref_ids)
  assert np.mean(imgs8 != ref_imgs) < 1e-3 and np.max(np.abs(imgs8.astype(int) - ref_imgs)) <= 1
  assert ((ids8 >= 0) & (ids8 < 1024)).all()


def test_generate_deterministic_and_prefix_stable(loaded):
  mesh = sharding.create_mesh((("data", -1),))
  a_imgs, a_ids = _generate(loaded, mesh, num_images=16)
  b_imgs, b_ids = _generate(loaded, mesh, num_images=16)
  np.testing.assert_array_equal(a_imgs, b_imgs)
  np.testing.assert_array_equal(a_ids, b_ids)
  assert not np.array_equal(a_ids[:8], a_ids[8:])  # batches use different keys
  _, ref_ids1 = _reference_batch(loaded, 1)
  np.testing.assert_array_equal(a_ids[8:], ref_ids1)
  c_imgs, c_ids = _generate(loaded, mesh, num_images=5)  # last batch truncated; same first images
  assert c_imgs.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(c_ids, a_ids[:5])
  _, d_ids = _generate(loaded, mesh, num_images=8, seed=1)
  assert not np.array_equal(d_ids, a_ids[:8])


def test_generate_rejects_bad_sizes(loaded):
  model, tokenizer, variables = loaded
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    sampling.generate_images(
      model, tokenizer, variables, jax.random.key(0), 6, 6, 2, 6.0, sharding.create_mesh((("data", -1),))
    )
  with pytest.raises(ValueError, match="unconditional"):
    sampling.generate_images(model, tokenizer, variables, jax.random.key(0), 8, 8, 2, 6.0, class_id=3)


@dataclasses.dataclass(frozen=True)
class _CondConfig(MAGEConfig):
  num_classes: int = 10


class _CondMAGE(MAGE):
  """Stand-in for the future class-conditional model: the label forces every sampled id to equal it."""

  config: _CondConfig = _CondConfig()

  def image_token_logits(self, image_tokens, labels=None):
    logits = super().image_token_logits(image_tokens)
    return logits + 1e4 * jax.nn.one_hot(labels, logits.shape[-1])[:, None, :]


def test_generate_class_hook_passes_labels(loaded):
  model, tokenizer, variables = loaded
  cond = _CondMAGE(_CondConfig(**dataclasses.asdict(model.config)))
  ((imgs, ids),) = sampling.generate_images(
    cond,
    tokenizer,
    variables,
    jax.random.key(0),
    8,
    8,
    2,
    6.0,
    sharding.create_mesh((("data", -1),)),
    class_id=7,
    return_ids=True,
  )
  assert (ids == 7).all() and imgs.shape == (8, 32, 32, 3)
  with pytest.raises(ValueError, match="outside"):
    sampling.generate_images(cond, tokenizer, variables, jax.random.key(0), 8, 8, 2, 6.0, class_id=10)


def test_generate_cli_writes_files(params_dir, loaded, tmp_path):
  out = tmp_path / "gen"
  args = [
    f"--params={params_dir}",
    f"--out={out}",
    "--num_images=10",
    "--batch_size=8",
    f"--num_steps={STEPS}",
    f"--temperature={TEMPERATURE}",
    f"--seed={SEED}",
    "--shard_size=4",
  ]
  run = run_cli("mage_jax.generate", *args)
  assert run.returncode == 0, run.stderr
  assert "images/s" in run.stdout and "done: 10 images" in run.stdout
  files = sorted(
    os.path.relpath(os.path.join(d, f), out / "images") for d, _, fs in os.walk(out / "images") for f in fs
  )
  assert files == [f"{i // 4:03d}/{i:05d}.png" for i in range(10)]
  npz = np.load(out / "images.npz")["images"]
  assert npz.shape == (10, 32, 32, 3) and npz.dtype == np.uint8
  for i in range(10):
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / files[i])), npz[i])
  want, _ = _generate(loaded, sharding.create_mesh((("data", -1),)), num_images=10)
  np.testing.assert_array_equal(npz, want)
  grid = np.asarray(Image.open(out / "grid.png"))
  assert grid.shape == (2 * 32 + 3 * 2, 8 * 32 + 9 * 2, 3)
  np.testing.assert_array_equal(grid[2:34, 2:34], npz[0])
  np.testing.assert_array_equal(grid[36:68, 2:34], npz[8])
  summary = json.loads((out / "generation.json").read_text())
  assert summary["num_images"] == 10 and summary["images_per_s"] > 0
  written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
  record = json.loads((out / "mage_jax_outputs.json").read_text())["files"]
  assert sorted(record + ["mage_jax_outputs.json"]) == written  # what --force may remove: exactly what it wrote
  # A second run into the same directory would leave stale PNGs for FID to count: refused without --force.
  again = run_cli("mage_jax.generate", *args[:2], "--num_images=8", "--batch_size=8", f"--num_steps={STEPS}")
  assert_one_line_error(again, 2, "--force")
  assert len(list((out / "images").rglob("*.png"))) == 10
  forced = run_cli(
    "mage_jax.generate", *args[:2], "--num_images=8", "--batch_size=8", f"--num_steps={STEPS}", "--force"
  )
  assert forced.returncode == 0, forced.stderr
  assert len(list((out / "images").rglob("*.png"))) == 8


def test_generate_cli_bad_inputs(params_dir, tmp_path):
  out = tmp_path / "o"
  cases = [
    ([f"--params={tmp_path / 'nope'}"], 1, f"not found: {tmp_path / 'nope'}"),
    ([f"--params={tmp_path}"], 1, "mage_jax.json"),
    ([f"--params={params_dir}", "--class_id=3"], 2, "unconditional model"),
    ([f"--params={params_dir}", "--batch_size=6", "--num_images=6"], 2, "multiple of the device count 8"),
    ([f"--params={params_dir}", "--dtype=float16"], 2, "float16"),
    ([f"--params={params_dir}", "--temperature=nan"], 2, "--temperature must be finite"),
    ([f"--params={params_dir}", "--num_images=0"], 2, "num_images"),
  ]
  for args, status, message in cases:
    assert_one_line_error(run_cli("mage_jax.generate", *args, f"--out={out}"), status, message)
  assert not out.exists()
  (tmp_path / "file").write_text("x")
  run = run_cli("mage_jax.generate", f"--params={params_dir}", f"--out={tmp_path / 'file'}")
  assert_one_line_error(run, 2, "is a file")
  assert (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------------------------------------------------
# edit.py


def _hand_token_mask(pixel_mask, cell=4, ring=1):
  g = pixel_mask.shape[0] // cell
  cells = np.array(
    [[pixel_mask[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].any() for c in range(g)] for r in range(g)]
  )
  out = np.zeros_like(cells)
  for r, c in zip(*np.nonzero(cells)):
    out[max(r - ring, 0) : r + ring + 1, max(c - ring, 0) : c + ring + 1] = True
  return out


@pytest.mark.parametrize("mode", ["inpaint", "outpaint"])
def test_edit_image_keeps_known_tokens(loaded, mode):
  model, tokenizer, variables = loaded
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  box = (9, 4, 17, 14) if mode == "inpaint" else (4, 4, 28, 28)
  pixel_mask = editing.pixel_mask_for(mode, 32, box)
  res = editing.edit_image(
    model,
    tokenizer,
    variables,
    jax.random.key(1),
    image,
    pixel_mask,
    num_samples=3,
    num_steps=STEPS,
    temperature=TEMPERATURE,
  )
  want_mask = _hand_token_mask(pixel_mask)
  np.testing.assert_array_equal(res.token_mask, want_mask)
  if mode == "inpaint":  # rows 9..16 -> token rows 2..4, cols 4..13 -> 1..3; plus the ring
    assert want_mask.sum() == 5 * 5 and want_mask[1:6, 0:5].all()
  else:  # keep box 4..27 leaves token rows/cols 1..6 untouched, minus the ring: only 2..5 are kept
    assert (~want_mask).sum() == 4 * 4 and (~want_mask[2:6, 2:6]).all()
  zeroed = np.where(pixel_mask[..., None], 0.0, image.astype(np.float32) / 255.0)
  ids = np.asarray(tokenizer.apply(variables["tokenizer"], jnp.asarray(zeroed[None]), method="encode_to_ids"))[0]
  np.testing.assert_array_equal(res.input_ids, ids)  # tokens of the ZEROED image (no leakage)
  keep = ~want_mask.reshape(-1)
  assert res.sample_ids.shape == (3, 64)
  np.testing.assert_array_equal(res.sample_ids[:, keep], np.broadcast_to(ids[keep], (3, keep.sum())))
  assert ((res.sample_ids >= 0) & (res.sample_ids < 1024)).all()
  assert res.samples.shape == (3, 32, 32, 3) and res.samples.dtype == np.uint8
  np.testing.assert_array_equal(res.masked_image, np.where(pixel_mask[..., None], 0, image))


def test_edit_cli(params_dir, tmp_path):
  src = tmp_path / "in.png"
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src)
  out = tmp_path / "edit"
  args = [
    f"--params={params_dir}",
    f"--image={src}",
    "--box=8,8,16,16",
    f"--out={out}",
    "--num_samples=2",
    f"--num_steps={STEPS}",
  ]
  run = run_cli("mage_jax.edit", *args)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "regenerated 16/64 tokens" in run.stdout  # token hole 2..3 + ring -> 1..4
  inp = np.asarray(Image.open(out / "input.png"))
  # The eval transform (32 -> 36 bicubic, centre 32x32 crop), truncated to uint8 as every PNG written here.
  np.testing.assert_array_equal(inp, images.to_uint8(editing.load_image(str(src), 32)))
  masked = np.asarray(Image.open(out / "masked.png"))
  assert (masked[8:16, 8:16] == 0).all()
  np.testing.assert_array_equal(masked[:8], inp[:8])
  for i in range(2):
    assert np.asarray(Image.open(out / f"sample_{i}.png")).shape == (32, 32, 3)
  assert not (out / "sample_2.png").exists()
  for extra, status, needle in (
    ([], 2, "--force"),  # the same OUT again
    ([f"--image={tmp_path / 'x.png'}", f"--out={tmp_path / 'o2'}"], 1, "image not found"),
    (["--box=8,8,40,16", f"--out={tmp_path / 'o3'}"], 1, "box"),
    (["--temperature=nan", f"--out={tmp_path / 'o4'}"], 2, "finite"),
  ):
    assert_one_line_error(run_cli("mage_jax.edit", *args, *extra), status, needle)
  assert run_cli("mage_jax.edit", *args, "--force").returncode == 0
  (out / "notes.txt").write_text("mine")
  assert_one_line_error(run_cli("mage_jax.edit", *args, "--force"), 2, "edit did not write (notes.txt)")
  assert (out / "notes.txt").read_text() == "mine" and (out / "sample_1.png").exists()


def test_parse_box():
  assert editing.parse_box("1, 2,3,4") == (1, 2, 3, 4)
  with pytest.raises(ValueError, match="four integers"):
    editing.parse_box("1,2,3")


def test_force_removes_only_what_an_earlier_run_listed(tmp_path):
  """--force replaces the files an earlier run listed in its record before writing them (an interrupted run's
  too); a file or folder of the user's anywhere in OUT, a file named like generate's own, or a link, is foreign:
  refused, untouched."""
  from mage_jax import generate  # pylint: disable=g-import-not-at-top
  from mage_jax.system import outputs, runtime

  out = tmp_path / "out"
  listed = generate.planned_outputs(str(out), 3, 2, png=True, npz=True, grid=False)
  assert listed == [
    "images/000/00000.png",
    "images/000/00001.png",
    "images/001/00002.png",
    "images.npz",
    "generation.json",
  ]
  outputs.write_record(str(out), listed)
  for rel in listed[:2]:  # interrupted after two images
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(b"png")
  with pytest.raises(runtime.UsageError, match="pass --force"):
    outputs.prepare(str(out), False, "generate")
  outputs.prepare(str(out), True, "generate")
  assert os.listdir(out) == []
  outputs.write_record(str(out), listed)
  for plant in ("images/000/00003.png", "images/my_photos/a.jpg", "notes.txt"):
    (out / plant).parent.mkdir(parents=True, exist_ok=True)
    (out / plant).write_text("mine")
    with pytest.raises(runtime.UsageError, match=f"did not write \\({plant}"):
      outputs.prepare(str(out), True, "generate")
    assert (out / plant).read_text() == "mine"
    (out / plant).unlink()
  with pytest.raises(runtime.UsageError, match="did not write \\(images/my_photos\\)"):  # an empty folder too
    outputs.prepare(str(out), True, "generate")
  os.rmdir(out / "images" / "my_photos")
  (tmp_path / "elsewhere").mkdir()
  os.symlink(tmp_path / "elsewhere", out / "images" / "001")
  with pytest.raises(runtime.UsageError, match="did not write"):
    outputs.prepare(str(out), True, "generate")
  assert (tmp_path / "elsewhere").is_dir()
  os.unlink(out / "images" / "001")
  os.remove(out / outputs.RECORD)
  (out / "images" / "000" / "00000.png").write_bytes(b"png")  # generate's name, but no record lists it
  with pytest.raises(runtime.UsageError, match="did not write"):
    outputs.prepare(str(out), True, "generate")
  assert (out / "images" / "000" / "00000.png").exists()
