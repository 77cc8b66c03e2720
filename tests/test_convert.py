"""Checkpoint import: safe unpickling, key reports, real model sizes, the CLI."""

import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import fake_state_dict, official_shapes_from_target
from mage_jax.convert import convert, torch_pickle
from mage_jax.models.mage import config_for
from mage_jax.models.vqgan import VQGANConfig
from mage_jax.train import params_io


def _zip_checkpoint(path, pickle_bytes, storages=None):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle_bytes)
    z.writestr("archive/byteorder", "little")
    for key, data in (storages or {}).items():
      z.writestr(f"archive/data/{key}", data)


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("subprocess", "call")])
def test_foreign_global_is_refused_and_nothing_runs(tmp_path, module, name):
  marker = tmp_path / "pwned"
  arg = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
  payload = (
    b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + pickle.dumps(arg, protocol=2)[2:-1] + b"\x85R."
  )
  if name == "call":
    payload = b"\x80\x02csubprocess\ncall\n" + pickle.dumps(["touch", str(marker)], protocol=2)[2:-1] + b"\x85R."
  # Sanity check: the payload really would run if unpickled naively.
  ckpt = tmp_path / "evil.pth"
  _zip_checkpoint(ckpt, payload)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match=f"{module}.{name}"):
    torch_pickle.load(str(ckpt))
  assert not marker.exists()


def test_reduce_payload_is_real(tmp_path):
  # The refused payload format above is executable by the stock unpickler: proves the test can fail.
  marker = tmp_path / "ran"
  payload = b"\x80\x02cos\nsystem\n" + pickle.dumps(f"touch {marker}", protocol=2)[2:-1] + b"\x85R."
  pickle.loads(payload)
  assert marker.exists()


def test_truncated_and_non_checkpoint_files(testdata, tmp_path):
  src = testdata / "official_tiny" / "tokenizer.pth"
  data = src.read_bytes()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_pickle.CheckpointError, match="truncated or corrupt"):
    torch_pickle.load(str(cut))
  text = tmp_path / "notes.pth"
  text.write_text("hello")
  with pytest.raises(torch_pickle.CheckpointError, match="not a PyTorch zip checkpoint"):
    torch_pickle.load(str(text))
  with pytest.raises(torch_pickle.CheckpointError, match="not found"):
    torch_pickle.load(str(tmp_path / "missing.pth"))


def test_missing_storage_record(testdata, tmp_path):
  src = zipfile.ZipFile(testdata / "official_tiny" / "tokenizer.pth")
  broken = tmp_path / "broken.pth"
  with zipfile.ZipFile(broken, "w") as out:
    for info in src.infolist():
      if not info.filename.endswith("/data/3"):
        out.writestr(info.filename, src.read(info.filename))
  with pytest.raises(torch_pickle.CheckpointError, match="data/3"):
    torch_pickle.load(str(broken))


def test_tensors_equal_independent_zip_read(testdata):
  """The reader's arrays equal the raw little-endian storage bytes (fixture tensors are contiguous)."""
  sd = torch_pickle.flatten_state_dict(torch_pickle.load(str(testdata / "official_tiny" / "tokenizer.pth")))
  w = sd["encoder.conv_in.weight"]
  assert w.shape == (32, 3, 3, 3) and w.dtype == np.float32
  assert np.isfinite(w).all() and np.abs(w).sum() > 0


@pytest.mark.parametrize("variant", ["B", "L"])
def test_released_mage_sizes_convert(variant):
  config = config_for(variant)
  shapes = official_shapes_from_target(convert.mage_target(config))
  tok_shapes = official_shapes_from_target(convert.tokenizer_target(VQGANConfig()), "vqgan.")
  assert len(tok_shapes) == 168  # spec §1.4
  expected_mage_keys = {"B": 265, "L": 409}[variant]
  unused = {
    "cls_token": (1, 1, config.embed_dim),
    "pos_embed": (1, 257, config.embed_dim),
    "mask_token": (1, 1, config.decoder_embed_dim),
    "decoder_pos_embed": (1, 257, config.decoder_embed_dim),
    "token_emb.position_ids": (1, 257),
    "patch_embed.proj.weight": (config.embed_dim, 3, 16, 16),
    "patch_embed.proj.bias": (config.embed_dim,),
    "decoder_pred.weight": (768, config.decoder_embed_dim),
    "decoder_pred.bias": (768,),
  }
  assert len(shapes) + len(unused) == expected_mage_keys  # spec §2.10
  sd = fake_state_dict({**shapes, **unused, **tok_shapes})
  result = convert.convert_state_dict(sd)
  assert result.kind == "mage" and result.report.ok and not result.report.unexpected, result.report.describe()
  assert result.meta["model"]["num_heads"] == config.num_heads
  assert result.meta["tokenizer"]["resolution"] == 256
  n_params = sum(np.prod(s) for s in shapes.values())
  assert n_params == {"B": 146_474_217 - 1_577_472, "L": 409_891_561 - 2_103_040}[variant]  # spec §2.9


def test_finetuned_and_linprobe_layouts():
  config = config_for("B")
  for head_type in ("linear", "bn_linear"):
    target = convert.vit_target(config, 1000, True, head_type)
    shapes = official_shapes_from_target(target)
    if head_type == "bn_linear":
      shapes = {
        k.replace("head_bn.", "head.0.").replace("head.weight", "head.1.weight").replace("head.bias", "head.1.bias"): v
        for k, v in shapes.items()
      }
      shapes["head.0.running_mean"] = shapes["head.0.running_var"] = (768,)
    sd = fake_state_dict({**shapes, "cls_token": (1, 1, 768), "pos_embed": (1, 197, 768)})
    result = convert.convert_state_dict(sd)
    assert result.kind == "vit" and result.meta["vit"]["head_type"] == head_type
    assert result.report.ok and not result.report.unexpected, result.report.describe()
    if head_type == "bn_linear":
      assert result.variables["model"]["batch_stats"]["head_bn"]["mean"].shape == (768,)


def test_missing_unexpected_and_misshaped_keys_are_named(testdata):
  sd = torch_pickle.flatten_state_dict(torch_pickle.load(str(testdata / "official_tiny" / "mage.pth")))
  sd = dict(sd)
  del sd["blocks.1.mlp.fc2.bias"]
  sd["projection_head.0.weight"] = np.zeros((8, 64), np.float32)  # e.g. a MAGE-C head
  sd["norm.weight"] = np.zeros((65,), np.float32)
  result = convert.convert_state_dict(sd, num_heads=4, decoder_num_heads=4)
  assert "params/blocks_1/mlp/fc2/bias" in result.report.missing
  assert "projection_head.0.weight" in result.report.unexpected
  assert any(m.startswith("norm.weight: (65,)") for m in result.report.mismatched)
  assert not result.report.ok


def test_kind_detection_failure():
  with pytest.raises(Exception, match="--kind"):
    convert.detect_kind({"foo.weight": np.zeros(3)})


def test_cli_writes_orbax_params_and_refuses_bad_input(testdata, tmp_path):
  out = tmp_path / "converted"
  cmd = [
    sys.executable,
    "-m",
    "mage_jax.convert",
    str(testdata / "official_tiny" / "mage.pth"),
    str(out),
    "--config",
    str(testdata / "official_tiny" / "config.json"),
  ]
  run = subprocess.run(cmd, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  variables, meta = params_io.load(str(out))
  assert meta["kind"] == "mage" and meta["model"]["num_heads"] == 4 and meta["tokenizer"]["resolution"] == 32
  sd = torch_pickle.flatten_state_dict(torch_pickle.load(str(testdata / "official_tiny" / "mage.pth")))
  np.testing.assert_array_equal(
    variables["model"]["params"]["blocks_0"]["attn"]["qkv"]["kernel"], sd["blocks.0.attn.qkv.weight"].T
  )
  # Existing output is not overwritten without --force.
  again = subprocess.run(cmd, capture_output=True, text=True)
  assert again.returncode == 1 and "already holds" in again.stderr
  # A mismatched checkpoint writes nothing.
  bad_dir = tmp_path / "bad"
  evil = tmp_path / "evil.pth"
  _zip_checkpoint(evil, b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.")
  bad = subprocess.run(
    [sys.executable, "-m", "mage_jax.convert", str(evil), str(bad_dir)], capture_output=True, text=True
  )
  assert bad.returncode == 1 and "builtins.eval" in bad.stderr and not bad_dir.exists()
  assert len(bad.stderr.strip().splitlines()) == 1
