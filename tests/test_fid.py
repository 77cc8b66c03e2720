"""FID Inception parity with PyTorch references, FID/IS formulas, weight loading and stats caching."""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.special

from mage_jax.fid import conv, inception, metrics, weights

FIX = "inception_fid"


def _rel_l2(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def torch_ref(testdata):
  with np.load(testdata / FIX / "torch_reference.npz") as z:
    return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------------
# Network parity.


def _real_weights_path():
  try:
    return weights.default_weights_path()
  except FileNotFoundError as e:
    if os.environ.get("MAGE_JAX_REQUIRE_FID") == "1":
      pytest.fail(f"MAGE_JAX_REQUIRE_FID=1 but the FID weights are missing: {e}")
    pytest.skip(
      f"FID Inception weights not set up ({weights.SETUP_COMMAND}); set MAGE_JAX_REQUIRE_FID=1 to make this a failure"
    )


@pytest.mark.slow  # ~10 s: one CPU compile of the full network
def test_pool_features_match_torchscript_reference(testdata):
  """The real default_1.pt weights give the TorchScript module's pool3 features (rel L2 < 1e-4)."""
  path = _real_weights_path()
  model = weights.load_inception(path)
  assert not model.has_logits  # default_1.pt has no classifier
  with np.load(testdata / FIX / "reference.npz") as z:
    images = z["images_uint8_nchw"].transpose(0, 2, 3, 1)
    expected = z["pool_features"]
  feats, logits = model(images)
  assert logits is None
  assert feats.shape == (4, 2048) and feats.dtype == np.float32
  assert _rel_l2(feats, expected) < 1e-4
  np.testing.assert_allclose(np.asarray(feats), expected, atol=1e-4)


def _random_torchvision_state_dict(ref):
  """Regenerates the fixture's random pytorch-fid-named state_dict (see the fixture README)."""
  rng = np.random.default_rng(int(ref["random_seed"]))
  out = {}
  for name, shape in zip([str(n) for n in ref["random_names"]], json.loads(str(ref["random_shapes"]))):
    if name.endswith("conv.weight"):
      v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif name.endswith("bn.weight") or name.endswith("running_var"):
      v = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("bn.bias") or name.endswith("running_mean"):
      v = rng.standard_normal(shape) * 0.1
    elif name == "fc.weight":
      v = rng.standard_normal(shape) * 0.05
    elif name == "fc.bias":
      v = rng.standard_normal(shape) * 0.1
    else:
      raise KeyError(name)
    out[name] = v.astype(np.float32)
  return out


@pytest.mark.slow  # ~10 s: one CPU compile of the full network
def test_torchvision_named_weights_and_tf1_resize_match_torch(torch_ref):
  """pytorch-fid/torch-fidelity names map onto the right layers: random weights reproduce a torch run of
  torch-fidelity's architecture, including its TF1 resize of 200x256 images and the unbiased logits."""
  state_dict = _random_torchvision_state_dict(torch_ref)
  model = inception.FIDInception(weights.load_weights(state_dict).params)
  assert model.has_logits
  images = np.random.default_rng(int(torch_ref["random_images_seed"])).integers(
    0, 256, (4, 200, 256, 3), dtype=np.uint8
  )
  feats, logits = model(images)
  assert _rel_l2(feats, torch_ref["random_features"]) < 1e-4
  assert _rel_l2(logits, torch_ref["random_logits_unbiased"]) < 1e-4


@pytest.mark.parametrize("case", ["up", "down", "mixed"])
@pytest.mark.parametrize("method", ["tf1", "pytorch"])
def test_resize_matches_torch(torch_ref, case, method):
  src = torch_ref[f"resize_{case}_src"]
  want = torch_ref[f"resize_{case}_{method}"]
  got = np.asarray(inception.resize_bilinear(src, want.shape[1:3], method))
  # Pixel values span [0, 255]; 5e-4 is a few float32 ulps there (PyTorch orders its products differently).
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-4)


# One layer of each geometry in the graph: (kernel, stride, padding) -> its first layer.
_CONV_GEOMETRIES = {(s.kernel, s.stride, s.padding): s.name for s in reversed(inception.CONVS)}


@pytest.mark.parametrize("name", sorted(_CONV_GEOMETRIES.values()))
def test_conv_as_matmuls_is_the_convolution(name):
  """CPU's formulation of the convolution (and the convolution itself) against float64 NumPy, one layer of each
  geometry: 3x3 valid and same, strides 1 and 2, 1x1, 5x5, 1x7, 7x1, 1x3, 3x1."""
  spec = inception.CONV_BY_NAME[name]
  rng = np.random.default_rng(0)
  side = 19 if spec.stride == 1 else 21
  x = rng.standard_normal((2, side, side, spec.in_ch)).astype(np.float32)
  kernel = (rng.standard_normal(spec.kernel + (spec.in_ch, spec.out_ch)) / np.sqrt(spec.in_ch)).astype(np.float32)
  (kh, kw), (ph, pw), stride = spec.kernel, spec.padding, spec.stride
  padded = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  out_h, out_w = (padded.shape[1] - kh) // stride + 1, (padded.shape[2] - kw) // stride + 1
  want = np.zeros((2, out_h, out_w, spec.out_ch))
  for i in range(kh):
    for j in range(kw):
      window = padded[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
      want += window @ kernel[i, j].astype(np.float64)
  got = np.asarray(conv.as_matmuls(spec, x, kernel))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
  np.testing.assert_allclose(np.asarray(conv.xla(spec, x, kernel)), want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_preprocess_scaling_and_dtypes():
  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  x = np.asarray(inception.preprocess(u8))
  np.testing.assert_array_equal(x, (u8.astype(np.float32) - 128) / 128)  # 299: no resampling
  xf = np.asarray(inception.preprocess(u8.astype(np.float32) / 255))
  np.testing.assert_allclose(xf, x, atol=1e-5)
  small = rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)
  assert inception.preprocess(small).shape == (1, 299, 299, 3)
  with pytest.raises(ValueError, match="NHWC"):
    inception.preprocess(u8.transpose(0, 3, 1, 2))
  with pytest.raises(ValueError, match="dtype int32"):
    inception.preprocess(u8.astype(np.int32))
  with pytest.raises(ValueError, match="resize method"):
    inception.preprocess(u8, method="bicubic")


def test_network_rejects_unscaled_size():
  with pytest.raises(ValueError, match="299"):
    inception.pool_features({}, np.zeros((1, 256, 256, 3), np.float32))


# ----------------------------------------------------------------------------------------------------
# FID.


def _independent_fid(mu1, s1, mu2, s2):
  """tr sqrt(s1 s2) = tr sqrt(A s2 A) with A = s1^(1/2) symmetric PSD: eigh only, float64."""
  w, v = np.linalg.eigh(s1)
  a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  ev = np.linalg.eigvalsh(a @ s2 @ a)
  tr_covmean = np.sum(np.sqrt(np.clip(ev, 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(1)
  feats = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
  mu, sigma = metrics.statistics(feats)
  assert 0 <= metrics.frechet_distance(mu, sigma, mu, sigma) < 1e-8
  # Round-off below zero is the distance 0, never -0.000 (found: pytorch-fid's formula gives negative values for
  # some equal statistics).
  found = [s for s in range(40) if _raw_fid(*metrics.statistics(_features(s)), *metrics.statistics(_features(s))) < 0]
  assert found, "no seed whose raw formula goes below zero: this test checks nothing"
  mu, sigma = metrics.statistics(_features(found[0]))
  assert metrics.frechet_distance(mu, sigma, mu, sigma) == 0.0


def _features(seed):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16)) * 10


def _raw_fid(mu1, sigma1, mu2, sigma2):
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  return (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_fid_matches_independent_float64_computation():
  rng = np.random.default_rng(3)
  f1 = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))
  f2 = rng.standard_normal((350, 32)) @ rng.standard_normal((32, 32)) * 0.7 + 0.3
  mu1, s1 = metrics.statistics(f1.astype(np.float32))
  mu2, s2 = metrics.statistics(f2)
  np.testing.assert_allclose(mu1, f1.astype(np.float32).astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(s1, np.cov(f1.astype(np.float32).astype(np.float64).T), rtol=1e-10)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  want = _independent_fid(mu1, s1, mu2, s2)
  assert got > 1.0
  assert abs(got - want) < 1e-8 * max(1.0, want)


def test_fid_closed_form_for_diagonal_covariances():
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  want = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_fid_singular_covariances_use_eps_fallback():
  # Rank-deficient covariances (fewer samples than dims) are the fallback's reason to exist.
  rng = np.random.default_rng(4)
  mu1, s1 = metrics.statistics(rng.standard_normal((5, 8)))
  mu2, s2 = metrics.statistics(rng.standard_normal((5, 8)))
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(got)
  assert got == pytest.approx(_independent_fid(mu1, s1, mu2, s2), abs=1e-3)


def test_fid_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="equal in length"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="N >= 2"):
    metrics.statistics(np.zeros((1, 4)))


# ----------------------------------------------------------------------------------------------------
# Inception Score.


def test_is_uniform_logits_is_one():
  mean, std = metrics.inception_score(np.zeros((50, 1008)), splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_confident_distinct_classes_is_number_of_classes():
  k = 7
  logits = np.full((k * 10, 20), -1e4)
  logits[np.arange(k * 10), np.arange(k * 10) % k] = 0.0  # one-hot on k classes, equal counts
  mean, _ = metrics.inception_score(logits, splits=1)
  assert mean == pytest.approx(k, rel=1e-9)
  # Without shuffling, splits of consecutive rows each still hold all k classes once per k rows.
  mean, std = metrics.inception_score(logits, splits=10, shuffle=False)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0, abs=1e-9)


def test_is_matches_torch_fidelity(torch_ref):
  logits = np.random.default_rng(int(torch_ref["is_logits_seed"])).standard_normal((103, 1008)).astype(np.float32) * 4
  np.testing.assert_allclose(metrics.inception_score(logits), torch_ref["is_shuffle10"], rtol=1e-10)
  np.testing.assert_allclose(
    metrics.inception_score(logits, splits=7, shuffle=False), torch_ref["is_noshuffle7"], rtol=1e-10
  )
  # And against a plain formula: exp(E KL(p || mean p)) per split.
  p = scipy.special.softmax(logits.astype(np.float64)[:14], axis=1)
  want = np.exp(np.mean(np.sum(scipy.special.rel_entr(p, p.mean(0, keepdims=True)), axis=1)))
  assert metrics.inception_score(logits[:14], splits=1, shuffle=False)[0] == pytest.approx(want, rel=1e-10)


# ----------------------------------------------------------------------------------------------------
# Weight loading.


def _zero_state_dict(with_fc=True):
  names = weights.torchvision_names()
  shapes = weights.expected_shapes(with_fc)
  return {names[k]: np.zeros(s, np.float32) + (1.0 if k.endswith("var") else 0.0) for k, s in shapes.items()}


def test_state_dict_loader_names_missing_and_misshapen_tensors():
  sd = _zero_state_dict()
  w = weights.load_weights(sd)
  assert w.has_logits and w.params["mixed_10.tower_2_conv"]["kernel"].shape == (1, 1, 2048, 192)
  broken = dict(sd)
  del broken["Mixed_6b.branch7x7dbl_3.bn.running_var"]
  with pytest.raises(weights.WeightsError, match=r"1 tensor\(s\) missing.*Mixed_6b\.branch7x7dbl_3\.bn\.running_var"):
    weights.load_weights(broken)
  broken = dict(sd, **{"Mixed_5b.branch1x1.conv.weight": np.zeros((64, 192, 3, 3), np.float32)})
  with pytest.raises(weights.WeightsError, match=r"Mixed_5b\.branch1x1\.conv\.weight has shape"):
    weights.load_weights(broken)
  broken = dict(sd)
  del broken["fc.bias"]  # a classifier must be whole
  with pytest.raises(weights.WeightsError, match="fc.bias"):
    weights.load_weights(broken)
  with pytest.raises(weights.WeightsError, match="unexpected"):
    weights.load_weights(dict(sd, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}))
  with pytest.raises(weights.WeightsError, match="not an FID Inception"):
    weights.load_weights({"encoder.weight": np.zeros(3)})


def test_tf_names_without_classifier_or_gamma_load():
  sd = _zero_state_dict(with_fc=False)
  back = {tv: tf for tf, tv in weights.torchvision_names().items()}
  tf_named = {"net.layers." + back[k]: v for k, v in sd.items() if not k.endswith("bn.weight")}
  w = weights.load_weights(tf_named)
  assert not w.has_logits
  np.testing.assert_array_equal(w.params["conv"]["gamma"], np.ones(32, np.float32))
  assert w.params["conv"]["kernel"].shape == (3, 3, 3, 32)


def test_torch_files_with_missing_tensors_are_refused(testdata):
  with pytest.raises(weights.WeightsError, match=r"missing, e\.g\. \['Conv2d_2a_3x3\.conv\.weight'"):
    weights.load_weights(testdata / FIX / "incomplete_state_dict.pth")
  # TorchScript (List[int] paddings go through torch.jit._pickle.build_intlist): read, then refused.
  with pytest.raises(weights.WeightsError, match=r"tensor\(s\) missing, e\.g\. \['conv_1\.weight'"):
    weights.load_weights(testdata / FIX / "partial_torchscript.pt")
  with pytest.raises(weights.WeightsError, match=r"mixed_4\.tower\.conv_1 has stride 2"):
    weights.load_weights(testdata / FIX / "wrong_stride_torchscript.pt")


def test_npz_roundtrip_and_refusal(tmp_path):
  w = weights.load_weights(_zero_state_dict(with_fc=False))
  w.params["conv"]["beta"][:] = np.arange(32)
  path = weights.save_npz(w, tmp_path / "w.npz")
  back = weights.load_npz(path)
  assert back.weights_id == "in-memory" and not back.has_logits
  for layer in w.params:
    for field in w.params[layer]:
      np.testing.assert_array_equal(back.params[layer][field], w.params[layer][field])
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files if k != "mixed_3.tower.conv_2/var"}
  np.savez(tmp_path / "missing.npz", **arrays)
  with pytest.raises(weights.WeightsError, match=r"missing, e\.g\. \['mixed_3\.tower\.conv_2\.var'\]"):
    weights.load_npz(tmp_path / "missing.npz")
  np.savez(tmp_path / "other.npz", mu=np.zeros(3))
  with pytest.raises(weights.WeightsError, match="not a converted FID Inception"):
    weights.load_npz(tmp_path / "other.npz")
  with pytest.raises(FileNotFoundError):
    weights.load_weights(tmp_path / "nope.npz")


def test_default_weights_path_says_how_to_set_up(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="python -m mage_jax.fid.weights setup"):
    weights.default_weights_path()
  (tmp_path / weights.WEIGHTS_FILENAME).write_bytes(b"")
  assert weights.default_weights_path() == tmp_path / weights.WEIGHTS_FILENAME


# ----------------------------------------------------------------------------------------------------
# Streaming statistics, evaluation and the reference cache (with a stand-in network).


class _FakeModel:
  """Features = first 6 pixel values; logits = optional fixed projection. Records batch shapes."""

  def __init__(self, with_logits):
    self.with_logits = with_logits
    self.cache_tag = "fake-tf1"
    self.shapes = []

  def __call__(self, batch, spatial=False):
    self.shapes.append(batch.shape)
    flat = batch.reshape(batch.shape[0], -1).astype(np.float32)
    f = flat[:, :6]
    out = f, (f @ np.ones((6, 4), np.float32) * np.arange(4) if self.with_logits else None)
    return (*out, flat[:, 6:10]) if spatial else out


def _image_batches(seed, sizes):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in sizes]


def test_compute_stats_rechunks_pads_and_matches_np_cov():
  batches = _image_batches(5, [3, 7, 1, 6])  # 17 images
  model = _FakeModel(with_logits=True)
  stats = metrics.compute_stats_for_images(iter(batches), model, batch_size=5)
  assert model.shapes == [(5, 4, 4, 3)] * 4  # fixed shape, last one padded
  allf = np.concatenate(batches).reshape(17, -1)[:, :6].astype(np.float64)
  assert stats.num_images == 17 and stats.logits.shape == (17, 4)
  np.testing.assert_allclose(stats.mu, allf.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(allf.T), rtol=1e-10, atol=1e-9)
  capped = metrics.compute_stats_for_images(iter(batches), _FakeModel(False), batch_size=4, max_images=9)
  assert capped.num_images == 9 and capped.logits is None
  np.testing.assert_allclose(capped.mu, allf[:9].mean(0), rtol=1e-12)


def test_evaluate_reports_is_unavailable_without_classifier():
  ref = metrics.compute_stats_for_images(_image_batches(6, [20]), _FakeModel(False), batch_size=8)
  res = metrics.evaluate(_image_batches(7, [20]), ref, _FakeModel(False), batch_size=8)
  assert res.fid > 0 and res.num_images == 20
  assert res.inception_score is None and res.inception_score_std is None
  assert "unavailable" in res.inception_score_note
  res = metrics.evaluate(_image_batches(7, [20]), ref, _FakeModel(True), batch_size=8, is_splits=2)
  assert res.inception_score is not None and res.inception_score >= 1.0 and res.inception_score_note is None


def test_reference_stats_are_cached_per_dataset_split(tmp_path):
  calls = []

  def images_fn():
    calls.append(1)
    return iter(_image_batches(8, [6, 6]))

  model = _FakeModel(False)
  first = metrics.load_or_compute_reference_stats("toy", "validation", images_fn, tmp_path, model=model, batch_size=4)
  again = metrics.load_or_compute_reference_stats("toy", "validation", images_fn, tmp_path, model=model)
  assert len(calls) == 1
  assert (tmp_path / "toy-validation-fake-tf1.npz").is_file()
  np.testing.assert_array_equal(again.mu, first.mu)
  np.testing.assert_array_equal(again.sigma, first.sigma)
  assert again.num_images == 12
  metrics.load_or_compute_reference_stats("toy", "train", images_fn, tmp_path, model=model)
  assert len(calls) == 2
  with pytest.raises(ValueError, match="file name"):
    metrics.load_or_compute_reference_stats("../x", "train", images_fn, tmp_path, model=model)


# ----------------------------------------------------------------------------------------------------
# sFID and precision/recall.


def _precision_recall_float64(ref, gen, k=3):
  """Kynkaenniemi et al. 2019 from the definition: balls of k-th-neighbour radius around each point."""
  ref, gen = np.asarray(ref, np.float64), np.asarray(gen, np.float64)

  def sq(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

  radius_ref = np.sort(sq(ref, ref), axis=1)[:, k]  # column 0: the point itself
  radius_gen = np.sort(sq(gen, gen), axis=1)[:, k]
  precision = np.mean([(sq(g[None], ref)[0] <= radius_ref).any() for g in gen])
  recall = np.mean([(sq(r[None], gen)[0] <= radius_gen).any() for r in ref])
  return precision, recall


def test_precision_recall_match_float64_definition(monkeypatch):
  monkeypatch.setattr(metrics, "_PR_BLOCK", 7)  # several blocks, the last one partial
  rng = np.random.default_rng(3)
  ref = np.concatenate([rng.normal(0, 1, (25, 5)), rng.normal(4, 0.5, (15, 5))])
  gen = np.concatenate([rng.normal(0.5, 1.2, (20, 5)), rng.normal(9, 1, (13, 5))])
  got = metrics.precision_recall(ref, gen)
  want = _precision_recall_float64(ref, gen)
  assert 0 < want[0] < 1 and 0 < want[1] < 1  # a case that can tell them apart
  assert got == pytest.approx(want, abs=1e-12)
  assert metrics.precision_recall(ref, ref) == (1.0, 1.0)
  assert metrics.precision_recall(ref, ref + 100.0) == (0.0, 0.0)
  with pytest.raises(ValueError, match="equal D"):
    metrics.precision_recall(ref, gen[:, :3])
  with pytest.raises(ValueError, match="N > 3"):
    metrics.manifold_radii(ref[:3])


def test_extras_give_sfid_precision_recall_and_survive_the_cache(tmp_path):
  ref = metrics.compute_stats_for_images(_image_batches(6, [30]), _FakeModel(False), batch_size=8, extras=True)
  flat = np.concatenate(_image_batches(6, [30])).reshape(30, -1).astype(np.float64)
  np.testing.assert_allclose(ref.spatial.mu, flat[:, 6:10].mean(0), rtol=1e-12)
  np.testing.assert_allclose(ref.spatial.sigma, np.cov(flat[:, 6:10].T), rtol=1e-10, atol=1e-9)
  np.testing.assert_array_equal(ref.features, flat[:, :6].astype(np.float32))
  res = metrics.evaluate(_image_batches(7, [20]), ref, _FakeModel(False), batch_size=8)
  gen = np.concatenate(_image_batches(7, [20])).reshape(20, -1).astype(np.float64)
  assert res.sfid == pytest.approx(
    metrics.frechet_distance(*metrics.statistics(gen[:, 6:10]), ref.spatial.mu, ref.spatial.sigma)
  )
  assert (res.precision, res.recall) == pytest.approx(_precision_recall_float64(flat[:, :6], gen[:, :6]))
  metrics.save_stats(ref, tmp_path / "ref.npz")
  back = metrics.load_stats(tmp_path / "ref.npz")
  np.testing.assert_array_equal(back.spatial.sigma, ref.spatial.sigma)
  np.testing.assert_array_equal(back.features, ref.features)
  plain = metrics.evaluate(
    _image_batches(7, [20]), metrics.ImageStatistics(ref.mu, ref.sigma, 30), _FakeModel(False), batch_size=8
  )
  assert plain.fid == pytest.approx(res.fid) and plain.sfid is None and plain.precision is None
  np.savez(tmp_path / "bad.npz", mu=ref.mu, sigma=ref.sigma, num_images=np.int64(30), features=ref.features[:5])
  with pytest.raises(ValueError, match="bad.npz: features of shape"):
    metrics.load_stats(tmp_path / "bad.npz")


def _block_input(params, x, block):
  """The activations entering `block` (the trunk of `inception._network`, recomputed layer by layer)."""
  # pylint: disable=protected-access
  x = inception.preprocess(x)
  for name in ("conv", "conv_1", "conv_2"):
    x = inception._conv_bn_relu(params, name, x)
  x = inception._max_pool(x, 2, 0)
  x = inception._max_pool(inception._conv_bn_relu(params, "conv_4", inception._conv_bn_relu(params, "conv_3", x)), 2, 0)
  for name, kind, _ in inception.BLOCKS:
    if name == block:
      return np.asarray(x, np.float64)
    x = inception._BLOCK_FNS[kind](params, name, x)
  raise KeyError(block)


@pytest.mark.slow  # ~20 s: two CPU compiles of the full network
def test_spatial_features_are_the_first_7_channels_of_mixed_6_conv(torch_ref):
  """sFID's features, as the ADM evaluator reads graph tensor `mixed_6/conv:0`[..., :7]: recomputed in float64
  from the block's input (1x1 conv, batch norm, ReLU); the pool3 features are unchanged by the extra output."""
  model = inception.FIDInception(weights.load_weights(_random_torchvision_state_dict(torch_ref)).params)
  images = np.random.default_rng(5).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
  pool, logits, spatial = model(images, spatial=True)
  plain_pool, plain_logits = model(images)
  np.testing.assert_allclose(pool, plain_pool, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits, plain_logits, rtol=1e-5, atol=1e-5)
  assert spatial.shape == (2, inception.SPATIAL_DIM) == (2, 2023)
  p = {k: np.asarray(v, np.float64) for k, v in model.params["mixed_6.conv"].items()}
  x = _block_input(model.params, images, "mixed_6")
  y = np.einsum("nhwc,cd->nhwd", x, p["kernel"][0, 0])
  y = np.maximum((y - p["mean"]) * p["gamma"] / np.sqrt(p["var"] + inception.BN_EPS) + p["beta"], 0)
  want = y[..., :7].reshape(2, -1)
  assert _rel_l2(spatial, want) < 1e-5
