"""Segmentation metrics from a confusion matrix, and the segmentation eval task.

mIoU and mean Dice (LPCVC 2023's score) are computed from one ``[C, C]`` confusion
matrix accumulated over the whole eval split (rows: truth, columns: prediction),
as mmsegmentation does, not averaged per batch. For class c with TP, FP, FN:
``IoU = TP / (TP + FP + FN)`` and ``Dice = 2 TP / (2 TP + FP + FN)``; the means run
over the classes present in the truth or the prediction (a class absent from both
has no defined score and is left out, as mmsegmentation's nan-mean). Pixels
labelled with the ignore index (any id outside ``0..C-1``) count nowhere.

`SegmentationEval` is the task object that `vit_edge.train` picks for
``config.task == "segmentation"``: its `eval_step` returns `ConfusionMetrics`,
which merge across batches and compute a flat dict of scalars (``loss``,
``miou``, ``mdice``, ``top1`` = per-pixel accuracy, ``iou/<class>``,
``dice/<class>``).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     weights: jax.Array | None = None) -> jax.Array:
  """float32 [C, C] counts of (truth, prediction) pairs; ignored labels drop out.

  Example::

      confusion_matrix(jnp.array([0, 1, 255]), jnp.array([0, 0, 1]), 2)
      # [[1, 0], [1, 0]]
  """
  labels = labels.reshape(-1)
  predictions = predictions.reshape(-1)
  valid = ((labels >= 0) & (labels < num_classes)).astype(jnp.float32)
  if weights is not None:
    valid = valid * weights.reshape(-1)
  flat = jnp.where(valid > 0, labels, 0) * num_classes + predictions
  counts = jnp.zeros((num_classes * num_classes,), jnp.float32).at[flat].add(valid)
  return counts.reshape(num_classes, num_classes)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Per-class IoU and Dice ([C], NaN where a class is in neither truth nor
  prediction), their nan-means, and pixel accuracy, from a [C, C] matrix."""
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  fp = confusion.sum(0) - tp
  fn = confusion.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
  total = confusion.sum()
  present = ~np.isnan(iou)
  return {"iou": iou, "dice": dice,
          "miou": float(np.mean(iou[present])) if present.any() else 0.0,
          "mdice": float(np.mean(dice[present])) if present.any() else 0.0,
          "pixel_accuracy": float(tp.sum() / total) if total else 0.0}


def _key(name: str) -> str:
  return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_") or "class"


@flax.struct.dataclass
class ConfusionMetrics:
  """Eval metrics of a segmentation model: a confusion matrix and the loss sums."""

  confusion: jax.Array
  loss_sum: jax.Array
  pixel_count: jax.Array
  label_names: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

  def merge(self, other: "ConfusionMetrics") -> "ConfusionMetrics":
    return ConfusionMetrics(self.confusion + other.confusion,
                            self.loss_sum + other.loss_sum,
                            self.pixel_count + other.pixel_count, self.label_names)

  def compute(self) -> dict[str, float]:
    """Flat scalars: loss, miou, mdice, top1 (pixel accuracy), iou/<c>, dice/<c>."""
    scores = scores_from_confusion(np.asarray(jax.device_get(self.confusion)))
    count = float(self.pixel_count)
    out = {"loss": float(self.loss_sum) / count if count else 0.0,
           "miou": scores["miou"], "mdice": scores["mdice"],
           # Named top1 so that "keep the best checkpoint" (eval/top1) ranks runs.
           "top1": scores["pixel_accuracy"]}
    names = self.label_names or tuple(str(i) for i in range(len(scores["iou"])))
    for name, iou, dice in zip(names, scores["iou"], scores["dice"]):
      out[f"iou/{_key(name)}"] = float(iou)
      out[f"dice/{_key(name)}"] = float(dice)
    return out


class SegmentationEval:
  """The eval task of segmentation runs (``config.task = "segmentation"``).

  Example::

      task = SegmentationEval(num_classes=11, label_names=names)
      metrics = task.eval_step(state, batch, model=model, use_ema=False)
      metrics.compute()["miou"]
  """

  def __init__(self, num_classes: int, label_names: Sequence[str] = ()):
    self.num_classes = int(num_classes)
    self.label_names = tuple(label_names)

  def eval_step(self, state: dict[str, Any], batch: dict[str, jax.Array], *,
                model: Any, use_ema: bool) -> ConfusionMetrics:
    """Confusion matrix and CE sum of one batch; padding examples weigh 0."""
    params = state["ema_params"] if use_ema else state["params"]
    variables = {"params": params}
    if state["batch_stats"]:
      variables["batch_stats"] = state["batch_stats"]
    logits, _ = model.apply(variables, batch["image"], train=False)
    logits = logits.astype(jnp.float32)
    labels = batch["label"]
    weights = jnp.broadcast_to(batch["mask"][:, None, None], labels.shape)
    valid = ((labels >= 0) & (labels < self.num_classes)).astype(jnp.float32) * weights
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.clip(labels, 0, self.num_classes - 1)
    ce = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return ConfusionMetrics(
        confusion_matrix(labels, jnp.argmax(logits, -1), self.num_classes, weights),
        jnp.sum(ce * valid), jnp.sum(valid), self.label_names)
