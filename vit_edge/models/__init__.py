"""The model zoo: create_model / list_models over every registered family.

Importing this package registers all families (each module's factories carry
``@register_model``).
"""

from vit_edge.models.registry import (ModelInfo, check_image_size, create_model,
                                      create_model_at_size, get_model_info, list_models,
                                      register_model)

# Imported for their registration side effect.
from vit_edge.models import edgevit  # noqa: F401  pylint: disable=g-bad-import-order
from vit_edge.models import mobilevitv2  # noqa: F401
from vit_edge.models import mobilevitv2_moe  # noqa: F401
from vit_edge.models import tformer  # noqa: F401
from vit_edge.models import vit  # noqa: F401
from vit_edge.devit import ensemble as _devit_ensemble  # noqa: F401,E402  (DeViT)
from vit_edge.models import segmentation  # noqa: F401  (after the backbones it builds on)

__all__ = ["ModelInfo", "check_image_size", "create_model", "create_model_at_size",
           "get_model_info", "list_models", "register_model"]
