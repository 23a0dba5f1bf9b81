"""The vit_edge metadata entry of an exported file: building and embedding it.

A JSON object named ``vit_edge`` in the model's flatbuffer metadata table
(labels, input size, normalisation mean/std, eval crop, model name,
quantisation, and ``serving``: the declared inputs and outputs with what each
output means), so that :mod:`vit_edge.runtime` needs nothing but the file.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from vit_edge.export import serving as serving_lib
from vit_edge.runtime import metadata as metadata_lib


def run_metadata(config: Any, info: dict[str, Any], workdir: str,
                 **source: Any) -> dict[str, Any]:
  """The metadata a file exported from a run directory carries about that run.

  Labels, input size, normalisation and eval crop come from the run's config and
  data set info; `source` adds entries (step, use_ema, ...) to ``source``.

  Example::

      run_metadata(config, info, "workdir/edgevit_xxs", step=936)
  """
  import os  # pylint: disable=g-import-not-at-top
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top

  aug = config.get("aug") or {}
  return {
      "model": config.model, "num_classes": int(info["num_classes"]),
      "label_names": [str(n) for n in info.get("label_names") or
                      range(info["num_classes"])],
      "image_size": int(config.image_size),
      "mean": list(info["mean"]), "std": list(info["std"]),
      "crop_pct": float(aug.get("crop_pct", input_pipeline.DEFAULT_CROP_PCT)),
      "interpolation": str(aug.get("interpolation", "bilinear")),
      "dataset": info.get("name"),
      "source": {"workdir": os.path.abspath(workdir), **source},
  }


def add_metadata(tflite_model: bytes, metadata: dict[str, Any],
                 name: str = metadata_lib.METADATA_NAME) -> bytes:
  """Embeds `metadata` as a JSON buffer in the model's named metadata table.

  An existing entry of the same name is replaced. TFLite interpreters ignore
  unknown metadata; :func:`vit_edge.runtime.metadata.read_metadata` reads it.

  Example::

      tflite_bytes = add_metadata(tflite_bytes, {"metadata_version": 1, ...})
  """
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  from ai_edge_litert.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top

  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_model))
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode("utf-8"),
                              np.uint8)
  model.buffers.append(buffer)
  entry = schema.MetadataT()
  entry.name = name
  entry.buffer = len(model.buffers) - 1
  kept = [m for m in (model.metadata or []) if _decode(m.name) != name]
  model.metadata = kept + [entry]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _decode(name) -> str:
  return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def check_required(metadata: dict[str, Any], spec: serving_lib.ServingSpec) -> None:
  """Raises ValueError naming the keys the runtime needs that `metadata` lacks."""
  required = metadata_lib.required_keys(dict(metadata, serving=spec.to_metadata()))
  missing = [k for k in required if k not in metadata]
  if missing:
    raise ValueError(f"metadata lacks {missing}; expected at least {required}.")


def export_metadata(metadata: dict[str, Any], spec: serving_lib.ServingSpec, *,
                    quantize: str, integer_io: bool, gelu: str,
                    int8_activations: Optional[str] = None) -> dict[str, Any]:
  """The caller's `metadata` plus what the export itself records.

  The keys of classification exports (``signature``, ``input``, ``outputs``,
  ``input_shape``, ``layout``) keep their meaning; ``serving`` is additive, and
  so is ``int8_activations`` ("static" or "dynamic", int8 files only).
  """
  first = spec.inputs[0]
  if int8_activations is not None:
    metadata = dict(metadata, int8_activations=int8_activations)
  return dict(metadata, metadata_version=metadata_lib.METADATA_VERSION,
              quantize=quantize, integer_io=bool(integer_io), gelu=gelu,
              signature=spec.signature, input=first.name,
              outputs=spec.output_names, input_shape=list(first.shape),
              layout="NHWC", serving=spec.to_metadata())
