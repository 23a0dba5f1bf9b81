r"""On-device benchmark of exported models: size, latency, memory, accuracy, efficiency.

Usage::

    python -m vit_edge.bench --models=edgevit_xxs,mobilevitv2_100,tformer_s \
        --image_size=224 --quantize=none,fp16,dynamic,int8 --threads=1,2 \
        --runs=50 --warmup=10 --out_dir=bench_out [--workdirs=W1,W2,...]

For every model and quantisation mode it exports a .tflite (randomly initialised,
calibrated on the embedded digits data; or, for each training run of
``--workdirs``, its trained checkpoint), then reports:

* params and MACs (conv + matmul multiply-accumulates, from
  :func:`vit_edge.complexity.model_complexity`);
* the .tflite size;
* latency: median and 90th percentile of ``invoke()`` over ``--runs`` runs after
  ``--warmup`` runs, per thread count, with LiteRT's default XNNPACK delegate, each
  in a fresh subprocess (:mod:`vit_edge.runtime.latency`);
* peak memory: that subprocess's peak resident set minus its resident set after
  importing numpy and LiteRT (model, tensor arena, packed weights);
* ``--quantize`` entries are export modes; ``int8:static`` / ``int8:dynamic``
  choose how int8 quantises activations (:class:`vit_edge.export.Int8Policy`;
  plain ``int8`` is the model's own choice, shown as ``int8:<its choice>``);
* the relative logit error of the file on the parity images (mean
  ``||logits_tflite - logits_jax|| / ||logits_jax||``);
* top-1 agreement with JAX on the digits test split (360 images), and, for the
  model of each ``--workdirs`` run (an extra set of rows, exported from its
  checkpoint at its training resolution), agreement and top-1 accuracy on its
  eval split;
* the machine's single-thread fp32 matmul rate, measured in the same run on a
  TFLite FULLY_CONNECTED (XNNPACK GEMM, like for like with the models' own
  GEMMs; the best of three shapes), and each model's achieved fraction of it:
  ``2 * MACs / latency / rate``, with the MACs the file computes
  (:func:`vit_edge.runtime.latency.file_macs`; the exporter's rewrites leave
  fewer than the JAX model's count in the GMACs column);
* XNNPACK partitions and the op types that fall off XNNPACK, and with
  ``--profile_ops`` a per-op-type time breakdown of every file
  (:func:`vit_edge.runtime.latency.profile_ops`).

Segmentation models (``fpn_*``, ``upernet_*``) export the dense spec (logits at
the input resolution and the class map; pixel agreement in the parity line) with
14 classes (LPCVC 2023) when randomly initialised.

It prints a Markdown table, writes ``bench.csv`` and ``bench.json``, and plots MACs
against latency in ``bench.png``.

Example::

    rows = run_benchmark(["tformer_s"], image_size=224, quantize_modes=["none"],
                         threads=[1], out_dir="bench_out")
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from vit_edge import rundir
from vit_edge.runtime import latency

# (M, K, N) of the GEMMs timed for the machine's matmul rate.
GEMM_SHAPES = ((196, 384, 1536), (512, 512, 512), (1024, 1024, 1024))


@dataclasses.dataclass
class Row:
  """One (model, quantisation, threads) measurement."""
  model: str
  quantize: str
  threads: int
  image_size: int
  params_m: float
  gmacs: float
  file_gmacs: float  # What the .tflite file computes (latency.file_macs).
  size_mb: float
  median_ms: float
  p90_ms: float
  min_ms: float
  peak_mb: float
  speedup_vs_fp32: Optional[float]
  matmul_fraction: Optional[float]
  top1_agreement: Optional[float]
  top1_accuracy: Optional[float]
  partitions: int
  undelegated: str
  source: str
  logit_error: Optional[float] = None  # Mean ||l_tflite - l_jax|| / ||l_jax||.


def _latency(path: str, threads: int, runs: int, warmup: int,
             profile_ops: bool = False) -> dict[str, Any]:
  """Runs vit_edge.runtime.latency in a fresh process (for a clean memory peak).

  With `profile_ops`, the per-op isolation profile it prints is saved next to
  the model as ``<model>.ops.txt``.
  """
  cmd = [sys.executable, "-m", "vit_edge.runtime.latency", path,
         f"--threads={threads}", f"--runs={runs}", f"--warmup={warmup}"]
  if profile_ops:
    cmd.append("--profile_ops")
  # The child must import this very vit_edge, also when it is not installed.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join(
                 p for p in (root, os.environ.get("PYTHONPATH")) if p))
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if result.returncode:
    raise RuntimeError(f"Latency run failed for {path} ({threads} threads):\n"
                       f"{result.stderr[-2000:]}")
  lines = result.stdout.strip().splitlines()
  if profile_ops:
    with open(path + ".ops.txt", "w") as f:
      f.write("\n".join(lines[:-1]) + "\n")
  return json.loads(lines[-1])


def _gemm(weights: np.ndarray):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def gemm(x):
    return tf.matmul(x, tf.constant(weights))

  return gemm


def matmul_rate(out_dir: str, runs: int, warmup: int) -> dict[str, Any]:
  """Single-thread fp32 GEMM rate (FLOP/s) of TFLite FULLY_CONNECTED on XNNPACK.

  Returns the best rate over :data:`GEMM_SHAPES` and every shape's figure.

  Example::

      matmul_rate("bench_out", runs=30, warmup=5)["flops_per_s"]
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  per_shape = {}
  for m, k, n in GEMM_SHAPES:
    weights = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    # The constant is created inside the graph: a captured tensor would become a
    # second model input, i.e. a GEMM with dynamic weights.
    fn = tf.function(_gemm(weights),
                     input_signature=[tf.TensorSpec((m, k), tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [fn.get_concrete_function()], fn)
    path = os.path.join(out_dir, f"gemm_{m}x{k}x{n}.tflite")
    with open(path, "wb") as f:
      f.write(converter.convert())
    stats = _latency(path, 1, runs, warmup)
    per_shape[f"{m}x{k}x{n}"] = 2.0 * m * k * n / (stats["median_ms"] * 1e-3)
  best = max(per_shape, key=per_shape.get)
  return {"flops_per_s": per_shape[best], "shape": best, "per_shape": per_shape,
          "method": "TFLite FULLY_CONNECTED fp32, XNNPACK, 1 thread, median"}


def _run_config(workdir: str) -> dict[str, Any]:
  return rundir.load_config_dict(workdir)


# Registry segmentation models are measured with LPCVC 2023's 14 classes: their
# logits are per pixel, so 1000 classes would dominate the cost.
SEGMENTATION_BENCH_CLASSES = 14


def registry_num_classes(name: str) -> int:
  """Classes of a randomly initialised registry model in the benchmark."""
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  family = models.get_model_info(name).family
  return SEGMENTATION_BENCH_CLASSES if family == "segmentation" else 1000


def _complexity(name: str, image_size: int, workdir: Optional[str],
                run_config: Optional[dict[str, Any]]):
  from vit_edge import complexity  # pylint: disable=g-import-not-at-top
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  if workdir:
    from vit_edge import train  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    config = ml_collections.ConfigDict(run_config)
    num_classes = rundir.load_dataset_info(workdir)["num_classes"]
    with config.unlocked():
      config.dtype = "float32"
    model = train.build_model(config, num_classes)
  else:
    model = models.create_model_at_size(name, image_size,
                                        num_classes=registry_num_classes(name))
  return complexity.model_complexity(model, image_size)


def run_benchmark(model_names: Sequence[str], *, image_size: Optional[int] = 224,
                  quantize_modes: Sequence[str] = ("none", "fp16", "dynamic", "int8"),
                  threads: Sequence[int] = (1, 2), runs: int = 50, warmup: int = 10,
                  out_dir: str = "bench_out", workdirs: Sequence[str] = (),
                  num_calibration_samples: int = 200,
                  max_eval_examples: Optional[int] = None,
                  gelu: str = "tanh", reuse_exports: bool = False,
                  profile_ops: bool = False, matmul: bool = True) -> dict[str, Any]:
  """Exports and measures every (model, mode, threads); see the module docstring.

  Returns:
    ``{"rows": [Row, ...], "matmul": matmul_rate(...), "machine": {...}}``;
    with ``matmul=False`` the matmul rate is not measured (None; the rows'
    matmul_fraction too).

  Example::

      result = run_benchmark(["tformer_s"], quantize_modes=["none", "int8"],
                             threads=[1])
  """
  from vit_edge import export  # pylint: disable=g-import-not-at-top
  for mode in quantize_modes:
    split_mode(mode)
  if runs < 1 or warmup < 0 or not threads or min(threads) < 1:
    raise ValueError(f"runs={runs} must be >= 1, warmup={warmup} >= 0 and threads="
                     f"{list(threads)} positive.")
  os.makedirs(out_dir, exist_ok=True)
  # Registry models (random init), then each workdir's model from its checkpoint
  # (the configs are read first, so that a wrong path fails before any export).
  entries = [(name, None, None) for name in model_names]
  for w in workdirs:
    run_config = _run_config(w)
    entries.append((run_config["model"], w, run_config))
  machine = {"processor": _cpu_name(), "cpus": os.cpu_count(),
             "python": platform.python_version(),
             "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
  rate = None
  if matmul:
    print(f"Measuring the fp32 matmul rate ({machine['processor']}) ...", flush=True)
    rate = matmul_rate(out_dir, runs=max(runs, 20), warmup=max(warmup, 5))
    print(f"  {rate['flops_per_s'] / 1e9:.1f} GFLOP/s ({rate['shape']}).", flush=True)
  rows: list[Row] = []
  for name, workdir, run_config in entries:
    from_workdir = workdir is not None
    size = run_config["image_size"] if from_workdir else image_size
    stats = _complexity(name, size or 224, workdir, run_config)
    size = size or 224
    fp32_ms: dict[int, float] = {}
    for mode in quantize_modes:
      tag = "_ckpt" if from_workdir else ""
      path = os.path.join(out_dir,
                          f"{name}{tag}_{size}_{mode.replace(':', '_')}.tflite")
      print(f"Exporting {name} at {size} ({mode}) ...", flush=True)
      quantize, activations = split_mode(mode)
      common = dict(quantize=quantize, num_calibration_samples=num_calibration_samples,
                    max_eval_examples=max_eval_examples, gelu=gelu,
                    int8_policy=export.Int8Policy(activations=activations))
      report_path = path + ".json"
      if reuse_exports and os.path.exists(path) and os.path.exists(report_path):
        with open(report_path) as f:
          report = export.ExportReport(**json.load(f))
        print(f"  reusing {path}", flush=True)
      else:
        if from_workdir:
          report = export.export_from_workdir(workdir, path, **common)
        else:
          report = export.export_from_registry(
              name, path, image_size=size, num_classes=registry_num_classes(name),
              **common)
        with open(report_path, "w") as f:
          json.dump(dataclasses.asdict(report), f, indent=2)
        print("  " + report.summary().replace("\n", "\n  "), flush=True)
      # A plain "int8" row names the form the model chose.
      label = mode if ":" in mode or not report.int8_activations else (
          f"{mode}:{report.int8_activations}")
      # The exporter's rewrites leave the file fewer MACs than the model (17% for
      # MobileViTv2): the matmul fraction credits the file with what it computes.
      file_macs = latency.file_macs(path)
      for t in threads:
        lat = _latency(path, t, runs, warmup, profile_ops=profile_ops and t == 1)
        if mode == "none":
          fp32_ms[t] = lat["median_ms"]
        rows.append(Row(
            model=name, quantize=label, threads=t, image_size=size,
            params_m=stats.params / 1e6, gmacs=stats.macs / 1e9,
            file_gmacs=file_macs / 1e9,
            size_mb=report.size_bytes / 1e6, median_ms=lat["median_ms"],
            p90_ms=lat["p90_ms"], min_ms=lat["min_ms"], peak_mb=lat["peak_mb"],
            speedup_vs_fp32=(fp32_ms[t] / lat["median_ms"] if t in fp32_ms else None),
            matmul_fraction=(2 * file_macs / (lat["median_ms"] * 1e-3)
                             / rate["flops_per_s"] if rate else None),
            top1_agreement=report.eval_top1_agreement,
            top1_accuracy=report.eval_top1_tflite,
            partitions=lat["delegate_partitions"],
            undelegated=" ".join(f"{k}x{v}" for k, v in lat["undelegated_ops"].items()),
            source="checkpoint" if from_workdir else "random init",
            logit_error=report.relative_logit_error))
        print(f"  {t} thread(s): median {lat['median_ms']:.2f} ms, p90 "
              f"{lat['p90_ms']:.2f} ms, peak {lat['peak_mb']:.1f} MB, "
              f"{lat['delegate_partitions']} XNNPACK partition(s)", flush=True)
  machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  result = {"rows": rows, "matmul": rate, "machine": machine,
            "settings": {"runs": runs, "warmup": warmup, "threads": list(threads),
                         "quantize": list(quantize_modes), "gelu": gelu}}
  _write_outputs(result, out_dir)
  return result


def split_mode(mode: str) -> tuple[str, str]:
  """``"int8:dynamic"`` -> ("int8", "dynamic"); a plain mode -> (mode, "auto").

  Raises:
    ValueError: an unknown mode, or activations on a mode other than int8.
  """
  from vit_edge import export  # pylint: disable=g-import-not-at-top
  quantize, _, activations = mode.partition(":")
  export.check_quantize(quantize)
  if activations and (quantize != "int8" or
                      activations not in export.INT8_ACTIVATIONS):
    raise ValueError(f"--quantize entry {mode!r}: only int8 takes activations, one "
                     f"of {export.INT8_ACTIVATIONS} (e.g. int8:static).")
  return quantize, activations or "auto"


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _fmt(value, spec: str, missing: str = "-") -> str:
  return missing if value is None else format(value, spec)


def markdown_table(rows: Sequence[Row]) -> str:
  """The rows as a Markdown table (what the CLI prints)."""
  header = ("| model | res | quant | thr | params (M) | GMACs | file GMACs | size (MB) | "
            "median ms | p90 ms | min ms | peak MB | x fp32 | matmul frac | top-1 agree | "
            "top-1 acc | "
            "logit err | XNNPACK parts | off XNNPACK |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for r in rows:
    model = r.model + (" (ckpt)" if r.source == "checkpoint" else "")
    lines.append(
        f"| {model} | {r.image_size} | {r.quantize} | {r.threads} | {r.params_m:.2f} | "
        f"{r.gmacs:.3f} | {r.file_gmacs:.3f} | {r.size_mb:.2f} | {r.median_ms:.2f} | "
        f"{r.p90_ms:.2f} | {r.min_ms:.2f} | {r.peak_mb:.1f} | {_fmt(r.speedup_vs_fp32, '.2f')} | "
        f"{_fmt(r.matmul_fraction, '.0%')} | {_fmt(r.top1_agreement, '.1%')} | "
        f"{_fmt(r.top1_accuracy, '.1%')} | {_fmt(r.logit_error, '.3f')} | "
        f"{r.partitions} | {r.undelegated or '-'} |")
  return "\n".join(lines)


def _write_outputs(result: dict[str, Any], out_dir: str) -> None:
  rows = result["rows"]
  table = markdown_table(rows)
  rate = result["matmul"]
  machine_rate = (
      f"; single-thread fp32 matmul rate {rate['flops_per_s'] / 1e9:.1f} GFLOP/s "
      f"({rate['method']}, best of {list(rate['per_shape'])}).\nmatmul frac = 2 * "
      "the file's MACs (file GMACs) / median latency / that rate; GMACs counts the "
      "JAX model" if rate else "")
  header = (f"Machine: {result['machine']['processor']} ({result['machine']['cpus']} "
            f"CPUs){machine_rate}. Peak MB = peak "
            f"RSS of the measuring subprocess minus its RSS after importing numpy "
            f"and LiteRT. Load average "
            f"start {result['machine']['loadavg_start']}, end "
            f"{result['machine']['loadavg_end']}.\n")
  print("\n" + header + "\n" + table)
  with open(os.path.join(out_dir, "bench.md"), "w") as f:
    f.write(header + "\n" + table + "\n")
  with open(os.path.join(out_dir, "bench.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Row)])
    writer.writeheader()
    for r in rows:
      writer.writerow(dataclasses.asdict(r))
  with open(os.path.join(out_dir, "bench.json"), "w") as f:
    json.dump(dict(result, rows=[dataclasses.asdict(r) for r in rows]), f, indent=2)
  plot(rows, os.path.join(out_dir, "bench.png"))


def plot(rows: Sequence[Row], path: str) -> None:
  """MACs against single-thread latency, one marker per quantisation mode.

  Example::

      plot(result["rows"], "bench_out/bench.png")
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  threads = min(r.threads for r in rows)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  markers = {"none": "o", "fp16": "s", "dynamic": "^", "int8": "D"}
  for mode in dict.fromkeys(r.quantize for r in rows):
    sel = [r for r in rows if r.quantize == mode and r.threads == threads]
    ax.scatter([r.median_ms for r in sel], [r.gmacs for r in sel],
               marker=markers.get(mode, "x"), label=mode, s=50)
    for r in sel:
      ax.annotate(r.model, (r.median_ms, r.gmacs), fontsize=7,
                  xytext=(4, 3), textcoords="offset points")
  ax.set_xlabel(f"median latency, {threads} thread(s) (ms)")
  ax.set_ylabel("GMACs")
  ax.set_title("TFLite (XNNPACK) latency vs compute, batch 1")
  ax.grid(alpha=0.3)
  ax.legend(title="quantize")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _csv_list(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Command-line entry point (see the module docstring)."""
  parser = argparse.ArgumentParser(prog="python -m vit_edge.bench")
  parser.add_argument("--models", default="edgevit_xxs,mobilevitv2_100,tformer_s")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--quantize", default="none,fp16,dynamic,int8")
  parser.add_argument("--threads", default="1,2")
  parser.add_argument("--runs", type=int, default=50)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--workdirs", default="",
                      help="comma-separated training runs: each model is exported "
                           "from its checkpoint and its accuracy reported")
  parser.add_argument("--num_calibration_samples", type=int, default=200)
  parser.add_argument("--max_eval_examples", type=int, default=None,
                      help="cap on the agreement pass (default: 360 digits / the "
                           "eval split)")
  parser.add_argument("--gelu", default="tanh", choices=("tanh", "exact"))
  parser.add_argument("--out_dir", default="bench_out")
  parser.add_argument("--reuse_exports", action="store_true",
                      help="re-measure the .tflite files (and their export reports) "
                           "already in --out_dir instead of exporting again")
  parser.add_argument("--profile_ops", action="store_true",
                      help="also write each model's per-op time breakdown "
                           "(<model>.tflite.ops.txt, 1 thread)")
  args = parser.parse_args(argv)
  try:
    threads = [int(t) for t in _csv_list(args.threads)]
  except ValueError as e:
    parser.error(f"--threads={args.threads!r} must be comma-separated integers, e.g. "
                 f"1,2 ({e}).")
  start = time.time()
  result = run_benchmark(
      _csv_list(args.models), image_size=args.image_size,
      quantize_modes=_csv_list(args.quantize), threads=threads, runs=args.runs,
      warmup=args.warmup, out_dir=args.out_dir, workdirs=_csv_list(args.workdirs),
      num_calibration_samples=args.num_calibration_samples,
      max_eval_examples=args.max_eval_examples, gelu=args.gelu,
      reuse_exports=args.reuse_exports, profile_ops=args.profile_ops)
  print(f"\nWrote {args.out_dir}/bench.md, bench.csv, bench.json, bench.png "
        f"({time.time() - start:.0f} s).")
  return result


if __name__ == "__main__":
  main()
