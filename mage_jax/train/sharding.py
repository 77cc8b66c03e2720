"""Device meshes, logical-axis rules and global arrays.

Params carry logical axis names (see models/); `config.sharding_rules` maps them onto the mesh axes
('data', 'fsdp', 'model'). The default: batch over data×fsdp, params' embedding dims over fsdp (ZeRO-3 style),
MLP/attention projection dims over model (tensor parallelism).

On the command line both are strings: `--config.mesh=data=2,fsdp=4,model=1` (one size may be -1: the rest of
the devices) and `--config.sharding_rules=embed=,mlp=fsdp` (changes to the default rules: a logical axis onto
mesh axes joined by '+', or onto nothing, i.e. replicated).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DEFAULT_MESH = (("data", -1), ("fsdp", 1), ("model", 1))
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (
  ("batch", BATCH_AXES),
  ("embed", "fsdp"),
  ("decoder_embed", "fsdp"),
  ("mlp", "model"),
  ("qkv", "model"),
  ("qkv_out", "model"),
  ("vocab", None),
  ("positions", None),
  ("classes", None),
  ("layers", None),
  ("seq", None),
  ("embed_act", None),
  ("codebook", None),
  ("code_dim", None),
  ("conv_h", None),
  ("conv_w", None),
  ("conv_in", None),
  ("conv_out", None),
)


def mesh_shape(spec: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves the one -1 entry of `spec` so the sizes multiply to `num_devices`."""
  names = tuple(name for name, _ in spec)
  sizes = [int(size) for _, size in spec]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {list(spec)}: at most one axis may have size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {list(spec)}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {list(spec)} has {int(np.prod(sizes))} devices but {num_devices} are available")
  return names, tuple(sizes)


def parse_mesh(spec) -> tuple[tuple[str, int], ...]:
  """'data=-1,fsdp=2,model=1' (or a sequence of (name, size) pairs) -> ((name, size), ...)."""
  if isinstance(spec, str):
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
      name, eq, size = item.partition("=")
      try:
        pairs.append((name.strip(), int(size)))
      except ValueError:
        raise ValueError(f"mesh {spec!r}: {item!r} is not axis=size (e.g. data=-1,fsdp=2,model=1)") from None
      if not eq:
        raise ValueError(f"mesh {spec!r}: {item!r} is not axis=size (e.g. data=-1,fsdp=2,model=1)")
    spec = pairs
  spec = tuple((str(name), int(size)) for name, size in spec)
  names = [name for name, _ in spec]
  if not spec or len(set(names)) != len(names) or any(size == 0 or size < -1 for _, size in spec):
    raise ValueError(f"mesh {spec}: needs distinct axis names with sizes >= 1 (one may be -1)")
  return spec


def parse_rules(overrides) -> tuple[tuple[str, Any], ...]:
  """`DEFAULT_RULES` with changes: 'embed=,mlp=fsdp+model' (or a sequence of (logical, mesh axes) pairs)."""
  if isinstance(overrides, str):
    pairs = []
    for item in filter(None, (part.strip() for part in overrides.split(","))):
      name, eq, axes = item.partition("=")
      if not eq:
        raise ValueError(f"sharding_rules {overrides!r}: {item!r} is not logical=mesh_axes (e.g. embed=fsdp)")
      axes = tuple(a for a in axes.split("+") if a)
      pairs.append((name.strip(), None if not axes else axes[0] if len(axes) == 1 else axes))
    overrides = pairs
  rules = dict(DEFAULT_RULES)
  for name, axes in overrides or ():
    if name not in rules:
      raise ValueError(f"sharding_rules: unknown logical axis {name!r}; known: {sorted(rules)}")
    rules[name] = tuple(axes) if isinstance(axes, list) else axes
  return tuple(rules.items())


def mesh_from_config(config) -> tuple[Mesh, tuple]:
  """(mesh, logical rules) from `config.mesh`, `config.sharding_rules` and `config.num_devices` (0: all)."""
  devices = jax.devices()
  if config.get("num_devices", 0):
    devices = devices[: config.num_devices]  # e.g. compare a 1-device run with a sharded one
  mesh = create_mesh(parse_mesh(config.get("mesh") or DEFAULT_MESH), devices)
  rules = parse_rules(config.get("sharding_rules") or ())
  for _, axes in rules:
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None and axis not in mesh.axis_names:
        raise ValueError(f"sharding_rules map onto mesh axis {axis!r}, which the mesh {dict(mesh.shape)} lacks")
  return mesh, rules


def create_mesh(spec: Sequence[tuple[str, int]] = DEFAULT_MESH, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  names, sizes = mesh_shape(spec, len(devices))
  # Auto axes: linen's logical constraints rely on GSPMD propagation (Explicit axes turn them into asserts).
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def data_mesh(divides: int | None = None, devices=None) -> Mesh:
  """1-D ('data',) mesh over `devices` (default: all of every process), or over the most of them that split a
  batch of `divides` evenly (sample batches whose random draws depend on their size are split, never padded)."""
  devices = list(jax.devices() if devices is None else devices)
  if divides is not None:
    devices = devices[: int(np.gcd(int(divides), len(devices)))]
  return create_mesh((("data", -1),), devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def place(tree: Any, shardings: Any) -> Any:
  """Puts every leaf (numpy or jax) on its sharding (a tree, or one sharding for all); works across processes."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.device_put(x if isinstance(x, jax.Array) else np.asarray(x), shardings), tree)
  return jax.tree.map(lambda x, s: jax.device_put(x if isinstance(x, jax.Array) else np.asarray(x), s), tree, shardings)


def to_host(tree: Any) -> Any:
  """Global (possibly sharded, multi-process) arrays -> numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def jit_train_step(step, state_shardings: Any, mesh: Mesh, extras_shardings: Any = None):
  """`step(state, extras, batch) -> (state, metrics)` jitted as the training loops run it: the state sharded by
  `state_shardings` and donated, extras (e.g. a frozen tokenizer) on `extras_shardings` (default replicated),
  metrics replicated, the batch split over the batch axes."""
  repl = replicated(mesh)
  extras_shardings = repl if extras_shardings is None else extras_shardings
  return jax.jit(
    step,
    in_shardings=(state_shardings, extras_shardings, batch_sharding(mesh)),
    out_shardings=(state_shardings, repl),
    donate_argnums=(0,),
  )


def strip_boxes(tree: Any) -> Any:
  """Removes flax's LogicallyPartitioned boxes without applying constraints (works on abstract trees)."""
  return jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
  )


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a (boxed) abstract tree; unannotated leaves are replicated."""
  specs = nn.get_partition_spec(abstract_tree)
  return strip_boxes(nn.logical_to_mesh_sharding(specs, mesh, rules))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's slice of the global batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def check_batch_size(global_batch_size: int, mesh: Mesh):
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
  if global_batch_size % shards:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the {shards} batch shards of "
      f"the mesh {dict(mesh.shape)}"
    )
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the {jax.process_count()} processes")
