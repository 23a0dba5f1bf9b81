"""DeViT stage 'sub_teacher' on Fashion-MNIST; see vit_edge/devit/stages.py for the arguments.

    python -m vit_edge.main --config=configs/devit/sub_teacher.py:n=2,k=0 \
        --workdir=WORKDIR

README "DeViT" lists every stage's command and run directory.
"""

from vit_edge.devit import stages


def get_config(arg=None):
  return stages.sub_teacher_config(arg)
