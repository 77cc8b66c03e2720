"""Class-conditional tiny MAGE on Fashion-MNIST (10 classes), fine-tuned from an unconditional tiny MAGE.

  python -m mage_jax.main --config=configs/class_cond_fashion_mnist.py:init=runs/fmnist_mage/params \
      --workdir=runs/fmnist_class_cond

The encoder stays frozen (spec §5.4); the decoder and the label embedding train. The run ends with
`workdir/class_grid.png` (one row per class). Schedule and lr are ASSUMED (the sources give none, spec §9.7).
"""

import ml_collections

from configs import common
from configs import fashion_mnist_tiny


def class_cond_config(num_classes, grid_num_classes):
  """`config.class_cond` (see train_variants / models/class_cond.py)."""
  return ml_collections.ConfigDict(dict(
      num_classes=num_classes,
      combine="token",        # label embedding as an extra decoder token ('add': summed into every position)
      label_drop_prob=0.0,    # > 0 trains the no-label row (needed for guidance_scale > 0)
      guidance_scale=0.0,     # guidance-free sampling by default
      grid_per_class=8, grid_num_classes=grid_num_classes, grid_num_steps=12, grid_temperature=4.5))


def get_config(arg=None):
  args = common.parse_arg(arg, init="", steps=1000, batch=64)
  c = fashion_mnist_tiny.get_config(f"steps={args.steps},batch={args.batch}")
  c.mode = "class_cond"
  c.model_init = args.init  # required: the unconditional params dir (holds the tokenizer too)
  c.class_cond = class_cond_config(10, 10)
  return c
