"""Pure step functions (no jit here: `sharding.jit_train_step` binds the Python-level arguments and jits)."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mage_jax.models.tokenizer import Tokenizer
from mage_jax.objectives import masked_tokens, masking


@flax.struct.dataclass
class TrainState:
  """Arrays only, so orbax can save it and jit can shard/donate it.

  `first_nonfinite_step` is −1 until a step produces a non-finite loss or gradient; such updates are never
  applied, so the params stay the last good ones whatever the host does about it.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: checkpoint formats store plain arrays
  first_nonfinite_step: jax.Array
  skipped_steps: jax.Array

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng):
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=rng,
      first_nonfinite_step=jnp.full((), -1, jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32),
    )


def commit(state, finite, **updates):
  """`state` advanced by one step, with `updates` (field name -> new value) applied only where `finite`.

  A non-finite step changes nothing but the step counter and the non-finite bookkeeping, so the params stay
  the last good ones whatever the host does about it.
  """
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return state.replace(
    step=state.step + 1,
    **{name: keep_old(value, getattr(state, name)) for name, value in updates.items()},
    first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step),
    skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
  )


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, finite) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return commit(state, finite, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def all_finite(*values) -> jax.Array:
  """Whether every value (scalars or arrays) is finite: the guard `commit` takes in every training step."""
  return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(v)) for v in values])


def finish_step(state: TrainState, loss, grads, tx, *, schedule=None, metrics=None):
  """The common tail of every training step: gradient norm, finiteness, metrics, guarded update."""
  grad_norm = optax.tree.norm(grads)
  finite = all_finite(loss, grad_norm)
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32), **(metrics or {})}
  if schedule is not None:
    metrics["lr"] = schedule(state.step)
  return apply_gradients(state, grads, tx, finite), metrics


def map_in_chunks(fn, x, chunks: int):
  """`fn(x)` computed `chunks` slices at a time (lax.map), so only one slice's activations are live.

  Strided slices (example i goes to slice i % chunks) keep every slice spread over the batch-sharded devices;
  contiguous slices would put each slice on a few devices.
  """
  if chunks == 1:
    return fn(x)
  b = x.shape[0]
  if b % chunks:
    raise ValueError(f"batch {b} is not divisible by tokenizer chunks={chunks}")
  xs = jnp.swapaxes(x.reshape((b // chunks, chunks) + x.shape[1:]), 0, 1)
  ys = jax.lax.map(fn, xs)
  return jnp.swapaxes(ys, 0, 1).reshape((b,) + ys.shape[2:])


def tokenize(tokenizer: Tokenizer, tokenizer_vars, images, chunks: int = 1):
  """Frozen tokenizer inside the step: ids carry no gradient."""
  encode = lambda x: tokenizer.apply(tokenizer_vars, x, method="encode_to_ids")
  return jax.lax.stop_gradient(map_in_chunks(encode, images, chunks))


def pretrain_step(
  state: TrainState,
  tokenizer_vars,
  batch,
  *,
  model,
  tokenizer,
  tx,
  masking_cfg: dict,
  label_smoothing: float,
  schedule=None,
  tokenizer_chunks: int = 1,
):
  """One MAGE pretraining step on a global batch {'image': [B,H,W,3] in [0,1]}: tokenize, then `pretrain_update`.

  One masking ratio is drawn per step for the whole global batch (the official code draws one per process).
  """
  ids = tokenize(tokenizer, tokenizer_vars, batch["image"], tokenizer_chunks)
  return pretrain_update(
    state, ids, None, model=model, tx=tx, masking_cfg=masking_cfg, label_smoothing=label_smoothing, schedule=schedule
  )


def pretrain_ids_step(state: TrainState, extras, batch, **update_kwargs):
  """`pretrain_step` on cached token ids {'ids': int32 [B, N]}: no tokenizer (`extras` is unused)."""
  del extras
  return pretrain_update(state, batch["ids"], None, **update_kwargs)


def pretrain_update(
  state: TrainState,
  ids,
  plan: masking.MaskPlan | None,
  *,
  model,
  tx,
  masking_cfg: dict,
  label_smoothing: float,
  schedule=None,
):
  """One MAGE update on token ids: the masked-token objective (`masked_tokens.objective`), gradient, guarded
  optimizer step.

  Args:
    state: the train state.
    ids: int32 [B, N] tokenizer ids (inputs and targets).
    plan: the masks to use, or None to draw them from the state's key (one ratio for the batch), as
      `pretrain_step` does. Replays of recorded runs inject the recorded masks here.
    model: the MAGE module.
    tx: its optimizer.
    masking_cfg: `masking.sample_plan` keywords, used when `plan` is None.
    label_smoothing: of the masked-token loss.
    schedule: the lr schedule, reported as metrics['lr'].

  Returns:
    (new state, metrics): loss, grad_norm (before clipping), finite, mask_ratio (the drawn ratio, or the
    fraction of masked tokens of an injected plan), lr (with a schedule).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  loss_fn = lambda params: masked_tokens.objective(
    model, params, ids, rng, masking_cfg=masking_cfg, label_smoothing=label_smoothing, plan=plan
  )
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return finish_step(state, loss, grads, tx, schedule=schedule, metrics={"mask_ratio": aux["mask_ratio"]})
