"""`python -m mage_jax.verify DIR`: checks that mage_jax computes what the official PyTorch code computed.

DIR is an official-code fixture; its files say which check runs (docs/verify.md):
  * `reference.npz`: the forward pass (tokenizer, MAGE, ViT probe) on the official inputs
    (`mage_jax.conformance.forward`), e.g. tests/testdata/official_tiny;
  * `trajectory.npz`: a recorded pretraining run replayed step by step through the training update, optimizer
    and schedule (`mage_jax.conformance.trajectory`), e.g. tests/testdata/official_train_tiny;
  * `probe_trajectory.npz`: a recorded linear-probe run, plus the fine-tuning parameter groups
    (`mage_jax.conformance.trajectory`), e.g. tests/testdata/official_probe_tiny.
One table is printed. Exit status 1 when an error is above its tolerance, 2 when DIR is unusable.
"""

from __future__ import annotations

import jax
from absl import flags

from mage_jax.conformance import fixtures, forward as conformance, trajectory
from mage_jax.convert import torch_pickle
from mage_jax.system import runtime
from mage_jax.train import config_views

_MESH = flags.DEFINE_string(
  "mesh",
  "",
  "Pretraining replays: device mesh as axis=size pairs over data, fsdp, model (e.g. "
  "data=2,fsdp=2,model=2); empty runs on one device.",
)
_DTYPE = flags.DEFINE_enum(
  "dtype",
  "float32",
  list(config_views.DTYPE_NAMES),
  "Pretraining replays: compute dtype of the model (params and "
  "optimizer stay float32); bfloat16 is judged against a wider band.",
)
_MAX_BYTES = torch_pickle.define_max_gb_flag()


def _forward(directory: str) -> int:
  try:
    checks = conformance.run(directory, _MAX_BYTES())
  except (FileNotFoundError, ValueError, KeyError, torch_pickle.CheckpointError) as e:
    raise runtime.UsageError(f"{directory}: {e}") from e
  print(conformance.format_table(checks))
  for reason in conformance.skipped(directory):
    print(f"skipped: {reason}")
  failed = [c.name for c in checks if not c.passed]
  print(f"{len(checks) - len(failed)}/{len(checks)} outputs within tolerance (rel L2 < {conformance.REL_TOLERANCE:g})")
  return 1 if failed else 0


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    raise runtime.UsageError(f"expected one fixture directory, got {argv[1:]}")
  directory = argv[1]
  try:
    mesh = trajectory.parse_mesh(_MESH.value, jax.device_count())
    kind = fixtures.fixture_kind(directory)
  except ValueError as e:
    raise runtime.UsageError(str(e)) from e
  if kind != "pretrain" and (_MESH.value or _DTYPE.value != "float32"):
    raise runtime.UsageError(f"--mesh and --dtype apply to pretraining trajectories; {directory} is a {kind} fixture")
  # Parity is judged at full float32 precision (no TF32 / bf16 passes on accelerators).
  jax.config.update("jax_default_matmul_precision", "highest")
  if kind == "forward":
    return _forward(directory)
  try:
    if kind == "pretrain":
      title, rows = trajectory.check_pretrain(directory, mesh=mesh, dtype=_DTYPE.value)
    else:
      title, rows = trajectory.check_probe(directory)
  except fixtures.FixtureError as e:
    raise runtime.UsageError(str(e)) from e
  print(trajectory.format_table(title, rows))
  return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
  runtime.run(main)
