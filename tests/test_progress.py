"""progress.Progress: the images/s and ETA lines long jobs print."""

import pytest

from mage_jax.train import progress


@pytest.fixture
def clock(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
  return now


def test_rate_eta_and_a_padded_last_batch(clock):
  lines = []
  p = progress.Progress(1000, "features of test", interval=10.0, log=lines.append)
  clock[0] += 3.0
  p.update(256)  # the first chunk carries the compilation: no rate yet
  assert lines == ["features of test: 256/1000 images; the first chunk (with compilation) took 3.0 s"]
  clock[0] += 2.0
  p.update(256)  # 256 images in 2 s; not logged before `interval`
  assert len(lines) == 1 and p.rate() == pytest.approx(128.0)
  clock[0] += 2.0
  p.update(256)
  clock[0] += 8.0
  p.update(256)  # the last batch is padded: 1,024 rows for 1,000 images, 744 of them in 12 s after the first chunk
  assert lines[-1] == "features of test: 1000/1000 images, 62.0 images/s, ETA 0 s"


def test_unknown_total_has_no_eta(clock):
  lines = []
  p = progress.Progress(None, "token cache", unit="batches", interval=0.0, log=lines.append)
  p.update(1)
  clock[0] += 1.0
  p.update(4)
  assert lines[-1] == "token cache: 5 batches, 4.0 batches/s"
