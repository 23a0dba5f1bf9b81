"""mobilevitv2_moe_xs: routed MobileViTv2, about 1.2M parameters (0.245x mobilevitv2_100), 4 experts top-2 of hidden d/4
(see vit_edge/models/mobilevitv2_moe.py; a reconstruction, the paper's code is not public).

Trains with label cross-entropy plus V-MoE's importance and load losses
(``config.objective.name``, weights in ``config.objective.moe``; see
vit_edge/objectives/balance.py). Default (offline digits, 64x64)::

    python -m vit_edge.main --config=configs/mobilevitv2_moe_xs.py --workdir=workdir/mobilevitv2_moe_xs

Fashion-MNIST (offline IDX files; sudo apt-get install dataset-fashion-mnist)::

    python -m vit_edge.main --config=configs/mobilevitv2_moe_xs.py:fashion \
        --workdir=workdir/mobilevitv2_moe_xs_fashion

Other balance losses: ``--config.objective.name=cross_entropy+moe_switch+moe_z``.
Routing options through the model fields, e.g.
``--config.model_overrides.capacity_factor_eval=2.0`` (see RoutedMobileViTv2).
Measured: Fashion-MNIST top-1 88.49% with the `fashion` variant (936 steps, one seed;
README "Routed MobileViTv2").
"""

from vit_edge import recipes


def get_config(arg=None):
  return recipes.routed_config("mobilevitv2_moe_xs", arg)
