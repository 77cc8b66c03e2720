"""MAGE encoder-decoder, matching `models_mage.py` of LTH14/mage.

Parameter names follow the PyTorch state_dict (`blocks.3.attn.qkv.weight` -> `blocks_3/attn/qkv/kernel`) so
checkpoint conversion is a rename plus transposes. Unused tensors of the official module (sin-cos tables,
`cls_token`, `mask_token`, `patch_embed`, `decoder_pred`) do not exist here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mage_jax.models import layers
from mage_jax.objectives.masking import MaskPlan

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MAGEConfig:
  """Sizes and ids of the masked transformer. Defaults: ViT-B, vocabulary of the released checkpoints."""

  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  decoder_embed_dim: int = 768
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  codebook_size: int = 1024
  vocab_size: int = 2025  # 1024 codes + 1000 (unused) class slots + 1 mask id
  fake_class_id: int = 1100
  mask_id: int = 2024
  num_tokens: int = 256
  max_position_embeddings: int = 257
  eps: float = 1e-6
  mlm_eps: float = 1e-5  # the MLM head's LayerNorm keeps PyTorch's default eps
  dropout: float = 0.1
  attn_dropout: float = 0.1
  scan: bool = False
  remat_policy: str = "none"
  attention: str = "xla"

  def __post_init__(self):
    counts = {
      "embed_dim": self.embed_dim,
      "depth": self.depth,
      "num_heads": self.num_heads,
      "decoder_embed_dim": self.decoder_embed_dim,
      "decoder_depth": self.decoder_depth,
      "decoder_num_heads": self.decoder_num_heads,
      "num_tokens": self.num_tokens,
    }
    bad = {k: v for k, v in counts.items() if not isinstance(v, int) or v < 1}
    if bad:
      raise ValueError(f"MAGE sizes must be positive integers, got {bad}")
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
      if counts[width] % counts[heads]:
        raise ValueError(f"{heads}={counts[heads]} does not divide {width}={counts[width]}")
    if not self.mlp_ratio > 0 or not (0 <= self.dropout < 1 and 0 <= self.attn_dropout < 1):
      raise ValueError(
        f"need mlp_ratio > 0 and dropouts in [0, 1), got {self.mlp_ratio}, {self.dropout}, {self.attn_dropout}"
      )
    if self.max_position_embeddings < self.num_tokens + 1:
      raise ValueError(
        f"max_position_embeddings={self.max_position_embeddings} is smaller than the sequence "
        f"length num_tokens+1={self.num_tokens + 1}"
      )
    for name in ("fake_class_id", "mask_id"):
      if not self.codebook_size <= getattr(self, name) < self.vocab_size:
        raise ValueError(
          f"{name}={getattr(self, name)} must lie in [codebook_size, vocab_size) = "
          f"[{self.codebook_size}, {self.vocab_size})"
        )
    if self.fake_class_id == self.mask_id:
      raise ValueError("fake_class_id and mask_id must differ")
    if self.attention not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention={self.attention!r} is not one of {layers.ATTENTION_IMPLEMENTATIONS}")


VARIANTS = {
  "tiny": dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
  "B": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8, decoder_num_heads=16),
  "L": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8, decoder_num_heads=16),
}


def config_for(variant: str, **overrides) -> MAGEConfig:
  if variant not in VARIANTS:
    raise ValueError(f"unknown MAGE variant {variant!r}; known: {sorted(VARIANTS)}")
  return MAGEConfig(**{**VARIANTS[variant], **overrides})


class TokenEmbedding(nn.Module):
  """BERT-style embedding: LN(word[ids] + learned position[0..L-1]) then dropout."""

  vocab_size: int
  max_positions: int
  embed_dim: int
  eps: float = 1e-6
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    embed = lambda n, axes: nn.Embed(
      n,
      self.embed_dim,
      param_dtype=self.param_dtype,
      dtype=self.param_dtype,
      embedding_init=nn.with_logical_partitioning(layers.normal02, axes),
    )
    self.word_embeddings = embed(self.vocab_size, ("vocab", "embed"))
    self.position_embeddings = embed(self.max_positions, ("positions", "embed"))
    self.LayerNorm = layers.layer_norm(self.eps, self.param_dtype, None)
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, ids, deterministic: bool):
    positions = self.position_embeddings.embedding[: ids.shape[1]]
    x = self.word_embeddings(ids).astype(jnp.float32) + positions.astype(jnp.float32)
    return self.drop(self.LayerNorm(x), deterministic=deterministic).astype(self.dtype)


class MlmLayer(nn.Module):
  """BERT MLM head tied to the token embedding: LN(gelu(fc(h))) @ sg(W_word)ᵀ + bias."""

  embed_dim: int
  vocab_size: int
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.fc = layers.dense(self.embed_dim, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name=None)
    self.ln = layers.layer_norm(self.eps, self.param_dtype, None, axis_name="mlp")
    self.bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "vocab")),
      (1, 1, self.vocab_size),
      self.param_dtype,
    )

  def __call__(self, h, word_embeddings, rows: int | None = None):
    """Logits [B, L, rows] over the first `rows` ids of the vocabulary (all of it when None)."""
    h = self.ln(layers.gelu(self.fc(h))).astype(self.dtype)
    rows = self.vocab_size if rows is None else rows
    # The official port reads `word_embeddings.weight.data.detach()`: no gradient through the output side.
    table = jax.lax.stop_gradient(word_embeddings[:rows]).astype(self.dtype)
    if self.dtype != self.param_dtype:
      # Cast on each device's shard, then gathered (under FSDP) once in the compute dtype: the backward's
      # float32-cotangent product reads this copy instead of gathering the float32 table.
      table = nn.with_logical_constraint(nn.with_logical_constraint(table, ("vocab", "embed")), ("vocab", None))
    logits = jnp.einsum("bld,vd->blv", h, table, preferred_element_type=jnp.float32)
    return logits + self.bias[..., :rows].astype(jnp.float32)


def block_kwargs(c: MAGEConfig, num_heads, dtype, param_dtype, *, dropout=None, attn_dropout=None, drop_path=0.0):
  return dict(
    num_heads=num_heads,
    mlp_ratio=c.mlp_ratio,
    eps=c.eps,
    attention=c.attention,
    dropout=c.dropout if dropout is None else dropout,
    attn_dropout=c.attn_dropout if attn_dropout is None else attn_dropout,
    drop_path=drop_path,
    dtype=dtype,
    param_dtype=param_dtype,
  )


class MAGE(nn.Module):
  """Masked generative encoder: token ids in, logits over the vocabulary out.

  Methods (call through `apply(..., method=...)`):
    `__call__(ids, plan, deterministic, targets_only)`: pretraining pass with masking/dropping; logits
      [B, 1+N, V], or with `targets_only` [B, N, codebook_size]: only what the loss reads.
    `full_sequence(tokens, deterministic)`: nothing dropped; tokens [B, 1+N] hold the class slot and mask ids
      where unknown; returns (logits [B, 1+N, V], encoder output [B, 1+N, D]) — the generation pass.
    `image_token_logits(tokens)`: the generation pass for image tokens [B, N] with mask ids; logits over the
      real ids only, [B, N, codebook_size] (sampling reads nothing else).
  """

  config: MAGEConfig = MAGEConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    self.token_emb = TokenEmbedding(
      c.vocab_size, c.max_position_embeddings, c.embed_dim, c.eps, c.dropout, self.dtype, self.param_dtype
    )
    self.blocks = layers.make_block_stack(
      c.depth, scan=c.scan, remat_policy=c.remat_policy, **block_kwargs(c, c.num_heads, self.dtype, self.param_dtype)
    )
    self.norm = layers.layer_norm(c.eps, self.param_dtype, None)
    self.decoder_embed = layers.dense(
      c.decoder_embed_dim, ("embed", "decoder_embed"), dtype=self.dtype, param_dtype=self.param_dtype, name=None
    )
    self.decoder_pos_embed_learned = self.param(
      "decoder_pos_embed_learned",
      nn.with_logical_partitioning(layers.normal02, (None, "positions", "decoder_embed")),
      (1, c.num_tokens + 1, c.decoder_embed_dim),
      self.param_dtype,
    )
    self.decoder_blocks = layers.make_block_stack(
      c.decoder_depth,
      scan=c.scan,
      remat_policy=c.remat_policy,
      **block_kwargs(c, c.decoder_num_heads, self.dtype, self.param_dtype),
    )
    self.decoder_norm = layers.layer_norm(c.eps, self.param_dtype, None, axis_name="decoder_embed")
    self.mlm_layer = MlmLayer(c.embed_dim, c.vocab_size, c.mlm_eps, self.dtype, self.param_dtype)

  def _with_class_slot(self, image_tokens):
    slot = jnp.full((image_tokens.shape[0], 1), self.config.fake_class_id, jnp.int32)
    return jnp.concatenate([slot, image_tokens.astype(jnp.int32)], axis=1)

  def encode(self, tokens, keep_idx, deterministic: bool):
    """Embeds the full sequence (positions attached before dropping), keeps `keep_idx`, runs the encoder."""
    x = self.token_emb(tokens, deterministic)
    if keep_idx is not None:
      x = jnp.take_along_axis(x, keep_idx[:, :, None], axis=1)
    x = layers.run_block_stack(self.blocks, x, deterministic)
    return self.norm(x)

  def decoder_input(self, encoded, keep_idx, masked_full):
    """Decoder canvas: every dropped or masked position gets the class-slot output (`forward_decoder` of
    `models_mage.py`), plus the learned decoder positions. Returns float32 [B, 1+N, Dd]."""
    y = self.decoder_embed(encoded.astype(self.dtype))
    cls = y[:, :1]
    if keep_idx is None:
      canvas = y
    else:
      canvas = jnp.broadcast_to(cls, (y.shape[0], masked_full.shape[1], y.shape[2]))
      canvas = jax.vmap(lambda c, i, v: c.at[i].set(v))(canvas, keep_idx, y)
    canvas = jnp.where(masked_full[:, :, None], cls, canvas)
    return canvas.astype(jnp.float32) + self.decoder_pos_embed_learned.astype(jnp.float32)

  def decoder_head(self, x, deterministic: bool, *, skip: int = 0, targets_only: bool = False):
    """Decoder blocks, norm and the tied MLM head on a decoder input [B, L, Dd].

    `skip` leading positions are left out of the norm and the head (both act per position, so this equals
    slicing the logits). `targets_only` also leaves out the class slot and every id outside the codebook:
    logits [B, L - skip - 1, codebook_size]. The loss and sampling read nothing else, and on small models the
    2,025-way head over every position is a large share of the step.
    """
    x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "seq", "embed_act"))
    x = layers.run_block_stack(self.decoder_blocks, x, deterministic)
    skip += int(targets_only)
    rows = self.config.codebook_size if targets_only else None
    return self.mlm_layer(self.decoder_norm(x[:, skip:]), self.token_emb.word_embeddings.embedding, rows)

  def decode(self, encoded, keep_idx, masked_full, deterministic: bool, targets_only: bool = False):
    return self.decoder_head(
      self.decoder_input(encoded, keep_idx, masked_full), deterministic, targets_only=targets_only
    )

  def __call__(self, ids, plan: MaskPlan, deterministic: bool = True, targets_only: bool = False):
    """Pretraining pass. ids: int32 [B, N] tokenizer ids.

    Returns (logits, aux): logits float32 [B, 1+N, V], or with `targets_only` [B, N, codebook_size] (the image
    positions over the real ids: the loss's operand; `losses.masked_token_loss` takes either).
    """
    c = self.config
    tokens = self._with_class_slot(jnp.where(plan.masked, c.mask_id, ids))
    masked_full = jnp.pad(plan.masked, ((0, 0), (1, 0)))
    encoded = self.encode(tokens, plan.keep_idx, deterministic)
    logits = self.decode(encoded, plan.keep_idx, masked_full, deterministic, targets_only)
    return logits, {"encoded": encoded}

  def full_sequence(self, tokens, deterministic: bool = True):
    encoded = self.encode(tokens, None, deterministic)
    logits = self.decode(encoded, None, tokens == self.config.mask_id, deterministic)
    return logits, encoded

  def image_token_logits(self, image_tokens):
    tokens = self._with_class_slot(image_tokens)
    encoded = self.encode(tokens, None, True)
    return self.decode(encoded, None, tokens == self.config.mask_id, True, targets_only=True)

  def encoder_features(self, ids, deterministic: bool = True):
    """Encoder output for unmasked ids [B, N] (nothing dropped): [B, 1+N, D]."""
    return self.encode(self._with_class_slot(ids), None, deterministic)
