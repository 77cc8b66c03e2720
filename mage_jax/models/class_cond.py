"""Class-conditional MAGE (MAGE paper, Appendix A.2): a label embedding joins the decoder input; the encoder is frozen.

What the sources fix (the maintainer in LTH14/mage issues #16 and #7): the 1000 "class slots" of the vocabulary
stay unused; a SEPARATE label embedding is "concatenated with the decoder input (the padded feature)"; the fake
class token 1100 is still fed to the encoder, which is kept frozen during class-conditional training. Everything
else (schedule, guidance, whether dropout runs in the frozen encoder) is unknown (no released code; issue #7
asked for the schedule, unanswered) and is a documented choice here:

* `class_combine='token'` (default): the label embedding (width `decoder_embed_dim`) is CONCATENATED to the
  decoder input as one extra token in front of the padded, position-embedded canvas; the decoder blocks attend
  to it; its output is dropped before the decoder norm and the MLM head, so logits keep the [B, 1+N, V] layout.
  It gets no position embedding (it is the only token of its kind). This is the literal reading of
  "concatenated with the decoder input". `class_combine='add'` adds the embedding to every canvas position
  instead (a cheaper alternative, no extra token).
* The encoder (token embedding, encoder blocks, final norm) runs deterministically (no dropout) under
  `stop_gradient`: it is a frozen feature extractor. The training code also keeps these params out of the
  optimizer (`ENCODER_PARAM_PATTERNS`), so weight decay cannot move them either. The MLM head reads the token
  embedding table through `stop_gradient` already (`models_mage.py` detaches it), so that table gets no gradient at all.
* The label table has `num_classes + 1` rows: row `num_classes` is the "no label" entry used for
  unconditional logits. Training with label dropout (`label_drop_prob > 0` in the trainer) teaches it; only
  then is classifier-free guidance meaningful. Default: guidance-free (`guidance_scale = 0`), i.e. sampling
  uses the conditional logits alone. With `guidance_scale = w > 0` the logits are
  `uncond + (1 + w) * (cond - uncond)` (MUSE-style guidance on logits).

Checkpoints: `meta['model']` holds every `ClassCondConfig` field (so `num_classes` > 0 marks a class-conditional
model) and the label table lives at `variables['model']['params']['class_emb']['embedding']`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mage_jax.models import layers
from mage_jax.models.mage import MAGE, MAGEConfig
from mage_jax.objectives.masking import MaskPlan
from mage_jax.train import config_views

Dtype = Any

COMBINE_MODES = ("token", "add")
# Param subtrees of the frozen encoder, as '/'-joined paths (loop layout `blocks_3/...`, scan layout `blocks/...`).
ENCODER_PARAM_PATTERNS = (r"^token_emb(/|$)", r"^blocks(_\d+)?(/|$)", r"^norm(/|$)")


@dataclasses.dataclass(frozen=True)
class ClassCondConfig(MAGEConfig):
  """MAGEConfig plus the label embedding.

  Attributes:
    num_classes: number of real classes C >= 1 (labels 0..C-1; the table has C+1 rows, row C = no label).
    class_combine: 'token' (extra decoder token, default) or 'add' (added to every decoder position).
    guidance_scale: default classifier-free guidance w >= 0 for sampling; 0 = guidance-free.
  """

  num_classes: int = 1000
  class_combine: str = "token"
  guidance_scale: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1 for a class-conditional model, got {self.num_classes}")
    if self.class_combine not in COMBINE_MODES:
      raise ValueError(f"class_combine must be one of {COMBINE_MODES}, got {self.class_combine!r}")
    if self.guidance_scale < 0:
      raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

  @property
  def null_class(self) -> int:
    """Label id of the unconditional ("no label") embedding row."""
    return self.num_classes


def class_cond_config(base: MAGEConfig, **fields) -> ClassCondConfig:
  """ClassCondConfig with the architecture of `base` and the given class-conditional fields."""
  return ClassCondConfig(**{**dataclasses.asdict(base), **fields})


def config_from_meta(meta: dict) -> ClassCondConfig:
  """ClassCondConfig from a params checkpoint's `meta['model']` (JSON lists become tuples).

  Raises:
    ValueError: no model entry, not class-conditional, or fields this version does not know.
  """
  fields = meta.get("model")
  if not isinstance(fields, dict):
    raise ValueError(f"checkpoint meta has no 'model' dict (kind={meta.get('kind')!r})")
  if not fields.get("num_classes"):
    raise ValueError("checkpoint is class-unconditional (meta model.num_classes is absent or 0)")
  return config_views.from_config(ClassCondConfig, fields, "checkpoint meta['model']")


def init_class_embedding(rng: jax.Array, config: ClassCondConfig, dtype=jnp.float32) -> dict:
  """Fresh params of the `class_emb` submodule ({'embedding': [C+1, Dd]}, Normal(0, 0.02) like every table)."""
  return {"embedding": layers.normal02(rng, (config.num_classes + 1, config.decoder_embed_dim), dtype)}


class ClassCondMAGE(MAGE):
  """MAGE whose decoder also sees a class label (module docstring).

  Methods (through `apply(..., method=...)`):
    `__call__(ids, plan, labels, deterministic)`: training pass (frozen encoder); (logits [B,1+N,V], aux).
    `full_sequence(tokens, labels, deterministic)`: generation pass, nothing dropped.
    `image_token_logits(image_tokens, labels=None, guidance_scale=None)`: logits [B, N, V] for sampling.
    `encoder_features(ids)`: inherited; the encoder is the unconditional one, so probing is unchanged.
  """

  config: ClassCondConfig = ClassCondConfig()

  def setup(self):
    super().setup()
    c = self.config
    if not isinstance(c, ClassCondConfig):
      raise ValueError(f"ClassCondMAGE needs a ClassCondConfig, got {type(c).__name__}")
    self.class_emb = nn.Embed(
      c.num_classes + 1,
      c.decoder_embed_dim,
      dtype=self.param_dtype,
      param_dtype=self.param_dtype,
      embedding_init=nn.with_logical_partitioning(layers.normal02, ("classes", "decoder_embed")),
    )

  def frozen_encode(self, tokens, keep_idx):
    """The frozen encoder: no dropout, no gradient."""
    return jax.lax.stop_gradient(self.encode(tokens, keep_idx, True))

  def decode_with_labels(self, encoded, keep_idx, masked_full, labels, deterministic: bool, targets_only: bool = False):
    """MAGE's decoder (`forward_decoder` of `models_mage.py`) with the label embedding joined to its input.

    Args:
      encoded: [B, K, D] encoder output (K = 1 + kept tokens, or 1 + N when nothing is dropped).
      keep_idx: int32 [B, K] positions of `encoded` in the full sequence, or None when nothing is dropped.
      masked_full: bool [B, 1+N], True where the decoder input is replaced by the class-slot output.
      labels: int [B] in [0, num_classes]; num_classes = no label.
      deterministic: disables decoder dropout.
      targets_only: logits of the image positions over the codebook only (`MAGE.decoder_head`).

    Returns:
      float32 logits [B, 1+N, V], or [B, N, codebook_size] with `targets_only`.
    """
    x = self.decoder_input(encoded, keep_idx, masked_full)
    label = self.class_emb(labels.astype(jnp.int32)).astype(jnp.float32)[:, None, :]  # [B, 1, Dd]
    if self.config.class_combine == "add":
      return self.decoder_head(x + label, deterministic, targets_only=targets_only)
    # The label token attends in the blocks, then is left out of the norm and head.
    return self.decoder_head(jnp.concatenate([label, x], axis=1), deterministic, skip=1, targets_only=targets_only)

  def __call__(self, ids, plan: MaskPlan, labels, deterministic: bool = True, targets_only: bool = False):
    """Training pass. ids int32 [B, N], labels int [B]. Returns (logits [B, 1+N, V] f32, or [B, N,
    codebook_size] with `targets_only`; aux)."""
    c = self.config
    tokens = self._with_class_slot(jnp.where(plan.masked, c.mask_id, ids))
    masked_full = jnp.pad(plan.masked, ((0, 0), (1, 0)))
    encoded = self.frozen_encode(tokens, plan.keep_idx)
    logits = self.decode_with_labels(encoded, plan.keep_idx, masked_full, labels, deterministic, targets_only)
    return logits, {"encoded": encoded}

  def full_sequence(self, tokens, labels=None, deterministic: bool = True):
    """tokens int32 [B, 1+N] (class slot first, mask ids where unknown). Returns (logits, encoded)."""
    labels = self._labels_or_null(labels, tokens.shape[0])
    encoded = self.frozen_encode(tokens, None)
    logits = self.decode_with_labels(encoded, None, tokens == self.config.mask_id, labels, deterministic)
    return logits, encoded

  def _labels_or_null(self, labels, batch):
    if labels is None:
      return jnp.full((batch,), self.config.null_class, jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    return jnp.broadcast_to(labels, (batch,))

  def image_token_logits(self, image_tokens, labels=None, guidance_scale=None):
    """Sampling logits for image tokens int32 [B, N] (mask ids where unknown).

    Args:
      image_tokens: int32 [B, N].
      labels: int [B] (or a scalar, broadcast) class ids in [0, num_classes); None = unconditional (the
        no-label row, meaningful only if the model was trained with label dropout).
      guidance_scale: classifier-free guidance w >= 0; None uses `config.guidance_scale` (default 0:
        guidance-free, conditional logits only). A Python 0 skips the unconditional pass entirely.

    Returns:
      float32 logits [B, N, codebook_size].
    """
    w = self.config.guidance_scale if guidance_scale is None else guidance_scale
    tokens = self._with_class_slot(image_tokens)
    masked_full = tokens == self.config.mask_id
    encoded = self.frozen_encode(tokens, None)
    cond_labels = self._labels_or_null(labels, tokens.shape[0])
    cond = self.decode_with_labels(encoded, None, masked_full, cond_labels, True, targets_only=True)
    if labels is None or (isinstance(w, (int, float)) and w == 0):
      return cond
    uncond = self.decode_with_labels(
      encoded, None, masked_full, self._labels_or_null(None, tokens.shape[0]), True, targets_only=True
    )
    return uncond + (1.0 + jnp.asarray(w, jnp.float32)) * (cond - uncond)
