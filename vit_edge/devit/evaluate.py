"""Top-1 of a trained DeViT ensemble with every device, and with each one missing.

A missing device gets presence 0, so the fusion head uses its learned missing
token: what the runtime does for a dead, slow or failing worker. Used by the
accuracy pipeline (`vit_edge.devit.pipeline`) and the robustness table of
`vit_edge.tools.bench_devit`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vit_edge import input_pipeline
from vit_edge import train


@dataclasses.dataclass(frozen=True)
class MissingDeviceAccuracy:
  num_devices: int
  failout: float
  images: int
  all_present: float          # top-1 in %
  device_missing: tuple[float, ...]  # top-1 in % with device k left out


def missing_device_accuracy(workdir: str, max_examples: int = 0,
                            batch_size: int = 250) -> MissingDeviceAccuracy:
  """Evaluates the run's newest checkpoint on its eval split (`max_examples` 0: all)."""
  model, variables, config, info = train.load_trained_model(workdir)
  n = model.num_devices
  batches = input_pipeline.create_eval_iterator(
      config, mean=info["mean"], std=info["std"], local_batch_size=batch_size)
  fuse = jax.jit(lambda v, t, p: model.apply(v, t, p, method="fuse")[0])
  tokens_fn = jax.jit(lambda v, x: model.apply(v, x, method="device_tokens"))
  patterns = [np.ones(n)] + [1 - np.eye(n)[k] for k in range(n)]
  correct, seen = np.zeros(len(patterns)), 0
  for batch in batches:
    mask = batch["mask"] > 0
    tokens = tokens_fn(variables, jnp.asarray(batch["image"]))
    for i, pattern in enumerate(patterns):
      presence = jnp.broadcast_to(jnp.asarray(pattern, jnp.float32), (len(mask), n))
      logits = np.asarray(fuse(variables, tokens, presence))
      correct[i] += np.sum((logits.argmax(-1) == batch["label"]) & mask)
    seen += int(mask.sum())
    if max_examples and seen >= max_examples:
      break
  acc = 100 * correct / max(seen, 1)
  return MissingDeviceAccuracy(
      num_devices=n, failout=float(config.model_overrides.get("failout_rate", 0.0)),
      images=seen, all_present=float(acc[0]),
      device_missing=tuple(float(a) for a in acc[1:]))
