"""Tests for mage_jax.train.optim against hand-written float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mage_jax.train import lars, optim

SDS = jax.ShapeDtypeStruct
F32 = jnp.float32


def _flat(tree):
  return {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------
# Schedule.


def test_scaled_lr():
  assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
  assert optim.scaled_lr(2.5e-4, 1024) == pytest.approx(1e-3)
  with pytest.raises(ValueError, match="global_batch"):
    optim.scaled_lr(1e-3, 0)


def test_warmup_cosine_schedule_values():
  base, mn, total, warm = 2.4e-3, 1e-5, 1000, 100
  s = optim.warmup_cosine_schedule(base, total, warm, mn)
  expect = {
    0: 0.0,
    50: base * 50 / 100,
    100: base,  # warm-up end: cosine at progress 0.
    550: mn + (base - mn) * 0.5,  # middle of the cosine span.
    325: mn + (base - mn) * 0.5 * (1 + math.cos(math.pi * 0.25)),
    1000: mn,
    5000: mn,  # held after the end.
  }
  for step, want in expect.items():
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-6, atol=1e-12, err_msg=f"step {step}")
  # Under jit with a traced step as well.
  np.testing.assert_allclose(float(jax.jit(s)(jnp.int32(550))), expect[550], rtol=1e-6)


def test_warmup_cosine_schedule_fractional_epoch_equivalence():
  # Reference: lr(t) with t = epoch + it / iters_per_epoch (util/lr_sched.py).
  iters, epochs, warm_ep, base = 7, 5, 2, 1.0
  s = optim.warmup_cosine_schedule(base, epochs * iters, warm_ep * iters)
  for step in range(epochs * iters):
    t = step / iters
    if t < warm_ep:
      want = base * t / warm_ep
    else:
      want = base * 0.5 * (1 + math.cos(math.pi * (t - warm_ep) / (epochs - warm_ep)))
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("total,warmup,min_lr", [(300, 30, 0.0), (144, 16, 0.0), (1000, 0, 1e-6), (50, 50, 0.0)])
def test_warmup_cosine_schedule_float64_agreement(total, warmup, min_lr):
  # float32 schedule vs float64 util/lr_sched at EVERY step, relative (no absolute slack): the decay's tail,
  # where lr is tiny, is where a float32 1 + cos(.) loses its digits.
  base = 1.25e-3
  s = jax.jit(optim.warmup_cosine_schedule(base, total, warmup, min_lr))
  for step in range(total):
    if step < warmup:
      want = base * step / warmup
    else:
      want = min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    np.testing.assert_allclose(float(s(jnp.int32(step))), want, rtol=1e-6, atol=0, err_msg=f"step {step}")


def test_warmup_cosine_schedule_bad_args():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.warmup_cosine_schedule(1.0, 10, 11)
  with pytest.raises(ValueError, match="total_steps"):
    optim.warmup_cosine_schedule(1.0, 0, 0)


# ---------------------------------------------------------------------------
# Weight-decay mask.


def _mage_tree(d=8, depth=2, vocab=20, seq=5, scanned=False):
  def dense(i, o):
    return {"kernel": SDS((i, o), F32), "bias": SDS((o,), F32)}

  def ln(n):
    return {"scale": SDS((n,), F32), "bias": SDS((n,), F32)}

  def block():
    return {
      "norm1": ln(d),
      "attn": {"qkv": dense(d, 3 * d), "proj": dense(d, d)},
      "norm2": ln(d),
      "mlp": {"fc1": dense(d, 4 * d), "fc2": dense(4 * d, d)},
    }

  def stack(n):
    return jax.tree.map(lambda x: SDS((n,) + x.shape, x.dtype), block())

  tree = {
    "token_emb": {
      "word_embeddings": {"embedding": SDS((vocab, d), F32)},
      "position_embeddings": {"embedding": SDS((seq, d), F32)},
      "LayerNorm": ln(d),
    },
    "norm": ln(d),
    "decoder_embed": dense(d, d),
    "decoder_pos_embed_learned": SDS((1, seq, d), F32),
    "decoder_norm": ln(d),
    "mlm_layer": {"fc": dense(d, d), "ln": ln(d), "bias": SDS((1, seq, vocab), F32)},
  }
  if scanned:
    tree["blocks"] = stack(depth)
    tree["decoder_blocks"] = stack(depth)
  else:
    for i in range(depth):
      tree[f"blocks_{i}"] = block()
      tree[f"decoder_blocks_{i}"] = block()
  return tree


@pytest.mark.parametrize("scanned", [False, True])
def test_weight_decay_mask_mage_tree(scanned):
  mask = _flat(optim.weight_decay_mask(_mage_tree(scanned=scanned)))
  blk = "blocks" if scanned else "blocks_1"
  dec = "decoder_blocks" if scanned else "decoder_blocks_0"
  decayed = [
    "token_emb/word_embeddings/embedding",
    "token_emb/position_embeddings/embedding",
    "decoder_pos_embed_learned",
    "decoder_embed/kernel",
    "mlm_layer/fc/kernel",
    f"{blk}/attn/qkv/kernel",
    f"{blk}/mlp/fc2/kernel",
    f"{dec}/attn/proj/kernel",
  ]
  exempt = [
    "token_emb/LayerNorm/scale",
    "token_emb/LayerNorm/bias",
    "norm/scale",
    "decoder_embed/bias",
    "mlm_layer/bias",
    "mlm_layer/ln/scale",
    "decoder_norm/bias",
    f"{blk}/norm1/scale",
    f"{blk}/norm2/bias",
    f"{blk}/attn/qkv/bias",
    f"{dec}/mlp/fc1/bias",
    f"{dec}/norm1/scale",
  ]
  for k in decayed:
    assert mask[k] is True, k
  for k in exempt:
    assert mask[k] is False, k


def test_weight_decay_mask_counts():
  # 2 kernels per attn + 2 per mlp = 4 per block; 2 enc + 2 dec blocks.
  for scanned, n_blocks in [(False, 4), (True, 2)]:
    mask = _flat(optim.weight_decay_mask(_mage_tree(scanned=scanned)))
    # 3 embeddings/pos + decoder_embed/kernel + mlm fc kernel = 5.
    assert sum(mask.values()) == 5 + 4 * n_blocks


def test_weight_decay_mask_no_decay_names_and_boxed():
  import flax.linen as nn

  params = {
    "pos_embed": jnp.zeros((1, 4, 3)),
    "cls_token": jnp.zeros((1, 1, 3)),
    "head": {"kernel": nn.LogicallyPartitioned(jnp.zeros((3, 2)), ("embed", "vocab")), "bias": jnp.zeros((2,))},
  }
  mask = optim.weight_decay_mask(params, no_decay_names=("pos_embed", "cls_token"))
  assert mask["pos_embed"] is False and mask["cls_token"] is False
  assert mask["head"]["kernel"].value is True
  assert mask["head"]["bias"] is False


# ---------------------------------------------------------------------------
# LARS.


def _lars_numpy(params, grads_seq, lrs, momentum, wd, trust):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k in p:
      dp = np.asarray(grads[k], np.float64)
      if p[k].ndim > 1:
        dp = dp + wd * p[k]
        pn, un = np.linalg.norm(p[k]), np.linalg.norm(dp)
        q = trust * pn / un if (pn > 0 and un > 0) else 1.0
        dp = dp * q
      mu[k] = momentum * mu[k] + dp
      p[k] = p[k] - lr * mu[k]
  return p


def test_lars_two_steps_match_numpy():
  rng = np.random.default_rng(0)
  params = {
    "w": rng.normal(size=(4, 3)).astype(np.float32),
    "b": rng.normal(size=(3,)).astype(np.float32),
    "z": np.zeros((2, 2), np.float32),
  }  # zero norm: trust ratio 1.
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(2)]
  lr_fn = lambda count: 0.5 * (count + 1)  # lr 0.5 then 1.0.
  tx = lars.lars(lr_fn, momentum=0.9, weight_decay=0.1, trust_coefficient=0.1)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  step = jax.jit(tx.update)
  for g in grads_seq:
    upd, state = step(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, upd)
  want = _lars_numpy(params, grads_seq, [0.5, 1.0], 0.9, 0.1, 0.1)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The 1-D leaf is plain momentum SGD: b - 0.5 g0 - 1.0 (0.9 g0 + g1).
  g0, g1 = grads_seq[0]["b"], grads_seq[1]["b"]
  np.testing.assert_allclose(np.asarray(p["b"]), params["b"] - 0.5 * g0 - (0.9 * g0 + g1), rtol=1e-5)


def test_lars_requires_params():
  tx = lars.lars(0.1)
  state = tx.init({"w": jnp.ones((2, 2))})
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones((2, 2))}, state)


def test_probe_optimizer_freezes_backbone():
  params = {"blocks_0": {"kernel": jnp.ones((3, 3))}, "head": {"kernel": jnp.full((3, 2), 0.5), "bias": jnp.zeros(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.probe_optimizer(lr=1.0, total_steps=10, warmup_steps=0, frozen=lambda path: not path.startswith("head"))
  state = tx.init(params)
  upd, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(np.asarray(upd["blocks_0"]["kernel"]), 0.0)
  # Step 0 of a no-warm-up cosine: lr 1; trust ratio 1e-3 * |p| / |g|.
  q = 1e-3 * np.linalg.norm(np.full((3, 2), 0.5)) / np.sqrt(6.0)
  np.testing.assert_allclose(np.asarray(upd["head"]["kernel"]), -q, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(upd["head"]["bias"]), -1.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# Layer-wise lr decay.


def _probe_tree(depth=3, d=4, scanned=False):
  blk = {
    "norm1": {"scale": SDS((d,), F32)},
    "attn": {"qkv": {"kernel": SDS((d, 3 * d), F32), "bias": SDS((3 * d,), F32)}},
  }
  tree = {
    "token_emb": {"word_embeddings": {"embedding": SDS((10, d), F32)}, "LayerNorm": {"scale": SDS((d,), F32)}},
    "fc_norm": {"scale": SDS((d,), F32)},
    "head": {"kernel": SDS((d, 5), F32), "bias": SDS((5,), F32)},
  }
  if scanned:
    tree["blocks"] = jax.tree.map(lambda x: SDS((depth,) + x.shape, F32), blk)
  else:
    tree.update({f"blocks_{i}": blk for i in range(depth)})
  return tree


def test_layerwise_lr_scales_unscanned():
  ld, depth = 0.65, 3
  s = _flat(optim.layerwise_lr_scales(_probe_tree(depth), depth, ld))
  assert s["token_emb/word_embeddings/embedding"] == pytest.approx(ld**4)
  assert s["token_emb/LayerNorm/scale"] == pytest.approx(ld**4)
  assert s["blocks_0/attn/qkv/kernel"] == pytest.approx(ld**3)
  assert s["blocks_1/norm1/scale"] == pytest.approx(ld**2)
  assert s["blocks_2/attn/qkv/bias"] == pytest.approx(ld**1)
  assert s["fc_norm/scale"] == 1.0 and s["head/kernel"] == 1.0


def test_layerwise_lr_scales_scanned():
  ld, depth = 0.75, 3
  s = _flat(optim.layerwise_lr_scales(_probe_tree(depth, scanned=True), depth, ld))
  np.testing.assert_allclose(s["blocks/attn/qkv/kernel"].reshape(-1), [ld**3, ld**2, ld], rtol=1e-6)
  assert s["blocks/attn/qkv/kernel"].shape == (3, 1, 1)
  assert s["blocks/norm1/scale"].shape == (3, 1)
  assert s["token_emb/word_embeddings/embedding"] == pytest.approx(ld**4)
  assert s["head/bias"] == 1.0


def test_layerwise_lr_scales_errors():
  with pytest.raises(ValueError, match="block 3"):
    optim.layerwise_lr_scales(_probe_tree(4), 3, 0.5)
  with pytest.raises(ValueError, match="leading layer axis"):
    optim.layerwise_lr_scales(_probe_tree(4, scanned=True), 3, 0.5)
  with pytest.raises(ValueError, match="layer decay"):
    optim.layerwise_lr_scales(_probe_tree(3), 3, 1.5)


def _materialise(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape).astype(np.float32)) for x in leaves])


def _adamw_numpy(p, gs, lrs, b1, b2, eps, wd, decay_mask, clip=None, lr_scale=None):
  """Torch AdamW (+ optional clip_grad_norm_ and per-param lr scale)."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, (g, lr) in enumerate(zip(gs, lrs), start=1):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    if clip is not None:
      norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
      if norm > clip:
        g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      lr_k = lr * (lr_scale[k] if lr_scale else 1.0)
      if decay_mask[k]:
        p[k] = p[k] * (1 - lr_k * wd)
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
      mhat, vhat = m[k] / (1 - b1**t), v2[k] / (1 - b2**t)
      p[k] = p[k] - lr_k * mhat / (np.sqrt(vhat) + eps)
  return p


def test_pretrain_optimizer_matches_numpy_adamw():
  params = {
    "token_emb": {
      "word_embeddings": {"embedding": jnp.ones((5, 3))},
      "LayerNorm": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
    },
    "blocks_0": {"attn": {"qkv": {"kernel": jnp.full((3, 9), 0.3), "bias": jnp.zeros(9)}}},
    "mlm_layer": {"bias": jnp.zeros((1, 2, 5))},
    "mask_token": jnp.full((1, 1, 3), 0.7),
  }  # unused -> frozen.
  params = _materialise(params, 1)
  rng = np.random.default_rng(2)
  # Step 1 gradients are large (clipped at 3.0), steps 2-3 small (not).
  gs = [
    jax.tree.map(lambda x, s=s: jnp.asarray(s * rng.normal(size=x.shape).astype(np.float32)), params)
    for s in (5.0, 0.01, 0.02)
  ]
  lr, total, warm = 0.1, 10, 2
  tx = optim.pretrain_optimizer({"lr": lr, "total_steps": total, "warmup_steps": warm}, frozen=[r"^mask_token$"])
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  p = params
  for g in gs:
    upd, state = step(g, state, p)
    p = optax.apply_updates(p, upd)
  sched = optim.warmup_cosine_schedule(lr, total, warm)
  lrs = [float(sched(i)) for i in range(3)]
  assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.05)
  fp = _flat(params)
  mask = {k: (np.ndim(v) >= 2 and not k.endswith("bias")) for k, v in fp.items()}
  trainable = {k: v for k, v in fp.items() if k != "mask_token"}
  want = _adamw_numpy(
    trainable,
    [{k: v for k, v in _flat(g).items() if k != "mask_token"} for g in gs],
    lrs,
    0.9,
    0.95,
    1e-8,
    0.05,
    mask,
    clip=3.0,
  )
  got = _flat(p)
  for k in trainable:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(np.asarray(got["mask_token"]), np.asarray(params["mask_token"]))
  assert mask["token_emb/word_embeddings/embedding"]
  assert not mask["mlm_layer/bias"]


def test_finetune_optimizer_matches_numpy_and_scan():
  depth, ld, lr = 2, 0.5, 0.01
  tree = _probe_tree(depth)
  params = _materialise(tree, 3)
  rng = np.random.default_rng(4)
  gs = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), params) for _ in range(2)]
  cfg = optim.FinetuneOptim(lr=lr, total_steps=4, warmup_steps=0, depth=depth, layer_decay=ld, min_lr=0.0)
  tx = optim.finetune_optimizer(cfg)
  state, p = tx.init(params), params
  for g in gs:
    upd, state = jax.jit(tx.update)(g, state, p)
    p = optax.apply_updates(p, upd)
  fp = _flat(params)
  mask = {k: np.ndim(v) >= 2 for k, v in fp.items()}
  scale = {
    k: (
      ld**3
      if k.startswith("token_emb")
      else ld**2
      if k.startswith("blocks_0")
      else ld
      if k.startswith("blocks_1")
      else 1.0
    )
    for k in fp
  }
  sched = cfg.schedule()
  want = _adamw_numpy(
    fp, [_flat(g) for g in gs], [float(sched(i)) for i in range(2)], 0.9, 0.999, 1e-8, 0.05, mask, lr_scale=scale
  )
  got = _flat(p)
  for k in fp:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-7, err_msg=k)

  # Scanned layout: stack the per-block params/grads; same result per slice.
  def to_scan(t):
    t = dict(t)
    blocks = [t.pop(f"blocks_{i}") for i in range(depth)]
    t["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return t

  tx_s = optim.finetune_optimizer(cfg)
  ps = to_scan(params)
  state_s = tx_s.init(ps)
  for g in gs:
    upd, state_s = jax.jit(tx_s.update)(to_scan(g), state_s, ps)
    ps = optax.apply_updates(ps, upd)
  want_s = _flat(to_scan(p))
  for k, v in _flat(ps).items():
    np.testing.assert_allclose(np.asarray(v), np.asarray(want_s[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_optimizer_config_errors_and_configdict():
  with pytest.raises(ValueError, match="unknown PretrainOptim keys"):
    optim.pretrain_optimizer({"lr": 1.0, "total_steps": 2, "warmup_steps": 1, "wd": 0.1})
  with pytest.raises(ValueError, match="missing required keys"):
    optim.finetune_optimizer(lr=1.0, total_steps=2, warmup_steps=1)
  with pytest.raises(ValueError, match="bare string"):
    optim.trainable_mask({"a": jnp.ones(2)}, "a")
  cfg = ml_collections.ConfigDict({"lr": 1e-3, "total_steps": 10, "warmup_steps": 1})
  tx = optim.pretrain_optimizer(cfg, weight_decay=0.0)
  params = {"w": {"kernel": jnp.ones((2, 2))}}
  upd, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(upd["w"]["kernel"]), 0.0)  # lr 0.


def test_trainable_mask():
  params = {"blocks_0": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
  m = optim.trainable_mask(params, [r"^blocks_"])
  assert m == {"blocks_0": {"kernel": False}, "head": {"kernel": True}}
  assert optim.trainable_mask(params, None)["blocks_0"]["kernel"] is True


@pytest.mark.parametrize("scanned", [False, True])
def test_finetune_optimizer_frozen_subtree(scanned):
  # Freezing token_emb: zero updates there, no moments for it, and the other
  # params still get their layer-decayed update.
  params = _materialise(_probe_tree(2, scanned=scanned), 5)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.finetune_optimizer(
    lr=1.0, total_steps=4, warmup_steps=0, depth=2, layer_decay=0.5, weight_decay=0.0, frozen=[r"^token_emb/"]
  )
  state = jax.jit(tx.init)(params)
  n_moment_leaves = len(jax.tree.leaves(state))
  upd, _ = jax.jit(tx.update)(grads, state, params)
  upd = _flat(upd)
  for k, v in upd.items():
    if k.startswith("token_emb"):
      np.testing.assert_array_equal(np.asarray(v), 0.0)
  # Adam's first step on a constant gradient is -lr * scale * 1 (up to eps
  # and float32 rounding of 1 - b2 in the bias correction).
  np.testing.assert_allclose(np.asarray(upd["head/kernel"]), -1.0, rtol=1e-4)
  blk = "blocks/attn/qkv/kernel" if scanned else "blocks_0/attn/qkv/kernel"
  first = np.asarray(upd[blk])[0] if scanned else np.asarray(upd[blk])
  np.testing.assert_allclose(first, -0.25, rtol=1e-4)
  n_trainable = len([k for k in upd if not k.startswith("token_emb")])
  # mu and nu per trainable leaf + the two counts (adam, schedule).
  assert n_moment_leaves == 2 * n_trainable + 2
