"""Analytic FLOP counts of MAGE pretraining, generation and the VQGAN tokenizer, per image.

Conventions (the ones behind the issue's reference figures): 2 FLOPs per multiply-accumulate; only
matrix products and convolutions count (attention's QKᵀ and PV included; norms, activations, softmax,
embedding gathers, pooling and the optimizer update are left out); a trained forward pass costs ×3
(forward + backward with respect to activations and weights); the frozen tokenizer costs one forward.

At 256 px with the released sizes this gives ViT-B pretraining 291 GFLOP/img (of which the tokenizer
encoder 129; 162 on cached token ids), ViT-L pretraining 534, ViT-B generation with 20 steps 1743 (20 × 78 +
187 for the VQGAN decoder); `tests/test_bench.py` checks these within 2% of the official code's figures,
which compute the 2,025-way head over all 257 positions.
"""

from __future__ import annotations

import dataclasses

from mage_jax.models.mage import MAGEConfig
from mage_jax.models.vqgan import VQGANConfig
from mage_jax.objectives import masking


def _conv(h: int, w: int, c_in: int, c_out: int, k: int) -> float:
  """Stride-1 'same' convolution on an h×w map."""
  return 2.0 * h * w * k * k * c_in * c_out


def _res_block(res: int, c_in: int, c_out: int) -> float:
  # conv1 (c_in→c_out), conv2 (c_out→c_out), and the 1×1 shortcut on the OUTPUT (c_out→c_out) when the
  # channel count changes (the MaskGIT quirk, see vqgan.ResBlock).
  flops = _conv(res, res, c_in, c_out, 3) + _conv(res, res, c_out, c_out, 3)
  if c_in != c_out:
    flops += _conv(res, res, c_out, c_out, 1)
  return flops


def tokenizer_encoder_flops(c: VQGANConfig, image_size: int | None = None) -> float:
  """VQGAN encoder (conv_in, down levels, mid, conv_out) for one image."""
  res = c.resolution if image_size is None else image_size
  flops = _conv(res, res, c.in_channels, c.ch, 3)
  ch = c.ch
  for level, mult in enumerate(c.ch_mult):
    for _ in range(c.num_res_blocks):
      flops += _res_block(res, ch, c.ch * mult)
      ch = c.ch * mult
    if level != len(c.ch_mult) - 1:
      res //= 2
  flops += 2 * _res_block(res, ch, ch)
  return flops + _conv(res, res, ch, c.z_channels, 1)


def quantizer_flops(c: VQGANConfig, image_size: int | None = None) -> float:
  """Distances of every latent to every codebook entry (the z·eᵀ product)."""
  res = c.resolution if image_size is None else image_size
  grid = res // 2 ** (len(c.ch_mult) - 1)
  return 2.0 * grid * grid * c.codebook_size * c.z_channels


def tokenizer_forward_flops(c: VQGANConfig, image_size: int | None = None) -> float:
  """Images → ids: encoder + nearest-code search."""
  return tokenizer_encoder_flops(c, image_size) + quantizer_flops(c, image_size)


def tokenizer_decoder_flops(c: VQGANConfig, image_size: int | None = None) -> float:
  """VQGAN decoder (conv_in, mid, up levels with their upsampling convs, conv_out) for one image."""
  res = (c.resolution if image_size is None else image_size) // 2 ** (len(c.ch_mult) - 1)
  ch = c.ch * c.ch_mult[-1]
  flops = _conv(res, res, c.z_channels, ch, 3) + 2 * _res_block(res, ch, ch)
  for level in reversed(range(len(c.ch_mult))):
    for _ in range(c.num_res_blocks):
      flops += _res_block(res, ch, c.ch * c.ch_mult[level])
      ch = c.ch * c.ch_mult[level]
    if level != 0:
      res *= 2
      flops += _conv(res, res, ch, ch, 3)
  return flops + _conv(res, res, ch, c.out_ch, 3)


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
  """One pre-norm ViT block on `tokens` tokens: qkv + proj + MLP products, and QKᵀ + PV."""
  hidden = int(dim * mlp_ratio)
  linear = 2.0 * tokens * (4 * dim * dim + 2 * dim * hidden)
  return linear + 4.0 * tokens * tokens * dim


def mage_forward_flops(c: MAGEConfig, encoder_tokens: int, decoder: bool = True) -> float:
  """One MAGE forward pass: encoder on `encoder_tokens`, then (with `decoder`) the decoder on the 1+N sequence
  and the MLM head on the N image positions over the codebook (`targets_only`: all the loss and sampling read)."""
  seq = c.num_tokens + 1
  flops = c.depth * block_flops(encoder_tokens, c.embed_dim, c.mlp_ratio)
  if not decoder:
    return flops
  flops += 2.0 * encoder_tokens * c.embed_dim * c.decoder_embed_dim  # decoder_embed
  flops += c.decoder_depth * block_flops(seq, c.decoder_embed_dim, c.mlp_ratio)
  flops += 2.0 * c.num_tokens * c.decoder_embed_dim * c.embed_dim  # MLM fc
  return flops + 2.0 * c.num_tokens * c.embed_dim * c.codebook_size  # tied output projection


def pretrain_encoder_tokens(c: MAGEConfig, drop_ratio: float = 0.5) -> int:
  """Class slot + the tokens the encoder keeps (a fixed count: masking drops ceil(N·drop_ratio))."""
  return 1 + c.num_tokens - masking.num_dropped(c.num_tokens, drop_ratio)


@dataclasses.dataclass(frozen=True)
class FlopCounts:
  """FLOPs per image of each benchmarked workload."""

  tokenizer_forward: float
  tokenizer_decode: float
  mage_train_forward: float
  mage_generation_step: float
  pretrain: float  # tokenizer forward + 3 × MAGE forward on the dropped sequence
  pretrain_cached: float  # 3 × MAGE forward: the step on cached token ids (input.tokens)
  generation: float  # num_steps × full-sequence forward + tokenizer decode
  encode: float  # tokenizer forward alone
  num_steps: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def flop_counts(
  model: MAGEConfig,
  tokenizer: VQGANConfig,
  *,
  num_steps: int = 20,
  drop_ratio: float = 0.5,
  image_size: int | None = None,
) -> FlopCounts:
  """Every per-image count the benchmark reports, from the two configs.

  Raises:
    ValueError: the tokenizer's token grid does not match the model's token count.
  """
  res = tokenizer.resolution if image_size is None else image_size
  grid = res // 2 ** (len(tokenizer.ch_mult) - 1)
  if grid * grid != model.num_tokens:
    raise ValueError(f"tokenizer makes {grid * grid} tokens at {res} px but the model expects {model.num_tokens}")
  tok_fwd = tokenizer_forward_flops(tokenizer, res)
  tok_dec = tokenizer_decoder_flops(tokenizer, res)
  train_fwd = mage_forward_flops(model, pretrain_encoder_tokens(model, drop_ratio))
  gen_step = mage_forward_flops(model, model.num_tokens + 1)
  return FlopCounts(
    tokenizer_forward=tok_fwd,
    tokenizer_decode=tok_dec,
    mage_train_forward=train_fwd,
    mage_generation_step=gen_step,
    pretrain=tok_fwd + 3.0 * train_fwd,
    pretrain_cached=3.0 * train_fwd,
    generation=num_steps * gen_step + tok_dec,
    encode=tok_fwd,
    num_steps=num_steps,
  )
