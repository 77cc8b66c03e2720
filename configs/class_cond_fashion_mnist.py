"""Class-conditional tiny MAGE on Fashion-MNIST (10 classes), fine-tuned from an unconditional tiny MAGE.

  python -m mage_jax.main --config=configs/class_cond_fashion_mnist.py:init=runs/fmnist_mage/params \
      --workdir=runs/fmnist_class_cond

The encoder stays frozen (MAGE paper, Appendix A.2); the decoder and the label embedding train. The run ends with
`workdir/class_grid.png` (one row per class). Schedule and lr are ASSUMED (the sources give none, LTH14/mage #7);
measured here (2-core CPU, from a 600-step tiny MAGE): at 4x the pretraining blr and 1500 steps the labels
lower the masked loss by ~0.2 nats (vs ~0.02 at 1x and 400 steps), and the grid's rows become class-like
with choice temperature 1.0 rather than MAGE's 4.5 (64 tokens per image, not 256).
"""

import ml_collections

from configs import common, fashion_mnist_tiny


def class_cond_config(num_classes, grid_num_classes, grid_temperature=4.5):
  """`config.class_cond` (see jobs/class_cond.py and models/class_cond.py)."""
  return ml_collections.ConfigDict(
    dict(
      num_classes=num_classes,
      combine="token",  # label embedding as an extra decoder token ('add': summed into every position)
      label_drop_prob=0.0,  # > 0 trains the no-label row (needed for guidance_scale > 0)
      guidance_scale=0.0,  # guidance-free sampling by default
      grid_per_class=8,
      grid_num_classes=grid_num_classes,
      grid_num_steps=12,
      grid_temperature=grid_temperature,
    )
  )


def get_config(arg=None):
  args = common.parse_arg(arg, init="", steps=1500, batch=64)
  c = fashion_mnist_tiny.get_config(f"steps={args.steps},batch={args.batch},monitor=False")
  c.mode = "class_cond"
  c.model_init = args.init  # required: the unconditional params dir (holds the tokenizer too)
  c.optim.blr = 1.5e-4 * 64  # 4x the tiny pretraining blr: only the decoder side trains (ASSUMED, see above)
  c.class_cond = class_cond_config(10, 10, grid_temperature=1.0)
  return c
