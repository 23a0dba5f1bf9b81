"""Segmentation on the embedded semi-synthetic set (Fashion-MNIST garments on
random backgrounds, 11 classes, 64x64; offline). A light UPerNet on EdgeViT-XXS by
default; the arg picks another head/backbone and options
(vit_edge/segmentation/recipes.py)::

    python -m vit_edge.main --config=configs/seg/embedded.py --workdir=/tmp/seg
    python -m vit_edge.main --config=configs/seg/embedded.py:model=fpn_mobilevitv2_100 \
        --workdir=/tmp/seg_fpn_mv2

Measured results: README "Segmentation".
"""

from vit_edge.segmentation import recipes


def get_config(arg=None):
  return recipes.segmentation_config(arg)
