"""Linear probe and few-shot evals of a MAGE checkpoint on ImageNet-1k with the paper settings (LTH14/mage README).

  python -m mage_jax.evaluate --params=ckpt/mage_vitb --config=configs/eval_imagenet.py:variant=B \
      --workdir=gs://bucket/mage_b_eval --config.input.manual_dir=/data/imagenet

Linear probe (main_linprobe.py): global-pool features (fc_norm frozen at identity), BatchNorm1d(affine=False,
eps 1e-6) + Linear (std 0.01), LARS (momentum 0.9, trust 0.001, wd 0), batch 4096, blr 0.1 (B) / 0.05 (L),
90 epochs with 10 warm-up, cosine to 0, per-128-image BatchNorm statistics (the reference's per-GPU batch),
'probe' augmentation (single-draw RandomResizedCrop 0.2-1 + flip) recomputed through the frozen backbone
every step with the token-embedding dropout on. `augment=none` switches to cached features (much cheaper;
not the paper protocol). Few-shot: see docs/evals.md for what is assumed.
"""

import ml_collections

from configs import common

BLR = {"B": 0.1, "L": 0.05}


def get_config(arg=None):
  args = common.parse_arg(arg, variant="B", augment="probe", runlocal=False)
  if args.variant not in BLR:
    raise ValueError(f"unknown variant {args.variant!r}; expected one of {sorted(BLR)}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = common.MESH
  c.sharding_rules = ""
  c.evals = ("linear_probe", "fewshot")
  c.baseline_pixels = False
  c.num_classes = 1000
  c.dtype = "bfloat16"  # the reference probes under AMP; the tokenizer always runs in float32
  c.global_pool = True
  # The train split's pipeline (batch_size: the feature-extraction batch; image_size 0: the checkpoint
  # tokenizer's resolution; scale: the 'probe' crop).
  c.input = ml_collections.ConfigDict(
    dict(
      name="imagenet2012",
      split="train",
      data_dir=common.optional_str(),
      manual_dir=common.optional_str(),
      download=False,
      batch_size=1024,
      image_size=0,
      crop_ratio=256 / 292,
      interpolation="bicubic",
      eval_interpolation="bicubic",
      num_workers=0,
      scale=(0.2, 1.0),
    )
  )
  c.eval_split = "validation"
  c.samples = common.samples_section("imagenet2012:validation")
  c.features = ml_collections.ConfigDict(dict(cache=True))
  c.linear_probe = ml_collections.ConfigDict(
    dict(
      epochs=90,
      warmup_epochs=10.0,
      batch_size=4096,
      blr=BLR[args.variant],
      min_lr=0.0,
      momentum=0.9,
      weight_decay=0.0,
      bn_group_size=128,
      head_init_std=0.01,
      eval_every_epochs=1,
      augment=args.augment,
      dropout=True,
      stop_after_epochs=0,
    )
  )
  # Assumed protocol (docs/evals.md): MSN-style logistic regression on frozen features for 1/2/5 images per
  # class and ~1% labels (13/class), plus the big_vision ridge monitor; 3 support draws.
  c.fewshot = ml_collections.ConfigDict(
    dict(
      shots=(1, 2, 5, 10, 13), trials=3, classifiers=("logreg", "ridge"), train_split="", l2_ridge=-1.0, l2_logreg=-1.0
    )
  )
  if args.runlocal:
    c.input.split = "train[:64]"
    c.eval_split = "validation[:32]"
    c.input.batch_size = 8
    c.linear_probe.update(dict(epochs=2, warmup_epochs=1.0, batch_size=16, bn_group_size=0))
    c.evals = ("linear_probe",)  # few-shot needs every class in the pool
  return c
