"""Process life of every binary: absl flags, start-up, and errors reported as one line.

Every binary is `python -m mage_jax.<verb>`: a module holding only its flags and a `main(argv)`, started with
`runtime.run(main)`. That gives each of them the same behaviour:

  * flags are absl flags (`--help` lists the binary's own, `--helpfull` all); a bad flag value is one line on
    stderr and exit status 2;
  * an error the user can fix (a missing file, a bad value, a corrupt checkpoint) is one line naming the input
    and the problem, exit status 1 (`UsageError`: 2); `--verbose` shows the Python traceback instead;
  * Ctrl-C exits with status 130 without a traceback (training loops checkpoint first: see `preemption`);
  * `MAGE_JAX_PARSE_ONLY=1` in the environment parses the flags (and loads `--config` files) and exits 0
    without running anything: the tests push every documented command line through it.
`start()` is the shared start-up: quiet orbax logs and multi-process initialisation.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

PARSE_ONLY_ENV = "MAGE_JAX_PARSE_ONLY"

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the Python traceback of an error instead of one line.")


class UsageError(ValueError):
  """The command line is wrong (exit status 2)."""


def define_float(
  name: str, default: float | None, help_text: str, *, lower: float | None = None, upper: float | None = None
) -> flags.FlagHolder:
  """A float flag that refuses NaN/inf (absl's bounds let NaN through) and values outside [lower, upper]."""
  holder = flags.DEFINE_float(name, default, help_text, lower_bound=lower, upper_bound=upper)
  flags.register_validator(name, lambda v: v is None or math.isfinite(v), message=f"--{name} must be finite")
  return holder


def define_distributed_flags() -> tuple[flags.FlagHolder, flags.FlagHolder, flags.FlagHolder]:
  """Flags for an explicit multi-process coordinator (TPU pods and SLURM jobs are detected without them)."""
  return (
    flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, for multi-process runs that are not auto-detected."
    ),
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).", lower_bound=1),
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).", lower_bound=0),
  )


def cluster_detected() -> bool:
  """TPU pods and multi-task SLURM jobs: jax.distributed.initialize() finds the coordinator by itself."""
  env = os.environ
  slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
  tpu_pod = len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env
  return slurm or tpu_pod


def initialize_distributed(
  coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None, **timeouts
) -> None:
  """Explicit coordinator if given, else auto-detection on clusters, else a single process (no call).

  `timeouts`: jax.distributed.initialize's `initialization_timeout`, `heartbeat_timeout_seconds`,
  `shutdown_timeout_seconds` (seconds, positive integers; `config.distributed` in the training configs). A
  process that sends no heartbeat for `heartbeat_timeout_seconds` counts as dead: the coordination service then
  ends every other process (status 134) with a message naming the dead one (see docs/faults.md).
  """
  for name, value in timeouts.items():
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise UsageError(f"distributed {name} must be a positive number of seconds, got {value!r}")
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise UsageError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise UsageError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
  elif not cluster_detected():
    return
  # The training loop agrees on a step to stop at by itself (mage_jax.train.preemption). JAX's preemption service
  # would install a C-level SIGTERM handler that only sets a flag it reads: a SIGTERM arriving before the loop
  # takes the signal over (or in a binary without a loop) would be swallowed instead of ending the process.
  jax.config.update("jax_enable_preemption_service", False)
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **timeouts
  )


class QuietOrbax(logging.logging.Filter):
  """orbax logs every checkpoint step at INFO; keep its warnings only, so progress lines stay readable."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
  logging.get_absl_logger().addFilter(QuietOrbax())


def start(distributed_flags=None, **timeouts) -> None:
  """Start-up shared by the binaries: quiet orbax logs, join the other processes, log where we run.

  Args:
    distributed_flags: the holders from `define_distributed_flags()`, for binaries that run multi-process.
    timeouts: passed to `jax.distributed.initialize` (see `initialize_distributed`).
  """
  quiet_orbax_logs()
  if distributed_flags is not None:
    initialize_distributed(*(f.value for f in distributed_flags), **timeouts)
  logging.info(
    "process %d/%d, %d local / %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )


# `.NAME.XXXXXXXX.tmp` (tempfile.mkstemp beside NAME) or `NAME.tmp`: a file written and then renamed to NAME.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$|^(?P<plain>.+)\.tmp$")


def _os_error_line(error: OSError) -> str:
  """'PATH: what the system said', naming the file a user asked for rather than its temporary name."""
  name = os.fsdecode(error.filename)
  folder, base = os.path.split(name)
  temporary = _TEMPORARY.match(base)
  if temporary:
    return f"cannot write {os.path.join(folder, temporary['name'] or temporary['plain'])}: {error.strerror}"
  if isinstance(error, FileExistsError) and not os.path.isdir(name):
    return f"{name} exists and is not a directory"
  return f"{name}: {error.strerror}"


def _one_line(error: BaseException) -> str:
  if isinstance(error, OSError) and error.strerror and error.filename is not None:
    return _os_error_line(error)
  text = str(error)
  head, traceback_mark, trace = text.partition("Traceback (most recent call last):")
  if traceback_mark:  # a library that wraps an error with its traceback as text: keep the error's own line
    last = [line for line in trace.strip().splitlines() if line.strip()][-1:]
    text = f"{head.strip()} {' '.join(last)}"
  if isinstance(error, (KeyError, AttributeError)):  # their str() is a repr: quotes and escaped newlines
    text = text.strip("'\"").replace("\\n", " ").replace("\\'", "'")
  text = " ".join(text.split()) or type(error).__name__
  return text if len(text) <= 2000 else text[:2000] + " ..."


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    # absl exits with status 1 after printing the help it was asked for; asking for help is not an error.
    if any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    sys.stderr.write(f"error: {_one_line(e)} (see --help)\n")
    sys.exit(2)
  except (KeyError, AttributeError, ValueError, TypeError, OSError) as e:
    # config_flags loads --config files and applies --config.* overrides while parsing, with its own errors.
    if "--verbose" in argv:
      raise
    sys.stderr.write(f"error: bad command line ({type(e).__name__}): {_one_line(e)} (see --help)\n")
    sys.exit(2)


# Errors a user can act on; anything else is reported as an internal error (with the same one line).
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError, RuntimeError)


def run(main: Callable[[list[str]], int | None]) -> None:
  """Runs `main(argv)` as a binary (see the module docstring); never returns."""

  def wrapped(argv):
    if os.environ.get(PARSE_ONLY_ENV) == "1":
      print(f"flags parsed: {' '.join(argv[1:]) or '(no positional arguments)'}")
      return 0
    try:
      status = main(argv)
    except (app.UsageError, UsageError) as e:
      if _VERBOSE.value:
        raise
      sys.stderr.write(f"error: {_one_line(e)} (see --help)\n")
      return 2
    except KeyboardInterrupt:
      sys.stderr.write("interrupted\n")
      return 130
    except Exception as e:  # pylint: disable=broad-except
      if _VERBOSE.value:
        raise
      kind = "" if isinstance(e, USER_ERRORS) else f"internal error ({type(e).__name__}): "
      hint = "" if isinstance(e, USER_ERRORS) else " (run with --verbose for the traceback)"
      sys.stderr.write(f"error: {kind}{_one_line(e)}{hint}\n")
      return 1
    return int(status or 0)

  # Flags defined here (--verbose, the distributed ones) belong in the binary's own --help.
  for flag in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__]):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(wrapped, flags_parser=_parse_flags)


def config_value(holder: flags.FlagHolder):
  """The ConfigDict of a `config_flags.DEFINE_config_file` flag; a file that fails to load is a usage error."""
  try:
    value = holder.value
    value.keys()  # config_flags defers a load failure until the config is first read
    return value
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"--{holder.name}: {_one_line(e)}") from e


def no_positional_arguments(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; every input is a --flag")
