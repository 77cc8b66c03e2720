"""Device meshes, logical-axis rules and global arrays.

Params carry logical axis names (see models/); `config.sharding_rules` maps them onto the mesh axes
('data', 'fsdp', 'model'). The default: batch over data×fsdp, params' embedding dims over fsdp (ZeRO-3 style),
MLP/attention projection dims over model (tensor parallelism).
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


def create_mesh(spec: Sequence[tuple[str, int]] = DEFAULT_MESH, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  names, sizes = mesh_shape(spec, len(devices))
  # Auto axes: linen's logical constraints rely on GSPMD propagation (Explicit axes turn them into asserts).
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def strip_boxes(tree: Any) -> Any:
  """Removes flax's LogicallyPartitioned boxes without applying constraints (works on abstract trees)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


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
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the {shards} batch shards of "
                     f"the mesh {dict(mesh.shape)}")
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the {jax.process_count()} "
                     "processes")
