r"""Export of a trained DeViT ensemble: one TFLite file per device, the fusion head,
and a JSON manifest that ties them together.

* ``sub_<k>.tflite`` (k = 0..N-1): input ``image`` float32 [1, S, S, 3]
  (normalised as in training), output ``tokens`` [1, P, d], device k's final
  class (and distillation) token; float, fp16 or int8 like any vit_edge export.
* ``fusion.tflite``: inputs ``tokens`` [1, N, P, d] and ``presence`` [1, N]
  (1 = the device answered, 0 = use its learned missing token); outputs
  ``logits`` and ``probs``. Always float32 (a few small matmuls).
* ``manifest.json``: classes, files with their SHA-256, token sizes, the class
  subset of each device, the preprocessing, and which worker serves which file
  (device k -> ``sub_<k>.tflite``), as read by :mod:`vit_edge.runtime.collab`.

Every file passes the export parity guard against JAX, and the composed
ensemble (each device file, then the fusion file) is checked against the JAX
ensemble's logits, with tokens rounded to float16 as they travel on the wire.

Usage::

    python -m vit_edge.devit.export --workdir=workdir/devit/n2/ensemble \
        --out_dir=/tmp/devit_n2 [--quantize=fp16]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

MANIFEST_FORMAT = "vit_edge.devit/1"
FUSION_FILE = "fusion.tflite"
MANIFEST_FILE = "manifest.json"
# Composed-ensemble parity, float exports: tokens rounded to float16 on the wire.
COMPOSED_TOLERANCE = {"none": (2e-2, 2e-2), "fp16": (5e-2, 5e-2)}


def submodel_file(device: int) -> str:
  return f"sub_{device}.tflite"


def sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def token_serving(image_size: int, num_prefix_tokens: int):
  """Image in, the device's final prefix tokens [1, P, d] out."""
  from vit_edge.export import serving  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def serve(model, variables, image):
    _, aux = model.apply(variables, image, train=False)
    return {"tokens": aux["prefix_tokens"][:, :num_prefix_tokens].astype(jnp.float32)}

  return serving.ServingSpec(
      inputs=[serving.TensorSpec("image", (1, image_size, image_size, 3))],
      outputs=[serving.OutputSpec("tokens", "features")], fn=serve)


def fusion_serving(num_devices: int, num_prefix_tokens: int, width: int):
  """N token vectors and a presence mask in; logits and probs out."""
  from vit_edge.export import serving  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  def serve(model, variables, tokens, presence):
    logits, _ = model.apply(variables, tokens, presence, method="fuse")
    return {"logits": logits, "probs": jax.nn.softmax(logits, axis=-1)}

  return serving.ServingSpec(
      inputs=[serving.TensorSpec("tokens", (1, num_devices, num_prefix_tokens, width)),
              serving.TensorSpec("presence", (1, num_devices))],
      outputs=[serving.OutputSpec("logits", "logits"),
               serving.OutputSpec("probs", "probs")], fn=serve)


def presence_patterns(count: int, num_devices: int, seed: int = 0) -> np.ndarray:
  """Parity masks: all present, each single device missing, then random ones."""
  rows = [np.ones(num_devices)]
  rows += [np.eye(num_devices)[k] * -1 + 1 for k in range(num_devices)]
  rng = np.random.default_rng(seed)
  while len(rows) < count:
    rows.append((rng.random(num_devices) > 0.5).astype(np.float64))
  return np.stack(rows[:max(count, 1)]).astype(np.float32)


def export_ensemble(model, variables, out_dir: str, *, images: np.ndarray,
                    metadata: dict[str, Any], class_subsets: Sequence[Sequence[int]],
                    quantize: str = "none", representative_data=None,
                    gelu: str = "tanh", base_port: int = 50051) -> dict[str, Any]:
  """Writes every device file, the fusion head and the manifest; returns the manifest.

  Args:
    model: a :class:`vit_edge.devit.ensemble.DeViTEnsemble`.
    variables: its variables (``{"params": ...}``).
    out_dir: destination folder (created).
    images: float32 [M, S, S, 3] preprocessed parity images (M >= 1).
    metadata: the image metadata every device file carries (model, image_size,
      mean, std, label_names, crop_pct, interpolation, ...).
    class_subsets: the classes each device was trained on (for the manifest).
    quantize: the device files' mode ("none", "fp16", "dynamic", "int8").
    representative_data: calibration samples for int8.
    gelu: "tanh" or "exact".
    base_port: the manifest's default address of device k is 127.0.0.1:base_port+k.

  Raises:
    ParityError: a file, or the composed ensemble, disagrees with JAX.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_edge import export as export_lib  # pylint: disable=g-import-not-at-top
  from vit_edge.devit import ensemble  # pylint: disable=g-import-not-at-top
  from vit_edge.runtime import classifier  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  n, p, d = model.num_devices, model.num_prefix_tokens, model.embed_dim
  if len(class_subsets) != n:
    raise ValueError(f"{len(class_subsets)} class subsets for {n} devices.")
  images = np.asarray(images, np.float32)
  params = variables["params"]
  devices, reports = [], {}
  for k in range(n):
    path = os.path.join(out_dir, submodel_file(k))
    sub_meta = dict(metadata, model=f"{metadata['model']}/device_{k}",
                    devit={"device": k, "num_devices": n, "classes": list(class_subsets[k]),
                           "num_prefix_tokens": p, "token_dim": d})
    report = export_lib.export(
        model.submodel(), {"params": ensemble.submodel_params(params, k)}, path,
        metadata=sub_meta, quantize=quantize, parity_images=images,
        representative_data=representative_data, gelu=gelu,
        serving=token_serving(int(metadata["image_size"]), p))
    reports[submodel_file(k)] = report
    devices.append({"index": k, "file": submodel_file(k), "sha256": sha256(path),
                    "classes": list(class_subsets[k]),
                    "default_address": f"127.0.0.1:{base_port + k}"})
  jax_tokens = np.asarray(jax.jit(
      lambda v, x: model.apply(v, x, method="device_tokens"))(variables, images))
  masks = presence_patterns(len(images), n)
  fusion_inputs = {"tokens": jax_tokens, "presence": masks}
  fusion_path = os.path.join(out_dir, FUSION_FILE)
  fusion_meta = {"model": f"{metadata['model']}/fusion",
                 "label_names": list(metadata["label_names"]),
                 "num_classes": len(metadata["label_names"]),
                 "devit": {"num_devices": n, "num_prefix_tokens": p, "token_dim": d}}
  reports[FUSION_FILE] = export_lib.export(
      model, {"params": ensemble.fusion_params(params)}, fusion_path,
      metadata=fusion_meta, quantize="none", parity_images=fusion_inputs, gelu=gelu,
      serving=fusion_serving(n, p, d))

  # The composed ensemble, as the runtime runs it: device files, fp16 tokens, fusion.
  tokens = np.stack([
      classifier.TFLiteModel(os.path.join(out_dir, submodel_file(k))).run(
          {"image": images})["tokens"] for k in range(n)], axis=1)
  tokens = tokens.astype(np.float16).astype(np.float32)
  fusion = classifier.TFLiteModel(fusion_path)
  composed = fusion.run({"tokens": tokens, "presence": np.ones((len(images), n),
                                                                np.float32)})["logits"]
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x)[0])(variables, images))
  diff = float(np.abs(composed - want).max())
  agreement = float(np.mean(composed.argmax(-1) == want.argmax(-1)))
  if quantize in COMPOSED_TOLERANCE:
    atol, rtol = COMPOSED_TOLERANCE[quantize]
    tolerance = atol + rtol * float(np.abs(want).max())
    if diff > tolerance:
      for name in os.listdir(out_dir):
        if name.endswith(".tflite"):
          os.remove(os.path.join(out_dir, name))
      raise export_lib.ParityError(
          f"The composed DeViT ensemble (device files -> float16 tokens -> fusion "
          f"file) differs from JAX by max |logits| {diff:.3g} > {tolerance:.3g} on "
          f"{len(images)} images; the files were removed. Re-export with "
          "quantize='none' or gelu='exact'.")
  manifest = {
      "format": MANIFEST_FORMAT, "model": metadata["model"],
      "num_classes": len(metadata["label_names"]),
      "label_names": list(metadata["label_names"]),
      "num_devices": n, "num_prefix_tokens": p, "token_dim": d,
      "token_wire_dtype": "float16", "quantize": quantize,
      "image_size": int(metadata["image_size"]), "mean": list(metadata["mean"]),
      "std": list(metadata["std"]), "crop_pct": float(metadata["crop_pct"]),
      "interpolation": str(metadata["interpolation"]),
      "devices": devices,
      "fusion": {"file": FUSION_FILE, "sha256": sha256(fusion_path)},
      "parity": {"num_images": len(images), "composed_max_abs_logit_diff": diff,
                 "composed_top1_agreement": agreement,
                 "files": {name: r.max_abs_logit_diff for name, r in reports.items()}},
  }
  with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def export_from_workdir(workdir: str, out_dir: str, *, quantize: str = "none",
                        num_parity_samples: int = 16, gelu: str = "tanh",
                        base_port: int = 50051) -> dict[str, Any]:
  """Exports a trained ensemble run (configs/devit/ensemble.py) to `out_dir`."""
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top
  from vit_edge.devit import ensemble  # pylint: disable=g-import-not-at-top
  from vit_edge.export import data  # pylint: disable=g-import-not-at-top

  model, variables, config, info = train.load_trained_model(workdir)
  if not isinstance(model, ensemble.DeViTEnsemble):
    raise ValueError(f"{workdir!r} trained {config.model}, not a DeViT ensemble "
                     "(configs/devit/ensemble.py); export it with python -m "
                     "vit_edge.export.")
  model = train.build_model(data.float32_config(config), info["num_classes"])
  mean, std = info["mean"], info["std"]
  eval_batches = input_pipeline.create_eval_iterator(
      config, mean=mean, std=std, local_batch_size=min(64, config.eval_batch_size))
  from vit_edge.export import metadata as export_metadata  # pylint: disable=g-import-not-at-top
  metadata = export_metadata.run_metadata(config, info, workdir)
  representative = None
  if quantize == "int8":
    representative = data.representative_from_config(config, mean, std, 64)
  devit = config.get("devit") or {}
  subsets = devit.get("class_subsets") or [list(range(info["num_classes"]))] * (
      model.num_devices)
  return export_ensemble(model, variables, out_dir,
                         images=data.first_images(eval_batches, num_parity_samples),
                         metadata=metadata, class_subsets=subsets, quantize=quantize,
                         representative_data=representative, gelu=gelu,
                         base_port=base_port)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained ensemble run")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--quantize", default="none",
                      choices=("none", "fp16", "dynamic", "int8"))
  parser.add_argument("--num_parity_samples", type=int, default=16)
  parser.add_argument("--base_port", type=int, default=50051)
  args = parser.parse_args(argv)
  try:
    manifest = export_from_workdir(args.workdir, args.out_dir, quantize=args.quantize,
                                   num_parity_samples=args.num_parity_samples,
                                   base_port=args.base_port)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  parity = manifest["parity"]
  print(f"Wrote {manifest['num_devices']} device files, {FUSION_FILE} and "
        f"{MANIFEST_FILE} to {args.out_dir}; composed max |logit diff| "
        f"{parity['composed_max_abs_logit_diff']:.2e}, top-1 agreement "
        f"{parity['composed_top1_agreement']:.3f} on {parity['num_images']} images.")
  for device in manifest["devices"]:
    print(f"  device {device['index']}: {device['file']} classes {device['classes']} "
          f"-> worker {device['default_address']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
