"""deit_base_distilled_patch16: training config (see vit_edge/recipes.py for every field and variant).

Default (offline digits, small resolution, minutes on a 2-core CPU)::

    python -m vit_edge.main --config=configs/deit_base_distilled_patch16.py --workdir=workdir/deit_base_distilled_patch16

Fashion-MNIST (offline IDX files; sudo apt-get install dataset-fashion-mnist)::

    python -m vit_edge.main --config=configs/deit_base_distilled_patch16.py:fashion \
        --workdir=workdir/deit_base_distilled_patch16_fashion

Published ImageNet-1K recipe (TFDS imagenet2012 prepared in DATA_DIR)::

    python -m vit_edge.main --config=configs/deit_base_distilled_patch16.py:imagenet --config.data_dir=DATA_DIR \
        --workdir=workdir/deit_base_distilled_patch16_imagenet

Expected results: digits default, 96.94% eval top-1 after 330 steps (measured,
README "Results on the embedded data"); ImageNet: the published top-1 in the
README model table.
"""

from vit_edge import recipes


def get_config(arg=None):
  return recipes.get_config("deit_base_distilled_patch16", arg)
