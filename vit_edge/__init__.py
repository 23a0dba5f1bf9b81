"""vit_edge: efficient vision transformers for edge and IoT devices, in JAX/Flax."""

__version__ = "0.1.0"
