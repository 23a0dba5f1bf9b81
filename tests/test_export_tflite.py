"""The smallest model of each family converts to TFLite and matches JAX."""

import jax
import numpy as np
import pytest

from vit_edge import export
from vit_edge import models

CASES = [  # (name, resolution): small inputs keep conversion fast.
    ("edgevit_xxs", 64),
    ("mobilevitv2_050", 64),
    ("tformer_s", 64),
    ("deit_tiny_patch16", 32),
    ("deit_tiny_distilled_patch16", 32),
]


@pytest.mark.parametrize("name,size", CASES)
def test_tflite_matches_jax(name, size):
  info = models.get_model_info(name)
  overrides = {"image_size": size} if info.fixed_resolution else {}
  model = models.create_model(name, num_classes=10, **overrides)
  images = np.asarray(jax.random.uniform(jax.random.key(0), (2, size, size, 3)))
  variables = model.init(jax.random.key(1), images[:1])
  tflite_model = export.to_tflite(model, variables, size)
  expected, _ = model.apply(variables, images, train=False)
  got = export.tflite_predict(tflite_model, images)
  np.testing.assert_allclose(got, np.asarray(expected), atol=2e-4, rtol=1e-3)
