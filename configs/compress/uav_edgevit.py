"""The UAV paper's compression flow for a Jetson-Nano-class target, EdgeViT student.

efficient-vit (arXiv 2309.02617) distils a large model into a small one, prunes it
and quantises it. Here, on Fashion-MNIST: EdgeViT-S teacher -> EdgeViT-XXS
student (soft KD, a 0.5, tau 4) -> Taylor-pruned (half of the MLP hidden units and
of the prunable heads) -> fine-tuned with KD from the unpruned student -> post-training
int8 TFLite (QAT's int8 conversion stops in litert-converter for this family:
vit_edge/compress/qat.py check_convertible; ``--config.qat.epochs=1`` tries it).
Arguments: ``steps=N`` (quick run), ``ptq`` (post-training int8; the default here),
``teacher_workdir=DIR`` (reuse a trained EdgeViT-S)::

    python -m vit_edge.compress --config=configs/compress/uav_edgevit.py \
        --workdir=workdir/compress/uav_edgevit
"""

from vit_edge.compress import recipe


def get_config(arg=None):
  return recipe.recipe_config("edgevit_s", "edgevit_xxs", "soft_kd", arg, qat=False)
