"""Pretraining loss, as `models_mage.py` of LTH14/mage computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_cross_entropy(logits, targets, label_smoothing: float = 0.1):
  """Cross-entropy against `(1 − ls)·onehot + ls/K` per position, in float32.

  Args:
    logits: [..., K] (already restricted to the K codebook entries).
    targets: int [...].
  Returns:
    [...] float32 losses.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)


def masked_token_loss(logits, ids, masked, *, codebook_size: int, label_smoothing: float = 0.1):
  """MAGE reconstruction loss: mean over every masked token of the batch.

  The softmax spans only the first `codebook_size` logits (the official fix "compatible with JAX pre-trained
  model"); the class slot is excluded.

  Args:
    logits: [B, 1+N, V] model output including the class slot, or [B, N, codebook_size] (the model's
      `targets_only` output, which is that slice).
    ids: int [B, N] tokenizer ids (targets).
    masked: bool [B, N].
  """
  if logits.shape[1] == ids.shape[1] + 1:
    logits = logits[:, 1:]
  if logits.shape[1] != ids.shape[1] or logits.shape[2] < codebook_size:
    raise ValueError(f"logits {logits.shape} do not cover {ids.shape[1]} tokens x {codebook_size} codes")
  per_token = smoothed_cross_entropy(logits[..., :codebook_size], ids, label_smoothing)
  weights = masked.astype(jnp.float32)
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)
