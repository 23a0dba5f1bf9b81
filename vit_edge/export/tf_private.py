"""The one boundary to TensorFlow's private TFLite APIs used by the int8 export.

* ``converter._experimental_calibrate_only``: convert with calibration
  statistics but without quantising, so the quantiser can run several times
  with different deny lists;
* ``tensorflow.lite.python.convert.mlir_quantize``: that quantiser (the entry
  point of TensorFlow's QuantizationDebugger), with op-type and node deny lists;
* ``tf.lite.experimental.QuantizationDebugger``: per-op int8 error statistics.

Each wrapper first checks that the installed TensorFlow is the release it was
written for (:data:`SUPPORTED_TENSORFLOW`), so that an upgrade fails here with
the versions named.
"""

from __future__ import annotations

import csv
import io
import warnings
from typing import Sequence

import numpy as np

from vit_edge.runtime import litert_private

# The TensorFlow releases whose private TFLite API this module was written for.
SUPPORTED_TENSORFLOW = "2.21."


def check_tensorflow_version() -> None:
  """Raises PrivateApiVersionError unless TensorFlow 2.21.x is installed.

  Example::

      check_tensorflow_version()
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  litert_private.check_version("tensorflow", tf.__version__, SUPPORTED_TENSORFLOW)


def set_calibrate_only(converter) -> None:
  """Makes `converter.convert()` return a calibrated, not yet quantised model."""
  check_tensorflow_version()
  converter._experimental_calibrate_only = True  # pylint: disable=protected-access


def mlir_quantize(calibrated: bytes, denylisted_ops: Sequence[str],
                  denylisted_nodes: Sequence[str], numeric_verify: bool = False
                  ) -> bytes:
  """Quantises a calibrated model, keeping the denied op types and nodes float.

  With `numeric_verify` the result carries NumericVerify ops for the debugger.
  """
  check_tensorflow_version()
  from tensorflow.lite.python import convert as tfl_convert  # pylint: disable=g-import-not-at-top
  return tfl_convert.mlir_quantize(calibrated, denylisted_ops=list(denylisted_ops),
                                   denylisted_nodes=list(denylisted_nodes),
                                   enable_numeric_verify=numeric_verify)


def layer_error_statistics(debug_model: bytes,
                           samples: Sequence[Sequence[np.ndarray]]
                           ) -> list[dict[str, str]]:
  """QuantizationDebugger's per-op rows (``tensor_name``, ``scale``, ``mean_squared_error``, ...).

  `samples` holds one list of model inputs (in signature order) per example.
  """
  check_tensorflow_version()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice.
    debugger = tf.lite.experimental.QuantizationDebugger(
        quant_debug_model_content=debug_model,
        debug_dataset=lambda: ([np.asarray(a) for a in sample] for sample in samples))
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
  return list(csv.DictReader(io.StringIO(dump.getvalue())))
