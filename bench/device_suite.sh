#!/usr/bin/env bash
# The checks for one GPU host in at most ~8 minutes, results as JSON under $OUT (see bench/device_suite.py):
# verify against the official fixtures in float32 on the device, the bf16/TF32 tolerance tests, 20 training steps
# with a resume on random data, the ViT-B/L benchmark, and the cuDNN lowering.
#
#   OUT=/tmp/suite bash bench/device_suite.sh       # on the GPU host (or --out=DIR)
#   bash bench/device_suite.sh --dry-run            # any machine: prints the steps, checks paths and flags
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# The benchmark's batches want more than the 75% of GPU memory JAX preallocates by default.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" bench/device_suite.py "$@"
