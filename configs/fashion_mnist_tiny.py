"""Tiny MAGE on Fashion-MNIST (32x32, 8x8 tokens): trains on 2 CPU cores. The quickstart's pretraining stage.

  python -m mage_jax.main --config=configs/fashion_mnist_tiny.py --workdir=runs/fmnist_mage \
      --config.tokenizer.init=runs/fmnist_tokenizer/params
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, steps=2000, batch=64)
  c = common.base_pretrain_config()
  c.input.name = "fashion_mnist"
  c.input.batch_size = args.batch
  c.input.image_size = 32
  c.model.variant = "tiny"
  c.model.dtype = "float32"
  c.model.dropout = 0.0
  c.model.attn_dropout = 0.0
  c.tokenizer.ch = 32
  c.tokenizer.ch_mult = (1, 2, 2)
  c.tokenizer.num_res_blocks = 1
  c.tokenizer.z_channels = 32
  c.tokenizer.codebook_size = 256
  c.optim.blr = 1.5e-4 * 16  # a tiny model at a tiny batch needs a larger step than the ImageNet recipe
  c.optim.warmup_steps = max(args.steps // 20, 1)
  c.total_steps = args.steps
  c.fewshot_monitor.update(dict(train_split="train[:2000]", test_split="test[:1000]", shots=(10,)))
  c.eval_every_steps = 500
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  return c
