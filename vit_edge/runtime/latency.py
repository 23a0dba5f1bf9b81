"""Latency and peak memory of a .tflite model, measured in this process.

Run it in a fresh process per measurement (``vit_edge.bench`` does) so the
memory figure belongs to one model::

    python -m vit_edge.runtime.latency model.tflite --threads 1 --runs 50 \
        --warmup 10   # prints one JSON object
    python -m vit_edge.runtime.latency model.tflite --profile_ops  # + per-op times
    python -m vit_edge.runtime.latency after.tflite --against before.tflite \
        --runs 150  # pairs in turn: median ratio after / before

Latency: wall time of ``Interpreter.invoke()`` (XNNPACK, the default delegate)
on a fixed random input, after `warmup` untimed runs; median and 90th
percentile over `runs`. Memory: the process's peak resident set (``VmHWM`` in
/proc/self/status, else ``ru_maxrss``) minus its resident set after importing
numpy and LiteRT, i.e. the mapped model, the tensor arena, XNNPACK's packed
weights and the workspace; no tracing allocator needed.

Example::

    stats = measure("model.tflite", num_threads=1, runs=50, warmup=10)
    stats["median_ms"], stats["peak_mb"]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from vit_edge.runtime import litert_private

# FlatBuffer file identifier of TFLite models (bytes 4..8).
_TFLITE_IDENTIFIER = b"TFL3"


def _status_kb(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _rss_mb() -> float:
  kb = _status_kb("VmRSS")
  if kb is None:  # Not Linux: ru_maxrss is the best available proxy.
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024.0


def _peak_rss_mb() -> float:
  kb = _status_kb("VmHWM")
  if kb is None:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kb = maxrss / 1024 if sys.platform == "darwin" else maxrss  # bytes on macOS
  return kb / 1024.0


def undelegated_nodes(interpreter) -> list[dict[str, Any]]:
  """The op details (:func:`litert_private.ops_details`) of ops outside delegates.

  LiteRT does not expose its execution plan, so this infers it from tensors:
  an op is not delegated when an output of it feeds a DELEGATE node or is a
  model output without being produced by a DELEGATE node, or feeds such an op.
  With XNNPACK as the delegate these are the ops that fall off XNNPACK.

  Example::

      [op["op_name"] for op in undelegated_nodes(interpreter)]  # [] when fully
  """
  ops = litert_private.ops_details(interpreter)
  delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
  delegate_out = {t for o in delegates for t in o["outputs"]}
  needed = {t for o in delegates for t in o["inputs"]}
  needed |= {d["index"] for d in interpreter.get_output_details()}
  originals = [o for o in ops if o["op_name"] != "DELEGATE"]
  found: dict[int, dict[str, Any]] = {}
  changed = True
  while changed:  # Walk back from partition inputs through undelegated producers.
    changed = False
    for op in originals:
      outs = set(op["outputs"])
      if op["index"] not in found and outs & needed and not outs & delegate_out:
        found[op["index"]] = op
        needed |= {t for t in op["inputs"] if t >= 0}
        changed = True
  return [found[i] for i in sorted(found)]


def undelegated_ops(interpreter) -> dict[str, int]:
  """Counts per op type of :func:`undelegated_nodes`, e.g. ``{"BROADCAST_TO": 21}``.

  Example::

      undelegated_ops(interpreter)  # {} when XNNPACK runs the whole graph
  """
  counts: dict[str, int] = {}
  for op in undelegated_nodes(interpreter):
    counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
  return dict(sorted(counts.items()))


def measure(model_path: str, num_threads: int = 1, runs: int = 50,
            warmup: int = 10, seed: int = 0) -> dict[str, Any]:
  """Times `runs` invocations after `warmup` (see the module docstring).

  Args:
    model_path: a .tflite file with one input.
    num_threads: CPU threads for LiteRT/XNNPACK.
    runs: timed invocations (>= 1).
    warmup: untimed invocations first (XNNPACK packs weights on the first).
    seed: of the random input.

  Returns:
    ``{"median_ms", "p90_ms", "mean_ms", "min_ms", "runs", "threads",
    "baseline_rss_mb", "peak_mb", "delegate_partitions", "num_ops",
    "undelegated_ops"}``.

  Example::

      measure("m.tflite", num_threads=2)["median_ms"]
  """
  if runs < 1 or warmup < 0 or num_threads < 1:
    raise ValueError(f"runs={runs} must be >= 1, warmup={warmup} >= 0 and "
                     f"num_threads={num_threads} >= 1.")
  baseline = _rss_mb()
  interpreter = _ready_interpreter(model_path, num_threads, warmup, seed)
  times = np.empty(runs)
  for i in range(runs):
    start = time.perf_counter()
    interpreter.invoke()
    times[i] = time.perf_counter() - start
  ops = litert_private.ops_details(interpreter)
  times_ms = times * 1e3
  return {"median_ms": float(np.median(times_ms)),
          "p90_ms": float(np.percentile(times_ms, 90)),
          "mean_ms": float(np.mean(times_ms)), "min_ms": float(np.min(times_ms)),
          "runs": runs, "threads": num_threads,
          "baseline_rss_mb": baseline, "peak_mb": _peak_rss_mb() - baseline,
          "delegate_partitions": sum(o["op_name"] == "DELEGATE" for o in ops),
          "num_ops": sum(o["op_name"] != "DELEGATE" for o in ops),
          "undelegated_ops": undelegated_ops(interpreter)}


def _ready_interpreter(model_path: str, num_threads: int, warmup: int, seed: int):
  """An interpreter with a fixed random input set, after `warmup` invocations."""
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
  interpreter.allocate_tensors()
  (inp,) = interpreter.get_input_details()
  rng = np.random.default_rng(seed)
  if np.issubdtype(inp["dtype"], np.integer):
    info = np.iinfo(inp["dtype"])
    data = rng.integers(info.min, info.max + 1, inp["shape"]).astype(inp["dtype"])
  else:
    data = rng.standard_normal(inp["shape"]).astype(inp["dtype"])
  interpreter.set_tensor(inp["index"], data)
  for _ in range(warmup):
    interpreter.invoke()
  return interpreter


def paired(model_a: str, model_b: str, num_threads: int = 1, pairs: int = 100,
           warmup: int = 5, seed: int = 0) -> dict[str, Any]:
  """Times two models invoked in turn (A B, B A, A B, ...) and compares each pair.

  On a host whose speed drifts by itself (a shared VM) two adjacent invocations
  see the same speed, so the per-pair ratio B / A resolves a before/after change
  that separate rounds of :func:`measure` cannot.

  Args:
    model_a: the reference .tflite (e.g. before a change).
    model_b: the one compared with it (after).
    num_threads: CPU threads for both.
    pairs: timed pairs (>= 1).
    warmup: untimed invocations of each first.
    seed: of the random inputs.

  Returns:
    ``{"ratio_median", "ratio_q25", "ratio_q75"}`` of B / A over the pairs, and
    ``"a_median_ms"``, ``"b_median_ms"``, ``"a_min_ms"``, ``"b_min_ms"``,
    ``"pairs"``, ``"threads"``.

  Example::

      paired("before.tflite", "after.tflite", pairs=150)["ratio_median"]  # 0.94
  """
  if pairs < 1 or warmup < 0 or num_threads < 1:
    raise ValueError(f"pairs={pairs} must be >= 1, warmup={warmup} >= 0 and "
                     f"num_threads={num_threads} >= 1.")
  interpreters = [_ready_interpreter(path, num_threads, warmup, seed)
                  for path in (model_a, model_b)]
  times = np.empty((pairs, 2))
  for i in range(pairs):
    for k in ((0, 1) if i % 2 == 0 else (1, 0)):
      start = time.perf_counter()
      interpreters[k].invoke()
      times[i, k] = (time.perf_counter() - start) * 1e3
  ratios = times[:, 1] / times[:, 0]
  q25, median, q75 = (float(q) for q in np.percentile(ratios, [25, 50, 75]))
  return {"ratio_median": median, "ratio_q25": q25, "ratio_q75": q75,
          "a_median_ms": float(np.median(times[:, 0])),
          "b_median_ms": float(np.median(times[:, 1])),
          "a_min_ms": float(times[:, 0].min()), "b_min_ms": float(times[:, 1].min()),
          "pairs": pairs, "threads": num_threads}


def _op_macs(name: str, inputs: list, outputs: list) -> int:
  """Multiply-accumulates of a GEMM-like op from its tensor shapes (else 0)."""
  out = outputs[0] if outputs else None
  if out is None:
    return 0
  n_out = int(np.prod(out))
  if name == "FULLY_CONNECTED" and len(inputs) > 1:
    return n_out * int(inputs[1][-1])
  if name == "CONV_2D" and len(inputs) > 1:
    return n_out * int(np.prod(inputs[1][1:]))
  if name == "DEPTHWISE_CONV_2D" and len(inputs) > 1:
    return n_out * int(np.prod(inputs[1][1:3]))
  if name == "BATCH_MATMUL" and len(inputs) > 1:
    return n_out * int(inputs[0][-1])
  return 0


def _macs_of(model, op) -> int:
  """`_op_macs` of one operator of a flatbuffer model object (its first subgraph)."""
  from ai_edge_litert.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top
  tensors = model.subgraphs[0].tensors
  return _op_macs(flatbuffer_utils.opcode_to_name(model, op.opcodeIndex),
                  [list(tensors[i].shape) for i in op.inputs if i >= 0],
                  [list(tensors[i].shape) for i in op.outputs])


def file_macs(model_path: str) -> int:
  """Multiply-accumulates of one inference of a .tflite file, from its op shapes.

  Counts what the file computes (conv, depthwise, fully connected and batch
  matmul ops), which the exporter's rewrites make smaller than the JAX model's
  count (`vit_edge.complexity`): an engine's GMAC/s from the model's count would
  credit the file with work it never does.
  """
  from ai_edge_litert.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top

  model = flatbuffer_utils.read_model(model_path)
  return sum(_macs_of(model, op) for op in model.subgraphs[0].operators)


def profile_ops(model_path: str, num_threads: int = 1, runs: int = 15
                ) -> list[dict[str, Any]]:
  """Per-op-type latency by isolation: every op runs as its own one-op model.

  LiteRT's Python API has no op profiler, so each op of the graph is cut out
  (with its constant inputs) into a model of its own, run with XNNPACK as the
  default delegate, and timed (median of `runs`). The sum approximates the
  full model's latency minus fusion and partition-switch effects; whether each
  op is delegated tells what falls off XNNPACK.

  Returns:
    One dict per (op type, delegated) sorted by total time: ``op``,
    ``xnnpack``, ``count``, ``ms``, ``macs`` and ``gflops`` (for GEMM-like ops).

  Example::

      for row in profile_ops("m.tflite")[:5]:
        print(row["op"], row["ms"])
  """
  import copy  # pylint: disable=g-import-not-at-top
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  from ai_edge_litert.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top

  with open(model_path, "rb") as f:
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(f.read()))
  graph = model.subgraphs[0]
  rng = np.random.default_rng(0)
  totals: dict[tuple[str, bool], dict[str, Any]] = {}
  for op in graph.operators:
    name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
    single = schema.ModelT()
    single.version, single.operatorCodes = model.version, model.operatorCodes
    single.buffers = [schema.BufferT()]
    sub = schema.SubGraphT()
    sub.tensors, remap, feeds = [], {}, []

    def add(index, is_input):
      if index < 0:
        return -1
      if index not in remap:
        tensor = copy.copy(graph.tensors[index])
        data = model.buffers[tensor.buffer].data if tensor.buffer else None
        single.buffers.append(model.buffers[tensor.buffer] if data is not None and len(
            data) else schema.BufferT())
        tensor.buffer = len(single.buffers) - 1
        remap[index] = len(sub.tensors)
        sub.tensors.append(tensor)
        if is_input and (data is None or not len(data)):
          feeds.append(remap[index])
      return remap[index]

    cut = copy.copy(op)
    cut.inputs = [add(i, True) for i in op.inputs]
    cut.outputs = [add(i, False) for i in op.outputs]
    sub.operators, sub.inputs, sub.outputs = [cut], sorted(set(feeds)), cut.outputs
    single.subgraphs = [sub]
    try:
      interpreter = Interpreter(
          model_content=bytes(flatbuffer_utils.convert_object_to_bytearray(single)),
          num_threads=num_threads)
      interpreter.allocate_tensors()
      for d in interpreter.get_input_details():
        if np.issubdtype(d["dtype"], np.integer):
          value = rng.integers(-50, 50, d["shape"]).astype(d["dtype"])
        else:
          value = rng.standard_normal(d["shape"]).astype(d["dtype"])
        interpreter.set_tensor(d["index"], value)
      interpreter.invoke()
      times = []
      for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
      ms = float(np.median(times)) * 1e3
      delegated = any(o["op_name"] == "DELEGATE"
                      for o in litert_private.ops_details(interpreter))
    except (RuntimeError, ValueError):  # An op that cannot run alone: skip it.
      continue
    row = totals.setdefault((name, delegated), {"op": name, "xnnpack": delegated,
                                                "count": 0, "ms": 0.0, "macs": 0})
    row["count"] += 1
    row["ms"] += ms
    row["macs"] += _macs_of(model, op)
  rows = sorted(totals.values(), key=lambda r: -r["ms"])
  for row in rows:
    row["gflops"] = 2 * row["macs"] / (row["ms"] * 1e-3) / 1e9 if row["macs"] else None
  return rows


def model_file_problem(path: str) -> Optional[str]:
  """Why `path` cannot be a TFLite model (missing, unreadable, wrong format), or None.

  Checks the FlatBuffer file identifier, so that a wrong file gets one clear line
  instead of LiteRT's traceback.

  Example::

      model_file_problem("notes.txt")  # "'notes.txt' is not a TFLite model ..."
  """
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except FileNotFoundError:
    return f"model file {path!r} does not exist."
  except OSError as e:
    return f"model file {path!r} cannot be read ({e.strerror})."
  if len(head) < 8 or head[4:8] != _TFLITE_IDENTIFIER:
    return (f"{path!r} is not a TFLite model: expected the file identifier "
            f"{_TFLITE_IDENTIFIER!r} at bytes 4..8, got {head[4:8]!r}. Pass a .tflite "
            "file, e.g. one written by `python -m vit_edge.export`.")
  return None


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI: prints :func:`measure`'s dict as JSON on the last line of stdout."""
  parser = argparse.ArgumentParser(prog="python -m vit_edge.runtime.latency")
  parser.add_argument("model")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--runs", type=int, default=50)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--profile_ops", action="store_true",
                      help="also time every op in isolation (see profile_ops)")
  parser.add_argument("--against", default=None,
                      help="a second .tflite: time both in turn, pair by pair, and "
                           "print the ratio against it (see paired)")
  args = parser.parse_args(argv)
  for path in [args.model] + ([args.against] if args.against else []):
    problem = model_file_problem(path)
    if problem:
      print(f"error: {problem}", file=sys.stderr)
      return 2
  if args.against:
    print(json.dumps(paired(args.against, args.model, args.threads, args.runs,
                            args.warmup)))
    return 0
  if args.profile_ops:
    rows = profile_ops(args.model, args.threads)
    total = sum(r["ms"] for r in rows)
    print(f"{args.model}: {total:.2f} ms summed over isolated ops")
    for r in rows:
      rate = f"{r['gflops']:.0f} GFLOP/s" if r["gflops"] else ""
      print(f"  {r['op']:<20} {'xnnpack' if r['xnnpack'] else 'TFLITE':<8} "
            f"x{r['count']:<4} {r['ms']:8.3f} ms {100 * r['ms'] / total:5.1f}%  {rate}")
  print(json.dumps(measure(args.model, args.threads, args.runs, args.warmup)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
