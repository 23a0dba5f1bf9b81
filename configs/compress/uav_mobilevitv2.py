"""The UAV paper's compression flow with a MobileViT-family student (its choice).

efficient-vit (arXiv 2309.02617) distils into a MobileViT, prunes and quantises it
for a Jetson Nano. Here, on Fashion-MNIST: MobileViTv2-1.0 teacher ->
MobileViTv2-0.5 student (soft KD, a 0.5, tau 4) -> Taylor-pruned (half of the
inverted-residual and transformer FFN hidden units) -> fine-tuned with KD from the
unpruned student -> post-training int8 TFLite (QAT's int8 conversion stops in
litert-converter for this family: vit_edge/compress/qat.py check_convertible;
``--config.qat.epochs=1`` tries it). Arguments as configs/compress/uav_edgevit.py::

    python -m vit_edge.compress --config=configs/compress/uav_mobilevitv2.py \
        --workdir=workdir/compress/uav_mobilevitv2
"""

from vit_edge.compress import recipe


def get_config(arg=None):
  return recipe.recipe_config("mobilevitv2_100", "mobilevitv2_050", "soft_kd", arg,
                              qat=False)
