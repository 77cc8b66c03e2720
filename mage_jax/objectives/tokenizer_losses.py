"""Loss terms for training the VQGAN tokenizer from scratch (MaskGIT's `libml/losses.py` recipe + LeCam).

Everything here is a pure function of arrays (no model calls), so the training step can compute the pieces
(reconstruction, quantizer outputs, discriminator logits, perceptual distance) and assemble them with
`generator_loss_terms` / `discriminator_loss_terms`. All losses are computed and returned in float32.

MaskGIT's ImageNet recipe in these terms (`vqgan_config.py`): vq convention 'maskgit' with β = 0.25, entropy weight
0.1 at temperature 0.01, perceptual weight 0.1, non-saturating GAN with generator weight 0.1, R1 cost 10, no
LeCam; its reconstruction loss type (l1 or l2) is not stated.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


def _f32(x):
  return jnp.asarray(x).astype(_F32)


# ------------------------------------------------------------------------------------------------------------
# Reconstruction and vector-quantisation terms.


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """mean(|x - y|) over all elements; scalar float32."""
  return jnp.mean(jnp.abs(_f32(x) - _f32(y)))


def l2_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """mean((x - y)²) over all elements; scalar float32."""
  return jnp.mean(jnp.square(_f32(x) - _f32(y)))


def reconstruction_loss(x: jax.Array, y: jax.Array, kind: str = "l1") -> jax.Array:
  if kind == "l1":
    return l1_loss(x, y)
  if kind == "l2":
    return l2_loss(x, y)
  raise ValueError(f"unknown reconstruction loss {kind!r}; expected 'l1' or 'l2'")


def entropy_loss(distances: jax.Array, temperature: float = 0.01) -> jax.Array:
  """MaskGIT's codebook-usage regulariser: mean per-latent entropy − entropy of the mean assignment.

  p = softmax(−distance / temperature) per latent. Minimising it makes each latent's assignment confident
  (low sample entropy) while spreading latents over the codebook (high entropy of the average p).
  Unlike MaskGIT's code there is no +1e-5 inside the logs: the entropies here are exact.

  Args:
    distances: [..., K] squared distances to the K codes (all leading axes are latents).
  Returns:
    float32 scalar, in [−log K, log K].
  """
  if temperature <= 0:
    raise ValueError(f"entropy_loss temperature must be > 0, got {temperature}")
  logits = -_f32(distances).reshape(-1, distances.shape[-1]) / temperature
  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_p)
  sample_entropy = -jnp.mean(jnp.sum(p * log_p, axis=-1))
  avg_p = jnp.mean(p, axis=0)
  # max(·, tiny) keeps 0·log 0 = 0 with a finite gradient for codes nobody uses.
  avg_entropy = -jnp.sum(avg_p * jnp.log(jnp.maximum(avg_p, jnp.finfo(_F32).tiny)))
  return sample_entropy - avg_entropy


# ------------------------------------------------------------------------------------------------------------
# Adversarial terms.

_GAN_TYPES = ("non_saturating", "hinge")


def _check_gan_type(kind):
  if kind not in _GAN_TYPES:
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {_GAN_TYPES}")


def generator_adversarial_loss(logits_fake: jax.Array, kind: str = "non_saturating") -> jax.Array:
  """Generator side: 'non_saturating' mean(softplus(−D(fake))); 'hinge' −mean(D(fake))."""
  _check_gan_type(kind)
  fake = _f32(logits_fake)
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-fake))
  return -jnp.mean(fake)


def discriminator_adversarial_loss(
  logits_real: jax.Array, logits_fake: jax.Array, kind: str = "non_saturating"
) -> jax.Array:
  """'non_saturating': mean(softplus(−D(real))) + mean(softplus(D(fake)));
  'hinge': mean(relu(1 − D(real))) + mean(relu(1 + D(fake)))."""
  _check_gan_type(kind)
  real, fake = _f32(logits_real), _f32(logits_fake)
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))
  return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def adversarial_weight(step: jax.Array | int, start_step: int, weight: float) -> jax.Array:
  """`weight` from `start_step` on, 0 before (jit-safe: `step` may be a traced int)."""
  return jnp.where(jnp.asarray(step) >= start_step, jnp.asarray(weight, _F32), jnp.zeros((), _F32))


def r1_gradient_penalty(
  logits_fn: Callable[[jax.Array], jax.Array], real: jax.Array, cost: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """R1 penalty cost · mean_b ‖∂D(real_b)/∂real_b‖² (MaskGIT's form; cost 10 in its recipe).

  The per-sample gradient is taken as the gradient of sum_b D(real_b), which equals it because the
  discriminator has no cross-sample interaction (no batch norm).

  Args:
    logits_fn: real [B, ...] -> logits [B] or [B, 1]; usually a closure over the D params being trained,
      so the penalty is differentiable w.r.t. them (double backprop).
    real: [B, ...] real images.
    cost: multiplier.
  Returns:
    (penalty float32 scalar, logits of `real`, float32) — reuse the logits for the adversarial loss.
  """

  def summed(x):
    logits = _f32(logits_fn(x))
    return jnp.sum(logits), logits

  grads, logits = jax.grad(summed, has_aux=True)(real)
  grads = _f32(grads).reshape(grads.shape[0], -1)
  return cost * jnp.mean(jnp.sum(jnp.square(grads), axis=-1)), logits


@flax.struct.dataclass
class LeCamState:
  """Exponential moving averages of the discriminator's mean logits on real and fake images."""

  ema_real: jax.Array
  ema_fake: jax.Array

  @classmethod
  def create(cls, init: float = 0.0) -> "LeCamState":
    return cls(ema_real=jnp.asarray(init, _F32), ema_fake=jnp.asarray(init, _F32))


def lecam_update(state: LeCamState, logits_real: jax.Array, logits_fake: jax.Array, decay: float = 0.999) -> LeCamState:
  """ema ← decay·ema + (1 − decay)·mean(logits), with no gradient through the EMA."""
  real = jax.lax.stop_gradient(jnp.mean(_f32(logits_real)))
  fake = jax.lax.stop_gradient(jnp.mean(_f32(logits_fake)))
  return LeCamState(
    ema_real=decay * state.ema_real + (1.0 - decay) * real, ema_fake=decay * state.ema_fake + (1.0 - decay) * fake
  )


def lecam_regularizer(logits_real: jax.Array, logits_fake: jax.Array, state: LeCamState) -> jax.Array:
  """LeCam (Yu et al. 2021), unweighted:
  mean(relu(D(real) − ema_fake)²) + mean(relu(ema_real − D(fake))²)."""
  ema_real = jax.lax.stop_gradient(state.ema_real)
  ema_fake = jax.lax.stop_gradient(state.ema_fake)
  return jnp.mean(jnp.square(jax.nn.relu(_f32(logits_real) - ema_fake))) + jnp.mean(
    jnp.square(jax.nn.relu(ema_real - _f32(logits_fake)))
  )


def lecam_loss(
  state: LeCamState, logits_real: jax.Array, logits_fake: jax.Array, decay: float = 0.999
) -> tuple[jax.Array, LeCamState]:
  """Update the EMAs with this batch, then regularise against the updated EMAs (the reference order)."""
  new_state = lecam_update(state, logits_real, logits_fake, decay)
  return lecam_regularizer(logits_real, logits_fake, new_state), new_state


# ------------------------------------------------------------------------------------------------------------
# Assembly.


def generator_loss_terms(
  images: jax.Array,
  reconstructions: jax.Array,
  *,
  codebook_loss: jax.Array,
  commitment_loss: jax.Array,
  entropy: jax.Array | float = 0.0,
  perceptual: jax.Array | float = 0.0,
  logits_fake: jax.Array | None = None,
  rec_type: str = "l1",
  rec_weight: float = 1.0,
  entropy_weight: float = 0.1,
  perceptual_weight: float = 0.1,
  adv_weight: jax.Array | float = 0.1,
  gan_type: str = "non_saturating",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted generator (encoder + quantizer + decoder) objective.

  Args:
    images, reconstructions: [B, H, W, C].
    codebook_loss, commitment_loss: already weighted by β (as `models.vqgan.VectorQuantizer` returns them).
    entropy: unweighted `entropy_loss(distances, temperature)`.
    perceptual: unweighted scalar perceptual distance (mean over the batch; 0 if disabled).
    logits_fake: D(reconstructions) [B, 1] or None (no adversarial term, e.g. before the D starts).
    adv_weight: may be traced, e.g. `adversarial_weight(step, start, 0.1)`.
  Returns:
    (total, terms) with terms {rec, vq, commit, entropy, perceptual, adv} holding the WEIGHTED contributions
    (they sum to total), all float32 scalars.
  """
  terms = {
    "rec": rec_weight * reconstruction_loss(images, reconstructions, rec_type),
    "vq": _f32(codebook_loss),
    "commit": _f32(commitment_loss),
    "entropy": entropy_weight * _f32(entropy),
    "perceptual": perceptual_weight * _f32(perceptual),
  }
  if logits_fake is None:
    terms["adv"] = jnp.zeros((), _F32)
  else:
    terms["adv"] = _f32(adv_weight) * generator_adversarial_loss(logits_fake, gan_type)
  return sum(terms.values()), terms


def discriminator_loss_terms(
  logits_real: jax.Array,
  logits_fake: jax.Array,
  *,
  weight: jax.Array | float = 1.0,
  gan_type: str = "non_saturating",
  r1_penalty: jax.Array | float = 0.0,
  lecam_state: LeCamState | None = None,
  lecam_weight: float = 0.0,
  lecam_decay: float = 0.999,
) -> tuple[jax.Array, dict[str, jax.Array], LeCamState | None]:
  """Weighted discriminator objective.

  Args:
    logits_real, logits_fake: D(images), D(sg(reconstructions)), [B, 1] or [B].
    weight: multiplies every term, e.g. `adversarial_weight(step, start, 1.0)` so D does not train before
      its start step (the LeCam EMAs still update).
    r1_penalty: already-weighted penalty from `r1_gradient_penalty(..., cost)`.
    lecam_state: EMA state; None disables LeCam (the returned state is then None).
    lecam_weight, lecam_decay: LeCam strength and EMA decay.
  Returns:
    (total, terms {adv, lecam, r1} weighted and summing to total, new lecam state or None).
  """
  w = _f32(weight)
  terms = {"adv": w * discriminator_adversarial_loss(logits_real, logits_fake, gan_type)}
  new_state = None
  if lecam_state is None:
    terms["lecam"] = jnp.zeros((), _F32)
  else:
    reg, new_state = lecam_loss(lecam_state, logits_real, logits_fake, lecam_decay)
    terms["lecam"] = w * lecam_weight * reg
  terms["r1"] = w * _f32(r1_penalty)
  return sum(terms.values()), terms, new_state


# ------------------------------------------------------------------------------------------------------------
# Perceptual (LPIPS-style VGG16) loss.
#
# Weights file: a .npz with these float arrays (names as in `perceptual_weight_names()`):
#   conv{s}_{i}.kernel  [3, 3, C_in, C_out]  (HWIO; torchvision's [O, I, 3, 3] transposed (2, 3, 1, 0))
#   conv{s}_{i}.bias    [C_out]
#   for the 13 VGG16 convs (s, i) in 1_1 1_2 | 2_1 2_2 | 3_1 3_2 3_3 | 4_1 4_2 4_3 | 5_1 5_2 5_3; and, for
#   LPIPS' learned heads, lin{k}.kernel [C_k], k = 0..4, the 1x1 no-bias conv weights on the relu{s}_last taps
#   (LPIPS' `lin{k}.model.1.weight` [1, C_k, 1, 1] flattened). The real VGG16 has widths 64,128,256,512,512;
#   the widths are read from the file (the chain must be consistent). `weights_from_torch` builds this dict
#   from torchvision/LPIPS state dicts converted to numpy.

_VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# torchvision `vgg16().features` indices of the 13 convs, in order.
_TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# LPIPS ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1].
_LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_NORM_EPS = 1e-10


def _conv_names() -> list[str]:
  return [f"conv{s + 1}_{i + 1}" for s, (_, n) in enumerate(_VGG16_STAGES) for i in range(n)]


def perceptual_weight_names(use_lin_heads: bool = True) -> list[str]:
  """Every key a weights file must hold (in network order)."""
  names = [f"{c}.{p}" for c in _conv_names() for p in ("kernel", "bias")]
  if use_lin_heads:
    names += [f"lin{k}.kernel" for k in range(len(_VGG16_STAGES))]
  return names


def random_perceptual_weights(
  seed: int = 0, widths: tuple[int, ...] = (64, 128, 256, 512, 512), use_lin_heads: bool = True
) -> dict[str, np.ndarray]:
  """He-initialised random weights in the file layout (for tests and smoke runs; not a real perceptual net)."""
  if len(widths) != len(_VGG16_STAGES):
    raise ValueError(f"need {len(_VGG16_STAGES)} stage widths, got {widths}")
  rng = np.random.default_rng(seed)
  out, c_in = {}, 3
  for s, (_, n) in enumerate(_VGG16_STAGES):
    for i in range(n):
      name = f"conv{s + 1}_{i + 1}"
      out[f"{name}.kernel"] = (rng.standard_normal((3, 3, c_in, widths[s])) * np.sqrt(2.0 / (9 * c_in))).astype(
        np.float32
      )
      out[f"{name}.bias"] = (0.01 * rng.standard_normal(widths[s])).astype(np.float32)
      c_in = widths[s]
    if use_lin_heads:
      out[f"lin{s}.kernel"] = rng.uniform(0.0, 1.0, widths[s]).astype(np.float32)
  return out


def weights_from_torch(
  vgg_features: Mapping[str, Any], lpips_heads: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
  """torchvision `vgg16().features.state_dict()` (+ LPIPS `lin*` state dict), as numpy -> file layout.

  Keys read: `{idx}.weight`/`{idx}.bias` (optionally prefixed `features.`) for the conv indices 0, 2, 5, ...,
  28; `lin{k}.model.1.weight` [1, C, 1, 1] for the heads. Save the result with `np.savez(path, **weights)`.
  """

  def get(d, key):
    for k in (key, f"features.{key}"):
      if k in d:
        return np.asarray(d[k], np.float32)
    raise KeyError(f"torch VGG16 state dict lacks {key!r} (or 'features.{key}')")

  out = {}
  for name, idx in zip(_conv_names(), _TORCHVISION_CONV_INDICES):
    out[f"{name}.kernel"] = get(vgg_features, f"{idx}.weight").transpose(2, 3, 1, 0)
    out[f"{name}.bias"] = get(vgg_features, f"{idx}.bias")
  if lpips_heads is not None:
    for k in range(len(_VGG16_STAGES)):
      key = f"lin{k}.model.1.weight"
      if key not in lpips_heads:
        raise KeyError(f"LPIPS state dict lacks {key!r}")
      out[f"lin{k}.kernel"] = np.asarray(lpips_heads[key], np.float32).reshape(-1)
  return out


def _validate_weights(weights: Mapping[str, np.ndarray], use_lin_heads: bool, source: str) -> None:
  missing = [k for k in perceptual_weight_names(use_lin_heads) if k not in weights]
  if missing:
    raise KeyError(
      f"perceptual weights {source} lack key {missing[0]!r}"
      + (f" (and {len(missing) - 1} more: {missing[1:]})" if len(missing) > 1 else "")
    )
  allowed = set(perceptual_weight_names(True))
  unexpected = sorted(k for k in weights if k not in allowed)
  if unexpected:
    raise ValueError(f"perceptual weights {source} hold unexpected keys {unexpected}")
  c_in = 3
  for s, (_, n) in enumerate(_VGG16_STAGES):
    for i in range(n):
      name = f"conv{s + 1}_{i + 1}"
      kernel, bias = weights[f"{name}.kernel"], weights[f"{name}.bias"]
      if kernel.ndim != 4 or kernel.shape[:3] != (3, 3, c_in):
        raise ValueError(
          f"perceptual weights {source}: {name}.kernel has shape {kernel.shape}, expected (3, 3, {c_in}, C_out)"
        )
      c_in = kernel.shape[3]
      if bias.shape != (c_in,):
        raise ValueError(f"perceptual weights {source}: {name}.bias has shape {bias.shape}, expected ({c_in},)")
    if use_lin_heads and weights[f"lin{s}.kernel"].shape != (c_in,):
      raise ValueError(
        f"perceptual weights {source}: lin{s}.kernel has shape {weights[f'lin{s}.kernel'].shape}, expected ({c_in},)"
      )


def _vgg_taps(params: Mapping[str, jax.Array], x: jax.Array) -> list[jax.Array]:
  """VGG16 conv stack on [B, H, W, 3] (already LPIPS-scaled); returns the 5 relu{s}_last feature maps."""
  taps = []
  for s, (_, n) in enumerate(_VGG16_STAGES):
    if s > 0:
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    for i in range(n):
      name = f"conv{s + 1}_{i + 1}"
      x = jax.lax.conv_general_dilated(
        x, params[f"{name}.kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      x = jax.nn.relu(x + params[f"{name}.bias"])
    taps.append(x)
  return taps


def _channel_normalize(f):
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + _NORM_EPS)


def lpips_distance(
  params: Mapping[str, jax.Array],
  x: jax.Array,
  y: jax.Array,
  use_lin_heads: bool,
  input_range: tuple[float, float] = (0.0, 1.0),
) -> jax.Array:
  """LPIPS-style distance per sample.

  Both images are mapped to [-1, 1], then ((v − shift) / scale) per RGB channel, passed through VGG16; at
  each of the 5 taps the features are unit-normalised over channels, squared-differenced, reduced over
  channels (weighted by lin{k} if `use_lin_heads`, else summed), averaged over space; the 5 are summed.

  Args:
    params: weights in the file layout (arrays).
    x, y: [B, H, W, 3] images in `input_range`, H and W >= 16.
  Returns:
    [B] float32 distances (0 for identical images, symmetric, >= 0).
  """
  if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"perceptual loss needs two [B,H,W,3] images of one shape, got {x.shape} and {y.shape}")
  if min(x.shape[1:3]) < 16:
    raise ValueError(f"perceptual loss needs images >= 16x16 (4 VGG poolings), got {x.shape}")
  params = jax.tree.map(lambda a: jax.lax.stop_gradient(jnp.asarray(a, _F32)), dict(params))
  lo, hi = input_range
  both = jnp.concatenate([_f32(x), _f32(y)], axis=0)
  both = (both - lo) / (hi - lo) * 2.0 - 1.0
  both = (both - _LPIPS_SHIFT) / _LPIPS_SCALE
  b = x.shape[0]
  total = jnp.zeros((b,), _F32)
  for k, f in enumerate(_vgg_taps(params, both)):
    f = _channel_normalize(f)
    diff = jnp.square(f[:b] - f[b:])
    if use_lin_heads:
      per_pixel = jnp.einsum("bhwc,c->bhw", diff, params[f"lin{k}.kernel"])
    else:
      per_pixel = jnp.sum(diff, axis=-1)
    total = total + jnp.mean(per_pixel, axis=(1, 2))
  return total


@flax.struct.dataclass
class PerceptualLoss:
  """Frozen LPIPS-style perceptual distance, loaded from a local .npz (the weights cannot be downloaded).

  A pytree (params are leaves; the rest is static), so pass it INTO jitted steps as an argument rather than
  closing over it. `PerceptualLoss.load(None)` gives a disabled instance: `enabled` is False and calls
  return zeros, so the caller can log `status` ("perceptual loss disabled: no weights file") and go on.
  """

  params: dict[str, jax.Array] | None
  use_lin_heads: bool = flax.struct.field(pytree_node=False, default=False)
  input_range: tuple[float, float] = flax.struct.field(pytree_node=False, default=(0.0, 1.0))
  path: str | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def load(
    cls,
    path: str | os.PathLike | None,
    use_lin_heads: bool | None = None,
    input_range: tuple[float, float] = (0.0, 1.0),
  ) -> "PerceptualLoss":
    """Reads `path` (None or '' -> disabled).

    use_lin_heads: True requires the lin{k} heads, False ignores them (plain channel sum), None uses them
      iff the file holds any lin key (and then requires all five).
    Raises FileNotFoundError if the file is missing, KeyError naming the first missing key, ValueError on
    unexpected keys or inconsistent shapes.
    """
    if path is None or str(path) == "":
      return cls(params=None, use_lin_heads=False, input_range=tuple(input_range), path=None)
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"perceptual loss weights file not found: {path!r}")
    with np.load(path, allow_pickle=False) as data:
      weights = {k: np.asarray(data[k], np.float32) for k in data.files}
    if use_lin_heads is None:
      use_lin_heads = any(k.startswith("lin") for k in weights)
    _validate_weights(weights, use_lin_heads, repr(path))
    keep = perceptual_weight_names(use_lin_heads)
    params = {k: jnp.asarray(weights[k]) for k in keep}
    return cls(params=params, use_lin_heads=bool(use_lin_heads), input_range=tuple(input_range), path=path)

  @property
  def enabled(self) -> bool:
    return self.params is not None

  @property
  def status(self) -> str:
    if not self.enabled:
      return "perceptual loss disabled: no weights file"
    heads = "LPIPS linear heads" if self.use_lin_heads else "channel sum (no linear heads)"
    return f"perceptual loss enabled: {self.path} ({heads})"

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """[B, H, W, 3] x2 -> [B] float32 distances (zeros when disabled)."""
    if not self.enabled:
      return jnp.zeros((x.shape[0],), _F32)
    return lpips_distance(self.params, x, y, self.use_lin_heads, self.input_range)
