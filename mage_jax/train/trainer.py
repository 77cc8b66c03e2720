"""The training loop every job shares: MAGE pretraining, MAGE-C, class-conditional, tokenizer training,
fine-tuning and the linear probe.

A job describes itself as a `Task` (how to build its sharded state, its step, where its batches come from,
what it exports); `run` does the rest: mesh and logical shardings, state initialised directly sharded,
resume from the latest checkpoint, the jitted step with donated state, deterministic data from the resumed
step, progress/metrics/profiling (`progress`: clu's, or log-only where TensorFlow is missing), evaluations,
async orbax checkpoints, SIGTERM handling, non-finite checks, export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import parameter_overview

from mage_jax.system import atomic
from mage_jax.train import checkpointing, preemption, progress, sharding


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One measurement during training: `run(state, step) -> dict of scalars` (on every process), after every
  `every_steps` steps (0: at the end only) and at the last step; written as `eval/<name>/<key>`."""

  name: str
  run: Callable[[Any, int], dict]
  every_steps: int = 0

  def due(self, step: int, total_steps: int) -> bool:
    return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)


@dataclasses.dataclass
class Task:
  """A training job.

  Attributes:
    init_state: rng key -> state (params may be boxed with logical axis names). The state is a
      flax.struct.dataclass with at least `step`, `params`, `first_nonfinite_step`, `skipped_steps`.
    step: (state, extras, batch) -> (state, metrics dict of scalars). Pure; jitted here.
    extras: arrays the step reads but never updates (e.g. the frozen tokenizer); not donated.
    data: start step -> iterator of this process's slices of the global batches start, start+1, ... (numpy
      dicts); a pure function of the step, so a resumed run sees the batches an uninterrupted one would.
    batch_spec: {key: (global shape, dtype)} of the batch entries the step receives (the others are not sent):
      also what `bench/lower.py`, the memory plans and the benchmark feed the step without data.
    total_steps: number of steps of the run (what the schedules span).
    extras_shardings: shardings of `extras` (default: replicated).
    stop_step: stop at this step with a checkpoint, before `total_steps` (chunked jobs); None: run to the end.
    export: called with the final state on every process once the run reaches `total_steps` (e.g. a params-only
      export).
    initial_params: optional host params to start from (replaces the initialised params on a fresh run); a
      dict holding some of the params' top-level entries replaces those only (e.g. a trained generator beside
      a freshly initialised discriminator).
    reinit_after_params: state -> state, re-derives what depends on params (e.g. optimizer state).
    evaluators: what to measure during training (`Evaluator`s; `evals.during_training` builds them from a
      config's `evals` list), each on its own cadence and at the end.
  """

  init_state: Callable[[jax.Array], Any]
  step: Callable[..., tuple[Any, dict]]
  extras: Any
  data: Callable[[int], Iterator[dict]]
  batch_spec: dict
  total_steps: int
  extras_shardings: Any = None
  stop_step: int | None = None
  export: Callable[[Any], None] | None = None
  initial_params: Any = None
  reinit_after_params: Callable[[Any], Any] | None = None
  evaluators: tuple[Evaluator, ...] = ()


# Every job (`mage_jax/jobs/<mode>.py`) exposes `build_task(config, workdir, *, abstract=False) -> (Task, mesh,
# rules)`: all of the job but the loop. `abstract=True` builds the same step and state without reading a file or a
# dataset (the frozen tokenizer and any initial params are shapes only; no data, evaluator or export), which is
# what lowering for other platforms, memory plans and benchmarks need: what they measure is what runs.


@dataclasses.dataclass(frozen=True)
class Loop:
  """The loop's own settings: the top-level keys of a job config that `run` reads (`Loop.of`), or built directly
  by a job without one (the linear probe)."""

  seed: int
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  async_checkpoints: bool = True
  nonfinite: str = "stop"  # 'stop' | 'skip' a step with a non-finite loss or gradient
  corrupt_checkpoint: str = "fallback"  # newest checkpoint unreadable: resume from the newest intact one, or 'refuse'
  profile_steps: int = 0
  hparams: dict = dataclasses.field(default_factory=dict)  # what TensorBoard records beside the loop settings

  def __post_init__(self):
    if self.nonfinite not in ("stop", "skip"):
      raise ValueError(f"config.nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")

  @classmethod
  def settings_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "hparams"]

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "Loop":
    return cls(**{k: config[k] for k in cls.settings_names() if k in config}, hparams=config.to_dict())

  def record(self) -> dict:
    """What TensorBoard records: the loop settings, then `hparams` (a job config repeats them)."""
    return {**{k: getattr(self, k) for k in self.settings_names()}, **self.hparams}


def mesh_and_rules(config: ml_collections.ConfigDict):
  """The mesh and logical-axis rules of a training config, checked against its global batch."""
  mesh, rules = sharding.mesh_from_config(config)
  sharding.check_batch_size(config.input.batch_size, mesh)
  return mesh, rules


def image_batch_spec(config: ml_collections.ConfigDict, **extra_dtypes) -> dict:
  """`Task.batch_spec` of an image job: `config.input.views` images of each example (one: no view axis), plus one
  value per example for each `extra_dtypes` key (e.g. label=jnp.int32)."""
  res, b, views = config.input.image_size, config.input.batch_size, config.input.get("views", 1)
  image = (b, res, res, 3) if views == 1 else (b, views, res, res, 3)
  return {"image": (image, jnp.float32), **{k: ((b,), dtype) for k, dtype in extra_dtypes.items()}}


def no_data(start_step: int):
  raise RuntimeError(f"an abstract task has no data (asked from step {start_step}); build it with abstract=False")


def image_data(config: ml_collections.ConfigDict, abstract: bool = False) -> Callable[[int], Iterator[dict]]:
  """`Task.data` for the configured input pipeline (`config.input`, seeded by `config.seed`)."""
  if abstract:
    return no_data
  from mage_jax.data import pipeline  # TensorFlow only where an input pipeline is built

  source = pipeline.make_source(config.input)

  def data(start_step: int):
    return pipeline.train_iterator(
      config.input,
      seed=config.seed,
      start_step=start_step,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      source=source,
    )

  return data


def schedule_steps(config, steps_per_epoch: int | Callable[[], int]) -> tuple[int, int]:
  """(total, warmup) steps from `total_steps|total_epochs` and `optim.warmup_steps|warmup_epochs`.

  `total_steps` 0 means "use total_epochs"; a negative value is an error, not a silent fallback.
  `steps_per_epoch` may be a function, called only when an epoch count is used (it reads the dataset).
  """
  if callable(steps_per_epoch):
    uses_epochs = config.get("total_steps", 0) <= 0 or config.optim.get("warmup_steps", -1) < 0
    steps_per_epoch = steps_per_epoch() if uses_epochs else 0
  if config.get("total_steps", 0) < 0 or config.get("total_epochs", 0) < 0:
    raise ValueError(
      f"total_steps ({config.get('total_steps')}) and total_epochs ({config.get('total_epochs')}) "
      "must be >= 0 (total_steps 0: run total_epochs)"
    )
  total = config.total_steps if config.get("total_steps", 0) > 0 else int(config.total_epochs * steps_per_epoch)
  warmup = (
    config.optim.warmup_steps
    if config.optim.get("warmup_steps", -1) >= 0
    else int(config.optim.get("warmup_epochs", 0) * steps_per_epoch)
  )
  if total <= 0:
    raise ValueError("set total_steps or total_epochs to a positive number")
  return total, min(warmup, total)


class History:
  """Evaluation results by step in a JSON file (process 0 writes), kept across resumes: a resumed run
  replaces the entries at and after the step it records."""

  def __init__(self, path: str):
    self.path = path

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return json.load(f)

  def record(self, step: int, result: dict) -> list[dict]:
    history = [h for h in self.read() if h["step"] < step] + [{"step": int(step), **result}]
    if jax.process_index() == 0:
      atomic.write_json(self.path, history, indent=1)
    return history


def check_finite(state, loop: Loop, mngr):
  """Stops (or, with nonfinite='skip', just reports) once any step had a non-finite loss or gradient."""
  first_bad = int(jax.device_get(state.first_nonfinite_step))
  if first_bad < 0:
    return
  skipped = int(jax.device_get(state.skipped_steps))
  if loop.nonfinite == "skip":
    logging.warning("%d steps skipped so far for non-finite loss/gradients (first at step %d)", skipped, first_bad)
    return
  raise FloatingPointError(
    f"non-finite loss or gradient at step {first_bad}; stopping (nonfinite='stop'). That update was not "
    f"applied and the last checkpoint (step {checkpointing.latest_step(mngr)}) is intact. Set "
    "--config.nonfinite=skip to skip such updates instead."
  )


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float, str, bool)):
      out[f"{prefix}{k}"] = v
  return out


def run(config: ml_collections.ConfigDict | Loop, workdir: str, task: Task, mesh, rules) -> tuple[dict, Any]:
  """Runs (or resumes) `task` in `workdir` with the loop settings of `config` (a job config, recorded in the
  workdir, or a `Loop`).

  Returns:
    (the last logged metrics as host floats, the final state).
  """
  loop = config if isinstance(config, Loop) else Loop.of(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  writer = progress.writer(workdir, is_main)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(task.init_state, jax.random.key(loop.seed))
    state_shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = sharding.strip_boxes(boxed)
    repl = sharding.replicated(mesh)
    extras_shardings = repl if task.extras_shardings is None else task.extras_shardings
    extras = sharding.place(task.extras, extras_shardings)

    mngr = checkpointing.manager(workdir, keep=loop.keep_checkpoints, async_save=loop.async_checkpoints)
    resumed = checkpointing.restore_newest(
      mngr,
      checkpointing.abstract_with_shardings(abstract, state_shardings),
      corrupt=loop.corrupt_checkpoint,
    )
    if resumed is not None:
      logging.info("resuming from checkpoint step %d", resumed[0])
      state = resumed[1]
    else:
      state = jax.jit(lambda r: sharding.strip_boxes(task.init_state(r)), out_shardings=state_shardings)(
        jax.random.key(loop.seed)
      )
      if task.initial_params is not None:
        init, params_shardings = task.initial_params, state_shardings.params
        if isinstance(init, dict) and set(init) < set(state.params):  # some entries: the others stay fresh
          state = state.replace(params={**state.params, **jax.device_put(init, {k: params_shardings[k] for k in init})})
        else:
          state = state.replace(params=jax.device_put(init, params_shardings))
        if task.reinit_after_params is not None:
          state = jax.jit(task.reinit_after_params, out_shardings=state_shardings)(state)
    start_step = int(jax.device_get(state.step))
    if start_step > task.total_steps:
      raise ValueError(
        f"the checkpoint in {workdir} is at step {start_step}, past this run's {task.total_steps} "
        "steps: raise total_steps (or total_epochs) to continue it, or use a new workdir"
      )
    if not isinstance(config, Loop) and "mode" in config:  # a job's own config, as `main` ran it
      atomic.record_config(config, workdir)
    if is_main:
      parameter_overview.log_parameter_overview(jax.device_get(state.params))
      writer.write_hparams(_flatten(loop.record()))

    step_fn = sharding.jit_train_step(task.step, state_shardings, mesh, extras_shardings)
    end_step = task.total_steps if task.stop_step is None else min(task.stop_step, task.total_steps)
    data = task.data(start_step) if start_step < end_step else iter(())
    hooks = progress.training_hooks(
      end_step,
      writer,
      loop.log_every_steps,
      profile_dir=workdir if is_main else None,
      profile_steps=loop.profile_steps,
      first_profile=start_step + 5,
    )
    stop = preemption.Stop(mesh)
    last_metrics: dict = {}
    try:
      for step in range(start_step, end_step):
        local = next(data)
        batch = sharding.global_batch({k: local[k] for k in task.batch_spec}, mesh)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = step_fn(state, extras, batch)
        if step == start_step:
          jax.block_until_ready(state.step)
          stop.reinstall()
        done = step + 1
        for hook in hooks:
          hook(done)
        # Asked once per step on every process (a collective), and read once: a signal landing between two reads
        # would skip the save but still exit.
        preempted = stop.reached()
        save_now = done % loop.checkpoint_every_steps == 0 or done == end_step or preempted
        if done % loop.log_every_steps == 0 or save_now:
          check_finite(state, loop, mngr)
          last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          last_metrics["skipped_steps"] = int(jax.device_get(state.skipped_steps))
          writer.write_scalars(done, {f"train/{k}": v for k, v in last_metrics.items()})
        for evaluator in task.evaluators:
          if evaluator.due(done, task.total_steps):
            with hooks[0].timed("eval"):
              measured = {f"eval/{evaluator.name}/{k}": v for k, v in evaluator.run(state, done).items()}
            if measured:  # an evaluator may only write files (a sample grid)
              writer.write_scalars(done, measured)
            last_metrics.update(measured)
        if save_now:
          checkpointing.save(mngr, done, state, force=True)
        if preempted:
          checkpointing.seal(mngr)
          logging.warning(
            "checkpoint %d written after %s; exiting",
            done,
            stop.signal.name if stop.signal else "a signal to another process",
          )
          break
    finally:
      stop.restore()
      checkpointing.seal(mngr)
      writer.flush()
    if int(jax.device_get(state.step)) == task.total_steps and task.export is not None:
      task.export(state)
    mngr.close()
  if stop.signal == signal.SIGINT:
    raise KeyboardInterrupt  # after its checkpoint, a Ctrl-C ends the binary like any other (status 130)
  return last_metrics, state
