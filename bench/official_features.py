"""Times the official modules computing linear-probe features, for `bench/side_by_side.py`.

Runs in the official code's venv (`bash ../shared/anchor/setup.sh`), with the anchor's `official_step.py`
helpers for its imports: the official MAGE module's frozen VQGAN encodes a batch of images to ids, then its
token embedding and encoder blocks run over every token (nothing masked), the tokens are mean-pooled and layer
normalised, as the official fine-tuning/probe ViT does with the pretrained encoder. Random weights, float32,
`torch.no_grad()`. Prints one JSON line: median seconds per batch and images/s.

  PY=$(bash ../shared/anchor/setup.sh)
  $PY bench/official_features.py --anchor ../shared/anchor --config CONFIG.json --batch 64
"""

import argparse
import functools
import importlib
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  ap.add_argument("--anchor", required=True)
  ap.add_argument("--config", required=True)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args()
  with open(os.path.abspath(args.config)) as f:
    cfg = json.load(f)
  anchor = os.path.abspath(args.anchor)
  sys.path.insert(0, anchor)
  official_step = importlib.import_module("official_step")
  torch.set_num_threads(args.threads)
  official_step._stub_imports()  # pylint: disable=protected-access
  sys.path.insert(0, os.path.join(anchor, "official"))
  workdir = tempfile.mkdtemp()
  official_step._write_vqgan_yaml(workdir, cfg["tokenizer"])  # pylint: disable=protected-access
  os.chdir(workdir)
  models_mage = importlib.import_module("models_mage")
  m = cfg["mage"]
  torch.manual_seed(0)
  model = models_mage.MaskedGenerativeEncoderViT(
    img_size=m["img_size"],
    patch_size=m["patch_size"],
    mlp_ratio=m["mlp_ratio"],
    norm_layer=functools.partial(torch.nn.LayerNorm, eps=m["layer_norm_eps"]),
    vqgan_ckpt_path=None,
    embed_dim=m["embed_dim"],
    depth=m["depth"],
    num_heads=m["num_heads"],
    decoder_embed_dim=m["decoder_embed_dim"],
    decoder_depth=m["decoder_depth"],
    decoder_num_heads=m["decoder_num_heads"],
  ).eval()
  fc_norm = torch.nn.LayerNorm(m["embed_dim"], eps=m["layer_norm_eps"])
  rng = np.random.default_rng(0)
  size = m["img_size"]
  times = []
  with torch.no_grad():
    for i in range(args.warmup + args.steps):
      x = torch.from_numpy(rng.random((args.batch, 3, size, size), dtype=np.float32))
      t0 = time.perf_counter()
      _, _, (_, _, ids) = model.vqgan.encode(x)
      ids = ids.reshape(args.batch, -1)
      tokens = torch.cat([torch.full((args.batch, 1), model.fake_class_label), ids], dim=1).long()
      h = model.token_emb(tokens)
      for block in model.blocks:
        h = block(h)
      feats = fc_norm(h[:, 1:].mean(dim=1))
      float(feats.sum())
      if i >= args.warmup:
        times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  print(
    json.dumps(
      {
        "impl": "official-pytorch",
        "what": "features",
        "threads": args.threads,
        "batch": args.batch,
        "median_s": med,
        "min_s": float(np.min(times)),
        "images_per_s": args.batch / med,
      }
    )
  )


if __name__ == "__main__":
  main()
