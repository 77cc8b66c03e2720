"""Export to the official PyTorch layouts: bit-exact round trips (fixture files, released sizes, models trained
here), torch loading and strict loading, the recreated unused tensors, the writers, the CLI."""

import dataclasses
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from conftest import fake_state_dict, official_shapes_from_target, tiny_params_dir
from mage_jax.convert import convert, safetensors_io, to_torch, torch_pickle, torch_save
from mage_jax.models.mage import config_for
from mage_jax.models.vqgan import VQGANConfig
from mage_jax.train import params_io

FIXTURES = ("mage", "tokenizer", "vit_probe")
WRAPPERS = {"mage": "model", "tokenizer": "state_dict", "vit_probe": "model"}


def _fixture(testdata, name):
  return torch_pickle.flatten_state_dict(torch_pickle.load(str(testdata / "official_tiny" / f"{name}.pth")))


def _assert_bit_exact(got, want):
  assert set(got) == set(want), sorted(set(got) ^ set(want))
  for key, array in want.items():
    out = np.asarray(got[key])
    assert out.dtype == array.dtype and out.shape == array.shape, (key, out.dtype, out.shape, array.dtype, array.shape)
    assert np.ascontiguousarray(out).tobytes() == np.ascontiguousarray(array).tobytes(), key


@pytest.fixture(scope="module")
def exported(testdata, tmp_path_factory):
  """The fixture files converted (sizes from config.json), saved as params directories, then exported as
  .pth and .safetensors through the params directory: {name: (pth path, safetensors path)}."""
  root = tmp_path_factory.mktemp("exported")
  cfg = json.loads((testdata / "official_tiny" / "config.json").read_text())
  out = {}
  for name in FIXTURES:
    result = convert.convert_state_dict(
      _fixture(testdata, name),
      num_heads=cfg["mage"]["num_heads"],
      decoder_num_heads=cfg["mage"]["decoder_num_heads"],
      resolution=cfg["tokenizer"]["resolution"],
    )
    assert result.report.ok and not result.report.unexpected, result.report.describe()
    params_io.save(str(root / name), result.variables, result.meta)
    variables, meta = params_io.load(str(root / name))
    sd = to_torch.state_dict(variables, meta)
    paths = (str(root / f"{name}.pth"), str(root / f"{name}.safetensors"))
    to_torch.write(paths[0], sd, meta["kind"], meta, "pth")
    to_torch.write(paths[1], sd, meta["kind"], meta, "safetensors")
    out[name] = paths
  return out


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_files_round_trip_bit_exact(testdata, exported, name):
  original = _fixture(testdata, name)
  pth, st = exported[name]
  obj = torch_pickle.load(pth)
  assert set(obj) == {WRAPPERS[name], convert.META_KEY}
  _assert_bit_exact(obj[WRAPPERS[name]], original)
  tensors, metadata = safetensors_io.load(st)
  _assert_bit_exact(tensors, original)
  assert metadata["format"] == "pt" and json.loads(metadata[convert.META_KEY]) == json.loads(obj[convert.META_KEY])


@pytest.mark.parametrize("name", FIXTURES)
def test_torch_loads_exports_as_the_originals(testdata, exported, name):
  torch = pytest.importorskip("torch")
  pth, _ = exported[name]
  original = torch.load(str(testdata / "official_tiny" / f"{name}.pth"), weights_only=True)[WRAPPERS[name]]
  obj = torch.load(pth, weights_only=True)
  assert set(obj[WRAPPERS[name]]) == set(original)
  for key, tensor in original.items():
    assert obj[WRAPPERS[name]][key].dtype == tensor.dtype and torch.equal(obj[WRAPPERS[name]][key], tensor), key
  # load_state_dict(strict=True) into a module holding exactly the official parameters and buffers.
  module = _module_like(torch, original)
  module.load_state_dict(obj[WRAPPERS[name]], strict=True)
  for key, tensor in module.state_dict().items():
    assert torch.equal(tensor, original[key]), key


@pytest.mark.parametrize("name", FIXTURES)
def test_safetensors_package_reads_exports(testdata, exported, name):
  st = pytest.importorskip("safetensors.numpy")
  _assert_bit_exact(st.load_file(exported[name][1]), _fixture(testdata, name))


def _module_like(torch, state_dict):
  """A torch module tree with a zero tensor of the same name, shape and dtype for every state_dict entry."""
  root = torch.nn.Module()
  for key, tensor in state_dict.items():
    *path, leaf = key.split(".")
    module = root
    for name in path:
      if not hasattr(module, name):
        module.add_module(name, torch.nn.Module())
      module = getattr(module, name)
    module.register_buffer(leaf, torch.zeros_like(tensor))
  return root


@pytest.mark.parametrize("variant,kinds", [("B", ("mage", "vit")), ("L", ("mage",))])
def test_released_sizes_round_trip(variant, kinds):
  """Full-size state_dicts (zero-stride arrays, a distinct value per key): convert -> export gives every key
  back with its shape, dtype and value, for the pretraining layout and the fine-tuned ViT."""
  config = config_for(variant)
  d, dd = config.embed_dim, config.decoder_embed_dim
  unused = {
    "cls_token": (1, 1, d),
    "pos_embed": (1, 257, d),
    "mask_token": (1, 1, dd),
    "decoder_pos_embed": (1, 257, dd),
    "patch_embed.proj.weight": (d, 3, 16, 16),
    "patch_embed.proj.bias": (d,),
    "decoder_pred.weight": (768, dd),
    "decoder_pred.bias": (768,),
  }
  tok_shapes = official_shapes_from_target(convert.tokenizer_target(VQGANConfig()), "vqgan.")
  layouts = {
    "mage": lambda: {**official_shapes_from_target(convert.mage_target(config)), **unused, **tok_shapes},
    "vit": lambda: {
      **official_shapes_from_target(convert.vit_target(config, 1000, True, "linear")),
      **tok_shapes,
      "cls_token": (1, 1, d),
      "pos_embed": (1, 197, d),
      "patch_embed.proj.weight": (d, 3, 16, 16),
      "patch_embed.proj.bias": (d,),
    },
  }
  for kind in kinds:
    shapes = layouts[kind]()
    values = {key: i for i, key in enumerate(sorted(shapes))}
    sd = fake_state_dict(shapes, values.get)
    sd["token_emb.position_ids"] = np.arange(257, dtype=np.int64)[None]
    if kind == "mage":
      assert len(sd) == {"B": 265, "L": 409}[variant] + 168  # spec §2.10
    result = convert.convert_state_dict(sd, kind)
    assert result.report.ok and not result.report.unexpected, result.report.describe()
    out = to_torch.state_dict(result.variables, result.meta, kind)
    assert set(out) == set(sd), sorted(set(out) ^ set(sd))
    for key, array in sd.items():
      assert out[key].shape == array.shape and out[key].dtype == array.dtype, key
      assert np.array_equal(out[key], array), key


def test_recreated_unused_tensors_are_the_official_ones(testdata, tmp_path):
  """A model made here (no stored unused tensors): the export has exactly the official key set, shapes and
  dtypes; the fixed tables (sin-cos, position_ids) equal the official file bit for bit."""
  cfg = json.loads((testdata / "official_tiny" / "config.json").read_text())
  official = {name: _fixture(testdata, name) for name in ("mage", "vit_probe")}
  for name, kind in (("mage", "mage"), ("vit_probe", "vit")):
    meta_like = convert.convert_state_dict(
      official[name], kind, num_heads=4, decoder_num_heads=4, resolution=cfg["tokenizer"]["resolution"]
    )
    variables = {k: v for k, v in meta_like.variables.items() if k != "torch_unused"}
    sd = to_torch.state_dict(variables, meta_like.meta, kind, vit_img_size=cfg["mage"]["img_size"])
    assert {k: (v.shape, v.dtype) for k, v in sd.items()} == {k: (v.shape, v.dtype) for k, v in official[name].items()}
    fixed = ["token_emb.position_ids"] + (["pos_embed", "decoder_pos_embed"] if kind == "mage" else [])
    for key in fixed:
      assert sd[key].tobytes() == official[name][key].tobytes(), key
    for key in ("cls_token", "patch_embed.proj.weight"):
      assert np.isfinite(sd[key]).all() and 0 < sd[key].std() < 0.2, key
  # Released sizes: the shapes the spec lists (§2.10: MAGE pos tables [1, 257, D], pixel head [768, Dd];
  # fine-tuned ViT at timm's default 224 px: pos_embed [1, 197, D]).
  meta = {"kind": "mage", "model": dataclasses.asdict(config_for("B")), "tokenizer": dataclasses.asdict(VQGANConfig())}
  mage_b = to_torch.unused_tensors("mage", meta)
  assert mage_b["pos_embed"].shape == (1, 257, 768) and mage_b["decoder_pred.weight"].shape == (768, 768)
  assert mage_b["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
  assert to_torch.unused_tensors("vit", {**meta, "kind": "vit"})["pos_embed"].shape == (1, 197, 768)


@pytest.mark.parametrize("kind", ["mage", "mage_c", "class_cond", "vit", "tokenizer"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_models_trained_here_round_trip(tmp_path, kind, fmt):
  """A params directory made here -> export -> convert back (configs from the embedded meta): every variable
  bit-identical, the same configs; MAGE-C heads and class embeddings under their documented keys."""
  directory = tiny_params_dir(tmp_path / "params", kind)
  variables, meta = params_io.load(directory)
  sd = to_torch.state_dict(variables, meta)
  path = str(tmp_path / f"model.{fmt}")
  to_torch.write(path, sd, meta["kind"], meta, fmt)
  if kind == "mage_c":
    assert "projection_head.hidden_0.weight" in sd and sd["projection_head.hidden_0.weight"].shape == (24, 32)
  if kind == "class_cond":
    assert sd["class_emb.weight"].shape == (6, 32)
  loaded, embedded = convert.load_checkpoint(path)
  result = convert.convert_state_dict(loaded, meta_hint=embedded)
  assert result.report.ok and not result.report.unexpected, result.report.describe()
  back = {k: v for k, v in result.variables.items() if k != "torch_unused"}
  flat_back, flat_orig = traverse_util.flatten_dict(back), traverse_util.flatten_dict(variables)
  assert set(flat_back) == set(flat_orig), set(flat_back) ^ set(flat_orig)
  for path_, leaf in flat_orig.items():
    assert np.asarray(flat_back[path_]).tobytes() == np.asarray(leaf).tobytes(), path_
  assert params_io.tokenizer_config_from_meta(result.meta) == params_io.tokenizer_config_from_meta(meta)
  if kind != "tokenizer":
    assert params_io.mage_config_from_meta(result.meta) == params_io.mage_config_from_meta(meta)
  assert result.meta.get("mage_c") == meta.get("mage_c") and result.meta.get("vit") == meta.get("vit")


def test_export_refuses_what_it_cannot_write(tmp_path):
  directory = tiny_params_dir(tmp_path / "params", "mage")
  variables, meta = params_io.load(directory)
  with pytest.raises(ValueError, match="holds a 'mage' model"):
    to_torch.state_dict(variables, meta, "vit")
  broken = {
    **variables,
    "model": {"params": {k: v for k, v in variables["model"]["params"].items() if k != "decoder_norm"}},
  }
  with pytest.raises(ValueError, match="decoder_norm"):
    to_torch.state_dict(broken, meta)
  tok_variables, tok_meta = params_io.load(tiny_params_dir(tmp_path / "tok", "tokenizer"))
  with pytest.raises(ValueError, match="holds a 'tokenizer'"):
    to_torch.state_dict(tok_variables, tok_meta, "mage")
  sd = to_torch.state_dict(tok_variables, tok_meta)
  target = tmp_path / "exists.pth"
  target.write_text("keep me")
  with pytest.raises(FileExistsError, match="--force"):
    to_torch.write(str(target), sd, "tokenizer", tok_meta)
  assert target.read_text() == "keep me"
  old_mask = os.umask(0o027)
  try:  # the written file has the mode the umask gives new files, not mkstemp's 0600
    to_torch.write(str(tmp_path / "mode.pth"), sd, "tokenizer", tok_meta)
  finally:
    os.umask(old_mask)
  assert stat.S_IMODE(os.stat(tmp_path / "mode.pth").st_mode) == 0o640
  with pytest.raises(TypeError, match="set"):
    torch_save.save(str(tmp_path / "bad.pth"), {"x": {1, 2}})


def test_safetensors_reader_refuses_hostile_files(tmp_path):
  good = tmp_path / "good.safetensors"
  safetensors_io.save(str(good), {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
  data = good.read_bytes()
  header_len = int.from_bytes(data[:8], "little")
  header = json.loads(data[8 : 8 + header_len])

  def with_header(name, new_header, tail=b"\0" * 24):
    text = json.dumps(new_header).encode()
    path = tmp_path / name
    path.write_bytes(len(text).to_bytes(8, "little") + text + tail)
    return str(path)

  cases = {
    "truncated": (tmp_path / "cut.safetensors", data[:10], "not a safetensors file"),
    "huge_header": (tmp_path / "huge.safetensors", (1 << 40).to_bytes(8, "little") + b"{}", "not a safetensors"),
  }
  for path, content, message in cases.values():
    path.write_bytes(content)
    with pytest.raises(torch_pickle.CheckpointError, match=message):
      safetensors_io.load(str(path))
  past_end = {"a": {**header["a"], "data_offsets": [0, 1 << 40]}}
  bad_dtype = {"a": {**header["a"], "dtype": "F128"}}
  wrong_size = {"a": {**header["a"], "shape": [4, 3]}}
  for name, hostile, message in (
    ("past_end", past_end, "claims bytes"),
    ("dtype", bad_dtype, "no known dtype"),
    ("size", wrong_size, "claims bytes"),
  ):
    with pytest.raises(torch_pickle.CheckpointError, match=message):
      safetensors_io.load(with_header(f"{name}.safetensors", hostile))
  tensors, _ = safetensors_io.load(str(good))
  np.testing.assert_array_equal(tensors["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
  st = pytest.importorskip("safetensors.numpy")
  np.testing.assert_array_equal(st.load_file(str(good))["a"], tensors["a"])


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_cli_export_then_convert_back(testdata, tmp_path):
  cfg = json.loads((testdata / "official_tiny" / "config.json").read_text())
  first = tmp_path / "converted"
  result = convert.convert_state_dict(
    _fixture(testdata, "mage"), num_heads=cfg["mage"]["num_heads"], decoder_num_heads=cfg["mage"]["decoder_num_heads"]
  )
  params_io.save(str(first), result.variables, result.meta)
  out = tmp_path / "out" / "mage.pth"
  run = _run("mage_jax.export", str(first), str(out))
  assert run.returncode == 0 and "wrote" in run.stdout, run.stderr
  _assert_bit_exact(torch_pickle.flatten_state_dict(torch_pickle.load(str(out))), _fixture(testdata, "mage"))
  again = _run("mage_jax.export", str(first), str(out))
  errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
  assert again.returncode == 1 and len(errors) == 1 and "--force" in errors[0], again.stderr
  assert _run("mage_jax.export", str(first), str(out), "--force").returncode == 0  # its own earlier file
  # --force never replaces a user's file, nor writes into the params it reads.
  mine = tmp_path / "out" / "notes.pth"
  mine.write_text("mine")
  refused = _run("mage_jax.export", str(first), str(mine), "--force")
  assert refused.returncode == 2 and "was not written by mage_jax.export" in refused.stderr, refused.stderr
  assert mine.read_text() == "mine"
  record = (first / "mage_jax.json").read_bytes()
  inside = _run("mage_jax.export", str(first), str(first / "mage_jax.json"), "--force")
  assert inside.returncode == 2 and "lies inside PARAMS_DIR" in inside.stderr, inside.stderr
  assert (first / "mage_jax.json").read_bytes() == record
  # A destination the system refuses is named as the user gave it, not by its temporary name.
  for destination, says in (
    ("/proc/mage.pth", "cannot write /proc/mage.pth: No such file or directory"),
    (f"{mine}/mage.pth", f"{mine} exists and is not a directory"),
  ):
    failed = _run("mage_jax.export", str(first), destination)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 1 and errors == [f"error: {says}"] and ".tmp" not in failed.stderr, failed.stderr
  # Converting the export back needs no --config: the file carries the head counts.
  second = tmp_path / "back"
  back = _run("mage_jax.convert", str(out), str(second))
  assert back.returncode == 0, back.stderr
  (v1, m1), (v2, m2) = params_io.load(str(first)), params_io.load(str(second))
  assert m2["model"] == m1["model"] and m2["tokenizer"] == m1["tokenizer"]
  f1, f2 = traverse_util.flatten_dict(v1), traverse_util.flatten_dict(v2)
  assert set(f1) == set(f2) and all(np.asarray(f1[k]).tobytes() == np.asarray(f2[k]).tobytes() for k in f1)
