"""Every field of every config can be set from the command line, through the real absl/config_flags parser."""

import importlib

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO

# Each config with the arguments its docstring documents.
CONFIGS = [
  ("fashion_mnist_tiny", None),
  ("mage_pretrain", "variant=B"),
  ("mage_pretrain", "variant=L,runlocal"),
  ("mage_c_imagenet", "variant=B"),
  ("mage_c_fashion_mnist", None),
  ("class_cond_fashion_mnist", "init=/x"),
  ("class_cond_imagenet", "variant=B,init=/x"),
  ("tokenizer_imagenet", None),
  ("tokenizer_fashion_mnist", None),
  ("eval_imagenet", "variant=B"),
  ("eval_fashion_mnist", "finetune"),
  ("finetune_imagenet", "variant=L"),
  ("cache_tokens", "views=10"),
  ("cache_tokens", "base=fashion_mnist_tiny,views=8"),
]


def _config_path(name):
  return str(REPO / "configs" / f"{name}.py")


def _leaves(config, prefix=""):
  for key in config.keys():
    value = config[key] if not isinstance(config, ml_collections.ConfigDict) else config.get_ref(key)
    value = value.get() if isinstance(value, ml_collections.FieldReference) else value
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield (
        f"{prefix}{key}",
        config.get_ref(key).get_type() if isinstance(config, ml_collections.ConfigDict) else type(value),
        value,
      )


def _new_value(field_type, value):
  """A different value of the field's type, as a command-line string, and the parsed value to expect."""
  if field_type is bool:
    return str(not value).lower(), not value
  if field_type is int:
    return str(value + 1), value + 1
  if field_type is float:
    return "0.125", 0.125
  if field_type is str:
    new = "data=2,fsdp=4,model=1" if value and "data=" in value else "/stand/in/path"
    return new, new
  if field_type is tuple:
    new = tuple(value) + tuple(value[-1:]) if value else ("x",)
    return repr(new), new
  raise AssertionError(f"field type {field_type} cannot be set from the command line")


@pytest.mark.parametrize("name,arg", CONFIGS, ids=[f"{n}:{a}" for n, a in CONFIGS])
def test_every_leaf_is_overridable(name, arg):
  module = importlib.import_module(f"configs.{name}")
  spec = _config_path(name) + (f":{arg}" if arg else "")
  leaves = list(_leaves(module.get_config(arg)))
  assert leaves
  for path, field_type, value in leaves:
    cli, want = _new_value(field_type, value)
    argv = ["prog", f"--config={spec}", f"--config.{path}={cli}"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    got = fv.config
    for key in path.split("."):
      got = got[key]
    assert got == want or (isinstance(want, tuple) and tuple(got) == want), (spec, path, cli, got)
