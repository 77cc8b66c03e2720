"""Probe / fine-tune backbone, matching `models_vit_mage.py` (`VisionTransformerMage`) of LTH14/mage.

Unmasked ids with the class slot go through the token embedding and the encoder blocks (no masking, no
dropping); features are the mean of the image-token outputs then a fresh `fc_norm` (global_pool=True), or the
pretrained final `norm` at the class slot (global_pool=False). The linear probe puts a BatchNorm without affine
(`head_bn`) in front of the `head` Dense, as the official linprobe does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mage_jax.models import layers
from mage_jax.models.mage import MAGEConfig, TokenEmbedding, block_kwargs

Dtype = Any


class MAGEViT(nn.Module):
  """Returns (logits [B, num_classes] f32, aux {'features': [B, D] pooled+normed, 'encoded': [B, 1+N, D]})."""

  config: MAGEConfig = MAGEConfig()
  num_classes: int = 1000
  global_pool: bool = True
  head_type: str = "linear"  # 'linear' (fine-tune) | 'bn_linear' (linear probe) | 'none' (features only)
  head_init_std: float = 2e-5
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    # timm blocks of the fine-tune model run without dropout (rates default to 0); the token embedding keeps
    # its 0.1 dropout, active whenever deterministic=False (as `models_vit_mage.py`, even while probing).
    self.token_emb = TokenEmbedding(
      c.vocab_size, c.max_position_embeddings, c.embed_dim, c.eps, c.dropout, self.dtype, self.param_dtype
    )
    kw = block_kwargs(c, c.num_heads, self.dtype, self.param_dtype, dropout=0.0, attn_dropout=0.0)
    self.blocks = (
      [layers.Block(**{**kw, "drop_path": rate}) for rate in self._drop_path_rates()]
      if not c.scan
      else layers.make_block_stack(c.depth, scan=True, remat_policy=c.remat_policy, **kw)
    )
    if self.global_pool:
      self.fc_norm = layers.layer_norm(c.eps, self.param_dtype, None)
    else:
      self.norm = layers.layer_norm(c.eps, self.param_dtype, None)
    if self.head_type == "bn_linear":
      self.head_bn = nn.BatchNorm(
        use_scale=False, use_bias=False, epsilon=1e-6, momentum=0.9, dtype=jnp.float32, axis_name=None
      )
    if self.head_type != "none":
      self.head = nn.Dense(
        self.num_classes,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
          nn.initializers.truncated_normal(self.head_init_std), ("embed", "classes")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
      )

  def _drop_path_rates(self):
    depth = self.config.depth
    # timm: linearly increasing stochastic depth over the blocks.
    return [self.drop_path * i / max(depth - 1, 1) for i in range(depth)]

  def features(self, ids, deterministic: bool = True):
    c = self.config
    slot = jnp.full((ids.shape[0], 1), c.fake_class_id, jnp.int32)
    x = self.token_emb(jnp.concatenate([slot, ids.astype(jnp.int32)], axis=1), deterministic)
    x = layers.run_block_stack(self.blocks, x, deterministic)
    if self.global_pool:
      pooled = self.fc_norm(jnp.mean(x[:, 1:].astype(jnp.float32), axis=1))
    else:
      pooled = self.norm(x)[:, 0]
    return pooled, x

  def __call__(self, ids, deterministic: bool = True, use_running_average: bool | None = None):
    features, encoded = self.features(ids, deterministic)
    h = features
    if self.head_type == "bn_linear":
      h = self.head_bn(h, use_running_average=deterministic if use_running_average is None else use_running_average)
    logits = self.head(h) if self.head_type != "none" else h
    return logits, {"features": features, "encoded": encoded}
