"""models/tokenizer.py: the interface MAGE's jobs need of a tokenizer. The shipped VQGAN satisfies it, and a
different tokenizer (patch means quantised to a few levels) goes through a pretraining step and generation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import fashion_mnist_tiny
from mage_jax.generation import sampling
from mage_jax.models.tokenizer import Tokenizer
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.train import builders, sharding, steps

MASKING = dict(fashion_mnist_tiny.get_config().masking)


@dataclasses.dataclass(frozen=True)
class PatchConfig:
  resolution: int = 16
  patch: int = 4
  codebook_size: int = 8

  @property
  def token_grid(self) -> int:
    return self.resolution // self.patch

  @property
  def num_tokens(self) -> int:
    return self.token_grid**2


class PatchTokenizer(nn.Module):
  """The grey level of each patch, in `codebook_size` steps; decoding paints each patch with its level."""

  config: PatchConfig

  def encode_to_ids(self, images):
    b, p, g = images.shape[0], self.config.patch, self.config.token_grid
    means = images.mean(-1).reshape(b, g, p, g, p).mean((2, 4))
    return jnp.clip((means * self.config.codebook_size).astype(jnp.int32), 0, self.config.codebook_size - 1).reshape(
      b, -1
    )

  def decode_ids(self, ids):
    g, p = self.config.token_grid, self.config.patch
    levels = (ids.reshape(-1, g, g).astype(jnp.float32) + 0.5) / self.config.codebook_size
    return jnp.repeat(jnp.repeat(levels, p, axis=1), p, axis=2)[..., None].repeat(3, axis=-1)


def test_the_vqgan_and_a_patch_tokenizer_have_the_interface():
  assert isinstance(VQGAN(VQGANConfig(resolution=16, ch_mult=(1, 2))), Tokenizer)
  assert isinstance(PatchTokenizer(PatchConfig()), Tokenizer)
  assert not isinstance(nn.Dense(3), Tokenizer)


def test_a_pretraining_step_and_generation_run_on_another_tokenizer():
  tokenizer = PatchTokenizer(PatchConfig())
  model = builders.mage_model(fashion_mnist_tiny.get_config(), tokenizer)  # as the jobs build it
  assert (model.config.num_tokens, model.config.codebook_size) == (16, 8)
  tx = optax.adamw(1e-3)
  state = jax.jit(lambda r: sharding.strip_boxes(builders.mage_init_state(model, MASKING, tx)(r)))(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3))
  kw = dict(model=model, tx=tx, masking_cfg=MASKING, label_smoothing=0.1)
  new, metrics = jax.jit(lambda s, b: steps.pretrain_step(s, {}, b, tokenizer=tokenizer, **kw))(
    state, {"image": images}
  )
  ids = tokenizer.apply({}, images, method="encode_to_ids")
  _, want = jax.jit(lambda s, i: steps.pretrain_update(s, i, None, **kw))(state, ids)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) == float(want["loss"])
  assert int(new.step) == 1

  variables = {"model": {"params": new.params}, "tokenizer": {}}
  (samples,) = list(sampling.generate_images(model, tokenizer, variables, jax.random.key(2), 8, 8, num_steps=3))
  assert samples.shape == (8, 16, 16, 3) and samples.dtype == np.uint8
  patches = samples[..., 0].reshape(8, 4, 4, 4, 4)
  assert (patches == patches[:, :, :1, :, :1]).all()  # every 4x4 patch is one level, as this tokenizer paints them
