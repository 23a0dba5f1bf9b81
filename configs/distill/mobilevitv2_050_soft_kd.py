"""Soft knowledge distillation on Fashion-MNIST for a convolutional student
(mobilevitv2_050): ``(1-a) CE + a tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau))``,
a = 0.5, tau = 4. Train the teacher first (EdgeViT-XXS, the same recipe)::

    python -m vit_edge.main --config=configs/edgevit_xxs.py:fashion \
        --workdir=workdir/fashion_teacher
    python -m vit_edge.main --config=configs/distill/mobilevitv2_050_soft_kd.py \
        --config.teacher.workdir=workdir/fashion_teacher --workdir=workdir/mvit_kd

The plain baseline is the same student with ``--config.objective.name=cross_entropy``.
Measured results: README "Distillation on Fashion-MNIST".
"""

from vit_edge import recipes


def get_config(arg=None):
  del arg
  return recipes.distillation_config("mobilevitv2_050", "soft_kd",
                                     "workdir/fashion_teacher", alpha=0.5, tau=4.0)
