"""edgevit_xs: training config (see vit_edge/recipes.py for every field and variant).

Default (offline digits, small resolution, minutes on a 2-core CPU)::

    python -m vit_edge.main --config=configs/edgevit_xs.py --workdir=workdir/edgevit_xs

Fashion-MNIST (offline IDX files; sudo apt-get install dataset-fashion-mnist)::

    python -m vit_edge.main --config=configs/edgevit_xs.py:fashion \
        --workdir=workdir/edgevit_xs_fashion

Published ImageNet-1K recipe (TFDS imagenet2012 prepared in DATA_DIR)::

    python -m vit_edge.main --config=configs/edgevit_xs.py:imagenet --config.data_dir=DATA_DIR \
        --workdir=workdir/edgevit_xs_imagenet

Expected results: digits default, 97.22% eval top-1 after 176 steps (measured,
README "Results on the embedded data"); ImageNet: the published top-1 in the
README model table.
"""

from vit_edge import recipes


def get_config(arg=None):
  return recipes.get_config("edgevit_xs", arg)
