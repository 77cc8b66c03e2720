"""Representation evals of the quickstart's tiny MAGE on Fashion-MNIST, beside raw pixels (CPU, minutes).

  python -m mage_jax.evaluate --params=runs/fmnist_mage/params --config=configs/eval_fashion_mnist.py \
      --workdir=runs/fmnist_eval

Args (`--config=...py:train=2000,test=1000,epochs=5`): train / test = number of examples used (0: the whole
60000 / 10000 split); epochs of the linear probe; augment='none' (cached features, fast) or 'probe' (the
official protocol: augmented images through the backbone every step); finetune=True adds fine-tuning for
`ft_steps` steps. The probe uses the paper's head and optimizer (BN + linear, LARS, warm-up + cosine) with a
larger base lr: the paper's blr 0.1 relies on ~28k steps at lr 1.6, and LARS moves each weight matrix by
only ~lr*1e-3 of its norm per step.
"""

import ml_collections

from configs import common, finetune_imagenet


def get_config(arg=None):
  args = common.parse_arg(arg, train=0, test=0, epochs=10, augment="none", finetune=False, ft_steps=300, batch=256)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = common.MESH
  c.sharding_rules = ""
  c.evals = ("linear_probe", "fewshot") + (("finetune",) if args.finetune else ())
  c.baseline_pixels = True
  c.num_classes = 10
  c.dtype = "float32"
  c.global_pool = True
  train_split = f"train[:{args.train}]" if args.train else "train"
  test_split = f"test[:{args.test}]" if args.test else "test"
  # The train split's pipeline (batch_size: the feature-extraction batch; image_size 0: the checkpoint
  # tokenizer's resolution; scale: the 'probe' crop). crop_ratio 1: the 28x28 image is resized to the
  # tokenizer's 32x32 whole (no center crop).
  c.input = ml_collections.ConfigDict(
    dict(
      name="fashion_mnist",
      split=train_split,
      data_dir=common.optional_str(),
      manual_dir=common.optional_str(),
      download=False,
      batch_size=256,
      image_size=0,
      crop_ratio=1.0,
      interpolation="bicubic",
      eval_interpolation="bicubic",
      num_workers=0,
      scale=(0.2, 1.0),
    )
  )
  c.eval_split = test_split
  # 'fid', 'sfid', 'precision_recall', 'sample_grid' in evals: the quickstart's sampling, against the test split.
  c.samples = common.samples_section("fashion_mnist:test", num_images=1000, num_steps=12, temperature=4.5)
  c.features = ml_collections.ConfigDict(dict(cache=True))
  c.linear_probe = ml_collections.ConfigDict(
    dict(
      epochs=args.epochs,
      warmup_epochs=max(args.epochs / 9, 0.0),
      batch_size=args.batch,
      blr=5.0,
      min_lr=0.0,
      momentum=0.9,
      weight_decay=0.0,
      bn_group_size=0,
      head_init_std=0.01,
      eval_every_epochs=1,
      augment=args.augment,
      dropout=True,
      stop_after_epochs=0,
    )
  )
  c.fewshot = ml_collections.ConfigDict(
    dict(shots=(1, 2, 5, 10), trials=5, classifiers=("ridge", "logreg"), train_split="", l2_ridge=-1.0, l2_logreg=-1.0)
  )
  ft = finetune_imagenet.finetune_section("B")
  ft.input.update(dict(name="fashion_mnist", split=train_split, batch_size=64, crop_ratio=1.0))
  ft.eval_split = test_split
  ft.eval_batch_size = 256
  ft.num_classes = 10
  ft.dtype = "float32"
  ft.total_steps = args.ft_steps
  ft.optim.warmup_steps = max(args.ft_steps // 10, 1)
  ft.optim.blr = 1e-3  # tiny model, tiny batch: larger than the ImageNet 2.5e-4
  ft.mixup.group_size = 0
  ft.log_every_steps = 50
  ft.checkpoint_every_steps = 0
  ft.eval_every_steps = 0
  c.finetune = ft
  return c
