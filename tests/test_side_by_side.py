"""bench/side_by_side.py: the official configs it writes, the ratio table, and a run without the official code."""

import json
import os
import subprocess
import sys

import pytest

from bench import side_by_side

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_official_config_is_the_fixture_geometry():
  fixture = json.load(open(os.path.join(ROOT, "tests", "testdata", "official_tiny", "config.json")))
  ours = side_by_side.official_config("tiny")
  assert ours["tokenizer"] == fixture["tokenizer"]
  for key in (
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "mlp_ratio",
    "img_size",
    "patch_size",
    "num_tokens",
    "vocab_size",
    "fake_class_id",
    "mask_id",
  ):
    assert ours["mage"][key] == fixture["mage"][key], key


@pytest.mark.parametrize("size", side_by_side.SIZES)
def test_official_and_benchmark_sizes_agree(size):
  side_by_side._check_sizes_agree(size)  # pylint: disable=protected-access
  mid = side_by_side.official_config(size)
  assert mid["mage"]["num_tokens"] == (mid["mage"]["img_size"] // 4) ** 2


def test_summary_takes_medians_over_rounds_and_ratios_against_each_official_variant():
  rounds = {
    "mage_jax": [
      dict(pretrain=0.1, pretrain_cached=0.05, encode=0.02, generate=1.0, features=0.03),
      dict(pretrain=0.3, pretrain_cached=0.07, encode=0.04, generate=3.0, features=0.05),
      dict(pretrain=0.2, pretrain_cached=0.06, encode=0.03, generate=2.0, features=0.04),
    ],
    "official (default)": [dict(pretrain=0.4, encode=0.03, generate=4.0, features=0.06)] * 3,
  }
  table = {r["row"]: r for r in side_by_side.summarize(rounds, batch=64)}
  assert table["pretrain"]["mage_jax_s"] == pytest.approx(0.2)
  assert table["pretrain"]["official"]["official (default)"]["ratio"] == pytest.approx(2.0)
  # the cached-token step is compared with the official step, which must encode its images
  assert table["pretrain_cached"]["official"]["official (default)"]["ratio"] == pytest.approx(0.4 / 0.06)
  text = side_by_side.format_table(list(table.values()), "header")
  assert "| pretrain | 320.0 | 160.0 | 2.00x |" in text


def test_refuses_bad_flags():
  with pytest.raises(ValueError, match="official-allocators"):
    side_by_side.parse_args(["--official-allocators=jemalloc"])
  with pytest.raises(ValueError, match="--rounds"):
    side_by_side.parse_args(["--rounds=0"])


@pytest.mark.slow
def test_runs_mage_jax_alone_without_the_official_code(tmp_path):
  out = tmp_path / "sbs.json"
  proc = subprocess.run(
    [sys.executable, "bench/side_by_side.py", "--anchor=", "--steps=1", "--rounds=1", "--batch=8", f"--json={out}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "official code not found: mage_jax alone" in proc.stdout
  result = json.loads(out.read_text())
  assert [r["row"] for r in result["table"]] == list(side_by_side.AGAINST)
  assert all(r["mage_jax_img_s"] > 0 and r["official"] == {} for r in result["table"])
