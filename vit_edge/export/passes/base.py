"""What a rewrite pass sees: the equation, its inputs and the graph around it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

GELU_MODES = ("tanh", "exact")

# Single-result ops without sub-graphs that Context.constant evaluates on constants.
FOLDABLE = frozenset({"reshape", "broadcast_in_dim", "convert_element_type",
                      "squeeze", "expand_dims", "transpose", "add", "sub", "mul",
                      "div", "neg", "abs", "rsqrt", "sqrt", "square", "integer_pow",
                      "exp", "log", "max", "min"})


@dataclasses.dataclass(frozen=True)
class Options:
  """Switches of the rewrites.

  Attributes:
    gelu: "tanh" (one fused TFLite GELU op, |error| <= 4.8e-4) or "exact"
      (a rational erf, |error| < 1e-6); see :mod:`.gelu`.
    split_projections: compute each last-axis slice of a projection as its own
      product (int8 exports: one scale per part; see :mod:`.sliced_projection`).
  """

  gelu: str = "tanh"
  split_projections: bool = False

  def __post_init__(self):
    if self.gelu not in GELU_MODES:
      raise ValueError(f"gelu={self.gelu!r} is not supported; expected one of "
                       f"{GELU_MODES}.")


@dataclasses.dataclass
class Context:
  """The state of one jaxpr's evaluation that passes may consult.

  Attributes:
    options: the rewrite switches.
    read: atom -> its value (a tracer, or a concrete array for constants).
    producers: var -> the equation that produced it (earlier equations only).
    consumers: var -> the equations that read it.
    passes: the passes offered each equation, in order.
    outputs: the jaxpr's output variables.
    cache: per-jaxpr scratch space of passes (e.g. shared max-pool cascades).
  """

  options: Options
  read: Callable[[Any], Any]
  producers: dict
  consumers: dict
  passes: tuple = ()
  outputs: frozenset = frozenset()
  cache: dict = dataclasses.field(default_factory=dict)

  def producer(self, atom, primitive: str):
    """The equation that produced `atom` if it is a `primitive`, else None."""
    eqn = None if is_literal(atom) else self.producers.get(atom)
    return eqn if eqn is not None and eqn.primitive.name == primitive else None

  def used_once(self, var) -> bool:
    """Whether `var` is read by exactly one equation and is not an output."""
    return len(self.consumers.get(var, ())) == 1 and var not in self.outputs

  def constant(self, atom) -> Optional[np.ndarray]:
    """The numpy value of `atom` if it is a constant, else None.

    Under jit every bound op yields a tracer, even of constants (a Dense bias
    reshaped for broadcasting, BatchNorm's ``scale * rsqrt(var + eps)``), so
    constness is traced back to the variables and the ops between are folded.
    """
    if is_literal(atom):
      return np.asarray(atom.val)
    value = self.read(atom)
    if not is_traced(value):
      return np.asarray(value)
    self._fold(atom)
    return self.cache[("constant", atom)]

  def _fold(self, root) -> None:
    """Caches the constant value (or None) of `root` and of what it depends on.

    Iterative, not recursive: a residual stream is a chain of foldable adds as
    deep as the model. An op is constant when all its inputs are; the first
    input found not constant settles it.
    """
    stack = [root]
    while stack:
      atom = stack[-1]
      key = ("constant", atom)
      if key in self.cache:
        stack.pop()
        continue
      eqn = self.producers.get(atom)
      if eqn is None or eqn.primitive.name not in FOLDABLE:
        self.cache[key] = None
        stack.pop()
        continue
      sources, unknown = [], None
      for v in eqn.invars:
        if is_literal(v) or not is_traced(self.read(v)):
          sources.append(np.asarray(v.val if is_literal(v) else self.read(v)))
        elif ("constant", v) not in self.cache:
          unknown = v
          break
        elif self.cache[("constant", v)] is None:
          sources = None
          break
        else:
          sources.append(self.cache[("constant", v)])
      if unknown is not None:
        stack.append(unknown)
        continue
      stack.pop()
      if sources is None:
        self.cache[key] = None
        continue
      import jax  # pylint: disable=g-import-not-at-top
      with jax.ensure_compile_time_eval():
        self.cache[key] = np.asarray(bind(eqn, *sources))


@dataclasses.dataclass(frozen=True)
class Pass:
  """One named rewrite: `apply(eqn, invals, ctx)` -> new output(s) or None.

  Attributes:
    name: shown in docs and tests.
    primitives: the primitive names whose equations `apply` is offered.
    apply: returns the replacement (one value, or a list for primitives with
      multiple results) or None when the equation is not its pattern.
  """

  name: str
  primitives: frozenset
  apply: Callable[..., Any]


def bind(eqn, *invals):
  """The equation's original primitive applied to `invals`."""
  return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def is_literal(atom) -> bool:
  """Whether a jaxpr atom is a literal (an inline constant), not a variable."""
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  return isinstance(atom, jex_core.Literal)


def literal_scalar(atom) -> Optional[float]:
  """The float of a scalar literal atom, else None."""
  if is_literal(atom) and np.size(atom.val) == 1:
    return float(np.asarray(atom.val))
  return None


def is_traced(x) -> bool:
  """Whether `x` is a tracer (data-dependent), not a concrete constant."""
  import jax  # pylint: disable=g-import-not-at-top
  return isinstance(x, jax.core.Tracer)


def channel_vector(value: np.ndarray, shape, channels: int) -> Optional[np.ndarray]:
  """`value` as a [channels] vector if it is constant along all but the last axis."""
  try:
    full = np.broadcast_to(value, shape)
  except ValueError:
    return None
  rows = full.reshape(-1, channels)
  return rows[0] if np.array_equal(rows, np.broadcast_to(rows[:1], rows.shape)) else None


def last_axis_range(eqn) -> Optional[tuple[int, int]]:
  """(start, limit) of a unit-stride `slice` equation that cuts only the last axis."""
  p, shape = eqn.params, eqn.invars[0].aval.shape
  if p.get("strides") and any(s != 1 for s in p["strides"]):
    return None
  if any(p["start_indices"][d] != 0 or p["limit_indices"][d] != shape[d]
         for d in range(len(shape) - 1)):
    return None
  return p["start_indices"][-1], p["limit_indices"][-1]


def is_plain_conv(eqn) -> bool:
  """A 2-D NHWC/HWIO conv without padding, dilation or groups (kernel any size)."""
  from vit_edge.models import layers  # pylint: disable=g-import-not-at-top
  p = eqn.params
  lhs, kernel = (v.aval for v in eqn.invars)
  return (lhs.ndim == 4 and kernel.ndim == 4
          and all(tuple(pad) == (0, 0) for pad in p["padding"])
          and p["feature_group_count"] == 1 and p["batch_group_count"] == 1
          and layers.undilated_nhwc(lhs, kernel, p["lhs_dilation"], p["rhs_dilation"],
                                    p["dimension_numbers"]))


def is_same_pool(eqn) -> bool:
  """A stride-1 'same' k x k (k odd) window op over H, W of an NHWC map."""
  p = eqn.params
  dims, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
  if len(dims) != 4 or dims[0] != 1 or dims[3] != 1 or any(s != 1 for s in strides):
    return False
  if any(d != 1 for d in p.get("base_dilation", (1,) * 4)) or any(
      d != 1 for d in p.get("window_dilation", (1,) * 4)):
    return False
  return all(k % 2 == 1 and tuple(pad) == (k // 2, k // 2)
             for k, pad in zip(dims[1:3], padding[1:3])) and tuple(padding[0]) == (
                 0, 0) and tuple(padding[3]) == (0, 0)
