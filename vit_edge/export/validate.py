"""Validation of an export: the parity guard, the agreement pass and the report.

The exported bytes run in ai_edge_litert on real samples and are compared with
the JAX model (always float32). Every declared float output (logits, probs,
features, dense logits) of a float export must satisfy, over the samples,

    max |out_tflite - out_jax| <= atol + rtol * max |out_jax|

with (atol, rtol) = (1e-3, 1e-3) for ``none`` and (1e-2, 1e-2) for ``fp16``
(:data:`FLOAT_TOLERANCES`), or the export raises :class:`ParityError` and writes
nothing. Class maps are compared by agreement, quantised exports only report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Union

import numpy as np

from vit_edge.export import serving as serving_lib

# (atol, rtol) of the parity guard for float exports, relative to max |output|.
FLOAT_TOLERANCES = {"none": (1e-3, 1e-3), "fp16": (1e-2, 1e-2)}


class ParityError(RuntimeError):
  """The TFLite model does not reproduce the JAX model within the tolerance."""


def tflite_predict(tflite_model: bytes, images: np.ndarray,
                   num_threads: Optional[int] = None) -> np.ndarray:
  """Float logits of a vit_edge TFLite classification model, one image at a time.

  Handles float and full-integer models (quantising the input and
  dequantising the output with the model's parameters).

  Raises:
    ValueError: if `images` is not [N, H, W, C] of the model's input size.

  Example::

      logits = tflite_predict(tflite_bytes, images)  # [N, num_classes]
  """
  from vit_edge.runtime import classifier  # pylint: disable=g-import-not-at-top
  runner = classifier.TFLiteModel(tflite_model, num_threads=num_threads)
  return runner.predict(images)["logits"]


def tflite_outputs(tflite_model: bytes, inputs: dict[str, np.ndarray],
                   num_threads: Optional[int] = None) -> dict[str, np.ndarray]:
  """Every output of the model for batched `inputs` (by input name), one example at a time.

  Example::

      out = tflite_outputs(tflite_bytes, {"tokens": t, "mask": m})
  """
  from vit_edge.runtime import classifier  # pylint: disable=g-import-not-at-top
  return classifier.TFLiteModel(tflite_model, num_threads=num_threads).run(inputs)


@dataclasses.dataclass
class ExportReport:
  """What an export measured (printed by the CLI, returned by the functions).

  Attributes:
    path: the written file.
    model: registry name.
    quantize: the quantisation mode.
    size_bytes: file size.
    num_parity_samples: samples of the parity check.
    max_abs_logit_diff: max |out_tflite - out_jax| of the primary output (the
      logits, or the first declared float output) over them.
    max_abs_logit: max |out_jax| of that output.
    relative_logit_error: mean over the parity samples of ||out_tflite -
      out_jax|| / ||out_jax|| for that output.
    int8_activations: "static" or "dynamic" for int8 files (None otherwise; see
      :class:`vit_edge.export.Int8Policy`).
    tolerance: its allowed max difference (float exports), else None.
    parity_top1_agreement: fraction of parity samples with the same top-1 (of
      the logits; 1.0 without logits).
    num_eval_examples: images of the agreement/accuracy pass (0: skipped).
    eval_top1_agreement: fraction with the same top-1 in TFLite and JAX.
    eval_top1_tflite: TFLite accuracy (None without labels, i.e. --model).
    eval_top1_jax: JAX accuracy on the same images.
    seconds: wall time of the export.
    outputs: per declared output: max_abs_diff, max_abs, tolerance (float
      kinds) or agreement (class maps).

  Example::

      report = export_from_registry("edgevit_xxs", "m.tflite", image_size=224)
      print(report.summary())
  """

  path: str
  model: str
  quantize: str
  size_bytes: int
  num_parity_samples: int
  max_abs_logit_diff: float
  max_abs_logit: float
  tolerance: Optional[float]
  parity_top1_agreement: float
  num_eval_examples: int = 0
  eval_top1_agreement: Optional[float] = None
  eval_top1_tflite: Optional[float] = None
  eval_top1_jax: Optional[float] = None
  seconds: float = 0.0
  outputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  int8_activations: Optional[str] = None
  relative_logit_error: Optional[float] = None

  def summary(self) -> str:
    """A few human-readable lines."""
    lines = [f"Wrote {self.path} ({self.size_bytes / 1e6:.2f} MB, {self.model}, "
             f"quantize={self.quantize}"
             + (f", {self.int8_activations} activations" if self.int8_activations
                else "") + f") in {self.seconds:.1f} s.",
             f"Parity on {self.num_parity_samples} images: max |dlogit| = "
             f"{self.max_abs_logit_diff:.3g} (max |logit| {self.max_abs_logit:.3g}"
             + (f", tolerance {self.tolerance:.3g}" if self.tolerance is not None
                else ", quantised: no tolerance")
             + (f", relative error {self.relative_logit_error:.3g}"
                if self.relative_logit_error is not None else "") +
             f"), {'pixel' if 'dense_logits' in self.outputs else 'top-1'} "
             f"agreement {self.parity_top1_agreement:.1%}."]
    others = {k: v for k, v in self.outputs.items() if k not in ("logits", "probs")}
    if others:
      lines.append("Outputs: " + "; ".join(
          f"{k}: " + ", ".join(f"{s} {v:.3g}" for s, v in stats.items()
                               if isinstance(v, float))
          for k, stats in others.items()) + ".")
    if self.num_eval_examples:
      line = (f"Eval set ({self.num_eval_examples} images): top-1 agreement with "
              f"JAX {self.eval_top1_agreement:.2%}")
      if self.eval_top1_tflite is not None:
        line += (f", top-1 accuracy TFLite {self.eval_top1_tflite:.2%} vs JAX "
                 f"{self.eval_top1_jax:.2%}")
      lines.append(line + ".")
    return "\n".join(lines)


def _output_stats(name: str, kind: str, got: np.ndarray, expected: np.ndarray,
                  quantize: str) -> dict[str, Any]:
  if kind not in serving_lib.FLOAT_KINDS:
    return {"agreement": float(np.mean(got == expected))}
  finite = bool(np.all(np.isfinite(got)))
  diff = np.abs(got.astype(np.float64) - expected)
  scale = float(np.max(np.abs(expected)))
  # Per sample ||out_tflite - out_jax|| / ||out_jax||, averaged: how far a
  # quantised file is from float where max-abs figures hide it.
  per_sample = (np.linalg.norm(diff.reshape(len(diff), -1), axis=1) /
                np.maximum(np.linalg.norm(expected.reshape(len(expected), -1), axis=1),
                           1e-12))
  stats = {"max_abs_diff": float(np.max(diff)) if finite else float("inf"),
           "max_abs": scale, "tolerance": None, "finite": finite,
           "relative_error": float(np.mean(per_sample)) if finite else float("inf")}
  if quantize in FLOAT_TOLERANCES:
    atol, rtol = FLOAT_TOLERANCES[quantize]
    stats["tolerance"] = atol + rtol * scale
  if not finite or (stats["tolerance"] is not None
                    and stats["max_abs_diff"] > stats["tolerance"]):
    worst = np.unravel_index(np.argmax(np.where(np.isfinite(diff), diff, np.inf)),
                             diff.shape)
    raise ParityError(
        f"The {quantize!r} TFLite export does not match JAX: max |{name}_tflite - "
        f"{name}_jax| = {stats['max_abs_diff']:.3g} (at {tuple(map(int, worst))}: "
        f"{got[worst]:.5g} vs {expected[worst]:.5g}), expected at most "
        f"{stats['tolerance']} = atol + rtol * max|{name}| with (atol, rtol) = "
        f"{FLOAT_TOLERANCES.get(quantize)}. Nothing was written. Re-export with "
        "--gelu=exact; if it persists, the converter mis-lowers an op of this model: "
        "report it with the model name and resolution.")
  return stats


def check_parity(tflite_model: bytes,
                 expected: Union[np.ndarray, dict[str, np.ndarray]],
                 inputs: Union[np.ndarray, dict[str, np.ndarray]], quantize: str,
                 serving: Optional[serving_lib.ServingSpec] = None) -> dict[str, Any]:
  """Runs the TFLite bytes on `inputs` and compares every declared output with JAX.

  Float outputs of float modes must satisfy ``max|d| <= atol + rtol *
  max|out_jax|`` with ``(atol, rtol) = FLOAT_TOLERANCES[quantize]``; quantised
  modes only report. With arrays for `expected` and `inputs` (the classic call)
  they are the logits and the images of a classification export.

  Returns:
    ``max_abs_logit_diff``, ``max_abs_logit``, ``tolerance``, ``top1_agreement``
    of the primary output, and ``outputs``: the statistics of every output.

  Raises:
    ParityError: a float export outside the tolerance, or non-finite outputs.

  Example::

      stats = check_parity(tflite_bytes, jax_logits, images, "none")
  """
  if not isinstance(expected, dict):
    expected = {"logits": np.asarray(expected)}
  if not isinstance(inputs, dict):
    got = {"logits": tflite_predict(tflite_model, inputs)}
    kinds = {"logits": "logits"}
  else:
    got = tflite_outputs(tflite_model, inputs)
    spec = serving
    kinds = ({o.name: o.kind for o in spec.outputs} if spec is not None
             else {k: "tensor" for k in expected})
  outputs = {name: _output_stats(name, kinds[name], np.asarray(got[name]),
                                 np.asarray(expected[name]), quantize)
             for name in expected}
  primary = next((n for n, k in kinds.items() if k == "logits"), None) or next(
      n for n, k in kinds.items() if k in serving_lib.FLOAT_KINDS)
  agreement = 1.0
  if kinds.get(primary) in ("logits", "dense_logits"):  # Dense: pixel agreement.
    agreement = float(np.mean(np.asarray(got[primary]).argmax(-1)
                              == np.asarray(expected[primary]).argmax(-1)))
  stats = outputs[primary]
  return {"max_abs_logit_diff": stats["max_abs_diff"],
          "max_abs_logit": stats["max_abs"], "tolerance": stats["tolerance"],
          "relative_logit_error": stats["relative_error"],
          "top1_agreement": agreement, "outputs": outputs}


def evaluate(tflite_model: bytes, jax_logits_fn, eval_batches: Iterable[dict],
             max_examples: Optional[int], has_labels: bool) -> dict[str, Any]:
  """Top-1 agreement (and accuracy with labels) of TFLite vs JAX on eval batches."""
  from vit_edge.runtime import classifier  # pylint: disable=g-import-not-at-top
  runner = classifier.TFLiteModel(tflite_model)
  agree = correct_tflite = correct_jax = count = 0
  for batch in eval_batches:
    keep = np.asarray(batch.get("mask", np.ones(len(batch["image"])))) > 0
    images, labels = batch["image"][keep], np.asarray(batch["label"])[keep]
    if max_examples is not None:
      images, labels = images[:max_examples - count], labels[:max_examples - count]
    if not len(images):
      break
    top_jax = jax_logits_fn(images).argmax(-1)
    top_tflite = runner.predict(images)["logits"].argmax(-1)
    agree += int(np.sum(top_jax == top_tflite))
    correct_tflite += int(np.sum(top_tflite == labels))
    correct_jax += int(np.sum(top_jax == labels))
    count += len(images)
    if max_examples is not None and count >= max_examples:
      break
  if not count:
    return {"num_eval_examples": 0}
  result = {"num_eval_examples": count, "eval_top1_agreement": agree / count}
  if has_labels:
    result.update(eval_top1_tflite=correct_tflite / count,
                  eval_top1_jax=correct_jax / count)
  return result
