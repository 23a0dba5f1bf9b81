"""A training run directory: its layout, its readers and writers, and its guard.

Layout of ``--workdir`` (written by ``vit_edge.main`` / ``train.train_and_evaluate``)::

    config.json            the config of the newest start (what export reads)
    dataset_info.json      name, num_classes, label_names, image_size, mean, std
    config_history.jsonl   one line per restart that changed the config (see below)
    checkpoints/<step>/    Orbax checkpoints; <step>/default holds the train state,
                           <step>/metrics/metrics the eval metrics when recorded
    events.out.tfevents.*  TensorBoard scalars
    train.log              the full log of ``python -m vit_edge.main`` (appended)
    export/                .tflite files written by ``python -m vit_edge.export``

Every module reads runs through this one (no ``os.listdir`` of checkpoints, no
hand-built ``config.json`` paths elsewhere).

The guard: before a run writes anything into an existing workdir,
:func:`check_run_dir` compares the saved config with the new one. A change that
would make the saved checkpoints unloadable or meaningless (another model or
architecture, image size, data set, class count, train-state structure) raises
:class:`RunDirConflictError` with one line naming each differing field and the two
ways forward; any other change (more steps, another learning rate, eval or
checkpoint intervals, ...) is allowed, returned, and recorded by
:func:`write_run_files` as one JSON line in ``config_history.jsonl``::

    {"time": "2026-12-01T23:10:00Z", "step": 4,
     "changes": {"num_train_steps": [4, 8]}}

(``step`` is the newest checkpoint when the run restarted; config.json then holds
the new values, so the history plus config.json give every value ever used.)

Example::

    changes = rundir.check_run_dir(workdir, config, dataset_info)  # may raise
    rundir.write_run_files(workdir, config, dataset_info, changes)
    step = rundir.newest_step(workdir)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence, Union

import ml_collections

CONFIG_FILE = "config.json"
DATASET_INFO_FILE = "dataset_info.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
LOG_FILE = "train.log"  # The full log of vit_edge.main (console shows less).
# Inside checkpoints/<step>/: the train-state item and Orbax's metrics item/file.
STATE_ITEM = "default"
METRICS_ITEM = "metrics"
BEST_METRIC = "eval/top1"

# Fields whose change makes the saved run another experiment, with why. A dotted
# name covers everything below it (model_overrides.* except the _COMPATIBLE_BELOW).
_ARCHITECTURE = "the checkpoints hold another architecture"
INCOMPATIBLE_FIELDS = {
    "model": _ARCHITECTURE,
    "model_overrides": _ARCHITECTURE,
    "image_size": "the model and its checkpoints are built for one resolution",
    "dataset": "the labels would mean other classes",
    "data_dir": "the labels would mean other classes",
    "ema_decay": "turning the EMA on or off changes the saved train state",
    "optim.grad_clip_norm": "turning clipping on or off changes the optimizer state",
    # The objective's learned parameters (e.g. a feature projection) are saved with
    # the student and sized by these fields.
    "objective.name": "another objective has other learned parameters",
    "objective.feature": "the feature projection is sized by the chosen features",
    # Fake-quantised layers keep learned ranges in the saved batch_stats.
    "qat.enabled": "turning QAT on or off changes the saved range statistics",
    "qat.layers": "the saved range statistics belong to the quantised layers",
}
# Regularisation rates live in model_overrides but change no parameter shape.
_COMPATIBLE_BELOW = ("model_overrides.drop_path_rate", "model_overrides.dropout_rate")

ConfigLike = Union[ml_collections.ConfigDict, Mapping[str, Any]]
_MISSING = "<unset>"


class RunDirConflictError(ValueError):
  """The workdir holds a run that the new config cannot continue."""


@dataclasses.dataclass(frozen=True)
class Change:
  """One config field that differs between the saved run and the new config."""
  field: str
  old: Any
  new: Any

  def __str__(self) -> str:
    return f"{self.field}: {self.old!r} -> {self.new!r}"


# ----------------------------------------------------------------------------------
# Paths.


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def dataset_info_path(workdir: str) -> str:
  return os.path.join(workdir, DATASET_INFO_FILE)


def config_history_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_HISTORY_FILE)


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS_DIR)


def export_dir(workdir: str) -> str:
  return os.path.join(workdir, EXPORT_DIR)


def is_run_dir(workdir: str) -> bool:
  """True when `workdir` holds a saved run (its config.json)."""
  return os.path.isfile(config_path(workdir))


# ----------------------------------------------------------------------------------
# Readers.


def _not_a_run(workdir: str, missing: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"{missing} does not exist: --workdir={workdir!r} is not a training run "
      "directory. Train first: python -m vit_edge.main --config=configs/<model>.py "
      f"--workdir={workdir}")


def _read_json(path: str, workdir: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise _not_a_run(workdir, path) from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): it was cut short or edited. "
                     "Restore it, delete it to continue the run with the new config, "
                     "or train into a new --workdir.") from e


def load_config_dict(workdir: str) -> dict[str, Any]:
  """The saved config of a run as plain JSON data (lists, not tuples)."""
  return _read_json(config_path(workdir), workdir)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The saved config of a run, as an (unlocked) ConfigDict.

  Example::

      config = rundir.load_config("workdir/tformer_s")
      config.model  # 'tformer_s'
  """
  return ml_collections.ConfigDict(load_config_dict(workdir))


def load_dataset_info(workdir: str) -> dict[str, Any]:
  """The saved data set description: name, num_classes, label_names, mean, std, ...

  Example::

      rundir.load_dataset_info("workdir/tformer_s")["num_classes"]  # 10
  """
  return _read_json(dataset_info_path(workdir), workdir)


def load_config_history(workdir: str) -> list[dict[str, Any]]:
  """The recorded config changes of a run, oldest first ([] when none)."""
  path = config_history_path(workdir)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _checkpoints_root(path: str) -> str:
  """`path` itself when it holds step folders, else its checkpoints/ folder."""
  nested = checkpoints_dir(path)
  return nested if os.path.isdir(nested) else path


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints of a run, ascending.

  `workdir` may be the run directory or its checkpoints/ folder. Orbax writes a
  checkpoint into a temporary folder and renames it to ``<step>`` when complete,
  so only all-digit names with a train state inside count.

  Example::

      rundir.checkpoint_steps("workdir/tformer_s")  # [400, 600, 800]
  """
  root = _checkpoints_root(workdir)
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root)
                if d.isdigit() and os.path.isdir(os.path.join(root, d, STATE_ITEM)))


def newest_step(workdir: str) -> Optional[int]:
  """The newest complete checkpoint step of a run, None when it has none.

  Example::

      rundir.newest_step("workdir/tformer_s")  # 800
  """
  steps = checkpoint_steps(workdir)
  return steps[-1] if steps else None


def checkpoint_metrics(workdir: str, step: int) -> Optional[dict[str, float]]:
  """The eval metrics Orbax stored with checkpoint `step`, None when none were.

  Orbax writes them (``<step>/metrics/metrics``) only when the manager is created
  with a ``best_fn``; see :func:`best_step`.
  """
  path = os.path.join(_checkpoints_root(workdir), str(step), METRICS_ITEM,
                      METRICS_ITEM)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def best_step(workdir: str, metric: str = BEST_METRIC) -> Optional[int]:
  """The checkpoint step with the highest stored `metric`, None when none has it.

  Ties go to the newer step. Example::

      rundir.best_step("workdir/tformer_s")  # 600
  """
  scored = []
  for step in checkpoint_steps(workdir):
    metrics = checkpoint_metrics(workdir, step) or {}
    if metric in metrics:
      scored.append((float(metrics[metric]), step))
  return max(scored)[1] if scored else None


def checkpoint_path(workdir: str, step: Optional[int] = None) -> str:
  """The folder of checkpoint `step` (newest when None) of a run.

  Raises:
    FileNotFoundError: naming the available steps when `step` has no checkpoint,
      or how to train when the run has none.

  Example::

      rundir.checkpoint_path("workdir/tformer_s")  # 'workdir/tformer_s/checkpoints/800'
  """
  steps = checkpoint_steps(workdir)
  root = _checkpoints_root(workdir)
  if not steps:
    raise FileNotFoundError(
        f"No checkpoint in {root}. Train first (python -m vit_edge.main "
        "--config=... --workdir=...) or point --workdir at a run that has one.")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"No checkpoint for step {step} in {root}; available "
                            f"steps: {steps}.")
  return os.path.join(root, str(step))


# ----------------------------------------------------------------------------------
# The guard.


def _as_json_data(config: ConfigLike) -> dict[str, Any]:
  """Config as JSON data, so tuples (new config) equal lists (saved config)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"optim": {"lr": 1}} -> {"optim.lr": 1}; other values are kept as they are."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _is_incompatible(field: str) -> bool:
  if field in _COMPATIBLE_BELOW:
    return False
  return any(field == f or field.startswith(f + ".") for f in INCOMPATIBLE_FIELDS)


def _normalise(field: str, value: Any) -> Any:
  if field == "data_dir" and isinstance(value, str):
    return os.path.normpath(value)  # "d/" and "d" are the same folder.
  if field == "optim.grad_clip_norm":
    return bool(value and value > 0)  # Only on/off changes the optimizer state.
  if field == "ema_decay":
    return bool(value and value > 0)  # Only on/off changes the train state.
  if field == "qat.enabled":
    return value is True  # Runs from before config.qat existed trained in float.
  if field == "qat.layers" and value is _MISSING:
    return "weights"  # The default, what such a run would have had.
  return value


def _incompatible_changes(changes: Sequence[Change]) -> list[Change]:
  return [c for c in changes if _is_incompatible(c.field)
          and _normalise(c.field, c.old) != _normalise(c.field, c.new)]


def _reason(field: str) -> str:
  for name, reason in INCOMPATIBLE_FIELDS.items():
    if field == name or field.startswith(name + "."):
      return reason
  return "the classifier head would have another size"


def _conflict_message(workdir: str, conflicts: Sequence[Change]) -> str:
  reasons = "; ".join(sorted({_reason(c.field) for c in conflicts}))
  message = (f"--workdir={workdir} holds another experiment ("
             + "; ".join(str(c) for c in conflicts) + f"): {reasons}. Nothing was "
             "written. Train into a new --workdir")
  if any(_reason(c.field) == _ARCHITECTURE for c in conflicts):
    # init_from copies parameters by name and shape: useless across architectures.
    return message + "."
  return (message + ", or fine-tune from this run with --workdir=<new dir> "
          f"--config.init_from={workdir}")


def config_changes(saved_config: ConfigLike, new_config: ConfigLike) -> list[Change]:
  """Every field that differs, sorted by name (missing fields show as '<unset>')."""
  old = flatten(_as_json_data(saved_config))
  new = flatten(_as_json_data(new_config))
  return [Change(k, old.get(k, _MISSING), new.get(k, _MISSING))
          for k in sorted(set(old) | set(new))
          if old.get(k, _MISSING) != new.get(k, _MISSING)]


def check_compatible(saved_config: ConfigLike, new_config: ConfigLike, *,
                     saved_info: Optional[Mapping[str, Any]] = None,
                     new_info: Optional[Mapping[str, Any]] = None,
                     workdir: str = "<workdir>") -> list[Change]:
  """The compatible changes from `saved_config` to `new_config`; raises on a conflict.

  Args:
    saved_config: the config stored with a run (ConfigDict or JSON data).
    new_config: the config about to continue the run.
    saved_info, new_info: optional data set descriptions (``dataset_info.json``);
      a different ``num_classes`` is a conflict (e.g. a class folder was added).
    workdir: named in the error message.

  Returns:
    The changes that are allowed (more steps, another lr, ...), sorted by field.

  Raises:
    RunDirConflictError: one line naming every conflicting field (old -> new)
      and the two ways forward.

  Example::

      >>> check_compatible({"model": "tformer_s", "num_train_steps": 4},
      ...                  {"model": "tformer_s", "num_train_steps": 8})
      [Change(field='num_train_steps', old=4, new=8)]
  """
  changes = config_changes(saved_config, new_config)
  conflicts = _incompatible_changes(changes)
  if saved_info and new_info and saved_info.get("num_classes") != new_info.get(
      "num_classes"):
    conflicts.append(Change("num_classes", saved_info.get("num_classes"),
                            new_info.get("num_classes")))
  if conflicts:
    raise RunDirConflictError(_conflict_message(workdir, conflicts))
  return [c for c in changes if c not in conflicts]


def check_run_dir(workdir: str, config: ConfigLike,
                  dataset_info: Optional[Mapping[str, Any]] = None) -> list[Change]:
  """check_compatible against the run saved in `workdir` ([] for a new workdir).

  Reads only; call it before anything is written into `workdir`. Example::

      changes = rundir.check_run_dir("workdir/tformer_s", config)
  """
  if not is_run_dir(workdir):
    return []
  saved_info = (load_dataset_info(workdir)
                if dataset_info and os.path.exists(dataset_info_path(workdir)) else None)
  return check_compatible(load_config_dict(workdir), config, saved_info=saved_info,
                          new_info=dataset_info, workdir=workdir)


# ----------------------------------------------------------------------------------
# Writers.


def atomic_write_text(path: str, text: str) -> None:
  """Writes `path` so that a crash leaves either the old or the new file, whole."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are for everyone.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_run_files(workdir: str, config: ConfigLike,
                    dataset_info: Mapping[str, Any],
                    changes: Sequence[Change] = (),
                    step: Optional[int] = None) -> None:
  """Writes config.json and dataset_info.json atomically; records `changes`.

  Call it on process 0 only, after :func:`check_run_dir` returned `changes`.
  `step` (default: the newest checkpoint) is stored with the changes.

  Example::

      rundir.write_run_files("/tmp/run", config, {"name": "digits",
                             "num_classes": 10, "label_names": [...], ...})
  """
  os.makedirs(workdir, exist_ok=True)
  if isinstance(config, ml_collections.ConfigDict):
    config_text = config.to_json_best_effort(indent=2)
  else:
    config_text = json.dumps(dict(config), indent=2, default=str)
  atomic_write_text(config_path(workdir), config_text)
  atomic_write_text(dataset_info_path(workdir),
                    json.dumps(dict(dataset_info), indent=2))
  if changes:
    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "step": newest_step(workdir) if step is None else step,
        "changes": {c.field: [c.old, c.new] for c in changes}}
    # One short line per append: a crash can at worst cut the last line.
    with open(config_history_path(workdir), "a") as f:
      f.write(json.dumps(record, default=str) + "\n")
