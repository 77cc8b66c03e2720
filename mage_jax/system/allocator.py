"""tcmalloc under the compute-heavy binaries on Linux, when the system has it.

XLA:CPU allocates each program's buffers on every call. Under glibc's allocator, memory freed by its worker
threads goes back to the kernel, so every call faults the pages in again: the tiny pretraining step at batch 64
(188 MiB of temporaries) took 48,000 page faults per step, a third of its CPU time in the kernel, and ran at
130-150 ms; under tcmalloc, which keeps freed memory for reuse, it takes no faults and runs at 75-82 ms
(docs/performance.md, "CPU"). PyTorch's step gains 10-15% from the same change.

An allocator can only be chosen before the process starts, so `python -m mage_jax.<verb>` for the verbs in
`BINARIES` re-executes itself once, with the library in `LD_PRELOAD`, before anything else is imported
(`mage_jax/__init__.py` calls `maybe_reexec`). Nothing happens when:

  * `MAGE_JAX_TCMALLOC=0` is set, or `LD_PRELOAD` already names an allocator (tcmalloc, jemalloc, mimalloc);
  * the system has no tcmalloc (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`; `make setup` installs it
    when run as root);
  * mage_jax is imported as a library: a program of your own chooses its allocator itself, for example
    `LD_PRELOAD=libtcmalloc_minimal.so.4 python my_script.py`.
"""

from __future__ import annotations

import os
import sys

ENV = "MAGE_JAX_TCMALLOC"
# Training, evaluation and generation; conversion and verification run once and are bounded by their own
# memory checks, which measure the default allocator.
BINARIES = (
  "mage_jax.main",
  "mage_jax.quickstart",
  "mage_jax.reference",
  "mage_jax.evaluate",
  "mage_jax.generate",
  "mage_jax.edit",
  "mage_jax.fid",
)
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
KNOWN_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def find_tcmalloc() -> str | None:
  """Path of the system's tcmalloc shared library, or None."""
  for directory in LIBRARY_DIRS:
    for name in LIBRARIES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return None


def reexec_command(argv: list[str], environ: dict) -> tuple[list[str], dict] | None:
  """(argv, environment) to re-execute this process with tcmalloc preloaded, or None to carry on as is."""
  preload = environ.get("LD_PRELOAD", "")
  if (
    environ.get(ENV) == "0" or not sys.platform.startswith("linux") or any(name in preload for name in KNOWN_ALLOCATORS)
  ):
    return None
  library = find_tcmalloc()
  if library is None:
    return None
  env = dict(environ, LD_PRELOAD=f"{library} {preload}".strip())
  # tcmalloc reports every allocation above 1 GiB on stderr; binaries keep stderr for their own one-line errors.
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 50))
  return argv, env


def module_run(argv: list[str]) -> str:
  """The module of `python [options] -m MODULE ...`, or ''."""
  i = 1
  while i < len(argv) and argv[i].startswith("-"):
    if argv[i] == "-m":
      return argv[i + 1] if i + 1 < len(argv) else ""
    i += 2 if argv[i] in ("-X", "-W") else 1
  return ""


def maybe_reexec(script: bool = False) -> None:
  """Re-executes the process under tcmalloc when it runs one of `BINARIES` (or, with `script`, any script:
  the benchmarks); returns only where there is nothing to do."""
  argv = list(getattr(sys, "orig_argv", []))
  if not (script or module_run(argv) in BINARIES):
    return
  command = reexec_command(argv, dict(os.environ))
  if command is None:
    return
  argv, env = command
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError:
    return  # keep running under the default allocator
