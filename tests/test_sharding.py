"""Mesh construction and batch-size checks (8 simulated CPU devices, see conftest)."""

import ml_collections
import pytest

from vit_edge import sharding


def _mesh():
  return sharding.create_mesh(ml_collections.ConfigDict({"num_devices": -1, "fsdp": 1}))


def _config(batch_size, eval_batch_size):
  return ml_collections.ConfigDict({"batch_size": batch_size,
                                    "eval_batch_size": eval_batch_size})


def test_batch_sizes_that_divide():
  assert sharding.check_batch_sizes(_config(16, 64), _mesh()) == (16, 64)
  assert sharding.check_batch_size(24, _mesh()) == 24


def test_both_bad_batch_sizes_in_one_error():
  with pytest.raises(ValueError) as e:
    sharding.check_batch_sizes(_config(12, 100), _mesh())
  assert str(e.value) == (
      "config.batch_size=12 and config.eval_batch_size=100 do not divide by the 8 "
      "devices of the mesh; use multiples of 8, e.g. --config.batch_size=8 "
      "--config.eval_batch_size=96.")


def test_one_bad_batch_size_names_only_it():
  with pytest.raises(ValueError, match=r"^config.eval_batch_size=4 does not divide by "
                                       r"the 8 devices.*--config.eval_batch_size=8\.$"):
    sharding.check_batch_sizes(_config(16, 4), _mesh())
  with pytest.raises(ValueError, match=r"batch_size=12 does not divide by the 8 devices"):
    sharding.check_batch_size(12, _mesh())


def test_mesh_errors_name_the_values():
  with pytest.raises(ValueError, match="num_devices=9 but 8 devices are visible"):
    sharding.create_mesh(ml_collections.ConfigDict({"num_devices": 9, "fsdp": 1}))
  with pytest.raises(ValueError, match="fsdp=3 must divide the number of devices 8"):
    sharding.create_mesh(ml_collections.ConfigDict({"num_devices": -1, "fsdp": 3}))
