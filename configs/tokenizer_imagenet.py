"""VQGAN tokenizer training on ImageNet-1k 256 px with the released architecture (MaskGIT's `vqgan_tokenizer.py`).

  python -m mage_jax.main --config=configs/tokenizer_imagenet.py --workdir=gs://bucket/tokenizer \
      --config.input.manual_dir=/data/imagenet [--config.loss.perceptual_weights=/path/lpips_vgg16.npz]

Architecture: ch 128, ch_mult (1,1,2,2,4), 2 res blocks, 256-d latents, 1024 codes (the released
`vqgan_jax_strongaug` layout). Recipe: MaskGIT's JAX config (Adam β1 0, β2 0.99, lr 1e-4 for both nets held
constant, batch 256, 1M steps, EMA 0.999, commitment 0.25, entropy 0.1 at T 0.01, perceptual 0.1,
non-saturating GAN with generator weight 0.1, R1 10) plus LeCam 0.001. Choices not fixed by the sources:
  * reconstruction loss l2 (MaskGIT defines l1 and l2 and does not say which it used);
  * the discriminator starts at step 20k (MaskGIT states no start step; waiting for usable reconstructions
    is the usual practice and costs nothing before then);
  * augmentation: MAGE's pretraining crop (RandomResizedCrop scale 0.2-1 + flip) as the stand-in for the
    unpublished "strong augmentation" (LTH14/mage issue #6);
  * the perceptual network cannot be downloaded here: with `loss.perceptual_weights` empty (the default)
    training runs without it and the log says so. Pass an LPIPS-VGG16 .npz (`tokenizer_losses` layout).
Compute in bfloat16 for the convolutions of both nets; params, optimizer states, EMA, GroupNorm statistics,
quantizer distances and all losses stay float32.

`runlocal` shrinks it to a few steps at batch 8 and 32 px for a smoke run.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, perceptual="")
  c = common.base_pretrain_config()
  for key in ("model", "masking", "label_smoothing", "model_init", "tokenizer", "total_epochs"):
    del c[key]
  c.mode = "tokenizer"
  c.input.batch_size = 256
  c.input.image_size = 256
  c.input.augment = "pretrain"
  # init: a params dir holding a tokenizer to fine-tune (its sizes must match these); '' trains from scratch.
  c.tokenizer = ml_collections.ConfigDict(
    dict(
      init="",
      ch=128,
      ch_mult=(1, 1, 2, 2, 4),
      num_res_blocks=2,
      z_channels=256,
      codebook_size=1024,
      num_groups=32,
      commitment_cost=0.25,
      dtype="bfloat16",
    )
  )
  # None: the StyleGAN2 width table for the input resolution; or ((resolution, width), ...).
  c.discriminator = ml_collections.ConfigDict(dict(widths=None, channel_multiplier=1, dtype="bfloat16"))
  c.discriminator.widths = ml_collections.FieldReference(None, field_type=tuple)
  c.loss = ml_collections.ConfigDict(
    dict(
      rec_type="l2",
      rec_weight=1.0,
      entropy_weight=0.1,
      entropy_temperature=0.01,
      perceptual_weight=0.1,
      perceptual_weights=args.perceptual,
      adv_weight=0.1,
      disc_weight=1.0,
      gan_type="non_saturating",
      discriminator_start_step=20_000,
      lecam_weight=0.001,
      lecam_decay=0.999,
      r1_cost=10.0,
    )
  )
  # Codebook care by the loop (off: MaskGIT relies on the entropy loss); see tokenizer_step.CodebookConfig.
  # freeze: no update at all (fine-tuning that keeps the token ids of tokenizer.init).
  c.codebook = ml_collections.ConfigDict(
    dict(lr_multiplier=1.0, restart_every=0, usage_decay=0.99, dead_ratio=0.03, freeze=False)
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      d_lr=1e-4,
      b1=0.0,
      b2=0.99,
      eps=1e-8,
      warmup_steps=0,
      warmup_epochs=0.0,
      min_lr=1e-4,
      grad_clip_norm=0.0,
      ema_decay=0.999,
    )
  )
  c.total_steps = 1_000_000
  # The EMA generator's held-out metrics (evals/reconstruction.py). num_examples: images of each periodic eval;
  # final_examples: of the eval at the last step (0: the whole split).
  c.evals = ml_collections.ConfigDict()
  c.evals.reconstruction = dict(
    type="reconstruction",
    every_steps=10_000,
    split="validation",
    batch_size=256,
    num_examples=10_000,
    final_examples=0,
    num_images=16,
  )
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  if args.runlocal:
    c.input.batch_size = 8
    c.input.image_size = 32
    c.tokenizer.ch_mult = (1, 1, 2)
    c.tokenizer.ch = 32
    c.discriminator.widths = ((32, 32), (16, 64), (8, 64), (4, 64))
    c.loss.discriminator_start_step = 2
    c.total_steps = 5
    c.evals.reconstruction.update(dict(batch_size=8, num_examples=16, every_steps=5))
    c.log_every_steps = 1
    c.checkpoint_every_steps = 5
  return c
