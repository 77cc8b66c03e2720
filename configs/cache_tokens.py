"""Token cache: the frozen tokenizer's ids of K augmented views of every training image, for `input.tokens`.

  python -m mage_jax.main --config=configs/cache_tokens.py:base=fashion_mnist_tiny,views=8 \
      --workdir=runs/fmnist_tokens --config.tokenizer.init=runs/fmnist_tokenizer/params
  python -m mage_jax.main --config=configs/fashion_mnist_tiny.py --workdir=runs/fmnist_mage_cached \
      --config.tokenizer.init=runs/fmnist_tokenizer/params --config.input.tokens=runs/fmnist_tokens

The input and tokenizer sections (and seed, mesh) are those of the pretraining config `base` (mage_pretrain or
fashion_mnist_tiny), so the views follow its crop law and the ids its tokenizer; pretraining refuses a cache
written by another tokenizer. Rerunning the command finishes an interrupted cache (see docs/cached_tokens.md).

Args (`:base=mage_pretrain,views=10,batch=256,shard_batches=100`): `batch` examples (of `views` images each) per
encoded global batch, `shard_batches` batches per shard file.
"""

import importlib

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, base="mage_pretrain", views=10, batch=256, shard_batches=100)
  if args.base not in ("mage_pretrain", "fashion_mnist_tiny"):
    raise ValueError(f"base={args.base!r}: expected mage_pretrain or fashion_mnist_tiny")
  base = importlib.import_module(f"configs.{args.base}").get_config()
  c = ml_collections.ConfigDict()
  c.mode = "cache_tokens"
  c.seed = base.seed
  c.input = base.input
  c.input.batch_size = args.batch
  c.tokenizer = base.tokenizer
  c.cache = ml_collections.ConfigDict(dict(views=args.views, shard_examples=args.batch * args.shard_batches))
  c.mesh = common.MESH
  c.num_devices = 0  # 0: all devices of all processes
  c.distributed = base.distributed
  return c
