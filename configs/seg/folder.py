"""Segmentation on your image + mask folders (LPCVC 2023 layout: 512x512, 14
classes; <data_dir>/train/{images,masks}, <data_dir>/val/{images,masks}, masks
are class-id PNGs, 255 = ignore)::

    python -m vit_edge.main --config=configs/seg/folder.py \
        --config.data_dir=/data/lpcvc --workdir=/tmp/seg_lpcvc
"""

from vit_edge.segmentation import recipes


def get_config(arg=None):
  return recipes.segmentation_config(",".join(filter(None, ["folder", arg])))
