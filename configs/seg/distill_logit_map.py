"""Logit-map distillation (efficient-vit): a small segmenter learns from a larger
segmentation teacher's pre-softmax logit maps (MSE, weight 1) plus the pixel
cross-entropy, on the embedded set. Train the teacher first::

    python -m vit_edge.main --config=configs/seg/embedded.py:model=upernet_mobilevitv2_100 \
        --workdir=/tmp/seg_teacher
    python -m vit_edge.main --config=configs/seg/distill_logit_map.py \
        --config.teacher.workdir=/tmp/seg_teacher --workdir=/tmp/seg_student

The baseline is configs/seg/embedded.py:model=fpn_edgevit_xxs.
"""

from vit_edge.segmentation import recipes


def get_config(arg=None):
  return recipes.segmentation_config(arg or "model=fpn_edgevit_xxs,distill")
