#!/usr/bin/env python3
"""Create, set up, run on and delete a Cloud TPU VM (single host or pod slice).

Every worker of the slice runs the SAME command (`--worker=all`);
`jax.distributed.initialize()` in mage_jax.main finds the coordinator, process
count and index from the TPU metadata, so nothing host-specific is passed.

  python launch/tpu_vm.py all --name=mage-b --zone=us-central2-b \
      --accelerator-type=v4-64 --config=configs/mage_pretrain.py:variant=B \
      --workdir=gs://my-bucket/runs/mage_b -- --config.total_epochs=1600

Subcommands: create | setup | run | delete | all (create, setup, run, then
delete even if setup or run failed, so a failed run does not leave a pod
billing). `--dry-run` prints the commands, one per line, shell-quoted, and runs
nothing; so does `--dry-run` after `--`, or DRY_RUN=1 in the environment. Without
it they run in order and the first failure stops the script.

Preemption: a maintenance event or spot preemption sends SIGTERM to the training
process (the run line ends in `exec python ...`, also under --detach's nohup,
which only ignores SIGHUP); mage_jax's trainer then writes a checkpoint at the
step it reached and exits. Re-running the same command resumes from --workdir.

Setup ships the code either as `git archive HEAD` of this checkout (committed
files only, so a run is reproducible from a commit; the default) or, with
--repo-url, as a `git clone` on every worker; then it makes a venv with
--python (jax >= 0.10 needs Python >= 3.11; installed with apt if missing) and
`pip install -e '<dir>[tpu]'`. Paths on the workers are relative to the
login user's home directory.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (launch/common.py, beside this script)

_GCLOUD_TPU = ("gcloud", "compute", "tpus", "tpu-vm")
_ARCHIVE = "mage_jax_src.tar.gz"
_SAFE_REL_PATH = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]*$")
# Cloud TPU names: lowercase letters, digits and hyphens, starting with a letter (also used in a local file name).
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_SIMPLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_WORKER = re.compile(r"^(all|\d+(,\d+)*)$")


def main_argv(config: str, workdir: str, overrides: Sequence[str], python: str = "python") -> list[str]:
  return common.main_argv(config, workdir, overrides, python, workdir_hint="e.g. gs://bucket/runs/name")


def _rel_path(value: str, what: str) -> str:
  # Worker paths stay unquoted-safe and home-relative so that `~` never needs
  # expanding inside a quoted string.
  if not _SAFE_REL_PATH.match(value) or ".." in value.split("/"):
    raise ValueError(
      f"--{what} must be a simple path relative to the worker's home directory "
      f"(letters, digits, _ . / -), got {value!r}."
    )
  return value


def _validate(args: argparse.Namespace) -> None:
  if not _NAME.match(args.name):
    raise ValueError(
      f"--name {args.name!r}: a TPU name is lowercase letters, digits and hyphens, starting with a letter (at most 63)."
    )
  if not _WORKER.match(args.worker):
    raise ValueError(f"--worker {args.worker!r}: use 'all' or worker indices such as 0 or 0,1.")
  for what in ("zone", "project", "accelerator_type", "version"):
    value = getattr(args, what, None)
    if value is not None and not _SIMPLE.match(value):
      raise ValueError(f"--{what.replace('_', '-')} {value!r}: use letters, digits and _ . : - only.")
  # git reads a value starting with '-' as an option (`--ref=--output=FILE` would write where the user named).
  for what, bad in (("ref", r"[\s\x00-\x1f]"), ("repo_url", r"[\x00-\x1f]")):
    value = getattr(args, what, None)
    if value is not None and (not value or value.startswith("-") or re.search(bad, value)):
      raise ValueError(
        f"--{what.replace('_', '-')} {value!r}: cannot be empty, start with '-' or hold "
        f"{'whitespace' if what == 'ref' else 'control characters'}."
      )
  if args.action == "all" and args.detach:
    raise ValueError(
      "--detach with `all` would delete the TPU VM while training runs; use create, setup, "
      "run --detach, then delete when the run is done."
    )


def _common_flags(args: argparse.Namespace) -> list[str]:
  flags = [f"--zone={args.zone}"]
  if args.project:
    flags.append(f"--project={args.project}")
  return flags


def _ssh(args: argparse.Namespace, remote: str) -> list[str]:
  return [*_GCLOUD_TPU, "ssh", args.name, *_common_flags(args), f"--worker={args.worker}", f"--command={remote}"]


def create_cmds(args: argparse.Namespace) -> list[list[str]]:
  cmd = [
    *_GCLOUD_TPU,
    "create",
    args.name,
    *_common_flags(args),
    f"--accelerator-type={args.accelerator_type}",
    f"--version={args.version}",
  ]
  if args.spot:
    cmd.append("--spot")
  return [cmd]


def setup_cmds(args: argparse.Namespace) -> list[list[str]]:
  """Ship the code to every worker, then build a venv and install it."""
  src = _rel_path(args.remote_dir, "remote-dir")
  venv = _rel_path(args.venv, "venv")
  if src.strip("/") in (".", "") or venv.strip("/") in (".", ""):
    raise ValueError("--remote-dir and --venv must name subdirectories of the home dir.")
  if src.rstrip("/") == venv.rstrip("/"):
    raise ValueError(f"--remote-dir and --venv must differ, both are {src!r}.")
  py = args.python
  cmds = []
  if args.repo_url:
    q = shlex.quote
    # Fetch the ref even right after cloning, and check out FETCH_HEAD detached,
    # so a re-run of setup moves to the remote's current commit for branches.
    fetch = (
      f"(test -d {src}/.git || git clone {q(args.repo_url)} {src}) && "
      f"git -C {src} fetch --tags origin {q(args.ref)} && "
      f"git -C {src} checkout --detach FETCH_HEAD"
    )
  else:
    local_archive = os.path.join(args.private_dir, f"{args.name}-{_ARCHIVE}")
    cmds.append(["git", "-C", args.repo_root, "archive", "--format=tar.gz", f"--output={local_archive}", args.ref])
    cmds.append(
      [*_GCLOUD_TPU, "scp", local_archive, f"{args.name}:{_ARCHIVE}", *_common_flags(args), f"--worker={args.worker}"]
    )
    fetch = f"rm -rf {src} && mkdir -p {src} && tar -xzf {_ARCHIVE} -C {src}"
  q_py = shlex.quote(py)
  install = " && ".join(
    [
      f"(command -v {q_py} >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q {q_py} {q_py}-venv))",
      f"{q_py} -m venv {venv}",
      f"{venv}/bin/pip install -q -U pip",
      f"{venv}/bin/pip install -q -e {shlex.quote('./' + src + '[tpu]')}",
    ]
  )
  cmds.append(_ssh(args, f"set -e; {fetch} && {install}"))
  return cmds


def run_remote_command(args: argparse.Namespace) -> str:
  """The shell line each worker runs: env, venv, cd, then the main argv."""
  parts = []
  for kv in args.env:
    key, sep, _ = kv.partition("=")
    if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
      raise ValueError(f"--env expects KEY=VALUE with a shell variable name, got {kv!r}.")
    parts.append(f"export {shlex.quote(kv)}")
  parts.append(f". {_rel_path(args.venv, 'venv')}/bin/activate")
  parts.append(f"cd {_rel_path(args.remote_dir, 'remote-dir')}")
  # exec: python replaces the shell, so a SIGTERM sent to the job's process (preemption) reaches the trainer.
  parts.append("exec " + shlex.join(main_argv(args.config, args.workdir, args.overrides)))
  line = " && ".join(parts)
  if args.detach:
    # Survives the ssh session closing (nohup ignores SIGHUP only; SIGTERM still reaches the trainer); logs stay
    # on each worker.
    log = _rel_path(args.log, "log")
    line = f"nohup bash -c {shlex.quote(line)} > {log} 2>&1 < /dev/null &"
  return line


def run_cmds(args: argparse.Namespace) -> list[list[str]]:
  if not args.workdir.startswith("gs://"):
    print(
      f"warning: --workdir={args.workdir!r} is not a gs:// path; on a multi-host "
      "slice every worker would write its own local copy.",
      file=sys.stderr,
    )
  return [_ssh(args, run_remote_command(args))]


def delete_cmds(args: argparse.Namespace) -> list[list[str]]:
  return [[*_GCLOUD_TPU, "delete", args.name, *_common_flags(args), "--quiet"]]


def _add_common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--name", required=True, help="TPU VM name.")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b.")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud's).")
  p.add_argument("--worker", default="all", help="Workers to ssh/scp to (default all; an index for debugging).")
  common.add_dry_run(p, "the commands, one per line,")


def _add_create(p: argparse.ArgumentParser) -> None:
  p.add_argument("--accelerator-type", default="v4-8", help="e.g. v4-8, v4-64, v5p-128.")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU software version.")
  p.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity.")


def _add_setup(p: argparse.ArgumentParser) -> None:
  p.add_argument("--repo-url", default=None, help="git clone this on the workers instead of shipping `git archive`.")
  p.add_argument("--ref", default="HEAD", help="Commit/branch/tag to ship or check out.")
  p.add_argument(
    "--repo-root",
    default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    help="Local checkout to archive.",
  )
  p.add_argument(
    "--archive-dir",
    default=None,
    help="Where the local archive's private directory is made (default: the system's temp dir).",
  )
  p.add_argument("--python", default="python3.11", help="Interpreter for the venv (>= 3.11).")


def _add_paths(p: argparse.ArgumentParser) -> None:
  p.add_argument("--remote-dir", default="mage_jax", help="Code dir under the worker's home.")
  p.add_argument("--venv", default="mage_venv", help="Venv dir under the worker's home.")


def _add_run(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, help="configs/<file>.py[:args], repo-relative.")
  p.add_argument("--workdir", required=True, help="Shared output dir, normally gs://...")
  p.add_argument(
    "--env",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="Environment variable exported before the run (repeatable).",
  )
  p.add_argument("--detach", action="store_true", help="Run under nohup in the background; output goes to --log.")
  p.add_argument("--log", default="mage_run.log", help="Log file (with --detach).")
  p.add_argument("overrides", nargs="*", help="Flags passed through to mage_jax.main, after `--`.")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  sub = parser.add_subparsers(dest="action", required=True)
  for name, adders in (
    ("create", [_add_create]),
    ("setup", [_add_setup, _add_paths]),
    ("run", [_add_paths, _add_run]),
    ("delete", []),
    ("all", [_add_create, _add_setup, _add_paths, _add_run]),
  ):
    p = sub.add_parser(name, allow_abbrev=False)
    _add_common(p)
    for add in adders:
      add(p)
  return parser


def plan(args: argparse.Namespace) -> list[list[str]]:
  """All commands for the chosen subcommand, in order."""
  if args.action == "all":
    return create_cmds(args) + setup_cmds(args) + run_cmds(args) + delete_cmds(args)
  return {"create": create_cmds, "setup": setup_cmds, "run": run_cmds, "delete": delete_cmds}[args.action](args)


def execute(args: argparse.Namespace, cmds: list[list[str]]) -> int:
  if args.action != "all":
    for cmd in cmds:
      subprocess.run(cmd, check=True)
    return 0
  create, body, delete = cmds[:1], cmds[1:-1], cmds[-1]
  subprocess.run(create[0], check=True)
  try:
    for cmd in body:
      subprocess.run(cmd, check=True)
  finally:
    print(f"deleting {args.name}", file=sys.stderr)
    subprocess.run(delete, check=False)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    args.dry_run, overrides = common.take_dry_run(args.dry_run, getattr(args, "overrides", []), os.environ)
    if hasattr(args, "overrides"):
      args.overrides = overrides
    _validate(args)
    args.private_dir = _private_dir(args)
    cmds = plan(args)
  except ValueError as e:
    parser.error(str(e))
  if args.dry_run:
    for cmd in cmds:
      print(shlex.join(cmd))
    return 0
  try:
    return execute(args, cmds)
  except subprocess.CalledProcessError as e:
    print(f"error: command failed with exit code {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
    return e.returncode or 1
  finally:
    if args.private_dir and os.path.isdir(args.private_dir):
      shutil.rmtree(args.private_dir)  # made by this run (mkdtemp), holding only its archive


def _private_dir(args: argparse.Namespace) -> str | None:
  """A fresh directory only this user can enter, for the code archive: a fixed name in a shared /tmp could be
  a link planted by another user, which `git archive --output` would follow. A dry run makes nothing and shows
  where the directory would go."""
  if args.action not in ("setup", "all") or args.repo_url:
    return None
  parent = args.archive_dir or tempfile.gettempdir()
  if args.dry_run:
    return os.path.join(parent, "mage_jax_archive-XXXXXXXX")
  try:
    return tempfile.mkdtemp(prefix="mage_jax_archive-", dir=parent)
  except OSError as e:
    raise ValueError(f"--archive-dir {parent}: cannot make a private directory there ({e.strerror}).") from None


if __name__ == "__main__":
  sys.exit(main())
