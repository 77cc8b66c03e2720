"""The masked-token objective that MAGE pretraining, MAGE-C and the class-conditional decoder share: draw the
masks of the step (`masking.sample_plan`, the config's law), run the model on the ids with those masks, score its
predictions of the masked ids (`losses.masked_token_loss`). Each job adds to it, not around it: MAGE-C a
contrastive term on the encoder's output, the class-conditional decoder a label input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mage_jax.objectives import losses, masking

# What the step key is folded with for each use; jobs fold their own draws (colour jitter, label dropout) with
# other numbers.
MASK_KEY, DROPOUT_KEY = 0, 1


def objective(
  model,
  params,
  ids,
  rng,
  *model_inputs,
  masking_cfg,
  label_smoothing: float,
  plan: masking.MaskPlan | None = None,
  deterministic: bool = False,
):
  """(loss, aux) of `model` on token ids int32 [B, N].

  Args:
    model, params: a MAGE-like module (called as `model(ids, plan, *model_inputs, deterministic)`) and its params.
    rng: the step's key; the masks use fold_in(rng, MASK_KEY) (one ratio for the batch), dropout
      fold_in(rng, DROPOUT_KEY).
    masking_cfg: `masking.sample_plan` keywords, used when `plan` is None.
    plan: masks to use instead of drawing them (replays of recorded runs inject the recorded masks).

  Returns:
    loss: the label-smoothed cross-entropy over the masked ids (float32 scalar).
    aux: the model's aux ('encoded'), the 'plan', and 'mask_ratio' (the drawn ratio, or the fraction of masked
      tokens of an injected plan).
  """
  if plan is None:
    plan, ratio = masking.sample_plan(jax.random.fold_in(rng, MASK_KEY), ids.shape[0], ids.shape[1], **masking_cfg)
  else:
    ratio = jnp.mean(plan.masked.astype(jnp.float32))
  logits, aux = model.apply(
    {"params": params},
    ids,
    plan,
    *model_inputs,
    deterministic,
    targets_only=True,
    rngs={"dropout": jax.random.fold_in(rng, DROPOUT_KEY)},
  )
  loss = losses.masked_token_loss(
    logits, ids, plan.masked, codebook_size=model.config.codebook_size, label_smoothing=label_smoothing
  )
  return loss, {**aux, "plan": plan, "mask_ratio": ratio}
