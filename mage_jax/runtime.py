"""Process start-up shared by every binary: multi-process initialisation and log filtering."""

from __future__ import annotations

import os

import jax
from absl import logging


def cluster_detected() -> bool:
  """TPU pods and multi-task SLURM jobs: jax.distributed.initialize() finds the coordinator by itself."""
  env = os.environ
  slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
  tpu_pod = len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env
  return slurm or tpu_pod


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Explicit coordinator if given, else auto-detection on clusters, else a single process (no call)."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif cluster_detected():
    jax.distributed.initialize()


class QuietOrbax(logging.logging.Filter):
  """orbax logs every checkpoint step at INFO; keep its warnings only, so progress lines stay readable."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
  logging.get_absl_logger().addFilter(QuietOrbax())
