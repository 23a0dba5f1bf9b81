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

from vit_edge.compress import recipe


def get_config(arg=None):
  options = dict(a.split("=", 1) for a in (arg or "").split(",") if a)
  unknown = sorted(set(options) - {"pruned", "teacher", "steps", "epochs"})
  if unknown or "pruned" not in options:
    raise ValueError(f"configs/compress/finetune.py takes pruned=DIR[,teacher=DIR]"
                     f"[,steps=N][,epochs=E]; got {arg!r}.")
  return recipe.finetune_config(
      options["pruned"], teacher=options.get("teacher"),
      steps=int(options["steps"]) if "steps" in options else None,
      epochs=float(options["epochs"]) if "epochs" in options else None)
