"""mobilevitv2_moe_s: routed MobileViTv2, mobilevitv2_050's size (1.38M), 4 experts top-1 of hidden d/2
(see vit_edge/models/mobilevitv2_moe.py; a reconstruction, the paper's code is not public).

Trains with label cross-entropy plus V-MoE's importance and load losses
(``config.objective.name``, weights in ``config.objective.moe``; see
vit_edge/objectives/balance.py). Default (offline digits, 64x64)::

    python -m vit_edge.main --config=configs/mobilevitv2_moe_s.py --workdir=workdir/mobilevitv2_moe_s

Fashion-MNIST (offline IDX files; sudo apt-get install dataset-fashion-mnist)::

    python -m vit_edge.main --config=configs/mobilevitv2_moe_s.py:fashion \
        --workdir=workdir/mobilevitv2_moe_s_fashion

Other balance losses: ``--config.objective.name=cross_entropy+moe_switch+moe_z``.
Routing options through the model fields, e.g.
``--config.model_overrides.capacity_factor_eval=2.0`` (see RoutedMobileViTv2).
Measured: Fashion-MNIST top-1 88.48% with the `fashion` variant (936 steps, one seed;
README "Routed MobileViTv2").
"""

from vit_edge import recipes


def get_config(arg=None):
  return recipes.routed_config("mobilevitv2_moe_s", arg)
