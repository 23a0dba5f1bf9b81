"""The vit_edge metadata embedded in an exported .tflite file, read with the stdlib.

The exporter stores one JSON object as a named entry of the TFLite model's
``metadata`` table (name :data:`METADATA_NAME`, pointing at a buffer that holds the
UTF-8 JSON). TFLite ignores metadata it does not know, so the file stays a plain
model for every runtime; ours reads the entry back with a ~60-line FlatBuffer
walker over the published schema (``tensorflow/compiler/mlir/lite/schema/
schema.fbs``), so a device needs neither TensorFlow nor the ``flatbuffers``
package to know the labels, input size and normalisation.

Example::

    meta = read_metadata("model.tflite")
    meta["image_size"], meta["label_names"][:3]
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Union

METADATA_NAME = "vit_edge"
# Bumped when a key changes meaning; readers reject versions they do not know.
METADATA_VERSION = 1
REQUIRED_KEYS = ("model", "image_size", "mean", "std", "label_names", "crop_pct",
                 "interpolation")

_FILE_IDENTIFIER = b"TFL3"
# Field ids (declaration order) in schema.fbs.
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6
_METADATA_NAME, _METADATA_BUFFER = 0, 1
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2


class MetadataError(ValueError):
  """The file is not a TFLite model, or carries no (valid) vit_edge metadata."""


class _Table:
  """One FlatBuffer table: resolves field ids through its vtable."""

  def __init__(self, data: bytes, pos: int):
    self.data, self.pos = data, pos
    vtable = pos - _read("<i", data, pos)
    self.vtable = vtable
    self.vtable_size = _read("<H", data, vtable)

  def _field(self, field_id: int) -> int:
    entry = 4 + 2 * field_id
    if entry >= self.vtable_size:  # Written by an older schema: field absent.
      return 0
    offset = _read("<H", self.data, self.vtable + entry)
    return self.pos + offset if offset else 0

  def scalar(self, field_id: int, fmt: str, default: int = 0) -> int:
    at = self._field(field_id)
    return _read(fmt, self.data, at) if at else default

  def _vector(self, field_id: int) -> tuple[int, int]:
    at = self._field(field_id)
    if not at:
      return 0, 0
    start = at + _read("<I", self.data, at)
    return start + 4, _read("<I", self.data, start)

  def bytes_(self, field_id: int) -> bytes:
    start, length = self._vector(field_id)
    _check_range(self.data, start, length)
    return self.data[start:start + length]

  def tables(self, field_id: int) -> list["_Table"]:
    start, length = self._vector(field_id)
    _check_range(self.data, start, 4 * length)
    slots = (start + 4 * i for i in range(length))
    return [_Table(self.data, s + _read("<I", self.data, s)) for s in slots]


def _read(fmt: str, data: bytes, pos: int) -> int:
  size = struct.calcsize(fmt)
  _check_range(data, pos, size)
  return struct.unpack_from(fmt, data, pos)[0]


def _check_range(data: bytes, pos: int, size: int) -> None:
  if pos < 0 or pos + size > len(data):
    raise MetadataError(f"Corrupt TFLite flatbuffer: offset {pos}+{size} lies outside "
                        f"the {len(data)}-byte file. Re-export the model.")


def read_all_metadata(model: bytes) -> dict[str, bytes]:
  """Every named metadata entry of a TFLite flatbuffer, as raw bytes.

  Args:
    model: the bytes of a .tflite file.

  Returns:
    ``{name: buffer bytes}``, e.g. the converter's ``"min_runtime_version"`` and,
    for a vit_edge export, ``"vit_edge"``.

  Raises:
    MetadataError: if `model` is not a TFLite flatbuffer.

  Example::

      names = sorted(read_all_metadata(open("m.tflite", "rb").read()))
  """
  model = bytes(model)
  if len(model) < 8 or model[4:8] != _FILE_IDENTIFIER:
    raise MetadataError(
        f"Not a TFLite model: expected the file identifier {_FILE_IDENTIFIER!r} at "
        f"bytes 4..8, got {model[4:8]!r}. Pass a .tflite file written by "
        "`python -m vit_edge.export`.")
  root = _Table(model, _read("<I", model, 0))
  buffers = root.tables(_MODEL_BUFFERS)
  entries = {}
  for entry in root.tables(_MODEL_METADATA):
    name = entry.bytes_(_METADATA_NAME).decode("utf-8", "replace")
    index = entry.scalar(_METADATA_BUFFER, "<I")
    if index >= len(buffers):
      raise MetadataError(f"Corrupt TFLite model: metadata {name!r} points at buffer "
                          f"{index} of {len(buffers)}. Re-export the model.")
    buffer = buffers[index]
    data = buffer.bytes_(_BUFFER_DATA)
    offset = buffer.scalar(_BUFFER_OFFSET, "<Q")
    if not data and offset > 1:  # Models over 2 GB keep buffers after the flatbuffer.
      size = buffer.scalar(_BUFFER_SIZE, "<Q")
      _check_range(model, offset, size)
      data = model[offset:offset + size]
    entries[name] = data
  return entries


def parse_metadata(model: bytes) -> dict[str, Any]:
  """The vit_edge metadata dict of a .tflite file's bytes (see :func:`read_metadata`).

  Example::

      meta = parse_metadata(tflite_bytes)
  """
  entries = read_all_metadata(model)
  if METADATA_NAME not in entries:
    raise MetadataError(
        f"The TFLite model has no {METADATA_NAME!r} metadata (found: "
        f"{sorted(entries)}). Export it with `python -m vit_edge.export`, which "
        "embeds labels, input size and normalisation.")
  try:
    meta = json.loads(entries[METADATA_NAME].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise MetadataError(f"The {METADATA_NAME!r} metadata is not valid JSON ({e}). "
                        "Re-export the model.") from e
  version = meta.get("metadata_version")
  if version != METADATA_VERSION:
    raise MetadataError(
        f"metadata_version={version!r}; this runtime reads version "
        f"{METADATA_VERSION}. Use the vit_edge release that exported the model or "
        "re-export it.")
  missing = [k for k in required_keys(meta) if k not in meta]
  if missing:
    raise MetadataError(f"The {METADATA_NAME!r} metadata lacks {missing}. Re-export "
                        "the model.")
  return meta


def required_keys(meta: dict[str, Any]) -> tuple[str, ...]:
  """The keys a file's metadata must have: :data:`REQUIRED_KEYS` for image models.

  An export whose declared inputs include no ``image`` (e.g. token vectors and a
  mask) has no resolution, normalisation or crop to record: only ``model``.

  Example::

      required_keys({"serving": {"inputs": [{"name": "tokens"}]}})  # ("model",)
  """
  serving = meta.get("serving")
  if serving and "image" not in [t["name"] for t in serving.get("inputs", [])]:
    return ("model",)
  return REQUIRED_KEYS


def output_kinds(meta: dict[str, Any]) -> dict[str, str]:
  """What each output of an export means: ``{output name: kind}``.

  Kinds are those of ``vit_edge.export.serving.OUTPUT_KINDS`` ("logits",
  "probs", "features", "dense_logits", "class_map", "tensor"). Files written
  before the metadata recorded a ``serving`` spec are classification exports.

  Example::

      output_kinds(read_metadata("m.tflite"))  # {"logits": "logits", "probs": "probs"}
  """
  serving = meta.get("serving")
  if not serving:
    return {"logits": "logits", "probs": "probs"}
  return {o["name"]: o["kind"] for o in serving["outputs"]}


def read_metadata(path: Union[str, os.PathLike]) -> dict[str, Any]:
  """Reads the vit_edge metadata of an exported .tflite file.

  Args:
    path: a .tflite file written by ``vit_edge.export``.

  Returns:
    The dict the exporter wrote: ``model``, ``image_size``, ``mean``, ``std``
    (RGB, for [0, 1] pixels), ``crop_pct``, ``interpolation``, ``label_names``,
    ``num_classes``, ``quantize``, ``signature``, ``input``, ``outputs``,
    ``serving`` (declared inputs and outputs, see :func:`output_kinds`) and more.

  Raises:
    FileNotFoundError: if `path` does not exist.
    MetadataError: for a file that is not a vit_edge TFLite export.

  Example::

      meta = read_metadata("tformer_s_int8.tflite")
      print(meta["model"], meta["image_size"], meta["label_names"][:5])
  """
  with open(path, "rb") as f:
    return parse_metadata(f.read())
