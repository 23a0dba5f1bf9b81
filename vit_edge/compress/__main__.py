"""``python -m vit_edge.compress --config=configs/compress/<recipe>.py --workdir=W``.

Runs the compression recipe (vit_edge/compress/recipe.py): teacher -> distilled
student -> pruned -> fine-tuned -> QAT -> int8 TFLite, each stage in W/<stage>,
resuming at the first unfinished stage; then writes W/table.md, W/table.json and
W/pareto.png. ``--measure=false`` skips the table.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from vit_edge import hugepages
from vit_edge.compress import recipe as recipe_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A recipe config, e.g. configs/compress/uav_edgevit.py or "
    "configs/compress/uav_edgevit.py:steps=20,ptq", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The recipe's directory (one "
                               "subdirectory per stage).")
_MEASURE = flags.DEFINE_bool("measure", True, "Measure every stage's TFLite file and "
                             "write table.md / table.json / pareto.png.")
flags.mark_flags_as_required(["config", "workdir"])
# What a wrong path or value raises (as vit_edge.main; its flags cannot be imported
# beside these): one line, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                FloatingPointError)


def _main(argv) -> None:
  del argv
  try:
    recipe = recipe_lib.Recipe(_CONFIG.value, _WORKDIR.value)
    recipe.run()
    if _MEASURE.value:
      rows = recipe_lib.measure(recipe)
      print(recipe_lib.write_table(recipe, rows))
  except _USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  app.run(_main)
