"""Class-unconditional image generation with MAGE: the eval binary behind FID/IS (spec §5, §6.5).

  python -m mage_jax.generate --params=DIR --out=OUT [--num_images=50000 --batch_size=32 --num_steps=20
      --temperature=6.0 --seed=0 --dtype=float32|bfloat16]

DIR is a params-only checkpoint (`python -m mage_jax.convert mage-vitb-1600.pth DIR`, or a training export).
Writes, on process 0:
  OUT/images/<shard>/<index>.png   lossless PNG, `--shard_size` files per subdirectory (0: all in OUT/images;
                                   torch-fidelity needs `--samples-find-deep` for the sharded layout)
  OUT/images.npz                   key 'images': uint8 [N, H, W, 3] (default on for N <= 10000)
  OUT/grid.png                     the first `--grid` images, 8 per row, for people
  OUT/generation.json              settings and measured throughput

Protocol of `gen_img_uncond.py` (LTH14/mage): every batch starts fully masked, `num_steps` steps of
iterative decoding (`sampling.decode`) with choice temperature tau0, the VQGAN decodes the last sampled
tokens, and pixels become `clip(x*255, 0, 255)` truncated to uint8 (`images.to_uint8`). The README command
for ViT-B is temperature 6.0, 20 steps, 50,000 images; the script's own defaults are 4.5 / 12.

Reproducibility: batch i uses `fold_in(key(seed), i)`, independent of the device count and of how many
images are requested, so the first k images of a run are the same for any num_images >= k. The batch is
sharded over a 1-D ('data',) mesh of all devices of all processes; random draws do not depend on the
sharding because `jax_threefry_partitionable` is on (JAX's default).

Class-conditional generation (`--class_id`, spec §5.4) is only a hook: the labels reach
`model.image_token_logits(tokens, labels=...)`, but the class-conditional model belongs to another issue;
this binary refuses `--class_id` for checkpoints whose meta has no `model.num_classes`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Iterator

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from mage_jax import checkpoint_models, images as image_io, params_io, runtime, sampling

DEFAULT_NUM_STEPS = 20       # README command for ViT-B
DEFAULT_TEMPERATURE = 6.0    # README command for ViT-B
DEFAULT_BATCH_SIZE = 32
NPZ_AUTO_LIMIT = 10000


def data_mesh(devices=None) -> Mesh:
  """1-D mesh ('data',) over `devices` (default: every device of every process), axis type Auto."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("data_mesh: no devices given")
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def replicate(tree, mesh: Mesh):
  """Puts every leaf (numpy or jax) on all devices of `mesh`, replicated; works across processes."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x) if not isinstance(x, jax.Array) else x, sharding),
                      tree)


def _num_classes(model) -> int:
  return int(getattr(model.config, "num_classes", 0) or 0)


@functools.lru_cache(maxsize=16)
def make_sampler(model, tokenizer, batch_size: int, num_steps: int, mesh: Mesh, conditional: bool = False,
                 key_impl: str = "threefry2x32"):
  """One jitted function: iterative decoding of a fully masked batch + VQGAN decode + uint8.

  Args are static (modules and mesh are hashable); the function is cached so repeated calls reuse the
  compilation.

  Returns:
    `sample(model_vars, tok_vars, key_data, batch_index, temperature, class_id) -> (images, ids)` with
    images uint8 [batch_size, H, W, 3] and ids int32 [batch_size, N], both sharded over 'data'. Params are
    arguments (never closed over, so they are not baked into the HLO). `key_data` is the raw data of the
    base key (uint32, PRNG implementation `key_impl`); `batch_index` and `class_id` are int32 scalars,
    `temperature` a float32 scalar (traced: no recompilation per temperature). `class_id` is ignored
    unless `conditional`.
  """
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the number of devices ({mesh.size}): "
                     "the batch is split evenly over the 'data' mesh axis")
  c = model.config
  replicated = NamedSharding(mesh, P())
  batch_sharded = NamedSharding(mesh, P("data"))

  def sample(model_vars, tok_vars, key_data, batch_index, temperature, class_id):
    rng = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=key_impl), batch_index)
    tokens = jax.lax.with_sharding_constraint(
        jnp.full((batch_size, c.num_tokens), c.mask_id, jnp.int32), batch_sharded)
    kwargs = {}
    if conditional:
      kwargs["labels"] = jax.lax.with_sharding_constraint(
          jnp.full((batch_size,), class_id, jnp.int32), batch_sharded)

    def logits_fn(t):
      return model.apply(model_vars, t, method="image_token_logits", **kwargs)

    ids = sampling.decode(rng, tokens, logits_fn, num_steps=num_steps, choice_temperature=temperature,
                          mask_id=c.mask_id, codebook_size=c.codebook_size)
    ids = jax.lax.with_sharding_constraint(ids, batch_sharded)
    pixels = tokenizer.apply(tok_vars, ids, method="decode_ids")
    return image_io.to_uint8(pixels), ids

  return jax.jit(sample, in_shardings=(replicated,) * 6, out_shardings=(batch_sharded, batch_sharded))


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate_images(model, tokenizer, variables: dict, rng: jax.Array, num_images: int, batch_size: int,
                    num_steps: int = DEFAULT_NUM_STEPS, temperature: float = DEFAULT_TEMPERATURE,
                    mesh: Mesh | None = None, *, class_id: int | None = None,
                    return_ids: bool = False) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
  """Generates `num_images` images in batches: an iterator of host numpy batches (every process gets all).

  Arguments are checked and the sampler built at the call; the first batch is dispatched on the first
  `next()`.

  Args:
    model: `MAGE` (or a module with the same `image_token_logits` method and `config`).
    tokenizer: `VQGAN` (method `decode_ids`).
    variables: {'model': {'params': ...}, 'tokenizer': {'params': ...}} (numpy or jax leaves).
    rng: base key (`jax.random.key(seed)`); batch i uses `fold_in(rng, i)`.
    num_images: total images; the last batch is computed in full and truncated.
    batch_size: global batch, a multiple of the mesh size.
    num_steps: decoding steps T.
    temperature: choice temperature tau0 of the annealed Gumbel noise.
    mesh: 1-D ('data',) mesh; default `data_mesh()` (all devices).
    class_id: label for every image; only for class-conditional models (`model.config.num_classes > 0`).
    return_ids: also yield the token ids.

  Returns:
    An iterator of uint8 [b, H, W, 3] batches (b = batch_size except possibly the last), or of
    (images, int32 ids [b, N]) if `return_ids`. Batch k+1 is dispatched before batch k is copied to the
    host, so device work overlaps with whatever the caller does (e.g. PNG writing).

  Raises:
    ValueError: bad sizes, missing variables, or class_id for an unconditional model.
  """
  if num_images < 1 or batch_size < 1 or num_steps < 1:
    raise ValueError(f"generate_images: num_images, batch_size and num_steps must be >= 1, got {num_images}, "
                     f"{batch_size}, {num_steps}")
  for name in ("model", "tokenizer"):
    if name not in variables:
      raise ValueError(f"generate_images: variables lack the {name!r} entry (have {sorted(variables)})")
  conditional = class_id is not None
  if conditional:
    num_classes = _num_classes(model)
    if not num_classes:
      raise ValueError("class_id given, but the model is class-unconditional (config has no num_classes)")
    if not 0 <= class_id < num_classes:
      raise ValueError(f"class_id={class_id} outside [0, {num_classes})")
  mesh = data_mesh() if mesh is None else mesh
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # a legacy uint32[2] PRNGKey
  key_impl = str(jax.random.key_impl(rng))
  sampler = make_sampler(model, tokenizer, batch_size, num_steps, mesh, conditional, key_impl)
  model_vars, tok_vars = replicate((variables["model"], variables["tokenizer"]), mesh)
  scalars = replicate((np.asarray(jax.random.key_data(rng)), np.float32(temperature),
                       np.int32(class_id if conditional else 0)), mesh)
  key_data, temp, label = scalars
  return _batches(sampler, model_vars, tok_vars, key_data, temp, label, mesh, num_images, batch_size, return_ids)


def _batches(sampler, model_vars, tok_vars, key_data, temp, label, mesh, num_images, batch_size, return_ids):
  """The generator part of `generate_images` (kept apart so that argument errors raise at the call)."""
  num_batches = math.ceil(num_images / batch_size)

  def launch(i):
    return sampler(model_vars, tok_vars, key_data, replicate(np.int32(i), mesh), temp, label)

  pending = launch(0)
  for i in range(num_batches):
    current = pending
    if i + 1 < num_batches:
      pending = launch(i + 1)
    keep = min(batch_size, num_images - i * batch_size)
    imgs = _to_host(current[0])[:keep]
    if return_ids:
      yield imgs, _to_host(current[1])[:keep]
    else:
      yield imgs


# --------------------------------------------------------------------------------------------------------
# Binary.


@dataclasses.dataclass
class _Progress:
  """Per-batch progress line; the rate excludes the first batch, which includes compilation."""
  total: int
  start: float = dataclasses.field(default_factory=time.perf_counter)
  first_done: float | None = None
  first_count: int = 0
  done: int = 0

  def update(self, count: int) -> str:
    now = time.perf_counter()
    self.done += count
    if self.first_done is None:
      self.first_done, self.first_count = now, self.done
      return (f"{self.done}/{self.total} images; first batch (with compilation) took "
              f"{now - self.start:.1f}s")
    rate = (self.done - self.first_count) / max(now - self.first_done, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    return f"{self.done}/{self.total} images, {rate:.2f} images/s, ETA {eta:.0f}s"

  def rate(self) -> float | None:
    """Images/s after the first batch (which includes compilation); None if only one batch ran."""
    now = time.perf_counter()
    if self.first_done is not None and self.done > self.first_count:
      return (self.done - self.first_count) / max(now - self.first_done, 1e-9)
    return None


def image_path(out_dir: str, index: int, num_images: int, shard_size: int) -> str:
  """OUT/images[/<shard>]/<index>.png, zero-padded (at least 5 digits, as the reference's 00000.png)."""
  width = max(5, len(str(num_images - 1)))
  name = f"{index:0{width}d}.png"
  if shard_size <= 0:
    return os.path.join(out_dir, "images", name)
  shards = math.ceil(num_images / shard_size)
  return os.path.join(out_dir, "images", f"{index // shard_size:0{max(3, len(str(shards - 1)))}d}", name)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mage_jax.generate", description=__doc__.split("\n")[0])
  p.add_argument("--params", required=True, help="params-only checkpoint directory (mage_jax.convert output)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--num_images", type=int, default=50000)
  p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="global batch (all devices)")
  p.add_argument("--num_steps", type=int, default=DEFAULT_NUM_STEPS)
  p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="choice temperature tau0")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16 (params stay float32)")
  p.add_argument("--class_id", type=int, default=None,
                 help="class label for class-conditional checkpoints only (not implemented in mage_jax yet)")
  p.add_argument("--shard_size", type=int, default=1000, help="PNG files per subdirectory; 0 = one directory")
  p.add_argument("--npz", action=argparse.BooleanOptionalAction, default=None,
                 help=f"also write OUT/images.npz (default: on for <= {NPZ_AUTO_LIMIT} images)")
  p.add_argument("--grid", type=int, default=64, help="images in OUT/grid.png (0: no grid)")
  p.add_argument("--no_png", action="store_true", help="skip the per-image PNG files")
  p.add_argument("--coordinator_address", default=None,
                 help="host:port of process 0 for multi-process runs without auto-detection (TPU pods and "
                      "SLURM jobs are detected)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  return p


def _error(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr)
  return 2


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.num_images < 1 or args.batch_size < 1 or args.num_steps < 1:
    return _error("--num_images, --batch_size and --num_steps must be >= 1")
  try:
    dtype = checkpoint_models.parse_dtype(args.dtype)
    meta = params_io.read_meta(args.params)
    runtime.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if args.class_id is not None and not (meta.get("model") or {}).get("num_classes"):
      return _error(f"--class_id={args.class_id} given, but {args.params} holds a class-unconditional model "
                    "(meta model.num_classes is absent); class-conditional MAGE is not implemented yet")
    model, tokenizer = checkpoint_models.models_from_meta(meta, dtype)
    variables, _ = params_io.load(args.params)
    mesh = data_mesh()
    if args.batch_size % mesh.size:
      return _error(f"--batch_size={args.batch_size} must be a multiple of the device count {mesh.size}")
  except (FileNotFoundError, ValueError) as e:
    return _error(str(e))

  is_main = jax.process_index() == 0
  save_npz = args.npz if args.npz is not None else args.num_images <= NPZ_AUTO_LIMIT
  logging.info("generating %d images: batch %d over %d devices (%d processes), %d steps, temperature %g, "
               "seed %d, dtype %s", args.num_images, args.batch_size, mesh.size, jax.process_count(),
               args.num_steps, args.temperature, args.seed, args.dtype)
  res = tokenizer.config.resolution
  all_images = np.empty((args.num_images, res, res, 3), np.uint8) if (save_npz and is_main) else None
  grid_images = []
  progress = _Progress(args.num_images)
  index = 0
  for batch in generate_images(model, tokenizer, variables, jax.random.key(args.seed), args.num_images,
                               args.batch_size, args.num_steps, args.temperature, mesh, class_id=args.class_id):
    if is_main:
      for image in batch:
        if not args.no_png:
          image_io.save_png(image_path(args.out, index, args.num_images, args.shard_size), image)
        if all_images is not None:
          all_images[index] = image
        if len(grid_images) < args.grid:
          grid_images.append(image)
        index += 1
      print(progress.update(len(batch)), flush=True)
    else:
      progress.update(len(batch))

  rate = progress.rate()
  if is_main:
    os.makedirs(args.out, exist_ok=True)
    if grid_images:
      image_io.save_png(os.path.join(args.out, "grid.png"), image_io.make_grid(np.stack(grid_images), 8, pad=2))
    if all_images is not None:
      np.savez(os.path.join(args.out, "images.npz"), images=all_images)
    total_s = time.perf_counter() - progress.start
    summary = {"params": os.path.abspath(args.params), "num_images": args.num_images,
               "batch_size": args.batch_size, "num_steps": args.num_steps, "temperature": args.temperature,
               "seed": args.seed, "dtype": args.dtype, "class_id": args.class_id,
               "devices": mesh.size, "device_kind": jax.devices()[0].device_kind,
               "images_per_s": rate, "total_s": total_s}
    with open(os.path.join(args.out, "generation.json"), "w") as f:
      json.dump(summary, f, indent=2)
    rate_text = f"{rate:.2f} images/s after compilation" if rate else "one batch only, no steady-state rate"
    print(f"done: {args.num_images} images in {total_s:.1f}s ({rate_text}) on {mesh.size} "
          f"{jax.devices()[0].platform} device(s); wrote {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
