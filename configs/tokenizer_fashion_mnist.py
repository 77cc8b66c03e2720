"""Tiny VQGAN tokenizer on Fashion-MNIST (32x32 -> 8x8 tokens) that trains on 2 CPU cores in minutes.

  python -m mage_jax.main --config=configs/tokenizer_fashion_mnist.py --workdir=runs/fmnist_tokenizer

The quickstart's first stage: MAGE pretraining (configs/fashion_mnist_tiny.py) reads the export with
`--config.tokenizer.init=runs/fmnist_tokenizer/params` (sizes come from the export's metadata).
Sizes: ch 32, ch_mult (1,1,2), 1 res block, 32-d latents, 1024 codes, GroupNorm with 8 groups (32 groups
would be one channel per group at 32 channels). ch_mult (1,2,2) costs 1.6x the FLOPs for no gain within the
time budget; 1024 codes reconstruct better than 256 and the entropy loss keeps them in use.

Departures from the ImageNet recipe, for minutes of CPU instead of 1M accelerator steps (tuned on 2 cores):
  * batch 8 (at equal compute, 8 beat 16 and 32 by 0.2 and 1.3 dB), 4000 steps, Adam lr 3e-3 with β1 0.9,
    5% warm-up then cosine decay to 0; EMA 0.99 (0.999 would still average in the early, poor weights);
  * reconstruction weight 4 (l2), i.e. lighter VQ/commitment/entropy terms relative to it: weights 2 and 4
    gave +0.7 and +1.1 dB over 1 at 4000 steps, all codes still in use;
  * no discriminator by default (`disc` turns it on from the middle of the run, with LeCam): at this scale
    the adversarial term does not help PSNR and doubles the step time;
  * no perceptual loss (no weights offline; the log says so; `perceptual=/path.npz` enables it), no R1;
  * augmentation: horizontal flips of the whole image only (augment 'pretrain' with crop scale (1, 1)), as
    Fashion-MNIST items are centred and the test split is evaluated whole (crop_ratio 1: 28 -> 32 resize).

Fine-tuning a converted tokenizer instead of training one: `--config.tokenizer.init=DIR` with the checkpoint's
sizes (the error message lists the `--config.tokenizer.*` values to set), `disc` for a fresh discriminator from
mid-run, and `--config.codebook.freeze=true` to keep its codebook (see mage_jax/jobs/tokenizer.py);
`python -m mage_jax.quickstart --tokenizer_init=DIR` does all of it.

Args (`:steps=4000,batch=8,disc,perceptual=/path.npz,eval_every=1000`).
"""

from configs import common, tokenizer_imagenet


def get_config(arg=None):
  args = common.parse_arg(arg, steps=4000, batch=8, disc=False, perceptual="", eval_every=1000)
  c = tokenizer_imagenet.get_config()
  c.input.name = "fashion_mnist"
  c.input.batch_size = args.batch
  c.input.image_size = 32
  c.input.augment = "pretrain"
  c.input.scale = (1.0, 1.0)
  c.input.ratio = (1.0, 1.0)
  c.input.crop_ratio = 1.0
  c.input.eval_interpolation = "bicubic"
  c.tokenizer.ch = 32
  c.tokenizer.ch_mult = (1, 1, 2)
  c.tokenizer.num_res_blocks = 1
  c.tokenizer.z_channels = 32
  c.tokenizer.codebook_size = 1024
  c.tokenizer.num_groups = 8
  c.tokenizer.dtype = "float32"  # bf16 convolutions are slower than float32 on CPU
  c.discriminator.widths = ((32, 32), (16, 64), (8, 64), (4, 64))
  c.discriminator.dtype = "float32"
  c.loss.rec_type = "l2"
  c.loss.rec_weight = 4.0
  c.loss.entropy_weight = 0.1
  c.loss.perceptual_weight = 0.1 if args.perceptual else 0.0
  c.loss.perceptual_weights = args.perceptual
  c.loss.discriminator_start_step = args.steps // 2 if args.disc else -1
  c.loss.r1_cost = 0.0
  c.loss.lecam_weight = 0.001
  c.optim.lr = 3e-3
  c.optim.d_lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = max(args.steps // 20, 1)
  c.optim.ema_decay = 0.99
  c.total_steps = args.steps
  # batch 512: divisible by any power-of-two device count; the split is padded
  c.evals.reconstruction.update(dict(split="test", batch_size=512, num_examples=1000, every_steps=args.eval_every))
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  return c
