"""DeViT on loopback: latency, traffic and robustness tables (Markdown; not run by tests).

Latency and traffic: for each N in ``--num_devices``, a DeViT ensemble of the
given size is exported (``vit_edge.devit.export``; random initialisation --
latency and bytes do not depend on the weights), N worker processes serve its
device files on 127.0.0.1 (one interpreter thread each) and the coordinator
classifies one image ``--iterations`` times; the baseline is the teacher
architecture as one TFLite file behind one worker over the same transport::

    python -m vit_edge.tools.bench_devit --out_dir=/tmp/devit_bench \
        --num_devices=2,4 --iterations=200 --image_size=32

Robustness (``--ensembles=NAME=WORKDIR,...``, trained ensemble runs): top-1 on
the run's eval split with every device present and with each single device
missing (its learned missing token used), e.g. one run trained with failout and
one with ``failout=0``::

    python -m vit_edge.tools.bench_devit --latency=false \
        --ensembles=failout=workdir/devit/n2/ensemble,no_failout=workdir/devit/n2/ensemble_nofail
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

from vit_edge import hugepages

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/devit_bench", "Exports go here.")
_NUM_DEVICES = flags.DEFINE_list("num_devices", ["2", "4"], "Ensemble sizes N.")
_ITERATIONS = flags.DEFINE_integer("iterations", 200, "Images per measurement.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Input side (pixels).")
_WIDTH = flags.DEFINE_integer("width", 192, "Sub-model width (DeiT-Ti: 192).")
_DEPTH = flags.DEFINE_integer("depth", 12, "Sub-model blocks.")
_HEADS = flags.DEFINE_integer("heads", 3, "Sub-model heads.")
_TEACHER = flags.DEFINE_string("teacher", "deit_small_patch16",
                               "The one-file baseline (a registry model).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes.")
_DEADLINE_MS = flags.DEFINE_float("deadline_ms", 2000.0, "Gathering deadline.")
_BASE_PORT = flags.DEFINE_integer("base_port", 50300, "First worker port.")
_LATENCY = flags.DEFINE_bool("latency", True, "Run the latency/traffic table.")
_ENSEMBLES = flags.DEFINE_list("ensembles", [],
                               "NAME=WORKDIR of trained ensembles (robustness).")
_REUSE = flags.DEFINE_bool("reuse_exports", True,
                           "Reuse the files of an earlier run in --out_dir (same "
                           "flags) instead of exporting again.")
_RECONNECT_TRIALS = flags.DEFINE_integer(
    "reconnect_trials", 0, "Kill and restart device 1 of the N=2 export this many "
    "times; print how soon after it listens again the coordinator uses it.")
_MAX_EVAL = flags.DEFINE_integer("max_eval_examples", 2000,
                                 "Eval images for the robustness table (0: all).")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start_worker(model: str, port: int) -> subprocess.Popen:
  process = subprocess.Popen(
      [sys.executable, "-m", "vit_edge.runtime.worker", f"--model={model}",
       f"--port={port}", "--threads=1"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for _ in range(2000):
    line = process.stdout.readline()
    if line.startswith("worker: serving"):
      return process
    if not line and process.poll() is not None:
      break
  raise RuntimeError(f"worker for {model} on port {port} did not start")


def _export_ensemble(n: int, out_dir: str) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  from vit_edge.devit import ensemble  # pylint: disable=g-import-not-at-top
  from vit_edge.devit import export as devit_export  # pylint: disable=g-import-not-at-top
  from vit_edge import models  # pylint: disable=g-import-not-at-top

  size = _IMAGE_SIZE.value
  teacher_dim = models.create_model(_TEACHER.value).embed_dim
  model = ensemble.DeViTEnsemble(
      num_classes=_NUM_CLASSES.value, num_devices=n, image_size=size,
      embed_dim=_WIDTH.value, depth=_DEPTH.value, num_heads=_HEADS.value,
      teacher_dim=teacher_dim)
  images = np.random.RandomState(0).randn(4, size, size, 3).astype(np.float32)
  variables = model.init(jax.random.key(0), images[:1])
  metadata = {"model": f"devit_n{n}", "image_size": size, "mean": [0.5] * 3,
              "std": [0.5] * 3,
              "label_names": [str(i) for i in range(_NUM_CLASSES.value)],
              "crop_pct": 1.0, "interpolation": "bilinear"}
  subsets = [list(range(_NUM_CLASSES.value))[k::n] for k in range(n)]
  devit_export.export_ensemble(model, variables, out_dir, images=images,
                               metadata=metadata, class_subsets=subsets)
  return os.path.join(out_dir, "manifest.json")


def _export_teacher(path: str) -> None:
  from vit_edge import export  # pylint: disable=g-import-not-at-top
  export.export_from_registry(_TEACHER.value, path, image_size=_IMAGE_SIZE.value,
                              num_classes=_NUM_CLASSES.value, max_eval_examples=0,
                              num_parity_samples=4)


def _teacher_bench(path: str, port: int, crop: np.ndarray) -> dict:
  """The one-file baseline behind one worker, same transport (bytes in, fp16 out)."""
  import grpc  # pylint: disable=g-import-not-at-top
  from vit_edge.runtime import collab  # pylint: disable=g-import-not-at-top
  from vit_edge.runtime import worker  # pylint: disable=g-import-not-at-top
  process = _start_worker(path, port)
  try:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                    options=collab.RECONNECT_OPTIONS)
    run = channel.unary_unary(worker.RUN_METHOD)
    request = crop.tobytes()
    response = run(request, timeout=_DEADLINE_MS.value / 1e3)
    latencies = []
    for _ in range(_ITERATIONS.value):
      start = time.perf_counter()
      response = run(request, timeout=_DEADLINE_MS.value / 1e3)
      logits = np.frombuffer(response, worker.WIRE_DTYPE).astype(np.float32)
      e = np.exp(logits - logits.max())
      _ = e / e.sum()
      latencies.append((time.perf_counter() - start) * 1e3)
    channel.close()
    return {"p50_ms": float(np.percentile(latencies, 50)),
            "p95_ms": float(np.percentile(latencies, 95)),
            "bytes_out": len(request), "bytes_in": len(response)}
  finally:
    process.kill()
    process.wait()


def latency_table() -> None:
  from vit_edge.runtime import collab as collab_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  size = _IMAGE_SIZE.value
  crop = np.random.RandomState(1).randint(0, 256, (size, size, 3), np.uint8)
  rows = []
  teacher_path = os.path.join(_OUT_DIR.value, "teacher.tflite")
  if not (_REUSE.value and os.path.exists(teacher_path)):
    _export_teacher(teacher_path)
  t = _teacher_bench(teacher_path, _BASE_PORT.value, crop)
  rows.append((f"{_TEACHER.value} (one file, one worker)", 1, t["p50_ms"],
               t["p95_ms"], t["bytes_out"], t["bytes_in"], 0))
  for n in (int(x) for x in _NUM_DEVICES.value):
    out_dir = os.path.join(_OUT_DIR.value, f"n{n}")
    manifest = os.path.join(out_dir, "manifest.json")
    if not (_REUSE.value and os.path.exists(manifest)):
      manifest = _export_ensemble(n, out_dir)
    ports = [_BASE_PORT.value + 1 + n * 10 + k for k in range(n)]
    processes = [_start_worker(os.path.join(out_dir, f"sub_{k}.tflite"), p)
                 for k, p in enumerate(ports)]
    try:
      collab = collab_lib.Collaboration(manifest, [f"127.0.0.1:{p}" for p in ports],
                                        deadline_s=_DEADLINE_MS.value / 1e3)
      stats = collab_lib.bench(collab, crop, _ITERATIONS.value)
      collab.close()
    finally:
      for p in processes:
        p.kill()
        p.wait()
    d = stats["devices"][0]
    rows.append((f"DeViT N={n} (DeiT width {_WIDTH.value}, depth {_DEPTH.value})", n,
                 stats["p50_ms"], stats["p95_ms"], d["bytes_out"], d["bytes_in"],
                 stats["degraded"]))
  print(f"\nLoopback, {size}x{size} input, {_ITERATIONS.value} images, one interpreter "
        "thread per worker, deadline {:.0f} ms:\n".format(_DEADLINE_MS.value))
  print("| setup | workers | p50 ms | p95 ms | bytes to each worker / image | "
        "bytes from each worker / image | degraded answers |")
  print("|---|---|---|---|---|---|---|")
  for name, n, p50, p95, out, inn, degraded in rows:
    print(f"| {name} | {n} | {p50:.2f} | {p95:.2f} | {out} | {inn} | {degraded} |")


def reconnect_table() -> None:
  """Seconds from a restarted worker's 'listening' line to the first answer using it."""
  from vit_edge.runtime import collab as collab_lib  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(_OUT_DIR.value, "n2")
  ports = [_BASE_PORT.value + 90, _BASE_PORT.value + 91]
  model = lambda k: os.path.join(out_dir, f"sub_{k}.tflite")
  processes = [_start_worker(model(k), p) for k, p in enumerate(ports)]
  collab = collab_lib.Collaboration(os.path.join(out_dir, "manifest.json"),
                                    [f"127.0.0.1:{p}" for p in ports],
                                    deadline_s=_DEADLINE_MS.value / 1e3)
  crop = np.zeros((_IMAGE_SIZE.value,) * 2 + (3,), np.uint8)
  gaps = []
  try:
    for _ in range(_RECONNECT_TRIALS.value):
      processes[1].kill()
      processes[1].wait()
      for _ in range(20):  # The channel notices and backs off.
        collab.classify_crop(crop)
        time.sleep(0.05)
      processes[1] = _start_worker(model(1), ports[1])
      start = time.perf_counter()
      for _ in range(3000):  # Polls every 10 ms, at most ~30 s.
        if not collab.classify_crop(crop).missing:
          break
        time.sleep(0.01)
      gaps.append(time.perf_counter() - start)
  finally:
    collab.close()
    for p in processes:
      p.kill()
      p.wait()
  print("\nRestarted worker used again after (s): "
        + ", ".join(f"{g:.2f}" for g in gaps))


def robustness_table() -> None:
  from vit_edge.devit import evaluate  # pylint: disable=g-import-not-at-top

  rows = []
  for item in _ENSEMBLES.value:
    name, _, workdir = item.partition("=")
    rows.append((name, evaluate.missing_device_accuracy(workdir, _MAX_EVAL.value)))
  n_max = max(r.num_devices for _, r in rows)
  print("\nTop-1 (%) with every device, and with each single device missing:\n")
  print("| run | N | failout | images | all present | "
        + " | ".join(f"device {k} missing" for k in range(n_max)) + " |")
  print("|---|---|---|---|---|" + "---|" * n_max)
  for name, r in rows:
    cells = [f"{a:.2f}" for a in r.device_missing] + ["-"] * (n_max - r.num_devices)
    print(f"| {name} | {r.num_devices} | {r.failout} | {r.images} | "
          f"{r.all_present:.2f} | " + " | ".join(cells) + " |")


def main(argv):
  del argv
  if _LATENCY.value:
    latency_table()
  if _RECONNECT_TRIALS.value:
    reconnect_table()
  if _ENSEMBLES.value:
    robustness_table()


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  app.run(main)
