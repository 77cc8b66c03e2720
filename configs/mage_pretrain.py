"""MAGE pretraining on ImageNet-1k 256 px with the paper recipe (LTH14/mage README, `main_pretrain.py`).

  python -m mage_jax.main --config=configs/mage_pretrain.py:variant=B --workdir=gs://bucket/mage_b \
      --config.input.manual_dir=/data/imagenet --config.tokenizer.init=ckpt/tokenizer

variant=B|L; `runlocal` shrinks everything for a quick local run.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant="B", runlocal=False, fsdp=1)
  c = common.base_pretrain_config()
  c.model.variant = args.variant
  c.mesh = common.mesh(args.fsdp)
  c.tokenizer.precision = "high"
  # ~50 training images per class for the few-shot check (TFDS stores the train split shuffled), and a grid of
  # samples. FID: add dict(type="fid", reference="imagenet2012:validation", num_images=10_000, every_steps=...).
  c.evals.fewshot = dict(
    type="fewshot",
    every_steps=10_000,
    train_split="train[:50000]",
    test_split="validation[:10000]",
    shots=(1, 5, 10),
    batch_size=1024,
  )
  c.evals.samples = dict(type="sample_grid", every_steps=10_000, num_images=64, batch_size=64)
  if args.variant == "L":
    # ViT-L at batch 4096 does not fit replicated: shard params and optimizer state (~410M params).
    c.model.scan = True
    c.model.remat_policy = "dots_with_no_batch_dims_saveable"
    c.tokenizer.chunks = 4
  if args.runlocal:
    c.input.batch_size = 8
    c.total_steps = 5
    c.log_every_steps = 1
    c.checkpoint_every_steps = 5
    c.evals = ml_collections.ConfigDict()
  return c
