"""Isolated TFLite probes behind the README's inference notes (not run by the tests).

A probe asks whether one graph form is faster than another on this host's
LiteRT/XNNPACK. It converts two small TensorFlow graphs, A and B, that compute
the same thing (or the same work), and times them in turn with
:func:`vit_edge.runtime.latency.paired`, so that a drifting VM slows both alike.
It prints a Markdown table: each form's median, the per-pair ratio B / A with
its quartiles, the ops that fall off XNNPACK and how far B's outputs are from
A's on one random input::

    python -m vit_edge.tools.op_probes --threads=1 --pairs=200
    python -m vit_edge.tools.op_probes --probes=int8_attention --threads=1,2

The probes, at the shapes of the models the notes are about:

- ``int8_attention``: DeiT-Ti's attention core at 224 (3 heads, 197 tokens,
  head size 64: q k^T, softmax, p v) in float (XNNPACK) against full int8
  (TFLite's own int8 BATCH_MATMUL; XNNPACK has none for two activations).
- ``pad_fusion``: MobileViTv2-1.0's stride-2 depthwise 3x3 at 128 x 128 x 128
  with its explicit zero PAD, against the same convolution on an input that is
  already padded: the PAD is free when XNNPACK fuses it.
- ``pad_fusion_stem``: the same for the 3 -> 32 stem convolution at 256.
- ``silu_forms``: a 1x1 convolution 64 -> 128 at 64 x 64 plus SiLU as
  ``x * sigmoid(x)`` against ``h + h * tanh(h)`` with ``h = x / 2`` folded into
  the convolution's weights (equal in real arithmetic).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vit_edge.runtime import latency

# Shapes of each probe: "model" (the notes' shapes) or "tiny" (the tests').
SIZES = ("model", "tiny")


@dataclasses.dataclass(frozen=True)
class Probe:
  """Two forms of one computation; `build(size)` returns their TF functions.

  Each function takes one float32 input of `input_shapes(size)[k]` for form k.
  `int8_b` converts form B with full int8 quantisation (float input/output).
  """

  form_a: str
  form_b: str
  build: Callable[[str], tuple[Callable, Callable]]
  input_shapes: Callable[[str], tuple[tuple[int, ...], tuple[int, ...]]]
  int8_b: bool = False


def _attention_shapes(size: str):
  heads, tokens, head_dim = (3, 197, 64) if size == "model" else (2, 9, 8)
  shape = (1, heads, tokens, 3 * head_dim)
  return shape, shape


def _attention(size: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  head_dim = _attention_shapes(size)[0][-1] // 3

  def core(x):
    q, k, v = tf.split(x, 3, axis=-1)
    scores = tf.matmul(q, k, transpose_b=True) * head_dim ** -0.5
    return tf.matmul(tf.nn.softmax(scores, axis=-1), v)
  return core, core


def _depthwise_shapes(size: str):
  side, channels = (128, 128) if size == "model" else (8, 4)
  return (1, side, side, channels), (1, side + 2, side + 2, channels)


def _stem_shapes(size: str):
  side = 256 if size == "model" else 8
  return (1, side, side, 3), (1, side + 2, side + 2, 3)


def _padded_conv(shapes: Callable, depthwise: bool):
  """(PAD then VALID stride-2 3x3 conv, the same conv on a pre-padded input)."""

  def build(size: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    channels = shapes(size)[0][-1]
    rng = np.random.default_rng(0)
    if depthwise:
      kernel = tf.constant(rng.standard_normal((3, 3, channels, 1)), tf.float32)
      conv = lambda x: tf.nn.depthwise_conv2d(x, kernel, (1, 2, 2, 1), "VALID")
    else:
      kernel = tf.constant(rng.standard_normal((3, 3, channels, 32)), tf.float32)
      conv = lambda x: tf.nn.conv2d(x, kernel, 2, "VALID")
    return (lambda x: conv(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])), conv)
  return build


def _silu_shapes(size: str):
  side = 64 if size == "model" else 8
  return (1, side, side, 64), (1, side, side, 64)


def _silu(size: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  del size
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((1, 1, 64, 128)).astype(np.float32) / 8
  bias = rng.standard_normal(128).astype(np.float32) / 8

  def sigmoid_form(x):
    y = tf.nn.conv2d(x, kernel, 1, "VALID") + bias
    return y * tf.sigmoid(y)

  def tanh_form(x):  # x * sigmoid(x) = h + h * tanh(h), h = x / 2 (exact halving).
    h = tf.nn.conv2d(x, kernel / 2, 1, "VALID") + bias / 2
    return h + h * tf.tanh(h)
  return sigmoid_form, tanh_form


PROBES: dict[str, Probe] = {
    # Are attention products faster in int8?
    "int8_attention": Probe("float32", "int8", _attention, _attention_shapes,
                            int8_b=True),
    # Is an explicit PAD before a depthwise conv free?
    "pad_fusion": Probe("PAD + conv", "conv alone",
                        _padded_conv(_depthwise_shapes, depthwise=True),
                        _depthwise_shapes),
    # ... and before the stem conv?
    "pad_fusion_stem": Probe("PAD + conv", "conv alone",
                             _padded_conv(_stem_shapes, depthwise=False), _stem_shapes),
    # Is SiLU through TANH faster than through LOGISTIC?
    "silu_forms": Probe("x * sigmoid(x)", "h + h * tanh(h)", _silu, _silu_shapes),
}


def _calibration(shape: Sequence[int], n: int = 8):
  rng = np.random.default_rng(1)
  for _ in range(n):
    yield [rng.standard_normal(shape).astype(np.float32)]


def convert(fn: Callable, shape: Sequence[int], int8: bool = False) -> bytes:
  """`fn` of one float32 input of `shape` as a .tflite (full int8 if `int8`)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  traced = tf.function(fn, input_signature=[tf.TensorSpec(shape, tf.float32)])
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [traced.get_concrete_function()], traced)
  if int8:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: _calibration(shape)
  with warnings.catch_warnings():
    # The input stays float and is quantised inside the graph with the calibrated
    # scale, so there are no input statistics to give; TF warns all the same.
    warnings.filterwarnings("ignore", "Statistics for quantized inputs")
    return converter.convert()


def _outputs(path: str, x: np.ndarray) -> np.ndarray:
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  interpreter = Interpreter(model_path=path)
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _ops(path: str) -> list[str]:
  """The op types of a .tflite file, in order (before delegation)."""
  from ai_edge_litert.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top
  model = flatbuffer_utils.read_model(path)
  return [flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
          for op in model.subgraphs[0].operators]


def _undelegated(path: str, threads: int = 1) -> dict[str, int]:
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  interpreter = Interpreter(model_path=path, num_threads=threads)
  interpreter.allocate_tensors()
  return latency.undelegated_ops(interpreter)


def build_files(name: str, size: str, out_dir: str) -> tuple[str, str]:
  """Writes probe `name`'s two forms as `<name>_a.tflite` and `<name>_b.tflite`."""
  probe = PROBES[name]
  fns, shapes = probe.build(size), probe.input_shapes(size)
  paths = []
  for k, (fn, shape) in enumerate(zip(fns, shapes)):
    path = os.path.join(out_dir, f"{name}_{'ab'[k]}.tflite")
    with open(path, "wb") as f:
      f.write(convert(fn, shape, int8=probe.int8_b and k == 1))
    paths.append(path)
  return paths[0], paths[1]


def output_gap(name: str, size: str, paths: tuple[str, str]) -> Optional[float]:
  """max |B - A| / max |A| on one random input, or None if the inputs differ."""
  shape_a, shape_b = PROBES[name].input_shapes(size)
  if shape_a != shape_b:
    return None
  x = np.random.default_rng(2).standard_normal(shape_a).astype(np.float32)
  a, b = (_outputs(path, x) for path in paths)
  return float(np.abs(b - a).max() / np.abs(a).max())


def run_probe(name: str, threads: Sequence[int], pairs: int, warmup: int,
              out_dir: str, size: str = "model") -> list[dict[str, Any]]:
  """Builds probe `name` once and times it at each thread count; rows of :func:`table`."""
  paths = build_files(name, size, out_dir)
  checks = {"probe": name, "off_xnnpack_a": _undelegated(paths[0]),
            "off_xnnpack_b": _undelegated(paths[1]),
            "gap": output_gap(name, size, paths)}
  return [{**checks, "threads": t,
           **latency.paired(*paths, num_threads=t, pairs=pairs, warmup=warmup)}
          for t in threads]


def _off(ops: dict[str, int]) -> str:
  return ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())) or "none"


def table(rows: Sequence[dict[str, Any]]) -> str:
  """The probes' Markdown table."""
  lines = ["| probe | threads | A | B | A ms | B ms | B/A (q25-q75) | off XNNPACK: A; B "
           "| max abs(B-A) / max abs(A) |",
           "|---|---:|---|---|---:|---:|---|---|---:|"]
  for r in rows:
    probe = PROBES[r["probe"]]
    gap = "-" if r["gap"] is None else f"{r['gap']:.1e}"
    lines.append(
        f"| {r['probe']} | {r['threads']} | {probe.form_a} | {probe.form_b} "
        f"| {r['a_median_ms']:.3f} | {r['b_median_ms']:.3f} | {r['ratio_median']:.2f} "
        f"({r['ratio_q25']:.2f}-{r['ratio_q75']:.2f}) | {_off(r['off_xnnpack_a'])}; "
        f"{_off(r['off_xnnpack_b'])} | {gap} |")
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--probes", default=",".join(PROBES),
                      help=f"comma-separated, of {', '.join(PROBES)}")
  parser.add_argument("--threads", default="1", help="comma-separated, e.g. 1,2")
  parser.add_argument("--pairs", type=int, default=200)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--size", choices=SIZES, default="model")
  parser.add_argument("--out_dir", default=None,
                      help="where the .tflite files go (default: a temporary folder)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  names = [n for n in args.probes.split(",") if n]
  unknown = [n for n in names if n not in PROBES]
  if unknown or not names:
    raise SystemExit(f"--probes={args.probes!r}: {unknown or 'none given'} not among "
                     f"{', '.join(PROBES)}.")
  try:
    threads = [int(t) for t in args.threads.split(",")]
  except ValueError:
    threads = [0]
  if min(threads) < 1:
    raise SystemExit(f"--threads={args.threads!r}: expected positive integers, e.g. 1,2.")
  if args.pairs < 1 or args.warmup < 0:
    raise SystemExit(f"--pairs={args.pairs} must be >= 1 and --warmup={args.warmup} "
                     ">= 0 (e.g. --pairs=200 --warmup=10).")
  out_dir = args.out_dir or tempfile.mkdtemp(prefix="op_probes_")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise SystemExit(f"--out_dir={out_dir!r} is a file; give a folder for the "
                     ".tflite files (it is created if missing).")
  os.makedirs(out_dir, exist_ok=True)
  by_probe = [run_probe(name, threads, args.pairs, args.warmup, out_dir, args.size)
              for name in names]
  rows = [rows[i] for i in range(len(threads)) for rows in by_probe]  # By thread count.
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
