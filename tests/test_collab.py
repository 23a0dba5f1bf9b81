"""DeViT export and the gRPC runtime: worker processes on 127.0.0.1, bounded loops.

One tiny N=3 ensemble is exported once (every file and the composed ensemble
pass the parity guard); workers run as subprocesses. No test measures speed:
the one time bound checked is that a request with a worker hung for 60 s comes
back near its deadline (a hang would fail it), not how fast anything runs.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vit_edge.devit import ensemble
from vit_edge.devit import export as devit_export
from vit_edge.runtime import collab as collab_lib

NUM_DEVICES = 3
IMAGE_SIZE = 32
MEAN, STD = (0.5,) * 3, (0.5,) * 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Worker:
  """A worker subprocess; `start` waits (bounded) until it listens."""

  def __init__(self, model: str, port: int, *extra: str):
    self.model, self.port, self.extra = model, port, extra
    self.process = None

  @property
  def address(self) -> str:
    return f"127.0.0.1:{self.port}"

  def start(self) -> "Worker":
    self.process = subprocess.Popen(
        [sys.executable, "-m", "vit_edge.runtime.worker", f"--model={self.model}",
         f"--port={self.port}", *self.extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(2000):  # Bounded: the worker prints one line when it listens.
      line = self.process.stdout.readline()
      if not line and self.process.poll() is not None:
        raise RuntimeError(f"worker on {self.port} exited: {self.process.returncode}")
      if line.startswith("worker: serving"):
        return self
    raise RuntimeError(f"worker on {self.port} never reported listening")

  def kill(self) -> None:
    if self.process and self.process.poll() is None:
      self.process.send_signal(signal.SIGKILL)
      self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(out_dir, manifest, model, variables) of a tiny DeDeiT ensemble, N=3."""
  out_dir = str(tmp_path_factory.mktemp("devit"))
  model = ensemble.DeViTEnsemble(num_classes=6, num_devices=NUM_DEVICES,
                                 image_size=IMAGE_SIZE, patch_size=16, embed_dim=16,
                                 depth=1, num_heads=2, teacher_dim=24, distilled=True)
  images = np.random.RandomState(0).randn(4, IMAGE_SIZE, IMAGE_SIZE, 3)
  variables = model.init(jax.random.key(0), images[:1].astype(np.float32))
  metadata = {"model": "devit_test", "image_size": IMAGE_SIZE, "mean": list(MEAN),
              "std": list(STD), "label_names": [f"c{i}" for i in range(6)],
              "crop_pct": 1.0, "interpolation": "bilinear"}
  manifest = devit_export.export_ensemble(
      model, variables, out_dir, images=images.astype(np.float32), metadata=metadata,
      class_subsets=[[0, 1], [2, 3], [4, 5]])
  return out_dir, manifest, model, variables


@pytest.mark.parametrize("quantize", ["fp16", "int8"])
def test_fp16_and_int8_device_files_pass_composed_parity(exported, quantize, tmp_path):
  """Device files in fp16 / int8 (the fusion head stays float): smaller files whose
  tokens match JAX's; fp16's composed ensemble is within the export tolerance.

  The weights are the initialisation's: the class / distillation token rows are
  ~100x below the patch rows there, which static per-tensor int8 turns into noise;
  the ViT's int8 files quantise matmul inputs per row at run time instead
  (vit_edge.export.quantize, "Activations").
  """
  float_dir, _, model, variables = exported
  images = np.random.RandomState(0).randn(4, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  calibration = np.random.RandomState(1).randn(32, IMAGE_SIZE, IMAGE_SIZE, 3)
  representative = lambda: (x[None].astype(np.float32) for x in calibration)
  manifest = devit_export.export_ensemble(
      model, variables, str(tmp_path), images=images,
      metadata={"model": "devit_test", "image_size": IMAGE_SIZE, "mean": list(MEAN),
                "std": list(STD), "label_names": [f"c{i}" for i in range(6)],
                "crop_pct": 1.0, "interpolation": "bilinear"},
      class_subsets=[[0, 1], [2, 3], [4, 5]], quantize=quantize,
      representative_data=representative if quantize == "int8" else None)
  assert manifest["quantize"] == quantize
  for k in range(NUM_DEVICES):
    name = f"sub_{k}.tflite"
    small = os.path.getsize(tmp_path / name)
    assert small < 0.75 * os.path.getsize(os.path.join(float_dir, name))
    assert manifest["devices"][k]["sha256"] == devit_export.sha256(str(tmp_path / name))
  from vit_edge.runtime import classifier  # pylint: disable=g-import-not-at-top
  jax_tokens = np.asarray(jax.jit(
      lambda v, x: model.apply(v, x, method="device_tokens"))(variables, images))
  for k in range(NUM_DEVICES):
    tokens = classifier.TFLiteModel(str(tmp_path / f"sub_{k}.tflite")).run(
        {"image": images})["tokens"]
    error = np.abs(tokens - jax_tokens[:, k]).max() / np.abs(jax_tokens[:, k]).max()
    # fp16 weights: ~1e-3 of the token range; int8 (weights and activations): a few
    # quantisation steps of it.
    assert error < (1e-2 if quantize == "fp16" else 0.1), (k, error)
  if quantize == "fp16":  # Held to the export's composed tolerance (it checked it too).
    want = np.asarray(jax.jit(lambda v, x: model.apply(v, x)[0])(variables, images))
    assert manifest["parity"]["composed_max_abs_logit_diff"] < (
        5e-2 + 5e-2 * float(np.abs(want).max()))


@pytest.fixture(scope="module")
def workers(exported):
  out_dir = exported[0]
  started = [Worker(os.path.join(out_dir, f"sub_{k}.tflite"), _free_port()).start()
             for k in range(NUM_DEVICES)]
  yield started
  for w in started:
    w.kill()


def _crop(seed=1):
  return np.random.RandomState(seed).randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3),
                                             np.uint8)


def _jax_logits(model, variables, crop, presence=None):
  x = ((crop.astype(np.float32) / 255.0 - np.asarray(MEAN)) / np.asarray(STD))[None]
  logits, _ = model.apply(variables, x.astype(np.float32), False,
                          None if presence is None else np.asarray([presence],
                                                                   np.float32))
  return np.asarray(logits[0])


def test_export_writes_files_manifest_and_passes_composed_parity(exported):
  out_dir, manifest, model, _ = exported
  assert sorted(os.listdir(out_dir)) == ["fusion.tflite", "manifest.json",
                                         "sub_0.tflite", "sub_1.tflite", "sub_2.tflite"]
  on_disk = json.load(open(os.path.join(out_dir, "manifest.json")))
  assert on_disk == manifest
  assert manifest["num_devices"] == 3 and manifest["num_prefix_tokens"] == 2
  assert manifest["token_dim"] == 16 and manifest["token_wire_dtype"] == "float16"
  assert [d["classes"] for d in manifest["devices"]] == [[0, 1], [2, 3], [4, 5]]
  for d in manifest["devices"]:
    assert d["sha256"] == devit_export.sha256(os.path.join(out_dir, d["file"]))
  parity = manifest["parity"]
  assert parity["composed_top1_agreement"] == 1.0
  assert parity["composed_max_abs_logit_diff"] < 1e-2
  assert set(parity["files"]) == {"sub_0.tflite", "sub_1.tflite", "sub_2.tflite",
                                  "fusion.tflite"}


def test_healthy_workers_answer_as_the_jax_ensemble(exported, workers):
  out_dir, _, model, variables = exported
  collab = collab_lib.Collaboration(os.path.join(out_dir, "manifest.json"),
                                    [w.address for w in workers], deadline_s=20.0)
  try:
    assert all("verified" in line for line in collab.startup)
    for seed in (1, 2, 3):
      crop = _crop(seed)
      answer = collab.classify_crop(crop)
      assert answer.missing == []
      want = _jax_logits(model, variables, crop)
      np.testing.assert_allclose(answer.logits, want, atol=2e-2, rtol=2e-2)  # fp16
      assert answer.top1 == int(np.argmax(want))
      for w in answer.workers:
        assert w.bytes_out == IMAGE_SIZE * IMAGE_SIZE * 3
        assert w.bytes_in == 2 * 16 * 2  # P x d float16
        assert w.compute_ms is not None and w.round_trip_ms is not None
  finally:
    collab.close()


def test_killed_slow_and_restarted_workers_leave_answers_degraded_not_late(
    exported, workers):
  out_dir, manifest, model, variables = exported
  deadline_s = 1.5
  slow = Worker(os.path.join(out_dir, "sub_1.tflite"), _free_port(),
                "--simulate_delay_ms=60000").start()
  addresses = [workers[0].address, slow.address, workers[2].address]
  collab = collab_lib.Collaboration(os.path.join(out_dir, "manifest.json"),
                                    addresses, deadline_s=deadline_s, verify=False)
  crop = _crop(4)
  answers = []
  try:
    answers.append(collab.classify_crop(crop))  # Device 1 hangs: left out.
    workers[0].kill()  # Mid-stream.
    answers.append(collab.classify_crop(crop))
    workers[2].kill()
    answers.append(collab.classify_crop(crop))
    workers[2].start()  # Restarted on the same port.
    for _ in range(100):  # Bounded: until the restarted worker is used again.
      answers.append(collab.classify_crop(crop))
      if 2 not in answers[-1].missing:
        break
      time.sleep(0.05)
    statuses = [[w.status for w in a.workers] for a in answers]
    assert statuses[0][1] == "slow" and statuses[0][0] == statuses[0][2] == "ok"
    assert statuses[1][:2] == ["unreachable", "slow"]
    assert statuses[2] == ["unreachable", "slow", "unreachable"]
    assert statuses[-1] == ["unreachable", "slow", "ok"]
    for answer in answers:
      assert answer.latency_ms < (deadline_s + 3.0) * 1e3  # Never a hang.
      assert "degraded: device(s)" in answer.describe()
      presence = [0.0 if k in answer.missing else 1.0 for k in range(NUM_DEVICES)]
      want = _jax_logits(model, variables, crop, presence)
      np.testing.assert_allclose(answer.logits, want, atol=2e-2, rtol=2e-2)
  finally:
    collab.close()
    slow.kill()
    workers[0].start()  # Back for later tests.


def test_bad_manifest_wrong_worker_and_bad_addresses_are_clear(exported, workers,
                                                                  tmp_path):
  out_dir = exported[0]
  manifest_path = os.path.join(out_dir, "manifest.json")
  addresses = [w.address for w in workers]
  with pytest.raises(collab_lib.ManifestError, match="does not exist"):
    collab_lib.load_manifest(str(tmp_path / "nope.json"))
  (tmp_path / "bad.json").write_text('{"format": "something else"}')
  with pytest.raises(collab_lib.ManifestError, match="expected 'vit_edge.devit/1'"):
    collab_lib.load_manifest(str(tmp_path / "bad.json"))
  # Files that do not belong together: another fusion file next to the manifest.
  moved = tmp_path / "moved"
  moved.mkdir()
  shutil.copy(manifest_path, moved / "manifest.json")
  shutil.copy(os.path.join(out_dir, "sub_0.tflite"), moved / "fusion.tflite")
  with pytest.raises(collab_lib.ManifestError, match="do not belong together"):
    collab_lib.load_manifest(str(moved / "manifest.json"))
  with pytest.raises(collab_lib.ManifestError, match="2 address"):
    collab_lib.Collaboration(manifest_path, addresses[:2])
  with pytest.raises(collab_lib.ManifestError, match="not host:port"):
    collab_lib.Collaboration(manifest_path, ["localhost"] + addresses[1:])
  # A worker serving another device's file.
  with pytest.raises(collab_lib.ManifestError, match="not the manifest's 'sub_0"):
    collab_lib.Collaboration(manifest_path, [addresses[1], addresses[0], addresses[2]],
                             deadline_s=10.0)
  # A manifest whose token size does not match what the workers send.
  manifest = json.load(open(manifest_path))
  manifest["token_dim"] = 8
  shutil.copy(os.path.join(out_dir, "fusion.tflite"), tmp_path / "fusion.tflite")
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(collab_lib.ManifestError, match=r"the fusion head takes \[2, 8\]"):
    collab_lib.Collaboration(str(tmp_path / "manifest.json"), addresses,
                             deadline_s=10.0)
  # An address nobody listens on: a degraded answer that names the device.
  dead = f"127.0.0.1:{_free_port()}"
  collab = collab_lib.Collaboration(manifest_path, addresses[:2] + [dead],
                                    deadline_s=10.0)
  try:
    assert "unreachable now" in collab.startup[2]
    answer = collab.classify_crop(_crop())
    assert answer.missing == [2] and answer.workers[2].status == "unreachable"
  finally:
    collab.close()


def test_cli_prints_workers_and_the_runtime_needs_no_jax(exported, workers, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = tmp_path / "x.png"
  Image.fromarray(_crop()).save(image)
  out_dir = exported[0]
  check = ("import sys, vit_edge.runtime.collab, vit_edge.runtime.worker; "
           "bad = [m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules]; "
           "sys.exit(f'imports {bad}' if bad else 0)")
  subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True)
  result = subprocess.run(
      [sys.executable, "-m", "vit_edge.runtime.collab",
       f"--manifest={os.path.join(out_dir, 'manifest.json')}",
       "--workers=" + ",".join(w.address for w in workers), "--deadline_ms=20000",
       str(image)], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  for k in range(NUM_DEVICES):
    assert f"device {k} @ {workers[k].address}: ok; 3072 B out, 64 B in" in result.stdout
  bad = subprocess.run(
      [sys.executable, "-m", "vit_edge.runtime.collab", "--manifest=/nonexistent.json",
       "--workers=127.0.0.1:1", str(image)], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert bad.returncode == 2 and "does not exist" in bad.stderr
