"""The evaluators a training config lists (`config.evals`, mage_jax/evals/__init__.py): the loop runs each on its own
cadence and at the end, a module of the user's runs by its dotted path, bad entries are refused before the first
step, and the sample evaluators score exactly the samples the trained params generate (FID, sFID, precision and
recall recomputed here in float64 from their definitions)."""

import json
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from test_fid import _independent_fid, _precision_recall_float64, _real_weights_path

from conftest import REPO, assert_one_line_error, run_cli, tiny_train_config
from mage_jax import api
from mage_jax.data import images as image_io
from mage_jax.fid import inputs as fid_inputs, weights
from mage_jax.jobs import pretrain

TOY = """
import json, os

def during_training(settings, job):
  def run(state, step):
    with open(os.path.join(job.workdir, "toy_steps.jsonl"), "a") as f:
      f.write(json.dumps([int(step), int(state.step)]) + "\\n")
    return {"scale_times_step": settings.scale * step}
  return run
"""


def _package_of_ones_own(root, monkeypatch, **modules):
  """`my_evals` with `modules` (name -> source) importable from `root`, in place of any earlier test's."""
  (root / "my_evals").mkdir()
  (root / "my_evals" / "__init__.py").write_text("")
  for name, source in modules.items():
    (root / "my_evals" / f"{name}.py").write_text(source)
  for name in [m for m in sys.modules if m.partition(".")[0] == "my_evals"]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.syspath_prepend(str(root))


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
  _package_of_ones_own(tmp_path, monkeypatch, toy=textwrap.dedent(TOY))
  return "my_evals.toy"


def test_evaluators_run_on_their_cadence_and_at_the_end(image_folder, tmp_path, toy_module):
  config = tiny_train_config(image_folder, steps=6)
  config.evals.every4 = dict(type=toy_module, every_steps=4, scale=2.0)
  config.evals.final = dict(type=toy_module, every_steps=0, scale=10.0)
  workdir = tmp_path / "w"
  metrics = pretrain.train_and_evaluate(config, str(workdir))
  with open(workdir / "toy_steps.jsonl") as f:
    calls = [json.loads(line) for line in f]
  # (the step it is called at, the state's own step): every4 at 4, then both at the end (6), in listed order.
  assert calls == [[4, 4], [6, 6], [6, 6]]
  assert metrics["eval/every4/scale_times_step"] == 12.0 and metrics["eval/final/scale_times_step"] == 60.0


def test_bad_entries_are_refused_before_the_first_step(image_folder, tmp_path, toy_module):
  for entry, want in (
    (dict(type="nope"), "config.evals.x.type: unknown evaluator 'nope'"),
    (dict(type="logistic"), "unknown evaluator 'logistic'"),
    (dict(type="mage_jax.evals.logistic"), "lacks during_training"),
    (dict(type="fewshot", test_split="train"), "missing required keys ['train_split']"),
    (dict(type="fid", reference="", num_images=8), "config.evals.x: set reference"),
    (dict(type="sample_grid", temperature=float("nan")), "temperature must be a finite number"),
    (dict(type="sample_grid", batch_size=3), "batch_size must be a positive multiple"),
    (dict(type="sample_grid", num_steps=0), "num_images, num_steps and cols must be >= 1"),
    (dict(type="sample_grid", colour=1), "unknown entry keys ['colour']"),
    (dict(type="reconstruction", split="train", batch_size=8), "scores the tokenizer a tokenizer job trains"),
  ):
    config = tiny_train_config(image_folder, steps=2)
    config.evals.x = entry
    with pytest.raises(ValueError, match=None) as e:
      pretrain.build_task(config, str(tmp_path / "w"))
    assert want in str(e.value), (entry, str(e.value))
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_main_refuses_a_malformed_entry_in_one_line(tmp_path):
  workdir = tmp_path / "w"
  for override, want in (
    ("--config.evals.fewshot.every_steps=-1", "config.evals.fewshot.every_steps=-1"),
    ("--config.evals.samples.type=", "config.evals.samples: must be dict(type="),
  ):
    run = run_cli("mage_jax.main", f"--config={REPO}/configs/fashion_mnist_tiny.py", f"--workdir={workdir}", override)
    assert_one_line_error(run, 2, want)
    assert not workdir.exists()


def _frechet64(a, b):
  """The Frechet distance of two feature sets, by test_fid's float64 eigh-only formula."""
  (mu1, s1), (mu2, s2) = (
    (x.mean(0), np.cov(x, rowvar=False)) for x in (np.asarray(a, np.float64), np.asarray(b, np.float64))
  )
  return _independent_fid(mu1, s1, mu2, s2)


def _pool_and_spatial(inception, images):
  outs = [jax.device_get(inception(images[i : i + 8], spatial=True)) for i in range(0, len(images), 8)]
  return np.concatenate([o[0] for o in outs]), np.concatenate([o[2] for o in outs])


GENERATION = dict(num_images=16, batch_size=8, num_steps=4, temperature=2.0, seed=3)


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
  _real_weights_path()  # skips (or, with MAGE_JAX_REQUIRE_FID=1, fails) without the FID weights
  folder = tmp_path_factory.mktemp("reference")
  for i, path in enumerate(sorted(image_folder.rglob("*.png"))[::6][:16]):
    Image.open(path).save(folder / f"{i:02d}.png")
  return folder


def _assert_scores_of(params_dir, grid_png, reference, scores):
  """`scores` ({fid, sfid, precision, recall}) and the grid are those of the samples `params_dir` generates with
  GENERATION, recomputed here: the library's generation, the FID Inception called directly, float64 formulas."""
  samples = api.MAGE.load(str(params_dir), batch_size=8).generate(16, steps=4, temperature=2.0, seed=3)
  np.testing.assert_array_equal(np.asarray(Image.open(grid_png)), image_io.make_grid(samples, cols=4, pad=2))
  inception = weights.load_inception()
  ref_images = np.concatenate(list(fid_inputs.image_batches(str(reference))[1]))
  (gen_pool, gen_spatial), (ref_pool, ref_spatial) = (_pool_and_spatial(inception, x) for x in (samples, ref_images))
  assert scores["fid"] == pytest.approx(_frechet64(gen_pool, ref_pool), rel=1e-4)
  assert scores["sfid"] == pytest.approx(_frechet64(gen_spatial, ref_spatial), rel=1e-4)
  assert (scores["precision"], scores["recall"]) == _precision_recall_float64(ref_pool, gen_pool)
  assert scores["fid"] > 0 and scores["sfid"] > 0


@pytest.fixture(scope="module")
def trained(image_folder, reference, tmp_path_factory):
  """A 2-step run with every sample evaluator: (workdir, its metrics)."""
  config = tiny_train_config(image_folder, steps=2)
  config.evals = ml_collections.ConfigDict()
  config.evals.grid = dict(type="sample_grid", cols=4, **GENERATION)
  for name in ("fid", "sfid", "precision_recall"):  # Inception batches of 8: one compilation serves them and the tests
    config.evals[name] = dict(type=name, reference=str(reference), inception_batch=8, **GENERATION)
  workdir = tmp_path_factory.mktemp("trained") / "w"
  m = pretrain.train_and_evaluate(config, str(workdir))
  scores = {k: m[f"eval/{k}/{k}"] for k in ("fid", "sfid")}
  scores.update({k: m[f"eval/precision_recall/{k}"] for k in ("precision", "recall")})
  return workdir, scores


def test_sample_evaluators_score_the_samples_the_trained_params_generate(trained, reference):
  workdir, scores = trained
  _assert_scores_of(workdir / "params", workdir / "samples" / "step_0000002.png", reference, scores)


def test_sample_evaluators_on_a_checkpoint_run_the_same_functions(trained, reference, tmp_path):
  """`python -m mage_jax.evaluate` with the sample evaluators: settings from `config.samples`, one generation for
  all of them, the training run's scores and grid from its export; the table prints what they return."""
  from configs import eval_fashion_mnist  # pylint: disable=g-import-not-at-top
  from mage_jax.jobs import evaluate  # pylint: disable=g-import-not-at-top

  trained_dir, trained_scores = trained
  config = eval_fashion_mnist.get_config()
  config.evals = ("fid", "sfid", "precision_recall", "sample_grid")
  config.samples.update(dict(reference=str(reference), inception_batch=8, cols=4, **GENERATION))
  workdir = tmp_path / "eval"
  out = evaluate.run(config, str(trained_dir / "params"), str(workdir))
  r = out["results"]["mage"]
  assert {"fid": r["fid"]["fid"], "sfid": r["sfid"]["sfid"], **r["precision_recall"]} == pytest.approx(trained_scores)
  grid = workdir / "samples" / "step_0000002.png"  # named after the step the checkpoint was trained to
  assert r["sample_grid"]["png"] == str(grid)
  np.testing.assert_array_equal(
    np.asarray(Image.open(grid)), np.asarray(Image.open(trained_dir / "samples" / "step_0000002.png"))
  )
  table = evaluate.format_table(out["results"])
  for row in ("FID", "sFID", "precision of the samples", "recall of the samples", "sample grid"):
    assert any(line.startswith(row) for line in table.splitlines()), (row, table)
  config.samples.reference = ""
  with pytest.raises(ValueError, match="config.samples: set reference"):
    evaluate.run(config, str(trained_dir / "params"), str(tmp_path / "eval2"))


def test_architecture_doc_training_evaluator_recipe_runs(image_folder, tmp_path, monkeypatch):
  """docs/architecture.md's "Adding an evaluator during training", as written: its module in a package of one's
  own and its config line; the loop reports the norm of the params it trained."""
  import re  # pylint: disable=g-import-not-at-top

  doc = (REPO / "docs" / "architecture.md").read_text()
  section = doc[doc.index("## Adding an evaluator during training") : doc.index("## What a run leaves on disk")]
  module, config_line = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
  _package_of_ones_own(tmp_path, monkeypatch, params_norm=module)
  c = tiny_train_config(image_folder, steps=4)
  exec(config_line, {"c": c})  # pylint: disable=exec-used
  metrics = pretrain.train_and_evaluate(c, str(tmp_path / "w"))
  params = jax.tree.leaves(api.params_io.load(str(tmp_path / "w" / "params"))[0]["model"]["params"])
  want = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in params))
  assert metrics["eval/norm/params_norm"] == pytest.approx(want, rel=1e-5)
