"""Few-shot linear classification on frozen features.

What is known (recalled from the MAGE paper, arXiv:2211.09117, not checked
against its text): the paper reports few-shot ImageNet accuracy of a linear
classifier trained on frozen features with very few labelled images per class
(1, 2, 5 and 10 shots are what this module reports). The official LTH14/mage code has no few-shot
script, and nothing checked here records the classifier, its regularisation,
the feature preprocessing, or the number of random support draws. This module
therefore offers two documented protocols; treat both as ASSUMPTIONS until
they are checked against the paper's appendix:

* `classifier='ridge'` — big_vision `evaluators/fewshot_lsr.py`: features
  standardised per dimension with the support set's mean and std (+1e-5), a
  constant bias feature of 100 appended (so the bias is almost unregularised),
  targets `2 * onehot - 1`, closed-form L2-regularised least squares with
  `l2_reg = 2**10` (big_vision's default), argmax prediction. Solved on the
  host in float64 numpy.
* `classifier='logreg'` — MSN `logistic_eval.py` (cyanure): each feature row
  centred and L2-normalised, multinomial logistic regression without
  intercept, objective `mean CE + lambd / 2 * ||W||^2` with
  `lambd = 2.5e-4 / N` (MSN divides its default by the number of training
  points). Solved full-batch and deterministically with optax L-BFGS in
  float32 (MSN uses cyanure's solver; the optimum is the same up to `tol`).

Support sets (`sample_support`) follow big_vision: one permutation of each
class's indices per seed, first `shots` taken, so for a fixed seed the 1-shot
set is contained in the 2-shot set, etc. `evaluate_fewshot` repeats this over
`trials` seeds and reports mean and population std (ddof=0) of top-1
accuracy. All randomness here is host-side numpy: this is evaluation code on
gathered features, not the device path.

As an evaluator of the `evals` registry (`run`, `rows`): k labelled train images per class,
`config.fewshot.trials` seeded draws, each of `config.fewshot.classifiers` ('ridge', 'logreg'). During training
(`during_training`, type 'fewshot'): ridge few-shot of the encoder being trained on small splits.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mage_jax import evals
from mage_jax.data import pipeline
from mage_jax.evals import pct, probe, split_size
from mage_jax.models.vit import MAGEViT
from mage_jax.train import sharding

BIAS_CONSTANT = 100.0  # big_vision fewshot_lsr.
RIDGE_L2 = 2.0**10  # big_vision configs: `config.l2_reg = 2.0 ** 10`.
LOGREG_LAMBDA = 2.5e-4  # MSN logistic_eval.py default `--lambd`.
_PREDICT_CHUNK = 8192

Seed = int | Sequence[int]


def _check_labels(labels, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be integer class ids, got {labels.dtype}")
  return labels


def _check_feats(feats, labels, name: str) -> np.ndarray:
  feats = np.asarray(feats)
  if feats.ndim != 2:
    raise ValueError(f"{name} must be [n, d], got shape {feats.shape}")
  if feats.shape[0] != labels.shape[0]:
    raise ValueError(f"{name} has {feats.shape[0]} rows but its labels have {labels.shape[0]}")
  return feats


def sample_support(labels, shots: int, seed: Seed, num_classes: int | None = None) -> np.ndarray:
  """Class-balanced support-set indices, reproducible from `seed`.

  Args:
    labels: [n] integer class ids of the pool to draw from.
    shots: examples per class (>= 1).
    seed: int or sequence of non-negative ints for `np.random.default_rng`.
    num_classes: if given, classes are `0..num_classes-1` and every one must
      be present; otherwise the classes are `np.unique(labels)`.

  Returns:
    int64 [num_classes * shots] indices into `labels`, grouped by class in
    increasing class order (the `shots` indices of one class are in random
    order). For a fixed seed, fewer shots give a prefix-per-class subset.

  Raises:
    ValueError: if `shots < 1`, labels are out of range, or a class has fewer
      than `shots` examples.
  """
  labels = _check_labels(labels, "labels")
  if int(shots) != shots or shots < 1:
    raise ValueError(f"shots must be a positive integer, got {shots}")
  if num_classes is None:
    classes = np.unique(labels)
  else:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    classes = np.arange(num_classes)
  if classes.size == 0:
    raise ValueError("labels is empty: no class to sample from")
  # One stable sort instead of a scan of all labels per class (ImageNet has
  # 1.28M labels and 1000 classes).
  order = np.argsort(labels, kind="stable")
  starts = np.searchsorted(labels[order], classes, side="left")
  ends = np.searchsorted(labels[order], classes, side="right")
  counts = ends - starts
  short = np.flatnonzero(counts < shots)
  if short.size:
    detail = ", ".join(f"class {classes[i]}: {counts[i]}" for i in short[:10])
    raise ValueError(f"{short.size} class(es) have fewer than shots={shots} examples ({detail})")
  rng = np.random.default_rng(seed)
  picks = [rng.permutation(order[s:e])[:shots] for s, e in zip(starts, ends)]
  return np.concatenate(picks).astype(np.int64)


# ---------------------------------------------------------------------------
# Ridge regression (big_vision fewshot_lsr).


def fit_ridge(x, y, num_classes: int, l2_reg: float = RIDGE_L2) -> dict:
  """Closed-form L2-regularised least squares on standardised features.

  Args:
    x: [n, d] support features (any float dtype; computed in float64).
    y: [n] int class indices in `[0, num_classes)`.
    num_classes: number of classes C.
    l2_reg: ridge coefficient (> 0).

  Returns:
    {'mean': [1, d], 'std': [1, d], 'w': [d + 1, C]} float64 numpy arrays;
    `w` solves `(X^T X + l2 I) w = X^T Y` for the standardised, bias-padded
    `X` and `Y = 2 * onehot(y) - 1`.
  """
  if l2_reg <= 0:
    raise ValueError(f"l2_reg must be > 0, got {l2_reg}")
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0, keepdims=True)
  std = x.std(axis=0, keepdims=True) + 1e-5
  xs = _pad_bias((x - mean) / std)
  yt = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
  n, d = xs.shape
  # Solve in whichever of the primal (d x d) / dual (n x n) systems is smaller.
  if n >= d:
    w = np.linalg.solve(xs.T @ xs + l2_reg * np.eye(d), xs.T @ yt)
  else:
    w = xs.T @ np.linalg.solve(xs @ xs.T + l2_reg * np.eye(n), yt)
  return {"mean": mean, "std": std, "w": w}


def _pad_bias(x: np.ndarray) -> np.ndarray:
  return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def predict_ridge(model: dict, x) -> np.ndarray:
  """Class indices [n] (int64) for features x [n, d] under `fit_ridge`."""
  x = np.asarray(x)
  out = []
  for i in range(0, x.shape[0], _PREDICT_CHUNK):
    xc = (np.asarray(x[i : i + _PREDICT_CHUNK], np.float64) - model["mean"]) / model["std"]
    out.append(np.argmax(_pad_bias(xc) @ model["w"], axis=1))
  return np.concatenate(out) if out else np.zeros((0,), np.int64)


# ---------------------------------------------------------------------------
# Multinomial logistic regression (MSN logistic_eval.py protocol).


def _row_normalize(x) -> jax.Array:
  """cyanure preprocess(centering=True, normalize=True, columns=False)."""
  x = jnp.asarray(x, jnp.float32)
  x = x - x.mean(axis=1, keepdims=True)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _lbfgs_logreg(x, y, lam, tol, *, num_classes: int, max_iter: int):
  """Minimises mean CE(x W, y) + lam/2 ||W||^2 by L-BFGS; returns (W, iters)."""
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)

  def objective(w):
    logp = jax.nn.log_softmax(x @ w, axis=-1)
    return -jnp.mean(jnp.sum(onehot * logp, axis=-1)) + 0.5 * lam * jnp.sum(w * w)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    w, state = carry
    value, grad = value_and_grad(w, state=state)
    updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(w, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  w0 = jnp.zeros((x.shape[1], num_classes), jnp.float32)
  w, state = jax.lax.while_loop(keep_going, step, (w0, opt.init(w0)))
  return w, optax.tree.get(state, "count")


def fit_logreg(x, y, num_classes: int, lambd: float = LOGREG_LAMBDA, max_iter: int = 500, tol: float = 1e-5) -> dict:
  """L2-regularised multinomial logistic regression (no intercept).

  Args:
    x: [n, d] support features.
    y: [n] int class indices in `[0, num_classes)`.
    num_classes: number of classes C.
    lambd: regularisation before division by n (MSN convention): the
      objective is `mean CE + (lambd / n) / 2 * ||W||^2`.
    max_iter: L-BFGS iteration cap.
    tol: stop when the gradient's L2 norm falls below this.

  Returns:
    {'w': [d, C] float32 numpy array, 'iterations': int}.
  """
  if lambd <= 0:
    raise ValueError(f"lambd must be > 0, got {lambd}")
  x = _row_normalize(x)
  w, it = _lbfgs_logreg(
    x,
    jnp.asarray(y, jnp.int32),
    jnp.float32(lambd / x.shape[0]),
    jnp.float32(tol),
    num_classes=num_classes,
    max_iter=max_iter,
  )
  return {"w": np.asarray(w), "iterations": int(it)}


def predict_logreg(model: dict, x) -> np.ndarray:
  """Class indices [n] (int64) for features x [n, d] under `fit_logreg`."""
  x = np.asarray(x)
  w = jnp.asarray(model["w"])
  out = [
    np.asarray(jnp.argmax(_row_normalize(x[i : i + _PREDICT_CHUNK]) @ w, axis=1))
    for i in range(0, x.shape[0], _PREDICT_CHUNK)
  ]
  return (np.concatenate(out) if out else np.zeros((0,), np.int64)).astype(np.int64)


# ---------------------------------------------------------------------------
# Protocol.


def evaluate_fewshot(
  train_feats,
  train_labels,
  test_feats,
  test_labels,
  shots: Sequence[int] = (1, 2, 5, 10),
  trials: int = 5,
  seed: int = 0,
  classifier: Literal["ridge", "logreg"] = "ridge",
  l2_reg: float | None = None,
  num_classes: int | None = None,
) -> dict[int, tuple[float, float]]:
  """Few-shot top-1 accuracy, averaged over `trials` support draws.

  Trial `t` draws its support with `sample_support(..., seed=(seed, t))`, the
  same draw for every shot count (nested supports, as big_vision).

  Args:
    train_feats: [n, d] pool features to draw supports from.
    train_labels: [n] int class ids.
    test_feats: [m, d] evaluation features.
    test_labels: [m] int class ids; every one must be a support class.
    shots: examples per class, each >= 1.
    trials: number of support draws (>= 1).
    seed: base seed (non-negative int).
    classifier: 'ridge' (big_vision) or 'logreg' (MSN).
    l2_reg: regularisation (`l2_reg` of `fit_ridge` / `lambd` of
      `fit_logreg`); None uses the protocol default.
    num_classes: classes are `0..num_classes-1` if given, else the sorted
      unique train labels.

  Returns:
    {shot: (mean_accuracy, std_accuracy)} with accuracies in [0, 1].
  """
  train_labels = _check_labels(train_labels, "train_labels")
  test_labels = _check_labels(test_labels, "test_labels")
  train_feats = _check_feats(train_feats, train_labels, "train_feats")
  test_feats = _check_feats(test_feats, test_labels, "test_feats")
  if train_feats.shape[1] != test_feats.shape[1]:
    raise ValueError(f"feature dims differ: train {train_feats.shape[1]}, test {test_feats.shape[1]}")
  if classifier not in ("ridge", "logreg"):
    raise ValueError(f"classifier must be 'ridge' or 'logreg', got {classifier!r}")
  if trials < 1:
    raise ValueError(f"trials must be >= 1, got {trials}")
  if test_labels.size == 0:
    raise ValueError("test set is empty")
  classes = np.arange(num_classes) if num_classes is not None else np.unique(train_labels)
  test_idx = np.searchsorted(classes, test_labels)
  bad = (test_idx >= classes.size) | (classes[np.minimum(test_idx, classes.size - 1)] != test_labels)
  if bad.any():
    raise ValueError(
      f"{int(bad.sum())} test labels are not among the "
      f"{classes.size} train classes, e.g. "
      f"{test_labels[bad][:5].tolist()}"
    )
  c = classes.size

  if classifier == "ridge":
    reg = RIDGE_L2 if l2_reg is None else l2_reg
    fit = lambda x, y: fit_ridge(x, y, c, reg)
    predict = predict_ridge
  else:
    reg = LOGREG_LAMBDA if l2_reg is None else l2_reg
    fit = lambda x, y: fit_logreg(x, y, c, reg)
    predict = predict_logreg

  accs = {int(s): [] for s in shots}
  for t in range(trials):
    for s in accs:
      idx = sample_support(train_labels, s, (seed, t), num_classes)
      y = np.searchsorted(classes, train_labels[idx])
      model = fit(train_feats[idx], y)
      accs[s].append(float(np.mean(predict(model, test_feats) == test_idx)))
  return {s: (float(np.mean(a)), float(np.std(a))) for s, a in accs.items()}


# ---------------------------------------------------------------------------------------------------------
# During training.


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
  train_split: str
  test_split: str
  shots: tuple[int, ...] = (10,)
  trials: int = 1
  batch_size: int = 256  # global, of the feature extraction
  num_classes: int = 0  # 0: from the labels


def during_training(settings: ml_collections.ConfigDict, job):
  """big_vision's cheap representation check during training: frozen encoder features (global pool, as the linear
  probe) of a small labelled train and test split, closed-form ridge few-shot on the host; returns `<k>shot`
  (settings: `TrainingSettings`)."""
  settings = evals.entry_settings(TrainingSettings, settings)
  if job.model is None:
    raise ValueError("few-shot during training needs a MAGE encoder; this job trains none")
  if not settings.train_split or not settings.test_split:
    raise ValueError("few-shot during training needs train_split and test_split")
  if not settings.shots or min(settings.shots) < 1 or settings.trials < 1 or settings.batch_size < 1:
    raise ValueError(
      f"shots, trials and batch_size must be >= 1, got {settings.shots}, {settings.trials}, {settings.batch_size}"
    )
  model, tokenizer, tokenizer_vars, mesh = job.model, job.tokenizer, job.tokenizer_vars, job.mesh
  vit = MAGEViT(
    dataclasses.replace(model.config, scan=False), num_classes=0, global_pool=True, head_type="none", dtype=model.dtype
  )
  feature_fn = probe.make_feature_fn(tokenizer, vit)
  inputs = {
    split: pipeline.eval_input_config(job.config.input, split=split, batch_size=settings.batch_size)
    for split in (settings.train_split, settings.test_split)
  }
  sources = {split: pipeline.make_source(cfg) for split, cfg in inputs.items()}

  def evaluate(state, step):
    del step
    backbone = probe.backbone_params_from_mage(job.params_of(state), global_pool=True)
    variables = {"tokenizer": tokenizer_vars, "vit": {"params": backbone}}
    # Params stay where the training state keeps them; host arrays (the tokenizer, a fresh fc_norm) replicate.
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else sharding.replicated(mesh), variables)
    feats = {
      split: probe.extract_features(feature_fn, variables, shardings, inputs[split], mesh=mesh, source=sources[split])
      for split in inputs
    }
    (train_x, train_y), (test_x, test_y) = feats[settings.train_split], feats[settings.test_split]
    accs = evaluate_fewshot(
      train_x,
      train_y,
      test_x,
      test_y,
      shots=tuple(settings.shots),
      trials=settings.trials,
      seed=job.config.seed,
      classifier="ridge",
      num_classes=settings.num_classes or None,
    )
    return {f"{s}shot": mean for s, (mean, _) in accs.items()}

  return evaluate


# ---------------------------------------------------------------------------------------------------------
# The evaluator entry.
FEATURES = True


def check(config) -> None:
  split = config.fewshot.train_split or config.input.split
  n = split_size(config, split)
  need = max(config.fewshot.shots) * config.num_classes
  if n < need:
    raise ValueError(
      f"few-shot: {max(config.fewshot.shots)} shots of {config.num_classes} classes need at least "
      f"{need} training examples, the split {split!r} has {n}"
    )


def run(context, features) -> dict:
  config, f = context.config, context.config.fewshot
  train_x, train_y = context.features(features, f.train_split or config.input.split)
  test_x, test_y = context.features(features, config.eval_split)
  out = {}
  for classifier in f.classifiers:
    t0 = time.time()
    reg = f.get(f"l2_{classifier}", -1.0)
    accs = evaluate_fewshot(
      train_x,
      train_y,
      test_x,
      test_y,
      shots=tuple(f.shots),
      trials=f.trials,
      seed=config.seed,
      classifier=classifier,
      l2_reg=None if reg is None or reg < 0 else reg,
      num_classes=config.num_classes,
    )
    out[classifier] = {str(s): {"mean": m, "std": sd} for s, (m, sd) in accs.items()}
    out[classifier]["seconds"] = time.time() - t0
  out["trials"] = f.trials
  return out


def rows(result: dict) -> list[tuple[str, str]]:
  return [
    (f"{shot}-shot {classifier}", f"{pct(v['mean'])} ± {pct(v['std'])}")
    for classifier, per_shot in result.items()
    if isinstance(per_shot, dict)
    for shot, v in per_shot.items()
    if isinstance(v, dict)
  ]
