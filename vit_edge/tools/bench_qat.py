"""QAT int8 vs post-training int8 vs fp32 on one checkpoint: a Markdown table.

Rows: the fp32 export of a float run; its post-training int8 exports, by the
TensorFlow converter (today's default, ``--quantize=int8``) and by Qwix + the
LiteRT converter calibrated with forward passes (:func:`vit_edge.compress.qat.
calibrate`, no TensorFlow); and the int8 export of a QAT fine-tune of that run
(``config.qat.enabled``, its learned ranges). Columns: TFLite top-1 on the eval
split, top-1 agreement with the fp32 JAX model, 1-thread latency (median of
``vit_edge.runtime.latency.measure``), file size, ops left off XNNPACK.

Example (digits; the QAT run fine-tunes the float one, see README "Compression")::

    python -m vit_edge.tools.bench_qat --fp32=/tmp/fp32 --qat=/tmp/qat_ft \\
        --out_dir=/tmp/bench_qat
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from vit_edge import hugepages

_FP32 = flags.DEFINE_string("fp32", None, "Float training run (workdir).")
_QAT = flags.DEFINE_string("qat", None, "QAT run fine-tuned from --fp32 (workdir).")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/bench_qat", "Where the files go.")
_CALIBRATION = flags.DEFINE_integer("calibration", 200,
                                    "Training images for post-training ranges.")
_RUNS = flags.DEFINE_integer("runs", 200, "Timed invocations per file.")


def _eval_set(workdir: str):
  """(images, labels, fp32 logits) of the eval split, and the run's pieces."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top
  model, variables, config, info = train.load_trained_model(workdir)
  batches = input_pipeline.create_eval_iterator(
      config, mean=info["mean"], std=info["std"], local_batch_size=64)
  images, labels = [], []
  for batch in batches:
    keep = np.asarray(batch["mask"]) > 0
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
  images, labels = np.concatenate(images), np.concatenate(labels)
  logits_fn = jax.jit(lambda x: model.apply(variables, x, train=False)[0])
  logits = np.concatenate([np.asarray(logits_fn(images[i:i + 64]))
                           for i in range(0, len(images), 64)])
  return images, labels, logits, (model, variables, config, info)


def _qwix_ptq(workdir: str, out: str, num_samples: int):
  """Post-training int8 by Qwix + LiteRT (ranges from float forward passes)."""
  from vit_edge import train  # pylint: disable=g-import-not-at-top
  from vit_edge.compress import qat  # pylint: disable=g-import-not-at-top
  from vit_edge.export import data  # pylint: disable=g-import-not-at-top
  from vit_edge.export import metadata as metadata_lib  # pylint: disable=g-import-not-at-top
  from vit_edge.export import pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  model, variables, config, info = train.load_trained_model(workdir)
  samples = data.representative_from_config(config, info["mean"], info["std"],
                                            num_samples)
  images = np.concatenate([np.asarray(s[0] if isinstance(s, (list, tuple)) else s)
                           .reshape((-1,) + tuple(np.shape(s)[-3:]))
                           for s in samples()])
  stats = qat.calibrate(model, variables["params"],
                        (images[i:i + 50] for i in range(0, len(images), 50)))
  cmodel = qat.conversion_model(model, variables["params"], stats)
  eval_batches = input_pipeline.create_eval_iterator(
      config, mean=info["mean"], std=info["std"], local_batch_size=64)
  metadata = metadata_lib.run_metadata(config, info, workdir,
                                       step=data.checkpoint_step(workdir, None),
                                       use_ema=True,
                                       trained_image_size=int(config.image_size))
  return pipeline.export(
      cmodel, {"params": variables["params"]}, out, metadata=metadata,
      quantize="int8", parity_images=data.first_images(eval_batches, 16),
      eval_batches=eval_batches, has_labels=True,
      converter=lambda m, v, spec: qat.to_tflite(m, v, 0, serving=spec))


def run(fp32: str, qat_run: str, out_dir: str, calibration: int = 200,
        runs: int = 200) -> str:
  """Exports the four files, measures them and returns the Markdown table."""
  from vit_edge.export import pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge.export import validate  # pylint: disable=g-import-not-at-top
  from vit_edge.runtime import latency  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  images, labels, fp32_logits, _ = _eval_set(fp32)
  path = lambda name: os.path.join(out_dir, name + ".tflite")
  rows = [
      ("fp32", fp32, lambda: pipeline.export_from_workdir(
          fp32, path("fp32"), quantize="none", max_eval_examples=0)),
      ("post-training int8 (TF converter, default)", fp32,
       lambda: pipeline.export_from_workdir(fp32, path("ptq_tf"), quantize="int8",
                                            num_calibration_samples=calibration,
                                            max_eval_examples=0)),
      ("post-training int8 (Qwix + LiteRT)", fp32,
       lambda: _qwix_ptq(fp32, path("ptq_qwix"), calibration)),
      ("QAT int8 (Qwix + LiteRT, learned ranges)", qat_run,
       lambda: pipeline.export_from_workdir(qat_run, path("qat"), quantize="int8",
                                            max_eval_examples=0)),
  ]
  lines = [f"Eval images: {len(images)}; fp32 JAX top-1 "
           f"{100 * np.mean(fp32_logits.argmax(-1) == labels):.2f}%.", "",
           "| file | top-1 (TFLite) | agreement with fp32 | latency 1 thread (ms) "
           "| size (KB) | ops off XNNPACK |", "|---|---|---|---|---|---|"]
  for name, _, export_fn in rows:
    report = export_fn()
    with open(report.path, "rb") as f:
      tflite_model = f.read()
    logits = validate.tflite_predict(tflite_model, images, num_threads=1)
    pred = logits.argmax(-1)
    timing = latency.measure(report.path, num_threads=1, runs=runs)
    off = timing.get("undelegated_ops") or {}
    lines.append(
        f"| {name} | {100 * np.mean(pred == labels):.2f}% | "
        f"{100 * np.mean(pred == fp32_logits.argmax(-1)):.2f}% | "
        f"{timing['median_ms']:.3f} | {report.size_bytes / 1024:.0f} | "
        f"{', '.join(f'{k} x{v}' for k, v in off.items()) or 'none'} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  del argv
  if not _FP32.value or not _QAT.value:
    raise app.UsageError("--fp32 and --qat are required (training workdirs).")
  print(run(_FP32.value, _QAT.value, _OUT_DIR.value, _CALIBRATION.value,
            _RUNS.value))


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  app.run(main)
