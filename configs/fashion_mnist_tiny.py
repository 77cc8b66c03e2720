"""Tiny MAGE on Fashion-MNIST (32x32, 8x8 tokens): trains on 2 CPU cores. The quickstart's pretraining stage.

  python -m mage_jax.main --config=configs/fashion_mnist_tiny.py --workdir=runs/fmnist_mage \
      --config.tokenizer.init=runs/fmnist_tokenizer/params [--config.input.tokens=runs/fmnist_tokens]

Args (`:steps=2000,batch=64,width=64,...`), the recipe the quickstart sweeps (docs/quickstart_recipe.md):
  steps, batch: optimizer steps and global batch;
  width, depth, decoder_depth, heads: the encoder and decoder (equal widths and heads, MLP ratio 4);
  blr, warmup: base lr (lr = blr·batch/256) and the warm-up as a fraction of the steps, then cosine to 0;
  mask_min, mask_mu, mask_std: the truncated Gaussian of the masking ratio (on [mask_min, 1]);
  smoothing: label smoothing of the masked-token loss;
  crop_min: smallest area fraction of the random-resized crop (ImageNet's 0.2 zooms a centred garment until the
    samples imitate the zoom);
  monitor: the evaluators during training (`config.evals`: few-shot and a sample grid every 500 steps).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(
    arg,
    steps=2000,
    batch=64,
    width=64,
    depth=2,
    decoder_depth=2,
    heads=4,
    blr=1.5e-4 * 16,
    warmup=0.05,
    mask_min=0.5,
    mask_mu=0.55,
    mask_std=0.25,
    smoothing=0.1,
    crop_min=0.2,
    monitor=True,
  )
  c = common.base_pretrain_config()
  c.input.name = "fashion_mnist"
  c.input.batch_size = args.batch
  c.input.image_size = 32
  c.input.scale = (args.crop_min, 1.0)
  c.model.variant = "tiny"
  c.model.embed_dim = args.width
  c.model.depth = args.depth
  c.model.num_heads = args.heads
  c.model.decoder_embed_dim = args.width
  c.model.decoder_depth = args.decoder_depth
  c.model.decoder_num_heads = args.heads
  c.model.dtype = "float32"
  c.model.dropout = 0.0
  c.model.attn_dropout = 0.0
  c.tokenizer.ch = 32
  c.tokenizer.ch_mult = (1, 2, 2)
  c.tokenizer.num_res_blocks = 1
  c.tokenizer.z_channels = 32
  c.tokenizer.codebook_size = 256
  # A tiny model at a tiny batch needs a larger step than the ImageNet recipe's blr 1.5e-4.
  c.optim.blr = args.blr
  c.optim.warmup_steps = max(int(args.steps * args.warmup), 1)
  c.masking.update(dict(min_ratio=args.mask_min, mu=args.mask_mu, std=args.mask_std))
  c.label_smoothing = args.smoothing
  c.total_steps = args.steps
  if args.monitor:  # 10-shot ridge on the encoder's features, and a grid of samples
    c.evals.fewshot = dict(
      type="fewshot", every_steps=500, train_split="train[:2000]", test_split="test[:1000]", shots=(10,)
    )
    c.evals.samples = dict(type="sample_grid", every_steps=500, num_images=32, batch_size=32, num_steps=12)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  return c
