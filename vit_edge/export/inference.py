"""The function an export serves: the spec's computation, traced and rewritten.

A model opts into an export-specific form through one protocol,
:class:`HasExportForm`: a method ``export_form(self) -> nn.Module`` returning the
same function with the same parameters, written the way that converts best
(TFormer: PCS-FFN's channel shuffle folded into its convs and its average pools
as ``window_sum / window_count``). The exporter keeps only generic rewrites
(:mod:`vit_edge.export.passes`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, runtime_checkable

from vit_edge.export import rewrite
from vit_edge.export import serving as serving_lib
from vit_edge.export.passes import base


@runtime_checkable
class HasExportForm(Protocol):
  """A model with an export form: the same function and parameter tree.

  Example::

      class MyModel(nn.Module):
        fused: bool = False
        def export_form(self) -> nn.Module:
          return self.clone(fused=True)
  """

  def export_form(self) -> Any:
    ...


def export_model(model):
  """`model.export_form()` for a :class:`HasExportForm` model, else `model`."""
  return model.export_form() if isinstance(model, HasExportForm) else model


def inference_function(model, variables, image_size: int = 0, channels: int = 3,
                       gelu: str = "tanh", split_projections: bool = False,
                       serving: Optional[serving_lib.ServingSpec] = None
                       ) -> Callable[..., dict[str, Any]]:
  """The function that is exported: inputs -> {output name: array}, rewritten.

  The served computation (``serving.fn``; default: classification, image ->
  ``{"logits", "probs"}``) is traced once to a jaxpr and re-evaluated with the
  passes of :mod:`vit_edge.export.passes`; every other equation binds its
  original primitive, so the numerics stay those of the model.

  Args:
    model: a linen module whose ``apply(variables, x, train=False)`` returns
      ``(logits, aux)``; its :class:`HasExportForm` form is used when it has one.
    variables: its variables (float32).
    image_size: side of the square input (for the default classification spec).
    channels: input channels (idem).
    gelu: "tanh" (fused TFLite GELU op) or "exact" (rational erf).
    split_projections: compute each last-axis slice of a projection as its own
      product (for int8: one scale per part).
    serving: what to serve (default ``serving.classification(image_size)``).

  Returns:
    A JAX-traceable function of the spec's inputs (batch 1).

  Example::

      fn = inference_function(model, variables, 224)
      out = jax.jit(fn)(images)  # {"logits": [1, K], "probs": [1, K]}
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  options = base.Options(gelu=gelu, split_projections=split_projections)
  if serving is None and image_size < 1:
    raise ValueError(f"image_size={image_size}: the default serving spec "
                     "(classification) needs the input side, e.g. "
                     "inference_function(model, variables, 224); or pass serving=.")
  spec = serving or serving_lib.classification(image_size, channels)
  model = export_model(model)
  examples = [jnp.zeros(t.shape, t.dtype) for t in spec.inputs]

  def serve(variables, *inputs):
    return spec.fn(model, variables, *inputs)

  evaluate = rewrite.rewritten(serve, variables, *examples, options=options)

  def fn(*inputs):
    outputs = evaluate(variables, *inputs)
    spec.check_outputs(outputs)
    return outputs

  return fn
