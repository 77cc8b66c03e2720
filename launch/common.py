"""What every launcher shares: the training command, the checks on its overrides, and dry-run detection."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
DRY_RUN_FLAGS = ("--dry-run", "--dry_run")


def parse_bool(value: str, what: str) -> bool:
  """1/true/yes/on and 0/false/no/off in any case; anything else is an error, never a silent "no"."""
  v = value.strip().lower()
  if v in _TRUE:
    return True
  if v in _FALSE:
    return False
  raise ValueError(f"{what}={value!r} is not a yes/no value (use 1/true/yes/on or 0/false/no/off).")


def bool_arg(value: str) -> bool:
  """argparse `type` for `--dry-run[=BOOL]`."""
  try:
    return parse_bool(value, "--dry-run")
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def add_dry_run(parser: argparse.ArgumentParser, what: str) -> None:
  parser.add_argument(
    "--dry-run",
    "--dry_run",
    dest="dry_run",
    nargs="?",
    const=True,
    default=False,
    type=bool_arg,
    metavar="BOOL",
    help=f"Print {what} and run nothing (also: DRY_RUN=1, or --dry-run after `--`).",
  )


def take_dry_run(flag: bool, overrides: Sequence[str], environ: Mapping[str, str]) -> tuple[bool, list[str]]:
  """Whether the user asked for a dry run anywhere on the line, and the overrides without that request.

  A dry-run flag after `--` would otherwise reach training as an override while the launcher creates machines
  or submits jobs, so it counts as the launcher's own; so does $DRY_RUN.

  Raises:
    ValueError: a value that is not a yes/no spelling.
  """
  requests = [flag, parse_bool(environ.get("DRY_RUN") or "0", "DRY_RUN")]  # every value checked, not only the first
  rest = []
  for o in overrides:
    name, sep, value = o.partition("=")
    if name in DRY_RUN_FLAGS:
      requests.append(parse_bool(value, name) if sep else True)
    else:
      rest.append(o)
  return any(requests), rest


def check_overrides(overrides: Sequence[str]) -> list[str]:
  """Overrides are absl flags for mage_jax.main, e.g. `--config.lr=0.03`."""
  for o in overrides:
    if not o.startswith("--"):
      raise ValueError(f"override {o!r} is not a flag; write it as --config.<key>=<value> (after a `--` separator).")
    if "\n" in o or "\r" in o:
      raise ValueError(f"override {o!r} contains a newline; not supported.")
  return list(overrides)


def main_argv(
  config: str,
  workdir: str,
  overrides: Sequence[str],
  python: str = "python",
  workdir_hint: str = "a path every host can write",
) -> list[str]:
  """argv of the training command every host/task runs."""
  if not config:
    raise ValueError("--config is required (e.g. configs/mage_pretrain.py:variant=B).")
  if not workdir:
    raise ValueError(f"--workdir is required ({workdir_hint}).")
  return [python, "-m", "mage_jax.main", f"--config={config}", f"--workdir={workdir}", *check_overrides(overrides)]
