"""Re-evaluates a traced function with the export passes applied, sub-graphs included.

:func:`rewritten` traces a function to a jaxpr once and returns a function that
evaluates that jaxpr equation by equation, offering each equation to the passes
of :data:`vit_edge.export.passes.PASSES` (first match wins) and binding the
original primitive otherwise. Sub-graphs are rewritten too:

* call-like primitives (pjit, closed_call, custom_jvp_call, custom_vjp_call,
  checkpoint) are inlined first (:func:`flattened`), so a pass sees producers
  and consumers across them (a 1x1 conv inside a custom-gradient wrapper and
  the BatchNorm outside it); the export needs no derivatives;
* ``cond`` (``lax.cond`` / ``lax.switch``) becomes ``lax.switch`` over the
  rewritten branches; ``scan`` becomes ``lax.scan`` of the rewritten body;
  ``while`` becomes ``lax.while_loop`` of the rewritten condition and body.

Example::

    fn = rewritten(lambda x: jax.nn.gelu(x, approximate=False), x)
    jax.make_jaxpr(fn)(x)  # no erfc: one tanh-GELU pattern
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

from vit_edge.export import passes as passes_lib
from vit_edge.export.passes import base

# Higher-order primitives evaluated inline, with the parameter holding the body.
_INLINE_PARAMS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
                  "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
                  "custom_vjp_call": "call_jaxpr", "checkpoint": "jaxpr",
                  "remat": "jaxpr"}


def _split(values: Sequence[Any], *sizes: int) -> list[list[Any]]:
  parts, start = [], 0
  for size in sizes:
    parts.append(list(values[start:start + size]))
    start += size
  parts.append(list(values[start:]))
  return parts


def _eval_closed(closed, args, options, passes):
  return eval_jaxpr(getattr(closed, "jaxpr", closed), getattr(closed, "consts", ()),
                    args, options, passes)


def _cond(eqn, invals, options, passes):
  from jax import lax  # pylint: disable=g-import-not-at-top
  index, *operands = invals
  branches = [lambda *ops, br=br: _eval_closed(br, ops, options, passes)
              for br in eqn.params["branches"]]
  return lax.switch(index, branches, *operands)


def _scan(eqn, invals, options, passes):
  from jax import lax  # pylint: disable=g-import-not-at-top
  p = eqn.params
  consts, carry, xs = _split(invals, p["num_consts"], p["num_carry"])

  def body(c, x):
    outs = _eval_closed(p["jaxpr"], [*consts, *c, *x], options, passes)
    return outs[:p["num_carry"]], outs[p["num_carry"]:]

  carry_out, ys = lax.scan(body, carry, xs, length=p["length"], reverse=p["reverse"],
                           unroll=p.get("unroll", 1))
  return [*carry_out, *ys]


def _while(eqn, invals, options, passes):
  from jax import lax  # pylint: disable=g-import-not-at-top
  p = eqn.params
  cond_consts, body_consts, init = _split(invals, p["cond_nconsts"],
                                          p["body_nconsts"])
  out = lax.while_loop(
      lambda c: _eval_closed(p["cond_jaxpr"], [*cond_consts, *c], options, passes)[0],
      lambda c: list(_eval_closed(p["body_jaxpr"], [*body_consts, *c], options,
                                  passes)),
      list(init))
  return list(out)


_CONTROL_FLOW: dict[str, Callable[..., list]] = {"cond": _cond, "scan": _scan,
                                                 "while": _while}


def _evaluate(eqn, invals, ctx: base.Context):
  name = eqn.primitive.name
  inner = eqn.params.get(_INLINE_PARAMS.get(name, ""))
  if inner is not None:
    return _eval_closed(inner, invals, ctx.options, ctx.passes)
  if name in _CONTROL_FLOW:
    return _CONTROL_FLOW[name](eqn, invals, ctx.options, ctx.passes)
  for rewrite in ctx.passes:
    if name in rewrite.primitives:
      outs = rewrite.apply(eqn, invals, ctx)
      if outs is not None:
        return outs
  return base.bind(eqn, *invals)


def eval_jaxpr(jaxpr, consts, args, options: base.Options,
               passes: Sequence[base.Pass] = passes_lib.PASSES) -> list[Any]:
  """Evaluates `jaxpr` on `args` with `passes` applied (see the module docstring)."""
  env: dict = {}

  def read(atom):
    return atom.val if base.is_literal(atom) else env[atom]

  producers, consumers = {}, collections.defaultdict(list)
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      producers[v] = eqn
    for v in eqn.invars:
      if not base.is_literal(v):
        consumers[v].append(eqn)
  ctx = base.Context(options=options, read=read, producers=producers,
                     consumers=consumers, passes=tuple(passes),
                     outputs=frozenset(v for v in jaxpr.outvars
                                       if not base.is_literal(v)))
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    outs = _evaluate(eqn, [read(v) for v in eqn.invars], ctx)
    if eqn.primitive.multiple_results:
      env.update(zip(eqn.outvars, outs))
    else:
      env[eqn.outvars[0]] = outs
  return [read(v) for v in jaxpr.outvars]


def flattened(closed):
  """`closed` (a ClosedJaxpr) with its call-like sub-graphs inlined, passes off.

  Control flow (cond, scan, while) keeps its sub-graphs.
  """
  import jax  # pylint: disable=g-import-not-at-top
  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype,
                                 weak_type=getattr(v.aval, "weak_type", False))
           for v in closed.jaxpr.invars]
  return jax.make_jaxpr(lambda *args: eval_jaxpr(
      closed.jaxpr, closed.consts, args, base.Options(), passes=()))(*avals)


def rewritten(fn: Callable[..., Any], *example_args,
              options: base.Options = base.Options()) -> Callable[..., Any]:
  """`fn`, traced once at `example_args`' shapes, re-evaluated with the passes.

  Array leaves of the arguments are inputs of the returned function; it takes
  the same (pytree) arguments and returns the same pytree as `fn`.

  Example::

      fn = rewritten(lambda x: jax.nn.gelu(x, approximate=False), jnp.ones(4))
      fn(jnp.linspace(-3, 3, 4))  # tanh GELU (options.gelu="tanh")
  """
  import jax  # pylint: disable=g-import-not-at-top
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
  closed = flattened(closed)
  out_tree = jax.tree_util.tree_structure(out_shape)

  def evaluate(*args):
    leaves = jax.tree_util.tree_leaves(args)
    outs = eval_jaxpr(closed.jaxpr, closed.consts, leaves, options)
    return jax.tree_util.tree_unflatten(out_tree, outs)

  return evaluate
