"""Publishing a file written under a temporary name: readers never see half a file, and the file gets the
permissions the user's umask gives new files (`tempfile.mkstemp` makes them 0600, which would survive the
rename)."""

from __future__ import annotations

import json
import os
from typing import Any


def current_umask() -> int:
  mask = os.umask(0)  # the only way to read it; set back at once
  os.umask(mask)
  return mask


def publish(tmp: str, path: str) -> None:
  """Gives `tmp` the mode a new file would have (0666 & ~umask) and renames it to `path`."""
  os.chmod(tmp, 0o666 & ~current_umask())
  os.replace(tmp, path)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file beside it: readers see the earlier file or the new one,
  whole."""
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path: str, value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
  """`write_bytes` of `value` as JSON; values JSON has no type for are written as their str()."""
  write_bytes(path, json.dumps(value, indent=indent, sort_keys=sort_keys, default=str).encode())


def record_config(config, workdir: str) -> None:
  """`<workdir>/config.json`: the config a job runs with, written by the primary process once the job has checked
  it (a refused run leaves the earlier run's record as it was)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
