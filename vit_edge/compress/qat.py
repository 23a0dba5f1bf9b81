"""Quantisation-aware training with Qwix's ODML mode, and its int8 TFLite export.

Training wraps the model with ``qwix.OdmlQatProvider``: every layer with a
``kernel`` (Dense, Conv) fake-quantises its weight (int8, per channel, symmetric)
and its input and output activations (int8, per tensor, asymmetric, static
ranges), as TFLite's int8 FULLY_CONNECTED / CONV_2D kernels compute them;
gradients pass straight through. The other ops (LayerNorm, softmax, the
attention matmuls, GELU, residual adds) stay float, like the post-training
export's :class:`~vit_edge.export.quantize.Int8Policy`, because XNNPACK runs
them faster in float. The activation ranges are running means of per-batch
min/max (Qwix's ``SimpleMovingAverage``) kept in the ``batch_stats`` collection,
which the train step already carries and checkpoints; they are the learned
ranges the int8 file carries.

Export: ``qwix.OdmlConversionProvider`` turns each fake-quant into a
``quant.fake_quant`` StableHLO composite with static scales; ``jax.export``
(cpu, batch 1) and ``litert_converter`` lower those composites to TFLite
QUANTIZE/DEQUANTIZE around int8 kernels. The lowering pass
(LowerQuantAnnotationsPass) runs only with ``strict_qdq_mode=True``: with
``qdq_conversion_mode="STATIC"`` alone the composites stay as
STABLEHLO_COMPOSITE ops in the file (float, unconverted). No TensorFlow.

The same conversion calibrated by float forward passes (:func:`calibrate`) is a
post-training int8 route without TensorFlow's private APIs.

Known gap: the converter runs the concatenation of an int8 layer output with a
float constant (a ViT's class token after the patch embedding) in int8, so it
quantises the constant with that output's scale; the fake-quantised model keeps
it float (digits deit_tiny: max |dlogit| 0.069 of 6.96, top-1 agreement 100%).

Qwix (``qwix``) and the LiteRT converter (``litert-converter``) are optional:
``pip install -e .[qat]``.

Example::

    config.qat.enabled = True   # then train as usual
    python -m vit_edge.export --workdir=RUN --quantize=int8 --out=m.tflite
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable

import ml_collections
import numpy as np

# Stats entries Qwix keeps per fake-quantised activation.
_STAT_KEYS = frozenset({"count", "sum_of_min", "sum_of_max"})
# TFLite ops that mean the converter did not lower something to builtin kernels.
_UNLOWERED_OPS = ("STABLEHLO_COMPOSITE", "CUSTOM")
# Ops every QAT file must hold in int8 (else the quantiser changed nothing).
_INT8_KERNELS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL")


def default_config() -> ml_collections.ConfigDict:
  """``config.qat``: off by default.

  Fields:
    enabled: train with fake-quantised layers (and export int8 from them).
    layers: "weights" (every module with a ``kernel`` parameter) or a regex on
      '/'-joined module paths (e.g. "blocks_.*/mlp/fc.*").
  """
  return ml_collections.ConfigDict({"enabled": False, "layers": "weights"})


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` trains (and exports) with QAT."""
  return bool(config.get("qat", {}).get("enabled", False))


def _qwix():
  try:
    import qwix  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("config.qat.enabled needs Qwix: pip install -e .[qat] "
                      "(qwix==0.1.8, litert-converter==0.5.0).") from e
  return qwix


def kernel_module_paths(params: Any) -> list[str]:
  """'/'-joined paths of the modules that own a ``kernel`` parameter.

  Example::

      kernel_module_paths(variables["params"])  # ['patch_embed/proj', ...]
  """
  import flax  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(params)
  return sorted({"/".join(map(str, k[:-1])) for k in flat if k[-1] == "kernel"})


def rules(params: Any, layers: str = "weights") -> list:
  """Qwix rules: int8 weights and static-range int8 activations for `layers`.

  Raises:
    ValueError: `layers` matches no module of the model.
  """
  qwix = _qwix()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  paths = kernel_module_paths(params)
  if layers == "weights":
    pattern = "|".join(re.escape(p) for p in paths)
  else:
    pattern = layers
    if not any(re.fullmatch(pattern, p) for p in paths):
      raise ValueError(f"config.qat.layers={layers!r} matches no layer with a "
                       f"kernel; the model's layers are {paths[:8]}...")
  if not pattern:
    raise ValueError("The model has no layer with a 'kernel' parameter; QAT "
                     "quantises Dense/Conv layers only.")
  return [qwix.QuantizationRule(module_path=pattern, weight_qtype=jnp.int8,
                                act_qtype=jnp.int8, act_static_scale=True)]


def _providers():
  """(QAT provider, conversion provider) classes of this module (made once)."""
  global _PROVIDERS  # pylint: disable=global-statement
  if _PROVIDERS is None:
    qwix = _qwix()
    import jax  # pylint: disable=g-import-not-at-top
    from qwix._src import aux_data  # pylint: disable=g-import-not-at-top
    from qwix._src import averaging  # pylint: disable=g-import-not-at-top
    from qwix._src.providers import odml_ops  # pylint: disable=g-import-not-at-top
    from qwix._src.utils import flax_util  # pylint: disable=g-import-not-at-top

    class LayerOutputs:
      """Fake-quantises a layer's output right after its bias add.

      Qwix's ODML mode leaves an op's output to its consumer to fake-quantise, and
      the consumers of Dense/Conv layers here (LayerNorm, GELU, residual adds,
      attention) stay float; without an output range the converter keeps the
      layer float too (DEQUANTIZE of its weight). Quantising the output where the
      bias is added gives TFLite's int8 FULLY_CONNECTED / CONV_2D (bias fused).
      """

      def get_intercept_map(self):
        intercept_map = super().get_intercept_map()
        ufunc = intercept_map["jax.numpy.ufunc.__call__"]
        output = odml_ops.FinalOutput(
            op_full_name="layer_output", check_activation=False,
            get_rule_and_op_id_fn=self._get_current_rule_and_op_id,
            fake_quant_fn=self._fake_quant)

        def call(*args, **kwargs):
          out = ufunc(*args, **kwargs)
          adds_bias = any(
              isinstance(a, jax.Array) and aux_data.get(
                  a, odml_ops.AuxDataKey.WEIGHT_NAME, None) == "bias" for a in args)
          if adds_bias and aux_data.get(out, odml_ops.AuxDataKey.FQ_RULE, None):
            out = output(out)
            # Already quantised: consumers (and the model output) reuse it.
            aux_data.set(out, odml_ops.AuxDataKey.FQ_ARRAY, "self")
          return out

        intercept_map["jax.numpy.ufunc.__call__"] = call
        return intercept_map

    class QatProvider(LayerOutputs, qwix.OdmlQatProvider):
      """Qwix's ODML QAT, its running ranges in the ``batch_stats`` collection.

      The train step makes ``batch_stats`` mutable (and the eval step not), so
      training updates the ranges and evaluation reads them with no change to
      either step; checkpoints carry them like BatchNorm statistics.
      """

      def _update_and_get_quant_stat(self, name, calibration,
                                     calibration_is_fixed_range):
        calibration = jax.tree.map(lambda x: x.mean(keepdims=True), calibration)
        aggregator = averaging.SimpleMovingAverage()
        stat = flax_util.get_or_create_variable(
            "batch_stats", name, lambda: aggregator.init(calibration))
        module = flax_util.get_current_module()
        if not module.is_initializing() and module.is_mutable_collection(
            "batch_stats"):
          if calibration_is_fixed_range:
            stat.value = aggregator.init(calibration)
          stat.value = aggregator.update(stat.value, calibration)
        return aggregator.get_calibration(stat.value, calibration)

    class ConversionProvider(LayerOutputs, qwix.OdmlConversionProvider):
      """Qwix's ODML conversion with the same layer outputs quantised."""

    _PROVIDERS = (QatProvider, ConversionProvider)
  return _PROVIDERS


_PROVIDERS = None


def qat_model(model, params_or_shapes: Any, layers: str = "weights"):
  """`model` with fake-quantised layers (same parameters; stats in batch_stats).

  Example::

      qmodel = qat_model(model, variables["params"])
      variables = qmodel.init(rng, images)  # params + batch_stats
  """
  qwix = _qwix()
  # strict=False: ops Qwix does not handle (MobileViTv2's einsum resizes with a
  # constant matrix) stay float instead of stopping the build; which layers are
  # quantised is decided by `rules` and checked by check_supported.
  return qwix.quantize_model(
      model, _providers()[0](rules(params_or_shapes, layers), strict=False))


def adapt(model, config: ml_collections.ConfigDict):
  """The training seam: `model` itself unless ``config.qat.enabled``.

  Example::

      model = adapt(build_model(config, num_classes), config)
  """
  if not enabled(config):
    return model
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_edge.models import layers as layers_lib  # pylint: disable=g-import-not-at-top
  # Qwix cannot see a conv kernel behind a custom gradient (layers.py).
  layers_lib.use_fast_gradients(False)
  layers = config.qat.get("layers", "weights")
  image_shape = (1, config.image_size, config.image_size, 3)
  check_supported(model, image_shape, layers)
  check_convertible(model, image_shape, layers, config.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct(image_shape, jnp.float32))
  return qat_model(model, shapes["params"], layers)


def is_range_statistic(key: tuple) -> bool:
  """Whether a flat ``batch_stats`` key is one of Qwix's range statistics.

  Example::

      is_range_statistic(("head", "layer_output0", "count"))  # True
  """
  return bool(key) and str(key[-1]) in _STAT_KEYS


def split_stats(batch_stats: Any) -> tuple[dict, dict]:
  """(Qwix range statistics, the rest, e.g. BatchNorm) of a ``batch_stats`` tree."""
  def is_stat(v):
    return isinstance(v, dict) and set(v) == _STAT_KEYS

  def split(tree):
    quant, rest = {}, {}
    for k, v in tree.items():
      if is_stat(v):
        quant[k] = v
      elif isinstance(v, dict):
        q, r = split(v)
        if q:
          quant[k] = q
        if r:
          rest[k] = r
      else:
        rest[k] = v
    return quant, rest

  return split(dict(batch_stats or {}))


def calibrate(model, params: Any, batches: Iterable[np.ndarray],
              layers: str = "weights") -> dict:
  """Post-training ranges: Qwix statistics from float forward passes on `batches`.

  Example::

      stats = calibrate(model, params, (x[None] for x in images[:200]))
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  qmodel = qat_model(model, params, layers)
  batches = iter(batches)
  first = jnp.asarray(next(batches), jnp.float32)
  stats = qmodel.init(jax.random.key(0), first)["batch_stats"]
  stats, rest = split_stats(stats)

  @jax.jit
  def update(stats, x):
    _, upd = qmodel.apply({"params": params, "batch_stats": stats}, x, train=False,
                          mutable=["batch_stats"])
    return upd["batch_stats"]

  for x in [first, *batches]:
    stats = update(stats, jnp.asarray(x, jnp.float32))
  del rest
  return stats


def conversion_model(model, params: Any, batch_stats: Any, layers: str = "weights"):
  """`model` whose fake-quants are ``quant.fake_quant`` composites with static scales.

  Its outputs are the fake-quantised model's (the ranges of `batch_stats`); it
  is the reference of the int8 file's parity check.
  """
  qwix = _qwix()
  stats, _ = split_stats(batch_stats)
  return qwix.quantize_model(
      model, _providers()[1](rules(params, layers), params, stats, strict=False))


def to_tflite(cmodel, variables: Any, image_size: int, channels: int = 3, *,
              serving=None, gelu: str = "tanh") -> bytes:
  """int8 TFLite bytes of a :func:`conversion_model` (signature ``serving_default``).

  Raises:
    ValueError: the file keeps an op the converter did not lower (named, e.g.
      STABLEHLO_COMPOSITE 'quant.fake_quant'), or has no int8 kernel.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_edge.export import serving as serving_lib  # pylint: disable=g-import-not-at-top
  from vit_edge.export import inference  # pylint: disable=g-import-not-at-top
  spec = serving or serving_lib.classification(image_size, channels)
  names = [o.name for o in spec.outputs]
  # The export passes (vit_edge/export/passes) as for the other exports, e.g.
  # exact GELU as TFLite's fused GELU op: its erf expansion's LESS/SELECT ops
  # fall off XNNPACK and split the graph (2.3x the latency on deit_tiny).
  # The fake-quant composites pass through unchanged.
  served = inference.inference_function(cmodel, variables, gelu=gelu, serving=spec)

  def fn(*xs):
    out = served(*xs)
    return tuple(jnp.asarray(out[n], jnp.float32) for n in names)

  args = [jax.ShapeDtypeStruct((1, *t.shape[1:]), t.dtype) for t in spec.inputs]
  exported = jax.export.export(jax.jit(fn), platforms=["cpu"])(*args)
  tflite_model = convert_exported(exported, signature=(
      spec.signature, [t.name for t in spec.inputs], names))
  check_lowered(tflite_model)
  return tflite_model


def convert_exported(exported, *, strict: bool = True, signature=None) -> bytes:
  """TFLite bytes of a ``jax.export`` result through litert-converter's static QDQ
  conversion. `strict` runs LowerQuantAnnotationsPass, which lowers the
  quant.fake_quant composites (without it they stay STABLEHLO_COMPOSITE ops);
  `signature` is (name, input names, output names)."""
  from litert_converter.mlir import ir, passmanager  # pylint: disable=g-import-not-at-top
  from litert_converter.mlir._mlir_libs import converter_api_ext as converter  # pylint: disable=g-import-not-at-top
  context = ir.Context()
  converter.prepare_mlir_context(context)
  with context, ir.Location.unknown():
    module = ir.Module.parse(exported.mlir_module())
    options = converter.ConvertToTFLConfig()
    options.qdq_conversion_mode = "STATIC"
    options.strict_qdq_mode = strict
    converter.run_convert_to_tfl_passes(module, passmanager.PassManager(), options)
    if signature is not None:
      converter.set_signature(module.operation, *signature)
    return converter.export_flatbuffer_to_bytes(module.operation)


def op_counts(tflite_model: bytes) -> collections.Counter:
  """``{(op name, dtype of its first input): count}`` of a TFLite file."""
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  from vit_edge.runtime import litert_private  # pylint: disable=g-import-not-at-top
  interpreter = Interpreter(model_content=tflite_model, num_threads=1,
                            experimental_op_resolver_type=_no_delegate())
  interpreter.allocate_tensors()
  tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
  counts = collections.Counter()
  for op in litert_private.ops_details(interpreter):
    first = [i for i in op["inputs"] if i in tensors]
    dtype = np.dtype(tensors[first[0]]["dtype"]).name if first else "-"
    counts[(op["op_name"], dtype)] += 1
  return counts


def _no_delegate():
  from ai_edge_litert.interpreter import OpResolverType  # pylint: disable=g-import-not-at-top
  return OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def check_lowered(tflite_model: bytes) -> None:
  """Raises ValueError naming every op the quantiser/converter left unlowered."""
  counts = op_counts(tflite_model)
  left = {f"{name} ({dtype})": n for (name, dtype), n in counts.items()
          if name in _UNLOWERED_OPS}
  if left:
    raise ValueError(
        f"The int8 conversion left ops that are not TFLite builtin kernels: {left}. "
        "A STABLEHLO_COMPOSITE is a quant.fake_quant (or other composite) the "
        "converter did not lower: check that strict_qdq_mode is on and that the "
        "layer's op is one Qwix's ODML mode handles (dot_general, conv, einsum).")
  if not any(name in _INT8_KERNELS and dtype == "int8"
             for (name, dtype) in counts):
    raise ValueError(f"The int8 conversion has no int8 kernel ({_INT8_KERNELS}); "
                     f"its ops are {dict(counts)}.")


def check_supported(model, image_shape: tuple[int, ...],
                    layers: str = "weights") -> None:
  """Raises ValueError naming each layer, and its op, that Qwix would leave float.

  Qwix intercepts ``lax.dot_general``, ``lax.conv_general_dilated``,
  ``jnp.einsum`` and ``jnp.dot``; a layer applying its kernel otherwise (e.g.
  ``x @ kernel``, which is ``jnp.matmul``) gets no fake-quant and would stay
  float in the int8 file. Found without compiling (abstract evaluation): each
  selected layer must own activation statistics.

  Example::

      check_supported(model, (1, 32, 32, 3))
  """
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  qmodel = qat_model(model, shapes["params"], layers)
  stats, _ = split_stats(jax.eval_shape(qmodel.init, jax.random.key(0), x).get(
      "batch_stats", {}))
  flat = flax.traverse_util.flatten_dict(
      stats, is_leaf=lambda _, v: not isinstance(v, dict) or set(v) == _STAT_KEYS)
  quantised = {"/".join(map(str, k[:-1])) for k in flat}
  paths = kernel_module_paths(shapes["params"])
  targets = paths if layers == "weights" else [p for p in paths
                                               if re.fullmatch(layers, p)]
  missing = [p for p in targets if p not in quantised]
  if missing:
    ops = _kernel_ops(model, shapes, x, missing)
    named = ", ".join(f"{p!r} (op {ops.get(p, '?')!r})" for p in missing)
    raise ValueError(
        f"Qwix cannot quantise layers {named}: their kernel reaches that primitive "
        "through a function Qwix's ODML mode does not intercept (e.g. jnp.matmul "
        "or `@`); it intercepts lax.dot_general, lax.conv_general_dilated, "
        "jnp.einsum and jnp.dot. Use flax.linen.Dense/Conv or one of those, or "
        "leave the layers out with config.qat.layers.")


def check_convertible(model, image_shape: tuple[int, ...], layers: str = "weights",
                      name: str = "") -> None:
  """Converts the freshly initialised QAT model to int8 TFLite once, before training.

  Qwix's conversion and litert-converter do not handle every model family
  (measured: ViT/DeiT convert; EdgeViT stops in Qwix's conversion, MobileViTv2 in
  the converter's batch-matmul lowering), and a failure found after hours of QAT
  is a lost run. Raises ValueError naming the model and the failing step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(1), image_shape, jnp.float32)
  qmodel = qat_model(model, jax.eval_shape(model.init, jax.random.key(0), x)["params"],
                     layers)
  variables = qmodel.init(jax.random.key(0), x)
  # One forward pass records ranges (after init their counts are 0: "not initialized").
  _, updated = qmodel.apply(variables, x, train=False, mutable=["batch_stats"])
  variables = {**variables, **updated}
  stats, other = split_stats(variables.get("batch_stats", {}))
  step = "Qwix's ODML conversion"
  try:
    cmodel = conversion_model(model, variables["params"], variables["batch_stats"], layers)
    rest = {"params": variables["params"], **({"batch_stats": other} if other else {})}
    jax.eval_shape(lambda v: cmodel.apply(v, x, train=False), rest)
    step = "litert-converter"
    to_tflite(cmodel, rest, image_shape[1], image_shape[-1])
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    reason = next((l for l in lines if "error:" in l), lines[0] if lines else "")
    raise ValueError(
        f"QAT cannot export {name or type(model).__name__} to int8 TFLite: {step} "
        f"failed on the freshly initialised model ({type(e).__name__}: "
        f"{reason[:300]}). "
        "Quantisation-aware training is supported for ViT/DeiT; for this model use "
        "post-training int8 (python -m vit_edge.export --quantize=int8 on a float "
        "run; in the compression recipe the 'ptq' argument).") from e
  del stats


def _kernel_ops(model, shapes: Any, x, layer_paths: list[str]) -> dict[str, str]:
  """{layer path: name of the first op that reads its kernel} from the jaxpr."""
  import jax  # pylint: disable=g-import-not-at-top
  rest = {k: v for k, v in shapes.items() if k != "params"}
  closed = jax.make_jaxpr(lambda p, x: model.apply({"params": p, **rest}, x,
                                                   train=False))(shapes["params"], x)
  leaves = jax.tree_util.tree_leaves_with_path(shapes["params"])
  invars = closed.jaxpr.invars[:len(leaves)]
  found = {}
  for (path, _), var in zip(leaves, invars):
    keys = [getattr(k, "key", k) for k in path]
    layer = "/".join(map(str, keys[:-1]))
    if keys[-1] != "kernel" or layer not in layer_paths:
      continue
    for eqn in closed.jaxpr.eqns:
      if any(v is var for v in eqn.invars):
        found[layer] = str(eqn.params.get("name", eqn.primitive.name))
        break
  return found


def export_parts(model, variables: Any, config: ml_collections.ConfigDict, *,
                 integer_io: bool = False):
  """(conversion model, its variables, converter) for ``pipeline.export``.

  `model` is the float model of a QAT run and `variables` its checkpoint's
  (``params`` and ``batch_stats`` holding the learned ranges). The export's parity
  guard then compares the file with the fake-quantised model.

  Raises:
    ValueError: `integer_io` (the QAT file keeps float input and outputs), or
      the checkpoint has no ranges.
  """
  if integer_io:
    raise ValueError("integer_io=True is not supported by the QAT export; its "
                     "file quantises the input inside (float input and outputs).")
  layers = config.qat.get("layers", "weights")
  stats, _ = split_stats(variables.get("batch_stats", {}))
  if not stats:
    raise ValueError("The checkpoint has no QAT ranges in batch_stats; was it "
                     "trained with config.qat.enabled=True?")
  params = variables["params"]
  cmodel = conversion_model(model, params, variables["batch_stats"], layers)
  rest = {k: v for k, v in variables.items() if k != "batch_stats"}
  _, other_stats = split_stats(variables["batch_stats"])
  if other_stats:
    rest["batch_stats"] = other_stats

  def converter(m, v, spec):
    return to_tflite(m, v, 0, serving=spec)

  return cmodel, rest, converter
