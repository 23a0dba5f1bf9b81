"""Private TF/LiteRT APIs sit behind version checks; exported files are 0644 - umask."""

import os
import stat

import pytest

from vit_edge.export import pipeline
from vit_edge.export import quantize
from vit_edge.export import tf_private
from vit_edge.runtime import litert_private


def test_installed_versions_are_the_supported_ones():
  tf_private.check_tensorflow_version()
  litert_private.check_version("ai-edge-litert", litert_private.litert_version(),
                               litert_private.SUPPORTED_LITERT)


def test_litert_wrapper_fails_naming_both_versions(monkeypatch):
  monkeypatch.setattr(litert_private, "litert_version", lambda: "2.4.1")
  with pytest.raises(litert_private.PrivateApiVersionError,
                     match=r"ai-edge-litert==2\.4\.1 is installed.*ai-edge-litert "
                           r"2\.3\.x"):
    litert_private.ops_details(object())


def test_tensorflow_wrappers_fail_naming_both_versions(monkeypatch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tf, "__version__", "2.22.0")
  with pytest.raises(litert_private.PrivateApiVersionError,
                     match=r"tensorflow==2\.22\.0 is installed.*tensorflow 2\.21\.x"):
    tf_private.mlir_quantize(b"", [], [])
  with pytest.raises(litert_private.PrivateApiVersionError, match="2.22.0"):
    tf_private.set_calibrate_only(object())


def test_statistics_shapes_do_not_depend_on_the_input_size():
  # Per-token statistics and score channels (reduced last axis), pooled
  # features and norm statistics (no extent but channels): float.
  for shape in ([1, 196, 1], [1, 3136, 1], [1, 1, 1, 512], [1, 10], [512]):
    assert quantize.is_statistics_shaped(shape), shape
  for shape in ([1, 56, 56, 64], [1, 7, 7, 512], [1, 196, 192]):
    assert not quantize.is_statistics_shaped(shape), shape
  with pytest.raises(ValueError, match="max_rounds=1 must be >= 2"):
    quantize.Int8Policy(max_rounds=1)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600),
                                        (0o002, 0o644)])
def test_exported_file_mode_is_0644_minus_umask(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    path = tmp_path / "sub" / "m.tflite"
    pipeline.write_atomically(str(path), b"bytes")
    assert os.umask(umask) == umask  # Restored by write_atomically.
  finally:
    os.umask(old)
  assert stat.S_IMODE(path.stat().st_mode) == mode
  assert path.read_bytes() == b"bytes"
  assert [p.name for p in path.parent.iterdir()] == ["m.tflite"]  # No temp left.
