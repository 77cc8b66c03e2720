"""mage_jax: MAGE (MAsked Generative Encoder) in JAX/Flax."""

__version__ = "0.1.0"
