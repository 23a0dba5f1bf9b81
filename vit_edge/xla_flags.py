"""XLA:CPU options that vit_edge trains with by default.

XLA reads ``XLA_FLAGS`` once, when JAX starts its backend (the first array or
device query), so the options go into the environment before that: from
``main._setup_jax`` for the command line and from ``train.Trainer`` for
notebooks and tools. Child processes inherit them.

The one option today hands XLA:CPU's single dots (matmuls) back to its Eigen
kernels instead of YNNPACK, which is slower on this code's train-step shapes:
DeiT-Ti's step took 6-22% less time in every alternated round at one and two
threads; EdgeViT, MobileViTv2 and TFormer moved by less than their
round-to-round spread (README "Performance notes" has the tables and commands).
The option is process-wide, so it is on for every family. It changes which
kernel computes a matmul, not the function: results differ only by float32
summation order.

Left alone when the user's ``XLA_FLAGS`` already sets the option, when
``VIT_EDGE_XLA_DEFAULTS=0``, when jaxlib is not a version the option was
checked on (XLA aborts on flags it does not know), and when the backend has
already started (then nothing can change it; the log says so).
"""

from __future__ import annotations

import os

from absl import logging

# Each option with the name of the setting it sets, so a user's own value wins.
DEFAULT_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_dot",
}
OPT_OUT_VARIABLE = "VIT_EDGE_XLA_DEFAULTS"
# jaxlib versions whose XLA knows every option above (setup.py pins jax).
CHECKED_JAXLIB_VERSIONS = ("0.10.2",)


def _backend_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def apply_defaults() -> list[str]:
  """Adds DEFAULT_OPTIONS to ``XLA_FLAGS`` where allowed; returns those added.

  Idempotent. Call before the first JAX computation of the process.
  """
  switch = os.environ.get(OPT_OUT_VARIABLE, "1").strip()
  if switch not in ("0", "1"):
    raise ValueError(f"{OPT_OUT_VARIABLE}={switch!r} is not understood; expected 0 "
                     "(leave XLA_FLAGS alone) or 1 (add vit_edge's XLA defaults, the "
                     "default). Set it to one of those or unset it.")
  if switch == "0":
    return []
  import jaxlib  # pylint: disable=g-import-not-at-top
  if jaxlib.__version__ not in CHECKED_JAXLIB_VERSIONS:
    logging.info("XLA defaults of vit_edge not applied: jaxlib %s is not one of "
                 "the checked versions %s.", jaxlib.__version__,
                 CHECKED_JAXLIB_VERSIONS)
    return []
  current = os.environ.get("XLA_FLAGS", "")
  missing = [f"--{name}={value}" for name, value in DEFAULT_OPTIONS.items()
             if f"--{name}=" not in current]
  if not missing:
    return []
  if _backend_started():
    logging.info("XLA defaults of vit_edge not applied (the JAX backend has "
                 "already started): %s. Set them in XLA_FLAGS before the first "
                 "JAX computation.", " ".join(missing))
    return []
  os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
  logging.info("XLA_FLAGS=%s (vit_edge defaults; %s=0 turns them off).",
               os.environ["XLA_FLAGS"], OPT_OUT_VARIABLE)
  return missing
