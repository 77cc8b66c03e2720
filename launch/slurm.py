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

--dry-run (also after `--`, or DRY_RUN=1) prints the script, then the sbatch
command as the last line, and writes nothing. Otherwise the script is written to
--script (default runs/slurm/<job-name>.sbatch; an existing file this launcher
did not write needs --force) and `sbatch <script>` is run.

Preemption and time limits: `#SBATCH --signal=TERM@<--signal-lead>` has SLURM
send SIGTERM to the tasks that long before the time limit (no `B:` prefix: that
would signal only the batch shell), and the script `exec`s srun, which forwards
the signals the batch step receives (scancel, preemption) to every task. The
trainer then writes a checkpoint at the step it reached and exits; submitting
the same command again resumes from --workdir. `--requeue` lets SLURM requeue
the job after a preemption or node failure (appending to the same log).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (launch/common.py, beside this script)

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # slurm: [D-]HH[:MM[:SS]] or minutes
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_LIST = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.,-]*$")  # a partition or account, or a comma-separated list
_MAX_SIGNAL_LEAD = 65535  # sbatch's limit on sig_time
# The first lines of every script this launcher writes: the mark that lets a later run replace it without --force.
_MARK = "# written by launch/slurm.py"


def main_argv(config: str, workdir: str, overrides: Sequence[str], python: str = "python") -> list[str]:
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
  if not _NAME.match(args.job_name) or args.job_name in (".", ".."):
    raise ValueError(f"--job-name {args.job_name!r}: use letters, digits, _ . - only.")
  if not 1 <= args.signal_lead <= _MAX_SIGNAL_LEAD:
    raise ValueError(f"--signal-lead must be in [1, {_MAX_SIGNAL_LEAD}] seconds, got {args.signal_lead}.")
  for kv in args.env:
    key, sep, _ = kv.partition("=")
    if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
      raise ValueError(f"--env expects KEY=VALUE with a shell variable name, got {kv!r}.")
  # sbatch splits an #SBATCH line into options at whitespace: a value with a space or a leading '-' would add
  # options of the user's choosing (`--partition='gpu --uid=0'`).
  for value, what in ((args.partition, "partition"), (args.account, "account")):
    if value is not None and not _LIST.match(value):
      raise ValueError(f"--{what} {value!r}: use letters, digits and _ . , - only, not starting with '-'.")
  for value, what in ((args.chdir, "chdir"), (args.output or _default_output(args), "output")):
    if value is not None and (value.startswith("-") or re.search(r"[\s'\"\\]", value)):
      raise ValueError(
        f"--{what} {value!r}: an #SBATCH path cannot hold whitespace, quotes or backslashes, or start with '-'."
      )


def sbatch_script(args: argparse.Namespace) -> str:
  """The sbatch script text."""
  _validate(args)
  ntasks = tasks_per_node(args.procs_per_node, args.gpus_per_node)
  q = shlex.quote
  lines = [
    "#!/bin/bash",
    _MARK,
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
  # SIGTERM to every task (not `B:`, the batch shell only) this many seconds before the time limit.
  lines.append(f"#SBATCH --signal=TERM@{args.signal_lead}")
  if args.requeue:
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
  lines += ["", "set -euo pipefail"]
  if args.venv:
    lines.append(f". {q(os.path.join(args.venv, 'bin', 'activate'))}")
  if args.procs_per_node == "host":
    ids = ",".join(str(i) for i in range(args.gpus_per_node))
    lines.append(f"export JAX_LOCAL_DEVICE_IDS={ids}")
  lines += [f"export {q(kv)}" for kv in args.env]
  argv = main_argv(args.config, args.workdir, args.overrides, python=args.python)
  # exec: srun becomes the batch step's process, so the signals sent to it reach the tasks.
  lines.append("exec " + shlex.join(["srun", "--kill-on-bad-exit=1", *argv]))
  return "\n".join(lines) + "\n"


def _default_output(args: argparse.Namespace) -> str:
  # Absolute: with --chdir, a relative log path would resolve elsewhere.
  return os.path.join(os.path.abspath(os.path.dirname(script_path(args)) or "."), "%x-%j.out")


def _written_here(path: str) -> bool:
  """Whether `path` is a regular file starting as the scripts this launcher writes."""
  if not os.path.isfile(path) or os.path.islink(path):
    return False
  with open(path, "rb") as f:
    return f.read(64).split(b"\n")[1:2] == [_MARK.encode()]


def write_script(path: str, text: str, force: bool = False) -> None:
  """Writes the script atomically (a link at `path` is replaced, never written through).

  Raises:
    ValueError: `path` is a directory, or a file this launcher did not write and `force` is False.
  """
  if os.path.isdir(path):
    raise ValueError(f"--script {path} is a directory.")
  if os.path.lexists(path) and not force and not _written_here(path):
    raise ValueError(f"--script {path} exists and was not written by this launcher; pass --force to overwrite it.")
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".sbatch-")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.chmod(tmp, 0o755)
  os.replace(tmp, path)


def script_path(args: argparse.Namespace) -> str:
  return args.script or os.path.join("runs", "slurm", f"{args.job_name}.sbatch")


def sbatch_cmd(args: argparse.Namespace) -> list[str]:
  return ["sbatch", *args.sbatch_arg, script_path(args)]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  p.add_argument("--config", required=True, help="configs/<file>.py[:args].")
  p.add_argument("--workdir", required=True, help="Output dir shared by all nodes.")
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus-per-node", type=int, default=8)
  p.add_argument(
    "--procs-per-node", choices=("gpu", "host"), default="gpu", help="One process per GPU (default) or one per node."
  )
  p.add_argument("--time", default="24:00:00", help="Wall-clock limit.")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--cpus-per-task", type=int, default=None)
  p.add_argument("--exclusive", action="store_true", help="Whole nodes only.")
  p.add_argument("--job-name", default="mage_jax")
  p.add_argument("--chdir", default=None, help="Working dir of the job (default: where sbatch is run).")
  p.add_argument("--output", default=None, help="Slurm log path pattern.")
  p.add_argument("--venv", default=None, help="Virtualenv to activate in the job.")
  p.add_argument("--python", default="python", help="Interpreter inside the job.")
  p.add_argument(
    "--env",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="Exported before srun (repeatable), e.g. XLA_FLAGS=...",
  )
  p.add_argument("--script", default=None, help="Where to write the sbatch script.")
  p.add_argument(
    "--force", action="store_true", help="Overwrite --script even if it is not a script this launcher wrote."
  )
  p.add_argument(
    "--signal-lead",
    type=int,
    default=180,
    help="Seconds before the time limit at which the tasks get SIGTERM (checkpoint and exit).",
  )
  p.add_argument(
    "--requeue",
    action="store_true",
    help="Let SLURM requeue the job after a preemption or node failure; it resumes from --workdir.",
  )
  p.add_argument(
    "--sbatch-arg", action="append", default=[], help="Extra argument for the sbatch command line (repeatable)."
  )
  common.add_dry_run(p, "the script and the sbatch command; write")
  p.add_argument("overrides", nargs="*", help="Flags passed through to mage_jax.main, after `--`.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    args.dry_run, args.overrides = common.take_dry_run(args.dry_run, args.overrides, os.environ)
    script = sbatch_script(args)
  except ValueError as e:
    parser.error(str(e))
  cmd = sbatch_cmd(args)
  if args.dry_run:
    sys.stdout.write(script)
    print(shlex.join(cmd))
    return 0
  path = script_path(args)
  try:
    write_script(path, script, force=args.force)
    # Slurm does not create the log directory; a missing one loses the log.
    out_dir = os.path.dirname(args.output or _default_output(args))
    if out_dir and "%" not in out_dir:
      os.makedirs(out_dir, exist_ok=True)
  except ValueError as e:
    parser.error(str(e))
  except OSError as e:
    print(f"error: cannot write {path}: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path}", file=sys.stderr)
  return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
