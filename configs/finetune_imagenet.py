"""Fine-tuning a MAGE encoder on ImageNet-1k with the paper recipe (LTH14/mage README, `main_finetune.py`).

  python -m mage_jax.evaluate --params=ckpt/mage_vitb --config=configs/finetune_imagenet.py:variant=B \
      --workdir=gs://bucket/mage_b_ft --config.finetune.input.manual_dir=/data/imagenet

variant=B: 100 epochs, layer decay 0.65, drop path 0.1; variant=L: 50 epochs, 0.75, 0.2. Both: batch 1024,
blr 2.5e-4 (lr 1e-3), 5 warm-up epochs, min lr 1e-6, AdamW wd 0.05, Mixup 0.8 / CutMix 1.0 (switch 0.5,
per 32-image group like the reference's per-GPU batches), label smoothing 0.1, timm RandAugment
rand-m9-mstd0.5-inc1 after the crop and flip. `runlocal` shrinks it.
"""

import ml_collections

from configs import common

RECIPE = {"B": dict(epochs=100, layer_decay=0.65, drop_path=0.1), "L": dict(epochs=50, layer_decay=0.75, drop_path=0.2)}


def finetune_section(variant: str = "B") -> ml_collections.ConfigDict:
  """The `finetune` section read by mage_jax.finetune (trainer keys + the recipe)."""
  if variant not in RECIPE:
    raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(RECIPE)}")
  r = RECIPE[variant]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = common.MESH
  c.sharding_rules = ""
  # image_size 0: the checkpoint tokenizer's resolution (256 for the released models).
  c.input = ml_collections.ConfigDict(
    dict(
      name="imagenet2012",
      split="train",
      data_dir=common.optional_str(),
      manual_dir=common.optional_str(),
      batch_size=1024,
      image_size=0,
      augment="pretrain",
      interpolation="bicubic",
      scale=(0.2, 1.0),
      crop_ratio=256 / 292,
      eval_interpolation="bicubic",
      rand_augment="rand-m9-mstd0.5-inc1",
      num_workers=0,
      download=False,
    )
  )
  c.eval_split = "validation"
  c.eval_batch_size = 1024
  c.num_classes = 1000
  c.global_pool = True
  c.drop_path = r["drop_path"]
  c.head_init_std = 2e-5
  c.dtype = "bfloat16"
  c.total_epochs = float(r["epochs"])
  c.total_steps = 0
  c.optim = ml_collections.ConfigDict(
    dict(
      blr=2.5e-4,
      warmup_epochs=5.0,
      warmup_steps=-1,
      min_lr=1e-6,
      layer_decay=r["layer_decay"],
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
    )
  )
  c.mixup = ml_collections.ConfigDict(
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1, group_size=32)
  )
  c.log_every_steps = 100
  c.checkpoint_every_steps = 0  # 0: every epoch
  c.eval_every_steps = 0  # 0: every epoch
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  c.nonfinite = "stop"
  c.profile_steps = 0
  return c


def get_config(arg=None):
  args = common.parse_arg(arg, variant="B", runlocal=False)
  c = ml_collections.ConfigDict()
  c.evals = ("finetune",)
  c.seed = 0
  c.finetune = finetune_section(args.variant)
  if args.runlocal:
    c.finetune.input.batch_size = 8
    c.finetune.eval_batch_size = 8
    c.finetune.eval_split = "validation[:16]"
    c.finetune.total_steps = 4
    c.finetune.optim.warmup_steps = 1
    c.finetune.mixup.group_size = 0
    c.finetune.log_every_steps = 1
  return c
