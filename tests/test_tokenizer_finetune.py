"""Tokenizer fine-tuning (config.tokenizer.init): the official tiny VQGAN, converted, fine-tuned on a folder of
Fashion-MNIST PNGs reconstructs held-out images better than before; a frozen codebook stays bit-identical."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tokenizer_fashion_mnist
from mage_jax.convert import convert
from mage_jax.data import sources
from mage_jax.evals import reconstruction
from mage_jax.jobs import tokenizer as tokenizer_job
from mage_jax.models.vqgan import VQGAN
from mage_jax.train import params_io, tokenizer_step

HELDOUT = "[-96:]"


@pytest.fixture(scope="module")
def converted_tokenizer(tmp_path_factory, testdata):
  """tests/testdata/official_tiny/tokenizer.pth (official VQGAN code, random weights, 32 px) as a params dir."""
  state_dict, _ = convert.load_checkpoint(str(testdata / "official_tiny" / "tokenizer.pth"))
  result = convert.convert_state_dict(state_dict, "tokenizer", resolution=32)
  assert result.report.ok, result.report.describe()
  out = str(tmp_path_factory.mktemp("converted") / "tokenizer")
  params_io.save(out, result.variables, result.meta)
  return out


def _fine_tune_config(folder, init, steps, **codebook):
  # No discriminator here (the quickstart's fine-tuning test runs one from mid-run): only the fine-tuning.
  config = tokenizer_fashion_mnist.get_config(f"steps={steps},eval_every={steps}")
  config.input.name = f"folder:{folder}"
  config.input.split = "[:-96]"
  config.evals.reconstruction.update(dict(split=HELDOUT, batch_size=96))
  config.tokenizer.init = init
  config.tokenizer.update(tokenizer_job.init_sizes(init))
  config.codebook.update(codebook)
  config.log_every_steps = 10
  config.checkpoint_every_steps = steps
  config.async_checkpoints = False
  return config


def test_sizes_come_from_the_init_checkpoint(converted_tokenizer):
  config = tokenizer_fashion_mnist.get_config()
  config.tokenizer.init = converted_tokenizer
  # The Fashion-MNIST recipe's 32-d latents and 8 groups are not the checkpoint's (16, 32): a clear error.
  with pytest.raises(
    ValueError,
    match=r"z_channels=32, num_groups=8.*--config.tokenizer.z_channels=16 "
    r"--config.tokenizer.num_groups=32",
  ):
    tokenizer_job.tokenizer_config(config)
  config.tokenizer.update(tokenizer_job.init_sizes(converted_tokenizer))
  vq_config = tokenizer_job.tokenizer_config(config)
  assert (vq_config.z_channels, vq_config.num_groups, vq_config.resolution, vq_config.token_grid) == (16, 32, 32, 8)


def test_frozen_codebook_is_outside_the_optimizer():
  params = {"quantize": {"embedding": {"embedding": jnp.ones((4, 2))}}, "conv_in": {"kernel": jnp.ones((3,))}}
  grads = jax.tree.map(jnp.ones_like, params)
  optim_cfg = tokenizer_fashion_mnist.get_config().optim
  for freeze in (False, True):
    tx, _ = tokenizer_job.make_optimizer(1e-2, 10, 0, optim_cfg, freeze_codebook=freeze)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.abs(updates["conv_in"]["kernel"]).min() > 0
    assert (np.abs(updates["quantize"]["embedding"]["embedding"]).max() == 0) == freeze
  with pytest.raises(ValueError, match="freeze.*restart_every=100"):
    tokenizer_step.CodebookConfig(freeze=True, restart_every=100)


def _independent_psnr(init_dir, folder):
  """Mean PSNR of the init tokenizer on the held-out images, outside the job: numpy float64 on the VQGAN output."""
  variables, meta = params_io.load(init_dir)
  vqgan = VQGAN(params_io.tokenizer_config_from_meta(meta))
  images, _ = sources.load_arrays(f"folder:{folder}", HELDOUT, image_size=32)
  x = images.astype(np.float64) / 255.0
  recon, _ = jax.jit(vqgan.apply)(variables["tokenizer"], jnp.asarray(x, jnp.float32))
  mse = np.mean((np.clip(np.asarray(recon, np.float64), 0, 1) - x) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1.0 / mse)))


@pytest.mark.slow
def test_fine_tuning_improves_held_out_psnr_with_a_bit_identical_frozen_codebook(
  converted_tokenizer, fashion_png_folder, tmp_path
):
  workdir = tmp_path / "fine_tune"
  config = _fine_tune_config(fashion_png_folder, converted_tokenizer, steps=40, freeze=True)
  tokenizer_job.train_and_evaluate(config, str(workdir))
  before = json.loads((workdir / reconstruction.INIT_METRICS_FILE).read_text())
  after = json.loads((workdir / reconstruction.METRICS_FILE).read_text())
  print(f"held-out PSNR: {before['psnr']:.2f} dB before fine-tuning, {after['psnr']:.2f} dB after 40 steps")
  assert before["num_examples"] == after["num_examples"] == 96
  # The job's "before" is the converted tokenizer's (the eval resizes in float, this check from uint8: 0.1 dB).
  assert abs(before["psnr"] - _independent_psnr(converted_tokenizer, fashion_png_folder)) < 0.1
  assert after["psnr"] > before["psnr"] + 0.5, (before["psnr"], after["psnr"])
  (workdir / "reconstructions" / "init.png").stat()

  init_vars, init_meta = params_io.load(converted_tokenizer)
  tuned_vars, tuned_meta = params_io.load(str(workdir / "params"))
  start, tuned = init_vars["tokenizer"]["params"], tuned_vars["tokenizer"]["params"]
  codebook = tokenizer_step.codebook_of(tuned)
  assert codebook.dtype == np.float32 and np.array_equal(codebook, tokenizer_step.codebook_of(start))
  assert not np.array_equal(tuned["encoder"]["conv_in"]["kernel"], start["encoder"]["conv_in"]["kernel"])
  assert tuned_meta["codebook_frozen"] and tuned_meta["init"] == converted_tokenizer
  assert tuned_meta["tokenizer"] == init_meta["tokenizer"]
