"""Semantic segmentation: data (`data`), metrics and the eval task (`metrics`).

The models are registry entries (`vit_edge.models.segmentation`: ``fpn_*``,
``upernet_*``), the loss an objective term (``pixel_cross_entropy`` in
`vit_edge.objectives.dense`), the export the ``dense`` ServingSpec, and the
command line `vit_edge.runtime.segment`. Configs: ``configs/seg/``.
"""
