"""A PNG of the model's samples, `<workdir>/samples/step_XXXXXXX.png`: during training after every `every_steps`
steps (writing no scalar), and on a checkpoint (`python -m mage_jax.evaluate`, `config.samples`) at the step it was
trained to. Settings: `samples`' generation keys and `cols`, images per row."""

from __future__ import annotations

import os

import jax

from mage_jax.data import images as image_io
from mage_jax.evals import samples


def _path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "samples", f"step_{step:07d}.png")


def during_training(settings, job):
  s = samples.settings_of(settings, job, reference=False)

  def write(state, step):
    pixels = samples.images(job, state, step, s)
    if jax.process_index() == 0:
      image_io.save_png(_path(job.workdir, step), image_io.make_grid(pixels, cols=s.cols, pad=2))
    return {}

  return write


# On a checkpoint.
FEATURES = False


check, _ = samples.checkpoint_entry(during_training, reference=False)


def run(context, features) -> dict:
  del features
  samples.on_checkpoint(during_training, context)
  num_images = samples.checked(context.config.samples, reference=False).num_images
  return {"png": _path(context.workdir, context.shared["job"][1]), "num_images": num_images}


def rows(result: dict) -> list[tuple[str, str]]:
  return [("sample grid", result["png"])]
