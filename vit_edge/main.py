"""Command-line entry point: train (default) or evaluate a checkpoint.

Usage::

    python -m vit_edge.main --config=configs/tformer_s.py --workdir=/tmp/tformer_s
    python -m vit_edge.main --config=configs/tformer_s.py --config.batch_size=128 \
        --workdir=/tmp/tformer_s
    python -m vit_edge.main --config=configs/tformer_s.py --workdir=/tmp/tformer_s \
        --mode=eval [--step=600]
    python -m vit_edge.main --config=configs/tformer_s.py --show_config  # every field

Multi-process (one process per host, or several on one machine over loopback)::

    python -m vit_edge.main --config=... --workdir=... \
        --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0

Errors: a bad flag, an unknown config field (with the close valid names), a missing
config file and the user errors that vit_edge raises (a wrong value, a missing data
set, a workdir holding another experiment, a non-finite loss, ...) print one line
``error: ...`` and exit with status 2 (command line) or 1 (run); ``--verbose`` adds
the traceback. Anything else is a bug and keeps its traceback.

Console and log file: the console shows progress and results; the full log (also
the parameter table, the hyper-parameters and library chatter) goes to
``<workdir>/train.log``. ``--print_params`` also prints the parameter table.
"""

from __future__ import annotations

from vit_edge import hugepages

if __name__ == "__main__":
  # First, before the imports below: a restart would import them a second time
  # (jax and the rest take about 1.5 s here). glibc reads the tunable at exec.
  hugepages.restart_with_hugepages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import difflib
import importlib.util
import json
import logging as std_logging
import os
import sys
import traceback
from typing import Any, NoReturn, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from vit_edge import rundir
from vit_edge import xla_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tformer_s.py or "
    "configs/tformer_s.py:imagenet,bf16.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard logs and config.json. "
    "Defaults to ./workdir/<model>.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train and evaluate (resumes from workdir); "
                          "eval: evaluate a checkpoint of workdir.")
_STEP = flags.DEFINE_integer("step", None, "With --mode=eval: checkpoint step "
                             "(default: the newest).")
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print every config field with its value (after the "
    "--config.* overrides), one 'name = value' line each, and exit.")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Print the traceback of errors, not just one line.")
_PRINT_PARAMS = flags.DEFINE_bool(
    "print_params", False, "Also print the parameter table on the console (it "
    "always goes to <workdir>/train.log).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Simulate this many CPU devices (testing sharding).")

# Errors that vit_edge raises for a user's input; raised from our code they are
# reported in one line. The same types raised inside a library stay tracebacks.
# OSError covers checkpointing.CheckpointSaveError (disk full, unwritable directory).
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError,
               FloatingPointError, NotADirectoryError, PermissionError, OSError)
_OUR_CODE = (os.path.dirname(os.path.abspath(__file__)) + os.sep,)
_USAGE_STATUS, _RUN_STATUS = 2, 1


# ----------------------------------------------------------------------------------
# Console.


def _fail(message: str, status: int) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _first_line(error: BaseException) -> str:
  # KeyError's str() adds quotes around its message.
  text = error.args[0] if isinstance(error, KeyError) and error.args else error
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return " ".join(lines) if lines else type(error).__name__


# Modules whose INFO lines are start-up noise on a console: the full parameter
# table and hyper-parameter dump, backend probing, font caches, Orbax and
# TensorStore per-save chatter. They still reach the log file.
_FILE_ONLY_MODULES = ("parameter_overview", "logging_writer", "xla_bridge",
                      "font_manager")
_FILE_ONLY_PATHS = ("/orbax/", "/tensorstore/")


class ConsoleFilter(std_logging.Filter):
  """Keeps start-up noise (below WARNING) off the console; see _FILE_ONLY_*."""

  def __init__(self, print_params: bool = False):
    super().__init__()
    self.print_params = print_params

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    if record.module == "parameter_overview":
      return self.print_params
    if record.module == "logging_writer":
      # clu's logging writer also prints the eval scalars: keep those.
      return not record.getMessage().startswith("[Hyperparameters]")
    noisy = record.module in _FILE_ONLY_MODULES or any(
        p in record.pathname for p in _FILE_ONLY_PATHS)
    return not noisy


def _log_to_file(workdir: str) -> None:
  """Everything that is logged also goes to <workdir>/train.log (appended)."""
  os.makedirs(workdir, exist_ok=True)
  index = jax.process_index()
  name = rundir.LOG_FILE if index == 0 else f"{rundir.LOG_FILE}.process_{index}"
  handler = std_logging.FileHandler(os.path.join(workdir, name))
  handler.setFormatter(logging.PythonFormatter())
  std_logging.getLogger().addHandler(handler)


# ----------------------------------------------------------------------------------
# Flags and config.


def _config_spec(argv: Sequence[str]) -> Optional[str]:
  """The value of --config in argv (last one wins, as absl does)."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of a --config value ('path.py' or 'path.py:arg'), as absl loads it.

  Example: ``load_config_file("configs/tformer_s.py:bf16").dtype == "bfloat16"``.
  """
  path, *arg = spec.split(":", 1)
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_config_message(path))
  module_spec = importlib.util.spec_from_file_location("vit_edge_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*arg)


def _missing_config_message(path: str) -> str:
  directory = os.path.dirname(path) or "."
  candidates = sorted(os.path.join(os.path.dirname(path), f)
                      for f in (os.listdir(directory) if os.path.isdir(directory)
                                else []) if f.endswith(".py"))
  close = difflib.get_close_matches(path, candidates, n=3, cutoff=0.5)
  hint = (f"did you mean {', '.join(close)}?" if close else
          "the configs are in configs/, e.g. --config=configs/tformer_s.py")
  return f"config file {path!r} does not exist; {hint}"


def config_fields(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Every field as {"a.b.c": value}, nested ConfigDicts flattened.

  Example: ``config_fields(config)["optim.lr"] == 1e-3``.
  """
  fields = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      fields.update(config_fields(value, name + "."))
    else:
      fields[name] = value
  return fields


def format_config(config: ml_collections.ConfigDict) -> str:
  """'name = value' lines, sorted by name (strings quoted, so '' is visible)."""
  return "\n".join(f"{name} = {value!r}" if isinstance(value, str)
                   else f"{name} = {value}"
                   for name, value in sorted(config_fields(config).items()))


def _override_names(argv: Sequence[str]) -> list[str]:
  names = []
  for arg in argv:
    for prefix in ("--config.", "--noconfig."):
      if arg.startswith(prefix):
        names.append(arg[len(prefix):].split("=", 1)[0])
  return names


def unknown_field_message(config: ml_collections.ConfigDict, name: str) -> Optional[str]:
  """One line about --config.<name> when `config` has no such field, else None.

  Example: ``unknown_field_message(config, "optim.lrr")`` ->
  "config has no field 'optim.lrr' (--config.optim.lrr); close valid names:
  optim.lr, ... ; --show_config lists every field".
  """
  fields = config_fields(config)
  known = set(fields)
  for field in fields:  # Intermediate ConfigDicts are valid names too.
    parts = field.split(".")
    known.update(".".join(parts[:i]) for i in range(1, len(parts)))
  if name in known:
    return None
  close = _close_names(name, sorted(known))
  names = f"close valid names: {', '.join(close)}" if close else "no close valid name"
  return (f"config has no field {name!r} (--config.{name}); {names}; --show_config "
          "lists every field")


def _close_names(name: str, known: Sequence[str]) -> list[str]:
  """Typos among the siblings first, then the same leaf elsewhere, then anywhere."""
  parent, _, leaf = name.rpartition(".")
  siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
  close = [siblings[s] for s in difflib.get_close_matches(leaf, list(siblings), n=3,
                                                          cutoff=0.5)]
  close += [k for k in known if k.rpartition(".")[2] == leaf]  # --config.lr
  close += difflib.get_close_matches(name, known, n=3, cutoff=0.75)
  return list(dict.fromkeys(close))[:5]


def _flag_error_message(argv: Sequence[str], error: Exception) -> str:
  """The one line that explains why flag parsing failed."""
  spec = _config_spec(argv)
  if spec is None:
    if "--config=None" in str(error):
      return ("--config is required: a file of configs/, e.g. "
              "--config=configs/tformer_s.py (add --show_config to list its fields)")
    return _first_line(error)
  try:
    config = load_config_file(spec)
  except FileNotFoundError as e:
    return str(e)
  except Exception as e:  # pylint: disable=broad-except
    return f"--config={spec} failed to load: {_first_line(e)}"
  for name in _override_names(argv):
    message = unknown_field_message(config, name)
    if message:
      return message
  message = _first_line(error)
  for name in _override_names(argv):
    if f"--config.{name}=" in message and name in config_fields(config):
      value = config_fields(config)[name]
      message += f" (config.{name}: {type(value).__name__}, default {value!r})"
  return message.removeprefix("Error whilst parsing config file: ")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with every failure reported in one line (exit 2)."""
  try:
    rest = flags.FLAGS(argv)
    # config_flags defers a config file's load error to the first access.
    config = _CONFIG.value
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
      config.keys()
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if "--verbose" in argv:
      traceback.print_exc()
    _fail(_flag_error_message(argv, e), _USAGE_STATUS)
  return rest


# ----------------------------------------------------------------------------------
# Main.


def _is_user_error(error: BaseException) -> bool:
  """A USER_ERRORS type raised from vit_edge's own code (its innermost frame)."""
  if not isinstance(error, USER_ERRORS):
    return False
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OUR_CODE)


def _setup_jax() -> None:
  xla_flags.apply_defaults()  # Before the first computation starts the backend.
  if _NUM_CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
  if _COORDINATOR.value:
    # Collectives between CPU processes need gloo; harmless on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  logging.info("JAX process %d / %d, %d local devices, %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  # Refuse a workdir of another experiment before anything is written to it.
  changes = rundir.check_run_dir(workdir, config)
  if changes and _MODE.value == "train":
    logging.info("Continuing %s with changed config: %s", workdir,
                 "; ".join(str(c) for c in changes))
  # Keep TensorFlow (only used by tf.data) off the accelerators that JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  _setup_jax()
  _log_to_file(workdir)
  # Timings in this log depend on them (vit_edge.xla_flags, vit_edge.hugepages).
  logging.info("XLA_FLAGS=%r", os.environ.get("XLA_FLAGS", ""))
  logging.info("GLIBC_TUNABLES=%r", os.environ.get("GLIBC_TUNABLES", ""))
  from vit_edge import train  # pylint: disable=g-import-not-at-top
  if _MODE.value == "train":
    return train.train_and_evaluate(config, workdir)
  return train.evaluate(config, workdir, step=_STEP.value)


def main(argv):
  logging.get_absl_handler().addFilter(ConsoleFilter(_PRINT_PARAMS.value))
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; flags look like --name=value",
          _USAGE_STATUS)
  config = _CONFIG.value
  if _SHOW_CONFIG.value:
    print(format_config(config))
    return
  workdir = _WORKDIR.value or os.path.join("workdir", config.model)
  try:
    results = _run(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    if not _is_user_error(e):
      raise
    if _VERBOSE.value:
      traceback.print_exc()
    logging.get_absl_handler().flush()
    _fail(_first_line(e), _RUN_STATUS)
  if jax.process_index() == 0:
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
