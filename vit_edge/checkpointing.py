"""Orbax checkpoints: periodic save, keep the last N plus the best, auto-resume, and
fine-tuning initialisation from another run (``config.init_from``).

A save is atomic (Orbax writes to a temporary directory and renames it), so a run
killed at any moment keeps every checkpoint that had finished; the unfinished
temporary directory is removed on the next start.

A save that fails (disk full, permissions, ...) raises :class:`CheckpointSaveError`
at the next step at the latest (saves run in the background), after the save in
flight is over; its one-line message names the cause, the path and the newest
intact checkpoint. The directory is probed for writing before training starts.
Orbax's own tracebacks of a failed save go to the log file, not the console.

Example::

    manager = CheckpointManager("/tmp/run/checkpoints", config.checkpoint)
    manager.save(step, state, {"eval/top1": 0.93})
    state = manager.restore_latest(abstract_state, shardings)
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import sys
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy
# No public API unblocks the threads of a save that failed (see
# CheckpointManager._release_waiting_threads).
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.futures import synchronization

from vit_edge import rundir
from vit_edge.compress import qat

# The metric that ranks checkpoints for "keep the best".
BEST_METRIC = rundir.BEST_METRIC


class CheckpointSaveError(OSError):
  """A checkpoint could not be written; the message says why, where, what is kept."""


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


class _NoMetricsWarningFilter(std_logging.Filter):
  """Drops Orbax's warning for a save without metrics: most saves have no eval."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


class _OrbaxTracebackFilter(std_logging.Filter):
  """Keeps Orbax's tracebacks of a failed save off the console.

  One failed save logs hundreds of lines from Orbax's threads; the run reports it
  as one CheckpointSaveError line instead. Installed on the console handler only,
  so the log file (vit_edge.main's train.log) keeps them.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR:
      return True
    from_orbax = "/orbax/" in record.pathname
    # asyncio reports each failed Orbax write task again when it is collected.
    orbax_task = record.name == "asyncio" and "/orbax/" in record.getMessage()
    return not (from_orbax or orbax_task)


def _is_closed_loop_error(error: BaseException) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _quiet_closed_event_loop_errors() -> None:
  """Drops the 'Event loop is closed' reports of a failed save's writes.

  Orbax closes a failed save's event loop while TensorStore still finishes its
  other writes; each one's callback then fails and TensorStore prints the error
  through sys.excepthook (dozens of identical tracebacks; the failure itself is
  reported as a CheckpointSaveError). Other errors pass.
  """
  previous = sys.excepthook
  if getattr(previous, "quiets_closed_loop", False):
    return

  def hook(error_type, error, traceback):
    if _is_closed_loop_error(error):
      logging.debug("After a failed save: %s", error)
      return
    previous(error_type, error, traceback)

  hook.quiets_closed_loop = True
  sys.excepthook = hook


def _install_filter(target: Any, filter_class: type[std_logging.Filter]) -> None:
  """Adds one `filter_class` instance to a logger or handler (idempotent)."""
  if not any(isinstance(f, filter_class) for f in target.filters):
    target.addFilter(filter_class())


class CheckpointManager:
  """Thin wrapper over ocp.CheckpointManager with the project's retention policy.

  config fields: every_steps, keep (last N), keep_best (bool), async_save (bool).
  """

  def __init__(self, directory: str, config: ml_collections.ConfigDict):
    self.directory = os.path.abspath(directory)
    policies = [preservation_policy.LatestN(n=config.keep)]
    if config.keep_best:
      policies.append(preservation_policy.BestN(
          get_metric_fn=_best_metric, n=1,
          keep_checkpoints_without_metrics=False))
    # best_fn makes Orbax write each checkpoint's metrics to disk (it keeps them in
    # memory otherwise): without them a restarted run no longer knows which
    # checkpoint is the best and deletes it at its next save. Retention itself is
    # the preservation policy's.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_policy.AnyPreservationPolicy(policies),
        best_fn=_best_metric, best_mode="max",
        cleanup_tmp_directories=True,
        enable_async_checkpointing=config.async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._in_flight: Optional[int] = None  # Step of the save not yet checked.
    self._operation: Optional[str] = None  # Its Orbax operation id.
    _install_filter(std_logging.getLogger("absl"), _NoMetricsWarningFilter)
    _install_filter(logging.get_absl_handler(), _OrbaxTracebackFilter)
    _quiet_closed_event_loop_errors()

  def check_writable(self) -> None:
    """Fails before training when the checkpoint directory cannot be written.

    Raises:
      CheckpointSaveError: naming the directory, the cause and the fix.
    """
    probe = os.path.join(self.directory,
                         f".write_probe.{jax.process_index()}.{os.getpid()}")
    try:
      os.makedirs(self.directory, exist_ok=True)
      with open(probe, "w") as f:
        f.write("probe")
      os.remove(probe)
    except OSError as e:
      raise CheckpointSaveError(
          f"Cannot write checkpoints to {self.directory}: {_cause(e)}. Nothing was "
          f"trained. {_fix(e, self.directory)}") from None

  def save(self, step: int, state: Any, metrics: Optional[dict[str, float]]) -> None:
    """Starts saving `state` as checkpoint `step` (in the background when async).

    Raises:
      CheckpointSaveError: this save or the previous one failed.
    """
    self.wait()  # Orbax waits for the previous save anyway; its error names it.
    metrics = metrics if metrics and BEST_METRIC in metrics else None
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
                         force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._operation = _current_operation()
      self._release_waiting_threads()
      raise self._save_error(step, e) from None
    self._in_flight, self._operation = step, _current_operation()
    self.check()

  def check(self) -> None:
    """Raises CheckpointSaveError if the save in flight has failed; never blocks.

    Cheap (no device work): call it every step so that a failed background save
    stops the run within one step.
    """
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed."""
    step, self._in_flight = self._in_flight, None
    if step is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._release_waiting_threads()
      raise self._save_error(step, e) from None
    if jax.process_index() == 0 and step not in rundir.checkpoint_steps(
        self.directory):
      # Orbax logs some commit failures and carries on without the step folder.
      raise self._save_error(step, None)

  def wait_after_error(self) -> None:
    """Lets the save in flight finish when the run stops for another error.

    Keeps the newest checkpoint (often the one being written when a later step
    failed); a failure of that save is logged, not raised, so that the error that
    stopped the run is the one reported.
    """
    try:
      self.wait()
    except CheckpointSaveError as e:
      logging.error("%s", e)

  def newest_step(self) -> Optional[int]:
    """The newest complete checkpoint on disk (None when there is none)."""
    return rundir.newest_step(self.directory)

  def _release_waiting_threads(self) -> None:
    """Unblocks Orbax threads that wait for a signal the failed save never sends.

    Without this, a save that failed to create its folder leaves non-daemon
    threads waiting for Orbax's coordination timeout (5 minutes) at exit.
    """
    if self._operation is not None:
      future.set_signals(list(synchronization.HandlerAwaitableSignal),
                         operation_id=self._operation)

  def _save_error(self, step: int, error: Optional[BaseException]) -> CheckpointSaveError:
    newest = self.newest_step()
    kept = (f"the newest intact checkpoint is step {newest} "
            f"({os.path.join(self.directory, str(newest))}); rerun the same command "
            "to resume from it" if newest is not None else
            "no checkpoint was saved before it")
    cause = _cause(error) if error is not None else "the step folder was not written"
    return CheckpointSaveError(
        f"Saving checkpoint {step} to {self.directory} failed: {cause}. The run "
        f"stopped; {kept}. {_fix(error, self.directory)}")

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore_latest(self, abstract_state: Any, shardings: Any) -> Optional[Any]:
    """The newest checkpoint restored with the target shardings, or None if none."""
    if self._manager.latest_step() is None:
      return None
    return self.restore(abstract_state, shardings)

  def restore(self, abstract_state: Any, shardings: Any,
              step: Optional[int] = None) -> Any:
    """Restores `step` (newest when None); a clear error when there is none."""
    steps = self._manager.all_steps()
    if not steps:
      raise FileNotFoundError(
          f"No checkpoint in {self.directory}. Train first (python -m vit_edge.main "
          "--config=... --workdir=...) or point --workdir at a run that has one.")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; available steps: "
          f"{sorted(steps)}.")
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, shardings)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))


def _current_operation() -> str:
  return synchronization.OperationIdGenerator.get_current_operation_id()


def _errors(error: BaseException):
  """`error` and the errors it was raised from or while handling."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def _errno(error: Optional[BaseException]) -> Optional[int]:
  for e in _errors(error) if error is not None else []:
    if isinstance(e, OSError) and e.errno:
      return e.errno
    if "No space left on device" in str(e):  # TensorStore's errors carry no errno.
      return errno.ENOSPC
  return None


def _cause(error: BaseException) -> str:
  """One short line: the OS error when there is one, else the error's first line."""
  code = _errno(error)
  if code is not None:
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
  lines = str(error).strip().splitlines() or [type(error).__name__]
  first = lines[0]
  return f"{type(error).__name__}: {first[:300]}"


def _fix(error: Optional[BaseException], directory: str) -> str:
  code = _errno(error)
  if code in (errno.ENOSPC, errno.EDQUOT):
    return (f"Free space on the disk of {directory} (or lower config.checkpoint.keep), "
            "or train into a --workdir on a larger disk.")
  if code in (errno.EACCES, errno.EPERM, errno.EROFS):
    return (f"Make {directory} writable for this user, or train into another "
            "--workdir.")
  return "The full Orbax traceback is in the log file (train.log of the workdir)."


def load_state(path: str, step: Optional[int] = None) -> dict[str, Any]:
  """The raw (host numpy) train state of a checkpoint, with no target tree.

  Args:
    path: a workdir, its checkpoints/ directory, or a checkpoints/<step> directory.
    step: which step when `path` holds several (newest when None).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, rundir.STATE_ITEM)):
    if not rundir.checkpoint_steps(path):
      raise FileNotFoundError(
          f"{path!r} holds no Orbax checkpoint (expected a workdir, its checkpoints/ "
          "directory, or a checkpoints/<step> directory). Train first with "
          "python -m vit_edge.main --config=... --workdir=...")
    path = rundir.checkpoint_path(path, step)
  item = os.path.join(path, rundir.STATE_ITEM)
  return _restore_on_this_host(item)


def _restore_on_this_host(item: str) -> dict[str, Any]:
  """Restores a checkpoint item onto one local device, whatever topology saved it.

  Without a target Orbax reuses the saving run's shardings, which fails on a
  machine with another device count (a run trained on 8 devices, exported or used
  as a teacher on 1).
  """
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(item))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  return ocp.StandardCheckpointer().restore(item, target)


def load_params(path: str) -> dict[str, Any]:
  """The raw params of the newest checkpoint under `path` (see load_state)."""
  return load_state(path)["params"]


def init_from(state: Any, path: str, shardings: Any, grid: int) -> Any:
  """Copies the params and BatchNorm statistics of another run into `state`.

  For fine-tuning. Variables with equal shapes are copied, BatchNorm running
  statistics (``batch_stats``) included, so a fine-tune of EdgeViT or MobileViTv2
  continues from the pretrained statistics instead of fresh ones. Where shapes
  differ, the classifier head (any variable under a module whose name starts with
  "head") keeps its fresh initialisation (a different class count), and ViT
  position embeddings are resized to the new `grid` x `grid` patch grid; any other
  mismatch is an error.

  Example::

    state = init_from(fresh_state, "workdir/pretrained", state_shardings, grid=14)
  """
  loaded = load_state(path)
  new_state = dict(state)
  for collection in ("params", "batch_stats"):
    if not state.get(collection):
      continue
    merged = merge_for_fine_tuning(state[collection], loaded.get(collection) or {},
                                    path, collection, grid)
    new_state[collection] = jax.tree_util.tree_map(
        lambda x, s: jax.device_put(jnp.asarray(x), s), merged, shardings[collection])
  if state["ema_params"]:
    new_state["ema_params"] = jax.tree_util.tree_map(jnp.copy, new_state["params"])
  return new_state


# Where a dense-prediction model (vit_edge.models.segmentation) keeps its backbone.
BACKBONE = "backbone"


def merge_for_fine_tuning(new_tree: Any, old_tree: Any, path: str, collection: str,
                           grid: int) -> Any:
  """`new_tree` with each variable taken from `old_tree` by init_from's rules.

  Equal shapes are copied, a ViT ``pos_embed`` is resized to `grid`, a head of
  another shape stays as in `new_tree`; anything else is a ValueError naming the
  variable. A model whose variables live under ``backbone/`` (segmentation) takes
  a classification run of its backbone: ``backbone/x`` from the run's ``x``, its
  decoder heads fresh (the run's classifier head is not used). Also used to place
  imported PyTorch weights into a fresh train state.
  Example: ``merge_for_fine_tuning(state["params"], old_params, "run", "params", 14)``.
  """
  from vit_edge.models import vit  # pylint: disable=g-import-not-at-top

  flat_old = ocp.tree.to_flat_dict(old_tree) if old_tree else {}
  flat_new = ocp.tree.to_flat_dict(new_tree)
  # A dense-prediction model (params under "backbone/" and its heads) initialised
  # from a classification run of its backbone: the run's variables go under
  # "backbone/", the decoder heads keep their fresh initialisation.
  into_backbone = (any(k[0] == BACKBONE for k in flat_new)
                   and not any(k[0] == BACKBONE for k in flat_old))
  merged = {}
  for key, new in flat_new.items():
    old_key = key[1:] if into_backbone and key[0] == BACKBONE else key
    old = flat_old.get(old_key)
    name = f"{collection}/{'/'.join(key)}"
    if old is None and into_backbone and key[0] != BACKBONE:
      merged[key] = np.asarray(new)  # A head the classification run does not have.
      continue
    if old is None and collection == "batch_stats" and qat.is_range_statistic(key):
      merged[key] = np.asarray(new)  # QAT ranges of a float run: start empty.
      continue
    if old is None:
      raise ValueError(f"init_from={path!r} has no variable "
                       f"{collection}/{'/'.join(old_key)} (for {name}); it was "
                       "trained with another architecture. init_from takes a run "
                       "of the same model, or of the backbone of a segmentation "
                       "model.")
    old = np.asarray(old)
    if old.shape == new.shape:
      merged[key] = old
    elif key[-1] == "pos_embed":
      num_prefix = new.shape[1] - grid * grid
      old_grid = int(round((old.shape[1] - num_prefix) ** 0.5))
      merged[key] = np.asarray(vit.resize_pos_embed(
          jnp.asarray(old), (old_grid, old_grid), (grid, grid), num_prefix))
      logging.info("init_from: resized %s from %s to %s.", name, old.shape, new.shape)
    elif any(k.startswith("head") for k in key):
      merged[key] = np.asarray(new)
      logging.info("init_from: %s re-initialised (%s -> %s).", name, old.shape,
                   new.shape)
    else:
      raise ValueError(f"init_from: {name} has shape {old.shape} in {path!r} but "
                       f"{new.shape} in this model.")
  if into_backbone:
    logging.info("init_from: %s/backbone from the classification run %r; %s "
                 "initialised fresh.", collection, path,
                 ", ".join(sorted({k[0] for k in flat_new if k[0] != BACKBONE})))
  return ocp.tree.from_flat_dict(merged, target=new_tree)
