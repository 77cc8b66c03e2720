"""Shared config pieces. `get_config(arg)` strings are parsed by `parse_arg` (big_vision style)."""

import ml_collections


def parse_arg(arg, **defaults):
  """'variant=B,runlocal' -> ConfigDict with values typed like `defaults`; a bare name means True.

  Unknown keys are an error, so a typo never silently falls back to a default.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not eq and not isinstance(default, bool):
      raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
    if not eq:
      value = True
    elif isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None:
      try:
        value = type(default)(value)
      except ValueError:
        raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__}") from None
    result[key] = value
  return result


MESH = "data=-1,fsdp=1,model=1"


def optional_str():
  """A string field whose default is None and which the command line can still set (--config.x=/path)."""
  return ml_collections.FieldReference(None, field_type=str)


def mesh(fsdp: int = 1) -> str:
  """`config.mesh`: data parallel over the remaining devices, `fsdp`-way parameter sharding (`train/sharding.py`)."""
  return f"data=-1,fsdp={fsdp},model=1"


def base_pretrain_config():
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"
  c.seed = 0
  c.input = ml_collections.ConfigDict(
    dict(
      name="imagenet2012",
      split="train",
      data_dir=optional_str(),
      manual_dir=optional_str(),
      batch_size=4096,
      image_size=256,
      augment="pretrain",
      interpolation="bicubic",
      num_workers=0,
      download=False,
      views=1,
      tokens="",
    )
  )  # tokens: a token cache (configs/cache_tokens.py) to train on instead of images
  # attention: 'xla' | 'fused' (jax.nn.dot_product_attention) | 'cudnn' (its cuDNN kernel, NVIDIA GPUs); the fused
  # kinds need attn_dropout=0 to be used in training.
  c.model = ml_collections.ConfigDict(
    dict(
      variant="B",
      dtype="bfloat16",
      param_dtype="float32",
      dropout=0.1,
      attn_dropout=0.1,
      scan=False,
      remat_policy="none",
      attention="xla",
    )
  )
  # The frozen tokenizer: a params dir (converted vqgan_jax_strongaug.ckpt, or trained with mode=tokenizer).
  # The sizes below are used only when init is empty (random frozen tokenizer, for smoke tests).
  # dtype/precision/chunks: how the frozen tokenizer runs inside the step. precision 'high' (TF32 on GPUs,
  # bf16x3 on TPUs) keeps the float32 ids on the fixtures; bf16 dtype does not. chunks > 1 encodes the batch
  # in slices to bound activation memory (ViT-L at batch 4096).
  c.tokenizer = ml_collections.ConfigDict(
    dict(
      init="",
      ch=128,
      ch_mult=(1, 1, 2, 2, 4),
      num_res_blocks=2,
      z_channels=256,
      codebook_size=1024,
      dtype="float32",
      precision="highest",
      chunks=1,
    )
  )
  # law: the masking ratio's distribution, a name in mage_jax.objectives.masking.RATIO_LAWS (MAGE's truncated
  # Gaussian; 'uniform' and MaskGIT's 'cosine' use only the bounds).
  c.masking = ml_collections.ConfigDict(
    dict(law="truncated_gaussian", min_ratio=0.5, max_ratio=1.0, mu=0.55, std=0.25, drop_ratio=0.5)
  )
  c.label_smoothing = 0.1
  c.optim = ml_collections.ConfigDict(
    dict(
      blr=1.5e-4,
      b1=0.9,
      b2=0.95,
      weight_decay=0.05,
      grad_clip_norm=3.0,
      warmup_epochs=40.0,
      warmup_steps=-1,
      min_lr=0.0,
    )
  )
  c.total_epochs = 1600.0
  c.total_steps = 0  # > 0 overrides total_epochs
  c.mesh = MESH
  c.num_devices = 0  # 0: all devices of all processes
  c.sharding_rules = ""  # changes to sharding.DEFAULT_RULES, e.g. "embed=,mlp=fsdp"
  c.model_init = ""  # params-only checkpoint to start from (e.g. converted weights)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.nonfinite = "stop"  # or 'skip': drop non-finite updates and count them
  c.corrupt_checkpoint = "fallback"  # newest checkpoint unreadable: resume from the newest intact one, or 'refuse'
  # Multi-process runs (jax.distributed.initialize): how long to wait for every process to join, after how many
  # seconds without heartbeats a process counts as dead (the others then exit naming it), and how long an
  # exiting process waits for the others. See docs/faults.md.
  c.distributed = ml_collections.ConfigDict(
    dict(initialization_timeout=300, heartbeat_timeout_seconds=100, shutdown_timeout_seconds=300)
  )
  c.profile_steps = 0
  # What to measure during training, by name: dict(type=<mage_jax/evals module>, every_steps=N, **settings), each
  # also at the last step (see mage_jax/evals/__init__.py). None here.
  c.evals = ml_collections.ConfigDict()
  return c


def samples_section(reference: str, **overrides) -> ml_collections.ConfigDict:
  """An eval config's `samples`: the settings of the sample evaluators ('fid', 'sfid', 'precision_recall',
  'sample_grid' in `evals`, mage_jax/evals/samples.py); by default the official protocol, 50,000 images of 20
  steps at temperature 6.0."""
  return ml_collections.ConfigDict(
    dict(
      num_images=50_000,
      batch_size=64,
      num_steps=20,
      temperature=6.0,
      seed=0,
      reference=reference,
      reference_images=0,
      weights="",
      inception_batch=64,
      cols=8,
    )
    | overrides
  )
