"""Conformance with the official PyTorch code: forward outputs (`forward`) and recorded training runs
(`trajectory`), as `python -m mage_jax.verify` checks them.
"""
