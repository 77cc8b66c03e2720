"""Class-conditional MAGE on ImageNet-1k 256 px (MAGE paper, Appendix A.2), fine-tuned from an unconditional checkpoint.

  python -m mage_jax.main --config=configs/class_cond_imagenet.py:variant=B,init=ckpt/mage_b \
      --workdir=gs://bucket/mage_b_cond --config.input.manual_dir=/data/imagenet

`init` is a params dir (e.g. `python -m mage_jax.convert mage-vitb-1600.pth ckpt/mage_b`), whose tokenizer is
used. Only the decoder side and the label embedding train; the encoder is frozen. The fine-tuning schedule was
asked and never answered (LTH14/mage issue #7): epochs, lr and warm-up below are ASSUMED.
"""

from configs import class_cond_fashion_mnist, common


def get_config(arg=None):
  args = common.parse_arg(arg, variant="B", init="", runlocal=False, fsdp=1)
  c = common.base_pretrain_config()
  c.mode = "class_cond"
  c.model.variant = args.variant
  c.model_init = args.init
  c.mesh = common.mesh(args.fsdp)
  c.tokenizer.precision = "high"  # TF32-class convs keep the float32 ids (as configs/mage_pretrain.py)
  if args.variant == "L":
    c.model.scan = True
    c.model.remat_policy = "nothing_saveable"
  c.total_epochs = 50.0  # ASSUMED
  c.optim.warmup_epochs = 5.0  # ASSUMED
  c.class_cond = class_cond_fashion_mnist.class_cond_config(1000, 10)
  if args.runlocal:
    c.input.batch_size = 8
    c.total_steps = 5
    c.log_every_steps = 1
    c.checkpoint_every_steps = 5
    c.class_cond.grid_per_class = 2
    c.class_cond.grid_num_classes = 2
  return c
