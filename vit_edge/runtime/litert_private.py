"""The one boundary to LiteRT's private Python API (no JAX, no TensorFlow).

LiteRT's Interpreter exposes the op list of a model with its delegate nodes
only through the private ``_get_ops_details()``. Every vit_edge call of it goes
through :func:`ops_details`, which checks that the installed ai-edge-litert is
the release this was written for, so that an upgrade fails here with the
versions named instead of deep inside a benchmark.

Example::

    ops = ops_details(interpreter)  # [{"index", "op_name", "inputs", "outputs"}, ...]
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

# The ai-edge-litert releases whose private API this module was written for.
SUPPORTED_LITERT = "2.3."


class PrivateApiVersionError(RuntimeError):
  """The installed package is not the release a private-API wrapper supports."""


def check_version(package: str, installed: str, supported_prefix: str) -> None:
  """Raises PrivateApiVersionError unless `installed` starts with `supported_prefix`.

  Example::

      check_version("ai-edge-litert", "2.3.0", "2.3.")  # passes
  """
  if not installed.startswith(supported_prefix):
    raise PrivateApiVersionError(
        f"{package}=={installed} is installed, but vit_edge's wrappers of its "
        f"private API were written for {package} {supported_prefix}x. Install "
        f"{package}=={supported_prefix}* (setup.py pins it), or update "
        "the wrapper and its tests for the new release.")


def litert_version() -> str:
  """The installed ai-edge-litert version ("not-installed" without it)."""
  try:
    return importlib.metadata.version("ai-edge-litert")
  except importlib.metadata.PackageNotFoundError:
    return "not-installed"


def ops_details(interpreter) -> list[dict[str, Any]]:
  """``interpreter._get_ops_details()``: every op, delegate nodes included.

  Raises:
    PrivateApiVersionError: for an ai-edge-litert other than 2.3.x.
  """
  check_version("ai-edge-litert", litert_version(), SUPPORTED_LITERT)
  return interpreter._get_ops_details()  # pylint: disable=protected-access
