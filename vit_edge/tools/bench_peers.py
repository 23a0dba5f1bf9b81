"""vit_edge against its peers on the same weights: PyTorch eager and ONNX Runtime.

Needs the optional extra (never a dependency of the package)::

    pip install -e '.[peers]'
    git clone https://github.com/saic-fi/edgevit /tmp/edgevit   # EdgeViT's reference
    python -m vit_edge.tools.bench_peers --edgevit_src=/tmp/edgevit/src/edgevit.py \\
        --models=edgevit_xxs,deit_tiny_patch16,mobilevitv2_050,mobilevitv2_100,tformer_s \\
        --threads=1,2

For each model it builds the reference PyTorch model (timm; EdgeViT's official file;
TFormer's PyTorch typing in :mod:`vit_edge.tools.peer_models`) with random weights
and random BatchNorm statistics, ports those weights into vit_edge with the family's
``convert_torch_state_dict`` and checks that both give the same logits. Then, at the
model's reference resolution, batch 1, float32:

* PyTorch eager (``torch.no_grad``, eval mode);
* ONNX Runtime fp32 (``torch.onnx.export``, all graph optimisations), int8 dynamic
  (``quantize_dynamic``, int8 MatMul/Gemm weights, activations quantised at run
  time) and int8 static (``quant_pre_process`` + ``quantize_static``, QDQ, per-channel
  weights, calibrated on the same digit images as vit_edge's int8 export);
* vit_edge TFLite fp32 and int8 (``vit_edge.export``, parity guard on; XNNPACK);

and training throughput at batch 32: vit_edge's jitted train step (the offline
config's AdamW and cross-entropy, gradient clipping 1.0) against a PyTorch eager
step (AdamW, cross-entropy, ``clip_grad_norm_(1.0)``) on the same model.

Each thread count runs in its own process pinned to that many CPUs (JAX's CPU
thread pool is sized at start), with PyTorch, ONNX Runtime and LiteRT told the same
count. Within a process the engines take turns, ``--rounds`` times; a figure is the
median over rounds of each round's median. Training runs in a fresh process per
framework and round, one at a time, taking turns too (see :func:`serve_train_turn`). The table gives the ratios the issue
tracks (< 1 is vit_edge faster for latency; > 1 is vit_edge faster for training).
A second table puts each figure against this CPU's compute ceiling: GMAC/s and its
share of the float32 GEMM rate NumPy and PyTorch reach in the same process (see
:func:`efficiency_table`), which says how much any engine could still gain. A third
gives the host's GEMM rate probed around every round and training turn, and a
warning names any round run on a slowed host (see :func:`stability_table`).
Exports are cached in ``--out_dir`` (``--reuse``); ``results.json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vit_edge import hugepages
from vit_edge.runtime import latency

ENGINES = ("torch", "ort_fp32", "ort_int8_dynamic", "ort_int8_static", "tflite_fp32",
           "tflite_int8")
TRAIN_FRAMEWORKS = ("jax", "torch")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vit_edge.tools.bench_peers",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="edgevit_xxs,deit_tiny_patch16,mobilevitv2_050,"
                 "mobilevitv2_100,tformer_s", help="registry names, comma-separated")
  p.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
  p.add_argument("--image_size", type=int, default=0,
                 help="input side (0: each model's reference resolution)")
  p.add_argument("--runs", type=int, default=20, help="timed inferences per round")
  p.add_argument("--warmup", type=int, default=5, help="untimed inferences first")
  p.add_argument("--rounds", type=int, default=3, help="turns of every engine")
  p.add_argument("--train_steps", type=int, default=2,
                 help="timed train steps per round (0: no training columns)")
  p.add_argument("--train_batch", type=int, default=32)
  p.add_argument("--train_models", default="all",
                 help="models whose training is timed ('all', or a comma list; "
                      "mobilevitv2_100 at 256 reached 14.8 GB resident here)")
  p.add_argument("--calibration_samples", type=int, default=64,
                 help="digit images calibrating both int8 exports")
  p.add_argument("--gelu", default="tanh", choices=("tanh", "exact"),
                 help="vit_edge export's GELU (PyTorch and ONNX compute the exact one)")
  p.add_argument("--edgevit_src", default="",
                 help="the official saic-fi/edgevit src/edgevit.py (EdgeViT's reference)")
  p.add_argument("--out_dir", default="bench_peers_out")
  p.add_argument("--reuse", action="store_true", help="reuse exports in --out_dir")
  p.add_argument("--child_threads", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--train_worker", default="", choices=("", *TRAIN_FRAMEWORKS),
                 help=argparse.SUPPRESS)
  return p


def _csv(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def _check_args(args) -> tuple[list[str], list[int]]:
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  from vit_edge.tools import peer_models  # pylint: disable=g-import-not-at-top
  names = _csv(args.models)
  for name in names:
    if name not in peer_models.SUPPORTED:
      raise ValueError(f"--models: no PyTorch reference for {name!r}; choose from "
                       f"{', '.join(peer_models.SUPPORTED)}.")
    models.get_model_info(name)
  if any(n in peer_models.EDGEVIT_NAMES for n in names):
    peer_models.load_official_edgevit(args.edgevit_src)
  if args.train_models != "all" and not set(_csv(args.train_models)) <= set(names):
    raise ValueError(f"--train_models={args.train_models!r} must be 'all' or a subset "
                     f"of --models ({', '.join(names)}).")
  threads = _csv(args.threads)
  if not threads or not all(t.isdigit() and int(t) >= 1 for t in threads):
    raise ValueError(f"--threads={args.threads!r}: expected counts >= 1, e.g. 1,2.")
  if args.runs < 1 or args.rounds < 1 or args.warmup < 0 or args.train_steps < 0:
    raise ValueError("--runs and --rounds must be >= 1, --warmup and --train_steps >= 0.")
  return names, [int(t) for t in threads]


def _size(name: str, image_size: int) -> int:
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  return image_size or models.get_model_info(name).image_size


def _paths(out_dir: str, name: str, size: int) -> dict[str, str]:
  stem = os.path.join(out_dir, f"{name}_{size}")
  return {"torch": stem + ".pt", "ort_fp32": stem + ".onnx",
          "ort_int8_dynamic": stem + "_int8_dynamic.onnx",
          "ort_int8_static": stem + "_int8_static.onnx",
          "tflite_fp32": stem + ".tflite", "tflite_int8": stem + "_int8.tflite",
          "report": stem + ".json"}


# ----------------------------------------------------------------------------------
# Preparation (the parent process): weights, parity, every export.


def _calibration_images(name: str, size: int, n: int) -> np.ndarray:
  """The digit images vit_edge's int8 export calibrates on, [n, S, S, 3] float32."""
  from vit_edge import input_pipeline, models  # pylint: disable=g-import-not-at-top
  from vit_edge.export import data  # pylint: disable=g-import-not-at-top
  info = models.get_model_info(name)
  config = data.digits_config(size, input_pipeline.DEFAULT_CROP_PCT, "bilinear")
  return np.concatenate(list(data.representative_from_config(
      config, info.mean, info.std, n)()), axis=0).astype(np.float32)


def _model(name: str, size: int):
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  return models.create_model_at_size(name, size, num_classes=1000)


def model_macs(name: str, size: int) -> int:
  """Conv and matmul MACs of one image (traced, not compiled)."""
  from vit_edge import complexity  # pylint: disable=g-import-not-at-top
  return complexity.model_macs(_model(name, size), size)


def port_weights(name: str, torch_model, size: int):
  """(vit_edge model, variables) holding `torch_model`'s weights."""
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  from vit_edge.tools import import_torch  # pylint: disable=g-import-not-at-top
  model = _model(name, size)
  state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  family = import_torch.family_module(models.get_model_info(name).family)
  return model, family.convert_torch_state_dict(state_dict, model)


def _torch_jax_parity(torch_model, model, variables, images: np.ndarray) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  logits, _ = jax.jit(lambda x: model.apply(variables, x, train=False))(images)
  return float(np.max(np.abs(np.asarray(logits) - expected)))


def _ort_exports(torch_model, paths: dict[str, str], calibration: np.ndarray) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from onnxruntime import quantization as q  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(calibration[:1].transpose(0, 3, 1, 2).copy())
  torch.onnx.export(torch_model, (x,), paths["ort_fp32"], input_names=["image"],
                    output_names=["logits"], opset_version=18, dynamo=False)
  q.quantize_dynamic(paths["ort_fp32"], paths["ort_int8_dynamic"],
                     weight_type=q.QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
  pre = paths["ort_int8_static"] + ".pre.onnx"
  q.quant_pre_process(paths["ort_fp32"], pre)

  class Reader(q.CalibrationDataReader):

    def __init__(self):
      self.images = iter(calibration)

    def get_next(self):
      image = next(self.images, None)
      return None if image is None else {"image": image.transpose(2, 0, 1)[None].copy()}

  q.quantize_static(pre, paths["ort_int8_static"], Reader(),
                    quant_format=q.QuantFormat.QDQ, per_channel=True,
                    activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
  os.remove(pre)


def prepare(name: str, args) -> dict[str, Any]:
  """Builds, ports, checks and exports one model; returns its report."""
  import torch  # pylint: disable=g-import-not-at-top
  from vit_edge import export  # pylint: disable=g-import-not-at-top
  from vit_edge.tools import peer_models  # pylint: disable=g-import-not-at-top
  size = _size(name, args.image_size)
  paths = _paths(args.out_dir, name, size)
  if args.reuse and all(os.path.exists(p) for p in paths.values()):
    with open(paths["report"]) as f:
      report = json.load(f)
    if "macs" not in report:  # Reports written before the efficiency table.
      report["macs"] = model_macs(name, size)
    if "macs" not in report["tflite_fp32"]:  # Reports written before file counts.
      report["tflite_fp32"]["macs"] = latency.file_macs(paths["tflite_fp32"])
    return report
  torch.manual_seed(0)
  torch_model = peer_models.build(name, 1000, size, args.edgevit_src).eval()
  peer_models.randomize_batch_norm_statistics(torch_model)
  torch.save(torch_model.state_dict(), paths["torch"])
  model, variables = port_weights(name, torch_model, size)
  calibration = _calibration_images(name, size, args.calibration_samples)
  report = {"model": name, "image_size": size,
            "params": sum(p.numel() for p in torch_model.parameters()),
            "macs": model_macs(name, size),
            "torch_jax_max_abs_logit_diff": _torch_jax_parity(
                torch_model, model, variables, calibration[:2])}
  print(f"[{name}] torch vs JAX max |logit diff| "
        f"{report['torch_jax_max_abs_logit_diff']:.2e}; exporting ...", flush=True)
  _ort_exports(torch_model, paths, calibration)
  for engine, quantize in (("tflite_fp32", "none"), ("tflite_int8", "int8")):
    r = export.export_from_registry(
        name, paths[engine], image_size=size, num_classes=1000, quantize=quantize,
        num_calibration_samples=args.calibration_samples, gelu=args.gelu,
        max_eval_examples=0, variables=variables)
    report[engine] = {"int8_activations": r.int8_activations,
                      "relative_logit_error": r.relative_logit_error,
                      "size_mb": r.size_bytes / 1e6}
  report["tflite_fp32"]["macs"] = latency.file_macs(paths["tflite_fp32"])
  for engine in ("ort_fp32", "ort_int8_dynamic", "ort_int8_static"):
    report[engine] = {"size_mb": os.path.getsize(paths[engine]) / 1e6}
  with open(paths["report"], "w") as f:
    json.dump(report, f, indent=2)
  return report


# ----------------------------------------------------------------------------------
# Timing (one child process per thread count).


def _median_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _square_operands(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Two random float32 n x n matrices (the GEMM probes' operands)."""
  rng = np.random.default_rng(0)
  return rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal(
      (n, n), dtype=np.float32)


def matmul_peak_gmacs(threads: int, n: int = 2048, runs: int = 5) -> dict[str, float]:
  """Float32 GEMM rate (GMAC/s) of NumPy's BLAS and of PyTorch at `threads`.

  The practical compute ceiling of this CPU for the efficiency table: a square
  n x n x n product, the shape a BLAS runs fastest; the median of `runs`.
  """
  import torch  # pylint: disable=g-import-not-at-top
  a, b = _square_operands(n)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  torch.set_num_threads(threads)
  rates = {}
  for lib, fn in (("numpy", lambda: a @ b), ("torch", lambda: ta @ tb)):
    rates[lib] = n ** 3 / 1e9 / (_median_ms(fn, runs, warmup=1) / 1e3)
  return rates


def host_gemm_gmacs(n: int = 1024, runs: int = 3) -> float:
  """This host's float32 GEMM rate right now (GMAC/s): NumPy, best of `runs`.

  A probe of about 0.1 s taken around every inference round and training turn.
  This machine is a VM whose speed moves by itself (the 1-thread GEMM rate went
  from 47 to 14-38 GMAC/s for minutes, and an unchanged train step from 1.3 to
  4-5 s), so the stability table says which rounds ran on a slowed host.
  """
  a, b = _square_operands(n)
  a @ b  # Warm-up (BLAS threads).
  best = np.inf
  for _ in range(runs):
    start = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - start)
  return n ** 3 / 1e9 / best


def _inference_fns(name: str, size: int, paths: dict[str, str], threads: int,
                   edgevit_src: str) -> dict[str, Callable[[], Any]]:
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  from vit_edge.tools import peer_models  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
  nchw = image.transpose(0, 3, 1, 2).copy()
  torch_model = peer_models.build(name, 1000, size, edgevit_src).eval()
  torch_model.load_state_dict(torch.load(paths["torch"]))
  torch_input = torch.from_numpy(nchw)

  def torch_fn():
    with torch.no_grad():
      return torch_model(torch_input)

  fns = {"torch": torch_fn}
  options = ort.SessionOptions()
  options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  for engine in ("ort_fp32", "ort_int8_dynamic", "ort_int8_static"):
    session = ort.InferenceSession(paths[engine], options,
                                   providers=["CPUExecutionProvider"])
    fns[engine] = (lambda s: lambda: s.run(None, {"image": nchw}))(session)
  for engine in ("tflite_fp32", "tflite_int8"):
    interpreter = Interpreter(model_path=paths[engine], num_threads=threads)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    interpreter.set_tensor(inp["index"], image)
    fns[engine] = interpreter.invoke
  return fns


def _torch_train_timer(name: str, batch: int, size: int, edgevit_src: str
                       ) -> Callable[[int], float]:
  import torch  # pylint: disable=g-import-not-at-top
  from vit_edge.tools import peer_models  # pylint: disable=g-import-not-at-top
  model = peer_models.build(name, 10, size, edgevit_src).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  generator = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 3, size, size, generator=generator)
  y = torch.randint(0, 10, (batch,), generator=generator)

  def time_steps(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
    return (time.perf_counter() - start) / steps

  time_steps(1)  # Warm-up (allocator, oneDNN primitives).
  return time_steps


def _train_timer(framework: str, name: str, args) -> Callable[[int], float]:
  from vit_edge.tools import step_timing  # pylint: disable=g-import-not-at-top
  size = _size(name, args.image_size)
  if framework == "jax":
    return step_timing.train_step_timer(name, args.train_batch, size)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.child_threads)
  return _torch_train_timer(name, args.train_batch, size, args.edgevit_src)


_SECONDS_TAG = "train_step_seconds="
_HOST_TAG = "host_gemm_gmacs="


def serve_train_turn(framework: str, name: str, args) -> None:
  """One framework's training turn: build, compile, warm up, time, print, exit.

  Every turn is a fresh process, and only one trains or holds memory at a time.
  Two persistent workers taking turns (one per framework) gave slow JAX steps:
  with EdgeViT-XXS at 2 threads, JAX's first step after a PyTorch turn took
  3.5-10.8 s against 2.2-2.5 s alone; with MobileViTv2-0.5 at 256 every JAX step
  of the turn was slower (6.4-7.2 s against 3.4-3.8 s alone). In one process
  holding both frameworks the JAX step was 2-3x slower too, and interleaving the
  two there once crashed in libc's free.
  """
  host_before = host_gemm_gmacs()
  time_steps = _train_timer(framework, name, args)
  seconds = time_steps(args.train_steps)
  time.sleep(0.5)  # Let the framework's idle OpenMP workers stop spinning first.
  host = min(host_before, host_gemm_gmacs())
  print(f"{_SECONDS_TAG}{seconds!r} {_HOST_TAG}{host!r}", flush=True)


def _train_turn_argv(framework: str, name: str, argv: Sequence[str]) -> list[str]:
  """The parent's arguments, narrowed to one model trained by one framework.

  argparse keeps the last value given, so the appended flags win; --train_models
  must become 'all' too, or a parent list naming other models fails the worker's
  argument check.
  """
  return [*argv, f"--models={name}", "--train_models=all",
          f"--train_worker={framework}"]


def _train_turn(framework: str, name: str, argv: Sequence[str]) -> tuple[float, float]:
  """(seconds per step, slower host GEMM probe) of one `serve_train_turn` process."""
  result = subprocess.run(
      [sys.executable, "-m", "vit_edge.tools.bench_peers",
       *_train_turn_argv(framework, name, argv)],
      stdout=subprocess.PIPE, text=True, check=False)
  for line in result.stdout.splitlines():
    if line.startswith(_SECONDS_TAG):
      seconds, host = line.split()
      return float(seconds[len(_SECONDS_TAG):]), float(host[len(_HOST_TAG):])
  raise RuntimeError(f"the {framework} training turn for {name} exited with "
                     f"{result.returncode} before answering; its stderr is above.")


def _time_training(name: str, args, argv: Sequence[str]
                   ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Seconds per step and host GEMM rate of each framework's alternated turns."""
  seconds = {k: [] for k in TRAIN_FRAMEWORKS}
  host = {k: [] for k in TRAIN_FRAMEWORKS}
  for _ in range(args.rounds):
    for framework in TRAIN_FRAMEWORKS:
      turn_seconds, turn_host = _train_turn(framework, name, argv)
      seconds[framework].append(turn_seconds)
      host[framework].append(turn_host)
  return seconds, host


def _rows_path(out_dir: str, threads: int) -> str:
  return os.path.join(out_dir, f"rows_{threads}.jsonl")


def measure(names: Sequence[str], threads: int, args, argv: Sequence[str]) -> None:
  """Every engine's latency and both frameworks' training speed at `threads`.

  Each model's row is appended to ``rows_<threads>.jsonl`` as soon as it is
  measured, so a child killed later (e.g. out of memory) keeps the rows before.
  """
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  train_models = names if args.train_models == "all" else _csv(args.train_models)
  for name in names:
    size = _size(name, args.image_size)
    fns = _inference_fns(name, size, _paths(args.out_dir, name, size), threads,
                         args.edgevit_src)
    rounds = {engine: [] for engine in fns}
    host = []
    for _ in range(args.rounds):
      host.append(host_gemm_gmacs())
      for engine, fn in fns.items():
        rounds[engine].append(_median_ms(fn, args.runs, args.warmup))
    row = {"model": name, "image_size": size, "threads": threads,
           "ms": {e: float(np.median(v)) for e, v in rounds.items()}, "ms_rounds": rounds,
           "matmul_peak_gmacs": matmul_peak_gmacs(threads),
           "host_gmacs_rounds": host}
    del fns
    if args.train_steps and name in train_models:
      seconds, train_host = _time_training(name, args, argv)
      row["train_img_s"] = {k: args.train_batch / float(np.median(v))
                            for k, v in seconds.items()}
      row["train_s_rounds"] = seconds
      row["train_host_gmacs_rounds"] = train_host
    print(f"[{name}, {threads} thread(s)] " + json.dumps(
        {k: row[k] for k in ("ms", "train_img_s") if k in row}), flush=True)
    with open(_rows_path(args.out_dir, threads), "a") as f:
      f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------
# The table.


def _ratio(a: Optional[float], b: Optional[float]) -> str:
  return f"{a / b:.2f}" if a and b else "-"


def table(rows: Sequence[dict[str, Any]], reports: dict[str, dict[str, Any]]) -> str:
  """Markdown: latencies (ms), the issue's ratios, training img/s, parity."""
  lines = ["| model | res | threads | torch ms | ORT fp32 ms | TFLite fp32 ms | "
           "TFLite/ORT fp32 | ORT int8 dyn ms | ORT int8 static ms | TFLite int8 ms | "
           "TFLite int8/best ORT int8 | JAX train img/s | torch train img/s | "
           "JAX/torch train | torch-JAX max logit diff | TFLite int8 form, rel. logit err |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for row in rows:
    ms, report = row["ms"], reports[row["model"]]
    best_ort_int8 = min(ms["ort_int8_dynamic"], ms["ort_int8_static"])
    train = row.get("train_img_s", {})
    int8 = report["tflite_int8"]
    lines.append(
        f"| {row['model']} | {row['image_size']} | {row['threads']} | {ms['torch']:.2f} | "
        f"{ms['ort_fp32']:.2f} | {ms['tflite_fp32']:.2f} | "
        f"{_ratio(ms['tflite_fp32'], ms['ort_fp32'])} | {ms['ort_int8_dynamic']:.2f} | "
        f"{ms['ort_int8_static']:.2f} | {ms['tflite_int8']:.2f} | "
        f"{_ratio(ms['tflite_int8'], best_ort_int8)} | "
        + (f"{train['jax']:.1f} | {train['torch']:.1f} | "
           f"{_ratio(train['jax'], train['torch'])} | " if train else "- | - | - | ")
        + f"{report['torch_jax_max_abs_logit_diff']:.1e} | "
        f"{int8['int8_activations']}, {int8['relative_logit_error']:.3f} |")
  return "\n".join(lines)


def _share(gmacs: float, peak: float) -> str:
  return f"{gmacs:.1f} ({100 * gmacs / peak:.0f}%)"


def efficiency_table(rows: Sequence[dict[str, Any]],
                     reports: dict[str, dict[str, Any]]) -> str:
  """Markdown: each engine's GMAC/s and its share of the measured GEMM peak.

  Inference: conv/matmul MACs of one image over the latency. The reference
  models and ONNX Runtime are credited with the model's MACs, the TFLite file
  with its own (``latency.file_macs``): the exporter's rewrites leave it less
  work (17% less for MobileViTv2), and the model's count would put it above the
  peak. Training: 3x the forward MACs per image (forward, input gradient, weight
  gradient) times img/s.
  The peak is the faster of NumPy's and PyTorch's square float32 GEMM measured in
  the same process, so a share near 100% leaves a framework nothing to gain.
  """
  lines = ["| model | res | threads | GMAC/image | TFLite file GMAC/image | "
           "GEMM peak GMAC/s | torch | ORT fp32 | TFLite fp32 | JAX train | torch train |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    peak = row.get("matmul_peak_gmacs")
    if not peak:  # Rows measured before the efficiency table.
      continue
    peak = max(peak.values())
    report = reports[row["model"]]
    gmac = report["macs"] / 1e9
    file_gmac = report["tflite_fp32"]["macs"] / 1e9  # prepare() fills it in.
    cells = [_share(g / (row["ms"][e] / 1e3), peak)
             for g, e in ((gmac, "torch"), (gmac, "ort_fp32"), (file_gmac, "tflite_fp32"))]
    train = row.get("train_img_s", {})
    cells += [_share(3 * gmac * train[k], peak) if k in train else "-"
              for k in ("jax", "torch")]
    lines.append(f"| {row['model']} | {row['image_size']} | {row['threads']} | "
                 f"{gmac:.2f} | {file_gmac:.2f} | {peak:.1f} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# A host GEMM rate this far below the run's best for the same thread count
# marks a slowed host: the rounds measured then are not comparable.
SLOW_HOST_FRACTION = 0.85


def _span(values: Sequence[float]) -> str:
  return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def _host_probes(row: dict[str, Any]) -> list[tuple[str, list[float]]]:
  """(what was measured, its probes) of a row: inference rounds, each framework's turns."""
  train = row.get("train_host_gmacs_rounds", {})
  return [("inference rounds", row.get("host_gmacs_rounds", [])),
          *((f"{k} training turns", v) for k, v in train.items())]


def stability_table(rows: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
  """Markdown: the host's GEMM rate around each round and turn, and warnings.

  Each inference round and each training turn starts (and a turn also ends)
  with :func:`host_gemm_gmacs`. A probe below ``SLOW_HOST_FRACTION`` of the best
  probe at the same thread count gets a warning naming the model and what it
  measured, so a ratio that moved because the host slowed is not read as a
  change of code.
  """
  lines = ["| model | threads | host GMAC/s, inference rounds | host GMAC/s, JAX turns | "
           "host GMAC/s, PyTorch turns |", "|---|---:|---|---|---|"]
  best: dict[int, float] = {}
  for row in rows:
    probes = [v for _, values in _host_probes(row) for v in values]
    if probes:
      best[row["threads"]] = max(best.get(row["threads"], 0.0), *probes)
  warnings = []
  for row in rows:
    if "host_gmacs_rounds" not in row:  # Rows measured before the probes.
      continue
    train = row.get("train_host_gmacs_rounds", {})
    lines.append(f"| {row['model']} | {row['threads']} | {_span(row['host_gmacs_rounds'])} | "
                 f"{_span(train.get('jax', ()))} | {_span(train.get('torch', ()))} |")
    floor = SLOW_HOST_FRACTION * best[row["threads"]]
    for what, probes in _host_probes(row):
      slow = [i + 1 for i, v in enumerate(probes) if v < floor]
      if slow:
        warnings.append(
            f"warning: the host was slow during {row['model']}'s {what} "
            f"{', '.join(map(str, slow))} at {row['threads']} thread(s) (GEMM "
            f"{min(probes):.1f} GMAC/s against the run's best {best[row['threads']]:.1f}); "
            "compare those figures with care or rerun.")
  return "\n".join(lines), warnings


def _run_child(threads: int, argv: Sequence[str]) -> None:
  """This script with --child_threads, pinned to `threads` CPUs before any import."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads > len(cpus):
    raise ValueError(f"--threads: {threads} threads asked for, {len(cpus)} CPUs here.")
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "vit_edge.tools.bench_peers", *argv,
         f"--child_threads={threads}"]
  result = subprocess.run(cmd, env=env, check=False,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus[:threads]))
  if result.returncode:
    print(f"warning: the {threads}-thread run exited with {result.returncode} (a "
          "negative code is the signal; -9 is often out of memory: see "
          "--train_models); its finished rows are kept.", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import onnxruntime  # pylint: disable=g-import-not-at-top,unused-import
    import timm  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    print(f"error: the peer benchmark needs the optional extra ({e.name} is missing): "
          "pip install -e '.[peers]'", file=sys.stderr)
    return 2
  try:
    names, thread_counts = _check_args(args)
    if args.train_worker:
      serve_train_turn(args.train_worker, names[0], args)
      return 0
    if args.child_threads:
      measure(names, args.child_threads, args, argv)
      return 0
    os.makedirs(args.out_dir, exist_ok=True)
    reports = {name: prepare(name, args) for name in names}
    rows = []
    for threads in thread_counts:
      if os.path.exists(_rows_path(args.out_dir, threads)):
        os.remove(_rows_path(args.out_dir, threads))
      _run_child(threads, argv)
      if os.path.exists(_rows_path(args.out_dir, threads)):
        with open(_rows_path(args.out_dir, threads)) as f:
          rows += [json.loads(line) for line in f]
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  stability, warnings = stability_table(rows)
  text = "\n\n".join((table(rows, reports), efficiency_table(rows, reports), stability,
                      *warnings))
  with open(os.path.join(args.out_dir, "results.json"), "w") as f:
    json.dump({"rows": rows, "reports": reports,
               "settings": {k: v for k, v in vars(args).items()}}, f, indent=2)
  print("\n" + text, flush=True)
  return 0


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  sys.exit(main())
