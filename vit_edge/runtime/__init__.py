"""A light on-device runtime for vit_edge TFLite exports.

Depends only on numpy, Pillow and ai-edge-litert: nothing here imports JAX or
TensorFlow, so the package runs on a Jetson, a Raspberry Pi or any aarch64 board
with the ai-edge-litert wheel. Copy the .tflite file and this package.

Example::

    from vit_edge.runtime import Classifier
    clf = Classifier("tformer_s_int8.tflite", num_threads=2)
    print(clf.classify("cat.jpg", top_k=3))
"""

from vit_edge.runtime.classifier import Classifier, Prediction, TFLiteModel
from vit_edge.runtime.metadata import MetadataError, read_metadata
from vit_edge.runtime.transforms import ImageReadError, load_image, preprocess

__all__ = ["Classifier", "ImageReadError", "MetadataError", "Prediction",
           "TFLiteModel", "load_image", "preprocess", "read_metadata"]
