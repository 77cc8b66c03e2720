"""mage_jax.evals.image_metrics and tokenizer training (mage_jax.jobs.tokenizer, mage_jax.train.tokenizer_step)."""

import json
import logging
import os
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from scipy.signal import correlate2d

from configs import tokenizer_fashion_mnist
from mage_jax.evals import image_metrics as im, reconstruction
from mage_jax.jobs import tokenizer as tokenizer_job
from mage_jax.models.vqgan import VQGAN
from mage_jax.objectives import tokenizer_losses
from mage_jax.train import builders, config_views, params_io, sharding, tokenizer_step

# --- image metrics -------------------------------------------------------------------------------------------


def _images(seed, shape=(3, 16, 16, 3)):
  rng = np.random.default_rng(seed)
  x = rng.random(shape)
  y = np.clip(x + 0.1 * rng.standard_normal(shape), 0.0, 1.0)
  return x, y


def test_psnr_matches_numpy():
  x, y = _images(0)
  mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(im.psnr(x, y)), 10 * np.log10(1.0 / mse), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(im.psnr(2 * x, 2 * y, max_val=2.0)), 10 * np.log10(1.0 / mse), rtol=1e-5)
  # A uniform error of 0.1 is exactly 20 dB; an exact copy hits the 100 dB cap.
  np.testing.assert_allclose(
    np.asarray(im.psnr(np.full((1, 4, 4, 3), 0.5), np.full((1, 4, 4, 3), 0.6))), [20.0], rtol=1e-5
  )
  np.testing.assert_allclose(np.asarray(im.psnr(x, x)), 100.0, rtol=1e-6)
  with pytest.raises(ValueError, match="one shape"):
    im.psnr(x, y[:, :8])


def _ssim_float64(x, y, max_val=1.0):
  """Wang et al. with an 11x11 sigma-1.5 Gaussian, 'valid' windows, float64 (independent of the module)."""
  t = np.arange(11) - 5.0
  g = np.exp(-(t**2) / (2 * 1.5**2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
  out = []
  for b in range(x.shape[0]):
    vals = []
    for c in range(x.shape[-1]):
      a, d = x[b, ..., c], y[b, ..., c]
      f = lambda v: correlate2d(v, w, mode="valid")
      mx, my = f(a), f(d)
      sxx, syy, sxy = f(a * a) - mx**2, f(d * d) - my**2, f(a * d) - mx * my
      vals.append(((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())
    out.append(np.mean(vals))
  return np.asarray(out)


def test_ssim_matches_float64_reference():
  x, y = _images(1, (2, 20, 24, 3))
  np.testing.assert_allclose(np.asarray(im.ssim(x, y)), _ssim_float64(x, y), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(im.ssim(x, x)), 1.0, atol=1e-5)


def test_ssim_constant_images_by_hand():
  # Zero variance: SSIM reduces to the luminance term (2ab + c1) / (a² + b² + c1).
  a, b = 0.3, 0.7
  c1 = 0.01**2
  got = im.ssim(np.full((1, 12, 12, 3), a), np.full((1, 12, 12, 3), b))
  # float32 E[x²] − E[x]² leaves ~1e-8 of variance, ~3e-5 relative against c2 = 9e-4 (as tf.image.ssim).
  np.testing.assert_allclose(np.asarray(got), [(2 * a * b + c1) / (a * a + b * b + c1)], rtol=1e-4)
  with pytest.raises(ValueError, match="at least that large"):
    im.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_gaussian_window():
  g = im.gaussian_window(11, 1.5)
  assert g.shape == (11,) and g.sum() == pytest.approx(1.0) and g[5] == g.max()
  assert g[4] / g[5] == pytest.approx(np.exp(-1 / (2 * 1.5**2)))


def test_codebook_histogram_usage_perplexity():
  ids = jnp.asarray([[0, 0, 1, 2], [5, 5, 5, 5]])
  hist = np.asarray(im.code_histogram(ids, 8, weights=jnp.asarray([1.0, 0.0])))
  np.testing.assert_array_equal(hist, [2, 1, 1, 0, 0, 0, 0, 0])
  assert im.codebook_usage(hist) == 3 / 8
  # p = (1/2, 1/4, 1/4): entropy 1.5 ln 2, perplexity 2^1.5.
  assert im.codebook_perplexity(hist) == pytest.approx(2**1.5)
  assert im.codebook_perplexity(np.ones(16)) == pytest.approx(16.0)
  np.testing.assert_array_equal(np.asarray(im.code_histogram(ids, 8)), [2, 1, 1, 0, 0, 4, 0, 0])
  assert np.isnan(im.codebook_perplexity(np.zeros(4)))


# --- training loop -------------------------------------------------------------------------------------------


def _write_folder(root, n_train=16, n_test=8, size=16):
  """Synthetic grey blobs on black (Fashion-MNIST-like), as PNG files in train/ and test/."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  for split, n in (("train", n_train), ("test", n_test)):
    os.makedirs(root / split, exist_ok=True)
    for i in range(n):
      cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
      r = rng.uniform(size * 0.15, size * 0.35)
      img = (255 * rng.uniform(0.4, 1.0) * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)).astype(np.uint8)
      Image.fromarray(img).convert("RGB").save(root / split / f"{i:03d}.png")
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _write_folder(tmp_path_factory.mktemp("blobs"))


def small_config(folder, *, steps=4, gan_start=-1, **loss):
  """The Fashion-MNIST config shrunk to test size, on the synthetic folder (16x16, 8x8 tokens)."""
  c = tokenizer_fashion_mnist.get_config(f"steps={steps},batch=8")
  c.input.name = f"folder:{folder}"
  c.input.image_size = 16
  c.input.num_workers = 1
  c.tokenizer.update(dict(ch=8, ch_mult=(1, 2), z_channels=8, codebook_size=16, num_groups=4))
  c.discriminator.widths = ((16, 8), (8, 8), (4, 8))
  c.loss.discriminator_start_step = gan_start
  c.loss.update(loss)
  c.optim.update(dict(warmup_steps=0, min_lr=c.optim.lr))  # constant lr: the schedule ignores total_steps
  c.evals.reconstruction.update(dict(batch_size=8, num_examples=0, num_images=4, every_steps=0))
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.async_checkpoints = False
  return c


def _init(task, mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda r: sharding.strip_boxes(task.init_state(r)))(jax.random.key(0))


def _batch(folder, n=8, size=16):
  files = sorted((folder / "train").iterdir())[:n]
  return {
    "image": jnp.asarray(
      np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files]) / 255.0, jnp.float32
    )
  }


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(tree))


@pytest.fixture(scope="module")
def gan_setup(folder, tmp_path_factory):
  """A small task with every loss term on (D from step 0, LeCam, R1, entropy, a random perceptual net), its
  initial state and jitted step; bf16 compute as in the ImageNet config."""
  tmp = tmp_path_factory.mktemp("gan")
  np.savez(tmp / "vgg.npz", **tokenizer_losses.random_perceptual_weights(seed=0, widths=(4, 4, 4, 4, 4)))
  c = small_config(
    folder,
    gan_start=0,
    lecam_weight=0.1,
    r1_cost=1.0,
    entropy_weight=0.1,
    perceptual_weight=0.1,
    perceptual_weights=str(tmp / "vgg.npz"),
  )
  c.tokenizer.dtype = c.discriminator.dtype = "bfloat16"  # the ImageNet setting: bf16 convs, f32 the rest
  task, mesh, rules = tokenizer_job.build_task(c, str(tmp))
  return c, task, _init(task, mesh, rules), jax.jit(task.step)


def test_ema_follows_the_expected_decay(folder, gan_setup):
  c, task, state, step = gan_setup
  decay = c.optim.ema_decay
  batch = _batch(folder)
  p0 = _f64(state.params["generator"])
  for got, want in zip(jax.tree.leaves(_f64(state.ema_params)), jax.tree.leaves(p0)):
    np.testing.assert_array_equal(got, want)
  s1, _ = step(state, task.extras, batch)
  s2, m2 = step(s1, task.extras, batch)
  p1, p2 = _f64(s1.params["generator"]), _f64(s2.params["generator"])
  ema1 = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, p0, p1)
  ema2 = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, ema1, p2)
  for got, want in zip(jax.tree.leaves(_f64(s2.ema_params)), jax.tree.leaves(ema2)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # The EMA lags: ema − raw = decay·(ema_prev − raw), here nonzero.
  diffs = [np.abs(e - r).max() for e, r in zip(jax.tree.leaves(_f64(s2.ema_params)), jax.tree.leaves(p2))]
  assert max(diffs) > 0
  # Every term is live and float32 whatever the compute dtype; the discriminator started at step 0 and
  # moved; LeCam's EMAs moved off 0.
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((m2, s2.params, s2.ema_params, s2.lecam)))
  assert float(m2["gan_active"]) == 1.0 and float(m2["d_loss"]) > 0
  for name in ("g_adv", "g_perceptual", "d_r1", "d_lecam"):
    assert float(m2[name]) > 0, name
  assert float(m2["g_entropy"]) != 0
  d0, d2 = _f64(state.params["discriminator"]), _f64(s2.params["discriminator"])
  assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(d2)))
  assert float(s2.lecam.ema_real) != 0.0 and float(s2.lecam.ema_fake) != 0.0


def test_nonfinite_step_changes_nothing(folder, gan_setup):
  _, task, state, step = gan_setup
  batch = _batch(folder)
  bad = {"image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
  new, metrics = step(state, task.extras, bad)
  assert float(metrics["finite"]) == 0.0
  assert int(new.step) == 1 and int(new.first_nonfinite_step) == 0 and int(new.skipped_steps) == 1
  keep = lambda s: (s.params, s.g_opt_state, s.d_opt_state, s.ema_params, s.lecam, s.code_usage)
  for a, b in zip(jax.tree.leaves(keep(state)), jax.tree.leaves(keep(new))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_tiny_fashion_config_lowers_reconstruction_loss(folder, tmp_path):
  # The real tiny architecture (32x32 -> 8x8 tokens, 256 codes) on one fixed batch.
  c = tokenizer_fashion_mnist.get_config("steps=200,batch=8")
  c.input.name = f"folder:{folder}"
  c.input.num_workers = 1
  c.evals = ml_collections.ConfigDict()
  task, mesh, rules = tokenizer_job.build_task(c, str(tmp_path))
  assert task.evaluators == ()
  state = _init(task, mesh, rules)
  step = jax.jit(task.step, donate_argnums=(0,))
  batch = _batch(folder, size=32)
  losses = []
  for _ in range(15):
    state, metrics = step(state, task.extras, batch)
    losses.append(float(metrics["g_rec"]))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_restart_dead_codes_by_hand():
  codebook = jnp.asarray(np.arange(8, dtype=np.float32).reshape(4, 2))
  z = jnp.asarray(100 + np.arange(12, dtype=np.float32).reshape(2, 3, 2))  # 6 latents, all >= 100
  usage = jnp.asarray([0.5, 0.001, 0.3, 0.0])  # dead below 0.03 / 4 = 0.0075: codes 1 and 3
  new, dead = tokenizer_step.restart_dead_codes(codebook, usage, z, jax.random.key(0), jnp.asarray(True), 0.03)
  new = np.asarray(new)
  np.testing.assert_array_equal(np.asarray(dead), [False, True, False, True])
  np.testing.assert_array_equal(new[[0, 2]], np.asarray(codebook)[[0, 2]])
  latents = {tuple(r) for r in np.asarray(z).reshape(-1, 2)}
  assert tuple(new[1]) in latents and tuple(new[3]) in latents
  same, dead = tokenizer_step.restart_dead_codes(codebook, usage, z, jax.random.key(0), jnp.asarray(False), 0.03)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(codebook))
  assert not np.asarray(dead).any()


def test_codebook_lr_multiplier_scales_only_the_codebook():
  updates = {"quantize": {"embedding": {"embedding": jnp.ones((4, 2))}}, "encoder": {"w": jnp.ones(3)}}
  out, _ = tokenizer_job.scale_codebook_updates(10.0).update(updates, optax.EmptyState())
  np.testing.assert_array_equal(np.asarray(out["quantize"]["embedding"]["embedding"]), 10.0)
  np.testing.assert_array_equal(np.asarray(out["encoder"]["w"]), 1.0)


def _restore(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "default"))


# Heavy: the loop's bitwise resume is checked in CI on pretraining; the quickstart tests consume tokenizer exports.
@pytest.mark.heavy
def test_resume_is_bitwise_identical_and_export_is_consumable(folder, tmp_path, monkeypatch):
  monkeypatch.setattr(tokenizer_step, "train_step", chex.assert_max_traces(tokenizer_step.train_step, n=3))

  # R1 and the perceptual net are covered by `gan_setup`; here: D from step 1 (both branches), LeCam, entropy
  # and codebook restarts every 2 steps (so the rng and the usage EMA matter).
  def config(steps):
    c = small_config(folder, steps=steps, gan_start=1, lecam_weight=0.1, entropy_weight=0.1)
    c.codebook.restart_every = 2
    return c

  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  c4 = config(4)
  tokenizer_job.train_and_evaluate(c4, straight)
  tokenizer_job.train_and_evaluate(config(2), resumed)
  assert int(_restore(resumed, 2)["step"]) == 2
  tokenizer_job.train_and_evaluate(c4, resumed)  # resumes from step 2

  a, b = _restore(straight, 4), _restore(resumed, 4)
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  keys = {jax.tree_util.keystr(p[:1]) for p, _ in leaves_a}
  assert {
    "['params']",
    "['g_opt_state']",
    "['d_opt_state']",
    "['ema_params']",
    "['lecam']",
    "['rng']",
    "['code_usage']",
  } <= keys
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  # The run was a real GAN run: D trained from step 1 (its Adam counted 3 updates), LeCam moved.
  assert float(a["lecam"]["ema_real"]) != 0.0
  counts = [
    np.asarray(v)
    for p, v in leaves_a
    if "d_opt_state" in jax.tree_util.keystr(p) and "count" in jax.tree_util.keystr(p)
  ]
  assert counts and all(int(cnt) == 3 for cnt in counts)

  # Export: params-only EMA, readable by MAGE pretraining's loader.
  variables, meta = params_io.load(os.path.join(straight, "params"))
  assert meta["kind"] == "tokenizer" and meta["tokenizer"]["codebook_size"] == 16
  for x, y in zip(jax.tree.leaves(variables["tokenizer"]["params"]), jax.tree.leaves(a["ema_params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  pre = ml_collections.ConfigDict(
    {
      "tokenizer": {"init": os.path.join(straight, "params")},
      "input": {"image_size": 16},
      "model": {"dtype": "float32"},
      "seed": 0,
    }
  )
  tokenizer, tok_vars = builders.load_tokenizer(pre)
  test_files = sorted((folder / "test").iterdir())
  test = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in test_files]) / 255.0
  ids = tokenizer.apply(tok_vars, jnp.asarray(test, jnp.float32), method=VQGAN.encode_to_ids)
  assert ids.shape == (len(test_files), 64) and int(ids.max()) < 16

  # Held-out metrics of the EMA weights, recomputed here in float64 from the exported params.
  metrics = json.loads((tmp_path / "straight" / reconstruction.METRICS_FILE).read_text())
  recon = np.clip(np.asarray(tokenizer.apply(tok_vars, jnp.asarray(test, jnp.float32))[0], np.float64), 0, 1)
  mse = ((recon - test) ** 2).mean(axis=(1, 2, 3))
  assert metrics["step"] == 4 and metrics["num_examples"] == len(test_files)
  assert metrics["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), abs=1e-3)
  assert metrics["ssim"] == pytest.approx(_ssim_float64(test, recon).mean(), abs=1e-4)
  used = np.unique(np.asarray(ids))
  assert metrics["codebook_usage"] == pytest.approx(len(used) / 16)
  png = Image.open(tmp_path / "straight" / "reconstructions" / "step_0000004.png")
  assert png.size == (2 + 4 * (2 * 16 + 2), 2 + 1 * (16 + 2))  # 4 [original|reconstruction] pairs, one row


def test_config_errors_and_perceptual_status(folder, tmp_path, caplog):
  c = small_config(folder)
  c.loss.perceptual_weight = 0.1
  with caplog.at_level(logging.INFO):
    tokenizer_job.build_task(c, str(tmp_path))
  assert "perceptual loss disabled: no weights file" in caplog.text
  assert "training WITHOUT the perceptual term" in caplog.text
  c.loss.perceptual_weights = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    tokenizer_job.build_task(c, str(tmp_path))
  with pytest.raises(ValueError, match="unknown config.loss keys"):
    config_views.from_config(tokenizer_step.LossConfig, {"rec_weigth": 1.0}, "config.loss")
  with pytest.raises(ValueError, match="rec_type"):
    tokenizer_step.LossConfig(rec_type="huber")
  c = small_config(folder)
  c.input.image_size = 17
  with pytest.raises(ValueError, match="not a multiple of its downsampling factor 2"):
    builders.tokenizer_config(c.tokenizer, c.input.image_size)
  c = small_config(folder)
  c.tokenizer.num_groups = 3
  with pytest.raises(ValueError, match="num_groups"):
    builders.tokenizer_config(c.tokenizer, c.input.image_size)


def test_configs_sizes():
  from configs import tokenizer_imagenet

  big = tokenizer_imagenet.get_config()
  cfg = builders.tokenizer_config(big.tokenizer, big.input.image_size)
  assert (cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels, cfg.codebook_size) == (
    128,
    (1, 1, 2, 2, 4),
    2,
    256,
    1024,
  )
  assert (big.optim.b1, big.optim.b2, big.optim.lr, big.optim.ema_decay) == (0.0, 0.99, 1e-4, 0.999)
  assert big.loss.perceptual_weights == "" and big.tokenizer.dtype == "bfloat16"
  tiny = builders.tokenizer_config(tokenizer_fashion_mnist.get_config().tokenizer, 32)
  assert tiny.resolution == 32 and tiny.token_grid == 8


@pytest.mark.parametrize(
  "num_examples,final_examples,want",
  [(100, 0, (100, None)), (100, 30, (100, 30)), (0, 30, (None, 30)), (0, 0, (None, None))],
)
def test_eval_reads_its_configured_images(num_examples, final_examples, want):
  """Periodic evals read num_examples images and the eval at the last step final_examples (0: all)."""
  evaluator = object.__new__(reconstruction.Evaluator)
  evaluator.total_steps, evaluator.num_examples, evaluator.final_examples = 10, num_examples, final_examples
  limits = []
  evaluator.evaluate = lambda params, png, metrics_file, header, limit=None: limits.append(limit)
  evaluator.params_of = lambda state: state.ema_params
  state = types.SimpleNamespace(ema_params=None)
  evaluator(state, 5)
  evaluator(state, 10)
  assert tuple(limits) == want
