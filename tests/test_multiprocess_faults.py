"""Pod-scale faults, end to end with `python -m mage_jax.main`: 2 processes on 127.0.0.1 (2 CPU devices each)
or 1 process (4 devices), the tiny config on an image folder, compared with one uninterrupted 2-process run.

  * SIGTERM to one process only: both save the same step and exit 0; the resumed run equals the reference;
  * a damaged newest checkpoint: resume from the previous one (warning naming the bad step, which is set aside),
    or with corrupt_checkpoint=refuse one line naming it and status 1 on every process;
  * a 2-process checkpoint resumes on 1 process and a 1-process one on 2, with the reference's losses;
  * Ctrl-C while the first step compiles: checkpoint, status 130; a second one kills at once, even while
    the process waits on the device;
  * a process killed: the other exits within the heartbeat timeout naming it.

The processes load a saved random tokenizer (a random one would be initialised with a jitted VQGAN init in every
process). No persistent compilation cache: only process 0 of a multi-process run would hit it, and process 1,
compiling alone, could then reach the first collective later than the 30 s gloo's rendezvous waits. Each
process runs in its own session; every session is killed when a test ends.
"""

import contextlib
import dataclasses
import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_trainer import REPO, _main_cmd, _scalars

from conftest import random_variables

STEPS = 16  # the schedule every run here shares; checkpoints every 4 steps (3 kept) unless a test says otherwise
TIMEOUT = 300  # seconds any single run may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def setup(image_folder, tmp_path_factory):
  """(tmp dir, base command flags, environment) shared by the module's runs."""
  from configs import fashion_mnist_tiny
  from mage_jax.models.vqgan import VQGAN
  from mage_jax.train import builders, params_io

  root = tmp_path_factory.mktemp("faults")
  config = fashion_mnist_tiny.get_config("steps=4,batch=8")
  tok_config = builders.tokenizer_config(config.tokenizer, 16)
  variables = random_variables(VQGAN(tok_config), 1, jnp.zeros((1, 4, 4, 3)))
  params_io.save(
    str(root / "tokenizer"),
    {"tokenizer": jax.tree.map(lambda a: np.asarray(a, np.float32), variables)},
    {"kind": "tokenizer", "tokenizer": dataclasses.asdict(tok_config)},
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return root, (f"--config.tokenizer.init={root / 'tokenizer'}",), env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Runs:
  """Starts `mage_jax.main` processes (each in its own session, output in a log file) and kills what is left."""

  def __init__(self, setup, image_folder):
    _, self.flags, self.env = setup
    self.image_folder = image_folder
    self.procs: list[subprocess.Popen] = []

  def start(self, workdir, processes: int, *extra) -> list[subprocess.Popen]:
    # Unoptimised XLA code: compiling the step takes 35% less CPU time, and every run here uses the same code.
    env = dict(
      self.env, XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // processes} --xla_backend_optimization_level=0"
    )
    cmd = _main_cmd(self.image_folder, workdir, STEPS, *self.flags, *extra)
    if processes > 1:
      port = _free_port()
      cmds = [
        cmd + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
        for i in range(processes)
      ]
    else:
      cmds = [cmd]
    started = []
    for c in cmds:
      with open(f"{workdir}.{len(self.procs)}.log", "w") as log:
        proc = subprocess.Popen(c, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
      proc.log_path = log.name
      self.procs.append(proc)
      started.append(proc)
    return started

  def finish(self, procs, timeout=TIMEOUT) -> list[str]:
    """Waits for `procs`; returns their logs."""
    deadline = time.time() + timeout
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
    return [_log(p) for p in procs]

  def run_ok(self, workdir, processes: int, *extra) -> list[str]:
    procs = self.start(workdir, processes, *extra)
    logs = self.finish(procs)
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return logs

  def kill_all(self):
    for p in self.procs:
      if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _log(proc) -> str:
  with open(proc.log_path, errors="replace") as f:
    return f.read()


def _wait_for(proc, pattern, timeout=TIMEOUT):
  """Polls `proc`'s log until `pattern` (regex) appears; fails if the process ends first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if re.search(pattern, _log(proc)):
      return
    assert proc.poll() is None, f"ended (status {proc.returncode}) before {pattern!r}:\n{_log(proc)[-3000:]}"
    time.sleep(0.05)
  raise AssertionError(f"{pattern!r} not seen in {timeout} s")


_LOOP_STARTED = "from now on SIGTERM and Ctrl-C stop the run"


def _logged_step(step):
  return rf"\] \[{step}\] train/"


@pytest.fixture
def runs(setup, image_folder):
  r = _Runs(setup, image_folder)
  try:
    yield r
  finally:
    r.kill_all()


@pytest.fixture(scope="module")
def reference(setup, image_folder):
  """An uninterrupted 2-process run: (workdir, losses of steps 1..STEPS); checkpoints 8, 12, 16."""
  r = _Runs(setup, image_folder)
  workdir = setup[0] / "reference"
  try:
    r.run_ok(workdir, 2)
  finally:
    r.kill_all()
  losses = _scalars(str(workdir))
  assert len(losses) == STEPS
  return workdir, losses


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _copy_checkpoints(src, dst, steps):
  for step in steps:
    shutil.copytree(os.path.join(src, "checkpoints", str(step)), os.path.join(dst, "checkpoints", str(step)))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(reference, runs, setup):
  workdir = setup[0] / "sigterm"
  procs = runs.start(workdir, 2, "--config.checkpoint_every_steps=100")
  _wait_for(procs[0], _logged_step(2))
  procs[1].send_signal(signal.SIGTERM)
  logs = runs.finish(procs)
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
  (stopped,) = _steps(workdir)
  assert 2 <= stopped < STEPS
  assert f"checkpoint {stopped} written after SIGTERM" in logs[1]
  assert f"checkpoint {stopped} written after a signal to another process" in logs[0]
  runs.run_ok(workdir, 2)
  assert _scalars(str(workdir)) == reference[1]  # bitwise: the resumed steps and the ones before


def _damage(workdir, step):
  """Truncates the OCDBT manifest and data files of `step` (a half-copied checkpoint)."""
  for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "*"), recursive=True):
    if os.path.isfile(path) and "ocdbt" in path:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def _tree(path):
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), path)] = f.read()
  return out


@pytest.fixture(scope="module")
def fallback(reference, setup, image_folder):
  """The reference's checkpoints 8 and 12 with 12 damaged, resumed by 1 process (4 devices): (workdir, log, the
  damaged step's files)."""
  workdir = setup[0] / "fallback"
  _copy_checkpoints(reference[0], workdir, [8, 12])
  _damage(workdir, 12)
  damaged = _tree(workdir / "checkpoints" / "12")
  r = _Runs(setup, image_folder)
  try:
    (log,) = r.run_ok(workdir, 1)
  finally:
    r.kill_all()
  return workdir, log, damaged


# Resumed on 1 process, losses are compared with the 2-process reference to 1e-5, not bitwise: the all-reduces
# across 2 processes (gloo) add in another order than the ones inside a process, ~1 ulp per step (measured: at
# most 1.7e-7 relative). A wrong batch would move a loss by ~1e-2; the batches themselves are
# compared bitwise across process counts and resume points in test_data.py.


def test_restore_newest_sets_aside_damaged_steps_and_refuses(tmp_path):
  from mage_jax.train import checkpointing

  mngr = checkpointing.manager(str(tmp_path), keep=3, async_save=False)
  for step in (4, 8, 12):
    checkpointing.save(mngr, step, {"w": jnp.full((64,), step, jnp.float32)})
  target = {"w": jax.ShapeDtypeStruct((64,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  _damage(tmp_path, 12)
  _damage(tmp_path, 8)
  damaged = _tree(tmp_path / "checkpoints" / "12")
  with pytest.raises(ValueError, match="checkpoint step 12 .* DATA_LOSS"):
    checkpointing.restore_newest(mngr, target, corrupt="refuse")
  assert _steps(tmp_path) == [4, 8, 12]
  step, state = checkpointing.restore_newest(mngr, target)
  assert step == 4 and float(state["w"][0]) == 4
  aside = sorted(glob.glob(str(tmp_path / "checkpoints" / "*.corrupt-*")))
  assert [os.path.basename(p).split(".")[0] for p in aside] == ["12", "8"] and _tree(aside[0]) == damaged
  for step in (8, 12, 16):  # the set-aside steps are saved again; keep=3 removes 4, not them
    checkpointing.save(mngr, step, {"w": jnp.full((64,), step, jnp.float32)})
  assert _steps(tmp_path) == [8, 12, 16] and len(glob.glob(str(tmp_path / "checkpoints" / "*.corrupt-*"))) == 2
  other = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=target["w"].sharding)}
  with pytest.raises(ValueError, match="checkpoint step 16"):  # no step fits: a config mismatch, nothing renamed
    checkpointing.restore_newest(mngr, other)
  assert _steps(tmp_path) == [8, 12, 16]


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back(fallback, reference):
  workdir, log, damaged = fallback
  # Truncated files are caught by the step's manifest before orbax reads them.
  assert re.search(r"checkpoint step 12 .* is damaged: \S+ is \d+ bytes, \d+ when saved\. Resuming from step 8", log), (
    log[-3000:]
  )
  assert "Traceback" not in log
  (aside,) = glob.glob(str(workdir / "checkpoints" / "12.corrupt-*"))
  assert aside in log and _tree(aside) == damaged  # named, and kept as it was for inspection
  assert _steps(workdir) == [8, 12, 16]  # 12 saved again; keep_checkpoints=3 did not count the damaged one
  np.testing.assert_allclose(_scalars(str(workdir)), reference[1][8:], rtol=1e-5)


@pytest.mark.slow
def test_damaged_newest_checkpoint_refused_on_every_process(reference, runs, setup):
  workdir = setup[0] / "refuse"
  _copy_checkpoints(reference[0], workdir, [8, 12])
  _damage(workdir, 12)
  before = _tree(workdir / "checkpoints")
  procs = runs.start(workdir, 2, "--config.corrupt_checkpoint=refuse")
  for proc, log in zip(procs, runs.finish(procs)):
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "checkpoint step 12" in errors[0], log[-3000:]
    assert "Traceback" not in log
  assert _tree(workdir / "checkpoints") == before  # nothing renamed or written


@pytest.mark.slow
def test_resume_on_another_number_of_processes(fallback, reference, runs, setup):
  one, _, _ = fallback  # 2 -> 1: the reference's step 8 resumed by 1 process
  np.testing.assert_allclose(_scalars(str(one)), reference[1][8:], rtol=1e-5)
  two = setup[0] / "one_to_two"
  _copy_checkpoints(one, two, [12])  # written by the single process
  runs.run_ok(two, 2)
  np.testing.assert_allclose(_scalars(str(two)), reference[1][12:], rtol=1e-5)


@pytest.mark.slow
def test_ctrl_c_during_compilation(runs, setup):
  workdir = setup[0] / "sigint"
  (proc,) = runs.start(workdir, 1)
  _wait_for(proc, _LOOP_STARTED)  # the first step is being traced and compiled
  proc.send_signal(signal.SIGINT)
  _wait_for(proc, "written after SIGINT")
  saved = time.time()
  (log,) = runs.finish([proc])
  assert proc.returncode == 130, log[-3000:]
  # The flags are agreed one step late: the step after the one being compiled is saved.
  assert "checkpoint 2 written after SIGINT" in log and _steps(workdir) == [2]
  assert "interrupted" in log and "Traceback" not in log
  assert time.time() - saved < 60  # tearing down the interpreter (TF, XLA): 7-50 s on the loaded 2-core CPU


_WAIT_ON_DEVICE = """
import os, signal, threading, time
import jax, jax.numpy as jnp
from mage_jax.train import preemption
stop = preemption.Stop(jax.make_mesh((1,), ("data",)))
x = jnp.ones((256,))
work = jax.jit(lambda x: jax.lax.fori_loop(0, 10**8, lambda i, x: x * 1.0000001, x)).lower(x).compile()
def ctrl_c_twice():
  for _ in range(2):
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=ctrl_c_twice).start()
work(x).block_until_ready()  # tens of seconds of device work: Python handlers cannot run meanwhile
print("the device work finished first", flush=True)
"""


def test_second_ctrl_c_kills_while_waiting_on_the_device():
  # A Python handler would only run once the device work is done (never, in a hung collective); the kernel
  # restores the default action as it delivers the first Ctrl-C.
  run = subprocess.run(
    [sys.executable, "-c", _WAIT_ON_DEVICE],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert run.returncode == -signal.SIGINT and not run.stdout, run.stdout + run.stderr[-3000:]


@pytest.mark.slow
def test_dead_process_ends_the_other_naming_it(runs, setup):
  workdir = setup[0] / "dead"
  heartbeat = 5
  procs = runs.start(workdir, 2, f"--config.distributed.heartbeat_timeout_seconds={heartbeat}")
  # Killed once set up: process 0 then waits in the collective that places the replicated tokenizer.
  _wait_for(procs[1], r"\] mesh \{")
  os.killpg(procs[1].pid, signal.SIGKILL)
  killed = time.time()
  (log,) = runs.finish([procs[0]], timeout=60)
  elapsed = time.time() - killed
  assert procs[0].returncode != 0
  assert re.search(r"unhealthy \(stopped sending heartbeats\):\s*(/job:\w+/replica:\d+/task:)?1\b", log), log[-3000:]
  assert elapsed < heartbeat + 10, elapsed


def test_documented_commands_parse():
  text = open(os.path.join(REPO, "docs", "faults.md")).read()
  blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
  commands = [
    line.strip().rstrip("&").replace("$i", "0")
    for block in blocks
    for line in block.replace("\\\n", " ").splitlines()
    if "python -m mage_jax.main" in line
  ]
  assert len(commands) == 2
  for command in commands:
    run = subprocess.run(
      [sys.executable, *shlex.split(command)[1:]],
      cwd=REPO,
      capture_output=True,
      text=True,
      env=dict(os.environ, MAGE_JAX_PARSE_ONLY="1"),
    )
    assert run.returncode == 0 and "flags parsed" in run.stdout, command + run.stderr[-2000:]


def test_bad_distributed_timeout_is_one_line(image_folder, tmp_path):
  cmd = _main_cmd(image_folder, tmp_path / "w", STEPS, "--config.distributed.heartbeat_timeout_seconds=0")
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert run.returncode == 2, run.stderr[-2000:]
  assert run.stderr.strip().splitlines()[-1] == (
    "error: distributed heartbeat_timeout_seconds must be a positive number of seconds, got 0 (see --help)"
  )
