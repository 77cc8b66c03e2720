"""Tiny MAGE-C on Fashion-MNIST (32x32, 8x8 tokens): the contrastive variant of configs/fashion_mnist_tiny.py.

  python -m mage_jax.main --config=configs/mage_c_fashion_mnist.py:steps=2000 --workdir=runs/fmnist_mage_c \
      --config.tokenizer.init=runs/fmnist_tokenizer/params

Same model, optimizer, batch (images per step) and steps as the plain MAGE config, so the two can be compared
at the same budget (MAGE-C runs MAGE on 2 views, i.e. twice the sequences per step). Head widths are scaled
down for the 64-wide model (ASSUMED, as every contrastive value: see configs/mage_c_imagenet.py).
"""

from configs import common, fashion_mnist_tiny, mage_c_imagenet


def get_config(arg=None):
  args = common.parse_arg(arg, steps=2000, batch=64)
  c = fashion_mnist_tiny.get_config(f"steps={args.steps},batch={args.batch}")
  return mage_c_imagenet.as_mage_c(c, hidden_dim=256, out_dim=64)
