"""A product of two activations, ``q @ k.T``, kept as a batched matmul.

``jnp.matmul`` squeezes size-1 batch axes, so single-head attention scores at
batch 1 (EdgeViT's first stage) trace to a 2-D product of ``q`` and a transposed
``k``. TF 2.21's converter folds that transpose into a FULLY_CONNECTED whose
weights are the activation ``k``; XNNPACK leaves such an op to TFLite's own
kernel, which splits the graph in two (about 0.1 ms of EdgeViT-XXS's 15.5 at one
thread on this machine). The same product with a size-1 batch axis becomes a
BATCH_MATMUL of ``q`` and the transposed ``k``, which XNNPACK runs. Products of a
constant (projections) and products whose right operand is not a transpose are
left alone.
"""

from __future__ import annotations

from vit_edge.export.passes import base


def _is_transposed(atom, ctx: base.Context) -> bool:
  """Whether `atom` is a transpose, or a squeeze of one."""
  squeeze = ctx.producer(atom, "squeeze")
  return ctx.producer(squeeze.invars[0] if squeeze else atom, "transpose") is not None


def _apply(eqn, invals, ctx: base.Context):
  lhs, rhs = invals
  (lhs_contract, rhs_contract), (lhs_batch, _) = eqn.params["dimension_numbers"]
  if (lhs_batch or not (base.is_traced(lhs) and base.is_traced(rhs))
      or lhs.ndim != 2 or rhs.ndim != 2 or tuple(lhs_contract) != (1,)
      or tuple(rhs_contract) != (0,) or not _is_transposed(eqn.invars[1], ctx)):
    return None
  import jax  # pylint: disable=g-import-not-at-top
  out = jax.lax.dot_general(
      lhs[None], rhs[None], (((2,), (1,)), ((0,), (0,))),
      precision=eqn.params.get("precision"),
      preferred_element_type=eqn.params.get("preferred_element_type"))
  return out[0]


PASS = base.Pass("activation_product", frozenset({"dot_general"}), _apply)
