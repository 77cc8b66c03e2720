"""bench/quickstart_sweep.py: rows reuse the stages they share with a finished row, and count their time."""

import json

from bench import quickstart_sweep as sweep
from mage_jax.data import cached_tokens


def _finished_row(root, name, seconds, cache_format=cached_tokens.FORMAT_VERSION):
  d = root / name
  (d / "tokenizer" / "params").mkdir(parents=True)
  (d / "tokenizer" / "params" / "w").write_text("tok")
  (d / "tokens").mkdir()
  (d / "tokens" / "cache.json").write_text(json.dumps({"format_version": cache_format}))
  (d / "data.json").write_text("{}")
  (d / "mage").mkdir()
  stages = {s: f"hash-{s}" for s in ("data", "tokenizer", "cache", "mage", "samples", "representations", "fid")}
  (d / "stages.json").write_text(json.dumps(stages))
  results = {
    "stage_seconds": seconds,
    "representations": {
      "mage": {
        "logistic": {"top1": 0.8},
        "fewshot": {
          "logreg": {"10": {"mean": 0.6}, "5": {"mean": 0.5}, "1": {"mean": 0.3}},
          "ridge": {"10": {"mean": 0.4}},
        },
      }
    },
    "fid": {"fid": 40.0},
    "tokenizer": {"psnr": 22.0},
    "mage": {"loss": 5.0, "steps": 100, "seconds": 50.0},
  }
  (d / "results.json").write_text(json.dumps(results))


def test_rows_link_the_stages_they_share(tmp_path, monkeypatch):
  monkeypatch.setattr(
    sweep,
    "ROWS",
    {
      "base": {},
      "wide": {"mage_recipe": "width=96"},
      "k2": {"views": 2},
      "tok": {"tokenizer_steps": 10},
      "crop": {"mage_recipe": "crop_min=0.8"},
      "disc": {"tokenizer_recipe": "disc"},
    },
  )
  seconds = {
    "data": 6.0,
    "tokenizer": 300.0,
    "cache": 120.0,
    "mage": 400.0,
    "samples": 30.0,
    "representations": 90.0,
    "fid": 54.0,
  }
  _finished_row(tmp_path, "base", seconds)

  assert sweep.seed_from_earlier(str(tmp_path), "wide") == "base"
  wide = tmp_path / "wide"
  assert (wide / "tokenizer" / "params" / "w").read_text() == "tok" and (wide / "tokens" / "cache.json").exists()
  assert (wide / "tokens" / "cache.json").stat().st_ino == (tmp_path / "base" / "tokens" / "cache.json").stat().st_ino
  assert set(json.loads((wide / "stages.json").read_text())) == {"data", "tokenizer", "cache"}
  assert not (wide / "mage").exists()

  assert sweep.seed_from_earlier(str(tmp_path), "k2") == "base"  # other views: the cache is its own
  assert set(json.loads((tmp_path / "k2" / "stages.json").read_text())) == {"data", "tokenizer"}
  assert not (tmp_path / "k2" / "tokens").exists()
  assert sweep.seed_from_earlier(str(tmp_path), "tok") == "base"  # other tokenizer: only the data is shared
  assert set(json.loads((tmp_path / "tok" / "stages.json").read_text())) == {"data"}
  assert sweep.seed_from_earlier(str(tmp_path), "crop") == "base"  # another crop law: other cached views
  assert set(json.loads((tmp_path / "crop" / "stages.json").read_text())) == {"data", "tokenizer"}
  assert sweep.seed_from_earlier(str(tmp_path), "disc") == "base"  # another tokenizer recipe: the data only
  assert set(json.loads((tmp_path / "disc" / "stages.json").read_text())) == {"data"}
  assert sweep.seed_from_earlier(str(tmp_path), "wide") is None  # started rows resume by themselves

  _finished_row(tmp_path, "old", seconds, cache_format=cached_tokens.FORMAT_VERSION - 1)
  (tmp_path / "base" / "results.json").unlink()
  monkeypatch.setitem(sweep.ROWS, "old", {})
  monkeypatch.setitem(sweep.ROWS, "same", {})
  assert sweep.seed_from_earlier(str(tmp_path), "same") == "old"  # a cache of an older view law: not linked
  assert set(json.loads((tmp_path / "same" / "stages.json").read_text())) == {"data", "tokenizer"}
  (tmp_path / "base" / "results.json").write_text((tmp_path / "old" / "results.json").read_text())

  # a finished linked row counts the linked stages' seconds: the time of a fresh run with its settings
  own = {"mage": 200.0, "samples": 30.0, "representations": 60.0, "fid": 50.0}
  (wide / "results.json").write_text(
    json.dumps({**json.loads((tmp_path / "base" / "results.json").read_text()), "stage_seconds": own})
  )
  row = sweep.row_result(str(tmp_path), "wide")
  assert row["minutes"] == (6 + 300 + 120 + 200 + 30 + 60 + 50) / 60
  assert row["logistic"] == 0.8 and row["10_shot"] == 0.6 and row["fid"] == 40.0
  assert "| wide | mage_recipe=width=96 |" in sweep.table(str(tmp_path))


def test_rows_the_docs_name_exist():
  import re  # pylint: disable=g-import-not-at-top

  from conftest import REPO  # pylint: disable=g-import-not-at-top

  doc = (REPO / "docs" / "quickstart_recipe.md").read_text()
  named = re.findall(r"quickstart_sweep\.py [^\n]*--rows=([\w,]+)", doc)
  assert named and all(row in sweep.ROWS for rows in named for row in rows.split(",")), named


def test_every_row_is_a_quickstart_command(tmp_path):
  for name in sweep.ROWS:
    cmd = sweep.command(str(tmp_path), name)
    assert cmd[1:4] == ["-m", "mage_jax.quickstart", "--budget=sweep"]
    assert f"--workdir={tmp_path / name}" in cmd
