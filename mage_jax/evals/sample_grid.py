"""During training: a PNG of the model's samples after every `every_steps` steps, `<workdir>/samples/
step_XXXXXXX.png` (settings: `samples`' generation keys, `cols` images per row). Writes no scalar."""

from __future__ import annotations

import os

import jax

from mage_jax.data import images as image_io
from mage_jax.evals import samples


def during_training(settings, job):
  cols = settings.get("cols", 8)
  if not isinstance(cols, int) or cols < 1:
    raise ValueError(f"cols must be a whole number >= 1, got {cols!r}")
  s = samples.settings_of({k: v for k, v in settings.items() if k != "cols"}, job, reference=False)
  folder = os.path.join(job.workdir, "samples")

  def write(state, step):
    pixels = samples.images(job, state, step, s)
    if jax.process_index() == 0:
      image_io.save_png(os.path.join(folder, f"step_{step:07d}.png"), image_io.make_grid(pixels, cols=cols, pad=2))
    return {}

  return write
