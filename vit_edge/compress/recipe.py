"""One compression recipe: teacher -> distilled student -> pruned -> fine-tuned -> QAT -> int8.

``python -m vit_edge.compress --config=configs/compress/<name>.py --workdir=W`` runs
the stages in order, each in its own run directory under W::

    teacher     the large model (or an existing run: ``teacher_workdir``)
    student     the small model distilled from the teacher (``student.objective``)
    pruned      units removed from the student (vit_edge/compress/prune.py)
    pruned_ft   the pruned student fine-tuned, distilled from the unpruned student
    qat         quantisation-aware fine-tune of pruned_ft (needs ``.[qat]``);
                ``qat.epochs=0`` skips it and the int8 file is post-training
    int8        the deployable file, W/int8/model.tflite, through the parity guard

W/recipe.json records the recipe's config and each finished stage with its
results; a rerun after a crash or kill skips the finished stages and resumes the
first unfinished one from its own newest checkpoint (a half-written pruned
directory is pruned again). Then every stage's TFLite file is measured (one
thread; params, MACs, size, latency, top-1 on the eval split, agreement with its
JAX model) into W/table.md, W/table.json and W/pareto.png (top-1 against latency,
file size as marker size).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Optional

import ml_collections

from vit_edge import rundir

STAGES = ("teacher", "student", "pruned", "pruned_ft", "qat", "int8")
STATE_FILE = "recipe.json"
INT8_FILE = "model.tflite"


class RecipeError(ValueError):
  """A recipe config or work directory that cannot be run (names the field)."""


def finetune_config(pruned: str, teacher: Optional[str] = None,
                    steps: Optional[int] = None,
                    epochs: Optional[float] = None) -> ml_collections.ConfigDict:
  """The pruned run's config, initialised from it, distilled from `teacher` if given.

  Distillation is soft KD (a 0.5, tau 4), or DeiT's hard-token loss for a
  distilled student (configs/compress/finetune.py); without `teacher` the pruned
  run's own objective stays.
  """
  pruned = os.path.abspath(pruned)
  c = rundir.load_config(pruned)
  c.init_from = pruned
  if steps is not None:
    c.num_train_steps = int(steps)
  if epochs is not None:
    c.num_train_steps, c.num_epochs = 0, float(epochs)
  if teacher:
    distilled = bool(c.model_overrides.get("distilled", False)) or "distilled" in c.model
    c.objective.name = "hard_token" if distilled else "soft_kd"
    if not distilled:
      c.objective.tau = 4.0
    c.objective.alpha = 0.5
    c.teacher.workdir = os.path.abspath(teacher)
  return c


def qat_config(source: str, qat: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A QAT fine-tune of the run `source` (plain cross-entropy, small learning rate)."""
  c = finetune_config(source, epochs=qat.epochs)
  c.objective.name, c.teacher.workdir = "cross_entropy", ""
  c.qat.enabled = True
  c.qat.layers = qat.layers
  c.optim.lr, c.optim.min_lr = qat.lr, qat.min_lr
  c.optim.warmup_epochs, c.optim.warmup_steps = 0.0, 0
  return c


def _with_steps(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  if steps > 0:
    config.num_train_steps = steps
    config.eval_every_steps = steps
    config.checkpoint.every_steps = steps
  return config


def _check(config: ml_collections.ConfigDict) -> None:
  if not config.teacher_workdir and not config.teacher.get("model"):
    raise RecipeError("The recipe needs a teacher: config.teacher (a training config) "
                      "or config.teacher_workdir (an existing run directory).")
  if config.teacher_workdir and not rundir.checkpoint_steps(config.teacher_workdir):
    raise RecipeError(f"config.teacher_workdir={config.teacher_workdir!r} holds no "
                      "checkpoint; train the teacher there first or leave the field "
                      "empty to train config.teacher.")
  if config.qat.epochs < 0 or config.finetune.epochs < 0:
    raise RecipeError(f"qat.epochs={config.qat.epochs} and finetune.epochs="
                      f"{config.finetune.epochs} must be >= 0 (0 skips the stage).")
  if config.qat.epochs > 0:
    try:
      import qwix  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise RecipeError(
          "The qat stage needs the optional extra: pip install -e '.[qat]' (qwix, "
          "litert-converter); or set --config.qat.epochs=0 for a post-training int8 "
          "file.") from e


class Recipe:
  """Runs the stages of `config` in `workdir`; see the module docstring.

  `train_fn(config, workdir) -> results` and `export_fn(workdir, out, quantize)`
  default to the real training and export (tests may pass counting wrappers).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               train_fn: Optional[Callable[..., dict]] = None,
               export_fn: Optional[Callable[..., Any]] = None):
    from vit_edge import export  # pylint: disable=g-import-not-at-top
    from vit_edge import train  # pylint: disable=g-import-not-at-top
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.train_fn = train_fn or train.train_and_evaluate
    self.export_fn = export_fn or (lambda w, out, quantize: export.export_from_workdir(
        w, out, quantize=quantize,
        max_eval_examples=config.bench.max_eval_examples or None,
        num_calibration_samples=config.bench.num_calibration_samples))
    self.state = self._load_state()

  # -- state -------------------------------------------------------------------
  def _state_path(self) -> str:
    return os.path.join(self.workdir, STATE_FILE)

  def _load_state(self) -> dict[str, Any]:
    path = self._state_path()
    recipe = json.loads(self.config.to_json())
    if not os.path.exists(path):
      return {"config": recipe, "done": {}}
    with open(path) as f:
      state = json.load(f)
    if state["config"] != recipe:
      changed = sorted(_changed_fields(state["config"], recipe))
      raise RecipeError(
          f"{self.workdir} holds a recipe run with another config (changed: "
          f"{', '.join(changed[:6])}). Rerun with the same config to resume, or use a "
          "new --workdir.")
    return state

  def _save_state(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    tmp = self._state_path() + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.state, f, indent=2)
    os.replace(tmp, self._state_path())

  def dir(self, stage: str) -> str:
    if stage == "teacher" and self.config.teacher_workdir:
      return os.path.abspath(self.config.teacher_workdir)
    return os.path.join(self.workdir, stage)

  def done(self, stage: str) -> bool:
    return stage in self.state["done"]

  def _finish(self, stage: str, results: Any) -> None:
    self.state["done"][stage] = results
    self._save_state()

  # -- stages ------------------------------------------------------------------
  def stages(self) -> list[str]:
    """The stages this config runs (qat only with qat.epochs > 0)."""
    return [s for s in STAGES if s != "qat" or self.config.qat.epochs > 0]

  def run(self, log: Callable[[str], None] = print) -> dict[str, Any]:
    _check(self.config)
    self._save_state()
    for stage in self.stages():
      if self.done(stage):
        log(f"[compress] {stage}: done ({self.dir(stage)})")
        continue
      log(f"[compress] {stage}: {self.dir(stage)}")
      self._finish(stage, getattr(self, "_" + stage)())
    return self.state["done"]

  def _train(self, config: ml_collections.ConfigDict, stage: str) -> dict:
    config = _with_steps(config, self.config.steps)
    results = self.train_fn(config, self.dir(stage))
    return {k: float(v) for k, v in results.items()}

  def _teacher(self) -> dict:
    if self.config.teacher_workdir:
      return {"reused": self.dir("teacher")}
    return self._train(ml_collections.ConfigDict(self.config.teacher.to_dict()), "teacher")

  def _student(self) -> dict:
    config = ml_collections.ConfigDict(self.config.student.to_dict())
    config.teacher.workdir = self.dir("teacher")
    return self._train(config, "student")

  def _pruned(self) -> dict:
    from vit_edge.compress import prune  # pylint: disable=g-import-not-at-top
    out = self.dir("pruned")
    if os.path.exists(out):  # A prune that did not finish: do it again.
      shutil.rmtree(out)
    p = self.config.prune
    summary = prune.prune_run(
        self.dir("student"), out, importance_method=p.importance,
        ratios=prune.Ratios(p.heads, p.hidden, dict(p.per_layer), p.scope),
        num_batches=p.batches, batch_size=p.batch_size, macs_budget=p.macs_budget)
    return {"params_before": summary["params_before"], "ratios": summary["ratios"],
            "params_after": summary["params_after"], "widths": summary["widths"]}

  def _pruned_ft(self) -> dict:
    teacher = self.dir("student") if self.config.finetune.distill else None
    config = finetune_config(self.dir("pruned"), teacher=teacher,
                             epochs=self.config.finetune.epochs)
    return self._train(config, "pruned_ft")

  def _qat(self) -> dict:
    return self._train(qat_config(self.dir("pruned_ft"), self.config.qat), "qat")

  def final_run(self) -> str:
    """The run the int8 file comes from: the QAT run, else the fine-tuned one."""
    return self.dir("qat" if "qat" in self.stages() else "pruned_ft")

  def _int8(self) -> dict:
    out = os.path.join(self.dir("int8"), INT8_FILE)
    report = self.export_fn(self.final_run(), out, "int8")
    return {"file": out, "source": self.final_run(),
            "size_bytes": getattr(report, "size_bytes", os.path.getsize(out))}


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += _changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")
    return out
  return [] if old == new else [prefix.rstrip(".")]


# -- the stage table ---------------------------------------------------------------

@dataclasses.dataclass
class StageRow:
  stage: str
  model: str
  quantize: str
  params_m: float
  gmacs: float
  size_mb: float
  median_ms: float
  top1: Optional[float]
  agreement: Optional[float]


def measure(recipe: Recipe, log: Callable[[str], None] = print) -> list[StageRow]:
  """Every stage's TFLite file through vit_edge.bench (exports cached in W/bench)."""
  from vit_edge import bench  # pylint: disable=g-import-not-at-top
  b = recipe.config.bench
  plan = [("teacher", "none"), ("student", "none"), ("pruned", "none"),
          ("pruned_ft", "none"), ("pruned_ft", "int8")]
  if "qat" in recipe.stages():
    plan.append(("qat", "int8"))
  rows = []
  for stage, mode in plan:
    log(f"[compress] measuring {stage} ({mode})")
    result = bench.run_benchmark(
        [], workdirs=[recipe.dir(stage)], quantize_modes=[mode], threads=[b.threads],
        runs=b.runs, warmup=b.warmup, out_dir=os.path.join(recipe.workdir, "bench", stage),
        num_calibration_samples=b.num_calibration_samples,
        max_eval_examples=b.max_eval_examples or None, reuse_exports=True,
        matmul=False)
    r = result["rows"][0]
    label = stage if mode == "none" else (
        "qat int8" if stage == "qat" else f"{stage} int8 (post-training)")
    rows.append(StageRow(label, r.model, mode, r.params_m, r.gmacs, r.size_mb,
                         r.median_ms, r.top1_accuracy, r.top1_agreement))
  return rows


def markdown(rows: list[StageRow], threads: int) -> str:
  pct = lambda v: "-" if v is None else f"{100 * v:.2f}"
  lines = [f"| stage | model | params (M) | GMACs | file (MB) | {threads}-thread ms | "
           "top-1 (%) | agreement (%) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r.stage} | {r.model} | {r.params_m:.2f} | {r.gmacs:.3f} | "
                 f"{r.size_mb:.2f} | {r.median_ms:.2f} | {pct(r.top1)} | "
                 f"{pct(r.agreement)} |")
  return "\n".join(lines)


def pareto_plot(rows: list[StageRow], path: str, threads: int) -> None:
  """Top-1 against latency; marker area proportional to the file size."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  biggest = max(r.size_mb for r in rows)
  for i, r in enumerate(rows):
    top1 = 100 * (r.top1 or 0.0)
    ax.scatter([r.median_ms], [top1], s=40 + 800 * r.size_mb / biggest, alpha=0.6,
               marker="D" if r.quantize == "int8" else "o", label=r.stage)
    # Staggered labels: the compressed stages sit close together.
    ax.annotate(f"{r.size_mb:.1f} MB", (r.median_ms, top1), fontsize=7,
                xytext=(6, 10 - 9 * (i % 3)), textcoords="offset points")
  ax.set_xscale("log")
  ax.legend(fontsize=7, loc="lower right", markerscale=0.4)
  ax.set_xlabel(f"median latency, {threads} thread (ms, log scale; TFLite XNNPACK, batch 1)")
  ax.set_ylabel("top-1 (%), TFLite on the eval split")
  ax.set_title("Compression recipe: accuracy vs latency (marker size: file size)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_table(recipe: Recipe, rows: list[StageRow]) -> str:
  threads = recipe.config.bench.threads
  text = markdown(rows, threads)
  with open(os.path.join(recipe.workdir, "table.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(recipe.workdir, "table.json"), "w") as f:
    json.dump([dataclasses.asdict(r) for r in rows], f, indent=2)
  pareto_plot(rows, os.path.join(recipe.workdir, "pareto.png"), threads)
  return text


# -- configs (configs/compress/*.py) ------------------------------------------------

def recipe_config(teacher: str, student: str, objective: str = "soft_kd",
                  arg: Optional[str] = None, qat: bool = True) -> ml_collections.ConfigDict:
  """A Fashion-MNIST recipe from the `teacher` to a pruned, int8 `student`.

  `qat` False: post-training int8 (no QAT stage) by default, for students whose
  QAT export the converter does not take yet (qat.check_convertible).

  `arg` (comma-separated): ``steps=N`` (every training stage N steps: quick runs),
  ``ptq`` (no QAT stage: post-training int8), ``teacher_workdir=DIR`` (reuse a
  trained teacher run).
  """
  from vit_edge import recipes  # pylint: disable=g-import-not-at-top
  options = dict(item.partition("=")[::2] for item in (arg or "").split(",") if item)
  unknown = sorted(set(options) - {"steps", "ptq", "teacher_workdir"})
  if unknown:
    raise RecipeError(f"Recipe arguments {unknown} unknown; expected steps=N, ptq, "
                      "teacher_workdir=DIR (comma-separated).")
  c = ml_collections.ConfigDict()
  c.teacher = recipes.get_config(teacher, "fashion")
  c.teacher_workdir = options.get("teacher_workdir", "")
  soft = {"tau": 4.0} if objective == "soft_kd" else {}
  c.student = recipes.distillation_config(student, objective, "", alpha=0.5, **soft)
  c.prune = ml_collections.ConfigDict({
      "importance": "taylor", "heads": 0.5, "hidden": 0.5, "scope": "layer",
      "per_layer": {}, "batches": 4, "batch_size": 64,
      # > 0: MACs per image to prune down to; the ratio is searched (prune_run).
      "macs_budget": 0.0})
  c.finetune = ml_collections.ConfigDict({"epochs": 2.0, "distill": True})
  c.qat = ml_collections.ConfigDict({
      "epochs": 0.0 if "ptq" in options or not qat else 1.0, "lr": 5e-5, "min_lr": 1e-6,
      "layers": "weights"})
  c.bench = ml_collections.ConfigDict({
      "threads": 1, "runs": 50, "warmup": 10, "max_eval_examples": 2000,
      "num_calibration_samples": 200})
  c.steps = int(options.get("steps", 0))
  return c
