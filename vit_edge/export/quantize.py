"""The int8 policy: which ops of an int8 export stay float, and why.

XNNPACK (LiteRT's CPU delegate) runs int8 convolutions, matmuls with constant
weights and most elementwise ops, but not int8 BATCH_MATMUL, RSQRT, SOFTMAX or
GELU; TFLite's own int8 kernels for those are up to 100x slower than XNNPACK's
float ones (edgevit_xxs at 224: 2.1 ms of int8 BATCH_MATMUL vs 0.17 ms float)
and every op that falls off XNNPACK splits its graph. :class:`Int8Policy` keeps
float, in this order:

1. the op types of :attr:`Int8Policy.float_op_types`;
2. every int8 op that the installed XNNPACK rejects (found by name);
3. statistics ops: weightless ops all of whose tensors are per-channel or
   per-token statistics by shape role, i.e. a reduced axis (a last axis of 1:
   per-token means and variances, score channels) or no spatial/token extent
   (every axis but the channels is 1: norm statistics, pooled features,
   logits). They cost nothing in float, while one int8 scale per such tensor
   loses them (MobileViTv2's top-1 agreement with JAX fell to 29%). An op with
   weights (:attr:`Int8Policy.weight_op_types`) counts only if its weight is
   tiny too (at most :attr:`Int8Policy.max_statistics_weight` elements: the
   ones-matrix products that broadcast norm statistics), so real layers are
   int8 and the file size does not depend on the input size (before, a
   tensor-size threshold kept tformer_s's stage-4 convs, on 1x1 maps at 32 px,
   float: 18 MB there, 9 MB at 224 px);
4. every remaining int8 op whose output, on a few calibration samples, is off
   by more than :attr:`Int8Policy.max_error_steps` quantisation steps (RMS),
   measured by TensorFlow's QuantizationDebugger (e.g. the fused query/key/value
   projection of MobileViTv2's linear attention, 94 steps).

Keeping an op float moves QUANTIZE/DEQUANTIZE pairs around it, which can push a
neighbour off XNNPACK, so rules 1-3 are re-applied until nothing changes (at
most :attr:`Int8Policy.max_rounds` rounds); rule 4 is measured once,
after the structural rules of the first round.

Activations (:attr:`Int8Policy.activations`). The rules above quantise every
activation with one static scale per tensor, fitted on calibration images. A
ViT's residual stream cannot take that: its class-token row starts ~100x below
the patch rows (class token ~1e-6 at initialisation, position embedding 0.02), so
one int8 step of the stream's scale is larger than the whole row, and the
LayerNorm's ``E[x^2] - E[x]^2`` then loses the row's variance; every class token
a classifier (or a DeViT device) reads comes out as noise (random-weight
deit_tiny_patch16 at 224: 0% top-1 agreement with JAX). Keeping every op but
the matmuls float does not cure it (18%): the per-tensor scales of the matmul
outputs are the same problem one step later. ``"dynamic"`` activations are
ONNX Runtime's matmul-only dynamic int8: int8 per-channel weights, and each
FULLY_CONNECTED / CONV_2D quantises its input at run time, row by row (XNNPACK's
qd8 kernels), while everything between the matmuls stays float. ``"auto"`` (the
default) asks the model: a module class with ``int8_activations = "dynamic"``
(:class:`vit_edge.models.vit.VisionTransformer`) gets that, the others
(convolutional and hybrid families, whose static int8 agrees with float and is
2.2-2.8x faster than it at 224) the static rules. Integer-only files (``integer_io``)
are always static.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from vit_edge.export import tf_private
from vit_edge.runtime import latency
from vit_edge.runtime import litert_private

# Op types that int8 exports keep in float (rule 1).
INT8_FLOAT_OPS = ("BATCH_MATMUL", "RSQRT", "SOFTMAX", "GELU")
# Op types that carry a constant weight tensor.
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
_BOOKKEEPING_OPS = ("QUANTIZE", "DEQUANTIZE", "DELEGATE")
# How an int8 export quantises activations (see "Activations" above).
INT8_ACTIVATIONS = ("auto", "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class Int8Policy:
  """The options of the int8 export (see the module docstring for the rules).

  Attributes:
    float_op_types: op types always kept float (rule 1).
    weight_op_types: op types with weights; rule 3 keeps them float only when
      their weight has at most `max_statistics_weight` elements.
    max_statistics_weight: the largest weight (elements) of an op that rule 3
      may keep float. A statistics broadcast has one weight per channel (a few
      hundred); a layer on full-size maps is int8 through its activations
      anyway, and one on pooled features (a classifier head, channels x
      num_classes) stays float only when it is this small. Fixed, not relative
      to the input.
    keep_statistics_float: apply rule 3.
    max_error_steps: rule 4's threshold, in quantisation steps (RMS of the int8
      output's error over its scale); 5 keeps the few broken ops (tens of steps)
      float and leaves the rest (typically below 2) int8.
    num_debug_samples: calibration samples the debugger runs for rule 4.
    max_rounds: check-and-requantise rounds at most (rule 4 runs in the second).
    activations: "static" (calibrated per-tensor scales, rules 1-4), "dynamic"
      (matmul inputs quantised per row at run time, the rest float) or "auto"
      (the model's ``int8_activations`` class attribute, else "static").

  Example::

      export_from_registry("tformer_s", "t.tflite", quantize="int8",
                           int8_policy=Int8Policy(max_error_steps=3.0))
  """

  float_op_types: tuple[str, ...] = INT8_FLOAT_OPS
  weight_op_types: tuple[str, ...] = WEIGHT_OPS
  max_statistics_weight: int = 4096
  keep_statistics_float: bool = True
  max_error_steps: float = 5.0
  num_debug_samples: int = 8
  max_rounds: int = 4
  activations: str = "auto"

  def __post_init__(self):
    if self.activations not in INT8_ACTIVATIONS:
      raise ValueError(f"Int8Policy: activations={self.activations!r} is not one of "
                       f"{INT8_ACTIVATIONS} (e.g. --int8_activations=static).")
    if self.max_rounds < 2 or self.max_error_steps <= 0 or self.num_debug_samples < 0:
      raise ValueError(f"Int8Policy: max_rounds={self.max_rounds} must be >= 2 (the "
                       f"error check runs in round 2), max_error_steps="
                       f"{self.max_error_steps} > 0, num_debug_samples="
                       f"{self.num_debug_samples} >= 0.")


DEFAULT_POLICY = Int8Policy()


def activation_scheme(model, policy: Int8Policy = DEFAULT_POLICY,
                      integer_io: bool = False) -> str:
  """"static" or "dynamic": how an int8 export of `model` quantises activations.

  Raises:
    ValueError: "dynamic" asked for an integer-only file.

  Example::

      activation_scheme(VisionTransformer(...))   # "dynamic"
  """
  scheme = policy.activations
  if scheme == "auto":
    scheme = "static" if integer_io else getattr(model, "int8_activations", "static")
  if scheme == "dynamic" and integer_io:
    raise ValueError("int8_activations='dynamic' cannot make an integer-only file "
                     "(integer_io=True): its matmuls take float inputs. Use "
                     "--int8_activations=static (or auto) with --integer_io.")
  return scheme


def is_statistics_shaped(shape: Sequence[int]) -> bool:
  """A reduced axis (last axis 1) or no extent but the channels (e.g. [1, 1, 1, C]).

  Example::

      is_statistics_shaped([1, 196, 1]), is_statistics_shaped([1, 14, 14, 64])
      # (True, False)
  """
  shape = [int(d) for d in shape]
  return len(shape) <= 1 or shape[-1] == 1 or math.prod(shape[:-1]) == 1


def quantize_for_xnnpack(calibrated: bytes, debug_samples: Sequence[Sequence[np.ndarray]],
                         policy: Int8Policy = DEFAULT_POLICY) -> bytes:
  """int8 model from a calibrated one, with the ops of `policy`'s rules kept float.

  Args:
    calibrated: the converter's output with calibrate-only set.
    debug_samples: model inputs (one list per sample) for rule 4.
    policy: the options.

  Example::

      int8_bytes = quantize_for_xnnpack(calibrated, [[image]] * 8)
  """

  def quantize(nodes, verify=False):
    return tf_private.mlir_quantize(calibrated, policy.float_op_types, nodes,
                                    numeric_verify=verify)

  nodes: list[str] = []
  quantized = quantize(nodes)
  for round_index in range(policy.max_rounds):
    new = [n for n in nodes_to_keep_float(quantized, policy) if n not in nodes]
    if round_index == 1 and debug_samples:
      debug_model = quantize(nodes, verify=True)
      new += [n for n in high_error_nodes(debug_model, debug_samples, policy)
              if n not in nodes and n not in new]
    if not new and round_index >= 1:
      break
    nodes += new
    quantized = quantize(nodes)
  return quantized


def high_error_nodes(debug_model: bytes, samples: Sequence[Sequence[np.ndarray]],
                     policy: Int8Policy = DEFAULT_POLICY) -> list[str]:
  """Ops whose int8 output is off by more than ``policy.max_error_steps`` (rule 4)."""
  names = []
  for row in tf_private.layer_error_statistics(debug_model, samples):
    scale = float(row["scale"] or 0)
    if scale and math.sqrt(float(row["mean_squared_error"])) / scale > (
        policy.max_error_steps):
      names.append(row["tensor_name"])
  return names


def nodes_to_keep_float(tflite_model: bytes, policy: Int8Policy = DEFAULT_POLICY
                        ) -> list[str]:
  """Output tensor names of the int8 ops that rules 2 and 3 keep float."""
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  interpreter = Interpreter(model_content=tflite_model, num_threads=1)
  interpreter.allocate_tensors()
  tensors = {t["index"]: t for t in interpreter.get_tensor_details()}

  def quantized(op):
    indices = list(op["inputs"]) + list(op["outputs"])
    return [tensors[i] for i in indices if i in tensors and np.issubdtype(
        tensors[i]["dtype"], np.integer) and tensors[i]["quantization"][0]]

  names = [tensors[op["outputs"][0]]["name"]
           for op in latency.undelegated_nodes(interpreter) if quantized(op)]
  if policy.keep_statistics_float:
    for op in litert_private.ops_details(interpreter):
      if op["op_name"] in _BOOKKEEPING_OPS:
        continue
      activations = quantized(op)
      if op["op_name"] in policy.weight_op_types:
        weight = tensors.get(op["inputs"][1]) if len(op["inputs"]) > 1 else None
        if weight is None or np.prod(weight["shape"]) > policy.max_statistics_weight:
          continue
        # Judge the op by its input and output maps, not its weight and bias.
        activations = [t for t in activations
                       if t["index"] in (op["inputs"][0], *op["outputs"])]
      if activations and all(is_statistics_shaped(t["shape"]) for t in activations):
        names.append(tensors[op["outputs"][0]]["name"])
  return list(dict.fromkeys(names))
