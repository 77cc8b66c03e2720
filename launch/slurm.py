#!/usr/bin/env python3
"""Write an sbatch script for a multi-node GPU run of mage_jax and submit it.

  python launch/slurm.py --nodes=4 --gpus-per-node=8 --time=48:00:00 \
      --partition=gpu --config=configs/mage_pretrain.py:variant=B \
      --workdir=/shared/runs/mage_b -- --config.input.batch_size=4096

The script's body is one `srun python -m mage_jax.main ...`: srun starts the
same command in every task, and `jax.distributed.initialize()` reads
SLURM_{JOB_ID,STEP_NODELIST,NTASKS,PROCID,LOCALID} to find the coordinator
(first node, port derived from the job id), process count and index.

Process layout (--procs-per-node):
  gpu  (default) one process per GPU: --ntasks-per-node = --gpus-per-node. JAX
       restricts each process to GPU number SLURM_LOCALID, so every task must
       see all of the node's GPUs: do not add --gpus-per-task / per-task GPU
       binding.
  host one process per node owning all its GPUs: --ntasks-per-node=1. JAX
       would still pick only GPU SLURM_LOCALID (=0), so the script exports
       JAX_LOCAL_DEVICE_IDS=0,...,G-1, which initialize() reads instead.

--dry-run prints the script, then the sbatch command as the last line, and
writes nothing. Otherwise the script is written to --script (default
runs/slurm/<job-name>.sbatch) and `sbatch <script>` is run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (launch/common.py, beside this script)

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # slurm: [D-]HH[:MM[:SS]] or minutes
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def main_argv(config: str, workdir: str, overrides: Sequence[str],
              python: str = "python") -> list[str]:
  return common.main_argv(config, workdir, overrides, python, workdir_hint="a path all nodes share")


def tasks_per_node(procs_per_node: str, gpus_per_node: int) -> int:
  if procs_per_node == "gpu":
    return gpus_per_node
  if procs_per_node == "host":
    return 1
  raise ValueError(f"--procs-per-node must be 'gpu' or 'host', got {procs_per_node!r}.")


def _validate(args: argparse.Namespace) -> None:
  if args.nodes < 1:
    raise ValueError(f"--nodes must be >= 1, got {args.nodes}.")
  if args.gpus_per_node < 1:
    raise ValueError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}.")
  if not _TIME.match(args.time):
    raise ValueError(f"--time {args.time!r} is not a slurm time ([D-]HH:MM:SS or minutes).")
  if not _NAME.match(args.job_name):
    raise ValueError(f"--job-name {args.job_name!r}: use letters, digits, _ . - only.")
  for kv in args.env:
    key, sep, _ = kv.partition("=")
    if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
      raise ValueError(f"--env expects KEY=VALUE with a shell variable name, got {kv!r}.")
  for value, what in ((args.partition, "partition"), (args.account, "account"),
                      (args.chdir, "chdir"), (args.output, "output")):
    if value is not None and any(c in value for c in "\n\r"):
      raise ValueError(f"--{what} contains a newline.")


def sbatch_script(args: argparse.Namespace) -> str:
  """The sbatch script text."""
  _validate(args)
  ntasks = tasks_per_node(args.procs_per_node, args.gpus_per_node)
  q = shlex.quote
  lines = [
      "#!/bin/bash",
      f"#SBATCH --job-name={args.job_name}",
      f"#SBATCH --nodes={args.nodes}",
      f"#SBATCH --ntasks-per-node={ntasks}",
      f"#SBATCH --gpus-per-node={args.gpus_per_node}",
      f"#SBATCH --time={args.time}",
  ]
  # #SBATCH lines are not parsed by a shell: values go in unquoted.
  if args.cpus_per_task:
    lines.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    lines.append(f"#SBATCH --account={args.account}")
  if args.chdir:
    lines.append(f"#SBATCH --chdir={args.chdir}")
  lines.append(f"#SBATCH --output={args.output or _default_output(args)}")
  if args.exclusive:
    lines.append("#SBATCH --exclusive")
  lines += ["", "set -euo pipefail"]
  if args.venv:
    lines.append(f". {q(os.path.join(args.venv, 'bin', 'activate'))}")
  if args.procs_per_node == "host":
    ids = ",".join(str(i) for i in range(args.gpus_per_node))
    lines.append(f"export JAX_LOCAL_DEVICE_IDS={ids}")
  lines += [f"export {q(kv)}" for kv in args.env]
  argv = main_argv(args.config, args.workdir, args.overrides, python=args.python)
  lines.append(shlex.join(["srun", "--kill-on-bad-exit=1", *argv]))
  return "\n".join(lines) + "\n"


def _default_output(args: argparse.Namespace) -> str:
  # Absolute: with --chdir, a relative log path would resolve elsewhere.
  return os.path.join(os.path.abspath(os.path.dirname(script_path(args)) or "."),
                      "%x-%j.out")


def script_path(args: argparse.Namespace) -> str:
  return args.script or os.path.join("runs", "slurm", f"{args.job_name}.sbatch")


def sbatch_cmd(args: argparse.Namespace) -> list[str]:
  return ["sbatch", *args.sbatch_arg, script_path(args)]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="configs/<file>.py[:args].")
  p.add_argument("--workdir", required=True, help="Output dir shared by all nodes.")
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus-per-node", type=int, default=8)
  p.add_argument("--procs-per-node", choices=("gpu", "host"), default="gpu",
                 help="One process per GPU (default) or one per node.")
  p.add_argument("--time", default="24:00:00", help="Wall-clock limit.")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--cpus-per-task", type=int, default=None)
  p.add_argument("--exclusive", action="store_true", help="Whole nodes only.")
  p.add_argument("--job-name", default="mage_jax")
  p.add_argument("--chdir", default=None,
                 help="Working dir of the job (default: where sbatch is run).")
  p.add_argument("--output", default=None, help="Slurm log path pattern.")
  p.add_argument("--venv", default=None, help="Virtualenv to activate in the job.")
  p.add_argument("--python", default="python", help="Interpreter inside the job.")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="Exported before srun (repeatable), e.g. XLA_FLAGS=...")
  p.add_argument("--script", default=None, help="Where to write the sbatch script.")
  p.add_argument("--sbatch-arg", action="append", default=[],
                 help="Extra argument for the sbatch command line (repeatable).")
  p.add_argument("--dry-run", action="store_true",
                 help="Print the script and the sbatch command; write/run nothing.")
  p.add_argument("overrides", nargs="*",
                 help="Flags passed through to mage_jax.main, after `--`.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    script = sbatch_script(args)
  except ValueError as e:
    parser.error(str(e))
  cmd = sbatch_cmd(args)
  if args.dry_run:
    sys.stdout.write(script)
    print(shlex.join(cmd))
    return 0
  path = script_path(args)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  os.chmod(path, 0o755)
  # Slurm does not create the log directory; a missing one loses the log.
  out_dir = os.path.dirname(args.output or _default_output(args))
  if out_dir and "%" not in out_dir:
    os.makedirs(out_dir, exist_ok=True)
  print(f"wrote {path}", file=sys.stderr)
  return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
