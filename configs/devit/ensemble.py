"""DeViT stage 'ensemble' on Fashion-MNIST; see vit_edge/devit/stages.py for the arguments.

    python -m vit_edge.main --config=configs/devit/ensemble.py:n=2 \
        --workdir=WORKDIR

README "DeViT" lists every stage's command and run directory.
"""

from vit_edge.devit import stages


def get_config(arg=None):
  return stages.ensemble_config(arg)
