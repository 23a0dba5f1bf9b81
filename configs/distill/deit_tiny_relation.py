"""Token-relation (Q/K/V) distillation on Fashion-MNIST (DeViT / MiniLM): a DeiT-Ti
student matches the self-relations of a ViT teacher's queries, keys and values at
the middle block of each (block depth // 2 - 1), weights (0.2, 0.1, 0.3), on top of
label cross-entropy. Relations are tokens x tokens, so teacher and student widths
may differ; both must see the same patch grid. Train the ViT teacher first::

    python -m vit_edge.main --config=configs/deit_small_patch16.py:fashion \
        --workdir=workdir/fashion_vit_teacher
    python -m vit_edge.main --config=configs/distill/deit_tiny_relation.py \
        --config.teacher.workdir=workdir/fashion_vit_teacher --workdir=workdir/deit_rel

The plain baseline is the same student with ``--config.objective.name=cross_entropy``.
Measured results: README "Distillation on Fashion-MNIST".
"""

from vit_edge import recipes


def get_config(arg=None):
  del arg
  return recipes.distillation_config("deit_tiny_patch16", "cross_entropy+relation",
                                     "workdir/fashion_vit_teacher")
