"""A timm-style registry of model factories.

Every family module decorates its factory functions with :func:`register_model`;
users call :func:`create_model` and :func:`list_models`::

    from vit_edge import models
    model = models.create_model("edgevit_xxs", num_classes=10)
    models.list_models("mobilevitv2_*")
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable, Optional

import flax.linen as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# MobileViTv2 (ml-cvnets) feeds images in [0, 1] with no mean/std normalisation.
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a user, the trainer and the exporter need to know about a model name.

  Attributes:
    name: registry name, e.g. "edgevit_xxs".
    family: "edgevit", "mobilevitv2", "tformer", "vit" or "deit".
    builder: factory returning the linen module; takes num_classes and overrides.
    image_size: the reference (published) input resolution.
    stride: total stride; inputs must be divisible by it.
    fixed_resolution: True for ViTs, whose position embedding fixes the input size.
    mean: per-channel mean subtracted from [0, 1] images.
    std: per-channel std that [0, 1] images are divided by.
    top1: published ImageNet-1K top-1 accuracy (percent), None if none.
    reference: where the architecture comes from.
  """

  name: str
  family: str
  builder: Callable[..., nn.Module]
  image_size: int
  stride: int
  fixed_resolution: bool = False
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  top1: Optional[float] = None
  reference: str = ""


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(*, family: str, image_size: int, stride: int, **info: Any):
  """Decorator that adds a factory `fn(num_classes=1000, **overrides)` to the registry.

  Example::

      @register_model(family="edgevit", image_size=224, stride=32, top1=74.4)
      def edgevit_xxs(**kwargs):
        return EdgeViT(depths=(1, 1, 3, 2), ..., **kwargs)
  """

  def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _REGISTRY:
      raise ValueError(f"Model {name!r} is registered twice; names must be unique.")
    _REGISTRY[name] = ModelInfo(
        name=name, family=family, builder=fn, image_size=image_size,
        stride=stride, **info)
    return fn

  return decorator


def build(module_class: Callable[..., nn.Module], defaults: dict[str, Any],
          overrides: dict[str, Any]) -> nn.Module:
  """`module_class` with a size's `defaults` updated by the user's `overrides`.

  Factories use it so that every field, including the ones that define the size
  (depths, widths, width_multiplier), can be overridden through `create_model`::

      def edgevit_xxs(**kwargs):
        return build(EdgeViT, dict(depths=(1, 1, 3, 2), ...), kwargs)
  """
  return module_class(**{**defaults, **overrides})


def list_models(pattern: str = "*") -> list[str]:
  """Sorted registered names matching a shell-style pattern.

  Example: ``list_models("edgevit_*") == ["edgevit_s", "edgevit_xs", "edgevit_xxs"]``.
  """
  return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_info(name: str) -> ModelInfo:
  """The :class:`ModelInfo` of a registered name; a KeyError lists close names."""
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.4)
    hint = (f" Did you mean: {', '.join(close)}?" if close else "")
    raise KeyError(
        f"Unknown model name {name!r}.{hint} "
        f"See vit_edge.models.list_models() for all {len(_REGISTRY)} names.")
  return _REGISTRY[name]


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
  """Builds a registered model as a Flax linen module.

  Every model maps an NHWC float batch to ``(logits, aux)``::

      model = create_model("tformer_s", num_classes=10, drop_path_rate=0.1)
      variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
      logits, aux = model.apply(variables, images, train=False)

  Args:
    name: a name from :func:`list_models`.
    num_classes: size of the classifier head (0 keeps no head: logits are the
      pre-logits features).
    **overrides: module fields such as ``drop_path_rate``, ``dropout_rate`` or
      ``dtype`` (compute dtype; parameters stay float32).

  Raises:
    KeyError: unknown name (the message lists close names).
    TypeError: an override that the model has no field for (names the fields).
  """
  info = get_model_info(name)
  try:
    return info.builder(num_classes=num_classes, **overrides)
  except TypeError as e:
    raise TypeError(
        f"create_model({name!r}) got an override it does not accept: {e}. "
        f"Valid fields of {name}: {_field_names(info)}") from e


def create_model_at_size(name: str, image_size: int, /, num_classes: int = 1000,
                         **overrides: Any) -> nn.Module:
  """:func:`create_model` for inputs of `image_size` pixels square.

  A model whose position embedding fixes its resolution (``fixed_resolution``:
  ViT, DeiT, DeViT) is built for `image_size` unless `overrides` already names
  one (positional-only `image_size` lets an override of that name through);
  every other model takes any size and is built as is::

      create_model_at_size("deit_tiny_patch16", 160)   # pos_embed for 10x10 patches
      create_model_at_size("edgevit_xxs", 160)         # same module as at 224
  """
  if get_model_info(name).fixed_resolution:
    overrides.setdefault("image_size", image_size)
  return create_model(name, num_classes=num_classes, **overrides)


def check_image_size(name: str, image_size: int, setting: str = "image_size") -> None:
  """Raises ValueError unless `image_size` is a positive multiple of `name`'s stride.

  The trainer and both export paths call this one check, so a bad size gets the
  same message wherever it was given; `setting` names where it came from (e.g.
  "config.image_size").
  """
  stride = get_model_info(name).stride
  if image_size < 1 or image_size % stride:
    nearest = max(stride, round(image_size / stride) * stride)
    raise ValueError(f"{setting}={image_size} is not a positive multiple of the total "
                     f"stride {stride} of {name}; use e.g. {nearest}.")


def _field_names(info: ModelInfo) -> list[str]:
  module = info.builder()
  return sorted(f.name for f in dataclasses.fields(module)
                if f.name not in ("parent", "name"))
