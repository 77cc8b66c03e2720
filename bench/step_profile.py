"""Where the compiled cached-token MAGE training step spends its time on the CPU, per part of the model.

  python bench/step_profile.py                          # tiny size, batch 64, float32, 10 traced steps
  python bench/step_profile.py --steps=20 --json=profile.json --top=15

The step is the `pretrain_cached` row of `bench/side_by_side.py` (mage_jax's `steps.pretrain_ids_step` built by
`benchmark.make_pretrain`, float32, dropout off, the explicit-softmax attention, no scan). After compilation and
`--warmup` steps it times `--steps` steps, then traces as many with `jax.profiler.trace` and charges every
XLA:CPU thunk of the step's executable to a part through the optimized HLO's metadata (each instruction's
`op_name`, the flax module path, and the Python function its stack frame names):

  MLM head       the MLM layer (fc, GELU, LayerNorm, logits against the word embeddings) and the loss
  attention      q·kᵀ, softmax, probs·v and the transposes and copies around them (not the qkv/proj Dense)
  GELU           the encoder and decoder MLPs' GELU
  dense matmuls  the Dense layers: qkv, proj, fc1, fc2, decoder_embed (matmul, bias, their gradients)
  LayerNorm      every LayerNorm outside the MLM head
  optimizer      gradient norm, clipping, AdamW, weight decay, the guarded commit of the new state
  other          the rest: masking, embeddings, gathers/scatters of kept tokens, residual adds

Forward and backward of a part count together. A fusion takes the part of its own metadata or, where that
names none, the most common part among the instructions fused into it; an instruction with no metadata at all
(XLA's broadcasts of constants, layout copies) takes its users' part.

Time is thread time on XLA's threads. XLA:CPU runs a matmul or a partitioned loop fusion as tasks on its
intra-op thread pool and returns before they finish, so a thunk's own trace event misses much of its work: the
pool tasks an instruction schedules (linked through the trace's producer/consumer ids, which the xplane keeps
and the perfetto JSON drops) are charged to it up to its completion. Each instruction counts with its median
over the traced steps. With more than one thread the parts add up to more than the step's wall time; `wall ms`
is each part's share of the measured (untraced, median) step. Prints a markdown table, the checks (thread time,
the trace's span of one step against the measured step) and the costliest instructions; `--json` writes the
same.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
  sys.path.insert(0, ROOT)
if __name__ == "__main__":
  from mage_jax.system import allocator  # noqa: E402

  allocator.maybe_reexec(script=True)  # profiled as the binaries run: under tcmalloc where the system has it

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import benchmark, side_by_side  # noqa: E402
from mage_jax.train import sharding  # noqa: E402

CATEGORIES = ("MLM head", "attention", "GELU", "dense matmuls", "LayerNorm", "optimizer", "other")
# `benchmark.py` flags of side_by_side's mage_jax child (`mage_jax_rows`), which times this step.
BENCH_FLAGS = (
  "--dtype=float32",
  "--tokenizer=float32",
  "--dropout=0",
  "--attn-dropout=0",
  "--attention=xla",
  "--scan=0",
)

# ---------------------------------------------------------------------------------------------------------
# HLO metadata -> part of the model.

# steps.py functions of the update's tail; the rest of steps.py (rng folding) is "other".
_OPTIMIZER_FUNCTIONS = ("finish_step", "apply_gradients", "commit")
_GELU_PATH = re.compile(r"/mlp/(?!fc[12](?:/|$))")
_ATTENTION_PATH = re.compile(r"/attn/(?!(?:qkv|proj)(?:/|$))")
_DENSE_PATH = re.compile(r"/(?:qkv|proj|fc1|fc2|decoder_embed)(?:/|$)")
_NORM_PATH = re.compile(r"/(?:norm\d*|decoder_norm|LayerNorm|ln)(?:/|$)")
_NORM_FUNCTIONS = ("LayerNorm.__call__", "_compute_stats", "_normalize")


def _classify_one(op_name: str, path: str, function: str) -> str | None:
  file = os.path.basename(path)
  # The MLM layer's own fc, GELU and LayerNorm belong to the head, hence first.
  if "mlm_layer" in op_name or "log_softmax" in op_name or file == "losses.py":
    return "MLM head"
  if "/optax/" in path or file == "optim.py" or (file == "steps.py" and function.split(".")[0] in _OPTIMIZER_FUNCTIONS):
    return "optimizer"
  if function == "gelu" or _GELU_PATH.search(op_name):
    return "GELU"
  if function == "attention_logits" or _ATTENTION_PATH.search(op_name):
    return "attention"
  if function == "Dense.__call__" or _DENSE_PATH.search(op_name):
    return "dense matmuls"
  if function in _NORM_FUNCTIONS or _NORM_PATH.search(op_name):
    return "LayerNorm"
  return None


def classify(op_name: str, path: str = "", function: str = "") -> str | None:
  """The part of one HLO instruction from its metadata (op_name, the file and function of its innermost stack
  frame), or None where they name none. Merged instructions carry `a;b`: the first part found wins."""
  for name in op_name.split(";") if op_name else [""]:
    category = _classify_one(name, path, function)
    if category:
      return category
  return None


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  op_name: str = ""
  path: str = ""
  function: str = ""
  calls: str = ""  # a fusion's computation
  operands: tuple = ()


@dataclasses.dataclass
class Hlo:
  instructions: dict[str, Instruction]
  computations: dict[str, list[str]]  # computation -> its instructions, in order
  users: dict[str, list[str]]  # instruction -> the instructions that read it

  def _metadata_category(self, name: str) -> str | None:
    instr = self.instructions[name]
    own = classify(instr.op_name, instr.path, instr.function)
    if own:
      return own
    votes = collections.Counter()
    for inner in self.computations.get(instr.calls, ()):
      i = self.instructions[inner]
      c = classify(i.op_name, i.path, i.function)
      if c:
        votes[c] += 1
    return votes.most_common(1)[0][0] if votes else None

  def category(self, name: str) -> str:
    """The part of a traced thunk (an instruction name): its own metadata's, else the most common among the
    instructions of the computation it calls (a fusion's), else "other"; an instruction with no metadata at all
    (XLA's own broadcasts and layout copies) takes the most common part among its users'."""
    instr = self.instructions.get(name)
    if instr is None:
      return "other"
    found = self._metadata_category(name)
    if found:
      return found
    if instr.op_name or any(self.instructions[i].op_name for i in self.computations.get(instr.calls, ())):
      return "other"
    votes = collections.Counter(c for c in map(self._metadata_category, self.users.get(name, ())) if c)
    return votes.most_common(1)[0][0] if votes else "other"


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_SOURCE_FILE = re.compile(r'source_file="((?:[^"\\]|\\.)*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_SECTION_ROW = re.compile(r"^(\d+)\s+(.*)$")
_FIELDS = re.compile(r"(\w+)=(\d+)")


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at `start`, or len(text)."""
  depth = 0
  for i in range(start, len(text)):
    depth += text[i] == "("
    depth -= text[i] == ")"
    if depth == 0:
      return i
  return len(text)


def _strip_type(rest: str) -> str:
  """`rest` of an instruction line after its result type (a tuple type holds spaces and parentheses)."""
  if not rest.startswith("("):
    return rest.split(" ", 1)[1] if " " in rest else ""
  return rest[_closing(rest, 0) + 1 :]


def _frames(lines: list[str]) -> dict[int, tuple[str, str]]:
  """Stack frame id -> (file, function) of the frame's own location, from the module's FileNames /
  FunctionNames / FileLocations / StackFrames tables. The innermost frame alone tells the loss, the optimizer
  and GELU apart from their neighbours, so the frames' parent links are not followed."""
  tables: dict[str, dict[int, str]] = {}
  section = None
  for line in lines:
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = tables.setdefault(line, {})
      continue
    m = _SECTION_ROW.match(line)
    if section is None or not m:
      section = None
      if _COMPUTATION.match(line):
        break
      continue
    section[int(m.group(1))] = m.group(2)
  files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
  locations = {}
  for i, row in tables.get("FileLocations", {}).items():
    f = {k: int(v) for k, v in _FIELDS.findall(row)}
    locations[i] = (
      files.get(f.get("file_name_id"), "").strip('"'),
      functions.get(f.get("function_name_id"), "").strip('"'),
    )
  frames = {}
  for i, row in tables.get("StackFrames", {}).items():
    f = {k: int(v) for k, v in _FIELDS.findall(row)}
    frames[i] = locations.get(f.get("file_location_id"), ("", ""))
  return frames


def parse_hlo(text: str) -> Hlo:
  """Instructions (name, opcode, metadata, called fusion computation) of an optimized HLO module's text."""
  lines = text.splitlines()
  frames = _frames(lines)
  instructions: dict[str, Instruction] = {}
  computations: dict[str, list[str]] = {}
  current = None
  for line in lines:
    comp = _COMPUTATION.match(line)
    if comp and " = " not in line.split("(", 1)[0]:
      current = computations.setdefault(comp.group(1), [])
      continue
    m = _INSTRUCTION.match(line) if current is not None else None
    if not m:
      continue
    rest = _strip_type(m.group(2).strip())
    op = _OPCODE.match(rest)
    instr = Instruction(m.group(1), op.group(1) if op else "")
    if op:
      instr.operands = tuple(_OPERAND.findall(rest[op.end() - 1 : _closing(rest, op.end() - 1)]))
    if name := _OP_NAME.search(rest):
      instr.op_name = name.group(1)
    if frame := _FRAME.search(rest):
      instr.path, instr.function = frames.get(int(frame.group(1)), ("", ""))
    elif source := _SOURCE_FILE.search(rest):
      instr.path = source.group(1)
    if calls := _CALLS.search(rest):
      instr.calls = calls.group(1)
    instructions[instr.name] = instr
    current.append(instr.name)
  users = collections.defaultdict(list)
  for instr in instructions.values():
    for operand in instr.operands:
      users[operand].append(instr.name)
  return Hlo(instructions, computations, dict(users))


def module_name(text: str) -> str:
  m = re.match(r"\s*HloModule\s+([\w.\-]+)", text)
  return m.group(1) if m else ""


# ---------------------------------------------------------------------------------------------------------
# Trace events -> thread time per HLO instruction.

START, STOP, RECORD = (
  "ThreadpoolListener::StartRegion",
  "ThreadpoolListener::StopRegion",
  "ThreadpoolListener::Record",
)


def load_trace_events(trace_dir: str) -> tuple[list[dict], str]:
  """The trace as perfetto-style complete events ({tid, ts, dur (µs), name, args}) and where they came from.

  The xplane is read where jax can: it keeps the producer/consumer ids (`_p`, `_c`) that link a pool task to the
  thunk that scheduled it, which the perfetto JSON drops. The perfetto JSON is the fallback."""
  for path in sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)):
    try:
      from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

      data = ProfileData.from_file(path)
    except (ImportError, OSError, RuntimeError, ValueError):
      break
    events = []
    for plane in data.planes:
      for line in plane.lines:
        tid = f"{plane.name}/{line.name}"
        events.extend(
          {
            "ph": "X",
            "tid": tid,
            "ts": e.start_ns / 1e3,
            "dur": e.duration_ns / 1e3,
            "name": e.name,
            "args": dict(e.stats),
          }
          for e in line.events
        )
    if events:
      return events, "xplane"
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise ValueError(f"no xplane or perfetto trace under {trace_dir}")
  with gzip.open(paths[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X"], "perfetto"


@dataclasses.dataclass
class _Op:
  name: str
  start: float
  end: float
  run: str
  producer: object
  exclusive: float
  done: float = float("inf")  # completion: its `end: NAME` event


@dataclasses.dataclass
class Attribution:
  """Thread µs per instruction and execution (run id) of the module, and each execution's span."""

  op_us: dict[str, dict[str, float]]  # instruction -> run -> own events (nested ones excluded) + pool tasks
  own_us: dict[str, dict[str, float]]  # the own-event part
  span_us: dict[str, float]  # run -> first thunk start to last thunk completion
  linked: bool  # pool tasks could be linked to thunks (producer/consumer ids present)

  @property
  def runs(self) -> list[str]:
    return sorted(self.span_us)


def _pair_completions(ops: list[_Op], ends: list[dict]) -> None:
  by_context = {e["args"].get("_c"): e for e in ends if e["args"].get("_c") is not None}
  by_name = collections.defaultdict(list)
  for e in ends:
    by_name[e["name"][len("end: ") :]].append(e["ts"] + e["dur"])
  unpaired = collections.defaultdict(list)
  for op in ops:
    end = by_context.get(op.producer) if op.producer is not None else None
    if end is not None:
      op.done = end["ts"] + end["dur"]
    else:
      unpaired[op.name].append(op)
  for name, group in unpaired.items():
    # Without ids: the first completion of that name at or after the start (a thunk runs once per execution).
    times = sorted(by_name.get(name, ()))
    j = 0
    for op in sorted(group, key=lambda o: o.start):
      # A thunk that completes inline records its end inside its own event.
      while j < len(times) and times[j] < op.start:
        j += 1
      op.done = times[j] if j < len(times) else op.end
      j += j < len(times)


def attribute(events: list[dict], module: str | None = None) -> Attribution:
  """Thread time per HLO instruction of `module`'s executions in a trace of perfetto-style events.

  An instruction is charged its own thunk events (minus thunks nested in them, e.g. a while body's) and the
  time of the pool tasks it scheduled, found through ThreadpoolListener records: a task whose record falls in a
  thunk's event (or in a task of that thunk) belongs to it, up to the thunk's completion; thunk events inside a
  task are charged to their own instructions instead."""
  by_tid: dict[object, list[dict]] = collections.defaultdict(list)
  ops: list[_Op] = []
  ends = []
  for e in events:
    if e.get("ph", "X") != "X":
      continue
    args = e.get("args") or {}
    if "hlo_op" in args:
      if module and args.get("hlo_module") != module:
        continue
      op = _Op(args["hlo_op"], e["ts"], e["ts"] + e["dur"], str(args.get("run_id", "")), args.get("_p"), e["dur"])
      ops.append(op)
      by_tid[e["tid"]].append({"kind": "op", "ts": op.start, "op": op})
    elif e["name"].startswith("end: "):
      ends.append({**e, "args": args})
    elif e["name"] in (START, STOP, RECORD):
      by_tid[e["tid"]].append({"kind": e["name"], "ts": e["ts"], "id": args.get("_c" if e["name"] == START else "_p")})
  _pair_completions(ops, ends)

  record_owner: dict[object, tuple] = {}
  regions: list[dict] = []
  top_level: dict[object, list[tuple[float, float]]] = {}
  for tid, items in by_tid.items():
    items.sort(key=lambda x: (x["ts"], -(x["op"].end - x["op"].start) if x["kind"] == "op" else 0))
    stack: list[_Op] = []
    region = None
    tops = []
    for it in items:
      while stack and stack[-1].end <= it["ts"]:
        stack.pop()
      if it["kind"] == "op":
        op = it["op"]
        if stack:
          stack[-1].exclusive -= min(op.end, stack[-1].end) - op.start
        else:
          tops.append((op.start, op.end))
        stack.append(op)
      elif it["kind"] == START:
        region = {"tid": tid, "start": it["ts"], "end": None, "id": it["id"]}
      elif it["kind"] == STOP and region is not None:
        region["end"] = it["ts"]
        regions.append(region)
        region = None
      elif it["kind"] == RECORD and it["id"] is not None:
        record_owner[it["id"]] = ("op", stack[-1]) if stack else (("region", region) if region else None)
    top_level[tid] = tops

  def owner(region, depth=0):
    link = record_owner.get(region["id"]) if region["id"] is not None else None
    while link is not None and link[0] == "region" and depth < 64:
      parent = link[1]
      link = record_owner.get(parent["id"]) if parent["id"] is not None else None
      depth += 1
    return link[1] if link is not None and link[0] == "op" else None

  op_us = collections.defaultdict(lambda: collections.defaultdict(float))
  own_us = collections.defaultdict(lambda: collections.defaultdict(float))
  for op in ops:
    op_us[op.name][op.run] += op.exclusive
    own_us[op.name][op.run] += op.exclusive
  for region in regions:
    tops = top_level.get(region["tid"], [])
    # The task's time outside thunk events on its thread.
    free, cursor = [], region["start"]
    i = max(bisect.bisect_right(tops, (region["start"], float("inf"))) - 1, 0)
    for a, b in tops[i:]:
      if a >= region["end"]:
        break
      if b > cursor and a > cursor:
        free.append((cursor, min(a, region["end"])))
      cursor = max(cursor, b)
    if cursor < region["end"]:
      free.append((cursor, region["end"]))
    op = owner(region)
    if op is not None:
      # After the thunk completes, its last task goes on to run the executor's next thunks.
      op_us[op.name][op.run] += sum(max(0.0, min(b, op.done) - a) for a, b in free)
  spans = collections.defaultdict(lambda: [float("inf"), float("-inf")])
  for op in ops:
    span = spans[op.run]
    span[0], span[1] = min(span[0], op.start), max(span[1], op.end, op.done)
  linked = any(e.get("id") is not None for items in by_tid.values() for e in items if e["kind"] == START)
  return Attribution(
    {k: dict(v) for k, v in op_us.items()},
    {k: dict(v) for k, v in own_us.items()},
    {r: b - a for r, (a, b) in spans.items()},
    linked,
  )


def summarize(attribution: Attribution, hlo: Hlo, wall_ms: float, top: int = 10) -> dict:
  """Per part: thread ms per step, share, and that share of the measured wall time; the `top` instructions.

  An instruction's ms per step is its median over the traced steps: a thread descheduled in the middle of one
  thunk (another process on the machine) then moves one step's figure, not the table's."""
  runs = attribution.runs
  median_ms = lambda per_run: statistics.median(per_run.get(r, 0.0) for r in runs) / 1e3 if runs else 0.0
  per_op = {name: median_ms(per_run) for name, per_run in attribution.op_us.items()}
  per_part = {c: 0.0 for c in CATEGORIES}
  own = {c: 0.0 for c in CATEGORIES}
  for name, ms in per_op.items():
    part = hlo.category(name)
    per_part[part] += ms
    own[part] += median_ms(attribution.own_us.get(name, {}))
  total = sum(per_part.values())
  parts = [
    {
      "part": c,
      "ms_per_step": per_part[c],
      "own_events_ms_per_step": own[c],
      "share": per_part[c] / total if total else 0.0,
      "wall_ms_per_step": wall_ms * per_part[c] / total if total else 0.0,
    }
    for c in CATEGORIES
  ]
  instructions = []
  for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    instr = hlo.instructions.get(name)
    instructions.append(
      {
        "instruction": name,
        "part": hlo.category(name),
        "ms_per_step": ms,
        "op_name": instr.op_name if instr else "",
        "opcode": instr.opcode if instr else "",
      }
    )
  span_ms = statistics.median(attribution.span_us.values()) / 1e3 if runs else 0.0
  mean_total = sum(sum(per_run.values()) for per_run in attribution.op_us.values()) / 1e3 / max(len(runs), 1)
  return {
    "parts": parts,
    "total_ms_per_step": total,
    "mean_total_ms_per_step": mean_total,
    "wall_ms_per_step": wall_ms,
    "trace_span_ms_per_step": span_ms,
    "own_events_ms_per_step": sum(own.values()),
    "parallelism": total / span_ms if span_ms else float("nan"),
    "traced_runs": len(runs),
    "tasks_linked": attribution.linked,
    "top_instructions": instructions,
  }


def format_table(summary: dict, header: str) -> str:
  lines = [header, "| part | ms per step | share | wall ms per step |", "|---|---|---|---|"]
  for p in summary["parts"]:
    lines.append(f"| {p['part']} | {p['ms_per_step']:.1f} | {100 * p['share']:.1f}% | {p['wall_ms_per_step']:.1f} |")
  lines.append(f"| total | {summary['total_ms_per_step']:.1f} | 100.0% | {summary['wall_ms_per_step']:.1f} |")
  lines.append("")
  lines.append(
    f"thread time {summary['total_ms_per_step']:.1f} ms per step (own thunk events "
    f"{summary['own_events_ms_per_step']:.1f}, the rest their pool tasks) over a trace span of "
    f"{summary['trace_span_ms_per_step']:.1f} ms per step (parallelism {summary['parallelism']:.2f}); "
    f"measured step {summary['wall_ms_per_step']:.1f} ms (median, untraced), "
    f"{summary.get('traced_wall_ms_per_step', float('nan')):.1f} ms traced"
  )
  if not summary["tasks_linked"]:
    lines.append("WARNING: the trace has no producer/consumer ids: pool tasks (most matmul work) are not charged")
  if summary["top_instructions"]:
    lines += ["", "| instruction | part | ms per step | op_name |", "|---|---|---|---|"]
    for i in summary["top_instructions"]:
      op_name = i["op_name"].split(";")[0].removeprefix("jit(pretrain_ids_step)/")
      lines.append(f"| {i['instruction']} | {i['part']} | {i['ms_per_step']:.2f} | `{op_name[-90:]}` |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The step.


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  p.add_argument("--size", default="tiny", choices=side_by_side.SIZES)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps, then as many traced steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--top", type=int, default=10, help="instructions listed after the table")
  p.add_argument("--trace-dir", default="", help="keep the trace here (default: a temporary folder)")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.top < 0:
    raise ValueError("--batch and --steps must be >= 1, --warmup and --top >= 0")
  return args


def _profile_step(args, trace_dir: str) -> dict:
  bench_args = benchmark.parse_args(
    [f"--size={args.size}", f"--batch={args.batch}", *BENCH_FLAGS, "--workloads=pretrain_cached"]
  )
  s = benchmark.build_setup(args.size, bench_args)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    prog = benchmark.make_pretrain(s, cached=True)
    state = jax.jit(lambda r: sharding.strip_boxes(prog.init_state(r)), out_shardings=prog.state_sharding)(
      jax.random.key(bench_args.seed)
    )
    # The batches run_pretrain draws for the same row.
    batches = [
      {
        "ids": jax.device_put(
          np.asarray(
            jax.random.randint(
              jax.random.key(100 + i), (s.batch, s.model.config.num_tokens), 0, s.model.config.codebook_size
            )
          ),
          prog.batch_sharding,
        )
      }
      for i in range(2)
    ]
    compiled = prog.step.lower(state, {}, batches[0]).compile()
    holder = {"state": state, "i": 0}

    def step() -> float:
      t0 = time.perf_counter()
      holder["state"], metrics = compiled(holder["state"], {}, batches[holder["i"] % 2])
      jax.block_until_ready(metrics)
      holder["i"] += 1
      return time.perf_counter() - t0

    for _ in range(args.warmup):
      step()
    untraced = [step() for _ in range(args.steps)]
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      traced = [step() for _ in range(args.steps)]
  text = compiled.as_text()
  return {"hlo": text, "module": module_name(text), "untraced_s": untraced, "traced_s": traced}


def main(argv=None) -> dict:
  args = parse_args(argv)
  load_before = side_by_side.load_average()
  with tempfile.TemporaryDirectory() as tmp:
    trace_dir = args.trace_dir or os.path.join(tmp, "trace")
    run = _profile_step(args, trace_dir)
    events, source = load_trace_events(trace_dir)
  attribution = attribute(events, run["module"])
  if not attribution.runs:
    raise ValueError(
      f"the trace ({source}) has no thunk events of {run['module']}; its event names: "
      f"{sorted({e['name'] for e in events})[:40]}"
    )
  wall_ms = 1e3 * statistics.median(run["untraced_s"])
  summary = summarize(attribution, parse_hlo(run["hlo"]), wall_ms, args.top)
  summary["traced_wall_ms_per_step"] = 1e3 * statistics.mean(run["traced_s"])
  preload = os.environ.get("LD_PRELOAD", "")
  header = (
    f"{args.size} size, pretrain_cached, batch {args.batch}, float32, {args.steps} traced steps, "
    f"{jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), jax {jax.__version__}, "
    f"{'tcmalloc' if 'tcmalloc' in preload else 'default allocator'}, trace from the {source}, "
    f"{time.strftime('%Y-%m-%d')}, load average {load_before} -> {side_by_side.load_average()}"
  )
  print(format_table(summary, header), flush=True)
  result = {
    "args": vars(args),
    "header": header,
    "module": run["module"],
    "trace_source": source,
    "untraced_step_ms": [1e3 * t for t in run["untraced_s"]],
    "traced_step_ms": [1e3 * t for t in run["traced_s"]],
    **summary,
  }
  benchmark.write_json(args.json, result)
  return result


if __name__ == "__main__":
  benchmark.run_script(main)
