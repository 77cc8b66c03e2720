"""`python -m mage_jax.edit`: inpainting / outpainting of one image with a MAGE checkpoint (LTH14/mage issue #3).

  python -m mage_jax.edit --params=DIR --image=in.png --box=top,left,bottom,right --out=OUT
      [--mode=inpaint|outpaint --num_samples=4 --seed=0 --num_steps=20 --temperature=6.0 --ring=1]

The image is read and brought to the tokenizer's resolution R exactly as evaluation reads it (shorter side to
floor(R * 292 / 256), bicubic, centre R x R crop: `editing.load_image`); `--box` is in pixels of that square,
bottom/right exclusive. `inpaint` regenerates the box, `outpaint` everything outside it (the recipe is in
mage_jax/generation/editing.py). Writes OUT/input.png (the crop), OUT/masked.png (edited pixels zeroed),
OUT/sample_{i}.png and OUT/overview.png (input, masked, samples side by side); OUT must be new or empty, or
`--force` replaces what an earlier edit listed in OUT/mage_jax_outputs.json (`mage_jax/system/outputs.py`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import flags

from mage_jax.data import images as image_io
from mage_jax.generation import editing, sampling
from mage_jax.system import outputs, runtime
from mage_jax.train import config_ranges, config_views, params_io, sharding

_PARAMS = flags.DEFINE_string(
  "params", None, "Params-only checkpoint directory (convert output or a training export).", required=True
)
_IMAGE = flags.DEFINE_string("image", None, "Input image file (any PIL format).", required=True)
_BOX = flags.DEFINE_string(
  "box", None, "top,left,bottom,right in pixels of the square crop (exclusive end).", required=True
)
_OUT = flags.DEFINE_string("out", None, "Output directory (new or empty; see --force).", required=True)
_MODE = flags.DEFINE_enum(
  "mode", "inpaint", list(editing.MODES), "Regenerate the box (inpaint) or the rest (outpaint)."
)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Samples drawn.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=0, upper_bound=config_ranges.MAX_SEED)
_NUM_STEPS = flags.DEFINE_integer("num_steps", sampling.DEFAULT_NUM_STEPS, "Decoding steps T.", lower_bound=1)
_TEMPERATURE = runtime.define_float(
  "temperature", sampling.DEFAULT_TEMPERATURE, "Choice temperature tau0 of the annealed Gumbel noise.", lower=0.0
)
_RING = flags.DEFINE_integer(
  "ring", 1, "Extra rings of masked tokens around the edited cells (MAGE: 1).", lower_bound=0
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
_FORCE = flags.DEFINE_bool("force", False, "Replace the outputs of an earlier edit in OUT.")


def _outputs(num_samples: int) -> list[str]:
  return ["input.png", "masked.png", "overview.png"] + [f"sample_{i}.png" for i in range(num_samples)]


def main(argv):
  runtime.no_positional_arguments(argv)
  out = _OUT.value
  box = editing.parse_box(_BOX.value)
  runtime.start()
  model, tokenizer = params_io.models_from_meta(params_io.read_meta(_PARAMS.value), config_views.dtype(_DTYPE.value))
  res = tokenizer.config.resolution
  pixel_mask = editing.pixel_mask_for(_MODE.value, res, box)
  image = editing.load_image(_IMAGE.value, res)
  variables, _ = params_io.load(_PARAMS.value)
  params_io.check_finite({"model": variables["model"], "tokenizer": variables["tokenizer"]}, _PARAMS.value)
  outputs.prepare(out, _FORCE.value, "edit")
  outputs.write_record(out, _outputs(_NUM_SAMPLES.value))
  result = editing.edit_image(
    model,
    tokenizer,
    variables,
    jax.random.key(_SEED.value),
    image,
    pixel_mask,
    num_samples=_NUM_SAMPLES.value,
    num_steps=_NUM_STEPS.value,
    temperature=_TEMPERATURE.value,
    ring=_RING.value,
    mesh=sharding.data_mesh(_NUM_SAMPLES.value),
  )
  image = image_io.to_uint8(image)
  image_io.save_png(os.path.join(out, "input.png"), image)
  image_io.save_png(os.path.join(out, "masked.png"), result.masked_image)
  for i, sample in enumerate(result.samples):
    image_io.save_png(os.path.join(out, f"sample_{i}.png"), sample)
  overview = np.concatenate([image[None], result.masked_image[None], result.samples])
  image_io.save_png(os.path.join(out, "overview.png"), image_io.make_grid(overview, len(overview), pad=2))
  print(
    f"{_MODE.value}: regenerated {int(result.token_mask.sum())}/{result.token_mask.size} tokens, "
    f"{_NUM_SAMPLES.value} samples; wrote {out}",
    flush=True,
  )


if __name__ == "__main__":
  runtime.run(main)
