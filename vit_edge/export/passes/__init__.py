"""The export-time graph rewrites, one module each, applied in :data:`PASSES` order.

Every pass looks at one equation of the traced model (a jaxpr) at a time, in the
order of :data:`PASSES`, and either returns its replacement value (built from JAX
ops that TFLite's converter lowers to ops XNNPACK runs) or ``None`` to leave it to
the next pass; an equation no pass claims binds its original primitive, so the
numerics stay those of the model. :mod:`vit_edge.export.rewrite` walks the jaxpr,
including every sub-graph (pjit, custom_jvp/vjp, cond/switch, scan, while).

To add a pass: write ``passes/<name>.py`` with a :class:`Pass` instance named
``PASS``, add it to :data:`PASSES` where its precedence belongs, and test on a
small function that the pattern's op is gone from the rewritten jaxpr and the
values are unchanged (tests/test_export_passes.py).
"""

from __future__ import annotations

from vit_edge.export.passes import activation_product
from vit_edge.export.passes import broadcast
from vit_edge.export.passes import gelu
from vit_edge.export.passes import linear_pair
from vit_edge.export.passes import max_pool
from vit_edge.export.passes import patch_conv
from vit_edge.export.passes import projection
from vit_edge.export.passes import sliced_projection
from vit_edge.export.passes import softmax
from vit_edge.export.passes import strided_slice
from vit_edge.export.passes import weighted_sum
from vit_edge.export.passes import window_sum
from vit_edge.export.passes.base import Context, Options, Pass

# First match wins, so a specific pattern comes before a generic rewrite of the
# same primitive (weighted_sum, then sliced_projection, claim a slice before
# strided_slice looks).
PASSES: tuple[Pass, ...] = (
    gelu.PASS,
    softmax.PASS,
    max_pool.PASS,
    window_sum.PASS,
    linear_pair.PASS,
    patch_conv.PASS,
    broadcast.PASS,
    weighted_sum.PASS,
    sliced_projection.PASS,
    projection.PASS,
    activation_product.PASS,
    strided_slice.PASS,
)

__all__ = ["Context", "Options", "PASSES", "Pass"]
