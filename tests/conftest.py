"""Test-wide settings: quiet TensorFlow, CPU only, 8 simulated CPU devices.

The device count must be set before JAX initialises its backend, hence here.
"""

import os
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)

# The suite runs with the XLA options that training uses by default (a Trainer
# made here would be too late: an earlier test has started the backend).
from vit_edge import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

xla_flags.apply_defaults()

# Subprocesses (vit_edge.main, the tools) inherit the huge-page tunable, so they do
# not restart themselves to set it (vit_edge.hugepages).
from vit_edge import hugepages  # pylint: disable=g-import-not-at-top,wrong-import-position

if hugepages.tunable_missing():
  os.environ["GLIBC_TUNABLES"] = hugepages.with_tunable(os.environ.get("GLIBC_TUNABLES", ""))

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def write_tfds_metadata():
  """Marks a TFDS set as prepared in a data_dir, so tfds.testing.mock_data serves it.

  Usage: ``write_tfds_metadata(tmp_path, "cifar10", {"train": 12, "test": 12})``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def write(data_dir, name, split_sizes):
    builder = tfds.builder(name, data_dir=str(data_dir))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0)
        for split, n in split_sizes.items()]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)

  return write


def _run(command):
  return subprocess.run(command, capture_output=True, text=True, check=False)


@pytest.fixture
def mount_tmpfs():
  """``mount_tmpfs(path, size)``: a small tmpfs at path (root only; a disk that fills
  up), unmounted afterwards whatever happens. Skips where mounting is refused."""
  mounted = []

  def mount(path, size):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or _run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                                  "tmpfs", str(path)]).returncode:
      pytest.skip("mounting a tmpfs needs root")
    mounted.append(path)
    return path

  try:
    yield mount
  finally:
    for path in mounted:
      _run(["umount", "-l", str(path)])


@pytest.fixture
def make_immutable():
  """``make_immutable(path)``: chattr +i, refused even to root; undone afterwards."""
  frozen = []

  def freeze(path):
    if _run(["chattr", "+i", str(path)]).returncode:
      pytest.skip("chattr +i is not available here")
    frozen.append(path)
    return path

  try:
    yield freeze
  finally:
    for path in frozen:
      _run(["chattr", "-i", str(path)])
