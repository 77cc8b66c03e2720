"""`python -m mage_jax.generate --params=DIR --out=OUT`: images from a MAGE checkpoint, for people and for FID.

DIR is a params-only checkpoint (`python -m mage_jax.convert mage-vitb-1600.pth DIR`, or a training export).
Writes, on process 0:
  OUT/images/<shard>/<index>.png   lossless PNG, `--shard_size` files per subdirectory (0: all in OUT/images;
                                   torch-fidelity needs `--samples-find-deep` for the sharded layout)
  OUT/images.npz                   key 'images': uint8 [N, H, W, 3] (default on for N <= 10000)
  OUT/grid.png                     the first `--grid` images, 8 per row
  OUT/generation.json              settings and measured throughput
  OUT/mage_jax_outputs.json        every file above, listed before the first is written
The protocol (the official `gen_img_uncond.py`) is `sampling.generate_images`; the defaults are the README
command of the released ViT-B (temperature 6.0, 20 steps, 50,000 images). A class-conditional checkpoint
(`configs/class_cond_*.py`) takes `--class_id`. OUT must be new or empty, or `--force` replaces what an earlier
run listed in its mage_jax_outputs.json; anything else in OUT (a file or folder of yours, a link) is refused.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import flags, logging

from mage_jax.data import images as image_io
from mage_jax.generation import sampling
from mage_jax.system import outputs, runtime
from mage_jax.train import config_ranges, config_views, params_io, progress, sharding

NPZ_AUTO_LIMIT = 10000

_PARAMS = flags.DEFINE_string(
  "params", None, "Params-only checkpoint directory (convert output or a training export).", required=True
)
_OUT = flags.DEFINE_string("out", None, "Output directory (new or empty; see --force).", required=True)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 50000, "Number of images to generate.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch, a multiple of the device count.", lower_bound=1)
_NUM_STEPS = flags.DEFINE_integer("num_steps", sampling.DEFAULT_NUM_STEPS, "Decoding steps T.", lower_bound=1)
_TEMPERATURE = runtime.define_float(
  "temperature", sampling.DEFAULT_TEMPERATURE, "Choice temperature tau0 of the annealed Gumbel noise.", lower=0.0
)
_SEED = flags.DEFINE_integer(
  "seed", 0, "Base seed; batch i uses fold_in(key(seed), i).", lower_bound=0, upper_bound=config_ranges.MAX_SEED
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
_CLASS_ID = flags.DEFINE_integer(
  "class_id", None, "Class label, for class-conditional checkpoints only.", lower_bound=0
)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "PNG files per subdirectory; 0: one directory.", lower_bound=0)
_NPZ = flags.DEFINE_bool("npz", None, f"Also write OUT/images.npz (default: on for <= {NPZ_AUTO_LIMIT} images).")
_GRID = flags.DEFINE_integer("grid", 64, "Images in OUT/grid.png (0: no grid).", lower_bound=0)
_PNG = flags.DEFINE_bool("png", True, "Write one PNG per image under OUT/images.")
_FORCE = flags.DEFINE_bool("force", False, "Replace the outputs of an earlier run in OUT.")
_DISTRIBUTED = runtime.define_distributed_flags()


def planned_outputs(out: str, num_images: int, shard_size: int, *, png: bool, npz: bool, grid: bool) -> list[str]:
  """The files (relative to OUT) a run with these settings writes."""
  files = (
    [os.path.relpath(image_io.image_path(out, i, num_images, shard_size), out) for i in range(num_images)]
    if png
    else []
  )
  return files + ["images.npz"] * npz + ["grid.png"] * grid + ["generation.json"]


def main(argv):
  runtime.no_positional_arguments(argv)
  runtime.start(_DISTRIBUTED)
  meta = params_io.read_meta(_PARAMS.value)
  model, tokenizer = params_io.models_from_meta(meta, config_views.dtype(_DTYPE.value))
  num_classes = int(getattr(model.config, "num_classes", 0) or 0)
  if _CLASS_ID.value is not None and not num_classes:
    raise runtime.UsageError(
      f"--class_id={_CLASS_ID.value} given, but {_PARAMS.value} holds an unconditional "
      "model; drop --class_id (class-conditional checkpoints come from "
      "configs/class_cond_*.py)"
    )
  if _CLASS_ID.value is not None and _CLASS_ID.value >= num_classes:
    raise runtime.UsageError(
      f"--class_id={_CLASS_ID.value} is not a class of {_PARAMS.value} (classes 0..{num_classes - 1})"
    )
  mesh = sharding.create_mesh((("data", -1),))
  if _BATCH_SIZE.value % mesh.size:
    raise runtime.UsageError(f"--batch_size={_BATCH_SIZE.value} must be a multiple of the device count {mesh.size}")
  is_main = jax.process_index() == 0
  variables, _ = params_io.load(_PARAMS.value)  # before OUT is touched: bad params cost no earlier outputs
  params_io.check_finite({"model": variables["model"], "tokenizer": variables["tokenizer"]}, _PARAMS.value)
  num_images = _NUM_IMAGES.value
  save_npz = _NPZ.value if _NPZ.value is not None else num_images <= NPZ_AUTO_LIMIT
  if is_main:
    outputs.prepare(_OUT.value, _FORCE.value, "generate")
    outputs.write_record(
      _OUT.value,
      planned_outputs(_OUT.value, num_images, _SHARD_SIZE.value, png=_PNG.value, npz=save_npz, grid=_GRID.value > 0),
    )
  logging.info(
    "generating %d images: batch %d over %d devices (%d processes), %d steps, temperature %g, seed %d, dtype %s",
    num_images,
    _BATCH_SIZE.value,
    mesh.size,
    jax.process_count(),
    _NUM_STEPS.value,
    _TEMPERATURE.value,
    _SEED.value,
    _DTYPE.value,
  )
  res = tokenizer.config.resolution
  all_images = np.empty((num_images, res, res, 3), np.uint8) if (save_npz and is_main) else None
  grid_images = []
  meter = progress.Progress(num_images, "generate", log=lambda line: print(line, flush=True) if is_main else None)
  index = 0
  for batch in sampling.generate_images(
    model,
    tokenizer,
    variables,
    jax.random.key(_SEED.value),
    num_images,
    _BATCH_SIZE.value,
    _NUM_STEPS.value,
    _TEMPERATURE.value,
    mesh,
    class_id=_CLASS_ID.value,
  ):
    if is_main:
      for image in batch:
        if _PNG.value:
          image_io.save_png(image_io.image_path(_OUT.value, index, num_images, _SHARD_SIZE.value), image)
        if all_images is not None:
          all_images[index] = image
        if len(grid_images) < _GRID.value:
          grid_images.append(image)
        index += 1
    meter.update(len(batch))
  if is_main:
    if grid_images:
      image_io.save_png(os.path.join(_OUT.value, "grid.png"), image_io.make_grid(np.stack(grid_images), 8, pad=2))
    if all_images is not None:
      np.savez(os.path.join(_OUT.value, "images.npz"), images=all_images)
    total_s = time.perf_counter() - meter.start
    summary = {
      "params": os.path.abspath(_PARAMS.value),
      "num_images": num_images,
      "batch_size": _BATCH_SIZE.value,
      "num_steps": _NUM_STEPS.value,
      "temperature": _TEMPERATURE.value,
      "seed": _SEED.value,
      "dtype": _DTYPE.value,
      "class_id": _CLASS_ID.value,
      "devices": mesh.size,
      "device_kind": jax.devices()[0].device_kind,
      "images_per_s": meter.rate(),
      "total_s": total_s,
    }
    with open(os.path.join(_OUT.value, "generation.json"), "w") as f:
      json.dump(summary, f, indent=2)
    rate = meter.rate()
    rate_text = f"{rate:.2f} images/s after compilation" if rate else "one batch only, no steady-state rate"
    print(
      f"done: {num_images} images in {total_s:.1f}s ({rate_text}) on {mesh.size} "
      f"{jax.devices()[0].platform} device(s); wrote {_OUT.value}",
      flush=True,
    )


if __name__ == "__main__":
  runtime.run(main)
