"""Careless and hostile command lines for the training and evaluation binaries: one line naming the problem,
exit status 2 (usage) or 1 (runtime), no traceback, nothing outside the output touched."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, random_variables, run_cli
from mage_jax.models.mage import MAGE, config_for
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.objectives import masking
from mage_jax.train import builders, params_io

TINY = f"{REPO}/configs/fashion_mnist_tiny.py:steps=4,batch=8,monitor=False"


def _main(workdir, image_folder, *extra):
  return run_cli(
    "mage_jax.main",
    f"--config={TINY}",
    f"--workdir={workdir}",
    f"--config.input.name=folder:{image_folder}",
    "--config.input.image_size=16",
    *extra,
  )


@pytest.fixture(scope="module")
def params_dirs(tmp_path_factory):
  """Two different tiny MAGE exports for 8x8 images, a NaN one and a tokenizer-only one."""
  tok = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, resolution=8, codebook_size=64))
  tok_vars = random_variables(tok, 1, jnp.zeros((1, 8, 8, 3)))
  model = MAGE(config_for("tiny", num_tokens=16, max_position_embeddings=17, codebook_size=64))
  plan, _ = masking.sample_plan(jax.random.key(0), 1, 16)
  root = tmp_path_factory.mktemp("params")
  dirs = {}
  for name, seed in (("a", 2), ("b", 3), ("nan", 4)):
    params = random_variables(model, seed, jnp.zeros((1, 16), jnp.int32), plan)["params"]
    if name == "nan":
      params["blocks_0"]["attn"]["qkv"]["kernel"] = np.full_like(params["blocks_0"]["attn"]["qkv"]["kernel"], np.nan)
    dirs[name] = str(root / name)
    builders.export_params(dirs[name], model, params, tok, tok_vars)
  dirs["tokenizer"] = str(root / "tokenizer")
  params_io.save(
    dirs["tokenizer"],
    {"tokenizer": tok_vars},
    {
      "kind": "tokenizer",
      "tokenizer": {
        "ch": 32,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "z_channels": 8,
        "resolution": 8,
        "codebook_size": 64,
      },
    },
  )
  return dirs


def test_main_refuses_bad_command_lines_before_any_work(image_folder, tmp_path):
  (tmp_path / "a_file").write_text("keep me")
  cases = [
    (["--config.optim.blrr=0.1"], 2, "blrr"),
    (["--config.input.batch_size=0"], 2, "config.input.batch_size=0: must be a whole number >= 1"),
    (["--config.input.batch_size=12"], 1, "not divisible"),
    (["--config.total_steps=-5"], 2, "config.total_steps=-5: must be"),
    (["--config.mesh=data=3,fsdp=1"], 1, "mesh"),
    (["--config.sharding_rules=embed=nowhere"], 1, "nowhere"),
    (["--config.model.heads=3"], 2, "heads"),
    (["--config.input.image_size=33"], 1, "not a multiple"),
  ]
  for extra, status, needle in cases:
    assert_one_line_error(_main(tmp_path / "w", image_folder, *extra), status, needle)
  assert_one_line_error(_main(tmp_path / "a_file", image_folder), 2, "is a file")
  assert (tmp_path / "a_file").read_text() == "keep me"
  assert_one_line_error(
    run_cli("mage_jax.main", f"--config={REPO}/configs/nope.py", f"--workdir={tmp_path / 'w'}"), 2, "nope.py"
  )
  assert_one_line_error(
    run_cli("mage_jax.main", f"--config={REPO}/configs/eval_fashion_mnist.py", f"--workdir={tmp_path / 'w'}"),
    2,
    "evaluation config",
    "mage_jax.evaluate",
  )
  # A config argument ml_collections reports with its traceback as text: one line, the error's own words.
  for arg, needle in (
    ("steps=x", "config argument steps='x': expected int"),
    ("steps", "config argument 'steps' needs a value (steps=...)"),
  ):
    assert_one_line_error(
      run_cli("mage_jax.main", f"--config={REPO}/configs/fashion_mnist_tiny.py:{arg}", f"--workdir={tmp_path / 'w'}"),
      2,
      needle,
    )
  assert not (tmp_path / "w").exists()


def test_main_model_init_must_hold_a_mage_model(image_folder, tmp_path, params_dirs):
  assert_one_line_error(
    _main(tmp_path / "w", image_folder, f"--config.model_init={params_dirs['tokenizer']}"), 1, "holds no MAGE model"
  )


def test_config_json_records_the_run_and_survives_a_refused_one(image_folder, tmp_path):
  workdir = tmp_path / "w"
  first = _main(workdir, image_folder)
  assert first.returncode == 0, first.stderr[-3000:]
  record = (workdir / "config.json").read_text()
  assert json.loads(record)["total_steps"] == 4
  # Refused by the job (the batch does not split over the devices) after the range checks passed.
  assert_one_line_error(
    _main(workdir, image_folder, "--config.total_steps=8", "--config.mesh=data=3,fsdp=1"), 1, "mesh"
  )
  assert (workdir / "config.json").read_text() == record


def _evaluate(params, workdir, image_folder, *extra):
  return run_cli(
    "mage_jax.evaluate",
    f"--params={params}",
    f"--workdir={workdir}",
    f"--config={REPO}/configs/eval_fashion_mnist.py:epochs=1,batch=16",
    f"--config.input.name=folder:{image_folder}",
    "--config.num_classes=2",
    "--config.baseline_pixels=false",
    "--config.evals=('linear_probe',)",
    *extra,
  )


def test_evaluate_refuses_stale_workdirs_bad_params_and_infeasible_shots(image_folder, tmp_path, params_dirs):
  workdir = tmp_path / "eval"
  first = _evaluate(params_dirs["a"], workdir, image_folder)
  assert first.returncode == 0, first.stderr[-3000:]
  # Another model into the same workdir: its probe checkpoints are not resumed as if they were this model's.
  assert_one_line_error(_evaluate(params_dirs["b"], workdir, image_folder), 1, "linear_probe/mage", "different model")
  # Another data slice for the same model: refused as well.
  assert_one_line_error(
    _evaluate(params_dirs["a"], workdir, image_folder, "--config.eval_split=test[:10]"), 1, "different", "eval_split"
  )
  # Infeasible shots are refused before any feature is computed; earlier results are kept.
  fresh = tmp_path / "fresh"
  assert_one_line_error(
    _evaluate(params_dirs["a"], fresh, image_folder, "--config.evals=('fewshot',)", "--config.fewshot.shots=(60,)"),
    1,
    "60 shots of 2 classes need at least 120",
  )
  assert not (fresh / "features").exists()
  assert (workdir / "results.json").exists()
  assert_one_line_error(_evaluate(params_dirs["nan"], tmp_path / "n", image_folder), 1, "NaN")
  assert_one_line_error(_evaluate(params_dirs["tokenizer"], tmp_path / "t", image_folder), 1, "tokenizer")


@pytest.mark.parametrize("binary", ["main", "evaluate", "generate", "quickstart"])
def test_help_exits_zero_and_lists_every_flag_with_a_default(binary):
  run = run_cli(f"mage_jax.{binary}", "--help")
  assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
  assert "--[no]verbose" in run.stdout and "(default:" in run.stdout
