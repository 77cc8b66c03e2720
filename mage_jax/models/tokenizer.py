"""What MAGE's jobs need of a tokenizer: images to a grid of ids and back, and the sizes of both.

`models.vqgan.VQGAN` is the one this package trains, converts and ships. Pretraining, MAGE-C, the
class-conditional decoder, fine-tuning, the probes, generation, editing and `api` call a tokenizer only through
this interface (flax `apply` with `method="encode_to_ids"` or `"decode_ids"`, and `config`), so another flax
module with the same methods and sizes runs through them unchanged (`tests/test_models.py` runs a pretraining
step and generation with a patch-quantising one).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax


class TokenizerConfig(Protocol):
  resolution: int  # images are [B, resolution, resolution, 3] in [0, 1]
  codebook_size: int  # ids are in [0, codebook_size)

  @property
  def token_grid(self) -> int:  # ids form a token_grid x token_grid grid, row-major
    ...

  @property
  def num_tokens(self) -> int:  # token_grid ** 2
    ...


@runtime_checkable
class Tokenizer(Protocol):
  """A flax module; its methods are called through `apply(variables, x, method=<name>)`."""

  config: TokenizerConfig

  def encode_to_ids(self, images: jax.Array) -> jax.Array:
    """float [B, R, R, 3] in [0, 1] -> int32 [B, num_tokens]."""
    ...

  def decode_ids(self, ids: jax.Array) -> jax.Array:
    """int [B, num_tokens] -> float [B, R, R, 3] (about [0, 1]; callers clip)."""
    ...
