"""Loaded at start-up by a Python whose path starts with this folder: the top-level packages named in
MAGE_JAX_BLOCK_IMPORTS (comma-separated) look uninstalled, as on a host without them: importing them raises
ModuleNotFoundError and `importlib.util.find_spec` returns None (libraries probe optional packages that way)."""

import os
from importlib.machinery import PathFinder

_BLOCKED = frozenset(n for n in os.environ.get("MAGE_JAX_BLOCK_IMPORTS", "").split(",") if n)
_find_spec = PathFinder.find_spec


def _find_unblocked_spec(cls, fullname, path=None, target=None):
  del cls
  if fullname.partition(".")[0] in _BLOCKED:
    return None
  return _find_spec(fullname, path, target)


if _BLOCKED:
  PathFinder.find_spec = classmethod(_find_unblocked_spec)
