"""Publishing a file written under a temporary name: readers never see half a file, and the file gets the
permissions the user's umask gives new files (`tempfile.mkstemp` makes them 0600, which would survive the
rename)."""

from __future__ import annotations

import os


def current_umask() -> int:
  mask = os.umask(0)  # the only way to read it; set back at once
  os.umask(mask)
  return mask


def publish(tmp: str, path: str) -> None:
  """Gives `tmp` the mode a new file would have (0666 & ~umask) and renames it to `path`."""
  os.chmod(tmp, 0o666 & ~current_umask())
  os.replace(tmp, path)
