"""Your own images: folder splits (hashed slices), the quickstart's dataset-level checks, and the quickstart end to
end on a folder of Fashion-MNIST PNGs."""

import hashlib
import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_cli
from mage_jax.data import sources
from mage_jax.jobs import quickstart_data


def _folder(root, classes, size=(6, 5)):
  """{class: n} tiny RGB PNGs under root/class/ (class '' : directly in root)."""
  rng = np.random.default_rng(0)
  for cls, n in classes.items():
    (root / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(root / cls / f"im{i:03d}.png")
  return root


def test_split_grammar_and_malformed_splits():
  parse = sources.parse_folder_split
  assert parse("train") == sources.FolderSplit("train")
  assert parse("train[:-100]").bounds(1000) == (0, 900) and parse("[-100:]").bounds(1000) == (900, 1000)
  assert parse("val[10%:90%]").bounds(95) == (10, 86)  # 9.5 and 85.5 round away from zero
  assert parse("x[-5%:]").bounds(95) == (90, 95) and parse("[:5000]").bounds(10) == (0, 10)
  for bad in ("train[a:b]", "train[1:2:3]", "train[5]", "train[", "a]b", "train[:-1.5]"):
    with pytest.raises(ValueError, match=rf"folder split '{re.escape(bad)}'.*malformed"):
      parse(bad)
  with pytest.raises(ValueError, match=r"folder split 'train\[200%:\]': 200% is not a percentage"):
    parse("train[200%:]")


def test_hashed_slices_partition_the_folder_independently_of_order(tmp_path):
  root = _folder(tmp_path / "ds", {"a": 20, "b": 20, "c": 20})
  train, held = sources.FolderSource(str(root), "[:-12]"), sources.FolderSource(str(root), "[-12:]")
  assert (train.num_examples, held.num_examples) == (48, 12)
  assert set(train.paths).isdisjoint(held.paths) and len(set(train.paths) | set(held.paths)) == 60
  # Reference: the 12 relative paths with the largest SHA-256, computed here without the source's helpers.
  names = sorted(f"{c}/im{i:03d}.png" for c in "abc" for i in range(20))
  expected = sorted(sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[-12:])
  assert sorted(held.name(i) for i in range(12)) == expected
  assert len(set(held.labels.tolist())) > 1  # spread over the classes, not the last class folder
  np.testing.assert_array_equal(held.labels, [("abc").index(n[0]) for n in sorted(expected)])
  assert held.class_counts == {c: sum(n[0] == c for n in expected) for c in "abc"}
  assert sources.FolderSource(str(root), "[:50%]").num_examples == 30
  images, labels = sources.load_arrays(f"folder:{root}", "[-12:]", image_size=4)
  assert images.shape == (12, 4, 4, 3) and labels.tolist() == held.labels.tolist()
  with pytest.raises(ValueError, match=r"folder split '\[5:5\]' selects no image of the 60"):
    sources.FolderSource(str(root), "[5:5]")


def test_make_dataset_finds_the_splits(tmp_path):
  make = lambda path, holdout=-1, min_train=4: quickstart_data.make_dataset(
    f"folder:{path}", None, holdout=holdout, image_size=16, min_train=min_train
  )
  flat = _folder(tmp_path / "flat", {"": 50})
  d = make(flat)
  assert (d.train_split, d.heldout_split) == ("[:-5]", "[-5:]") and d.name == f"folder:{flat}"
  assert make(flat, holdout=10).heldout_split == "[-10:]"
  with pytest.raises(
    ValueError,
    match=r"has 50 images: holding out 5 leaves 45 for training, fewer than the "
    r"training batch of 64; the quickstart needs at least 69 images",
  ):
    make(flat, min_train=64)
  with pytest.raises(ValueError, match="held-out split needs at least 2 images"):
    make(flat, holdout=1)
  split = _folder(tmp_path / "split", {"train/x": 6, "train/y": 6, "val/x": 2, "val/y": 2})
  assert (make(split).train_split, make(split).heldout_split) == ("train", "val")
  with pytest.raises(ValueError, match="has train/ and val/ subfolders"):
    make(split, holdout=3)
  only_train = _folder(tmp_path / "only_train", {"train/x": 30})
  assert make(only_train).train_split == "train[:-3]"
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No image files"):
    make(tmp_path / "empty")
  with pytest.raises(ValueError, match="expected fashion_mnist or folder:DIR"):
    quickstart_data.make_dataset("imagenet", None, holdout=-1, image_size=16, min_train=4)
  # Same files, same fingerprint; a changed file changes it (the stages are redone).
  assert make(flat).fingerprint == d.fingerprint
  Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(flat / "im000.png")
  assert make(flat).fingerprint != d.fingerprint


def test_summary_counts_bad_files_and_plans_the_probes(tmp_path):
  root = tmp_path / "mixed"
  _folder(root, {"cat": 6, "dog": 6}, size=(12, 9))
  Image.fromarray(np.full((20, 30), 7, np.uint8), "L").save(root / "cat" / "gray.png")
  Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(root / "cat" / "rgba.png")
  Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(root / "dog" / "sixteen.png")
  Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P").save(root / "dog" / "palette.png")
  (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
  (root / "dog" / "notes.txt").write_text("not an image")
  dataset = quickstart_data.make_dataset(f"folder:{root}", None, holdout=4, image_size=8, min_train=4)
  summary = quickstart_data.summarize(dataset, min_train=4)
  train, held = summary["splits"]["train"], summary["splits"]["heldout"]
  assert summary["classes"] == ["cat", "dog"]
  assert train["images"] + held["images"] == 16 and train["unreadable_skipped"] + held["unreadable_skipped"] == 1
  assert train["unreadable_examples"] == ["dog/broken.png"] and train["per_class"] == {"cat": 7, "dog": 5}
  assert "17 images; 1 non-image or hidden files ignored" == train["folder_listing"]
  assert {train["sizes"].split(" (")[0], held["sizes"].split(" (")[0]} == {
    "2 sizes from 8x8 to 12x9",
    "3 sizes from 8x8 to 20x30",
  }
  evals, shots, skipped = quickstart_data.probe_plan(summary)
  assert evals == ("linear_probe", "fewshot") and shots == (1, 2, 5) and "10-shot need more" in skipped["fewshot"]
  assert quickstart_data.write_reference_images(dataset, str(tmp_path / "ref.npz")) == 4
  with np.load(tmp_path / "ref.npz") as z:
    assert z["images"].shape == (4, 8, 8, 3) and z["images"].dtype == np.uint8

  one_each = _folder(tmp_path / "one_each", {f"c{i:02d}": 1 for i in range(12)})
  summary = quickstart_data.summarize(
    quickstart_data.make_dataset(f"folder:{one_each}", None, holdout=2, image_size=8, min_train=4), 4
  )
  evals, shots, skipped = quickstart_data.probe_plan(summary)
  assert evals == ("linear_probe",) and shots == () and "has 0 training images: 1, 2, 5, 10-shot" in skipped["fewshot"]
  flat = {"classes": [], "splits": {}}
  assert (
    quickstart_data.probe_plan(flat)[0] == ()
    and "no class subfolders" in quickstart_data.probe_plan(flat)[2]["linear_probe"]
  )
  differ = _folder(tmp_path / "differ", {"train/x": 6, "train/y": 6, "test/x": 2, "test/z": 2})
  with pytest.raises(
    ValueError,
    match=r"class folders of .*train and .*test differ \(only in training: \['y'\]; "
    r"only held out: \['z'\]\)",
  ):
    quickstart_data.summarize(
      quickstart_data.make_dataset(f"folder:{differ}", None, holdout=-1, image_size=8, min_train=4), 4
    )


@pytest.mark.parametrize("case", ["empty", "single", "prefix_flag", "freeze_without_init"])
def test_quickstart_refuses_bad_input_in_one_line(case, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  if case == "single":
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "only.png")
  args = {
    "empty": ([], 1, "No image files", "images"),
    "single": ([], 1, "has 1 image", "needs at least 66 images"),
    "prefix_flag": (["--hold=5"], 2, "hold"),
    "freeze_without_init": (["--freeze_codebook"], 2, "--tokenizer_init"),
  }[case]
  run = run_cli(
    "mage_jax.quickstart", f"--data=folder:{folder}", f"--workdir={tmp_path / 'w'}", "--budget=ci", *args[0]
  )
  assert_one_line_error(run, args[1], *args[2:])
  assert not (tmp_path / "w" / "tokenizer").exists()


def _numbers(tree, path=""):
  """Every number in a JSON tree, with its path."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _numbers(v, f"{path}/{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _numbers(v, f"{path}/{i}")
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, tree


@pytest.mark.slow
def test_quickstart_on_an_image_folder_fine_tunes_resumes_and_reports(fashion_png_folder, testdata, tmp_path):
  from mage_jax.convert import convert
  from mage_jax.train import params_io

  state_dict, _ = convert.load_checkpoint(str(testdata / "official_tiny" / "tokenizer.pth"))
  converted = convert.convert_state_dict(state_dict, "tokenizer", resolution=32)
  params_io.save(str(tmp_path / "vqgan"), converted.variables, converted.meta)
  workdir = tmp_path / "qs"
  args = [
    f"--data=folder:{fashion_png_folder}",
    f"--workdir={workdir}",
    "--budget=ci",
    f"--tokenizer_init={tmp_path / 'vqgan'}",
    "--freeze_codebook",
  ]
  run = run_cli("mage_jax.quickstart", *args, timeout=1800)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
  for path in (
    "data.json",
    "heldout.npz",
    "tokenizer/params/mage_jax.json",
    "tokenizer/eval_metrics_init.json",
    "reconstructions.png",
    "mage/params/mage_jax.json",
    "samples.npz",
    "samples_grid.png",
    "eval/results.json",
    "fid.json",
    "results.md",
    "results.json",
    "stages.json",
  ):
    assert (workdir / path).exists(), path
  for png in ("samples_grid.png", "reconstructions.png"):
    image = np.asarray(Image.open(workdir / png))
    assert image.ndim == 3 and image.shape[-1] == 3 and image.std() > 0, png
  results = json.loads((workdir / "results.json").read_text())
  data = results["data"]
  assert data["path"] == str(fashion_png_folder) and data["classes"] == [str(i) for i in range(10)]
  assert (data["splits"]["train"]["images"], data["splits"]["heldout"]["images"]) == (360, 40)
  assert data["splits"]["heldout"]["split"] == "[-40:]" and data["fid_reference_images"] == 40
  with np.load(workdir / "heldout.npz") as z:
    assert z["images"].shape == (40, 32, 32, 3) and z["images"].dtype == np.uint8
  tokenizer = results["tokenizer"]
  assert tokenizer["num_examples"] == tokenizer["before_fine_tuning"]["num_examples"] == 40
  numbers = dict(_numbers(results))
  bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
  assert not bad, bad
  assert (
    "/representations/mage/linear_probe/top1" in numbers and "/representations/pixels/fewshot/ridge/10/mean" in numbers
  )
  if os.environ.get("MAGE_JAX_REQUIRE_FID") == "1" or results["fid"]["fid"] is not None:
    assert results["fid"]["num_reference"] == 40 and math.isfinite(results["fid"]["fid"])
  table = (workdir / "results.md").read_text()
  assert "before fine-tuning" in table and "FID vs 40 held-out images" in table
  # Re-running resumes: every stage is kept (same records), the results are the same, nothing is trained again.
  stages = (workdir / "stages.json").read_text()
  again = run_cli("mage_jax.quickstart", *args, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (workdir / "stages.json").read_text() == stages
  rerun = json.loads((workdir / "results.json").read_text())
  assert rerun["representations"] == results["representations"] and rerun["fid"] == results["fid"]
  assert "resuming" not in again.stderr and "training finished" not in again.stderr
