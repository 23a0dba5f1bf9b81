"""Fine-tune a pruned run (python -m vit_edge.compress.prune) with its recorded widths.

The pruned run's config (model, data, recipe and ``model_overrides.unit_widths``)
is reused; ``init_from`` copies its sliced parameters into the fresh state. With
``teacher=DIR`` (e.g. the unpruned run) the fine-tune distils through the objective
seam: ``(1-a) CE + a tau^2 KL`` (soft_kd, a = 0.5, tau = 4), or DeiT's hard-token
loss for a distilled student.

arg: comma-separated ``pruned=DIR`` (required), ``teacher=DIR``, ``steps=N``,
``epochs=E``::

    python -m vit_edge.main \
        --config=configs/compress/finetune.py:pruned=workdir/deit_pruned,teacher=workdir/deit \
        --workdir=workdir/deit_pruned_ft
"""

import os

from vit_edge import rundir


def get_config(arg=None):
  options = dict(a.split("=", 1) for a in (arg or "").split(",") if a)
  unknown = sorted(set(options) - {"pruned", "teacher", "steps", "epochs"})
  if unknown or "pruned" not in options:
    raise ValueError(f"configs/compress/finetune.py takes pruned=DIR[,teacher=DIR]"
                     f"[,steps=N][,epochs=E]; got {arg!r}.")
  pruned = os.path.abspath(options["pruned"])
  c = rundir.load_config(pruned)
  c.init_from = pruned
  if "steps" in options:
    c.num_train_steps = int(options["steps"])
  if "epochs" in options:
    c.num_train_steps, c.num_epochs = 0, float(options["epochs"])
  if "teacher" in options:
    distilled = bool(c.model_overrides.get("distilled", False)) or "distilled" in c.model
    c.objective.name = "hard_token" if distilled else "soft_kd"
    if not distilled:
      c.objective.tau = 4.0
    c.objective.alpha = 0.5
    c.teacher.workdir = os.path.abspath(options["teacher"])
  return c
