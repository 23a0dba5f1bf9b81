"""Compression recipe with a DeiT student: DeiT-S teacher -> DeiT-Ti (distillation
token, DeiT's hard-token loss) -> Taylor-pruned heads and MLP units -> fine-tuned
with the unpruned student as teacher -> QAT -> int8 TFLite (Fashion-MNIST).
Arguments as configs/compress/uav_edgevit.py::

    python -m vit_edge.compress --config=configs/compress/deit.py \
        --workdir=workdir/compress/deit
"""

from vit_edge.compress import recipe


def get_config(arg=None):
  return recipe.recipe_config("deit_small_patch16", "deit_tiny_distilled_patch16",
                              "hard_token", arg)
