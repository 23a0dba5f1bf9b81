"""DeiT hard-token distillation on Fashion-MNIST: deit_tiny_distilled_patch16 learns
from a trained teacher's hard decisions through its distillation token.

Loss ``(1-a) CE(z_cls, y) + a CE(z_dist, argmax z_T)``, a = 0.5 (DeiT); inference
averages the two heads. Train the teacher first (EdgeViT-XXS, the same recipe)::

    python -m vit_edge.main --config=configs/edgevit_xxs.py:fashion \
        --workdir=workdir/fashion_teacher
    python -m vit_edge.main --config=configs/distill/deit_tiny_hard_token.py \
        --config.teacher.workdir=workdir/fashion_teacher --workdir=workdir/deit_hard

The plain baseline is the same student with ``--config.objective.name=cross_entropy``.
Measured results: README "Distillation on Fashion-MNIST".
"""

from vit_edge import recipes


def get_config(arg=None):
  del arg
  return recipes.distillation_config("deit_tiny_distilled_patch16", "hard_token",
                                     "workdir/fashion_teacher", alpha=0.5)
