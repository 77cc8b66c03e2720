"""bench/step_profile.py: HLO metadata -> parts of the model, trace events -> thread time, and one tiny run."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from bench import step_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = "jit(step)/jvp(MAGE)/MAGE.encode/blocks_0"
BACK = "jit(step)/transpose(jvp(MAGE))/MAGE.decode/MAGE.decoder_head/decoder_blocks_1"


@pytest.mark.parametrize(
  "op_name, path, function, expected",
  [
    ("jit(step)/jvp(MAGE)/MAGE.decode/MAGE.decoder_head/mlm_layer/fc/dot_general", "", "", "MLM head"),
    ("jit(step)/jvp(MAGE)/MAGE.decode/MAGE.decoder_head/mlm_layer/ln/mul", "", "", "MLM head"),
    ("jit(step)/jvp(jit(log_softmax))/exp", "", "", "MLM head"),
    (
      "jit(step)/transpose(jvp())/broadcast_in_dim",
      "/r/mage_jax/objectives/losses.py",
      "smoothed_cross_entropy",
      "MLM head",
    ),
    (f"{STEP}/attn/bhqd,bhkd->bhqk/dot_general", "", "", "attention"),
    (f"{BACK}/attn/transpose", "", "", "attention"),
    (f"{STEP}/attn/div", "", "", "attention"),
    (f"{STEP}/attn/qkv/dot_general", "", "", "dense matmuls"),
    (f"{BACK}/attn/proj/transpose", "", "", "dense matmuls"),
    (f"{BACK}/mlp/fc2/transpose", "", "", "dense matmuls"),
    ("jit(step)/jvp(MAGE)/MAGE.decode/MAGE.decoder_input/decoder_embed/add", "", "", "dense matmuls"),
    (f"{STEP}/mlp/erf", "", "", "GELU"),
    (f"{BACK}/mlp/mul", "/r/mage_jax/models/layers.py", "gelu", "GELU"),
    (f"{STEP}/norm2/reduce_sum", "", "", "LayerNorm"),
    ("jit(step)/jvp(MAGE)/MAGE.encode/token_emb/LayerNorm/mul", "", "", "LayerNorm"),
    ("jit(step)/jvp(MAGE)/MAGE.decode/MAGE.decoder_head/decoder_norm/add", "", "", "LayerNorm"),
    ("jit(step)/pow", "/v/site-packages/optax/_src/transform.py", "scale_by_adam.<locals>.update_fn", "optimizer"),
    ("jit(step)/jit(_where)/select_n", "/r/mage_jax/train/steps.py", "commit.<locals>.<lambda>", "optimizer"),
    ("jit(step)/jit(argsort)/sort", "/r/mage_jax/objectives/masking.py", "sample_plan", None),
    (
      "jit(step)/jvp(MAGE)/MAGE.encode/token_emb/word_embeddings/jit(_take)/gather",
      "/v/flax/linen/linear.py",
      "Embed.__call__",
      None,
    ),
    ("jit(step)/add", "/r/mage_jax/train/steps.py", "pretrain_update", None),
    (f"{STEP}/add", "", "", None),
    # merged instructions: the first part named wins
    (f"{STEP}/add;{STEP}/attn/transpose", "", "", "attention"),
  ],
)
def test_classify(op_name, path, function, expected):
  assert step_profile.classify(op_name, path, function) == expected


# XLA's HLO text as it prints it: step_profile parses it a line at a time, so its long lines stay whole.
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8,64]{1,0})->f32[8,256]{1,0}}

FileNames
1 "/r/mage_jax/models/layers.py"
2 "/v/site-packages/optax/_src/transform.py"

FunctionNames
1 "gelu"
2 "scale_by_adam.<locals>.update_fn"

FileLocations
1 {file_name_id=1 function_name_id=1 line=35 end_line=35 column=9 end_column=16}
2 {file_name_id=2 function_name_id=2 line=284 end_line=284 column=9 end_column=73}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}

%fused_computation.1 (param_0.1: f32[8,256]) -> f32[8,256] {
  %param_0.1 = f32[8,256]{1,0} parameter(0)
  %constant.1 = f32[] constant(0.7071)
  %broadcast.1 = f32[8,256]{1,0} broadcast(%constant.1), dimensions={}
  %multiply.1 = f32[8,256]{1,0} multiply(%param_0.1, %broadcast.1), metadata={op_name="jit(step)/jvp(MAGE)/MAGE.encode/blocks_0/mlp/mul" stack_frame_id=1}
  ROOT %erf.1 = f32[8,256]{1,0} erf(%multiply.1), metadata={op_name="jit(step)/jvp(MAGE)/MAGE.encode/blocks_0/mlp/erf" stack_frame_id=1}
}

%wrapped_broadcast_computation.2 (param_0.2: f32[]) -> f32[8,4,9,9] {
  %param_0.2 = f32[] parameter(0)
  ROOT %broadcast.2 = f32[8,4,9,9]{3,2,1,0} broadcast(%param_0.2), dimensions={}
}

%fused_computation.3 (param_0.3: f32[8,4,9,9]) -> f32[8,4,9,9] {
  %param_0.3 = f32[8,4,9,9]{3,2,1,0} parameter(0)
  ROOT %exponential.3 = f32[8,4,9,9]{3,2,1,0} exponential(%param_0.3), metadata={op_name="jit(step)/jvp(MAGE)/MAGE.encode/blocks_0/attn/exp"}
}

ENTRY %main.9 (p0: f32[8,64], p1: f32[64,256], p2: f32[64]) -> (f32[8,256], f32[]) {
  %p0 = f32[8,64]{1,0} parameter(0)
  %p1 = f32[64,256]{1,0} parameter(1)
  %p2 = f32[64]{0} parameter(2)
  %constant.4 = f32[] constant(0)
  %dot.3 = f32[8,256]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp(MAGE)/MAGE.encode/blocks_0/mlp/fc1/dot_general"}
  %multiply_erf_fusion = f32[8,256]{1,0} fusion(%dot.3), kind=kLoop, calls=%fused_computation.1
  %wrapped_broadcast.2 = f32[8,4,9,9]{3,2,1,0} fusion(%constant.4), kind=kLoop, calls=%wrapped_broadcast_computation.2
  %exp_fusion = f32[8,4,9,9]{3,2,1,0} fusion(%wrapped_broadcast.2), kind=kLoop, calls=%fused_computation.3
  %tuple.5 = (s32[], f32[8,256]{1,0}) tuple(%constant.4, %multiply_erf_fusion)
  %while.6 = (s32[], f32[8,256]{1,0}) while(%tuple.5), condition=%cond, body=%body, metadata={op_name="jit(step)/jit(_uniform)/while"}
  %copy.7 = f32[64]{0} copy(%p2)
  %power.8 = f32[] power(%constant.4, %constant.4), metadata={op_name="jit(step)/pow" stack_frame_id=2}
  %reduce.9 = f32[8] reduce(%dot.3, %constant.4), dimensions={1}, to_apply=%max, metadata={op_name="jit(step)/jvp(jit(log_softmax))/reduce_max"}
  ROOT %tuple.10 = (f32[8,256]{1,0}, f32[]) tuple(%multiply_erf_fusion, %power.8)
}
"""  # noqa: E501


def test_hlo_metadata_to_parts():
  hlo = step_profile.parse_hlo(HLO)
  assert step_profile.module_name(HLO) == "jit_step"
  while_ = hlo.instructions["while.6"]
  assert while_.opcode == "while" and while_.op_name == "jit(step)/jit(_uniform)/while"  # a tuple result type
  assert hlo.instructions["power.8"].path.endswith("optax/_src/transform.py")
  assert hlo.instructions["multiply_erf_fusion"].calls == "fused_computation.1"
  assert hlo.users["wrapped_broadcast.2"] == ["exp_fusion"]
  parts = {
    name: hlo.category(name)
    for name in (
      "dot.3",
      "multiply_erf_fusion",
      "wrapped_broadcast.2",
      "exp_fusion",
      "while.6",
      "copy.7",
      "power.8",
      "reduce.9",
      "not_in_the_module",
    )
  }
  assert parts == {
    "dot.3": "dense matmuls",
    "multiply_erf_fusion": "GELU",  # no metadata of its own: its fused instructions'
    "wrapped_broadcast.2": "attention",  # no metadata at all: its user's
    "exp_fusion": "attention",
    "while.6": "other",  # metadata naming no part
    "copy.7": "other",  # no metadata, no users
    "power.8": "optimizer",  # its stack frame's file
    "reduce.9": "MLM head",
    "not_in_the_module": "other",
  }


def _x(tid, ts, dur, name, **args):
  return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def _op(tid, ts, dur, name, run, producer, module="jit_step"):
  return _x(tid, ts, dur, name, hlo_op=name, hlo_module=module, run_id=run, _p=producer)


def _events():
  """Two executions of jit_step on three threads. In run 1 dot.1 schedules pool task 7 on thread B, which
  schedules task 8 on thread C; thread B also runs fusion.4 inside task 7; dot.1 completes at 40."""
  s, e, r = step_profile.START, step_profile.STOP, step_profile.RECORD
  return [
    _x("python", -1, 0, r, _p=1),
    _x("A", 0, 0, s, _c=1),
    _op("A", 1, 2, "dot.1", "1", 100),
    _x("A", 2, 0, r, _p=7),
    _op("A", 50, 20, "while.2", "1", 101),
    _op("A", 55, 5, "add.3", "1", 102),
    _x("A", 59.9, 0.05, "end: add.3", _c=102),
    _x("A", 69.9, 0.05, "end: while.2", _c=101),
    _x("A", 71, 0, e),
    _x("B", 5, 0, s, _c=7),
    _x("B", 10, 0, r, _p=8),
    _op("B", 20, 5, "fusion.4", "1", 103),
    _x("B", 24.9, 0.05, "end: fusion.4", _c=103),
    _x("B", 40, 0, "end: dot.1", _c=100),
    _x("B", 46, 0, e),
    _x("C", 11, 0, s, _c=8),
    _x("C", 21, 0, e),
    _op("A", 100, 30, "dot.1", "2", 200),
    _x("A", 129.9, 0.05, "end: dot.1", _c=200),
    _op("A", 200, 50, "dot.1", "9", 300, module="jit_other"),  # another executable: ignored
  ]


def test_attribution_charges_pool_tasks_to_the_thunk_that_scheduled_them():
  a = step_profile.attribute(_events(), "jit_step")
  assert a.linked and a.runs == ["1", "2"]
  # dot.1, run 1: its event (2) + task 7 outside fusion.4 up to its completion (5..20, 25..40) + task 8 (11..21)
  assert a.op_us["dot.1"] == pytest.approx({"1": 2 + 15 + 15 + 10, "2": 30})
  assert a.own_us["dot.1"] == pytest.approx({"1": 2, "2": 30})
  assert a.op_us["while.2"]["1"] == pytest.approx(15)  # its nested body thunk is add.3's
  assert a.op_us["add.3"]["1"] == pytest.approx(5) and a.op_us["fusion.4"]["1"] == pytest.approx(5)
  assert a.span_us == pytest.approx({"1": 70 - 1, "2": 30})


def test_attribution_without_producer_ids_charges_only_the_thunks_own_events():
  events = [{**e, "args": {k: v for k, v in e["args"].items() if k not in ("_p", "_c")}} for e in _events()]
  a = step_profile.attribute(events, "jit_step")
  assert not a.linked
  assert a.op_us["dot.1"] == pytest.approx({"1": 2, "2": 30})
  assert a.span_us["1"] == pytest.approx(69)  # completions paired by name: dot.1's run-1 end at 40


def test_summary_takes_each_instructions_median_over_steps_and_shares_the_wall_time():
  hlo = step_profile.parse_hlo(HLO)
  ms = 1e3
  a = step_profile.Attribution(
    op_us={
      "dot.3": {"1": 10 * ms, "2": 12 * ms, "3": 100 * ms},  # one step descheduled mid-thunk
      "multiply_erf_fusion": {"1": 4 * ms, "2": 4 * ms, "3": 4 * ms},
      "power.8": {"2": 3 * ms},
    },
    own_us={"dot.3": {"1": 1 * ms, "2": 1 * ms, "3": 1 * ms}},
    span_us={"1": 15 * ms, "2": 16 * ms, "3": 17 * ms},
    linked=True,
  )
  summary = step_profile.summarize(a, hlo, wall_ms=20.0, top=2)
  parts = {p["part"]: p for p in summary["parts"]}
  assert list(parts) == list(step_profile.CATEGORIES)
  assert parts["dense matmuls"]["ms_per_step"] == pytest.approx(12)
  assert parts["GELU"]["ms_per_step"] == pytest.approx(4)
  assert parts["optimizer"]["ms_per_step"] == 0  # ran in one step of three
  assert summary["total_ms_per_step"] == pytest.approx(16)
  assert parts["dense matmuls"]["wall_ms_per_step"] == pytest.approx(20 * 12 / 16)
  assert summary["trace_span_ms_per_step"] == pytest.approx(16)
  assert summary["parallelism"] == pytest.approx(1.0)
  assert [i["instruction"] for i in summary["top_instructions"]] == ["dot.3", "multiply_erf_fusion"]
  text = step_profile.format_table(summary, "header")
  assert "| dense matmuls | 12.0 | 75.0% | 15.0 |" in text and "| total | 16.0 | 100.0% | 20.0 |" in text
  assert "WARNING" not in text
  assert "WARNING" in step_profile.format_table({**summary, "tasks_linked": False}, "header")


def test_reads_the_perfetto_json_where_there_is_no_xplane(tmp_path):
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": [{"ph": "M", "pid": 1, "name": "process_name"}, *_events()]}, f)
  events, source = step_profile.load_trace_events(str(tmp_path))
  assert source == "perfetto" and len(events) == len(_events())
  with pytest.raises(ValueError, match="no xplane or perfetto trace"):
    step_profile.load_trace_events(str(tmp_path / "empty"))


def test_profiles_the_step_side_by_side_times():
  with open(os.path.join(ROOT, "bench", "side_by_side.py")) as f:
    source = f.read()
  assert all(f'"{flag}"' in source for flag in step_profile.BENCH_FLAGS)


@pytest.mark.slow
def test_runs_on_the_tiny_step(tmp_path):
  out = tmp_path / "profile.json"
  # One CPU device, as the benchmark runs (the test session fakes eight).
  env = {**os.environ, "XLA_FLAGS": ""}
  proc = subprocess.run(
    [
      sys.executable,
      "bench/step_profile.py",
      "--steps=1",
      "--warmup=1",
      f"--trace-dir={tmp_path / 'trace'}",
      f"--json={out}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [p["part"] for p in result["parts"]] == list(step_profile.CATEGORIES)
  assert result["total_ms_per_step"] > 0 and result["traced_runs"] == 1
  assert result["parts"][step_profile.CATEGORIES.index("dense matmuls")]["ms_per_step"] > 0
  assert result["trace_source"] != "xplane" or result["tasks_linked"]
  assert "| total |" in proc.stdout
