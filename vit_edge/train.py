"""The training and evaluation loop: pure, jitted, sharded steps over a dict state.

``train_and_evaluate(config, workdir)`` trains `config.model` on `config.dataset`,
evaluates top-1/top-5 (raw and EMA parameters), writes TensorBoard scalars, and
checkpoints with Orbax into ``workdir/checkpoints`` (last N plus the best), resuming
automatically from the newest checkpoint there. ``evaluate(config, workdir)`` scores
a saved checkpoint.

The train state is a plain dict pytree::

    {"step": int32, "params": ..., "batch_stats": ..., "opt_state": ...,
     "ema_params": ...}

Example::

    from configs import tformer_s
    train_and_evaluate(tformer_s.get_config(), "/tmp/tformer_s")
"""

import functools
import io
import math
import os
import sys
import time
from typing import Any, Iterator, Optional, TextIO

from absl import logging
from clu import metric_writers
from clu import metrics as clu_metrics
from clu import parameter_overview
from clu import periodic_actions
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_edge import augment
from vit_edge import checkpointing
from vit_edge import hugepages
from vit_edge import input_pipeline
from vit_edge import models
from vit_edge import objectives
from vit_edge import optimizer
from vit_edge import rundir
from vit_edge import sharding
from vit_edge import xla_flags
from vit_edge.compress import qat
from vit_edge.segmentation import metrics as segmentation_metrics

State = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def train_metrics_class(objective_metrics: tuple[str, ...]) -> type[clu_metrics.Collection]:
  """A clu Collection of the objective's metrics (averaged) plus optimiser scalars.

  Built from the names an objective declares, so a new objective logs its own
  metrics without a new class here.
  """
  fields = {name: clu_metrics.Average.from_output(name) for name in objective_metrics}
  fields["grad_norm"] = clu_metrics.Average.from_output("grad_norm")
  fields["learning_rate"] = clu_metrics.LastValue.from_output("learning_rate")
  return clu_metrics.Collection.create(**fields)


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  top1: clu_metrics.Average.from_output("top1")
  top5: clu_metrics.Average.from_output("top5")


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The registry model named by config.model, with the config's overrides."""
  if config.dtype not in _DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}; expected one of {list(_DTYPES)}.")
  # ViTs check their own size against the (possibly overridden) patch size, which
  # the registry's stride does not follow.
  if not models.get_model_info(config.model).fixed_resolution:
    models.check_image_size(config.model, config.image_size, "config.image_size")
  return models.create_model_at_size(
      config.model, config.image_size, num_classes=num_classes,
      dtype=_DTYPES[config.dtype], **dict(config.get("model_overrides", {})))


def _variables(state: State, params: Any) -> dict[str, Any]:
  variables = {"params": params}
  if state["batch_stats"]:
    variables["batch_stats"] = state["batch_stats"]
  return variables


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the true class is among the k highest logits (no sort: a rank count).

  Ties rank like argmax (the lower index first): a quantised model's logits tie
  often, and counting every tie as a hit inflated its top-1 (26% vs argmax's 10%
  for a 4-step QAT run).
  """
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  lower = jnp.arange(logits.shape[-1]) < labels[:, None]
  rank = jnp.sum((logits > true_logit) | ((logits == true_logit) & lower), axis=-1)
  return (rank < k).astype(jnp.float32)


def student_loss(trainable: tuple[Any, Any], state: State, images: jax.Array,
                 targets: jax.Array, teacher: Any, dropout_rng: jax.Array, *,
                 model: nn.Module, objective: objectives.Objective):
  """The objective's loss of the student on one (mixed) batch, in train mode.

  ``trainable`` is (params, objective_params), what the step differentiates.
  Returns (loss, (metrics, new batch_stats)). `train_step` takes its gradient;
  `tools/profile_train.py` times it alone (forward) and with its gradient.
  """
  params, objective_params = trainable
  mutable = ["batch_stats"] if state["batch_stats"] else []
  (logits, aux), updates = model.apply(
      _variables(state, params), images, train=True,
      rngs={"dropout": dropout_rng}, mutable=mutable)
  loss, metrics = objective(logits.astype(jnp.float32), aux, targets, teacher,
                            objective_params)
  return loss, (metrics, updates.get("batch_stats", state["batch_stats"]))


def train_step(state: State, batch: dict[str, jax.Array], teacher_variables: Any, *,
               model: nn.Module, objective: objectives.Objective,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               config: ml_collections.ConfigDict, num_classes: int,
               metrics_class: type[clu_metrics.Collection]):
  """One optimisation step; a pure function of (state, batch, frozen teacher).

  The objective owns the loss: it sees the student's logits and intermediates, the
  (mixed) targets and the teacher's outputs on the same images, and names its
  metrics. Its learned parameters (``state["objective_params"]``) are optimised
  with the model's. Returns (state, metrics).
  """
  rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])
  mix_rng, dropout_rng = jax.random.split(rng)
  aug = config.aug
  images, targets = augment.mixup_cutmix(
      mix_rng, batch["image"], batch["label"], num_classes,
      mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha,
      mixup_prob=aug.mixup_prob, mixup_switch_prob=aug.mixup_switch_prob,
      label_smoothing=config.label_smoothing)
  teacher = objective.teacher_outputs(teacher_variables, images)

  trainable = (state["params"], state["objective_params"])
  (_, (metrics, batch_stats)), grads = jax.value_and_grad(student_loss, has_aux=True)(
      trainable, state, images, targets, teacher, dropout_rng, model=model,
      objective=objective)
  updates, opt_state = tx.update(grads, state["opt_state"], trainable)
  params, objective_params = optax.apply_updates(trainable, updates)
  new_state = dict(state, step=state["step"] + 1, params=params,
                   objective_params=objective_params, opt_state=opt_state,
                   batch_stats=batch_stats)
  if config.ema_decay > 0:
    new_state["ema_params"] = optimizer.ema_update(
        state["ema_params"], params, config.ema_decay)
  metrics = metrics_class.single_from_model_output(
      **metrics, grad_norm=optimizer.global_norm(grads),
      learning_rate=schedule(state["step"]))
  return new_state, metrics


# What evaluation reads of a train state: no optimiser state, no objective parameters.
EVAL_KEYS = ("step", "params", "batch_stats", "ema_params")


def eval_step(state: State, batch: dict[str, jax.Array], *, model: nn.Module,
              use_ema: bool) -> EvalMetrics:
  """Masked loss / top-1 / top-5 of one batch (padding rows have mask 0).

  `state` holds the EVAL_KEYS entries of a train state.
  """
  params = state["ema_params"] if use_ema else state["params"]
  logits, _ = model.apply(_variables(state, params), batch["image"], train=False)
  logits = logits.astype(jnp.float32)
  labels = batch["label"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  mask = batch["mask"]
  return EvalMetrics.single_from_model_output(
      loss=loss, top1=topk_correct(logits, labels, 1),
      top5=topk_correct(logits, labels, min(5, logits.shape[-1])), mask=mask)


# config.task -> its eval step (same signature as `eval_step`), built from the data
# set's DatasetInfo. A task returns metrics that merge over batches and compute to
# a dict of scalars; the loop, the checkpoints and `evaluate` stay task-agnostic.
EVAL_TASKS = {
    "classification": lambda ds_info: eval_step,
    "segmentation": lambda ds_info: segmentation_metrics.SegmentationEval(
        ds_info.num_classes, ds_info.label_names).eval_step,
}


def task_eval_step(config: ml_collections.ConfigDict, ds_info: Any):
  """The eval step of ``config.task`` ("classification" when unset)."""
  task = config.get("task", "classification")
  if task not in EVAL_TASKS:
    raise ValueError(f"config.task={task!r}; expected one of {sorted(EVAL_TASKS)}.")
  return EVAL_TASKS[task](ds_info)


def create_state(rng: jax.Array, *, model: nn.Module, objective: objectives.Objective,
                 tx, image_size: int, ema: bool) -> State:
  """A fresh train state (used under jit with out_shardings: params born sharded)."""
  # The model keeps `rng` itself, so runs without objective parameters initialise
  # exactly as before objectives existed.
  variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  params = variables["params"]
  objective_params = objective.init_params(jax.random.fold_in(rng, 1))
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "objective_params": objective_params,
      "batch_stats": variables.get("batch_stats", {}),
      "opt_state": tx.init((params, objective_params)),
      "ema_params": jax.tree_util.tree_map(jnp.copy, params) if ema else {},
  }


class Trainer:
  """Everything derived from (config, workdir) that the loop and `evaluate` share.

  ``trainer.train_step(state, batch)`` and ``trainer.eval_steps[use_ema](state,
  batch)`` are the jitted, sharded steps; ``trainer.fresh_state()`` a new state.
  Example (one step on a batch, as the throughput benchmark does)::

      trainer = Trainer(config, "/tmp/run")
      state = trainer.fresh_state()
      with jax.set_mesh(trainer.mesh):
        state, metrics = trainer.train_step(state, global_batch)
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               for_training: bool = True):
    """With ``for_training=False`` (evaluation) no teacher is loaded: evaluation
    needs only the student, so a distilled run evaluates without its teacher."""
    xla_flags.apply_defaults()  # Notebooks and tools come here, not via main.
    self.config = config
    self.workdir = workdir
    self.mesh = sharding.create_mesh(config.mesh)
    if jax.default_backend() == "cpu":
      hugepages.log_hint_if_missing()  # A notebook cannot restart to set it.
    self.local_batch, self.local_eval_batch = sharding.check_batch_sizes(
        config, self.mesh)
    self.ds_info = input_pipeline.get_info(config)
    self.model_info = models.get_model_info(config.model)
    self.dataset_info = {
        "name": self.ds_info.name, "num_classes": self.ds_info.num_classes,
        "label_names": list(self.ds_info.label_names or []),
        "image_size": config.image_size, "mean": list(self.model_info.mean),
        "std": list(self.model_info.std)}
    # Refuses a workdir of another experiment before anything is written to it.
    self.run_changes = rundir.check_run_dir(workdir, config, self.dataset_info)
    if for_training:
      self.objective, teacher_variables = objectives.create_objective(
          config, student_image_size=config.image_size,
          student_mean=self.model_info.mean, student_std=self.model_info.std)
    else:
      self.objective, teacher_variables = objectives.label_only(), {}
    self.model = qat.adapt(self.objective.adapt_student(
        build_model(config, self.ds_info.num_classes)), config)
    self.objective.bind_shapes(self.model, config.image_size, teacher_variables)
    steps_per_epoch = max(1, self.ds_info.num_train_examples // config.batch_size)
    self.num_train_steps = (config.num_train_steps if config.num_train_steps > 0
                            else int(math.ceil(config.num_epochs * steps_per_epoch)))
    optim = ml_collections.ConfigDict(config.optim)
    if optim.get("warmup_epochs", 0) and not optim.get("warmup_steps", 0):
      optim.warmup_steps = int(optim.warmup_epochs * steps_per_epoch)
    self.tx, self.schedule = optimizer.create_optimizer(optim, self.num_train_steps)

    init = functools.partial(create_state, model=self.model, objective=self.objective,
                             tx=self.tx, image_size=config.image_size,
                             ema=config.ema_decay > 0)
    rng = jax.random.key(config.seed)
    self.abstract_state = jax.eval_shape(init, rng)
    self.state_shardings = sharding.param_shardings(self.abstract_state, self.mesh)
    self._init = jax.jit(init, out_shardings=self.state_shardings)
    self._rng = rng
    # Built once: each iteration is a fresh pass over the (cached) eval split.
    self.eval_batches = input_pipeline.create_eval_iterator(
        config, mean=self.model_info.mean, std=self.model_info.std,
        local_batch_size=self.local_eval_batch,
        process_index=jax.process_index(), process_count=jax.process_count())
    self.checkpoints = checkpointing.CheckpointManager(
        rundir.checkpoints_dir(workdir), config.checkpoint)

    replicated = sharding.replicated(self.mesh)
    batch_sharding = sharding.batch_sharding(self.mesh)
    # The frozen teacher is an argument of the step, not part of the state: never
    # optimised, never checkpointed.
    teacher_shardings = sharding.param_shardings(teacher_variables, self.mesh)
    self.teacher_variables = jax.device_put(teacher_variables, teacher_shardings)
    self.metrics_class = train_metrics_class(self.objective.metric_names())
    self._train_step = jax.jit(
        functools.partial(train_step, model=self.model, objective=self.objective,
                          tx=self.tx, schedule=self.schedule, config=config,
                          num_classes=self.ds_info.num_classes,
                          metrics_class=self.metrics_class),
        in_shardings=(self.state_shardings, batch_sharding, teacher_shardings),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=0)
    self.eval_shardings = {k: self.state_shardings[k] for k in EVAL_KEYS}
    self.eval_steps = {
        use_ema: jax.jit(
            functools.partial(task_eval_step(config, self.ds_info), model=self.model,
                              use_ema=use_ema),
            in_shardings=(self.eval_shardings, batch_sharding),
            out_shardings=replicated)
        for use_ema in (False, True)}

  def train_step(self, state: State, batch: dict[str, jax.Array]):
    """The jitted step with this run's frozen teacher (if any): (state, metrics)."""
    return self._train_step(state, batch, self.teacher_variables)

  def fresh_state(self) -> State:
    """A newly initialised state, born sharded (no checkpoint, no init_from)."""
    return self._init(self._rng)

  def initial_state(self) -> State:
    """The newest checkpoint in the workdir, else config.init_from, else fresh init."""
    restored = self.checkpoints.restore_latest(self.abstract_state,
                                               self.state_shardings)
    if restored is not None:
      logging.info("Resumed from %s at step %d.", self.checkpoints.directory,
                   int(restored["step"]))
      return restored
    state = self.fresh_state()
    if self.config.init_from:
      state = checkpointing.init_from(
          state, self.config.init_from, self.state_shardings,
          grid=self.config.image_size // self.model_info.stride)
    return state

  def evaluate(self, state: State) -> dict[str, float]:
    """top1 / top5 / loss on the eval split, raw and (if kept) EMA parameters."""
    state = {k: state[k] for k in EVAL_KEYS}
    results = {}
    variants = [("eval", False)] + ([("eval_ema", True)]
                                    if self.config.ema_decay > 0 else [])
    for prefix, use_ema in variants:
      total = None
      for batch in self.eval_batches:
        m = self.eval_steps[use_ema](state, sharding.make_global_batch(batch, self.mesh))
        total = m if total is None else total.merge(m)
      for k, v in total.compute().items():
        results[f"{prefix}/{k}"] = float(v)
    return results

  def write_run_files(self) -> None:
    """config.json and dataset_info.json: what export and evaluation need later."""
    if jax.process_index() != 0:
      return
    rundir.write_run_files(self.workdir, self.config, self.dataset_info,
                           self.run_changes)


# Evaluations per run when config.eval_every_steps <= 0: enough points for a curve.
DEFAULT_EVALS_PER_RUN = 6
# Seconds between progress lines: a live line on a terminal; plain lines (log
# files, notebooks) less often.
_PROGRESS_SECS_LIVE = 1.0
_PROGRESS_SECS_PLAIN = 30.0


def eval_every_steps(config: ml_collections.ConfigDict, num_train_steps: int) -> int:
  """config.eval_every_steps, or DEFAULT_EVALS_PER_RUN evenly spaced when <= 0.

  Example: ``eval_every_steps(config, 176) == 30`` when the config leaves it at -1.
  """
  if config.eval_every_steps > 0:
    return config.eval_every_steps
  return max(1, math.ceil(num_train_steps / DEFAULT_EVALS_PER_RUN))


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return (f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours
          else f"{rest // 60}:{rest % 60:02d}")


class Progress:
  """A progress line on stderr: step, loss, images/s and ETA.

  On a terminal one live line is redrawn (carriage return) every second;
  otherwise (a log file, a notebook run by nbclient) a plain line is printed
  every 30 s. Both print a finished line at each log step. The rate leaves out the first step of a start (compilation).

  Example::

      progress = Progress(total_steps=176, start_step=0, batch_size=64)
      progress.update(step=10, loss=1.93)  # Printed when due.
      progress.update(step=50, loss=1.20, commit=True)  # A log step: printed.
      progress.close()
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int,
               stream: Optional[TextIO] = None):
    self.stream = stream or sys.stderr
    self.live = bool(getattr(self.stream, "isatty", lambda: False)())
    self.interval = _PROGRESS_SECS_LIVE if self.live else _PROGRESS_SECS_PLAIN
    self.total_steps, self.batch_size = total_steps, batch_size
    self._timed_from: Optional[tuple[int, float]] = None
    self._last_print = time.monotonic()
    self._width = 0

  def update(self, step: int, loss: Optional[float], commit: bool = False) -> None:
    """Prints when the interval has passed; cheap otherwise.

    `commit` (log steps) prints a finished line at once, also on a terminal, so
    that the log lines that follow (eval results) do not overwrite it.
    """
    now = time.monotonic()
    if self._timed_from is None:
      self._timed_from = (step, now)
    if not commit and now - self._last_print < self.interval:
      return
    self._last_print = now
    line = self.line(step, loss, now)
    if self.live:
      self.stream.write("\r" + line.ljust(self._width) + ("\n" if commit else ""))
      self._width = 0 if commit else len(line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def line(self, step: int, loss: Optional[float], now: float) -> str:
    parts = [f"step {step}/{self.total_steps}"]
    if loss is not None:
      parts.append(f"loss {loss:.4f}")
    first_step, first_time = self._timed_from or (step, now)
    if step > first_step and now > first_time:
      steps_per_sec = (step - first_step) / (now - first_time)
      parts.append(f"{steps_per_sec * self.batch_size:.1f} img/s")
      parts.append(f"ETA {_duration((self.total_steps - step) / steps_per_sec)}")
    return "train: " + ", ".join(parts)

  def close(self) -> None:
    if self.live and self._width:
      self.stream.write("\n")
      self.stream.flush()


class NonFiniteWatch:
  """Finds the first step whose loss or gradient norm is not finite.

  Each step's loss and gradient norm are read one step late (``push``), when the
  device has finished that step while it runs the next one: exact to the step,
  without stalling the pipeline. ``check_now`` reads the pending step at once;
  the loop calls it before anything is logged, evaluated or saved, so a
  non-finite state is never saved.
  """

  def __init__(self):
    self._pending: Optional[tuple[int, Any]] = None
    self.last_finite: Optional[tuple[int, float]] = None  # (step, loss)
    self.bad: Optional[tuple[int, float, float]] = None  # (step, loss, grad norm)

  def push(self, step: int, metrics: Any) -> bool:
    """Checks the previous step, then holds this one. True if a step was bad."""
    bad = self.check_now()
    self._pending = (step, metrics)
    return bad

  def check_now(self) -> bool:
    if self._pending is None or self.bad is not None:
      return self.bad is not None
    step, metrics = self._pending
    self._pending = None
    loss, grad_norm = (float(t) / float(c) for t, c in jax.device_get(
        ((metrics.loss.total, metrics.loss.count),
         (metrics.grad_norm.total, metrics.grad_norm.count))))
    if np.isfinite(loss) and np.isfinite(grad_norm):
      self.last_finite = (step, loss)
      return False
    self.bad = (step, loss, grad_norm)
    return True

  @property
  def last_loss(self) -> Optional[float]:
    return self.last_finite[1] if self.last_finite else None


def nonfinite_message(watch: NonFiniteWatch, config: ml_collections.ConfigDict,
                      newest_checkpoint: Optional[int], checkpoint_dir: str) -> str:
  """The one-line report of a non-finite loss or gradient, with advice that fits."""
  step, loss, grad_norm = watch.bad
  what = (f"the training loss was {loss} at step {step} (gradient norm {grad_norm})"
          if not np.isfinite(loss) else
          f"the gradient norm was {grad_norm} at step {step} (loss {loss:.4g})")
  if watch.last_finite:
    last_step, last_loss = watch.last_finite
    history = f"the last finite loss was {last_loss:.4g} at step {last_step}"
  else:
    history = "it was the first step of this start"
  if newest_checkpoint is None:
    kept, resume = "no checkpoint had been saved yet", ""
  else:
    kept = (f"the newest checkpoint is step {newest_checkpoint} "
            f"({os.path.join(checkpoint_dir, str(newest_checkpoint))})")
    resume = "; a rerun with it resumes from that checkpoint"
  lr = config.optim.lr
  advice = [f"lower the learning rate (e.g. --config.optim.lr={lr / 4:g}, now "
            f"{lr:g}{resume})"]
  if not config.optim.grad_clip_norm or config.optim.grad_clip_norm <= 0:
    # rundir refuses it in the same workdir: the optimizer state changes.
    advice.append("clip gradients (--config.optim.grad_clip_norm=1.0, now off; in a "
                  "new --workdir)")
  if config.dtype == "bfloat16":
    advice.append("compute in float32 (--config.dtype=float32)")
  return (f"Training stopped: {what}; {history}. No non-finite state was saved; "
          f"{kept}. To fix: " + "; ".join(advice) + ".")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains and evaluates; resumes from workdir/checkpoints. Returns the final metrics.

  Failures stop the run with one error, after the checkpoint being written has
  finished, so every complete checkpoint stays: CheckpointSaveError (a save
  failed or the directory is not writable; checked before training),
  FloatingPointError (a non-finite loss or gradient, named by its step).
  """
  trainer = Trainer(config, workdir)
  trainer.checkpoints.check_writable()
  trainer.write_run_files()
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  state = trainer.initial_state()
  start_step = int(state["step"])
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
    parameter_overview.log_parameter_overview(state["params"])
  logging.info("Training %s for %d steps (start %d), %s devices, mesh %s.",
               config.model, trainer.num_train_steps, start_step, jax.device_count(),
               dict(trainer.mesh.shape))
  progress = Progress(trainer.num_train_steps, start_step, config.batch_size,
                      stream=sys.stderr if jax.process_index() == 0 else io.StringIO())
  try:
    with jax.set_mesh(trainer.mesh):
      step, eval_results = _train_loop(trainer, state, start_step, writer, progress)
  except BaseException:
    # Let the save in flight finish: it is often the newest good checkpoint.
    trainer.checkpoints.wait_after_error()
    raise
  finally:
    progress.close()
  trainer.checkpoints.wait()
  writer.flush()
  final = dict(eval_results, step=step)
  logging.info("Finished at step %d: %s", step, final)
  return final


def _train_loop(trainer: Trainer, state: State, start_step: int,
                writer: metric_writers.MetricWriter,
                progress: Progress) -> tuple[int, dict[str, float]]:
  """Steps from `start_step` to the end; returns (last step, last eval results)."""
  config = trainer.config
  train_iter: Iterator[dict[str, np.ndarray]] = input_pipeline.create_train_iterator(
      config, mean=trainer.model_info.mean, std=trainer.model_info.std,
      local_batch_size=trainer.local_batch, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  report = periodic_actions.ReportProgress(
      num_train_steps=trainer.num_train_steps, writer=writer)
  eval_every = eval_every_steps(config, trainer.num_train_steps)
  watch = NonFiniteWatch()
  train_metrics, last_log = None, (start_step, time.time())
  eval_results: dict[str, float] = {}
  step = start_step
  for step in range(start_step + 1, trainer.num_train_steps + 1):
    batch = sharding.make_global_batch(next(train_iter), trainer.mesh)
    state, m = trainer.train_step(state, batch)
    train_metrics = m if train_metrics is None else train_metrics.merge(m)
    if watch.push(step, m):
      _stop_on_nonfinite(trainer, watch)
    trainer.checkpoints.check()  # A failed background save stops the run here.
    report(step)
    is_last = step == trainer.num_train_steps
    log_now = step % config.log_every_steps == 0 or is_last
    eval_now = step % eval_every == 0 or is_last
    save_now = step % config.checkpoint.every_steps == 0 or is_last
    if (log_now or eval_now or save_now) and watch.check_now():
      _stop_on_nonfinite(trainer, watch)
    progress.update(step, watch.last_loss, commit=log_now)
    if log_now or save_now:
      scalars = {f"train/{k}": float(v) for k, v in train_metrics.compute().items()}
      now = time.time()
      scalars["train/images_per_sec"] = (
          (step - last_log[0]) * config.batch_size / max(now - last_log[1], 1e-9))
      writer.write_scalars(step, scalars)
      train_metrics, last_log = None, (step, now)
    if eval_now:
      eval_results = trainer.evaluate(state)
      writer.write_scalars(step, eval_results)
      logging.info("step %d: %s", step, eval_results)
    if save_now:
      trainer.checkpoints.save(step, state, eval_results if eval_now else None)
  if start_step >= trainer.num_train_steps:  # Already finished: just report.
    eval_results = trainer.evaluate(state)
  return step, eval_results


def _stop_on_nonfinite(trainer: Trainer, watch: NonFiniteWatch) -> None:
  # The message names the newest checkpoint: let the one being written finish.
  trainer.checkpoints.wait_after_error()
  raise FloatingPointError(nonfinite_message(
      watch, trainer.config, trainer.checkpoints.newest_step(),
      trainer.checkpoints.directory))


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None) -> dict[str, float]:
  """Evaluates the checkpoint of `step` (newest when None) in workdir/checkpoints."""
  trainer = Trainer(config, workdir, for_training=False)
  # Only what evaluation reads: a distilled run's objective parameters and optimiser
  # state are not needed (nor its teacher). Host numpy, then each process places its
  # shards.
  saved = checkpointing.load_state(workdir, step)
  host = jax.tree_util.tree_map(np.asarray, {k: saved[k] for k in EVAL_KEYS})
  state = jax.device_put(host, trainer.eval_shardings)
  with jax.set_mesh(trainer.mesh):
    results = trainer.evaluate(state)
  results["step"] = int(state["step"])
  return results


def load_trained_model(workdir: str, step: int | None = None, use_ema: bool = True):
  """A trained model for inference: (model, variables, config, dataset_info).

  Reads workdir/config.json and workdir/dataset_info.json written by training and
  the checkpoint of `step` (newest when None). With `use_ema` and an EMA in the
  checkpoint, the EMA parameters are returned. Example::

      model, variables, config, info = load_trained_model("workdir/tformer_s")
      logits, _ = model.apply(variables, images, train=False)
  """
  config = rundir.load_config(workdir)
  dataset_info = rundir.load_dataset_info(workdir)
  model = build_model(config, dataset_info["num_classes"])
  state = checkpointing.load_state(workdir, step)
  params = state["ema_params"] if use_ema and state.get("ema_params") else state["params"]
  variables = {"params": params}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  return model, variables, config, dataset_info


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
