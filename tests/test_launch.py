"""Tests for the launch scripts: dry runs parse, quoting survives, shells run them."""

import importlib.util
import os
import pathlib
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

CONFIG = "configs/mage_pretrain.py:variant=B,runlocal"
# Spaces, both quote kinds, a shell metachar, an empty value and a $ that must not expand.
OVERRIDES = [
  "--config.lr=0.03",
  '--config.name=it\'s a "quoted" run; echo pwned',
  "--config.input.pp=decode|resize(256)|value_range(0, 1)",
  "--config.note=$HOME",
  "--config.empty=",
]


def _load(name):
  spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


tpu_vm = _load("tpu_vm")
slurm = _load("slurm")


def _expected_main(workdir, python="python"):
  return [python, "-m", "mage_jax.main", f"--config={CONFIG}", f"--workdir={workdir}", *OVERRIDES]


def _dry(mod, argv, capsys):
  assert mod.main(argv) == 0
  return capsys.readouterr().out.splitlines()


def _flag(tokens, name):
  vals = [t.split("=", 1)[1] for t in tokens if t.startswith(name + "=")]
  assert len(vals) == 1, (name, tokens)
  return vals[0]


def _write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


# A fake program that records its argv (NUL-separated) and one env var.
_RECORDER = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$REC_DIR/$(basename "$0").argv"
printf '%s' "${XLA_FLAGS-unset}|${JAX_LOCAL_DEVICE_IDS-unset}" > "$REC_DIR/$(basename "$0").env"
"""


def _read_argv(path):
  return path.read_bytes().split(b"\0")[:-1]


# --------------------------------------------------------------------------- TPU VM


def _tpu_all(accel, capsys, extra=()):
  argv = [
    "all",
    "--name=mage-test",
    "--zone=us-central2-b",
    f"--accelerator-type={accel}",
    f"--config={CONFIG}",
    "--workdir=gs://bucket/runs/b",
    *extra,
    "--dry-run",
    "--",
    *OVERRIDES,
  ]
  return [shlex.split(line) for line in _dry(tpu_vm, argv, capsys)]


def _python_segment(remote):
  """Splits a remote `a && b && python ...` line; returns the last segment's argv."""
  tokens = shlex.split(remote)
  segs, cur = [], []
  for t in tokens:
    if t == "&&":
      segs.append(cur)
      cur = []
    else:
      cur.append(t)
  segs.append(cur)
  return segs


@pytest.mark.parametrize("accel", ["v4-8", "v4-32"])  # 1 host, 4 hosts
def test_tpu_all_dry_run_well_formed(accel, capsys):
  cmds = _tpu_all(accel, capsys)
  kinds = [c[4] if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] else c[0] for c in cmds]
  assert kinds == ["create", "git", "scp", "ssh", "ssh", "delete"]
  create = cmds[0]
  assert create[5] == "mage-test"
  assert _flag(create, "--accelerator-type") == accel
  assert _flag(create, "--version") == "tpu-ubuntu2204-base"
  assert _flag(create, "--zone") == "us-central2-b"
  for c in cmds[2:5]:  # scp, setup ssh, run ssh: on every worker
    assert "--worker=all" in c
    assert _flag(c, "--zone") == "us-central2-b"
  assert cmds[-1][-1] == "--quiet" and cmds[-1][5] == "mage-test"
  segs = _python_segment(_flag(cmds[4], "--command"))
  assert segs[-1] == ["exec", *_expected_main("gs://bucket/runs/b")]
  assert segs[:-1] == [[".", "mage_venv/bin/activate"], ["cd", "mage_jax"]]
  setup = _flag(cmds[3], "--command")
  assert "pip install -q -e './mage_jax[tpu]'" in setup
  assert "tar -xzf mage_jax_src.tar.gz -C mage_jax" in setup


def test_tpu_python_command_identical_for_1_and_4_hosts(capsys):
  one, four = _tpu_all("v4-8", capsys), _tpu_all("v4-32", capsys)
  assert one[4] == four[4]  # one `--worker=all` ssh, same command on every host
  for a, b in zip(one, four):
    if a[:5] != ["gcloud", "compute", "tpus", "tpu-vm", "create"]:
      assert a == b


def _fake_worker_home(tmp_path, python_script):
  """A worker's home with the venv and code dirs, whose venv puts a fake `python` (running `python_script`) first."""
  home = tmp_path / "home"
  bin_dir = tmp_path / "bin"
  for d in (home / "mage_jax", home / "mage_venv" / "bin", bin_dir):
    d.mkdir(parents=True)
  (home / "mage_venv" / "bin" / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
  _write_exe(bin_dir / "python", python_script)
  return home


def test_tpu_remote_command_runs_in_bash(tmp_path, capsys):
  """The remote line, run by a real shell in a fake home, passes argv through intact."""
  home = _fake_worker_home(tmp_path, _RECORDER)
  xla = "--xla_gpu_enable_x=true --flag='q'"
  lines = _dry(
    tpu_vm,
    [
      "run",
      "--name=t",
      "--zone=z",
      f"--config={CONFIG}",
      "--workdir=gs://b/r",
      f"--env=XLA_FLAGS={xla}",
      "--dry-run",
      "--",
      *OVERRIDES,
    ],
    capsys,
  )
  assert len(lines) == 1
  remote = _flag(shlex.split(lines[0]), "--command")
  env = dict(os.environ, REC_DIR=str(tmp_path), HOME=str(home))
  subprocess.run(["bash", "-c", remote], cwd=home, env=env, check=True)
  got = _read_argv(tmp_path / "python.argv")
  assert got == [a.encode() for a in _expected_main("gs://b/r")[1:]]
  assert (tmp_path / "python.env").read_text() == f"{xla}|unset"


def test_tpu_detach_wraps_same_command(capsys):
  lines = _dry(
    tpu_vm,
    [
      "run",
      "--name=t",
      "--zone=z",
      f"--config={CONFIG}",
      "--workdir=gs://b/r",
      "--detach",
      "--dry-run",
      "--",
      *OVERRIDES,
    ],
    capsys,
  )
  remote = shlex.split(_flag(shlex.split(lines[0]), "--command"))
  assert remote[:3] == ["nohup", "bash", "-c"]
  assert remote[4:] == [">", "mage_run.log", "2>&1", "<", "/dev/null", "&"]
  assert _python_segment(remote[3])[-1] == ["exec", *_expected_main("gs://b/r")]


def test_tpu_setup_from_git_url(capsys):
  lines = _dry(
    tpu_vm,
    [
      "setup",
      "--name=t",
      "--zone=z",
      "--project=my-proj",
      "--repo-url=https://example.com/a b.git",
      "--ref=v1.0",
      "--dry-run",
    ],
    capsys,
  )
  assert len(lines) == 1
  cmd = shlex.split(lines[0])
  assert _flag(cmd, "--project") == "my-proj" and "--worker=all" in cmd
  remote = _flag(cmd, "--command")
  assert "git clone 'https://example.com/a b.git' mage_jax" in remote
  assert "fetch --tags origin v1.0" in remote


def test_tpu_all_runs_and_deletes_after_failed_run(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls"
  fake = f"""#!/usr/bin/env bash
printf '%s\\0' "$(basename "$0")" "$@" >> "{log}"; printf '\\n' >> "{log}"
if [[ "$*" == *mage_jax.main* ]]; then exit 3; fi
"""
  _write_exe(bin_dir / "gcloud", fake)
  _write_exe(bin_dir / "git", fake)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  rc = tpu_vm.main(
    [
      "all",
      "--name=t",
      "--zone=z",
      f"--config={CONFIG}",
      "--workdir=gs://b/r",
      f"--archive-dir={tmp_path}",
      "--",
      "--config.x=1",
    ]
  )
  assert rc == 3
  calls = [c.split("\0")[:-1] for c in log.read_text().split("\n") if c]
  assert [c[0] if c[0] == "git" else c[4] for c in calls] == ["create", "git", "scp", "ssh", "ssh", "delete"]


@pytest.mark.parametrize(
  "argv,match",
  [
    (["run", "--config=c.py", "--workdir=gs://b", "--", "lr=0.1"], "not a flag"),
    (["run", "--config=c.py", "--workdir=gs://b", "--env=1X=2"], "KEY=VALUE"),
    (["run", "--config=c.py", "--workdir=gs://b", "--remote-dir=a b"], "remote-dir"),
    (["setup", "--remote-dir=../x"], "remote-dir"),
    (["setup", "--remote-dir=v", "--venv=v"], "must differ"),
    (["delete", "--name=../x"], "--name '../x'"),
    (["delete", "--name=Mage_B"], "a TPU name is lowercase"),
    (["delete", "--zone=us/../x"], "--zone"),
    (["delete", "--worker=0;reboot"], "--worker"),
    (["create", "--accelerator-type=v4 8"], "--accelerator-type"),
    (["setup", "--ref=--output=/tmp/x"], "--ref"),
    (["setup", "--repo-url=--upload-pack=touch x"], "--repo-url"),
    (["setup", "--ref=main x"], "--ref"),
    (["all", "--config=c.py", "--workdir=gs://b", "--detach"], "would delete the TPU VM while training runs"),
  ],
)
def test_tpu_bad_args(argv, match, capsys):
  with pytest.raises(SystemExit) as e:
    tpu_vm.main([argv[0], "--name=t", "--zone=z", "--dry-run", *argv[1:]])
  assert e.value.code == 2
  assert match in capsys.readouterr().err


def test_tpu_cli_subprocess():
  out = subprocess.run(
    [sys.executable, str(LAUNCH / "tpu_vm.py"), "delete", "--name=t", "--zone=z", "--dry-run"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert out == "gcloud compute tpus tpu-vm delete t --zone=z --quiet\n"


# --------------------------------------------------------------------------- SLURM


def _slurm(nodes, procs, capsys, extra=()):
  argv = [
    f"--nodes={nodes}",
    "--gpus-per-node=8",
    f"--procs-per-node={procs}",
    "--time=12:00:00",
    "--partition=gpu",
    f"--config={CONFIG}",
    "--workdir=/shared/runs/my run",
    *extra,
    "--dry-run",
    "--",
    *OVERRIDES,
  ]
  return _dry(slurm, argv, capsys)


def _directives(lines):
  return dict(line[len("#SBATCH ") :].split("=", 1) for line in lines if line.startswith("#SBATCH --") and "=" in line)


@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("procs,tasks", [("gpu", "8"), ("host", "1")])
def test_slurm_dry_run_well_formed(nodes, procs, tasks, capsys, tmp_path):
  lines = _slurm(nodes, procs, capsys)
  assert lines[0] == "#!/bin/bash"
  d = _directives(lines)
  assert d["--nodes"] == str(nodes)
  assert d["--ntasks-per-node"] == tasks
  assert d["--gpus-per-node"] == "8"
  assert d["--time"] == "12:00:00" and d["--partition"] == "gpu"
  assert shlex.split(lines[-1]) == ["sbatch", "runs/slurm/mage_jax.sbatch"]
  sruns = [shlex.split(line) for line in lines[:-1] if "srun" in line]
  assert len(sruns) == 1
  assert sruns[0] == ["exec", "srun", "--kill-on-bad-exit=1", *_expected_main("/shared/runs/my run")]
  exports = [line for line in lines if line.startswith("export JAX_LOCAL_DEVICE_IDS")]
  assert exports == (["export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"] if procs == "host" else [])
  script = tmp_path / "s.sbatch"
  script.write_text("\n".join(lines[:-1]) + "\n")
  subprocess.run(["bash", "-n", str(script)], check=True)  # syntax only


def test_slurm_srun_identical_for_1_and_4_nodes(capsys):
  srun = lambda lines: [line for line in lines if "srun" in line]  # noqa: E731
  assert srun(_slurm(1, "gpu", capsys)) == srun(_slurm(4, "gpu", capsys))


def test_slurm_submit_writes_script_that_runs(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_exe(bin_dir / "sbatch", _RECORDER)
  _write_exe(bin_dir / "srun", _RECORDER)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("REC_DIR", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  rc = slurm.main(
    [
      "--nodes=4",
      "--procs-per-node=host",
      "--gpus-per-node=4",
      f"--config={CONFIG}",
      "--workdir=/w",
      "--env=XLA_FLAGS=--a 'b'",
      "--job-name=j1",
      "--",
      *OVERRIDES,
    ]
  )
  assert rc == 0
  assert _read_argv(tmp_path / "sbatch.argv") == [b"runs/slurm/j1.sbatch"]
  script = tmp_path / "runs" / "slurm" / "j1.sbatch"
  assert (tmp_path / "runs" / "slurm").is_dir()
  assert f"#SBATCH --output={tmp_path}/runs/slurm/%x-%j.out" in script.read_text()
  subprocess.run(["bash", str(script)], check=True)  # its srun is the recorder
  assert _read_argv(tmp_path / "srun.argv") == [a.encode() for a in ["--kill-on-bad-exit=1", *_expected_main("/w")]]
  assert (tmp_path / "srun.env").read_text() == "--a 'b'|0,1,2,3"


@pytest.mark.parametrize(
  "argv,match",
  [
    (["--nodes=0"], "--nodes"),
    (["--gpus-per-node=0"], "--gpus-per-node"),
    (["--time=tomorrow"], "--time"),
    (["--job-name=a b"], "--job-name"),
    (["--env=NOEQUALS"], "KEY=VALUE"),
    (["--", "config.lr=1"], "not a flag"),
    (["--partition=gpu --uid=0"], "--partition"),
    (["--account=-x"], "--account"),
    (["--output=/runs/my log.out"], "--output"),
    (["--chdir=--uid=0"], "--chdir"),
    (["--script=my runs/j.sbatch"], "--output"),  # the default log path sits beside the script
  ],
)
def test_slurm_bad_args(argv, match, capsys):
  with pytest.raises(SystemExit) as e:
    slurm.main(["--config=c.py", "--workdir=/w", "--dry-run", *argv])
  assert e.value.code == 2
  assert match in capsys.readouterr().err


# --------------------------------------------------------------------------- local


def _local(args, tmp_path, **env):
  return subprocess.run(
    ["bash", str(LAUNCH / "local.sh"), *args],
    capture_output=True,
    text=True,
    env=dict(os.environ, REC_DIR=str(tmp_path), **env),
  )


def test_local_dry_run(tmp_path):
  r = _local([CONFIG, "runs/my run", *OVERRIDES], tmp_path, DRY_RUN="1", PYTHON="python")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 1
  assert shlex.split(lines[0]) == _expected_main("runs/my run")
  assert not (tmp_path / "python.argv").exists()


def test_local_runs_command(tmp_path):
  fake = tmp_path / "python"
  _write_exe(fake, _RECORDER)
  r = _local([CONFIG, "runs/x", *OVERRIDES], tmp_path, PYTHON=str(fake))
  assert r.returncode == 0, r.stderr
  assert _read_argv(tmp_path / "python.argv") == [a.encode() for a in _expected_main("runs/x")[1:]]


@pytest.mark.parametrize(
  "args,match",
  [
    ([CONFIG], "usage"),
    (["", "w"], "non-empty"),
    ([CONFIG, "w", "config.lr=1"], "not a flag"),
  ],
)
def test_local_bad_args(args, match, tmp_path):
  r = _local(args, tmp_path, DRY_RUN="1")
  assert r.returncode == 2 and match in r.stderr


# --------------------------------------------------------------------------- dry runs, scripts, signals

_CALLS = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $*" >> "$REC_DIR/calls"
"""


@pytest.fixture
def recorded(tmp_path, monkeypatch):
  """Fake gcloud/git/sbatch/srun on PATH; returns a function listing the calls they received."""
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir()
  for name in ("gcloud", "git", "sbatch", "srun"):
    _write_exe(bin_dir / name, _CALLS)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("REC_DIR", str(tmp_path))
  monkeypatch.delenv("DRY_RUN", raising=False)
  monkeypatch.chdir(tmp_path)
  calls = tmp_path / "calls"
  return lambda: calls.read_text().splitlines() if calls.exists() else []


_TPU_ALL = ["all", "--name=mage-test", "--zone=z", f"--config={CONFIG}", "--workdir=gs://b/r", "--archive-dir=."]
_SLURM = [f"--config={CONFIG}", "--workdir=/w", "--job-name=j"]


@pytest.mark.parametrize(
  "where",
  [
    ["--dry-run"],
    ["--dry_run"],
    ["--dry-run=yes"],
    ["--", "--config.x=1", "--dry-run"],
    ["--", "--dry_run=ON"],
    ["env"],
  ],
)
def test_dry_run_anywhere_launches_nothing(where, recorded, monkeypatch, capsys):
  """Before or after `--`, or in the environment: no gcloud/sbatch call, no script written."""
  if where == ["env"]:
    monkeypatch.setenv("DRY_RUN", "true")
    where = []
  extra = where if where[:1] == ["--"] else where + ["--", "--config.x=1"]
  assert tpu_vm.main(_TPU_ALL + extra) == 0
  tpu_out = capsys.readouterr().out
  assert "tpu-vm create mage-test" in tpu_out and "--dry-run" not in tpu_out and "--dry_run" not in tpu_out
  assert slurm.main(_SLURM + extra) == 0
  assert "exec srun" in capsys.readouterr().out
  assert recorded() == [] and not os.path.exists("runs")


@pytest.mark.parametrize(
  "value,dry",
  [
    ("1", True),
    ("TRUE", True),
    ("yes", True),
    ("On", True),
    ("0", False),
    ("false", False),
    ("NO", False),
    ("off", False),
    ("", False),
  ],
)
def test_dry_run_spellings(value, dry, recorded, monkeypatch, capsys):
  monkeypatch.setenv("DRY_RUN", value)
  assert tpu_vm.main(["delete", "--name=t", "--zone=z"]) == 0
  assert slurm.main(_SLURM) == 0
  calls = recorded()
  real = ["gcloud compute tpus tpu-vm delete t --zone=z --quiet", "sbatch runs/slurm/j.sbatch"]
  assert calls == ([] if dry else real)


@pytest.mark.parametrize(
  "env,argv", [({"DRY_RUN": "maybe"}, []), ({}, ["--dry-run=2"]), ({}, ["--", "--dry-run=sure"])]
)
def test_unrecognised_dry_run_value_is_an_error(env, argv, recorded, monkeypatch, capsys):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  for main, base in ((tpu_vm.main, _TPU_ALL), (slurm.main, _SLURM)):
    with pytest.raises(SystemExit) as e:
      main(base + argv)
    assert e.value.code == 2 and "is not a yes/no value" in capsys.readouterr().err
  assert recorded() == []


def test_slurm_script_is_not_overwritten_without_force(recorded, tmp_path, capsys):
  mine = tmp_path / "mine.sh"
  mine.write_text("precious\n")
  with pytest.raises(SystemExit) as e:
    slurm.main(_SLURM + [f"--script={mine}"])
  assert e.value.code == 2 and "was not written by this launcher; pass --force" in capsys.readouterr().err
  assert mine.read_text() == "precious\n" and recorded() == []
  # Its own script (the default path) is replaced on a resubmission; --force replaces the user's file.
  assert slurm.main(_SLURM) == 0 and slurm.main(_SLURM + ["--time=1:00:00"]) == 0
  assert "#SBATCH --time=1:00:00" in (tmp_path / "runs" / "slurm" / "j.sbatch").read_text()
  assert slurm.main(_SLURM + [f"--script={mine}", "--force"]) == 0
  assert mine.read_text().startswith("#!/bin/bash\n# written by launch/slurm.py\n")
  assert recorded() == ["sbatch runs/slurm/j.sbatch"] * 2 + [f"sbatch {mine}"]
  link = tmp_path / "link.sh"
  os.symlink(tmp_path / "target.txt", link)
  (tmp_path / "target.txt").write_text("kept")
  assert slurm.main(_SLURM + [f"--script={link}", "--force"]) == 0
  assert (tmp_path / "target.txt").read_text() == "kept" and not link.is_symlink()


def test_slurm_signal_settings(capsys, tmp_path):
  lines = _dry(slurm, _SLURM + ["--dry-run"], capsys)
  assert "#SBATCH --signal=TERM@180" in lines and "#SBATCH --requeue" not in lines
  assert lines[-2].startswith("exec srun ")
  lines = _dry(slurm, _SLURM + ["--dry-run", "--signal-lead=600", "--requeue"], capsys)
  assert "#SBATCH --signal=TERM@600" in lines
  assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines
  directives = [line for line in lines if line.startswith("#SBATCH")]
  assert lines.index(directives[-1]) < lines.index("set -euo pipefail")  # sbatch stops at the first command
  for lead in ("0", "70000"):
    with pytest.raises(SystemExit):
      slurm.main(_SLURM + ["--dry-run", f"--signal-lead={lead}"])
    assert "--signal-lead" in capsys.readouterr().err


def test_slurm_srun_gets_the_batch_steps_signals(tmp_path, monkeypatch):
  """The script execs srun: a SIGTERM sent to the batch script's process reaches srun (and so the tasks)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_exe(bin_dir / "srun", _TERM_RECORDER)
  script = tmp_path / "s.sbatch"
  script.write_text(slurm.sbatch_script(slurm.build_parser().parse_args(_SLURM)))
  _assert_sigterm_reaches(["bash", str(script)], tmp_path, dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))


# Records SIGTERM, then exits as the trainer does after its checkpoint.
_TERM_RECORDER = """#!/usr/bin/env bash
trap 'echo TERM > "$REC_DIR/term"; exit 0' TERM
echo started > "$REC_DIR/started"
while :; do sleep 0.05; done
"""


def _assert_sigterm_reaches(cmd, tmp_path, env, pid_file=None, cwd=None):
  """Starts `cmd`, sends SIGTERM to its pid (or the pid in `pid_file`), and expects the fake trainer to see it."""
  env = dict(env, REC_DIR=str(tmp_path))
  proc = subprocess.Popen(cmd, env=env, cwd=cwd or tmp_path, start_new_session=True)
  try:
    for _ in range(200):
      if (tmp_path / "started").exists() and (pid_file is None or pid_file.exists()):
        break
      time.sleep(0.05)
    assert (tmp_path / "started").exists(), "the fake trainer never started"
    pid = proc.pid if pid_file is None else int(pid_file.read_text())
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
      if (tmp_path / "term").exists():
        break
      time.sleep(0.05)
    assert (tmp_path / "term").read_text() == "TERM\n"
  finally:
    try:  # the whole session: a fake trainer the signal missed would outlive the test
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait()


def test_tpu_detach_keeps_sigterm(tmp_path, capsys):
  """Under --detach's nohup, SIGTERM to the started process reaches the trainer (it is the exec'd python)."""
  home = _fake_worker_home(tmp_path, _TERM_RECORDER)
  lines = _dry(
    tpu_vm, ["run", "--name=t", "--zone=z", f"--config={CONFIG}", "--workdir=gs://b/r", "--detach", "--dry-run"], capsys
  )
  remote = _flag(shlex.split(lines[0]), "--command")
  pid_file = tmp_path / "pid"
  _assert_sigterm_reaches(
    ["bash", "-c", f"{remote} echo $! > {pid_file}"], tmp_path, dict(os.environ, HOME=str(home)), pid_file, cwd=home
  )


@pytest.mark.parametrize(
  "value,dry", [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("off", False)]
)
def test_local_dry_run_spellings(value, dry, tmp_path):
  fake = tmp_path / "python"
  _write_exe(fake, _RECORDER)
  r = _local([CONFIG, "runs/x", "--config.a=1"], tmp_path, DRY_RUN=value, PYTHON=str(fake))
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "python.argv").exists() != dry
  if dry:
    assert shlex.split(r.stdout) == [str(fake), *_expected_main("runs/x")[1:5], "--config.a=1"]


@pytest.mark.parametrize(
  "args",
  [
    [CONFIG, "runs/x", "--config.a=1", "--dry-run"],
    ["--dry_run=on", CONFIG, "runs/x"],
    [CONFIG, "--dry-run", "runs/x"],
  ],
)
def test_local_dry_run_flag_anywhere(args, tmp_path):
  fake = tmp_path / "python"
  _write_exe(fake, _RECORDER)
  r = _local(args, tmp_path, PYTHON=str(fake))
  assert r.returncode == 0, r.stderr
  assert not (tmp_path / "python.argv").exists() and "--dry" not in r.stdout


@pytest.mark.parametrize("env,args", [({"DRY_RUN": "maybe"}, []), ({}, ["--dry-run=2"]), ({}, ["--dry-run="])])
def test_local_unrecognised_dry_run_value(env, args, tmp_path):
  fake = tmp_path / "python"
  _write_exe(fake, _RECORDER)
  r = _local([CONFIG, "runs/x", *args], tmp_path, PYTHON=str(fake), **env)
  assert r.returncode == 2 and "is not a yes/no value" in r.stderr
  assert not (tmp_path / "python.argv").exists()


def test_tpu_archive_goes_to_a_private_directory_it_removes(recorded, tmp_path):
  """The archive is written in a fresh 0700 directory made for this run, never at a fixed name a planted link
  could hold, and the directory goes once the commands ran; a dry run makes nothing."""
  planted_target = tmp_path / "victim"
  (tmp_path / f"mage-test-{tpu_vm._ARCHIVE}").symlink_to(planted_target)  # pylint: disable=protected-access
  made = []
  real_mkdtemp = tpu_vm.tempfile.mkdtemp

  def mkdtemp(**kw):
    made.append(real_mkdtemp(**kw))
    return made[-1]

  with pytest.MonkeyPatch.context() as m:
    m.setattr(tpu_vm.tempfile, "mkdtemp", mkdtemp)
    assert tpu_vm.main(["setup", "--name=mage-test", "--zone=z", f"--archive-dir={tmp_path}", "--dry-run"]) == 0
    assert made == []
    assert tpu_vm.main(["setup", "--name=mage-test", "--zone=z", f"--archive-dir={tmp_path}"]) == 0
  assert len(made) == 1 and os.path.dirname(made[0]) == str(tmp_path)
  git = [c for c in recorded() if c.startswith("git ")]
  assert git and f"--output={made[0]}/mage-test-{tpu_vm._ARCHIVE}" in git[0]  # pylint: disable=protected-access
  assert not os.path.exists(made[0]) and not planted_target.exists()
