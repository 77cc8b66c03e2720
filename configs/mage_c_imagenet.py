"""MAGE-C (MAGE + contrastive co-training, from the paper) on ImageNet-1k 256 px, recipe of `main_pretrain.py`.

  python -m mage_jax.main --config=configs/mage_c_imagenet.py:variant=B --workdir=gs://bucket/mage_c_b \
      --config.input.manual_dir=/data/imagenet --config.tokenizer.init=ckpt/tokenizer

variant=B|L; `runlocal` shrinks everything for a quick local run. The MAGE-C code was never released: every
`contrastive.*` and `views.*` value below is ASSUMED (SimCLR-style defaults, no MAGE source) and configurable,
e.g. `--config.contrastive.lam=0.05 --config.views.jitter_prob=0.8 --config.views.brightness=0.4`.
The two views come from the input pipeline (`input.views=2`, the pretraining crop law on the original image).
"""

import ml_collections

from configs import mage_pretrain


def contrastive_config(hidden_dim=2048, out_dim=128):
  """`config.contrastive`: loss = rec + lam * NT-Xent(head(pool(encoder output)) / temperature). ASSUMED values."""
  return ml_collections.ConfigDict(
    dict(
      lam=0.1,  # ASSUMED weight of the contrastive term
      temperature=0.1,  # ASSUMED (SimCLR at large batch)
      pool="mean",  # 'mean' | 'cls' | 'mean_visible'; paper (recalled, unverified): global average pool
      hidden_dim=hidden_dim,
      out_dim=out_dim,  # ASSUMED SimCLR v1 widths
      num_layers=2,  # paper (recalled, unverified): a 2-layer MLP head
      norm="none",
    )
  )  # 'none' | 'layer'


def views_config():
  """`config.views`: colour augmentation of each view, on device (jobs/mage_c.ColorAugment). ASSUMED: none."""
  return ml_collections.ConfigDict(
    dict(jitter_prob=0.0, brightness=0.0, contrast=0.0, saturation=0.0, grayscale_prob=0.0)
  )


def as_mage_c(c, **head):
  """Turns a MAGE pretraining config into a MAGE-C one: two views per image, each an independent draw of the
  pretraining crop law (input.augment, scale, ratio) made by the input pipeline."""
  c.mode = "mage_c"
  c.input.views = 2
  c.contrastive = contrastive_config(**head)
  c.views = views_config()
  return c


def get_config(arg=None):
  # The MAGE pretraining config of the same variant (mesh, ViT-L scan/remat/tokenizer chunks, runlocal), as MAGE-C.
  return as_mage_c(mage_pretrain.get_config(arg))
