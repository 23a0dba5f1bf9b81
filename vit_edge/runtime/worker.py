"""One DeViT device: serves one exported sub-model over gRPC (numpy, LiteRT, grpcio).

::

    python -m vit_edge.runtime.worker --model=sub_0.tflite --port=50051

The service has no generated code: grpcio's generic handlers move raw bytes.

* ``/vit_edge.devit.Worker/Run``: request = the image as the model's uint8 crop
  (S x S x 3 bytes, HWC; the coordinator resizes and crops once, see
  :func:`vit_edge.runtime.collab.image_crop`); the worker normalises it with the
  file's mean/std and returns its output tokens as float16 bytes (``tokens`` of
  a DeViT device file; ``logits`` of a plain classification file, which lets the
  one-file teacher run behind the same transport for comparison). Trailing
  metadata: ``compute-us`` (interpreter time) and ``model-sha256`` (what the
  coordinator checks against its manifest on every answer).
* ``/vit_edge.devit.Worker/Info``: JSON with the file's identity and shapes.

One interpreter, one server thread: requests are served in order, as on a
single-core device. ``--simulate_delay_ms`` and ``--simulate_error_rate`` inject
faults (a slow or failing device) for robustness tests and benchmarks only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

import numpy as np

from vit_edge.runtime import classifier
from vit_edge.runtime import metadata as metadata_lib

SERVICE = "vit_edge.devit.Worker"
RUN_METHOD = f"/{SERVICE}/Run"
INFO_METHOD = f"/{SERVICE}/Info"
WIRE_DTYPE = np.float16
# Large enough for a 224 px crop (150 KB) with room to spare.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def output_name(kinds: dict[str, str]) -> str:
  """The output a worker sends: a device file's tokens, else a classifier's logits."""
  for name in ("tokens", "logits"):
    if name in kinds:
      return name
  raise metadata_lib.MetadataError(
      f"The model's outputs {sorted(kinds)} include neither 'tokens' (a DeViT device "
      "file from python -m vit_edge.devit.export) nor 'logits'.")


class DeviceModel:
  """The exported file, its identity, and the uint8-crop -> float16-bytes step."""

  def __init__(self, path: str, num_threads: Optional[int] = 1):
    if not os.path.exists(path):
      raise FileNotFoundError(f"--model={path!r} does not exist; export the device "
                              "files with python -m vit_edge.devit.export.")
    self.path = path
    with open(path, "rb") as f:
      data = f.read()
    self.sha256 = hashlib.sha256(data).hexdigest()
    self.metadata = metadata_lib.parse_metadata(data)
    serving = self.metadata.get("serving") or {}
    inputs = [t["name"] for t in serving.get("inputs", [{"name": "image"}])]
    if inputs != ["image"]:
      raise metadata_lib.MetadataError(
          f"{path!r} takes inputs {inputs}; a worker serves an image model (a DeViT "
          "device file). The fusion head runs on the coordinator.")
    self.output = output_name(metadata_lib.output_kinds(self.metadata))
    self.model = classifier.TFLiteModel(data, num_threads=num_threads)
    self.image_size = int(self.metadata["image_size"])
    self.mean = np.asarray(self.metadata["mean"], np.float32)
    self.std = np.asarray(self.metadata["std"], np.float32)
    self.request_bytes = self.image_size * self.image_size * 3
    probe = self.run_crop(np.zeros(self.request_bytes, np.uint8))
    self.output_shape = list(probe.shape)

  def info(self) -> dict[str, Any]:
    return {"model": self.metadata["model"], "file": os.path.basename(self.path),
            "sha256": self.sha256, "devit": self.metadata.get("devit"),
            "image_size": self.image_size, "output": self.output,
            "output_shape": self.output_shape, "wire_dtype": "float16"}

  def run_crop(self, crop: np.ndarray) -> np.ndarray:
    """uint8 [S*S*3] -> the output tensor (float32, batch axis dropped)."""
    image = crop.reshape(1, self.image_size, self.image_size, 3)
    x = (image.astype(np.float32) / 255.0 - self.mean) / self.std
    return self.model.run({"image": x})[self.output][0]


class Service:
  """The two RPC handlers (raw bytes in, raw bytes out)."""

  def __init__(self, device: DeviceModel, delay_ms: float = 0.0,
               error_rate: float = 0.0, seed: int = 0):
    self.device = device
    self.delay_s = delay_ms / 1000.0
    self.error_rate = error_rate
    self._random = random.Random(seed)
    self._lock = threading.Lock()  # One interpreter: one request at a time.

  def run(self, request: bytes, context) -> bytes:
    import grpc  # pylint: disable=g-import-not-at-top
    if len(request) != self.device.request_bytes:
      s = self.device.image_size
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f"request has {len(request)} bytes; this worker's model takes a "
                    f"uint8 {s}x{s}x3 crop ({self.device.request_bytes} bytes).")
    with self._lock:
      start = time.perf_counter()
      if self.error_rate and self._random.random() < self.error_rate:
        context.abort(grpc.StatusCode.INTERNAL, "simulated failure "
                      "(--simulate_error_rate)")
      out = self.device.run_crop(np.frombuffer(request, np.uint8))
      if self.delay_s:
        time.sleep(self.delay_s)
      compute_us = int((time.perf_counter() - start) * 1e6)
    context.set_trailing_metadata((("compute-us", str(compute_us)),
                                   ("model-sha256", self.device.sha256)))
    return out.astype(WIRE_DTYPE).tobytes()

  def info(self, request: bytes, context) -> bytes:
    del request, context
    return json.dumps(self.device.info()).encode("utf-8")


def serve(model_path: str, port: int, host: str = "127.0.0.1",
          num_threads: Optional[int] = 1, delay_ms: float = 0.0,
          error_rate: float = 0.0):
  """Starts the server (returns the started ``grpc.Server`` and the bound port)."""
  import grpc  # pylint: disable=g-import-not-at-top
  service = Service(DeviceModel(model_path, num_threads), delay_ms, error_rate)
  handler = grpc.method_handlers_generic_handler(SERVICE, {
      "Run": grpc.unary_unary_rpc_method_handler(service.run),
      "Info": grpc.unary_unary_rpc_method_handler(service.info)})
  server = grpc.server(
      concurrent.futures.ThreadPoolExecutor(max_workers=1),
      handlers=(handler,),
      options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               # A restarted worker binds the same port at once.
               ("grpc.so_reuseport", 0)])
  bound = server.add_insecure_port(f"{host}:{port}")
  if bound == 0:
    raise OSError(f"Cannot listen on {host}:{port} (in use or not allowed); pick "
                  "another --port.")
  server.start()
  return server, bound, service


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m vit_edge.runtime.worker",
      description="Serve one DeViT device file over gRPC.")
  parser.add_argument("--model", required=True, help="sub_<k>.tflite")
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--host", default="127.0.0.1",
                      help="interface to listen on (0.0.0.0 for all)")
  parser.add_argument("--threads", type=int, default=1, help="interpreter threads")
  parser.add_argument("--simulate_delay_ms", type=float, default=0.0,
                      help="fault injection: add this much time to every request")
  parser.add_argument("--simulate_error_rate", type=float, default=0.0,
                      help="fault injection: fail this fraction of requests")
  args = parser.parse_args(argv)
  try:
    server, port, service = serve(args.model, args.port, args.host, args.threads,
                                  args.simulate_delay_ms, args.simulate_error_rate)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  info = service.device.info()
  print(f"worker: serving {info['file']} ({info['model']}, {info['output']} "
        f"{info['output_shape']}) on {args.host}:{port}", flush=True)
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  try:
    while not stop.wait(1.0):
      pass
  except KeyboardInterrupt:
    pass
  server.stop(grace=0.5).wait()
  return 0


if __name__ == "__main__":
  sys.exit(main())
