"""Lowers every program a user runs for GPU and TPU, on any machine: no accelerator, nothing allocated.

  python bench/lower.py --platforms=cuda,tpu --size=B --json=lower_B.json
  python bench/lower.py --size=L
  python bench/lower.py --size=tiny --partition          # CI-sized, plus the collectives XLA inserts

Each program of `PROGRAMS` is built as its binary builds it (the ImageNet configs' dtypes, meshes, batch sizes,
remat and tokenizer settings; `--size=tiny` shrinks models, images and batches only), with `jax.ShapeDtypeStruct`
inputs carrying the binary's shardings over a mesh of `--devices` CPU devices, and exported with `jax.export` once
per platform. Per program and platform it records:

  matmuls         matmul/conv FLOPs by operand dtypes and precision (`benchmark.matmul_dtypes`; a scanned or
                  looped body counts once), e.g. 'bf16 x bf16', 'f32 x f32 HIGHEST'
  custom_calls    custom-call targets (e.g. cuDNN attention)
  collectives     collectives written in the program itself; the SPMD partitioner adds the rest when the
                  program is compiled (see --partition)
  host_transfers  infeed/outfeed/send/recv and Python callbacks: a step must have none (the check fails)

A program that needs a device plugin to lower (cuDNN attention: the CUDA plugin) is reported as skipped, with
that reason, where the plugin is missing; the same command on a GPU host lowers it.

`--partition` also compiles each program for the CPU devices and reads the HLO right after XLA's SPMD partitioner,
the pass GPU and TPU share: the collectives it inserts (all-gather, all-reduce, ...) with their operand dtypes.
Later CPU passes rewrite bf16 collectives to float32, so the optimized CPU HLO would mislead. It costs a CPU
compile per program (seconds at tiny, minutes at ViT-B/L).

Exit status: 0 when every program lowered (or was skipped for a missing plugin) without host transfers, 1
otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import importlib
import importlib.util
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

if __package__ in (None, ""):
  # Run as a script: make `bench`, `configs` and `mage_jax` importable from the repository root.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import benchmark  # noqa: E402
from mage_jax.generation import sampling
from mage_jax.train import builders, checkpointing, config_views, params_io, sharding

PLATFORMS = ("cuda", "rocm", "tpu")
SIZES = ("tiny", "B", "L")
# The device plugin a platform needs for programs marked `needs_plugin` (module names, newest first).
PLUGINS = {"cuda": ("jax_cuda13_plugin", "jax_cuda12_plugin")}
COLLECTIVES = tuple(dict.fromkeys(op.replace("-start", "").replace("-", "_") for op in benchmark.COLLECTIVES))
HOST_OPS = ("infeed", "outfeed", "send", "recv")
_OP = re.compile(r"\bstablehlo\.([a-z_]+)")
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w.$\-]+)")
_F32_HIGHEST = re.compile(
  r"stablehlo\.(?:dot_general|convolution)\b.*HIGHEST.*:\s*\(tensor<([\dx]*)f32>,\s*"
  r"tensor<([\dx]*)f32>\)"
)
GENERATE_BATCH_PER_DEVICE = 32
TINY_BATCH_PER_DEVICE = 2
FID_BATCH = 50  # python -m mage_jax.fid's batch; the FID network runs on one device
# Schedules only shape scalars: any lengths lower the same program.
_STEPS, _WARMUP = 1000, 100


# ---------------------------------------------------------------------------------------------------------
# Programs: how each binary builds its jitted function, with abstract inputs.


@dataclasses.dataclass
class Program:
  """One jitted program with abstract, sharded inputs."""

  fn: Callable  # jitted as its binary jits it
  args: tuple  # ShapeDtypeStruct trees (with shardings)
  mesh: Any  # jax.sharding.Mesh, or None for a single-device program
  rules: Any  # flax logical axis rules in force while tracing
  info: dict  # what a reader needs: dtypes, batch, mesh, attention, ...

  @contextlib.contextmanager
  def context(self):
    """The mesh and logical rules the binary traces under."""
    with contextlib.ExitStack() as stack:
      if self.mesh is not None:
        stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(nn.logical_axis_rules(self.rules))
      yield


def _config(module: str, **args):
  """`configs/<module>.py` with `get_config('k=v,...')`."""
  arg = ",".join(f"{k}={v}" for k, v in args.items())
  return importlib.import_module(f"configs.{module}").get_config(arg or None)


def _shrink_tokenizer(tokenizer_cfg, input_cfg) -> None:
  """The benchmark's tiny tokenizer (32 px, 8x8 tokens) in a config's tokenizer/input sections."""
  tiny = benchmark.SIZES["tiny"].tokenizer
  tokenizer_cfg.update({k: getattr(tiny, k) for k in ("ch", "ch_mult", "num_res_blocks", "z_channels")})
  input_cfg.image_size = tiny.resolution


def _batch(size: str, configured: int, devices: int) -> int:
  return TINY_BATCH_PER_DEVICE * devices if size == "tiny" else configured


def apply_overrides(config, overrides: dict):
  """Sets dotted keys ({'model.remat_policy': 'full'}) as `--config.model.remat_policy=full` would."""
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    target = config
    for part in path:
      target = target[part]
    if leaf not in target:
      raise ValueError(f"config override {key}: the config has no such field")
    target[leaf] = value
  return config


def mage_config(module: str, size: str, devices: int, overrides: dict | None = None):
  """A MAGE ImageNet config (pretraining, MAGE-C, class-conditional) at `size`; tiny: tiny MAGE and tokenizer."""
  c = _config(module, variant="B" if size == "tiny" else size)
  if size == "tiny":
    c.model.variant = "tiny"
    c.tokenizer.chunks = 1
    _shrink_tokenizer(c.tokenizer, c.input)
  c.input.batch_size = _batch(size, c.input.batch_size, devices)
  return apply_overrides(c, overrides or {})


def _abstract_vars(module, *init_args, **init_kw):
  return sharding.strip_boxes(jax.eval_shape(functools.partial(module.init, **init_kw), jax.random.key(0), *init_args))


def _replicated(tree, mesh):
  repl = sharding.replicated(mesh)
  return checkpointing.abstract_with_shardings(tree, jax.tree.map(lambda _: repl, tree))


def task_program(task, mesh, rules, info: dict) -> Program:
  """`task`'s (state, extras, batch) step as `trainer.run` jits it, with abstract inputs: state shardings from the
  logical axes of `task.init_state` under `rules`, extras replicated unless `task.extras_shardings`, the batch of
  `task.batch_spec` split over the batch axes."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(task.init_state, jax.random.key(0))
    state_sh = sharding.logical_shardings(boxed, mesh, rules)
  state = checkpointing.abstract_with_shardings(sharding.strip_boxes(boxed), state_sh)
  if task.extras_shardings is None:
    extras = _replicated(task.extras, mesh)
  else:
    extras = checkpointing.abstract_with_shardings(task.extras, task.extras_shardings)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in task.batch_spec.items()}
  return Program(
    sharding.jit_train_step(task.step, state_sh, mesh, task.extras_shardings),
    (state, extras, batch),
    mesh,
    rules,
    {"mesh": dict(mesh.shape), **info},
  )


def job_program(mode: str, config, info: dict, *inputs) -> Program:
  """The step of `mage_jax/jobs/<mode>.py` as its `build_task(config, workdir, *inputs)` builds it (abstract: no
  weights, no data), over schedules of `_STEPS` steps."""
  with config.unlocked():
    config.total_steps = _STEPS
    config.optim.warmup_steps = _WARMUP
  job = importlib.import_module(f"mage_jax.jobs.{mode}")
  with tempfile.TemporaryDirectory() as workdir:
    task, mesh, rules = job.build_task(config, workdir, *inputs, abstract=True)
  return task_program(task, mesh, rules, info)


def _mage_info(config) -> dict:
  m, t = config.model, config.tokenizer
  return {
    "batch": config.input.batch_size,
    "dtype": m.dtype,
    "scan": bool(m.scan),
    "remat": m.remat_policy,
    "attention": m.attention,
    "attn_dropout": m.attn_dropout,
    "tokenizer": f"{t.get('dtype', 'float32')}, precision {t.get('precision', 'highest')}, chunks {t.get('chunks', 1)}",
  }


def pretrain(size: str, devices: int, attention: str = "xla", overrides: dict | None = None) -> Program:
  """`mage_jax.main --config=configs/mage_pretrain.py:variant=B|L` (jobs/pretrain.py's step); `overrides`: dotted
  config keys, e.g. {'model.remat_policy': 'full', 'input.batch_size': 64}."""
  # The fused kernels have no probability dropout; training uses them only without it.
  fused = {} if attention == "xla" else {"model.attn_dropout": 0.0}
  config = mage_config("mage_pretrain", size, devices, {"model.attention": attention, **fused, **(overrides or {})})
  return job_program("pretrain", config, _mage_info(config))


def mage_c(size: str, devices: int) -> Program:
  """`configs/mage_c_imagenet.py` (jobs/mage_c.py): two views per image, MAGE + projection head, NT-Xent."""
  config = mage_config("mage_c_imagenet", size, devices)
  return job_program("mage_c", config, _mage_info(config))


def class_cond(size: str, devices: int) -> Program:
  """`configs/class_cond_imagenet.py` (jobs/class_cond.py): label embedding + decoder on the frozen encoder."""
  config = mage_config("class_cond_imagenet", size, devices)
  return job_program("class_cond", config, _mage_info(config))


def tokenizer(size: str, devices: int) -> Program:
  """`configs/tokenizer_imagenet.py` (jobs/tokenizer.py): VQGAN + discriminator step (GAN, R1, LeCam, LPIPS with
  abstract weights)."""
  from mage_jax.train import (
    config_views as views,  # pylint: disable=g-import-not-at-top
    tokenizer_step,  # pylint: disable=g-import-not-at-top
  )

  config = _config("tokenizer_imagenet", **({"runlocal": True} if size == "tiny" else {}))
  config.input.batch_size = _batch(size, config.input.batch_size, devices)
  if size == "tiny":
    _shrink_tokenizer(config.tokenizer, config.input)
  config.loss.perceptual_weights = "lpips_vgg16.npz"  # the recipe with its LPIPS term; the file is not read
  loss = views.from_config(tokenizer_step.LossConfig, config.loss, "config.loss")
  info = {
    "batch": config.input.batch_size,
    "dtype": config.tokenizer.dtype,
    "discriminator": config.discriminator.dtype,
    "perceptual": "LPIPS-VGG16",
    "gan": loss.gan_type,
    "r1": loss.r1_cost,
    "lecam": loss.lecam_weight,
  }
  return job_program("tokenizer", config, info)


def _checkpoint_meta(size: str, attention: str = "xla") -> dict:
  """The meta of a pretraining export at `size` (`builders.export_params`), which the eval binaries read."""
  config = mage_config("mage_pretrain", size, 1, {"model.attention": attention})
  tok, _ = builders.frozen_tokenizer(config, abstract=True)
  model = builders.mage_model(config, tok)
  return {
    "kind": "mage",
    "model": dataclasses.asdict(dataclasses.replace(model.config, scan=False)),
    "tokenizer": dataclasses.asdict(tok.config),
  }


def generate(size: str, devices: int, dtype: str = "float32", attention: str = "xla") -> Program:
  """`mage_jax.generate --dtype=...`: 20 decoding steps + VQGAN decode + uint8 (sampling.make_sampler)."""
  model, vq = params_io.models_from_meta(_checkpoint_meta(size, attention), config_views.dtype(dtype))
  mesh = sharding.data_mesh()
  batch = (TINY_BATCH_PER_DEVICE if size == "tiny" else GENERATE_BATCH_PER_DEVICE) * mesh.size
  sampler = sampling.make_sampler(model, vq, batch, sampling.DEFAULT_NUM_STEPS, mesh)
  side = 2 ** (len(vq.config.ch_mult) - 1)
  variables = (
    _abstract_vars(model, jnp.zeros((1, model.config.num_tokens), jnp.int32), method="image_token_logits"),
    _abstract_vars(vq, jnp.zeros((1, side, side, 3))),
  )
  scalars = (
    jax.ShapeDtypeStruct((2,), jnp.uint32),
    jax.ShapeDtypeStruct((), jnp.int32),  # key data, batch index
    jax.ShapeDtypeStruct((), jnp.float32),
    jax.ShapeDtypeStruct((), jnp.int32),
  )  # temperature, class id
  info = {
    "batch": batch,
    "dtype": dtype,
    "num_steps": sampling.DEFAULT_NUM_STEPS,
    "attention": model.config.attention,
    "mesh": dict(mesh.shape),
  }
  return Program(sampler, _replicated((*variables, *scalars), mesh), mesh, (), info)


def fid_inception(size: str, devices: int) -> Program:
  """The FID network as `mage_jax.fid` runs it: uint8 images, TF1 bilinear resize to 299, pool3 (one device)."""
  del devices
  from mage_jax.fid import inception, weights  # pylint: disable=g-import-not-at-top

  params = weights.params_from_canonical(
    {k: np.zeros(s, np.float32) for k, s in weights.expected_shapes(with_fc=False).items()}
  )
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  res = benchmark.SIZES[size].tokenizer.resolution
  batch = 4 if size == "tiny" else FID_BATCH
  fn = jax.jit(lambda p, images: inception.pool_features(p, inception.preprocess(images)))
  return Program(
    fn,
    (params, jax.ShapeDtypeStruct((batch, res, res, 3), jnp.uint8)),
    None,
    (),
    {"batch": batch, "dtype": "float32", "image_size": res},
  )


def _backbone(size: str, dtype, global_pool: bool):
  """`probe.load_backbone`'s modules for a pretraining export at `size`, with abstract variables."""
  from mage_jax.evals import probe  # pylint: disable=g-import-not-at-top
  from mage_jax.models.vit import MAGEViT  # pylint: disable=g-import-not-at-top

  meta = _checkpoint_meta(size)
  mcfg = params_io.mage_config_from_meta(meta)
  tok = probe.backbone_tokenizer(params_io.tokenizer_config_from_meta(meta), dtype)
  vit = MAGEViT(mcfg, num_classes=0, global_pool=global_pool, head_type="none", dtype=dtype)
  side = 2 ** (len(tok.config.ch_mult) - 1)
  variables = {
    "tokenizer": _abstract_vars(tok, jnp.zeros((1, side, side, 3))),
    "vit": _abstract_vars(vit, jnp.zeros((1, mcfg.num_tokens), jnp.int32)),
  }
  return probe.Backbone(tok, vit, variables, tok.config.resolution, meta)


def _eval_config(size: str):
  return _config("eval_imagenet", variant="B" if size == "tiny" else size)


def _eval_setup(config, size: str, batch: int):
  """(backbone, mesh, rules, backbone shardings) of `mage_jax.evaluate` with `configs/eval_imagenet.py`."""
  from mage_jax.evals import probe  # pylint: disable=g-import-not-at-top

  backbone = _backbone(size, config_views.dtype(config.dtype), config.global_pool)
  mesh, rules = sharding.mesh_from_config(config)
  sharding.check_batch_size(batch, mesh)
  return backbone, mesh, rules, probe.backbone_shardings(backbone, mesh, rules)


def linear_probe(size: str, devices: int) -> Program:
  """`mage_jax.evaluate` linear probe, the paper protocol (jobs/linear_probe.py): augmented images through the
  frozen backbone (dropout on) + BN/linear head with LARS, on the shared loop."""
  from mage_jax.jobs import linear_probe as job  # pylint: disable=g-import-not-at-top

  config = _eval_config(size)
  lp = config.linear_probe.to_dict()
  dropout = lp.pop("dropout")
  for key in ("augment", "stop_after_epochs"):
    lp.pop(key)
  batch = _batch(size, lp["batch_size"], devices)
  cfg = config_views.from_config(
    job.ProbeConfig,
    lp,
    "config.linear_probe",
    num_classes=config.num_classes,
    seed=config.seed,
    batch_size=batch,
    **({"bn_group_size": 0} if size == "tiny" else {}),
  )
  backbone, mesh, _, shardings = _eval_setup(config, size, batch)
  images = job.OnlineImages(
    {"image_size": backbone.image_size}, backbone.feature_fn(), backbone.variables, shardings, dropout=dropout
  )
  with tempfile.TemporaryDirectory() as workdir:
    task, _ = job.build_task(cfg, workdir, images, None, None, mesh=mesh, dim=backbone.dim, abstract=True)
  info = {"batch": batch, "dtype": config.dtype, "dropout": dropout, "bn_group_size": cfg.bn_group_size}
  # The head state is replicated: the loop runs without logical rules, the backbone where `backbone_shardings`
  # places it.
  return task_program(task, mesh, (), info)


def probe_features(size: str, devices: int) -> Program:
  """`probe.extract_features`: frozen features of a split (validation, cached probes, few-shot)."""
  from mage_jax.evals import probe  # pylint: disable=g-import-not-at-top

  config = _eval_config(size)
  batch = _batch(size, config.input.batch_size, devices)
  backbone, mesh, rules, shardings = _eval_setup(config, size, batch)
  batch_sh = sharding.batch_sharding(mesh)
  fn = probe._extract_fn(backbone.feature_fn(), batch_sh)  # pylint: disable=protected-access
  res = backbone.image_size
  images = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32, sharding=batch_sh)
  return Program(
    fn,
    (checkpointing.abstract_with_shardings(backbone.variables, shardings), images),
    mesh,
    rules,
    {"batch": batch, "dtype": config.dtype, "mesh": dict(mesh.shape)},
  )


def finetune(size: str, devices: int) -> Program:
  """`configs/finetune_imagenet.py` (jobs/finetune.py: Mixup/CutMix, tokenizer, ViT, layer-decayed AdamW)."""
  config = _config("finetune_imagenet", variant="B" if size == "tiny" else size).finetune
  backbone = _backbone(size, config_views.dtype(config.dtype), config.global_pool)
  config.input.batch_size = _batch(size, config.input.batch_size, devices)
  if size == "tiny":
    config.mixup.group_size = 0
  with config.unlocked():
    config.checkpoint_every_steps = config.eval_every_steps = _STEPS
  group = config.mixup.get("group_size", 0)
  info = {
    "batch": config.input.batch_size,
    "dtype": config.dtype,
    "drop_path": config.drop_path,
    "mixup_groups": config.input.batch_size // group if group else 1,
  }
  return job_program("finetune", config, info, backbone)


@dataclasses.dataclass(frozen=True)
class Entry:
  """How to build one program, and where it exists."""

  build: Callable[[str, int], Program]  # (size, devices) -> Program
  only: tuple[str, ...] = ()  # the platforms it exists on (empty: all)
  needs_plugin: tuple[str, ...] = ()  # platforms whose device plugin must be installed to build and lower it
  # Custom-call targets jax.export guarantees no serialization compatibility for (the check is waived for them:
  # nothing exported here is stored).
  unstable_targets: tuple[str, ...] = ()


# Program name -> how to build it: the one place that says how each user-facing program is built.
PROGRAMS: dict[str, Entry] = {
  "pretrain": Entry(pretrain),
  "pretrain_fused": Entry(functools.partial(pretrain, attention="fused")),
  "pretrain_cudnn": Entry(
    functools.partial(pretrain, attention="cudnn"),
    only=("cuda",),
    needs_plugin=("cuda",),
    unstable_targets=("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"),
  ),
  "mage_c": Entry(mage_c),
  "class_cond": Entry(class_cond),
  "tokenizer": Entry(tokenizer),
  "generate": Entry(generate),
  "generate_bf16": Entry(functools.partial(generate, dtype="bfloat16")),
  "generate_cudnn": Entry(
    functools.partial(generate, dtype="bfloat16", attention="cudnn"),
    only=("cuda",),
    needs_plugin=("cuda",),
    unstable_targets=("__cudnn$fmhaSoftmax",),
  ),
  "fid_inception": Entry(fid_inception),
  "linear_probe": Entry(linear_probe),
  "probe_features": Entry(probe_features),
  "finetune": Entry(finetune),
}


# ---------------------------------------------------------------------------------------------------------
# Census of a lowered (StableHLO) program and of the SPMD-partitioned HLO.


def stablehlo_census(text: str) -> dict:
  """Matmul FLOPs by operand dtypes, custom calls, collectives and host transfers of a StableHLO module."""
  ops: dict[str, int] = {}
  for op in _OP.findall(text):
    ops[op] = ops.get(op, 0) + 1
  custom: dict[str, int] = {}
  for target in _CUSTOM_CALL.findall(text):
    custom[target] = custom.get(target, 0) + 1
  callbacks = sum(n for target, n in custom.items() if "callback" in target.lower())
  dims = lambda s: [int(d) for d in s.split("x") if d]
  return {
    "matmuls": benchmark.matmul_dtypes(text),
    # operand shapes of the float32 x float32 HIGHEST products (what a bf16 step should have only for ids)
    "f32_highest": [(dims(lhs), dims(rhs)) for lhs, rhs in _F32_HIGHEST.findall(text)],
    "custom_calls": custom,
    "collectives": {op: ops[op] for op in COLLECTIVES if op in ops},
    "host_transfers": sum(ops.get(op, 0) for op in HOST_OPS) + callbacks,
    "while_loops": ops.get("while", 0),
  }


def skip_reason(entry: Entry, platform: str) -> str | None:
  """Why `entry` does not lower for `platform` here (no such path there, or its device plugin is missing)."""
  if entry.only and platform not in entry.only:
    return f"no such path on {platform} (exists on {', '.join(entry.only)})"
  modules = PLUGINS.get(platform, ())
  if platform in entry.needs_plugin and not any(importlib.util.find_spec(m) is not None for m in modules):
    return (
      f"needs the {platform.upper()} device plugin ({' or '.join(modules)}), which is not installed here: "
      "lower it on a GPU host"
    )
  return None


def export(program: Program, platform: str, unstable_targets=()):
  """`jax.export` of the program for one platform (within the program's mesh and logical rules)."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in unstable_targets]
  with program.context():
    return jax.export.export(program.fn, platforms=(platform,), disabled_checks=checks)(*program.args)


def partitioned_hlo(program: Program) -> str:
  """HLO text of the program right after XLA's SPMD partitioner, compiled for the CPU devices of its mesh."""
  with tempfile.TemporaryDirectory() as dump, program.context():
    lowered = program.fn.lower(*program.args)
    # Nothing after the partitioner matters here: no LLVM optimisation.
    lowered.compile(
      compiler_options={
        "xla_dump_to": dump,
        "xla_dump_hlo_pass_re": "spmd-partitioning",
        "xla_backend_optimization_level": 0,
      }
    )
    files = sorted(glob.glob(os.path.join(dump, "*after_spmd-partitioning*")))
    if not files:
      raise RuntimeError("XLA wrote no HLO after the SPMD partitioner (is the program sharded?)")
    with open(files[-1]) as f:
      return f.read()


def lower_program(program: Program, platforms, partition: bool, unstable_targets=()) -> dict:
  """Exports `program` for each platform; its result row (status per platform, census, seconds)."""
  row: dict[str, Any] = {"info": program.info, "platforms": {}}
  for platform in platforms:
    t0 = time.perf_counter()
    try:
      exported = export(program, platform, unstable_targets)
    except Exception as e:  # pylint: disable=broad-except
      row["platforms"][platform] = {
        "status": "error",
        "error": f"{type(e).__name__}: {str(e)[:2000]}",
        "lower_s": time.perf_counter() - t0,
      }
      continue
    lower_s = time.perf_counter() - t0
    census = stablehlo_census(exported.mlir_module())
    status = "ok" if census["host_transfers"] == 0 else "fail"
    row["platforms"][platform] = {
      "status": status,
      "lower_s": lower_s,
      "devices": exported.nr_devices,
      "serialized_mib": len(exported.mlir_module_serialized) / 2**20,
      **census,
    }
  if partition:
    t0 = time.perf_counter()
    summary = benchmark.hlo_summary(partitioned_hlo(program))
    row["partitioned"] = {
      "collectives": summary["collectives"],
      "collective_dtypes": summary["collective_dtypes"],
      "compile_s": time.perf_counter() - t0,
    }
  return row


def lower_entry(entry: Entry, size: str, devices: int, platforms, partition: bool) -> dict:
  """Builds and lowers one program for the platforms where it exists and can lower here; skips the others."""
  skipped = {p: reason for p in platforms if (reason := skip_reason(entry, p))}
  todo = [p for p in platforms if p not in skipped]
  row: dict[str, Any] = {"platforms": {}}
  if todo:
    t0 = time.perf_counter()
    try:
      program = entry.build(size, devices)
    except Exception as e:  # pylint: disable=broad-except
      return {"error": f"building the program failed: {type(e).__name__}: {str(e)[:2000]}"}
    build_s = time.perf_counter() - t0
    # A program that exists on some platforms only (cuDNN kernels) cannot be compiled for the CPU devices.
    row = {**lower_program(program, todo, partition and not entry.only, entry.unstable_targets), "build_s": build_s}
  row["platforms"].update({p: {"status": "skipped", "reason": reason} for p, reason in skipped.items()})
  return row


def passed(row: dict) -> bool:
  return all(p["status"] in ("ok", "skipped") for p in row["platforms"].values())


# ---------------------------------------------------------------------------------------------------------
# Report and command line.


def _short_matmuls(matmuls: dict) -> str:
  return ", ".join(f"{k} {v['ops']}" for k, v in sorted(matmuls.items(), key=lambda kv: -kv[1]["gflops"]))


def program_lines(name: str, row: dict) -> list[str]:
  """Report lines of one program: a line per platform, and the partitioned collectives when recorded."""
  if "error" in row:
    return [f"{name:15s} {'-':5s} ERROR {row['error'][:300]}"]
  lines = []
  for platform, p in row["platforms"].items():
    if p["status"] == "skipped":
      lines.append(f"{name:15s} {platform:5s} skipped: {p['reason']}")
    elif p["status"] == "error":
      lines.append(f"{name:15s} {platform:5s} ERROR {p['error'][:300]}")
    else:
      extra = [f"custom calls {p['custom_calls']}"] if p["custom_calls"] else []
      if p["host_transfers"]:
        extra.append(f"HOST TRANSFERS {p['host_transfers']}")
      lines.append(
        f"{name:15s} {platform:5s} {p['status']:4s} {p['lower_s']:6.1f} s  "
        + "; ".join([_short_matmuls(p["matmuls"])] + extra)
      )
  if "partitioned" in row:
    lines.append(f"{name:15s} {'spmd':5s} collectives {row['partitioned']['collective_dtypes']}")
  return lines


def format_table(result: dict) -> str:
  head = (
    f"lowered for {', '.join(result['platforms'])} at size {result['size']} on {result['devices']} CPU "
    f"devices (jax {result['jax_version']}); matmul ops by operand dtypes, most FLOPs first"
  )
  return "\n".join([head] + [line for name, row in result["programs"].items() for line in program_lines(name, row)])


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
  )
  p.add_argument("--platforms", default="cuda,tpu", help=f"comma-separated subset of {','.join(PLATFORMS)}")
  p.add_argument("--size", default="tiny", choices=SIZES, help="model/image/batch sizes (B and L: the configs')")
  p.add_argument(
    "--programs", default="", help="comma-separated subset of the programs (default: all): " + ",".join(PROGRAMS)
  )
  p.add_argument("--devices", type=int, default=8, help="CPU devices the configs' meshes are laid over")
  p.add_argument(
    "--partition",
    action="store_true",
    help="also compile on CPU and record the collectives XLA's SPMD partitioner inserts",
  )
  p.add_argument("--json", default="", help="write the results here")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  args = _parser().parse_args(argv)
  args.platforms = [x for x in args.platforms.split(",") if x]
  bad = sorted(set(args.platforms) - set(PLATFORMS))
  if bad or not args.platforms:
    raise ValueError(f"--platforms: unknown {bad or 'empty list'}; expected a subset of {PLATFORMS}")
  args.programs = [x for x in args.programs.split(",") if x] or list(PROGRAMS)
  bad = sorted(set(args.programs) - set(PROGRAMS))
  if bad:
    raise ValueError(f"--programs: unknown {bad}; expected a subset of {list(PROGRAMS)}")
  if args.devices < 1:
    raise ValueError(f"--devices must be >= 1, got {args.devices}")
  return args


def use_cpu_devices(count: int, exact: bool = True) -> None:
  """Lays the meshes over `count` CPU devices (at least `count` unless `exact`); a GPU/TPU host's own devices
  are not used."""
  jax.config.update("jax_platforms", "cpu")
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    pass  # JAX already started in this process (e.g. under pytest): check what it has below
  have = jax.device_count()
  if jax.default_backend() != "cpu" or have < count or (exact and have != count):
    raise ValueError(
      f"{count} CPU devices needed, but this process already runs JAX on {have} "
      f"{jax.default_backend()} device(s): start a new process"
    )


def run(args: argparse.Namespace) -> dict:
  use_cpu_devices(args.devices)
  t0 = time.perf_counter()
  programs = {}
  for name in args.programs:
    programs[name] = lower_entry(PROGRAMS[name], args.size, args.devices, args.platforms, args.partition)
    print("\n".join(program_lines(name, programs[name])), flush=True)
  return {
    "size": args.size,
    "platforms": args.platforms,
    "devices": args.devices,
    "jax_version": jax.__version__,
    "programs": programs,
    "wall_s": time.perf_counter() - t0,
    "ok": all("error" not in row and passed(row) for row in programs.values()),
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  result = run(args)
  print(
    f"{sum('error' not in r and passed(r) for r in result['programs'].values())}/{len(result['programs'])} "
    f"programs lowered without problems in {result['wall_s']:.0f} s",
    flush=True,
  )
  benchmark.write_json(args.json, result)
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  benchmark.run_script(main)
