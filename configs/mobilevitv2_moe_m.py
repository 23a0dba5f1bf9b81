"""mobilevitv2_moe_m: routed MobileViTv2 at width 7/12, 1.45M parameters (0.295x mobilevitv2_100), 4 experts top-2 of hidden d/8 in every FFN
(see vit_edge/models/mobilevitv2_moe.py; a reconstruction, the paper's code is not public).

Trains with label cross-entropy plus V-MoE's importance and load losses
(``config.objective.name``, weights in ``config.objective.moe``; see
vit_edge/objectives/balance.py). Default (offline digits, 64x64)::

    python -m vit_edge.main --config=configs/mobilevitv2_moe_m.py --workdir=workdir/mobilevitv2_moe_m

Fashion-MNIST (offline IDX files; sudo apt-get install dataset-fashion-mnist)::

    python -m vit_edge.main --config=configs/mobilevitv2_moe_m.py:fashion \
        --config.image_size=64 --workdir=workdir/mobilevitv2_moe_m_fashion64

Other balance losses: ``--config.objective.name=cross_entropy+moe_switch+moe_z``.
Routing options through the model fields, e.g.
``--config.model_overrides.capacity_factor_eval=2.0`` (see RoutedMobileViTv2).
Measured: README "Routed MobileViTv2" (Fashion-MNIST at 64 px).
"""

from vit_edge import recipes


def get_config(arg=None):
  return recipes.routed_config("mobilevitv2_moe_m", arg)
