"""mage_jax from Python: a params directory as one object with numpy in and out.

  from mage_jax.api import MAGE                      # also `mage_jax.MAGE`
  model = MAGE.load("runs/quickstart/mage/params")   # any params directory: mage, vit or tokenizer kind
  ids = model.encode(images)                         # [N, R, R, 3] uint8 or float in [0, 1] -> int32 [N, tokens]
  pixels = model.decode(ids)                         # -> uint8 [N, R, R, 3]
  feats = model.features(images)                     # -> float32 [N, D], the linear probe's features
  samples = model.generate(16, steps=12, temperature=4.5, seed=0)   # -> uint8 [16, R, R, 3]
  edits = model.edit(images[0], box=(8, 8, 24, 24))                 # -> uint8 [num_samples, R, R, 3]

R is the tokenizer's resolution. Every call is jitted (once per batch shape) and runs on all local devices:
the batch is split over a 1-D ('data',) mesh and the last one padded with copies of its last row. The calls
are the library's, so they give what the binaries give: `generate` is `sampling.generate_images` (batch i of
`batch_size` images uses `fold_in(key(seed), i)`, as `python -m mage_jax.generate`), `edit` is
`editing.edit_image` (as `python -m mage_jax.edit`, the samples split over `sharding.data_mesh`),
`features` is the probe's feature function (`probe.load_backbone` + `make_feature_fn`: global pool + fc_norm),
`encode` / `decode` are the VQGAN's `encode_to_ids` / `decode_ids` (in float32: lower precision flips
near-tied ids). Images out are `clip(x * 255)` truncated to uint8, as the reference writes its samples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mage_jax.data import images as image_io
from mage_jax.generation import editing, sampling
from mage_jax.models.tokenizer import Tokenizer
from mage_jax.models.vqgan import VQGAN
from mage_jax.train import config_ranges, config_views, params_io, sharding

DEFAULT_BATCH_SIZE = 32


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(eq=False)
class MAGE:
  """A loaded params directory (build it with `MAGE.load`).

  Attributes:
    params_dir: where it was loaded from.
    meta: the directory's meta (kind, model and tokenizer configs).
    batch_size: images per device call, a multiple of the device count.
    mesh: the 1-D ('data',) mesh over the local devices.
  """

  params_dir: str
  meta: dict
  batch_size: int
  mesh: Mesh
  _dtype: Any
  _variables: dict  # replicated on `mesh`: {'tokenizer': ..., 'model': ... (kind mage)}
  _tokenizer: VQGAN  # float32, for encode / decode
  _models: tuple | None  # (MAGE module, VQGAN in `dtype`) of a 'mage' directory, as the binaries build them
  _backbone: Any = None  # (probe.Backbone, its replicated variables), built on the first `features` call
  _placed: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def load(
    cls,
    params_dir: str,
    *,
    dtype: str | Any = "float32",
    batch_size: int = DEFAULT_BATCH_SIZE,
    devices: Sequence[jax.Device] | None = None,
  ) -> "MAGE":
    """Loads a params directory (`python -m mage_jax.convert` output or a training export).

    Args:
      params_dir: the directory.
      dtype: compute dtype of the transformer ('float32' | 'bfloat16' or a jnp dtype); params stay float32.
      batch_size: images per device call (rounded up to a multiple of the device count).
      devices: default: all local devices.

    Raises:
      FileNotFoundError, ValueError: not a params directory, or inconsistent meta.
    """
    if isinstance(dtype, str):
      dtype = config_views.dtype(dtype)
    _check_int("batch_size", batch_size, 1)
    if devices is not None and (
      isinstance(devices, (str, bytes))
      or not isinstance(devices, Sequence)
      or not devices
      or not all(isinstance(d, jax.Device) for d in devices)
    ):
      raise ValueError(
        f"devices must be a non-empty sequence of jax.Device (e.g. jax.local_devices()[:2]), got {devices!r}"
      )
    meta = params_io.read_meta(params_dir)
    tok_config = params_io.tokenizer_config_from_meta(meta)
    models = params_io.models_from_meta(meta, dtype) if meta.get("kind", "mage") == "mage" else None
    variables, meta = params_io.load(params_dir)
    kept = {k: variables[k] for k in (("tokenizer", "model") if models else ("tokenizer",))}
    params_io.check_finite(kept, params_dir)  # as the binaries: NaN weights give black images, not an error
    mesh = sharding.data_mesh(devices=jax.local_devices() if devices is None else list(devices))
    return cls(
      params_dir,
      meta,
      _round_up(batch_size, mesh.size),
      mesh,
      dtype,
      sharding.place(kept, sharding.replicated(mesh)),
      VQGAN(tok_config),
      models,
    )

  @property
  def resolution(self) -> int:
    return self._tokenizer.config.resolution

  @property
  def num_tokens(self) -> int:
    return self._tokenizer.config.num_tokens

  # -------------------------------------------------------------------------------------------------------
  # Tokenizer and features.

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 or float [N, R, R, 3] images -> int32 [N, tokens] token ids (row-major over the token grid)."""
    fn = _tokenizer_fn(self._tokenizer, "encode_to_ids", self.mesh)
    return self._batched(fn, self._variables["tokenizer"], self._images(images))

  def decode(self, ids: np.ndarray) -> np.ndarray:
    """int [N, tokens] (or [N, g, g]) ids in [0, codebook_size) -> uint8 [N, R, R, 3] images."""
    fn = _tokenizer_fn(self._tokenizer, "decode_ids", self.mesh)
    return self._batched(fn, self._variables["tokenizer"], self._ids(ids))

  def features(self, images: np.ndarray) -> np.ndarray:
    """uint8 or float [N, R, R, 3] images -> float32 [N, D]: the frozen encoder's features as the linear probe
    reads them (global average pool of the image tokens, then fc_norm; a 'mage' directory's fc_norm is the
    fresh identity of the official probe, a 'vit' directory's its own)."""
    if self.meta.get("kind", "mage") == "tokenizer":
      raise ValueError(f"{self.params_dir} holds only a tokenizer; features need a MAGE encoder")
    if self._backbone is None:
      from mage_jax.evals import probe  # pylint: disable=g-import-not-at-top  (TensorFlow: only for features)

      backbone = probe.load_backbone(self.params_dir, dtype=self._dtype)
      self._backbone = backbone, sharding.place(backbone.variables, sharding.replicated(self.mesh))
    backbone, variables = self._backbone
    return self._batched(_feature_fn(backbone.tokenizer, backbone.vit, self.mesh), variables, self._images(images))

  # -------------------------------------------------------------------------------------------------------
  # Generation and editing.

  def generate(
    self,
    n: int,
    steps: int = sampling.DEFAULT_NUM_STEPS,
    temperature: float = sampling.DEFAULT_TEMPERATURE,
    seed: int = 0,
    class_id: int | None = None,
    batch_size: int | None = None,
  ) -> np.ndarray:
    """`n` images by iterative decoding from fully masked tokens: uint8 [n, R, R, 3].

    Args:
      n: number of images.
      steps: decoding steps T.
      temperature: choice temperature tau0 (the README's ViT-B setting 6.0; the official script's default 4.5).
      seed: batch i uses `fold_in(key(seed), i)`, so the same seed and batch size give the same images as
        `python -m mage_jax.generate --seed --batch_size`, on any number of devices.
      class_id: label, for class-conditional models only.
      batch_size: images per batch (a multiple of the device count); default `self.batch_size`.
    """
    model, tokenizer = self._generator()
    batch_size = self.batch_size if batch_size is None else batch_size
    _check_int("n", n, 1)
    _check_int("steps", steps, 1)
    _check_int("seed", seed, 0, config_ranges.MAX_SEED)
    _check_int("batch_size", batch_size, 1)
    _check_temperature(temperature)
    batches = sampling.generate_images(
      model,
      tokenizer,
      self._variables,
      jax.random.key(seed),
      n,
      batch_size,
      steps,
      temperature,
      self.mesh,
      class_id=class_id,
    )
    return np.concatenate(list(batches))

  def edit(
    self,
    image: np.ndarray,
    mask: np.ndarray | None = None,
    box: Sequence[int] | None = None,
    *,
    mode: str = "inpaint",
    num_samples: int = 4,
    steps: int = sampling.DEFAULT_NUM_STEPS,
    temperature: float = sampling.DEFAULT_TEMPERATURE,
    seed: int = 0,
    ring: int = 1,
  ) -> np.ndarray:
    """Regenerates part of one image `num_samples` times: uint8 [num_samples, R, R, 3].

    Args:
      image: uint8 or float [R, R, 3] (a file as evaluation reads it: `editing.load_image(path, R)`).
      mask: bool [R, R], True = regenerate; or
      box: (top, left, bottom, right) pixels, bottom/right exclusive, with `mode` 'inpaint' (regenerate the
        box) or 'outpaint' (everything else).
      num_samples, steps, temperature, seed, ring: as `python -m mage_jax.edit` (`--num_samples`, `--num_steps`,
        `--temperature`, `--seed`, `--ring`); the same values give the same samples.
    """
    model, tokenizer = self._generator()
    image = np.asarray(image)
    if image.shape != (self.resolution,) * 2 + (3,):
      raise ValueError(
        f"image: expected one image [{self.resolution}, {self.resolution}, 3], got shape "
        f"{image.shape} (read a file with mage_jax.generation.editing.load_image(path, R))"
      )
    image = check_images(image[None], self.resolution, "image", keep_uint8=True)[0]
    if (mask is None) == (box is None):
      raise ValueError("edit: give exactly one of mask (bool [R, R]) and box (top, left, bottom, right)")
    if box is not None:
      pixel_mask = editing.pixel_mask_for(mode, self.resolution, tuple(box))
    else:
      pixel_mask = np.asarray(mask)
      if pixel_mask.dtype != np.bool_ or pixel_mask.shape != (self.resolution, self.resolution):
        raise ValueError(
          f"edit: mask must be bool [{self.resolution}, {self.resolution}], got {pixel_mask.dtype} {pixel_mask.shape}"
        )
    _check_int("seed", seed, 0, config_ranges.MAX_SEED)
    _check_temperature(temperature)
    _check_int("num_samples", num_samples, 1)
    mesh = sharding.data_mesh(num_samples, self.mesh.devices.ravel())
    result = editing.edit_image(
      model,
      tokenizer,
      self._variables_on(mesh),
      jax.random.key(seed),
      image,
      pixel_mask,
      num_samples=num_samples,
      num_steps=steps,
      temperature=temperature,
      ring=ring,
      mesh=mesh,
    )
    return result.samples

  # -------------------------------------------------------------------------------------------------------
  # Plumbing.

  def _generator(self):
    if self._models is None:
      raise ValueError(
        f"{self.params_dir} holds a {self.meta.get('kind')!r} checkpoint; generation and editing "
        "need a MAGE pretraining checkpoint (kind 'mage')"
      )
    return self._models

  def _variables_on(self, mesh: Mesh) -> dict:
    """The variables replicated on `mesh` (a prefix of `self.mesh`'s devices), cached per mesh size."""
    if mesh.size == self.mesh.size:
      return self._variables
    if mesh.size not in self._placed:
      self._placed[mesh.size] = sharding.place(self._variables, sharding.replicated(mesh))
    return self._placed[mesh.size]

  def _batched(self, fn: Callable, variables, inputs: np.ndarray) -> np.ndarray:
    """The jitted `fn(variables, batch)` over `inputs` in batches; inputs of fewer than `batch_size` rows run
    as one batch rounded up to the device count (one compilation per batch shape)."""
    size = min(self.batch_size, _round_up(len(inputs), self.mesh.size))
    outputs = []
    for start in range(0, len(inputs), size):
      chunk = inputs[start : start + size]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
      outputs.append(np.asarray(fn(variables, padded))[: len(chunk)])
    return np.concatenate(outputs)

  def _images(self, images) -> np.ndarray:
    return check_images(images, self.resolution)

  def _ids(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    grid = self._tokenizer.config.token_grid
    codebook = self._tokenizer.config.codebook_size
    if ids.ndim == 3 and ids.shape[1:] == (grid, grid):
      ids = ids.reshape(len(ids), -1)
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2 or ids.shape[1] != self.num_tokens or not len(ids):
      raise ValueError(
        f"ids: expected integers [N, {self.num_tokens}] or [N, {grid}, {grid}], got {ids.dtype} {ids.shape}"
      )
    if ids.min() < 0 or ids.max() >= codebook:
      raise ValueError(f"ids: values must lie in [0, {codebook}), got [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int32)


def _batch_jit(fn: Callable, mesh: Mesh) -> Callable:
  """`fn(variables, batch)` jitted with replicated variables and the batch split over the mesh."""
  sharded = NamedSharding(mesh, P("data"))
  return jax.jit(fn, in_shardings=(NamedSharding(mesh, P()), sharded), out_shardings=sharded)


@functools.lru_cache(maxsize=16)
def _tokenizer_fn(tokenizer: Tokenizer, method: str, mesh: Mesh) -> Callable:
  """`encode_to_ids` (ids) or `decode_ids` (uint8 images), cached per module so that every `MAGE` of the same
  sizes shares the compilations."""

  def fn(variables, x):
    out = tokenizer.apply(variables, x, method=method)
    return image_io.to_uint8(out) if method == "decode_ids" else out

  return _batch_jit(fn, mesh)


@functools.lru_cache(maxsize=16)
def _feature_fn(tokenizer: Tokenizer, vit, mesh: Mesh) -> Callable:
  from mage_jax.evals import probe  # pylint: disable=g-import-not-at-top

  feature_fn = probe.make_feature_fn(tokenizer, vit)
  return _batch_jit(lambda variables, images: feature_fn(variables, images, None, True), mesh)


def check_images(images, resolution: int, name: str = "images", keep_uint8: bool = False) -> np.ndarray:
  """Validated images [N, resolution, resolution, 3]: uint8, or float in [0, 1].

  Returns:
    float32 in [0, 1] (uint8 divided by 255), or the uint8 array itself if `keep_uint8`.

  Raises:
    ValueError: one line naming the shape, dtype or value range that is wrong.
  """
  images = np.asarray(images)
  expected = f"[N, {resolution}, {resolution}, 3] uint8, or float in [0, 1]"
  if images.ndim != 4 or images.shape[1:] != (resolution, resolution, 3) or not len(images):
    raise ValueError(f"{name}: expected {expected}; got shape {images.shape}")
  if images.dtype == np.uint8:
    return images if keep_uint8 else images.astype(np.float32) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{name}: expected {expected}; got dtype {images.dtype}")
  images = images.astype(np.float32)
  low, high = float(np.min(images)), float(np.max(images))
  if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low and high <= 1.0):
    raise ValueError(f"{name}: expected {expected}; got values in [{low}, {high}]")
  return images


def _check_int(name: str, value, lower: int, upper: int | None = None) -> None:
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or value < lower
    or (upper is not None and value > upper)
  ):
    bounds = f">= {lower}" if upper is None else f"in [{lower}, {upper}]"
    raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_temperature(value) -> None:
  if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value >= 0):
    raise ValueError(f"temperature must be a finite number >= 0, got {value!r}")
