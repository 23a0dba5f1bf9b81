"""DeViT baseline 'single': one DeiT with the N-device ensemble's parameter count.

Same depth as the sub-models; the width (a multiple of 32, heads of about 64
channels) is the one whose parameter count is nearest the ensemble's (stacked
sub-models + fusion head); plain cross-entropy with the teacher's Fashion-MNIST
recipe and steps. See vit_edge/devit/stages.py for the arguments::

    python -m vit_edge.main --config=configs/devit/single.py:n=2 \\
        --workdir=workdir/devit/n2/single
"""

from vit_edge.devit import stages


def get_config(arg=None):
  return stages.single_config(arg)
