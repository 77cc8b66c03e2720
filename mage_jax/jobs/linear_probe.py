"""Linear probing of frozen MAGE features, as `main_linprobe.py` of LTH14/mage, on the shared loop.

The head (`probe.init_head` / `probe.bn_linear_head`: BatchNorm1d(affine=False, eps 1e-6) -> Linear) is trained
with LARS (`optim.probe_optimizer`), warm-up + half-cycle cosine, plain cross-entropy, by `trainer.run`:
checkpoints every epoch (a killed run resumes exactly), evaluation on the cached validation features every
`eval_every_epochs` on the host, history in `probe_history.json`.

Two data modes for the head:
  * `OnlineImages` (the official protocol): every step draws augmented images ('probe' crop + flip) and
    recomputes features through the frozen backbone, with the token-embedding dropout ACTIVE (the official
    `main_linprobe.py` trains with `engine_finetune.py`'s loop, which puts the model in train() mode).
  * `CachedFeatures`: features computed once with the eval transform (no augmentation, no dropout) and
    held in memory; an epoch is a seeded permutation of them. Much cheaper; not the paper's protocol.

Known, deliberate deviations: BatchNorm statistics are taken over groups of `bn_group_size` examples
(the reference's per-GPU batch of 128; 0 = the whole global batch) and the running statistics average the
groups (the reference keeps rank 0's); the head weight is drawn from N(0, 0.01²) truncated at ±2 absolute,
as timm's `trunc_normal_(std=0.01)` (effectively untruncated).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from mage_jax.evals import probe
from mage_jax.train import optim, params_io, sharding, steps, trainer

PyTree = Any
HISTORY_FILE = "probe_history.json"


@flax.struct.dataclass
class ProbeState:
  """Head training state: arrays only (orbax-saveable, donatable)."""

  step: jax.Array
  params: PyTree  # {'head': {'kernel': [D, C], 'bias': [C]}}
  batch_stats: PyTree  # {'head_bn': {'mean': [D], 'var': [D]}}
  opt_state: PyTree
  rng: jax.Array  # raw uint32 key data
  first_nonfinite_step: jax.Array
  skipped_steps: jax.Array

  @classmethod
  def create(cls, params, batch_stats, tx: optax.GradientTransformation, rng) -> "ProbeState":
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      rng=rng,
      first_nonfinite_step=jnp.full((), -1, jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32),
    )


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Linear-probe recipe; defaults are the official ViT-B settings (LTH14/mage README command, `main_linprobe.py`)."""

  num_classes: int
  epochs: int = 90
  warmup_epochs: float = 10.0
  batch_size: int = 4096
  blr: float = 0.1  # lr = blr * batch_size / 256; 0.05 for ViT-L
  min_lr: float = 0.0
  momentum: float = 0.9
  weight_decay: float = 0.0
  trust_coefficient: float = 0.001
  bn_group_size: int = 0  # reference: 128 (per-GPU batch, no SyncBN); 0 = whole batch
  bn_momentum: float = 0.9
  bn_eps: float = 1e-6
  head_init_std: float = 0.01
  eval_every_epochs: int = 1
  seed: int = 0
  keep_checkpoints: int = 2

  def __post_init__(self):
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    if self.epochs < 1 or self.batch_size < 1 or self.eval_every_epochs < 1:
      raise ValueError(
        f"epochs, batch_size and eval_every_epochs must be positive, got {self.epochs}, "
        f"{self.batch_size}, {self.eval_every_epochs}"
      )
    if self.bn_group_size and self.batch_size % self.bn_group_size:
      raise ValueError(f"batch_size {self.batch_size} is not a multiple of bn_group_size {self.bn_group_size}")

  def optim(self, steps_per_epoch: int) -> optim.ProbeOptim:
    """The LARS recipe in steps: lr = blr·batch/256 over epochs × steps_per_epoch, warm-up in steps."""
    total = self.epochs * steps_per_epoch
    return optim.ProbeOptim(
      lr=optim.scaled_lr(self.blr, self.batch_size),
      total_steps=total,
      warmup_steps=min(int(round(self.warmup_epochs * steps_per_epoch)), total),
      min_lr=self.min_lr,
      momentum=self.momentum,
      weight_decay=self.weight_decay,
      trust_coefficient=self.trust_coefficient,
    )


def init_state(key: jax.Array, *, tx: optax.GradientTransformation, dim: int, cfg: ProbeConfig) -> ProbeState:
  params, stats = probe.init_head(jax.random.fold_in(key, 0), dim, cfg.num_classes, cfg.head_init_std)
  return ProbeState.create(params, stats, tx, jax.random.key_data(jax.random.fold_in(key, 1)))


def probe_step(
  state: ProbeState,
  extras,
  batch,
  *,
  tx: optax.GradientTransformation,
  cfg: ProbeConfig,
  feature_fn: probe.FeatureFn | None,
  dropout: bool,
  schedule,
):
  """One head update on a global batch ({'features'} or {'image'}, plus 'label'); pure."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if feature_fn is None:
    feats = batch["features"]
  else:
    feats = feature_fn(extras, batch["image"], rng, not dropout)
  labels = batch["label"]

  def loss_fn(params):
    logits, stats = probe.bn_linear_head(
      params,
      state.batch_stats,
      feats,
      train=True,
      bn_group_size=cfg.bn_group_size,
      momentum=cfg.bn_momentum,
      eps=cfg.bn_eps,
    )
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return loss, (logits, stats)

  (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  finite = steps.all_finite(loss, optax.tree.norm(grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = steps.commit(
    state, finite, params=optax.apply_updates(state.params, updates), batch_stats=stats, opt_state=opt_state
  )
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return new_state, {"loss": loss, "accuracy": acc, "lr": schedule(state.step)}


# ---------------------------------------------------------------------------------------------------------
# Training data for the head: `Task.data` factories.


@dataclasses.dataclass
class CachedFeatures:
  """Precomputed features; the epoch-e order is `default_rng((seed, e)).permutation(N)`."""

  features: np.ndarray  # [N, D] float32
  labels: np.ndarray  # [N] int32

  def __post_init__(self):
    if self.features.ndim != 2 or self.labels.shape != (self.features.shape[0],):
      raise ValueError(f"features must be [N, D] with labels [N]; got {self.features.shape} and {self.labels.shape}")

  @property
  def num_examples(self) -> int:
    return int(self.features.shape[0])

  def iterator(self, *, batch_size: int, seed: int, start_step: int):
    spe = self.num_examples // batch_size
    p, n = jax.process_index(), jax.process_count()
    lo, local = p * (batch_size // n), batch_size // n
    step = start_step
    perm, perm_epoch = None, -1
    while True:
      epoch, within = divmod(step, spe)
      if epoch != perm_epoch:
        perm, perm_epoch = np.random.default_rng((seed, epoch)).permutation(self.num_examples), epoch
      idx = perm[within * batch_size + lo : within * batch_size + lo + local]
      yield {"features": self.features[idx], "label": self.labels[idx]}
      step += 1


@dataclasses.dataclass
class OnlineImages:
  """Augmented images through the frozen backbone every step (the official protocol)."""

  input_cfg: dict  # pipeline.InputConfig fields; augment 'probe' for the official crop
  feature_fn: probe.FeatureFn
  variables: PyTree  # placed backbone variables
  variable_shardings: PyTree
  dropout: bool = True  # token-embedding dropout on, as the official model.train()
  source: Any = None  # made from `input_cfg` on first use

  def _source(self):
    from mage_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    if self.source is None:
      self.source = pipeline.make_source(self.input_cfg)
    return self.source

  @property
  def num_examples(self) -> int:
    return int(self._source().num_examples)

  def iterator(self, *, batch_size: int, seed: int, start_step: int):
    from mage_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    cfg = {**dict(self.input_cfg), "batch_size": batch_size}
    for local in pipeline.train_iterator(
      cfg,
      seed=seed,
      start_step=start_step,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      source=self._source(),
    ):
      yield {"image": local["image"], "label": local["label"]}


# ---------------------------------------------------------------------------------------------------------
# The job.


def build_task(
  cfg: ProbeConfig,
  workdir: str,
  train_data: CachedFeatures | OnlineImages,
  val_features: np.ndarray | None,
  val_labels: np.ndarray | None,
  *,
  mesh: Mesh,
  dim: int | None = None,
  stop_after_epochs: int | None = None,
  export_dir: str | None = None,
  backbone: probe.Backbone | None = None,
  abstract: bool = False,
) -> tuple[trainer.Task, trainer.Loop]:
  """(task, loop settings) of the BN+linear head in `workdir` (`trainer`'s contract: the head state is replicated,
  so no logical rules; the arguments are `train_probe`'s). `abstract`: the step and state only (one step per
  epoch, no data read, no evaluation or export)."""
  online = isinstance(train_data, OnlineImages)
  if dim is None:
    if online:
      raise ValueError("pass dim= for OnlineImages")
    dim = train_data.features.shape[1]
  if abstract:
    spe = 1
  else:
    n = train_data.num_examples
    if n < cfg.batch_size:
      raise ValueError(f"linear-probe batch_size {cfg.batch_size} is larger than the train set ({n} examples)")
    if val_features.shape[1] != dim:
      raise ValueError(f"validation features have dim {val_features.shape[1]}, train features {dim}")
    if val_labels.size and (val_labels.min() < 0 or val_labels.max() >= cfg.num_classes):
      raise ValueError(f"validation labels outside [0, {cfg.num_classes})")
    spe = n // cfg.batch_size
  sharding.check_batch_size(cfg.batch_size, mesh)
  ocfg = cfg.optim(spe)
  total, tx, schedule = ocfg.total_steps, optim.probe_optimizer(ocfg), ocfg.schedule()
  history = trainer.History(os.path.join(workdir, HISTORY_FILE))

  def evaluate(state, step):
    acc = probe.topk_accuracy(
      probe.head_predict_numpy(state.params, state.batch_stats, val_features, cfg.bn_eps), val_labels
    )
    logging.info("linear probe epoch %d/%d: val top1 %.4f top5 %.4f", step // spe, cfg.epochs, acc["top1"], acc["top5"])
    history.record(step, {"epoch": step // spe, **acc})
    return acc

  def export(state):
    if export_dir is not None and backbone is not None:
      export_probe(export_dir, backbone, state, cfg.num_classes)

  loop = trainer.Loop(
    seed=cfg.seed,
    keep_checkpoints=cfg.keep_checkpoints,
    checkpoint_every_steps=spe,
    log_every_steps=spe,
    hparams={"probe": dataclasses.asdict(cfg)},
  )
  feature_key = "image" if online else "features"
  res = train_data.input_cfg["image_size"] if online else 0
  feature_shape = (cfg.batch_size, res, res, 3) if online else (cfg.batch_size, dim)
  task = trainer.Task(
    init_state=functools.partial(init_state, tx=tx, dim=dim, cfg=cfg),
    step=functools.partial(
      probe_step,
      tx=tx,
      cfg=cfg,
      feature_fn=train_data.feature_fn if online else None,
      dropout=online and train_data.dropout,
      schedule=schedule,
    ),
    extras=train_data.variables if online else {},
    extras_shardings=train_data.variable_shardings if online else None,
    data=trainer.no_data if abstract else functools.partial(_iterator, train_data, cfg.batch_size, cfg.seed),
    batch_spec={feature_key: (feature_shape, jnp.float32), "label": ((cfg.batch_size,), jnp.int32)},
    total_steps=total,
    stop_step=None if stop_after_epochs is None else stop_after_epochs * spe,
    export=None if abstract else export,
    evaluators=() if abstract else (trainer.Evaluator("validation", evaluate, spe * cfg.eval_every_epochs),),
  )
  return task, loop


def train_probe(
  train_data: CachedFeatures | OnlineImages,
  val_features: np.ndarray,
  val_labels: np.ndarray,
  cfg: ProbeConfig,
  *,
  workdir: str,
  mesh: Mesh,
  dim: int | None = None,
  stop_after_epochs: int | None = None,
  export_dir: str | None = None,
  backbone: probe.Backbone | None = None,
) -> tuple[dict, ProbeState]:
  """Trains (or resumes) the BN+linear head in `workdir` on `trainer.run`; evaluates on the validation features.

  Args:
    train_data: `CachedFeatures` or `OnlineImages`.
    val_features, val_labels: [M, D] / [M] evaluation set (eval transform, dropout off).
    cfg: the recipe.
    workdir: the loop's checkpoints (one per epoch), logs and `probe_history.json`.
    mesh: the batch is sharded over its batch axes; the head state is replicated.
    dim: feature dimension (default: from the data).
    stop_after_epochs: stop once this many epochs (counted from the start of the run, not of this call)
      are done, leaving a checkpoint; the schedule still spans `cfg.epochs`. For tests and chunked jobs.
    export_dir, backbone: when both are given, the completed probe is exported there (`export_probe`).

  Returns:
    (results, final state): results = {'top1', 'top5' (last state), 'best_top1', 'epochs_done',
    'completed', 'steps_per_epoch', 'lr', 'history': [{'step', 'epoch', 'top1', 'top5'}]}.
  """
  task, loop = build_task(
    cfg,
    workdir,
    train_data,
    val_features,
    val_labels,
    mesh=mesh,
    dim=dim,
    stop_after_epochs=stop_after_epochs,
    export_dir=export_dir,
    backbone=backbone,
  )
  spe, total = loop.checkpoint_every_steps, task.total_steps
  history = trainer.History(os.path.join(workdir, HISTORY_FILE))
  _, state = trainer.run(loop, workdir, task, mesh, ())
  done_steps = int(jax.device_get(state.step))
  final = probe.topk_accuracy(
    probe.head_predict_numpy(state.params, state.batch_stats, val_features, cfg.bn_eps), val_labels
  )
  records = history.read()
  return {
    **final,
    "best_top1": max([h["top1"] for h in records] + [final["top1"]]),
    "epochs_done": done_steps // spe,
    "completed": done_steps >= total,
    "steps_per_epoch": spe,
    "lr": optim.scaled_lr(cfg.blr, cfg.batch_size),
    "history": records,
  }, state


def _iterator(train_data, batch_size: int, seed: int, start_step: int):
  return train_data.iterator(batch_size=batch_size, seed=seed, start_step=start_step)


def export_probe(directory: str, backbone: probe.Backbone, state: ProbeState, num_classes: int) -> None:
  """The backbone with its trained head as a params-only checkpoint of kind 'vit' (head_type 'bn_linear'):
  `MAGEViT(config, num_classes, global_pool, head_type='bn_linear')` applies it directly."""
  params = {**backbone.variables["vit"]["params"], **jax.device_get(state.params)}
  meta = {
    "kind": "vit",
    "model": dataclasses.asdict(backbone.vit.config),
    "tokenizer": dataclasses.asdict(backbone.tokenizer.config),
    "vit": {"num_classes": num_classes, "global_pool": backbone.vit.global_pool, "head_type": "bn_linear"},
  }
  params_io.save(
    directory,
    {
      "model": {"params": params, "batch_stats": jax.device_get(state.batch_stats)},
      "tokenizer": backbone.variables["tokenizer"],
    },
    meta,
    overwrite=True,
  )
