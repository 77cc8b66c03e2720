"""Model invariants beyond the official fixtures: masking, loss, sharding, dtypes, scanned layers."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mage_jax.models import layers, reductions
from mage_jax.models.mage import MAGE, config_for
from mage_jax.models.vit import MAGEViT
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.objectives import losses, masking

TINY = config_for("tiny", num_tokens=16, max_position_embeddings=17)


def _init(model, *args, **kw):
  return nn.unbox(model.init(jax.random.key(0), *args, **kw))


def test_masking_invariants():
  n = 64
  ratios = []
  for seed in range(200):
    plan, ratio = masking.sample_plan(jax.random.key(seed), 4, n)
    ratios.append(float(ratio))
    masked, dropped = np.asarray(plan.masked), np.asarray(plan.dropped)
    assert dropped.sum(1).tolist() == [32] * 4  # ceil(64 * 0.5) dropped
    assert masked.sum(1).tolist() == [int(np.ceil(n * ratio))] * 4  # ceil(N r) masked, one ratio per batch
    assert not (dropped & ~masked).any()  # dropped ⊆ masked
    keep = np.asarray(plan.keep_idx)
    assert keep.shape == (4, 33) and (keep[:, 0] == 0).all()
    for b in range(4):
      np.testing.assert_array_equal(keep[b, 1:] - 1, np.flatnonzero(~dropped[b]))
  ratios = np.array(ratios)
  assert ratios.min() >= 0.5 and ratios.max() <= 1.0
  assert abs(ratios.mean() - 0.6936) < 0.03  # spec §2.3: mean of the truncated Gaussian


def _law_cdf(law: str, x, lo: float, hi: float, mu=0.55, std=0.25):
  """Closed-form CDF of each masking law restricted to [lo, hi], in float64."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  if law == "truncated_gaussian":
    a, b = (lo - mu) / std, (hi - mu) / std
    return stats.truncnorm.cdf(x, a, b, loc=mu, scale=std)
  if law == "uniform":
    return (x - lo) / (hi - lo)
  full = lambda r: 1 - 2 / np.pi * np.arccos(r)  # r = cos(pi/2 u), u ~ U(0, 1)
  return (full(x) - full(lo)) / (full(hi) - full(lo))


@pytest.mark.parametrize("law", sorted(masking.RATIO_LAWS))
@pytest.mark.parametrize("lo,hi", [(0.5, 1.0), (0.2, 0.9)])
def test_masking_laws_follow_their_closed_form_cdf(law, lo, hi):
  draw = jax.jit(jax.vmap(lambda k: masking.sample_ratio(k, law=law, min_ratio=lo, max_ratio=hi)))
  ratios = np.sort(np.asarray(draw(jax.random.split(jax.random.key(0), 20_000)), np.float64))
  assert ratios.min() >= lo and ratios.max() <= hi
  empirical = np.arange(1, len(ratios) + 1) / len(ratios)
  ks = np.max(np.abs(empirical - _law_cdf(law, ratios, lo, hi)))
  assert ks < 0.015, ks  # Kolmogorov-Smirnov: 1.36/sqrt(20000) = 0.0096 at the 5% level
  # The other laws' CDFs are far from this one's: the test tells them apart.
  for other in set(masking.RATIO_LAWS) - {law}:
    assert np.max(np.abs(empirical - _law_cdf(other, ratios, lo, hi))) > 0.05


def test_masking_law_is_chosen_by_the_config_and_unknown_laws_are_refused():
  ratio = lambda law: float(masking.sample_plan(jax.random.key(3), 2, 16, law=law, min_ratio=0.3, max_ratio=0.9)[1])
  assert len({ratio(law) for law in masking.RATIO_LAWS}) == len(masking.RATIO_LAWS)
  with pytest.raises(ValueError, match="unknown masking law 'linear'"):
    masking.sample_plan(jax.random.key(0), 2, 16, law="linear")


def test_loss_matches_float64():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 30)).astype(np.float32) * 3
  ids = rng.integers(0, 20, size=(2, 4))
  masked = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], bool)
  got = losses.masked_token_loss(
    jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(masked), codebook_size=20, label_smoothing=0.1
  )
  z = logits[:, 1:, :20].astype(np.float64)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  target = 0.9 * np.eye(20)[ids] + 0.1 / 20
  per = -(target * logp).sum(-1)
  np.testing.assert_allclose(float(got), (per * masked).sum() / masked.sum(), rtol=1e-6)


def test_every_param_has_logical_axes():
  for model, args in [
    (MAGE(TINY), (jnp.zeros((1, 17), jnp.int32),)),
    (MAGEViT(TINY, num_classes=3), (jnp.zeros((1, 16), jnp.int32),)),
    (
      VQGAN(VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, resolution=8)),
      (jnp.zeros((1, 8, 8, 3)),),
    ),
  ]:
    method = MAGE.full_sequence if isinstance(model, MAGE) else None
    boxed = model.init(jax.random.key(0), *args, method=method)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
      assert len(leaf.names) == leaf.value.ndim


def test_output_embedding_gets_no_gradient_through_head():
  model = MAGE(TINY)
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 1024)
  plan, _ = masking.sample_plan(jax.random.key(2), 2, 16)
  params = _init(model, ids, plan)

  def head_only(word):
    h = jnp.ones((2, 17, 64))
    return jnp.sum(model.apply(params, h, word, method=lambda m, h, w: m.mlm_layer(h, w)))

  grad = jax.grad(head_only)(params["params"]["token_emb"]["word_embeddings"]["embedding"])
  assert float(jnp.abs(grad).max()) == 0.0
  full = jax.grad(lambda p: model.apply(p, ids, plan)[0].sum())(params)
  assert float(jnp.abs(full["params"]["token_emb"]["word_embeddings"]["embedding"]).max()) > 0


def test_sharded_forward_equals_single_device():
  model = MAGE(TINY)
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 1024)
  plan, _ = masking.sample_plan(jax.random.key(2), 8, 16)
  params = _init(model, ids, plan)
  single = model.apply(params, ids, plan)[0]
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  rules = (("batch", "data"), ("mlp", "model"), ("qkv", "model"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, plan))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    sharded = jax.device_put(params, nn.unbox(shardings))
    batch = jax.device_put((ids, plan), NamedSharding(mesh, P("data")))
    out = jax.jit(lambda p, b: model.apply(p, *b)[0])(sharded, batch)
  assert sharded["params"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "model")
  np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=2e-5, atol=2e-5)


def test_scanned_blocks_equal_loop():
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 1024)
  plan, _ = masking.sample_plan(jax.random.key(2), 2, 16)
  loop = MAGE(TINY)
  params = _init(loop, ids, plan)
  scanned = MAGE(dataclasses.replace(TINY, scan=True, remat_policy="nothing_saveable"))
  stacked = {
    "params": layers.stack_block_params(layers.stack_block_params(params["params"], "blocks"), "decoder_blocks")
  }
  assert jax.tree.structure(stacked) == jax.tree.structure(_init(scanned, ids, plan))
  np.testing.assert_allclose(
    np.asarray(scanned.apply(stacked, ids, plan)[0]), np.asarray(loop.apply(params, ids, plan)[0]), rtol=1e-5, atol=1e-5
  )
  back = layers.unstack_block_params(stacked["params"], "blocks")
  np.testing.assert_array_equal(
    back["blocks_1"]["mlp"]["fc1"]["kernel"], params["params"]["blocks_1"]["mlp"]["fc1"]["kernel"]
  )


def test_bf16_compute_keeps_float32_params_and_logits():
  model = MAGE(TINY, dtype=jnp.bfloat16)
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 1024)
  plan, _ = masking.sample_plan(jax.random.key(2), 2, 16)
  params = _init(model, ids, plan)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = model.apply(params, ids, plan)[0]
  ref = MAGE(TINY).apply(params, ids, plan)[0]
  assert logits.dtype == jnp.float32
  rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
  assert rel < 3e-2, rel


def test_dropout_active_only_when_training():
  model = MAGE(TINY)
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 1024)
  plan, _ = masking.sample_plan(jax.random.key(2), 2, 16)
  params = _init(model, ids, plan)
  a = model.apply(params, ids, plan, False, rngs={"dropout": jax.random.key(3)})[0]
  b = model.apply(params, ids, plan, False, rngs={"dropout": jax.random.key(4)})[0]
  c = model.apply(params, ids, plan, True)[0]
  assert float(jnp.abs(a - b).max()) > 0 and float(jnp.abs(c - model.apply(params, ids, plan)[0]).max()) == 0


def test_bad_config_and_image_errors():
  with pytest.raises(ValueError, match="mask_id"):
    config_for("tiny", mask_id=5)
  with pytest.raises(ValueError, match="unknown MAGE variant"):
    config_for("XL")
  vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, resolution=8))
  with pytest.raises(ValueError, match="channels"):
    vq.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_bf16_attention_logits_equal_float32_highest_on_the_same_values():
  """bf16 operands with float32 accumulation (the tensor-core path) equal float32 copies at HIGHEST precision:
  every bf16 x bf16 product is exact in float32, only the summation order may differ."""
  q = jax.random.normal(jax.random.key(1), (2, 4, 33, 64)).astype(jnp.bfloat16)
  k = jax.random.normal(jax.random.key(2), (2, 4, 33, 64)).astype(jnp.bfloat16)
  fast = jax.jit(layers.attention_logits)(q, k)
  assert fast.dtype == jnp.float32
  exact = np.einsum("bhqd,bhkd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
  np.testing.assert_allclose(np.asarray(fast), exact, rtol=0, atol=2e-5)
  # and the compiled dot consumes the bf16 values themselves (no float32 upcast feeding it)
  hlo = jax.jit(layers.attention_logits).lower(q, k).as_text()
  dots = [line for line in hlo.splitlines() if "dot_general" in line]
  assert dots and all("bf16" in line.split("dot_general")[1] for line in dots), dots


@pytest.mark.parametrize(
  "fields,message",
  [
    (dict(num_heads=0), "positive integers"),
    (dict(num_heads=3), "num_heads=3 does not divide embed_dim=64"),
    (dict(decoder_num_heads=5), "decoder_num_heads=5 does not divide"),
    (dict(depth=0), "positive integers"),
    (dict(dropout=1.0), "dropouts in \\[0, 1\\)"),
  ],
)
def test_mage_config_refuses_impossible_sizes(fields, message):
  with pytest.raises(ValueError, match=message):
    config_for("tiny", **fields)


@pytest.mark.parametrize(
  "fields,message",
  [
    (dict(resolution=0), "positive integers"),
    (dict(resolution=-32), "positive integers"),
    (dict(resolution=33), "not a multiple of its downsampling factor 4"),
    (dict(ch_mult=()), "positive integers"),
    (dict(ch=24), "not divisible by num_groups 32"),
  ],
)
def test_vqgan_config_refuses_impossible_sizes(fields, message):
  with pytest.raises(ValueError, match=message):
    VQGANConfig(**{"ch": 32, "ch_mult": (1, 2, 2), "resolution": 32, **fields})


def test_two_pass_argmin_argmax_equal_jnp_with_ties_and_the_categorical_draw():
  x = jax.random.normal(jax.random.key(0), (40, 300))
  x = x.at[3, 10].set(-9.0).at[3, 20].set(-9.0).at[4, 7].set(9.0).at[4, 8].set(9.0)  # ties: the first wins
  np.testing.assert_array_equal(reductions.argmin(x), jnp.argmin(x, axis=-1))
  np.testing.assert_array_equal(reductions.argmax(x), jnp.argmax(x, axis=-1))
  assert reductions.argmin(x).dtype == jnp.int32
  assert int(reductions.argmin(jnp.array([[1.0, jnp.nan, 0.0]]))[0]) == 0  # NaN rows: index 0, in range
  # the sampler's draw is jax.random.categorical's: the same Gumbel noise, the same ids
  key, logits = jax.random.key(5), jax.random.normal(jax.random.key(1), (4, 16, 256)) * 3
  np.testing.assert_array_equal(
    reductions.argmax(jax.random.gumbel(key, logits.shape, jnp.float32) + logits / 4.5),
    jax.random.categorical(key, logits / 4.5, axis=-1),
  )
