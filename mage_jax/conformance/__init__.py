"""Conformance with the official PyTorch code: forward outputs (`forward`) and recorded training runs
(`fixtures` reads them, `trajectory` replays them), as `python -m mage_jax.verify` checks them.
"""
