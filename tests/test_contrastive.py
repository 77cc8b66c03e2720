"""Tests for mage_jax.objectives.contrastive (MAGE-C NT-Xent, pooling, projection head)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mage_jax.objectives import contrastive


def _ref_nt_xent(z1, z2, t):
  """Float64 NT-Xent written from the SimCLR definition, one anchor at a time."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  two_n = z.shape[0]
  n = two_n // 2
  losses = []
  for i in range(two_n):
    pos = (i + n) % two_n
    sims = {j: float(z[i] @ z[j]) / t for j in range(two_n) if j != i}
    denom = sum(np.exp(s) for s in sims.values())
    losses.append(-np.log(np.exp(sims[pos]) / denom))
  return float(np.mean(losses))


def _aligned_orthogonal_min(n, t):
  # Positive sim 1, all 2n-2 negatives sim 0.
  return float(np.log1p((2 * n - 2) * np.exp(-1.0 / t)))


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_float64_reference(t):
  z1, z2 = _rand(0, 5, 7), _rand(1, 5, 7)
  got = jax.jit(contrastive.nt_xent, static_argnums=2)(z1, z2, t)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), _ref_nt_xent(z1, z2, t), rtol=1e-5)
  # Symmetric in the two views.
  np.testing.assert_allclose(float(contrastive.nt_xent(z2, z1, t)), _ref_nt_xent(z1, z2, t), rtol=1e-5)


def test_nt_xent_bf16_inputs_computed_in_float32():
  z1 = jnp.asarray(_rand(2, 6, 16), jnp.bfloat16)
  z2 = jnp.asarray(_rand(3, 6, 16), jnp.bfloat16)
  got = contrastive.nt_xent(z1, z2, 0.1)
  assert got.dtype == jnp.float32
  ref = _ref_nt_xent(np.asarray(z1, np.float64), np.asarray(z2, np.float64), 0.1)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_nt_xent_traced_temperature():
  z1, z2 = _rand(4, 4, 3), _rand(5, 4, 3)
  got = jax.jit(contrastive.nt_xent)(z1, z2, jnp.float32(0.3))
  np.testing.assert_allclose(float(got), _ref_nt_xent(z1, z2, 0.3), rtol=1e-5)


def test_aligned_pairs_orthogonal_negatives_hit_closed_form_minimum():
  n, t = 4, 0.1
  # One-hot rows at different scales: normalisation must remove the scale.
  z1 = np.eye(n, 8, dtype=np.float32) * np.arange(1, n + 1, dtype=np.float32)[:, None]
  z2 = 3.0 * np.eye(n, 8, dtype=np.float32)
  got = float(contrastive.nt_xent(z1, z2, t))
  best = _aligned_orthogonal_min(n, t)
  # atol: a loss near 0 is a difference of two ~1/T logits in float32.
  np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-6)
  assert best < 1e-3  # near zero: positives far above every negative at T=0.1
  random_loss = float(contrastive.nt_xent(_rand(6, n, 8), _rand(7, n, 8), t))
  assert got < random_loss - 1.0


def test_temperature_scaling():
  n = 4
  z = np.eye(n, 8, dtype=np.float32)
  temps = [1.0, 0.5, 0.2, 0.1]
  aligned = [float(contrastive.nt_xent(z, z, t)) for t in temps]
  np.testing.assert_allclose(aligned, [_aligned_orthogonal_min(n, t) for t in temps], rtol=1e-5, atol=1e-6)
  assert all(a > b for a, b in zip(aligned, aligned[1:]))  # lower T, lower loss
  # Anti-aligned positives (z2 = -z1): lower T makes the loss worse, not better.
  anti = [float(contrastive.nt_xent(z, -z, t)) for t in temps]
  assert all(a < b for a, b in zip(anti, anti[1:]))
  np.testing.assert_allclose(anti, [_ref_nt_xent(z, -z, t) for t in temps], rtol=1e-5)


def test_zero_embedding_is_finite():
  z1, z2 = _rand(8, 3, 4), _rand(9, 3, 4)
  z1[0] = 0.0
  val, grad = jax.value_and_grad(contrastive.nt_xent)(z1, z2, 0.1)
  assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize(
  "z1_shape,z2_shape,t,match",
  [
    ((4, 3), (5, 3), 0.1, "same shape"),
    ((4,), (4,), 0.1, r"\[n, d\]"),
    ((1, 3), (1, 3), 0.1, "at least 2 pairs"),
    ((4, 3), (4, 3), 0.0, "temperature"),
    ((4, 3), (4, 3), -1.0, "temperature"),
  ],
)
def test_nt_xent_bad_input(z1_shape, z2_shape, t, match):
  with pytest.raises(ValueError, match=match):
    contrastive.nt_xent(np.ones(z1_shape, np.float32), np.ones(z2_shape, np.float32), t)


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def test_sharded_over_8_devices_matches_single_device():
  assert jax.device_count() == 8
  n, d, t = 16, 8, 0.1
  z1, z2 = _rand(10, n, d), _rand(11, n, d)
  single = float(
    jax.jit(contrastive.nt_xent, static_argnums=2)(
      jax.device_put(z1, jax.devices()[0]), jax.device_put(z2, jax.devices()[0]), t
    )
  )
  np.testing.assert_allclose(single, _ref_nt_xent(z1, z2, t), rtol=1e-5)

  mesh = _mesh((8,), ("data",))
  sh = NamedSharding(mesh, P("data"))
  g1, g2 = jax.device_put(z1, sh), jax.device_put(z2, sh)
  assert len(g1.addressable_shards) == 8 and g1.addressable_shards[0].data.shape == (2, d)

  global_loss = jax.jit(contrastive.nt_xent, static_argnums=2)(g1, g2, t)
  np.testing.assert_allclose(float(global_loss), single, atol=1e-5, rtol=0)
  g_single = jax.grad(contrastive.nt_xent, argnums=(0, 1))(z1, z2, t)
  g_sharded = jax.jit(jax.grad(contrastive.nt_xent, argnums=(0, 1)), static_argnums=2)(g1, g2, t)
  for a, b in zip(g_single, g_sharded):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


def test_sharded_over_two_mesh_axes():
  n, d, t = 8, 4, 0.5
  z1, z2 = _rand(12, n, d), _rand(13, n, d)
  sh = NamedSharding(_mesh((4, 2), ("data", "fsdp")), P(("data", "fsdp")))
  got = jax.jit(contrastive.nt_xent, static_argnums=2)(jax.device_put(z1, sh), jax.device_put(z2, sh), t)
  np.testing.assert_allclose(float(got), _ref_nt_xent(z1, z2, t), rtol=1e-5)


def test_pool_tokens():
  h = _rand(14, 2, 4, 3)
  np.testing.assert_allclose(contrastive.pool_tokens(h, "mean"), h[:, 1:].mean(1), rtol=1e-6)
  np.testing.assert_array_equal(contrastive.pool_tokens(h, "cls"), h[:, 0])
  valid = np.array([[True, False, True], [False, False, False]])
  got = np.asarray(contrastive.pool_tokens(h, "mean", valid))
  np.testing.assert_allclose(got[0], (h[0, 1] + h[0, 3]) / 2, rtol=1e-6)
  np.testing.assert_array_equal(got[1], np.zeros(3))
  out = contrastive.pool_tokens(jnp.asarray(h, jnp.bfloat16))
  assert out.dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown mode"):
    contrastive.pool_tokens(h, "max")
  with pytest.raises(ValueError, match="valid has shape"):
    contrastive.pool_tokens(h, "mean", valid[:, :2])
  with pytest.raises(ValueError, match=r"\[b, 1 \+ L, d\]"):
    contrastive.pool_tokens(h[:, :1])


def test_projection_head_default_is_dense_relu_dense():
  head = contrastive.ProjectionHead(hidden_dim=6, out_dim=3)
  x = _rand(15, 4, 5)
  params = nn.unbox(head.init(jax.random.key(0), x))["params"]
  assert set(params) == {"hidden_0", "out"}
  assert params["hidden_0"]["kernel"].shape == (5, 6)
  assert params["out"]["kernel"].shape == (6, 3)
  p = jax.tree.map(np.asarray, params)
  ref = np.maximum(x @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"], 0)
  ref = ref @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(head.apply({"params": params}, x), ref, rtol=1e-5, atol=1e-6)


def test_projection_head_variants():
  x = _rand(16, 4, 5)
  lin = contrastive.ProjectionHead(out_dim=3, num_layers=1)
  v = nn.unbox(lin.init(jax.random.key(0), x))
  assert set(v["params"]) == {"out"}

  bn = contrastive.ProjectionHead(hidden_dim=6, out_dim=3, num_layers=3, norm="batch")
  v = nn.unbox(bn.init(jax.random.key(0), x))
  assert set(v["params"]) == {"hidden_0", "norm_0", "hidden_1", "norm_1", "out"}
  assert "bias" not in v["params"]["hidden_0"]  # redundant before a norm
  y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
  assert y.shape == (4, 3)
  # Running mean moved towards the batch mean of hidden_0's pre-norm output.
  pre = x @ np.asarray(v["params"]["hidden_0"]["kernel"])
  np.testing.assert_allclose(upd["batch_stats"]["norm_0"]["mean"], 0.1 * pre.mean(0), rtol=1e-4, atol=1e-6)

  ln = contrastive.ProjectionHead(hidden_dim=6, out_dim=3, norm="layer")
  assert set(nn.unbox(ln.init(jax.random.key(0), x))["params"]) == {"hidden_0", "norm_0", "out"}
  with pytest.raises(ValueError, match="norm"):
    contrastive.ProjectionHead(norm="group").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="num_layers"):
    contrastive.ProjectionHead(num_layers=0).init(jax.random.key(0), x)


def test_projection_head_logical_axes_shard_on_mesh():
  mesh = _mesh((2, 2, 2), ("data", "fsdp", "model"))
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"))
  head = contrastive.ProjectionHead(hidden_dim=8, out_dim=4, num_layers=3, norm="layer")
  x = jnp.ones((4, 6))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(head.init, jax.random.key(0), x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    params = jax.jit(head.init, out_shardings=shardings)(jax.random.key(0), x)
  k = params["params"]["hidden_0"]["kernel"]
  assert k.value.sharding.spec == P("fsdp", "model")
  assert params["params"]["out"]["kernel"].value.sharding.spec == P("model", None)
