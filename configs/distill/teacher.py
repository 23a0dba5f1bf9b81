"""A Fashion-MNIST teacher for the distillation configs in this folder.

arg: the registered model to train (default ``edgevit_xs``), e.g. ``:deit_small_patch16``
for the ViT teacher of relation distillation. The model's ``fashion`` recipe
(vit_edge/recipes.py), trained twice as long (4 epochs) to give the students a
teacher that is better than they are::

    python -m vit_edge.main --config=configs/distill/teacher.py \
        --workdir=workdir/fashion_teacher
    python -m vit_edge.main --config=configs/distill/teacher.py:deit_small_patch16 \
        --workdir=workdir/fashion_vit_teacher

Measured results: README "Distillation on Fashion-MNIST".
"""

from vit_edge import recipes


def get_config(arg=None):
  c = recipes.get_config(arg or "edgevit_xs", "fashion")
  c.num_epochs = 4.0
  c.eval_every_steps = c.checkpoint.every_steps = 312  # Six evaluations.
  return c
