"""A frozen teacher for distillation: any vit_edge run directory.

The teacher's run directory rebuilds it (its config.json names the model and its
overrides; its dataset_info.json the resolution and normalisation). A registry
model with PyTorch weights becomes such a directory through
``python -m vit_edge.tools.import_torch``. The teacher's variables are passed to
the train step as a separate, never-optimised argument: they are not in the train
state, so they are neither in the optimiser state nor in the student's
checkpoints, and a resumed run reads them again from the teacher's directory.

A teacher trained at another resolution or normalisation sees its own view of the
batch: the student's (mixed) images are un-normalised, resized to the teacher's
input size and normalised with the teacher's statistics inside the step.

Example::

    teacher, variables = load_teacher("workdir/teacher", student_image_size=32,
                                      student_mean=(0.5,) * 3, student_std=(0.5,) * 3)
    logits, aux = teacher(variables, images)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model and the input transform from the student's batch to its own."""
  model: nn.Module
  num_classes: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  student_image_size: int
  student_mean: tuple[float, ...]
  student_std: tuple[float, ...]
  # Logit columns kept, in the student's label order (empty: all). A teacher of
  # all classes teaching a student of a class subset (DeViT without sub-teachers).
  classes: tuple[int, ...] = ()

  def view(self, images: jax.Array) -> jax.Array:
    """The student's normalised batch as this teacher expects it."""
    if (self.mean, self.std) != (self.student_mean, self.student_std):
      pixels = images * jnp.asarray(self.student_std) + jnp.asarray(self.student_mean)
      images = (pixels - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    if self.image_size != self.student_image_size:
      b, _, _, c = images.shape
      images = jax.image.resize(images, (b, self.image_size, self.image_size, c),
                                "bilinear")
    return images

  def __call__(self, variables: Any, images: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eval-mode logits and intermediates, with no gradient into anything."""
    logits, aux = self.model.apply(variables, self.view(images), train=False)
    if self.classes:
      logits = logits[..., jnp.asarray(self.classes)]
    return jax.lax.stop_gradient((logits.astype(jnp.float32), aux))


def load_teacher(workdir: str, *, student_image_size: int,
                 student_mean: Sequence[float], student_std: Sequence[float],
                 step: Optional[int] = None, use_ema: bool = True,
                 classes: Sequence[int] = ()) -> tuple[Teacher, Any]:
  """(Teacher, variables as host arrays) from a training or import_torch run dir.

  `classes`: the teacher's logit columns to keep, in the student's label order
  (``config.teacher.classes``; empty keeps all).
  """
  from vit_edge import train  # pylint: disable=g-import-not-at-top  (train imports us)

  if not workdir:
    raise ValueError(
        "This objective needs a teacher: set --config.teacher.workdir=DIR to a "
        "vit_edge run directory (train one with python -m vit_edge.main, or import "
        "PyTorch weights with python -m vit_edge.tools.import_torch).")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(
        f"config.teacher.workdir={workdir!r} does not exist; point it at a run "
        "directory that holds config.json and checkpoints/.")
  model, variables, _, info = train.load_trained_model(workdir, step=step,
                                                       use_ema=use_ema)
  num_classes = int(info["num_classes"])
  bad = [c for c in classes if not 0 <= int(c) < num_classes]
  if bad:
    raise ValueError(
        f"config.teacher.classes={tuple(classes)} names classes {bad} that the "
        f"teacher in {workdir!r} does not have (it has {num_classes}: 0.."
        f"{num_classes - 1}); list the student's classes as the teacher numbers them.")
  teacher = Teacher(
      model=model, num_classes=num_classes,
      image_size=int(info["image_size"]),
      mean=tuple(float(m) for m in info["mean"]),
      std=tuple(float(s) for s in info["std"]),
      student_image_size=int(student_image_size),
      student_mean=tuple(float(m) for m in student_mean),
      student_std=tuple(float(s) for s in student_std),
      classes=tuple(int(c) for c in classes))
  return teacher, variables
