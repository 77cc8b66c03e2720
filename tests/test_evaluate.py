"""The evaluate binary end to end on Fashion-MNIST (tiny sizes), its configs and its results table."""

import json
import math
import os
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import eval_fashion_mnist, eval_imagenet, finetune_imagenet
from conftest import random_variables
from mage_jax import evals
from mage_jax.jobs import evaluate
from mage_jax.models.mage import MAGE, config_for
from mage_jax.models.vqgan import VQGAN, VQGANConfig
from mage_jax.objectives import masking
from mage_jax.train import builders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_variables(module, seed, *args):
  return random_variables(module, seed, *args, spread=0.1)


@pytest.fixture(scope="module")
def tiny_params_dir(tmp_path_factory):
  """Random tiny MAGE + tokenizer for 8x8 images (16 tokens), exported like a pretraining run."""
  tok = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, resolution=8, codebook_size=64))
  model = MAGE(config_for("tiny", num_tokens=16, max_position_embeddings=17, codebook_size=64))
  plan, _ = masking.sample_plan(jax.random.key(0), 1, 16)
  params = _random_variables(model, 2, jnp.zeros((1, 16), jnp.int32), plan)["params"]
  directory = str(tmp_path_factory.mktemp("tiny") / "params")
  builders.export_params(directory, model, params, tok, _random_variables(tok, 1, jnp.zeros((1, 8, 8, 3))))
  return directory


def _finite_acc(x):
  return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0


@pytest.mark.slow
def test_evaluate_binary_fashion_mnist_end_to_end(tiny_params_dir, fashion_data_dir, tmp_path):
  workdir = str(tmp_path / "eval")
  cmd = [
    sys.executable,
    "-m",
    "mage_jax.evaluate",
    f"--params={tiny_params_dir}",
    f"--workdir={workdir}",
    f"--config={ROOT}/configs/eval_fashion_mnist.py:train=1000,test=500,epochs=10,batch=64,finetune,ft_steps=3",
    f"--config.input.data_dir={fashion_data_dir}",
    f"--config.finetune.input.data_dir={fashion_data_dir}",
    "--config.fewshot.shots=(1,5)",
    "--config.fewshot.trials=2",
  ]
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "results.json")) as f:
    out = json.load(f)
  res = out["results"]
  assert sorted(res) == ["mage", "pixels"]
  for fs in ("mage", "pixels"):
    lp = res[fs]["linear_probe"]
    assert lp["completed"] and lp["epochs_done"] == 10 and len(lp["history"]) == 10
    assert _finite_acc(lp["top1"]) and _finite_acc(lp["top5"]) and lp["top5"] >= lp["top1"]
    for classifier in ("ridge", "logreg"):
      per_shot = res[fs]["fewshot"][classifier]
      assert sorted(k for k in per_shot if k != "seconds") == ["1", "5"]
      for v in (per_shot["1"], per_shot["5"]):
        assert _finite_acc(v["mean"]) and math.isfinite(v["std"])
  # Pixels are a real baseline: far above the 10% of chance (labels/features aligned end to end).
  assert res["pixels"]["linear_probe"]["top1"] > 0.4
  assert res["pixels"]["fewshot"]["ridge"]["5"]["mean"] > 0.3
  ft = res["mage"]["finetune"]
  assert ft["completed"] and ft["steps"] == 3 and _finite_acc(ft["top1"])
  assert "finetune" not in res["pixels"]
  # Artefacts: feature caches for both splits, the probe exported as a 'vit' checkpoint, the table.
  assert sorted(os.listdir(os.path.join(workdir, "features"))) == ["mage_test_500.npz", "mage_train_1000.npz"]
  assert os.path.exists(os.path.join(workdir, "linear_probe", "mage", "params", "mage_jax.json"))
  assert os.path.exists(os.path.join(workdir, "finetune", "params", "mage_jax.json"))
  assert "linear probe top-1" in proc.stdout and "pixels" in proc.stdout and "5-shot logreg" in proc.stdout


def test_format_table_side_by_side():
  results = {
    "mage": {
      "linear_probe": {"top1": 0.5, "top5": 0.9, "best_top1": 0.55, "completed": True, "epochs_done": 3},
      "fewshot": {"ridge": {"10": {"mean": 0.3, "std": 0.01}, "seconds": 1.0}, "trials": 5},
    },
    "pixels": {"linear_probe": {"top1": 0.25, "top5": 0.7, "best_top1": 0.25, "completed": False, "epochs_done": 1}},
  }
  lines = evaluate.format_table(results).splitlines()
  assert lines[0].split()[-2:] == ["mage", "pixels"]
  row = {line.split("  ")[0].strip(): line for line in lines[1:]}
  assert row["linear probe top-1"].split()[-6:] == ["50.00", "25.00", "(stopped", "at", "epoch", "1)"]
  assert "30.00 ± 1.00" in row["10-shot ridge"] and row["10-shot ridge"].rstrip().endswith("-")


def test_unknown_eval_is_an_error(tmp_path):
  c = eval_fashion_mnist.get_config()
  with c.unlocked():
    c.evals = ("linear_probe", "knn")
  with pytest.raises(ValueError, match="knn"):
    evaluate.run(c, str(tmp_path / "params"), str(tmp_path / "wd"))


@pytest.mark.slow  # ~40 s: the evaluate binary twice on 300 Fashion-MNIST images
def test_architecture_doc_evaluator_recipe_runs(tiny_params_dir, fashion_data_dir, tmp_path):
  """docs/architecture.md's "Adding an evaluator", as written: its module in a package of one's own, its
  command's evals; the table carries the new row and the result is the nearest class mean of the cached features."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  doc = open(os.path.join(ROOT, "docs", "architecture.md")).read()
  section = doc[doc.index("## Adding an evaluator") : doc.index("## Adding an evaluator during training")]
  (package := tmp_path / "my_evals").mkdir()
  (package / "__init__.py").write_text("")
  (package / "nearest_mean.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
  command = re.sub(r"\\\n\s*", " ", re.search(r"```bash\n(.*?)```", section, re.S).group(1))
  evals_flag = next(w for w in shlex.split(command) if w.startswith("--config.evals="))
  workdir = tmp_path / "eval"
  cmd = [
    sys.executable,
    "-m",
    "mage_jax.evaluate",
    f"--params={tiny_params_dir}",
    f"--workdir={workdir}",
    f"--config={ROOT}/configs/eval_fashion_mnist.py:train=200,test=100,batch=50",
    f"--config.input.data_dir={fashion_data_dir}",
    evals_flag,
  ]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(tmp_path)])}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((workdir / "results.json").read_text())["results"]
  assert sorted(results["mage"]) == ["logistic", "my_evals.nearest_mean"]
  with np.load(workdir / "features" / "mage_train_200.npz") as z:  # MAGE's features are the cached ones
    train_x, train_y = z["features"], z["labels"]
  with np.load(workdir / "features" / "mage_test_100.npz") as z:
    test_x, test_y = z["features"], z["labels"]
  means = np.stack([train_x[train_y == k].mean(0) for k in range(10)])
  guess = np.argmin(np.linalg.norm(test_x[:, None] - means[None], axis=-1), axis=1)
  assert results["mage"]["my_evals.nearest_mean"]["top1"] == pytest.approx(np.mean(guess == test_y))
  assert results["pixels"]["my_evals.nearest_mean"]["top1"] > 0.4  # Fashion-MNIST's class means: far above chance
  row = next(line for line in proc.stdout.splitlines() if line.startswith("nearest class mean top-1"))
  assert len(row.split()) == 4 + 2  # one value per feature set
  assert "logistic probe top-1" in proc.stdout


def test_evaluator_contract_is_checked(tmp_path, monkeypatch):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "__init__.py").write_text("")
  (tmp_path / "mine" / "half_done.py").write_text("FEATURES = True\ndef run(context, features):\n  return {}\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ValueError, match="mine.half_done is not an evaluator .it lacks rows"):
    evals.load("mine.half_done")
  with pytest.raises(
    ValueError,
    match="unknown evaluator 'knn'.*fewshot, fid, finetune, linear_probe, logistic, precision_recall, sample_grid, sfid"
    ".*or a dotted module path",
  ):
    evals.load("knn")
  with pytest.raises(ValueError, match="cannot be imported"):
    evals.load("no_such_package.evaluator")
  c = eval_fashion_mnist.get_config()
  with c.unlocked():
    c.evals = ("fewshot", "fewshot")
  with pytest.raises(ValueError, match="once each"):
    evaluate.evaluators(c)


@pytest.mark.parametrize("variant,blr", [("B", 0.1), ("L", 0.05)])
def test_imagenet_linear_probe_config_is_the_paper_recipe(variant, blr):
  c = eval_imagenet.get_config(f"variant={variant}")
  lp = c.linear_probe
  assert (lp.blr, lp.epochs, lp.warmup_epochs, lp.batch_size) == (blr, 90, 10.0, 4096)
  assert (lp.weight_decay, lp.momentum, lp.head_init_std, lp.bn_group_size) == (0.0, 0.9, 0.01, 128)
  assert lp.augment == "probe" and lp.dropout and c.global_pool
  assert (c.input.crop_ratio, c.input.scale) == (256 / 292, (0.2, 1.0))
  assert lp.blr * lp.batch_size / 256 == pytest.approx({"B": 1.6, "L": 0.8}[variant])
  with pytest.raises(ValueError, match="variant"):
    eval_imagenet.get_config("variant=H")


@pytest.mark.parametrize("variant,epochs,ld,dp", [("B", 100, 0.65, 0.1), ("L", 50, 0.75, 0.2)])
def test_imagenet_finetune_config_is_the_paper_recipe(variant, epochs, ld, dp):
  ft = finetune_imagenet.get_config(f"variant={variant}").finetune
  assert (ft.total_epochs, ft.optim.layer_decay, ft.drop_path) == (epochs, ld, dp)
  assert (ft.input.batch_size, ft.optim.blr, ft.optim.warmup_epochs, ft.optim.min_lr) == (1024, 2.5e-4, 5.0, 1e-6)
  assert (ft.optim.weight_decay, ft.optim.b1, ft.optim.b2, ft.head_init_std) == (0.05, 0.9, 0.999, 2e-5)
  m = ft.mixup
  assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, m.label_smoothing) == (0.8, 1.0, 1.0, 0.5, 0.1)
  assert (ft.input.rand_augment, ft.input.scale, ft.input.interpolation) == (
    "rand-m9-mstd0.5-inc1",
    (0.2, 1.0),
    "bicubic",
  )


def test_controls_share_one_tokenizer_pass_and_match_standalone_features(tiny_params_dir, fashion_data_dir, tmp_path):
  """MAGE's features sliced from the joint (MAGE | random init) pass equal MAGE's own pass; the random-init
  encoder is not MAGE's; the random projection is pixels @ R / sqrt(P) with the documented seed."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mage_jax.evals import probe  # pylint: disable=g-import-not-at-top
  from mage_jax.train import sharding

  config = eval_fashion_mnist.get_config("train=64,test=64,batch=64")
  config.input.data_dir = fashion_data_dir
  config.input.image_size = 8
  config.baseline_random = True
  mesh, rules = sharding.mesh_from_config(config)
  sets, backbone = evaluate.feature_sets(config, tiny_params_dir, mesh, rules)
  by_name = {fs.name: fs for fs in sets}
  assert sorted(by_name) == ["mage", "pixels", "random_init", "random_proj"]
  split = "test[:64]"
  mage, labels = by_name["mage"].features(split, config, 8, mesh, str(tmp_path))
  alone, alone_labels = probe.extract_features(
    backbone.feature_fn(),
    by_name["mage"].variables,
    by_name["mage"].shardings,
    evals.input_config(config, split, 64, 8),
    mesh=mesh,
  )
  np.testing.assert_allclose(mage, alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, alone_labels)
  random_init, _ = by_name["random_init"].features(split, config, 8, mesh, str(tmp_path))
  assert random_init.shape == mage.shape and np.abs(random_init - mage).max() > 1e-3
  pixels, _ = by_name["pixels"].features(split, config, 8, mesh, str(tmp_path))
  projected, _ = by_name["random_proj"].features(split, config, 8, mesh, str(tmp_path))
  rgb, _ = probe.extract_features(probe.pixel_feature_fn, {}, {}, evals.input_config(config, split, 64, 8), mesh=mesh)
  assert pixels.shape[1] == 8 * 8  # Fashion-MNIST is grayscale: one of the three repeated channels, nothing lost
  np.testing.assert_array_equal(rgb.reshape(64, 64, 3), np.repeat(pixels[..., None], 3, axis=-1))
  r = np.random.default_rng(evaluate.CONTROL_SEED).standard_normal((pixels.shape[1], mage.shape[1]))
  np.testing.assert_allclose(projected, pixels @ (r / np.sqrt(pixels.shape[1])), rtol=1e-4, atol=1e-4)
