"""What `--force` may remove from an output folder: the files an earlier run listed before writing them.

`generate` and `edit` write into a folder the user names. Before writing its first file a run records every
file it will write in `OUT/mage_jax_outputs.json`; a later run with `--force` removes exactly those (and the
folders they leave empty), and refuses an OUT holding anything else: a file or folder of the user's, even one
named like an output, or a link. An interrupted run's record lists what it meant to write, so `--force` cleans
up after it as well.
"""

from __future__ import annotations

import json
import os

from mage_jax.system import atomic, runtime

RECORD = "mage_jax_outputs.json"
_RECORD_MAX_BYTES = 1 << 28  # a million PNG names; a larger claim is not a record this code wrote


def _recorded(out: str) -> set[str]:
  path = os.path.join(out, RECORD)
  if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > _RECORD_MAX_BYTES:
    return set()
  try:
    with open(path) as f:
      files = json.load(f)["files"]
    return {name for name in files if isinstance(name, str)}
  except (OSError, ValueError, KeyError, TypeError):
    return set()


def _tree(out: str) -> tuple[list[str], list[str], list[str]]:
  """(files, folders, links) under OUT, relative; links are listed, never followed."""
  files, folders, links = [], [], []
  for root, dirs, names in os.walk(out):
    for name in sorted(dirs) + sorted(names):
      rel = os.path.relpath(os.path.join(root, name), out)
      if os.path.islink(os.path.join(root, name)):
        links.append(rel)
      else:
        (folders if name in dirs else files).append(rel)
    dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
  return files, folders, links


def _ancestors(rel: str) -> list[str]:
  folders = []
  while rel := os.path.dirname(rel):
    folders.append(rel)
  return folders


def prepare(out: str, force: bool, binary: str) -> None:
  """Refuses an OUT that is a file or holds anything an earlier run did not record; with `force`, removes what
  that run recorded. Raises runtime.UsageError naming `--out` and the first foreign entries."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise runtime.UsageError(f"--out={out} is a file, not a directory")
  if not os.path.isdir(out):
    return
  files, folders, links = _tree(out)
  recorded = _recorded(out)
  parents = {folder for f in recorded for folder in _ancestors(f)}
  foreign = links + [f for f in files if f not in recorded and f != RECORD] + [d for d in folders if d not in parents]
  if foreign:
    raise runtime.UsageError(
      f"--out={out} holds files {binary} did not write ({', '.join(foreign[:3])}); choose a new or empty directory"
    )
  if files and not force:
    raise runtime.UsageError(f"--out={out} holds the outputs of an earlier {binary}; pass --force to replace them")
  for rel in files:
    os.remove(os.path.join(out, rel))
  for rel in sorted(folders, key=lambda f: -f.count(os.sep)):
    if not os.listdir(os.path.join(out, rel)):
      os.rmdir(os.path.join(out, rel))


def write_record(out: str, files: list[str]) -> None:
  """Lists `files` (relative to OUT) as this run's outputs; call before writing the first of them."""
  os.makedirs(out, exist_ok=True)
  atomic.write_json(os.path.join(out, RECORD), {"files": files}, indent=None)
