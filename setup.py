"""vit_edge: efficient vision transformers for edge and IoT devices, in JAX/Flax."""

import setuptools

# The pinned stack installs together on Python 3.11 (see README "Install").
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "clu==0.0.12",
    "ml-collections==1.1.0",
    "tensorflow-cpu==2.21.0",
    # TF 2.21 no longer pulls in tensorboard, which clu.metric_writers imports.
    "tensorboard",
    "tensorflow-datasets==4.9.10",
    "ai-edge-litert==2.3.0",
    "absl-py",
    "numpy",
    "Pillow",
    # Ships the real 8x8 digits data set used as the offline default.
    "scikit-learn",
    "matplotlib",
    # vit_edge.tools.import_torch reads PyTorch weights from .safetensors without
    # torch (not a dependency); 0.8.0 ships wheels for Python 3.11.
    "safetensors==0.8.0",
    # The DeViT device runtime (vit_edge.runtime.worker / collab) talks gRPC; pinned
    # to the version tensorflow-cpu 2.21 already installs on Python 3.11 (aarch64
    # wheels exist for the boards).
    "grpcio==1.85.3",
]

EXTRAS_REQUIRE = {
    "test": ["pytest", "pytest-xdist"],
}
# tests/test_notebooks.py executes every notebook in colabs/ headless, so a broken
# notebook fails CI; these three pins install together on Python 3.11.
EXTRAS_REQUIRE["test"] += [
    "nbclient==0.10.2",
    "nbformat==5.10.4",
    "ipykernel==6.29.5",
]
# Quantisation-aware training and its int8 export (vit_edge/compress/qat.py,
# tests/test_qat.py skips without them). Opt-in, not in "test": litert-converter
# 0.5.0 pins xdsl==0.28.0, which needs typing-extensions<4.13 and so downgrades
# the stack's 4.16.0 to 4.12.2 (qwix alone changes nothing).
EXTRAS_REQUIRE["qat"] = ["qwix==0.1.8", "litert-converter==0.5.0"]

# The peer benchmark (python -m vit_edge.tools.bench_peers): the reference PyTorch
# models (timm; EdgeViT's official file is passed by path), ONNX Runtime fp32 and
# int8. Never needed by the package. timm imports torchvision, and PyPI's
# torchvision only loads beside the torch release it was built for, so the two are
# pinned as a pair: 2.14.1/0.29.1 (the "PyTorch 2.14"; on x86_64 PyPI
# serves CUDA builds, which run on the CPU). onnx 1.23.2 / onnxruntime 1.32.0 /
# onnxscript 0.7.2 (torch.onnx's exporter) resolve with them on Python 3.11.
EXTRAS_REQUIRE["peers"] = ["torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31",
                           "onnx==1.23.2", "onnxruntime==1.32.0", "onnxscript==0.7.2"]

setuptools.setup(
    name="vit_edge",
    version="0.1.0",
    description="Efficient vision transformers for edge and IoT devices (JAX/Flax).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["vit_edge", "vit_edge.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
