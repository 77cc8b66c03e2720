"""Tests for mage_jax.evals.probe: head math, known-answer probes, backbone features, resume, export."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from mage_jax.data import sources
from mage_jax.evals import probe
from mage_jax.jobs import linear_probe
from mage_jax.models.mage import MAGE, config_for
from mage_jax.models.vit import MAGEViT
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.objectives import masking
from mage_jax.train import builders, config_views, params_io, sharding

TOK = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, resolution=8, codebook_size=64)
MAGE_CFG = config_for("tiny", num_tokens=16, max_position_embeddings=17, codebook_size=64)


# One compilation shared by the tests that need reference ids.
_ids = jax.jit(lambda v, im: VQGAN(TOK).apply(v, im, method=VQGAN.encode_to_ids))


def _clusters(n, num_classes, dim, seed, sep=4.0):
  """Gaussian blobs around fixed, well separated centres, offset so BN has something to remove."""
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(123).normal(size=(num_classes, dim)) * sep / np.sqrt(dim) * 3
  y = rng.integers(0, num_classes, n)
  return (centers[y] + rng.normal(size=(n, dim)) + 5.0).astype(np.float32), y.astype(np.int32)


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh()  # ('data', 8) on the 8 fake CPU devices


# ---------------------------------------------------------------------------------------------------------
# Head math.


def test_bn_linear_head_matches_float64():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 5)).astype(np.float32) * 3 + 1
  kernel = rng.normal(size=(5, 3)).astype(np.float32)
  bias = rng.normal(size=(3,)).astype(np.float32)
  rmean = rng.normal(size=(5,)).astype(np.float32)
  rvar = rng.uniform(0.5, 2, size=(5,)).astype(np.float32)
  params = {"head": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
  stats = {"head_bn": {"mean": jnp.asarray(rmean), "var": jnp.asarray(rvar)}}
  logits, new = probe.bn_linear_head(params, stats, jnp.asarray(x), train=True, bn_group_size=4)
  xd = x.astype(np.float64).reshape(2, 4, 5)
  mu, var = xd.mean(1, keepdims=True), xd.var(1, keepdims=True)
  y = ((xd - mu) / np.sqrt(var + 1e-6)).reshape(8, 5)
  np.testing.assert_allclose(logits, y @ kernel + bias, rtol=1e-5, atol=1e-5)
  # torch: running = 0.9 running + 0.1 batch, with the UNBIASED batch variance (n/(n-1)); groups averaged.
  np.testing.assert_allclose(new["head_bn"]["mean"], 0.9 * rmean + 0.1 * mu[:, 0].mean(0), rtol=1e-6)
  np.testing.assert_allclose(new["head_bn"]["var"], 0.9 * rvar + 0.1 * (var[:, 0] * 4 / 3).mean(0), rtol=1e-6)
  ev, _ = probe.bn_linear_head(params, stats, jnp.asarray(x), train=False)
  ref = (x - rmean) / np.sqrt(rvar + 1e-6) @ kernel + bias
  np.testing.assert_allclose(ev, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(probe.head_predict_numpy(params, stats, x), ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="bn_group_size"):
    probe.bn_linear_head(params, stats, jnp.asarray(x), train=True, bn_group_size=3)


def test_init_head_and_topk():
  params, stats = probe.init_head(jax.random.key(0), 512, 100, init_std=0.01)
  k = np.asarray(params["head"]["kernel"])
  assert abs(k.std() - 0.01) < 5e-4 and np.abs(k).max() < 0.06  # untruncated N(0, 0.01²) in practice
  assert not np.asarray(params["head"]["bias"]).any()
  np.testing.assert_array_equal(stats["head_bn"]["var"], np.ones(512))
  logits = np.array([[0.1, 0.9, 0.5], [0.8, 0.1, 0.05]])
  acc = probe.topk_accuracy(logits, np.array([2, 0]), ks=(1, 2, 5))
  assert acc == {"top1": 0.5, "top2": 1.0, "top5": 1.0}


# ---------------------------------------------------------------------------------------------------------
# Known-answer probes.


def test_probe_separable_clusters_reach_100_percent(mesh, tmp_path):
  xtr, ytr = _clusters(2048, 10, 32, seed=0)
  xte, yte = _clusters(1000, 10, 32, seed=1)
  cfg = linear_probe.ProbeConfig(num_classes=10, epochs=8, warmup_epochs=1, batch_size=128, blr=10.0)
  res, _ = linear_probe.train_probe(
    linear_probe.CachedFeatures(xtr, ytr), xte, yte, cfg, workdir=str(tmp_path), mesh=mesh
  )
  assert res["completed"] and res["epochs_done"] == 8 and len(res["history"]) == 8
  assert res["top1"] >= 0.99, res["history"]


def test_probe_random_labels_is_chance(mesh, tmp_path):
  rng = np.random.default_rng(3)
  xtr, xte = rng.normal(size=(2048, 32)).astype(np.float32), rng.normal(size=(2000, 32)).astype(np.float32)
  ytr, yte = rng.integers(0, 4, 2048).astype(np.int32), rng.integers(0, 4, 2000).astype(np.int32)
  cfg = linear_probe.ProbeConfig(num_classes=4, epochs=8, warmup_epochs=1, batch_size=128, blr=10.0)
  res, _ = linear_probe.train_probe(
    linear_probe.CachedFeatures(xtr, ytr), xte, yte, cfg, workdir=str(tmp_path), mesh=mesh
  )
  # 2000 test labels: the std of a chance accuracy is ~0.01.
  assert abs(res["top1"] - 0.25) < 0.05, res["top1"]


def test_probe_config_errors(mesh, tmp_path):
  with pytest.raises(ValueError, match="unknown config.linear_probe keys"):
    config_views.from_config(linear_probe.ProbeConfig, {"epochs": 2, "lr": 1.0}, "config.linear_probe", num_classes=3)
  with pytest.raises(ValueError, match="bn_group_size"):
    linear_probe.ProbeConfig(num_classes=3, batch_size=100, bn_group_size=128)
  x, y = _clusters(64, 3, 4, seed=0)
  with pytest.raises(ValueError, match="larger than the train set"):
    linear_probe.train_probe(
      linear_probe.CachedFeatures(x, y),
      x,
      y,
      linear_probe.ProbeConfig(num_classes=3, batch_size=128),
      workdir=str(tmp_path),
      mesh=mesh,
    )


# ---------------------------------------------------------------------------------------------------------
# Backbone: params mapping, sharded extraction, export.


def _random_variables(module, seed, *args):
  return random_variables(module, seed, *args, spread=0.3)


@pytest.fixture(scope="module")
def tiny_params_dir(tmp_path_factory):
  """A random tiny MAGE + VQGAN pretraining export (the real export path)."""
  tok = VQGAN(TOK)
  tok_vars = _random_variables(tok, 1, jnp.zeros((1, 8, 8, 3)))
  model = MAGE(MAGE_CFG)
  plan, _ = masking.sample_plan(jax.random.key(0), 1, 16)
  params = _random_variables(model, 2, jnp.zeros((1, 16), jnp.int32), plan)["params"]
  directory = str(tmp_path_factory.mktemp("tiny") / "params")
  builders.export_params(directory, model, params, tok, tok_vars)
  return directory


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def _input(batch_size, augment="none"):
  return dict(name="arrays", split="train", batch_size=batch_size, image_size=8, augment=augment, crop_ratio=1.0)


def test_backbone_params_from_mage():
  mage = {
    "token_emb": {"LayerNorm": {"scale": np.ones(4), "bias": np.zeros(4)}},
    "blocks_1": {"a": 1},
    "blocks_0": {"a": 0},
    "norm": {"scale": np.full(4, 2.0)},
    "decoder_embed": {},
    "mlm_layer": {},
  }
  gp = probe.backbone_params_from_mage(mage, global_pool=True)
  assert sorted(gp) == ["blocks_0", "blocks_1", "fc_norm", "token_emb"]
  np.testing.assert_array_equal(gp["fc_norm"]["scale"], np.ones(4))  # fresh identity, not `norm`
  np.testing.assert_array_equal(gp["fc_norm"]["bias"], np.zeros(4))
  cls = probe.backbone_params_from_mage(mage, global_pool=False)
  assert sorted(cls) == ["blocks_0", "blocks_1", "norm", "token_emb"] and cls["norm"] is mage["norm"]
  stacked = {"token_emb": mage["token_emb"], "blocks": {"w": np.arange(6).reshape(2, 3)}}
  un = probe.backbone_params_from_mage(stacked, global_pool=True)
  np.testing.assert_array_equal(un["blocks_1"]["w"], [3, 4, 5])
  with pytest.raises(ValueError, match="no MAGE encoder"):
    probe.backbone_params_from_mage({"encoder": {}}, True)


@pytest.mark.parametrize("global_pool", [True, False])
def test_extracted_features_equal_model_apply(tiny_params_dir, mesh, global_pool):
  backbone = probe.load_backbone(tiny_params_dir, global_pool=global_pool)
  assert backbone.image_size == 8 and backbone.dim == 64
  shardings = probe.backbone_shardings(backbone, mesh, sharding.DEFAULT_RULES)
  variables = sharding.place(backbone.variables, shardings)
  images = _images(12)
  labels = np.arange(12, dtype=np.int32) % 3
  src = sources.ArraySource(images, labels)
  feats, got_labels = probe.extract_features(
    backbone.feature_fn(), variables, shardings, _input(8), mesh=mesh, source=src
  )
  assert feats.shape == (12, 64) and feats.dtype == np.float32  # padded tail dropped
  np.testing.assert_array_equal(got_labels, labels)
  # Reference: the same [0,1] images (crop_ratio 1 at the native size is the identity resize) through the
  # tokenizer and MAGEViT with hand-mapped params.
  saved, _ = params_io.load(tiny_params_dir)
  x = jnp.asarray(images, jnp.float32) / 255.0
  ids = _ids(saved["tokenizer"], x)
  assert len(np.unique(np.asarray(ids))) > 3  # the random tokenizer does not collapse to one code
  mp = saved["model"]["params"]
  vit_params = {"token_emb": mp["token_emb"], "blocks_0": mp["blocks_0"], "blocks_1": mp["blocks_1"]}
  if global_pool:
    vit_params["fc_norm"] = {"scale": np.ones(64, np.float32), "bias": np.zeros(64, np.float32)}
  else:
    vit_params["norm"] = mp["norm"]
  _, aux = MAGEViT(MAGE_CFG, global_pool=global_pool, head_type="none").apply({"params": vit_params}, ids)
  np.testing.assert_allclose(feats, aux["features"], rtol=2e-5, atol=2e-5)
  if not global_pool:
    # Independent path: the pretraining model's own encoder (norm applied) at the class slot.
    enc = MAGE(MAGE_CFG).apply({"params": mp}, ids, method=MAGE.encoder_features)
    np.testing.assert_allclose(feats, enc[:, 0], rtol=2e-5, atol=2e-5)
  else:
    # fc_norm is a LayerNorm at identity: zero mean, unit variance per example.
    np.testing.assert_allclose(feats.mean(1), 0, atol=1e-4)
    np.testing.assert_allclose(feats.var(1), 1, atol=1e-3)


def test_feature_cache_roundtrip_and_invalidation(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return np.full((3, 2), float(len(calls)), np.float32), np.arange(3, dtype=np.int32)

  path = str(tmp_path / "f" / "x.npz")
  a = probe.cached(path, "k1", compute)
  b = probe.cached(path, "k1", compute)
  assert len(calls) == 1 and (a[0] == b[0]).all()
  c = probe.cached(path, "k2", compute)  # different fingerprint: recomputed and rewritten
  assert len(calls) == 2 and (c[0] == 2).all()
  assert probe.fingerprint(a=1, b=[1, 2]) == probe.fingerprint(b=[1, 2], a=1) != probe.fingerprint(a=2, b=[1, 2])


@pytest.mark.parametrize("online", [False, True])
def test_probe_resume_equals_uninterrupted(tiny_params_dir, mesh, tmp_path, online, monkeypatch):
  """Killed after epoch 1 (stop_after_epochs) and re-run == one uninterrupted run, bit for bit."""
  chex.clear_trace_counter()  # chex counts per function across the parametrized cases
  monkeypatch.setattr(linear_probe, "probe_step", chex.assert_max_traces(linear_probe.probe_step, n=3))  # 3 runs
  rng = np.random.default_rng(0)
  if online:
    backbone = probe.load_backbone(tiny_params_dir)
    shardings = probe.backbone_shardings(backbone, mesh, sharding.DEFAULT_RULES)
    variables = sharding.place(backbone.variables, shardings)
    src = sources.ArraySource(_images(32, seed=1), rng.integers(0, 3, 32).astype(np.int32))
    make = lambda: linear_probe.OnlineImages(
      _input(16, "probe"), backbone.feature_fn(), variables, shardings, dropout=True, source=src
    )
    dim = 64
  else:
    x, y = _clusters(64, 3, 8, seed=0)
    make = lambda: linear_probe.CachedFeatures(x, y)
    dim = 8
  vx, vy = _clusters(40, 3, dim, seed=5)
  cfg = linear_probe.ProbeConfig(num_classes=3, epochs=3, warmup_epochs=1, batch_size=16, blr=5.0, bn_group_size=8)
  full, s_full = linear_probe.train_probe(make(), vx, vy, cfg, workdir=str(tmp_path / "a"), mesh=mesh, dim=dim)
  part, _ = linear_probe.train_probe(
    make(), vx, vy, cfg, workdir=str(tmp_path / "b"), mesh=mesh, dim=dim, stop_after_epochs=1
  )
  assert not part["completed"] and part["epochs_done"] == 1
  resumed, s_res = linear_probe.train_probe(make(), vx, vy, cfg, workdir=str(tmp_path / "b"), mesh=mesh, dim=dim)
  assert resumed["completed"] and resumed["history"] == full["history"]
  for a, b in zip(
    jax.tree.leaves((s_full.params, s_full.batch_stats, s_full.opt_state)),
    jax.tree.leaves((s_res.params, s_res.batch_stats, s_res.opt_state)),
  ):
    np.testing.assert_array_equal(a, b)
  # The head actually moved, so the comparison is not between two untouched inits.
  assert float(jnp.abs(s_full.batch_stats["head_bn"]["mean"]).max()) > 0


def test_export_probe_is_a_bn_linear_vit(tiny_params_dir, mesh, tmp_path):
  backbone = probe.load_backbone(tiny_params_dir)
  shardings = probe.backbone_shardings(backbone, mesh, sharding.DEFAULT_RULES)
  variables = sharding.place(backbone.variables, shardings)
  images = _images(16, seed=4)
  src = sources.ArraySource(images, np.arange(16, dtype=np.int32) % 3)
  feats, labels = probe.extract_features(backbone.feature_fn(), variables, shardings, _input(8), mesh=mesh, source=src)
  cfg = linear_probe.ProbeConfig(num_classes=3, epochs=2, warmup_epochs=0, batch_size=8, blr=5.0)
  _, state = linear_probe.train_probe(
    linear_probe.CachedFeatures(feats, labels), feats, labels, cfg, workdir=str(tmp_path / "p"), mesh=mesh
  )
  out = str(tmp_path / "export")
  linear_probe.export_probe(out, backbone, state, num_classes=3)
  saved, meta = params_io.load(out)
  assert meta["kind"] == "vit" and meta["vit"] == {"num_classes": 3, "global_pool": True, "head_type": "bn_linear"}
  ids = _ids(saved["tokenizer"], jnp.asarray(images, jnp.float32) / 255.0)
  logits, _ = jax.jit(MAGEViT(MAGE_CFG, num_classes=3, head_type="bn_linear").apply)(saved["model"], ids)
  np.testing.assert_allclose(
    logits, probe.head_predict_numpy(state.params, state.batch_stats, feats), rtol=1e-4, atol=1e-4
  )
  # And the export is itself a valid backbone source (kind 'vit').
  again = probe.load_backbone(out)
  np.testing.assert_array_equal(again.variables["vit"]["params"]["fc_norm"]["scale"], np.ones(64))


def test_load_backbone_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    probe.load_backbone(str(tmp_path / "missing"))
  params_io.save(
    str(tmp_path / "tok"), {"tokenizer": {"params": {"w": np.zeros(2)}}}, {"kind": "tokenizer", "tokenizer": {}}
  )
  with pytest.raises(ValueError, match="kind 'tokenizer'"):
    probe.load_backbone(str(tmp_path / "tok"))
