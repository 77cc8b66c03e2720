"""The stage records of a quickstart workdir (`stages.json`): which stage finished, or started, with what
inputs, and the outputs a redo removes; and the exception of a training stage stopped before its end.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import logging

from mage_jax.system import atomic

# Stage name -> the paths under the workdir it writes (what a redo removes).
STAGE_OUTPUTS = {
  "data": ("data.json", "heldout.npz", "fid_reference"),
  "tokenizer": ("tokenizer", "reconstructions.png"),
  "cache": ("tokens",),
  "mage": ("mage",),
  "samples": ("samples.npz", "samples_grid.png"),
  "representations": ("eval", "features"),
  "fid": ("fid.json",),
  "points": ("mage", "points"),  # the reference run's MAGE stage (jobs/reference.py)
}
STAGES_FILE = "stages.json"


class StageRecords:
  """`stages.json`: per stage, a hash of what produces it (its inputs and the stages before it), recorded as
  'started:<hash>' before the stage runs and '<hash>' once its outputs are complete.

  A rerun skips a finished stage with the same hash, continues a started one with the same hash (the training
  stages resume from their checkpoints, the token cache from its finished shards), and redoes a stage whose hash
  changed after removing its outputs. Outputs that exist without any record were not written by the quickstart,
  and are refused rather than touched.
  """

  STARTED = "started:"

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, STAGES_FILE)
    self.workdir = workdir
    self.records = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.records = json.load(f)

  def done(self, stage: str, identity: str) -> bool:
    return self.records.get(stage) == identity

  def prepare(self, stage: str, identity: str) -> None:
    """Makes the workdir ready for `stage`: nothing to do, resume, or start afresh (see the class)."""
    record = self.records.get(stage)
    if record in (identity, self.STARTED + identity):
      return
    present = [p for p in STAGE_OUTPUTS[stage] if os.path.exists(os.path.join(self.workdir, p))]
    if present and record is None:
      raise ValueError(
        f"{self.workdir} holds {', '.join(present)} not written by the quickstart; use another --workdir"
      )
    for p in present:
      logging.warning("quickstart: redoing stage %s (its inputs changed): removing %s", stage, p)
      path = os.path.join(self.workdir, p)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    self.records[stage] = self.STARTED + identity
    self._write()

  def finish(self, stage: str, identity: str) -> None:
    self.records[stage] = identity
    self._write()

  def _write(self):
    atomic.write_json(self.path, self.records, indent=1)


class StageInterrupted(Exception):
  """A training stage stopped before its end (SIGTERM: its checkpoint is saved); rerunning resumes it."""
