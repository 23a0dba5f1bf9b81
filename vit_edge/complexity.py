"""Parameter and compute counts of a model, shared by the summary tool and benchmarks.

Two MAC counts are reported, because they answer different questions:

* ``xla_flops``: XLA's cost analysis of the compiled forward pass. It counts a
  multiply-add as 2 FLOPs and also counts every elementwise op, normalisation,
  softmax and pooling window. ``xla_flops / 2`` is therefore a slight over-estimate
  of multiply-accumulates.
* ``macs``: multiply-accumulates of the convolutions and matrix products only,
  counted exactly from the jaxpr (what fvcore/thop-style counters and papers
  report as "FLOPs"). This is the figure to compare with published counts.
  Sub-graphs count as often as they run: a scan body times its length, a
  cond/switch as its largest branch, a while body once (see _subgraph_macs).

Example::

    model = create_model("edgevit_xxs")
    stats = model_complexity(model, image_size=224)
    print(stats.params, stats.macs / 1e9, stats.xla_flops / 2e9)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core


@dataclasses.dataclass(frozen=True)
class Complexity:
  """Counts for one model at one resolution (batch 1)."""

  params: int
  macs: int
  xla_flops: float
  aux_shapes: dict[str, tuple[int, ...]]
  logits_shape: tuple[int, ...]


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (shapes suffice, e.g. from eval_shape)."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


def _closed_jaxprs(value):
  """The jaxprs held by one equation parameter (a jaxpr, or a tuple of them)."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  for v in values:
    if isinstance(v, jax_core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jax_core.Jaxpr):
      yield v


def _subgraph_macs(eqn) -> int:
  """MACs of the sub-graphs of one equation, each counted as often as it runs.

  A scan runs its body ``length`` times; a cond/switch runs one branch, counted
  as its largest (the worst case, what a deployment must budget); a while loop's
  trip count is unknown at trace time, so its body counts once (a lower bound);
  call-like primitives (pjit, custom_jvp/vjp, checkpoint) run their body once.
  """
  name = eqn.primitive.name
  if name == "cond":
    return max((jaxpr_macs(b) for b in _closed_jaxprs(eqn.params["branches"])),
               default=0)
  if name == "scan":
    return eqn.params["length"] * jaxpr_macs(eqn.params["jaxpr"].jaxpr)
  return sum(jaxpr_macs(sub) for value in eqn.params.values()
             for sub in _closed_jaxprs(value))


def jaxpr_macs(jaxpr: jax_core.Jaxpr) -> int:
  """Conv and matmul multiply-accumulates of `jaxpr`, sub-graphs included.

  Example::

      jaxpr_macs(jax.make_jaxpr(lambda a, b: a @ b)(a, b).jaxpr)
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      contraction = math.prod(lhs_shape[d] for d in lhs_contract)
      total += math.prod(eqn.outvars[0].aval.shape) * contraction
    elif name == "conv_general_dilated":
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec
      rhs_shape = eqn.invars[1].aval.shape
      # rhs holds in_channels / feature_group_count already; divide out C_out.
      per_output = math.prod(rhs_shape) // rhs_shape[rhs_spec[0]]
      total += math.prod(eqn.outvars[0].aval.shape) * per_output
    total += _subgraph_macs(eqn)
  return total


def model_macs(model: nn.Module, image_size: int, channels: int = 3) -> int:
  """Conv and matmul MACs of one image through `model` (traced only: no compile)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return jaxpr_macs(closed.jaxpr)


def model_complexity(model: nn.Module, image_size: int, batch_size: int = 1,
                     channels: int = 3) -> Complexity:
  """Params, conv/matmul MACs, XLA FLOPs and intermediate shapes of `model`."""
  x = jnp.zeros((batch_size, image_size, image_size, channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  params = count_params(variables["params"])

  def forward(variables, x):
    return model.apply(variables, x, train=False)

  closed = jax.make_jaxpr(forward)(variables, x)
  macs = jaxpr_macs(closed.jaxpr)
  compiled = jax.jit(forward).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX returned one dict per device.
    cost = cost[0]
  logits, aux = jax.eval_shape(forward, variables, x)
  # Network order: stem, stage1..N, then the rest (pre_logits, tokens, ...).
  order = lambda k: (k != "stem", not k.startswith("stage"), k)
  aux_shapes = {k: tuple(aux[k].shape) for k in sorted(aux, key=order)
                if hasattr(aux[k], "shape")}
  return Complexity(params=params, macs=macs, xla_flops=float(cost.get("flops", 0.0)),
                    aux_shapes=aux_shapes, logits_shape=tuple(logits.shape))
