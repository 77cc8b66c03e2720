"""The checks for one GPU host, in one run of at most ~8 minutes; `bench/device_suite.sh` starts it.

  bash bench/device_suite.sh --out=/tmp/suite         # on the GPU host
  bash bench/device_suite.sh --dry-run                # anywhere: prints the steps, checks paths and flags

Steps, in order of importance (each a subprocess with its own time limit, cut to what is left of `--budget-s`;
a step that fails or runs out of time is recorded and the next one runs):

  device      the accelerator JAX sees (kind, count, memory)
  verify      `python -m mage_jax.verify tests/testdata/official_tiny`: the official fixtures, float32 on the device
  bf16_checks the bf16/TF32 tolerance tests (pytest node ids below) on the device instead of the CPU
  train       20 pretraining steps of the tiny Fashion-MNIST config on random data (`--config.input.name=random`:
              no dataset, no TensorFlow): 10 steps, then a second run resuming from the step-10 checkpoint
  bench_B     `bench/benchmark.py --size=B`: pretraining, generation and tokenizer encode of ViT-B (random weights)
  bench_L     the same for ViT-L (pretraining)
  lower       `bench/lower.py --platforms=cuda` with the CUDA plugin present (the cuDNN attention program)

Everything is written under `--out`: `<step>.log`, the steps' own JSON (`bench_B.json`, ...) and `suite.json`
(per step: command, exit status, seconds, whether it timed out). Packages this host may lack (ml-collections,
clu, pytest and their small dependencies; no network) are installed from `.cache/wheels` (`make wheels` fills it
on a machine with network access); TensorFlow is not needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
  sys.path.insert(0, ROOT)

WHEEL_DIR = os.path.join(ROOT, ".cache", "wheels")
# Module -> distribution installed from WHEEL_DIR when the module is missing.
NEEDED = {"ml_collections": "ml-collections", "clu": "clu", "pytest": "pytest"}
FIXTURES = "tests/testdata/official_tiny"
BF16_TESTS = (
  "tests/test_models.py::test_bf16_compute_keeps_float32_params_and_logits",
  "tests/test_models.py::test_bf16_attention_logits_equal_float32_highest_on_the_same_values",
  "tests/test_contrastive.py::test_nt_xent_bf16_inputs_computed_in_float32",
  "tests/test_discriminator.py::test_bf16_compute_keeps_fp32_params_and_logits",
  "tests/test_bench.py::test_conv_override_reproduces_the_module",
  "tests/test_bench.py::test_tf32_convs_keep_float32_ids",
  "tests/test_bench.py::test_bf16_tokenizer_flips_are_near_ties",
  "tests/test_bench.py::test_bf16_tokenizer_ids_equal_float32",
  "tests/test_bench.py::test_chunked_tokenizer_gives_the_same_ids",
)
TRAIN_CONFIG = "configs/fashion_mnist_tiny.py"


@dataclasses.dataclass
class Step:
  name: str
  argv: list[str]  # after the Python executable
  timeout_s: int
  env: dict = dataclasses.field(default_factory=dict)
  check: str = ""  # what the dry run validates: 'benchmark' | 'lower' | 'main' | 'pytest' | 'path'
  json_out: str = ""  # the step's own results; rows with an 'error' fail the step
  expect: str = ""  # text the log must hold for the step to pass


def _train_argv(workdir: str, steps: int) -> list[str]:
  return [
    "-m",
    "mage_jax.main",
    f"--config={TRAIN_CONFIG}:monitor=False",  # no evaluators: features of random images say nothing
    f"--workdir={workdir}",
    "--config.input.name=random",
    f"--config.total_steps={steps}",
    "--config.optim.warmup_steps=2",
    "--config.log_every_steps=5",
    "--config.checkpoint_every_steps=10",
    "--config.async_checkpoints=False",
  ]


def steps(out: str) -> list[Step]:
  """The suite, in the order it runs."""
  train_dir = os.path.join(out, "train")
  bench = [
    "bench/benchmark.py",
    "--steps=10",
    "--warmup=2",
    "--gen-repeats=2",
    "--encode-repeats=3",
    "--encode-modes=tf32,bfloat16",
  ]
  return [
    Step("device", ["-c", "from bench import device_suite; device_suite.print_device()"], 60),
    Step("verify", ["-m", "mage_jax.verify", FIXTURES], 120, check="path"),
    # conftest.py defaults JAX_PLATFORMS to cpu: name the accelerator explicitly.
    Step(
      "bf16_checks",
      ["-m", "pytest", "-q", "-p", "no:cacheprovider", *BF16_TESTS],
      150,
      env={"JAX_PLATFORMS": "cuda"},
      check="pytest",
    ),
    Step("train", _train_argv(train_dir, 10), 90, check="main"),
    Step("train_resume", _train_argv(train_dir, 20), 90, check="main", expect="resuming from checkpoint step 10"),
    Step(
      "bench_B",
      [*bench, "--size=B", "--workloads=pretrain,generate,encode", f"--json={out}/bench_B.json"],
      180,
      check="benchmark",
      json_out=f"{out}/bench_B.json",
    ),
    Step(
      "bench_L",
      [*bench, "--size=L", "--workloads=pretrain", f"--json={out}/bench_L.json"],
      150,
      check="benchmark",
      json_out=f"{out}/bench_L.json",
    ),
    Step(
      "lower",
      [
        "bench/lower.py",
        "--platforms=cuda",
        "--size=B",
        "--programs=pretrain_cudnn,generate_cudnn,pretrain_fused",
        f"--json={out}/lower_cuda.json",
      ],
      120,
      check="lower",
    ),
  ]


def print_device() -> None:
  """The `device` step: one JSON line on the accelerator JAX sees."""
  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  stats = devices[0].memory_stats() or {}
  print(
    json.dumps(
      {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "count": len(devices),
        "jax": jax.__version__,
        "bytes_limit": stats.get("bytes_limit"),
      }
    )
  )


# ---------------------------------------------------------------------------------------------------------
# Dry run: every path and flag, without launching anything.


def _missing_modules() -> list[str]:
  return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def _wheel_for(dist: str) -> str | None:
  prefix = dist.replace("-", "_").lower() + "-"
  names = sorted(os.listdir(WHEEL_DIR)) if os.path.isdir(WHEEL_DIR) else []
  return next((n for n in names if n.lower().startswith(prefix) and n.endswith(".whl")), None)


def check_step(step: Step, python: str) -> str:
  """Validates one step's paths and flags without running it; returns what was checked (raises on a problem)."""
  if step.check == "path":
    missing = [f for f in ("config.json", "reference.npz") if not os.path.isfile(os.path.join(ROOT, FIXTURES, f))]
    if missing:
      raise ValueError(f"{step.name}: {FIXTURES} lacks {missing}")
    return f"{FIXTURES} holds the fixtures"
  if step.check == "benchmark":
    from bench import benchmark  # pylint: disable=g-import-not-at-top

    benchmark.parse_args(step.argv[1:])
    return "benchmark flags parse"
  if step.check == "lower":
    from bench import lower  # pylint: disable=g-import-not-at-top

    lower.parse_args(step.argv[1:])
    return "lower flags parse"
  if step.check in ("main", "pytest"):
    env = {**os.environ, **step.env}
    if step.check == "main":
      cmd = [python, *step.argv]
      env["MAGE_JAX_PARSE_ONLY"] = "1"  # parses the flags and loads the config with its overrides, runs nothing
    else:
      cmd = [python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *BF16_TESTS]
      env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
      raise ValueError(f"{step.name}: {shlex.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    if step.check == "pytest":
      collected = [line for line in proc.stdout.splitlines() if "::" in line]
      if len(collected) != len(BF16_TESTS):
        raise ValueError(f"{step.name}: {len(collected)} of the {len(BF16_TESTS)} bf16 tests were collected")
      return f"{len(collected)} tests collected"
    return "flags and config parse (MAGE_JAX_PARSE_ONLY=1)"
  return "nothing to check"


def dry_run(out: str, python: str) -> int:
  print(f"dry run: nothing is launched; the suite would write under {out}")
  missing = _missing_modules()
  for module in missing:
    wheel = _wheel_for(NEEDED[module])
    print(f"would install {NEEDED[module]} from {wheel or '(no wheel in .cache/wheels: run `make wheels`)'}")
  problems = []
  for step in steps(out):
    print(
      f"[{step.name}] {' '.join(f'{k}={v}' for k, v in step.env.items())}{' ' if step.env else ''}"
      f"{shlex.join([python, *step.argv])}  (limit {step.timeout_s} s)"
    )
    if step.check in ("main", "pytest") and missing:
      print(f"  not checked here: needs {missing}")
      continue
    try:
      print(f"  ok: {check_step(step, python)}")
    except (ValueError, subprocess.TimeoutExpired) as e:
      problems.append(str(e))
      print(f"  PROBLEM: {e}")
  print(f"dry run: {len(problems)} problem(s)")
  return 1 if problems else 0


# ---------------------------------------------------------------------------------------------------------
# The run.


def install_missing(python: str) -> None:
  """pip-installs the missing NEEDED packages (and their dependencies) from WHEEL_DIR, offline."""
  dists = [NEEDED[m] for m in _missing_modules()]
  if dists:
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", WHEEL_DIR, *dists], check=True)


def run_step(step: Step, out: str, python: str, limit_s: float) -> dict:
  """Runs one step in its own process group (a time-out ends its children too); its record."""
  log = os.path.join(out, f"{step.name}.log")
  t0 = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.Popen(
      [python, *step.argv],
      cwd=ROOT,
      env={**os.environ, **step.env},
      stdout=f,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    try:
      rc, timed_out = proc.wait(timeout=limit_s), False
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      rc, timed_out = proc.wait(), True
  record = {
    "name": step.name,
    "command": shlex.join([python, *step.argv]),
    "env": step.env,
    "rc": rc,
    "timed_out": timed_out,
    "seconds": time.perf_counter() - t0,
    "limit_s": limit_s,
    "log": log,
    "errors": _result_errors(step.json_out),
  }
  if step.expect:
    with open(log) as f:
      if step.expect not in f.read():
        record["errors"].append(f"the log lacks {step.expect!r}")
  record["passed"] = rc == 0 and not record["errors"]
  print(
    f"[{step.name}] {'TIMED OUT' if timed_out else 'rc ' + str(rc)} in {record['seconds']:.0f} s"
    f"{'; errors: ' + '; '.join(record['errors']) if record['errors'] else ''}",
    flush=True,
  )
  return record


def _result_errors(path: str) -> list[str]:
  """The 'error' rows of a benchmark JSON (the benchmark records a failing workload and goes on)."""
  if not path or not os.path.isfile(path):
    return []
  with open(path) as f:
    rows = json.load(f).get("results", [])
  return [f"{r.get('size')}/{r.get('workload')}: {r['error'][:300]}" for r in rows if "error" in r]


def run(out: str, python: str, budget_s: float, force: bool) -> int:
  if os.path.isdir(out) and os.listdir(out):
    if not force:
      raise ValueError(f"--out {out} is not empty (a previous suite?); pass --force to run there again")
    shutil.rmtree(os.path.join(out, "train"), ignore_errors=True)  # the step-10 checkpoint must be this run's
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  install_missing(python)
  records = []
  for step in steps(out):
    left = budget_s - (time.perf_counter() - start)
    if left < 10:
      records.append({"name": step.name, "skipped": "suite time budget spent"})
      continue
    records.append(run_step(step, out, python, min(step.timeout_s, left)))
  summary = {
    "out": out,
    "seconds": time.perf_counter() - start,
    "budget_s": budget_s,
    "steps": records,
    "passed": all(r.get("passed") for r in records),
  }
  with open(os.path.join(out, "suite.json"), "w") as f:
    json.dump(summary, f, indent=1)
  passed = sum(bool(r.get("passed")) for r in records)
  print(f"suite: {passed}/{len(records)} steps passed in {summary['seconds']:.0f} s; {out}/suite.json")
  return 0 if summary["passed"] else 1


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
  )
  p.add_argument(
    "--out",
    default=os.environ.get("OUT", "device_suite_out"),
    help="output folder (default: $OUT, else ./device_suite_out)",
  )
  p.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget of all steps together")
  p.add_argument(
    "--dry-run", action="store_true", help="print the steps and check their paths and flags; launch nothing"
  )
  p.add_argument("--force", action="store_true", help="run in a non-empty --out (its train/ folder is replaced)")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.budget_s <= 0:
    raise ValueError(f"--budget-s must be positive, got {args.budget_s}")
  out = os.path.abspath(args.out)
  if args.dry_run:
    return dry_run(out, sys.executable)
  return run(out, sys.executable, args.budget_s, args.force)


if __name__ == "__main__":
  try:
    sys.exit(main())
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
