"""The export's modes and defaults, shared by its modules and the CLI."""

from __future__ import annotations

from vit_edge.export.passes.base import GELU_MODES

QUANTIZE_MODES = ("none", "fp16", "dynamic", "int8")
DEFAULT_NUM_CALIBRATION_SAMPLES = 200
DEFAULT_NUM_PARITY_SAMPLES = 16

__all__ = ["GELU_MODES", "QUANTIZE_MODES", "check_quantize", "check_gelu"]


def check_quantize(quantize: str) -> None:
  """Raises ValueError naming the modes unless `quantize` is one of them."""
  if quantize not in QUANTIZE_MODES:
    raise ValueError(f"quantize={quantize!r} is not supported; expected one of "
                     f"{QUANTIZE_MODES} (e.g. --quantize=int8).")


def check_gelu(gelu: str) -> None:
  """Raises ValueError naming the modes unless `gelu` is one of them."""
  if gelu not in GELU_MODES:
    raise ValueError(f"gelu={gelu!r} is not supported; expected one of "
                     f"{GELU_MODES}.")
