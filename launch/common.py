"""What every launcher shares: the training command and the checks on its overrides."""

from __future__ import annotations

from collections.abc import Sequence


def check_overrides(overrides: Sequence[str]) -> list[str]:
  """Overrides are absl flags for mage_jax.main, e.g. `--config.lr=0.03`."""
  for o in overrides:
    if not o.startswith("--"):
      raise ValueError(
          f"override {o!r} is not a flag; write it as --config.<key>=<value> "
          "(after a `--` separator).")
    if "\n" in o or "\r" in o:
      raise ValueError(f"override {o!r} contains a newline; not supported.")
  return list(overrides)


def main_argv(config: str, workdir: str, overrides: Sequence[str], python: str = "python",
              workdir_hint: str = "a path every host can write") -> list[str]:
  """argv of the training command every host/task runs."""
  if not config:
    raise ValueError("--config is required (e.g. configs/mage_pretrain.py:variant=B).")
  if not workdir:
    raise ValueError(f"--workdir is required ({workdir_hint}).")
  return [python, "-m", "mage_jax.main", f"--config={config}",
          f"--workdir={workdir}", *check_overrides(overrides)]
