"""Tests for the MAGE-C and class-conditional jobs (mage_jax/jobs) and mage_jax.models.class_cond."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import apply_overrides
from mage_jax.generation import sampling
from mage_jax.jobs import class_cond, mage_c
from mage_jax.models.class_cond import ClassCondMAGE, class_cond_config, config_from_meta
from mage_jax.models.mage import MAGE, config_for
from mage_jax.objectives import masking
from mage_jax.train import config_views, optim, params_io, steps

N_TOKENS, CODEBOOK, VOCAB, FAKE, MASK = 16, 32, 40, 33, 39


def _base_config(**kw):
  sizes = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
  return config_for(
    "tiny",
    **{
      **sizes,
      "num_tokens": N_TOKENS,
      "max_position_embeddings": N_TOKENS + 1,
      "codebook_size": CODEBOOK,
      "vocab_size": VOCAB,
      "fake_class_id": FAKE,
      "mask_id": MASK,
      "dropout": 0.0,
      "attn_dropout": 0.0,
      **kw,
    },
  )


def _ids(seed, b):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CODEBOOK, (b, N_TOKENS)), jnp.int32)


def _plan(b):
  return masking.sample_plan(jax.random.key(0), b, N_TOKENS)[0]


# ------------------------------------------------------------------------------------------------------------
# Views.


def test_pipeline_views_are_independent_crops_and_view_zero_is_the_single_view_draw(image_folder):
  from mage_jax.data import pipeline

  cfg = dict(name=f"folder:{image_folder}", batch_size=8, image_size=16, augment="pretrain")
  single = next(pipeline.train_iterator(cfg, seed=3))["image"]
  multi = next(pipeline.train_iterator({**cfg, "views": 2}, seed=3))["image"]
  assert single.shape == (8, 16, 16, 3) and multi.shape == (8, 2, 16, 16, 3)
  np.testing.assert_array_equal(multi[:, 0], single)  # K = 1 runs keep their augmentation draws
  differ = np.abs(multi[:, 0] - multi[:, 1]).max(axis=(1, 2, 3)) > 1e-3
  assert differ.all()  # each image's two views are different crops
  with pytest.raises(ValueError, match="views"):
    pipeline.InputConfig.from_config({**cfg, "views": 2, "augment": "none"})


def test_color_jitter_grayscale_always():
  cfg = mage_c.ColorAugment(grayscale_prob=1.0)
  image = jnp.asarray(np.random.default_rng(1).uniform(size=(8, 8, 3)), jnp.float32)
  out = np.asarray(mage_c.color_jitter(jax.random.key(0), image, cfg))
  gray = np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114])
  for c in range(3):
    np.testing.assert_allclose(out[..., c], gray, atol=1e-5)


def test_bad_view_and_contrastive_configs_are_rejected():
  with pytest.raises(ValueError, match="jitter_prob"):
    mage_c.ColorAugment(jitter_prob=1.5)
  with pytest.raises(ValueError, match="BatchNorm"):
    mage_c.ContrastiveConfig(norm="batch")
  with pytest.raises(ValueError, match="unknown config.contrastive keys"):
    config_views.from_config(mage_c.ContrastiveConfig, {"lambda": 1.0}, "config.contrastive")


# ------------------------------------------------------------------------------------------------------------
# MAGE-C.


def _ref_masked_ce(logits, ids, masked, ls=0.1):
  """Float64 smoothed CE over the first CODEBOOK logits, averaged over masked tokens."""
  z = np.asarray(logits, np.float64)[:, 1:, :CODEBOOK]
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(ids)[..., None], -1)[..., 0]
  per = (1 - ls) * nll - ls * logp.mean(-1)
  m = np.asarray(masked, np.float64)
  return float((per * m).sum() / m.sum())


def _ref_nt_xent(z1, z2, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  sims = z @ z.T / t
  n2 = len(z)
  out = []
  for i in range(n2):
    others = [j for j in range(n2) if j != i]
    out.append(np.log(np.exp(sims[i, others]).sum()) - sims[i, (i + n2 // 2) % n2])
  return float(np.mean(out))


@pytest.mark.parametrize("pool", ["mean", "mean_visible"])
def test_mage_c_loss_is_rec_plus_lambda_times_nt_xent(pool):
  b, lam, temp = 4, 0.7, 0.3
  model = MAGE(_base_config())
  cfg = mage_c.ContrastiveConfig(lam=lam, temperature=temp, pool=pool, hidden_dim=24, out_dim=8)
  head = cfg.head()
  params = nn.unbox(
    {
      "model": model.init(jax.random.key(0), _ids(0, 1), _plan(1))["params"],
      "projection_head": head.init(jax.random.key(1), jnp.zeros((1, 32)))["params"],
    }
  )
  ids = _ids(1, 2 * b)
  rng = jax.random.key(5)
  masking_cfg = dict(min_ratio=0.5, max_ratio=1.0, mu=0.55, std=0.25, drop_ratio=0.5)
  loss, aux = jax.jit(
    lambda p, i, r: mage_c.mage_c_loss(
      p, i, r, model=model, head=head, cfg=cfg, masking_cfg=masking_cfg, label_smoothing=0.1
    )
  )(params, ids, rng)

  # Independent recomputation: the same plan, the model's outputs, float64 reductions.
  plan, _ = masking.sample_plan(jax.random.fold_in(rng, 0), 2 * b, N_TOKENS, **masking_cfg)
  logits, out = jax.jit(lambda p: model.apply({"params": p}, ids, plan, True))(params["model"])
  rec = _ref_masked_ce(logits, ids, plan.masked)
  enc = np.asarray(out["encoded"], np.float64)
  if pool == "mean":
    pooled = enc[:, 1:].mean(1)
  else:
    keep = np.asarray(plan.keep_idx)[:, 1:] - 1
    visible = ~np.take_along_axis(np.asarray(plan.masked), keep, 1)
    pooled = np.stack(
      [enc[i, 1:][visible[i]].mean(0) if visible[i].any() else np.zeros(enc.shape[-1]) for i in range(2 * b)]
    )
  z = np.asarray(jax.jit(head.apply)({"params": params["projection_head"]}, jnp.asarray(pooled, jnp.float32)))
  con = _ref_nt_xent(z[:b], z[b:], temp)
  np.testing.assert_allclose(float(aux["rec_loss"]), rec, rtol=1e-5)
  np.testing.assert_allclose(float(aux["con_loss"]), con, rtol=1e-4)
  np.testing.assert_allclose(float(loss), rec + lam * con, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Class-conditional.


def _cc_model(num_classes=4, combine="token"):
  return ClassCondMAGE(class_cond_config(_base_config(), num_classes=num_classes, class_combine=combine))


def _cc_params(model, seed=0):
  return nn.unbox(model.init(jax.random.key(seed), _ids(0, 1), _plan(1), jnp.zeros((1,), jnp.int32)))["params"]


def _is_encoder(path):
  return path.split("/")[0] in ("token_emb", "norm") or path.startswith("blocks_")


def test_class_cond_encoder_gets_exactly_zero_gradient_and_never_moves():
  model = _cc_model()
  params = _cc_params(model)
  ids, labels = _ids(2, 8), jnp.arange(8) % 4
  grads = jax.jit(
    jax.grad(
      lambda p: class_cond.class_cond_loss(
        p, ids, labels, jax.random.key(1), model=model, masking_cfg={}, label_smoothing=0.1
      )[0]
    )
  )(params)
  flat = {optim.path_str(p): np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  encoder = [k for k in flat if _is_encoder(k)]
  assert len(encoder) >= 10 and all(np.all(flat[k] == 0) for k in encoder)
  for k in ("class_emb/embedding", "decoder_embed/kernel", "decoder_blocks_0/attn/qkv/kernel", "mlm_layer/bias"):
    assert np.any(flat[k] != 0), k

  # With weight decay, only the frozen predicate keeps the encoder bit-identical through an update.
  tx = optim.pretrain_optimizer(
    lr=1e-2, total_steps=10, warmup_steps=0, weight_decay=0.5, frozen=class_cond.ENCODER_PARAM_PATTERNS
  )
  state = steps.TrainState.create(params, tx, jax.random.key_data(jax.random.key(0)))
  new, metrics = jax.jit(
    lambda s: class_cond.class_cond_update(s, ids, labels, model=model, tx=tx, masking_cfg={}, label_smoothing=0.1)
  )(state)
  assert np.isfinite(float(metrics["loss"]))
  before = {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  after = {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(new.params)[0]}
  for k in before:
    if _is_encoder(k):
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    else:
      assert np.any(after[k] != before[k]), k


def test_encoder_patterns_freeze_exactly_the_encoder_in_loop_and_scan_layouts():
  names = [
    "token_emb",
    "blocks_0",
    "blocks_11",
    "blocks",
    "norm",
    "decoder_embed",
    "decoder_blocks_0",
    "decoder_blocks",
    "decoder_norm",
    "decoder_pos_embed_learned",
    "mlm_layer",
    "class_emb",
  ]
  tree = {n: {"kernel": np.zeros(2)} for n in names}
  trainable = optim.trainable_mask(tree, class_cond.ENCODER_PARAM_PATTERNS)
  assert {n for n in names if not trainable[n]["kernel"]} == {"token_emb", "blocks_0", "blocks_11", "blocks", "norm"}


@pytest.mark.parametrize("combine", ["token", "add"])
def test_class_cond_logits_depend_on_label_and_guidance_formula(combine):
  model = _cc_model(combine=combine)
  params = _cc_params(model, seed=combine == "add")
  tokens = _ids(3, 2).at[:, ::2].set(MASK)

  @jax.jit
  def all_logits(params):
    f = lambda labels, w=None: class_cond.class_cond_logits_fn(model, params, labels, w)(tokens)
    one = jnp.array([1, 1])
    return f(one), f(jnp.array([2, 2])), f(None), f(one, 0.0), f(one, 2.0)

  cond, other, uncond, w0, w2 = (np.asarray(x, np.float64) for x in all_logits(params))
  assert cond.shape == (2, N_TOKENS, CODEBOOK)  # sampling reads the real ids only
  assert np.abs(cond - other).max() > 1e-4 and np.abs(cond - uncond).max() > 1e-4
  np.testing.assert_allclose(w0, cond, atol=1e-6)  # guidance-free default
  np.testing.assert_allclose(w2, uncond + 3.0 * (cond - uncond), atol=1e-4)


@pytest.mark.slow
def test_class_cond_memorises_one_sequence_per_class():
  num_classes = 4
  model = _cc_model(num_classes)
  rng = np.random.default_rng(7)
  targets = jnp.asarray(rng.integers(0, CODEBOOK, (num_classes, N_TOKENS)), jnp.int32)
  ids, labels = jnp.tile(targets, (2, 1)), jnp.tile(jnp.arange(num_classes), 2)
  params = _cc_params(model)
  # A pretrained MAGE's (frozen) token table has a useful scale; at the N(0, 0.02) init the tied MLM head's
  # logits are ~0.1 and learning them takes thousands of steps, so stand in for pretraining with std 0.2.
  params["token_emb"]["word_embeddings"]["embedding"] *= 10.0
  steps_ = 600
  tx = optim.pretrain_optimizer(
    lr=1e-2, total_steps=steps_, warmup_steps=5, weight_decay=0.0, frozen=class_cond.ENCODER_PARAM_PATTERNS
  )
  state = steps.TrainState.create(params, tx, jax.random.key_data(jax.random.key(0)))

  @jax.jit
  def train_n(state):
    def body(_, s):
      return class_cond.class_cond_update(s, ids, labels, model=model, tx=tx, masking_cfg={}, label_smoothing=0.1)[0]

    return jax.lax.fori_loop(0, steps_, body, state)

  state = train_n(state)

  @jax.jit
  def generate(params):
    start = jnp.full((num_classes, N_TOKENS), MASK, jnp.int32)
    fn = class_cond.class_cond_logits_fn(model, params, jnp.arange(num_classes))
    return sampling.decode(
      jax.random.key(0),
      start,
      fn,
      num_steps=4,
      choice_temperature=0.0,
      mask_id=MASK,
      codebook_size=CODEBOOK,
      sample_temperature=0.0,
    )

  np.testing.assert_array_equal(np.asarray(generate(state.params)), np.asarray(targets))


# ------------------------------------------------------------------------------------------------------------
# End to end: configs, checkpoints read by generation and probing.


@pytest.mark.parametrize(
  "module,arg",
  [
    ("mage_c_imagenet", "variant=B"),
    ("mage_c_imagenet", "variant=L,runlocal"),
    ("mage_c_fashion_mnist", None),
    ("mage_c_fashion_mnist", "steps=10,batch=8"),
    ("class_cond_fashion_mnist", "init=/some/params"),
    ("class_cond_imagenet", "variant=L,init=/x,runlocal"),
  ],
)
def test_configs_build(module, arg):
  import importlib

  config = importlib.import_module(f"configs.{module}").get_config(arg)
  assert config.mode in ("mage_c", "class_cond")
  if config.mode == "mage_c":
    mage_c.ContrastiveConfig(**config.contrastive)
    config_views.from_config(mage_c.ColorAugment, config.views, "config.views")
    assert config.input.views == 2 and config.input.augment == "pretrain"
  else:
    assert config.model_init and config.class_cond.num_classes in (10, 1000)


def _variant_config(module, arg, image_folder, **overrides):
  import importlib

  config = importlib.import_module(f"configs.{module}").get_config(arg)
  config.input.name = f"folder:{image_folder}"
  config.input.image_size = 16
  config.log_every_steps = 1
  config.checkpoint_every_steps = 100
  config.async_checkpoints = False
  return apply_overrides(config, **overrides)


def test_class_cond_refuses_missing_or_mismatched_init(image_folder, tmp_path):
  with pytest.raises(ValueError, match="model_init"):
    class_cond.train_and_evaluate(
      _variant_config("class_cond_fashion_mnist", "steps=2,batch=8", image_folder), str(tmp_path / "a")
    )
  meta = {"model": {**_base_config().__dict__, "embed_dim": 48}}
  with pytest.raises(ValueError, match="embed_dim: config 32 vs checkpoint 48"):
    class_cond.check_architecture(_base_config(), meta, "ckpt")
  with pytest.raises(ValueError, match="class-unconditional"):
    config_from_meta({"model": _base_config().__dict__})


@pytest.mark.heavy  # the MAGE-C and class-conditional steps' tests above run in CI; this chains both jobs
def test_mage_c_then_class_cond_end_to_end(image_folder, tmp_path):
  # MAGE-C: 3 steps on the 8-device mesh, exported in the pretraining layout + the head.
  mc = _variant_config("mage_c_fashion_mnist", "steps=3,batch=8", image_folder)
  metrics = mage_c.train_and_evaluate(mc, str(tmp_path / "mc"))
  np.testing.assert_allclose(metrics["loss"], metrics["rec_loss"] + 0.1 * metrics["con_loss"], rtol=1e-5)
  variables, meta = params_io.load(str(tmp_path / "mc" / "params"))
  assert set(variables) == {"model", "tokenizer", "projection_head"} and meta["mage_c"]["lam"] == 0.1
  model, tokenizer = params_io.models_from_meta(meta)  # what generation / probing do
  feats = model.apply(
    variables["model"], jnp.zeros((2, model.config.num_tokens), jnp.int32), method=MAGE.encoder_features
  )
  assert feats.shape == (2, 1 + model.config.num_tokens, model.config.embed_dim)

  # Class-conditional fine-tuning from that checkpoint (2 classes in the image folder).
  cc = _variant_config(
    "class_cond_fashion_mnist",
    f"steps=2,batch=8,init={tmp_path / 'mc' / 'params'}",
    image_folder,
    **{"class_cond.num_classes": 2, "class_cond.grid_per_class": 3, "class_cond.grid_num_steps": 4},
  )
  class_cond.train_and_evaluate(cc, str(tmp_path / "cc"))
  out_dir = str(tmp_path / "cc" / "params")
  variables, meta = params_io.load(out_dir)
  assert meta["class_cond"] is True and meta["model"]["num_classes"] == 2
  assert variables["model"]["params"]["class_emb"]["embedding"].shape == (3, 64)
  before, _ = params_io.load(str(tmp_path / "mc" / "params"))
  np.testing.assert_array_equal(
    variables["model"]["params"]["blocks_0"]["attn"]["qkv"]["kernel"],
    before["model"]["params"]["blocks_0"]["attn"]["qkv"]["kernel"],
  )  # frozen
  grid = np.asarray(Image.open(tmp_path / "cc" / "class_grid.png"))
  assert grid.shape == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2, 3)  # 2 rows (classes) x 3 samples, pad 2
  # The generation binary's sampler, with the class id.
  cc_model, cc_tok = params_io.models_from_meta(meta)  # what the generation binary does
  assert isinstance(cc_model, ClassCondMAGE)
  images = next(sampling.generate_images(cc_model, cc_tok, variables, jax.random.key(0), 8, 8, num_steps=2, class_id=1))
  assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
