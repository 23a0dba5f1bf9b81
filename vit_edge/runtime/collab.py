"""The DeViT coordinator: one image to N device workers, their tokens fused here.

Needs only numpy, Pillow, ai-edge-litert and grpcio::

    python -m vit_edge.runtime.collab --manifest=/tmp/devit_n2/manifest.json \
        --workers=127.0.0.1:50051,127.0.0.1:50052 image.png [--deadline_ms=500]
    python -m vit_edge.runtime.collab --manifest=... --workers=... --bench=200 image.png

Per image: the image is resized and centre-cropped once (uint8, the model's
eval transform), sent to every worker at once (worker k serves device k's file
of the manifest), and their float16 tokens are gathered under one deadline. A
worker that is dead (UNAVAILABLE), slow (DEADLINE_EXCEEDED), failing (any other
status), answering with the wrong token size, or serving another file than the
manifest's (its ``model-sha256``) is left out: the fusion head gets presence 0
for it and uses that device's learned missing token. The answer names every
worker left out and why, and each worker's bytes out/in, compute time and round
trip. Channels reconnect with a short backoff (gRPC's default grows to two
minutes), so a restarted worker is used again within about a second.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from vit_edge.runtime import classifier
from vit_edge.runtime import transforms
from vit_edge.runtime import worker as worker_lib

MANIFEST_FORMAT = "vit_edge.devit/1"
# Reconnect quickly after a worker restarts; defaults are 1 s growing to 120 s.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 500),
                     ("grpc.max_receive_message_length", worker_lib.MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", worker_lib.MAX_MESSAGE_BYTES))


class ManifestError(ValueError):
  """A manifest that is missing, malformed or does not match the files or workers."""


def load_manifest(path: str, check_files: bool = True) -> dict[str, Any]:
  """The manifest written by ``python -m vit_edge.devit.export``, checked.

  With `check_files`, the fusion file must exist next to it with the recorded
  SHA-256 (the coordinator runs it); device files live on the workers.
  """
  if not os.path.exists(path):
    raise ManifestError(f"--manifest={path!r} does not exist; export one with "
                        "python -m vit_edge.devit.export --workdir=... --out_dir=...")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ManifestError(f"{path!r} is not valid JSON ({e}); re-export it.") from e
  if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
    raise ManifestError(
        f"{path!r} has format {manifest.get('format') if isinstance(manifest, dict) else None!r}; "
        f"expected {MANIFEST_FORMAT!r} (python -m vit_edge.devit.export).")
  required = ("num_devices", "num_prefix_tokens", "token_dim", "devices", "fusion",
              "label_names", "image_size", "crop_pct", "interpolation")
  missing = [k for k in required if k not in manifest]
  if missing:
    raise ManifestError(f"{path!r} lacks {missing}; re-export it.")
  if len(manifest["devices"]) != manifest["num_devices"]:
    raise ManifestError(f"{path!r} lists {len(manifest['devices'])} device files for "
                        f"num_devices={manifest['num_devices']}; re-export it.")
  if check_files:
    fusion = os.path.join(os.path.dirname(os.path.abspath(path)),
                          manifest["fusion"]["file"])
    if not os.path.exists(fusion):
      raise ManifestError(f"The manifest's fusion file {fusion!r} does not exist; "
                          "keep manifest.json next to the files it lists.")
    with open(fusion, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    if digest != manifest["fusion"]["sha256"]:
      raise ManifestError(f"{fusion!r} has SHA-256 {digest[:12]}..., the manifest "
                          f"records {manifest['fusion']['sha256'][:12]}...: the files "
                          "do not belong together. Re-export them together.")
  return manifest


def parse_workers(spec: str, num_devices: int) -> list[str]:
  """``"host:port,host:port"`` -> addresses, one per device in manifest order."""
  addresses = [a.strip() for a in spec.split(",") if a.strip()]
  if len(addresses) != num_devices:
    raise ManifestError(
        f"--workers lists {len(addresses)} address(es) but the manifest has "
        f"{num_devices} devices; give one host:port per device, in device order.")
  for address in addresses:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ManifestError(f"Worker address {address!r} is not host:port.")
  return addresses


def image_crop(image: transforms.ImageLike, manifest: dict[str, Any]) -> np.ndarray:
  """The uint8 [S, S, 3] eval crop every worker normalises (one resize for all)."""
  crop = transforms.resize_and_center_crop(
      transforms.load_image(image), int(manifest["image_size"]),
      float(manifest["crop_pct"]), str(manifest["interpolation"]))
  return np.round(crop).astype(np.uint8)


@dataclasses.dataclass
class WorkerResult:
  """One worker's part in one answer."""
  device: int
  address: str
  status: str  # "ok", or why it was left out.
  detail: str = ""
  bytes_out: int = 0
  bytes_in: int = 0
  compute_ms: Optional[float] = None
  round_trip_ms: Optional[float] = None

  @property
  def ok(self) -> bool:
    return self.status == "ok"


@dataclasses.dataclass
class Answer:
  """The fused prediction of one image and how each worker took part."""
  probs: np.ndarray
  logits: np.ndarray
  labels: list[str]
  workers: list[WorkerResult]
  latency_ms: float

  @property
  def top1(self) -> int:
    return int(np.argmax(self.probs))

  @property
  def missing(self) -> list[int]:
    return [w.device for w in self.workers if not w.ok]

  def top(self, k: int = 5) -> list[tuple[str, float]]:
    order = np.argsort(-self.probs, kind="stable")[:k]
    return [(self.labels[i], float(self.probs[i])) for i in order]

  def describe(self, top_k: int = 3) -> str:
    lines = [", ".join(f"{label} {p:.3f}" for label, p in self.top(top_k))]
    if self.missing:
      lines[0] += (f"  [degraded: device(s) {self.missing} left out, their learned "
                   "missing tokens used]")
    for w in self.workers:
      times = ("" if w.round_trip_ms is None else f" round trip {w.round_trip_ms:.1f} ms")
      if w.compute_ms is not None:
        times += f" compute {w.compute_ms:.1f} ms"
      lines.append(f"  device {w.device} @ {w.address}: {w.status}"
                   f"{' (' + w.detail + ')' if w.detail else ''}; "
                   f"{w.bytes_out} B out, {w.bytes_in} B in;{times}")
    lines.append(f"  end to end {self.latency_ms:.1f} ms")
    return "\n".join(lines)


class Collaboration:
  """Talks to the N workers of a manifest and fuses their tokens.

  Example::

      collab = Collaboration("/tmp/devit_n2/manifest.json",
                             ["127.0.0.1:50051", "127.0.0.1:50052"], deadline_s=0.5)
      answer = collab.classify("shirt.png")
      print(answer.describe())
      collab.close()

  Raises (at construction):
    ManifestError: a bad manifest, a wrong number of workers, or (``verify``) a
      reachable worker serving another file than its device's, or tokens of
      another shape.
  """

  def __init__(self, manifest_path: str, addresses: Sequence[str], *,
               deadline_s: float = 0.5, verify: bool = True,
               num_threads: Optional[int] = 1):
    import grpc  # pylint: disable=g-import-not-at-top
    self._grpc = grpc
    self.manifest = load_manifest(manifest_path)
    m = self.manifest
    self.addresses = parse_workers(",".join(addresses), m["num_devices"])
    if deadline_s <= 0:
      raise ValueError(f"deadline_s={deadline_s} must be > 0.")
    self.deadline_s = deadline_s
    self.token_shape = (m["num_prefix_tokens"], m["token_dim"])
    self.token_bytes = int(np.prod(self.token_shape)) * np.dtype(
        worker_lib.WIRE_DTYPE).itemsize
    fusion_path = os.path.join(os.path.dirname(os.path.abspath(manifest_path)),
                               m["fusion"]["file"])
    self.fusion = classifier.TFLiteModel(fusion_path, num_threads=num_threads)
    self.labels = [str(x) for x in m["label_names"]]
    self.channels = [grpc.insecure_channel(a, options=RECONNECT_OPTIONS)
                     for a in self.addresses]
    self._run = [c.unary_unary(worker_lib.RUN_METHOD) for c in self.channels]
    self._info = [c.unary_unary(worker_lib.INFO_METHOD) for c in self.channels]
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.channels))
    self.startup: list[str] = []
    if verify:
      self.startup = self.verify_workers()

  def verify_workers(self) -> list[str]:
    """Checks each reachable worker's file and output shape; returns status lines.

    Unreachable workers are reported (they may start later; every answer checks
    the file again); a worker serving the wrong file raises ManifestError.
    """
    lines = []
    for k, (address, info_call) in enumerate(zip(self.addresses, self._info)):
      expected = self.manifest["devices"][k]
      try:
        info = json.loads(info_call(b"", timeout=self.deadline_s * 4))
      except self._grpc.RpcError as e:
        lines.append(f"device {k} @ {address}: unreachable now "
                     f"({e.code().name}); it is left out until it answers")
        continue
      if info.get("sha256") != expected["sha256"]:
        raise ManifestError(
            f"Worker {address} (device {k}) serves {info.get('file')!r} "
            f"({info.get('model')}), not the manifest's {expected['file']!r} "
            f"(SHA-256 {expected['sha256'][:12]}...). Start it with "
            f"--model={expected['file']} or reorder --workers.")
      if list(info.get("output_shape", [])) != list(self.token_shape):
        raise ManifestError(
            f"Worker {address} (device {k}) sends {info.get('output')} of shape "
            f"{info.get('output_shape')}; the fusion head takes {list(self.token_shape)}.")
      lines.append(f"device {k} @ {address}: serves {info['file']} (verified)")
    return lines

  def _call(self, k: int, request: bytes, deadline: float) -> tuple[WorkerResult,
                                                                   Optional[np.ndarray]]:
    address = self.addresses[k]
    result = WorkerResult(k, address, "ok", bytes_out=len(request))
    start = time.perf_counter()
    timeout = max(deadline - time.monotonic(), 1e-3)
    try:
      response, call = self._run[k].with_call(request, timeout=timeout)
    except self._grpc.RpcError as e:
      code = e.code()
      result.round_trip_ms = (time.perf_counter() - start) * 1e3
      result.status = {"DEADLINE_EXCEEDED": "slow", "UNAVAILABLE": "unreachable"
                       }.get(code.name, "failed")
      if result.status == "unreachable":
        result.bytes_out = 0  # Never connected: nothing was sent.
      result.detail = f"{code.name}: {e.details()}" if code.name not in (
          "DEADLINE_EXCEEDED",) else f"no answer within {self.deadline_s * 1e3:.0f} ms"
      return result, None
    result.round_trip_ms = (time.perf_counter() - start) * 1e3
    result.bytes_in = len(response)
    trailing = dict(call.trailing_metadata() or ())
    if "compute-us" in trailing:
      result.compute_ms = int(trailing["compute-us"]) / 1e3
    expected_sha = self.manifest["devices"][k]["sha256"]
    if trailing.get("model-sha256") != expected_sha:
      result.status = "wrong_model"
      result.detail = (f"serves SHA-256 {str(trailing.get('model-sha256'))[:12]}..., "
                       f"the manifest's {self.manifest['devices'][k]['file']} is "
                       f"{expected_sha[:12]}...")
      return result, None
    if len(response) != self.token_bytes:
      result.status = "bad_tokens"
      result.detail = (f"{len(response)} bytes, expected {self.token_bytes} "
                       f"(float16 {list(self.token_shape)})")
      return result, None
    tokens = np.frombuffer(response, worker_lib.WIRE_DTYPE).reshape(self.token_shape)
    return result, tokens.astype(np.float32)

  def classify_crop(self, crop: np.ndarray) -> Answer:
    """One uint8 [S, S, 3] crop -> the fused answer, within the deadline."""
    start = time.perf_counter()
    deadline = time.monotonic() + self.deadline_s
    request = np.ascontiguousarray(crop, np.uint8).tobytes()
    futures = [self._pool.submit(self._call, k, request, deadline)
               for k in range(len(self.addresses))]
    n = len(self.addresses)
    tokens = np.zeros((1, n) + self.token_shape, np.float32)
    presence = np.zeros((1, n), np.float32)
    results = []
    for k, future in enumerate(futures):
      result, value = future.result()  # Each call carries the deadline itself.
      results.append(result)
      if value is not None:
        tokens[0, k], presence[0, k] = value, 1.0
    out = self.fusion.run({"tokens": tokens, "presence": presence})
    return Answer(probs=out["probs"][0], logits=out["logits"][0], labels=self.labels,
                  workers=results, latency_ms=(time.perf_counter() - start) * 1e3)

  def classify(self, image: transforms.ImageLike) -> Answer:
    """An image (path, PIL image or uint8 array) -> the fused answer."""
    return self.classify_crop(image_crop(image, self.manifest))

  def close(self) -> None:
    self._pool.shutdown(wait=False)
    for channel in self.channels:
      channel.close()


def percentile_ms(values: Sequence[float], q: float) -> float:
  return float(np.percentile(np.asarray(values, np.float64), q))


def bench(collab: Collaboration, crop: np.ndarray, iterations: int) -> dict[str, Any]:
  """End-to-end latency p50/p95 and traffic per image over `iterations` requests."""
  collab.classify_crop(crop)  # Warm-up: connections, interpreters.
  answers = [collab.classify_crop(crop) for _ in range(iterations)]
  latencies = [a.latency_ms for a in answers]
  per_device = []
  for k in range(len(collab.addresses)):
    parts = [a.workers[k] for a in answers]
    per_device.append({"device": k,
                       "answered": sum(p.ok for p in parts) / len(parts),
                       "bytes_out": parts[0].bytes_out,
                       "bytes_in": max(p.bytes_in for p in parts)})
  return {"iterations": iterations, "p50_ms": percentile_ms(latencies, 50),
          "p95_ms": percentile_ms(latencies, 95), "devices": per_device,
          "degraded": sum(bool(a.missing) for a in answers)}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m vit_edge.runtime.collab",
      description="Classify images with DeViT device workers and the fusion head.")
  parser.add_argument("--manifest", required=True, help="manifest.json of the export")
  parser.add_argument("--workers", required=True,
                      help="host:port of each device's worker, in device order")
  parser.add_argument("--deadline_ms", type=float, default=500.0,
                      help="one deadline for gathering all tokens of an image")
  parser.add_argument("--top_k", type=int, default=3)
  parser.add_argument("--bench", type=int, default=0,
                      help="run the first image this many times; print p50/p95")
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(argv)
  try:
    manifest = load_manifest(args.manifest)
    addresses = parse_workers(args.workers, manifest["num_devices"])
    collab = Collaboration(args.manifest, addresses, deadline_s=args.deadline_ms / 1e3)
  except (ManifestError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    for line in collab.startup:
      print(line)
    if args.bench:
      stats = bench(collab, image_crop(args.images[0], manifest), args.bench)
      print(f"bench: {stats['iterations']} images, end to end p50 "
            f"{stats['p50_ms']:.2f} ms, p95 {stats['p95_ms']:.2f} ms, "
            f"{stats['degraded']} degraded")
      for d in stats["devices"]:
        print(f"  device {d['device']}: {d['bytes_out']} B out, {d['bytes_in']} B in "
              f"per image, answered {d['answered']:.1%}")
      return 0
    for image in args.images:
      try:
        answer = collab.classify(image)
      except (FileNotFoundError, transforms.ImageReadError) as e:
        print(f"{image}: error: {e}", file=sys.stderr)
        continue
      print(f"{image}: {answer.describe(args.top_k)}")
    return 0
  finally:
    collab.close()


if __name__ == "__main__":
  sys.exit(main())
