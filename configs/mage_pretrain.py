"""MAGE pretraining on ImageNet-1k 256 px with the paper recipe (spec §3).

  python -m mage_jax.main --config=configs/mage_pretrain.py:variant=B --workdir=gs://bucket/mage_b \
      --config.input.manual_dir=/data/imagenet --config.tokenizer.init=ckpt/tokenizer

variant=B|L; `runlocal` shrinks everything for a quick local run.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant="B", runlocal=False, fsdp=1)
  c = common.base_pretrain_config()
  c.model.variant = args.variant
  c.mesh = [("data", -1), ("fsdp", args.fsdp), ("model", 1)]
  c.tokenizer.precision = "high"
  if args.variant == "L":
    # ViT-L at batch 4096 does not fit replicated: shard params and optimizer state (spec: ~410M params).
    c.model.scan = True
    c.model.remat_policy = "dots_with_no_batch_dims_saveable"
    c.tokenizer.chunks = 4
  if args.runlocal:
    c.input.batch_size = 8
    c.total_steps = 5
    c.log_every_steps = 1
    c.checkpoint_every_steps = 5
  return c
