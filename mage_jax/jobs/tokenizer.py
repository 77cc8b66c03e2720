"""VQGAN tokenizer training (MaskGIT's recipe; MAGE never published its own), from scratch or fine-tuned, on
the shared loop (`trainer.run`, config.mode='tokenizer').

Fine-tuning: `config.tokenizer.init` names a params dir holding a tokenizer (kind 'tokenizer' or 'mage', e.g.
`python -m mage_jax.convert vqgan_jax_strongaug.ckpt DIR`). The generator starts from it (its EMA too); its sizes
come from the dir's metadata (a `config.tokenizer` size that disagrees is an error listing the overrides that
match) at `config.input.image_size`. The released VQGAN has no discriminator: a fresh one starts at
`loss.discriminator_start_step` (the generator trains on reconstruction alone until then), with LeCam.
`config.codebook.freeze` keeps the codebook bit-identical (ids stay those of the original, for a MAGE trained on
it); otherwise `config.codebook.restart_every` can re-initialise the codes the new data leaves unused (from step
`restart_every` on, once their usage has been measured). Before the first step, the initial tokenizer is
evaluated on the held-out split (`eval_metrics_init.json`, `reconstructions/init.png`): the number to beat.

Generator = `models.vqgan.VQGAN`; discriminator = `models.discriminator.Discriminator` (StyleGAN2 style).
One step: the generator loss (reconstruction + VQ codebook/commitment + optional entropy + optional
perceptual + adversarial from `discriminator_start_step` on) is minimised with its own Adam; then one
discriminator step (non-saturating or hinge, LeCam, optional R1) on the same real batch and the
stop-gradient reconstructions, with a second Adam. Before the discriminator starts, its forward/backward
passes are skipped entirely (`lax.cond`), so the steps before it cost no discriminator compute. The generator weights
are tracked by an EMA (exported, and used for evaluation). Optionally (`config.codebook`) the loop also scales
the codebook's learning rate and restarts dead codes from batch latents (off in both shipped configs: the
entropy loss keeps the codes in use). A step whose losses or gradients are non-finite changes nothing but
the step counter (see `steps.apply_gradients`).

Precision: `tokenizer.dtype` / `discriminator.dtype` set the conv/dense compute dtype (bfloat16 on
accelerators). Whatever they are, params, optimizer states, the EMA, GroupNorm statistics, the quantizer
distances, every loss and the LeCam EMAs stay float32.

Outputs in the workdir: `checkpoints/` (full state: both nets, both optimizers, EMA, LeCam, rng),
`reconstructions/step_XXXXXXX.png` (held-out originals | reconstructions, per eval), `eval_metrics.json`
(the latest eval: PSNR, SSIM, codebook usage and perplexity on the held-out split) and, at the end,
`params/` (params-only EMA export, kind 'tokenizer') that MAGE pretraining reads with
`--config.tokenizer.init=<workdir>/params`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mage_jax import evals
from mage_jax.data import cached_tokens, pipeline
from mage_jax.evals import reconstruction
from mage_jax.models.discriminator import Discriminator
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.objectives import tokenizer_losses as tl
from mage_jax.train import builders, config_views, optim, params_io, sharding, tokenizer_step, trainer


def init_sizes(init_dir: str) -> dict:
  """The tokenizer sizes of a params dir (the `config.tokenizer` keys that describe it), from its metadata."""
  meta = params_io.read_meta(init_dir)
  sizes = dataclasses.asdict(params_io.tokenizer_config_from_meta(meta))
  del sizes["resolution"]  # the input resolution is config.input.image_size
  return sizes


def tokenizer_config(config: ml_collections.ConfigDict) -> VQGANConfig:
  """The generator's sizes at `config.input.image_size`: `config.tokenizer`'s, or with `tokenizer.init` the init
  dir's, which every size `config.tokenizer` sets must equal."""
  init = config.tokenizer.get("init", "")
  if not init:
    return builders.tokenizer_config(config.tokenizer, config.input.image_size)
  sizes = init_sizes(init)
  configured = {k: v for k, v in config.tokenizer.to_dict().items() if k not in builders.TOKENIZER_RUNTIME_KEYS}
  differ = {
    k: v for k, v in sizes.items() if k in configured and tuple(np.atleast_1d(configured[k])) != tuple(np.atleast_1d(v))
  }
  if differ:
    wrong = ", ".join(f"{k}={configured[k]}" for k in differ)
    fix = " ".join(
      f"--config.tokenizer.{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
      for k, v in differ.items()
    )
    raise ValueError(
      f"config.tokenizer sets {wrong}, but tokenizer.init={init} holds a tokenizer with "
      f"{', '.join(f'{k}={v}' for k, v in differ.items())}: its sizes cannot change when fine-tuning; "
      f"set {fix}"
    )
  return builders.tokenizer_config({**configured, **sizes}, config.input.image_size)


def initial_generator(init_dir: str, vqgan: VQGAN) -> dict:
  """The generator params of a params dir, checked against `vqgan`'s shapes."""
  variables, meta = params_io.load(init_dir)
  if "tokenizer" not in variables:
    raise ValueError(
      f"tokenizer.init={init_dir} holds no tokenizer (kind {meta.get('kind')!r}, entries {sorted(variables)})"
    )
  params = variables["tokenizer"]["params"]
  res = vqgan.config.resolution
  abstract = jax.eval_shape(vqgan.init, jax.random.key(0), jnp.zeros((1, res, res, vqgan.config.in_channels)))
  builders.check_param_shapes(params, sharding.strip_boxes(abstract)["params"], f"tokenizer.init={init_dir}")
  params_io.check_finite(params, init_dir)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def make_models(config: ml_collections.ConfigDict) -> tuple[VQGAN, Discriminator]:
  vq = VQGAN(tokenizer_config(config), dtype=config_views.dtype(config.tokenizer.get("dtype", "float32")))
  d = config.discriminator
  widths = None if not d.get("widths") else tuple((int(r), int(w)) for r, w in d.widths)
  disc = Discriminator(
    widths=widths,
    channel_multiplier=d.get("channel_multiplier", 1),
    dtype=config_views.dtype(d.get("dtype", "float32")),
  )
  return vq, disc


def scale_codebook_updates(multiplier: float) -> optax.GradientTransformation:
  """Multiplies the updates of the quantizer's codebook (the path holding 'quantize') by `multiplier`."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
      lambda p, u: u * multiplier if tokenizer_step.is_codebook(optim.path_str(p)) else u, updates
    ), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
  lr: float, total_steps: int, warmup_steps: int, o, codebook_lr_multiplier: float = 1.0, freeze_codebook: bool = False
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam (β1, β2 from `config.optim`) on a warm-up + cosine schedule down to `o.min_lr` (min_lr = lr gives
  MaskGIT's constant rate), after optional global-norm clipping; codebook steps scaled by the multiplier, or
  none at all with `freeze_codebook` (`optim.with_frozen`: the codebook is outside the optimizer)."""
  min_lr = min(o.min_lr, lr)
  schedule = optim.warmup_cosine_schedule(lr, max(total_steps, 1), min(warmup_steps, max(total_steps, 1)), min_lr)
  chain = []
  if o.get("grad_clip_norm", 0.0):
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  chain.append(optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8)))
  if codebook_lr_multiplier != 1.0:
    chain.append(scale_codebook_updates(codebook_lr_multiplier))
  return optim.with_frozen(optax.chain(*chain), tokenizer_step.is_codebook if freeze_codebook else None), schedule


# ------------------------------------------------------------------------------------------------------------
# Export and wiring.


def export_tokenizer(directory: str, ema_params, vq_config: VQGANConfig, extra_meta: dict | None = None) -> None:
  """Params-only export {'tokenizer': {'params': EMA}} that `builders.load_tokenizer` reads."""
  meta = {"kind": "tokenizer", "tokenizer": dataclasses.asdict(vq_config), **(extra_meta or {})}
  params_io.save(directory, {"tokenizer": {"params": jax.device_get(ema_params)}}, meta, overwrite=True)


def _report_perceptual(perceptual: tl.PerceptualLoss, loss) -> None:
  if perceptual.enabled and loss.perceptual_weight > 0:
    logging.info("%s, weight %g", perceptual.status, loss.perceptual_weight)
  else:
    reason = (
      perceptual.status
      if not perceptual.enabled
      else f"weights {perceptual.path} loaded but loss.perceptual_weight is 0"
    )
    # The weights cannot be downloaded here; the offline configs are tuned to train well without them.
    logging.warning(
      "%s (set config.loss.perceptual_weights to a local LPIPS-VGG16 .npz to enable it): "
      "training WITHOUT the perceptual term (reconstruction + VQ%s%s)",
      reason,
      " + entropy" if loss.entropy_weight else "",
      " + adversarial" if loss.use_gan else "",
    )


def build_task(config: ml_collections.ConfigDict, workdir: str, *, abstract: bool = False):
  """(task, mesh, rules) of tokenizer training in `workdir` (`trainer`'s contract); abstract: LPIPS weights as
  shapes, no init tokenizer, data or evaluator."""
  mesh, rules = trainer.mesh_and_rules(config)
  total_steps, warmup_steps = trainer.schedule_steps(config, lambda: pipeline.steps_per_epoch(config.input))
  loss = config_views.from_config(tokenizer_step.LossConfig, config.loss, "config.loss")
  vqgan, disc = make_models(config)
  init = "" if abstract else config.tokenizer.get("init", "")
  o = config.optim
  cb = config_views.from_config(
    tokenizer_step.CodebookConfig, config.get("codebook"), "config.codebook", restart_at_start=not init
  )
  g_tx, g_schedule = make_optimizer(o.lr, total_steps, warmup_steps, o, cb.lr_multiplier, cb.freeze)
  # D's Adam only counts its own updates (none before the start step), so its schedule spans the rest.
  d_span = total_steps - max(loss.discriminator_start_step, 0)
  d_tx, _ = make_optimizer(o.get("d_lr", o.lr), d_span, warmup_steps, o)
  if abstract and loss.perceptual_weights:  # the LPIPS network as a weights file gives it, in shapes
    shapes = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in tl.random_perceptual_weights().items()}
    perceptual = tl.PerceptualLoss(params=shapes, use_lin_heads=True, path=loss.perceptual_weights)
  elif abstract:
    perceptual = tl.PerceptualLoss.load(None)
  else:
    perceptual = tl.PerceptualLoss.load(loss.perceptual_weights or None)
    _report_perceptual(perceptual, loss)
  logging.info(
    "tokenizer %s: %d steps, %s, lr %.3g (D %.3g), warmup %d, EMA %.4g, GAN %s%s",
    f"fine-tuning from {init}" if init else "training",
    total_steps,
    vqgan.config,
    o.lr,
    o.get("d_lr", o.lr),
    warmup_steps,
    o.ema_decay,
    f"from step {loss.discriminator_start_step}" if loss.use_gan else "off",
    ", codebook frozen" if cb.freeze else "",
  )
  initial = {"generator": initial_generator(init, vqgan)} if init else None

  def reinit_after_params(state):
    generator = state.params["generator"]
    return state.replace(ema_params=jax.tree.map(jnp.copy, generator), g_opt_state=g_tx.init(generator))

  extra_meta = {"train_steps": total_steps, "ema_decay": float(o.ema_decay)}
  if init:
    extra_meta.update(init=os.path.abspath(init), codebook_frozen=cb.freeze)
  task = trainer.Task(
    init_state=functools.partial(tokenizer_step.init_state, vqgan=vqgan, disc=disc, g_tx=g_tx, d_tx=d_tx),
    step=functools.partial(
      tokenizer_step.train_step,
      vqgan=vqgan,
      disc=disc,
      g_tx=g_tx,
      d_tx=d_tx,
      loss=loss,
      ema_decay=float(o.ema_decay),
      g_schedule=g_schedule,
      codebook=cb,
    ),
    extras=perceptual,
    data=trainer.image_data(config, abstract),
    batch_spec=trainer.image_batch_spec(config),
    total_steps=total_steps,
    export=None
    if abstract
    else lambda state: export_tokenizer(os.path.join(workdir, "params"), state.ema_params, vqgan.config, extra_meta),
    initial_params=initial,
    reinit_after_params=reinit_after_params if init else None,
    evaluators=()
    if abstract
    else evals.during_training(
      config, evals.TrainingJob(config, workdir, mesh, total_steps, tokenizer=vqgan, params_of=lambda s: s.ema_params)
    ),
  )
  return task, mesh, rules


def evaluate_initial(task: trainer.Task, mesh, workdir: str, init: str) -> None:
  """The held-out metrics of the tokenizer a fine-tuning starts from (`reconstruction.INIT_METRICS_FILE`), once,
  with the first reconstruction evaluator of `config.evals`."""
  scorers = [e.run for e in task.evaluators if isinstance(e.run, reconstruction.Evaluator)]
  if not scorers or os.path.exists(os.path.join(workdir, reconstruction.INIT_METRICS_FILE)):
    return
  with jax.set_mesh(mesh):
    params = sharding.place(task.initial_params["generator"], sharding.replicated(mesh))
    scorers[0].evaluate(
      params,
      "init.png",
      reconstruction.INIT_METRICS_FILE,
      {"step": 0, "weights": "tokenizer.init", "init": os.path.abspath(init)},
      scorers[0].final_examples or None,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) tokenizer training in `workdir`; returns the last logged metrics."""
  cached_tokens.refuse_cached_input(config)
  start = time.perf_counter()
  task, mesh, rules = build_task(config, workdir)
  if task.initial_params is not None:
    evaluate_initial(task, mesh, workdir, config.tokenizer.init)
  metrics, _ = trainer.run(config, workdir, task, mesh, rules)
  logging.info("tokenizer training finished in %.1f s", time.perf_counter() - start)
  return metrics
