"""Segmentation on TFDS oxford_iiit_pet (trimap: pet / background / border), 256x256.
Prepare it once (773 MiB; never downloaded by training)::

    tfds build oxford_iiit_pet --data_dir=/data/tfds
    python -m vit_edge.main --config=configs/seg/oxford_pet.py \
        --config.data_dir=/data/tfds --workdir=/tmp/seg_pets
"""

from vit_edge.segmentation import recipes


def get_config(arg=None):
  return recipes.segmentation_config(",".join(filter(None, ["pets", arg])))
