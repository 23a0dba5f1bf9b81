"""The command line: discoverable configs, one-line errors, the run-directory guard."""

import hashlib
import logging
import os
import re
import subprocess
import sys

import pytest

from vit_edge import main
from vit_edge import rundir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "vit_edge.main", *args],
                        capture_output=True, text=True, cwd=REPO, timeout=timeout)


def _one_error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  return lines[0]


def test_config_fields_and_format():
  config = main.load_config_file(f"{TINY}:model=edgevit_xxs")
  fields = main.config_fields(config)
  assert fields["model"] == "edgevit_xxs" and fields["optim.lr"] == 1e-3
  lines = main.format_config(config).splitlines()
  assert lines == sorted(lines) and "model = 'edgevit_xxs'" in lines
  assert "data_dir = None" in lines and "init_from = ''" in lines


def test_unknown_field_names_the_close_ones():
  config = main.load_config_file(TINY)
  assert main.unknown_field_message(config, "optim.lr") is None
  assert main.unknown_field_message(config, "optim") is None
  message = main.unknown_field_message(config, "optim.lrr")
  assert message.startswith("config has no field 'optim.lrr'")
  assert "close valid names: optim.lr" in message and "--show_config" in message
  assert "close valid names: optim.lr" in main.unknown_field_message(config, "lr")
  assert "no close valid name" in main.unknown_field_message(config, "foo")


def test_missing_config_file_suggests_neighbours():
  with pytest.raises(FileNotFoundError, match=r"did you mean configs/tformer_s\.py"):
    main.load_config_file(os.path.join("configs", "tformer_z.py"))


def _record(path, message, level=logging.INFO):
  return logging.LogRecord("absl", level, path, 1, message, None, None)


def test_console_filter_keeps_noise_in_the_log_file():
  quiet, loud = main.ConsoleFilter(), main.ConsoleFilter(print_params=True)
  table = _record("/site-packages/clu/parameter_overview.py", "| head/bias | (10,) |")
  assert not quiet.filter(table) and loud.filter(table)
  writer = "/site-packages/clu/metric_writers/logging_writer.py"
  assert not quiet.filter(_record(writer, "[Hyperparameters] {...}"))
  assert quiet.filter(_record(writer, "[4] eval/top1=0.9"))
  assert quiet.filter(_record("/work/main/vit_edge/train.py", "step 4: ..."))
  assert not quiet.filter(_record("/site-packages/orbax/checkpoint/x.py", "saving"))
  assert quiet.filter(_record("/site-packages/orbax/checkpoint/x.py", "failed",
                              logging.WARNING))


@pytest.mark.parametrize("args, expected", [
    (["--config.foo=1"], "error: config has no field 'foo'"),
    (["--config.optim.lrr=1"], "close valid names: optim.lr"),
    (["--config.batch_size=abc"], "--config.batch_size=abc: invalid literal for int()"),
    (["--config=configs/nope.py"], "error: config file 'configs/nope.py' does not exist"),
    (["--config=configs/tformer_s.py:nope"], "Unknown config variant(s) ['nope']"),
    (["extra_arg"], "error: unexpected arguments ['extra_arg']"),
    (["--mode=foo"], "error: flag --mode=foo: value should be one of <train|eval>"),
])
def test_command_line_errors_are_one_line(tmp_path, args, expected):
  proc = _run(f"--config={TINY}", f"--workdir={tmp_path}", *args, timeout=300)
  assert proc.returncode == 2
  assert expected in _one_error_line(proc)
  assert not os.listdir(tmp_path)


def test_missing_config_flag_says_how():
  proc = _run(timeout=300)
  assert proc.returncode == 2
  assert "error: --config is required" in _one_error_line(proc)


def test_show_config_prints_every_field_with_overrides():
  proc = _run("--config=configs/tformer_s.py", "--config.optim.lr=0.01",
              "--show_config", timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines == sorted(lines)
  assert "optim.lr = 0.01" in lines and "model = 'tformer_s'" in lines
  assert "checkpoint.every_steps = 200" in lines


def test_user_error_is_one_line_and_verbose_adds_the_traceback(tmp_path):
  proc = _run(f"--config={TINY}", "--config.image_size=33",
              f"--workdir={tmp_path / 'run'}", timeout=300)
  assert proc.returncode == 1
  assert ("config.image_size=33 is not a positive multiple of the total stride"
          in _one_error_line(proc))
  verbose = _run(f"--config={TINY}", "--config.image_size=33", "--verbose",
                 f"--workdir={tmp_path / 'run'}", timeout=300)
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def _digest(workdir):
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs
                 if not f.startswith(("events.", rundir.LOG_FILE)))
  return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


def test_conflicting_command_leaves_a_finished_run_intact(tmp_path):
  workdir = str(tmp_path / "run")
  first = _run(f"--config={TINY}", f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-3000:]
  # The console is quiet: no parameter table, no hyper-parameter dump...
  assert "parameter_overview" not in first.stderr
  assert "[Hyperparameters]" not in first.stderr
  # ... both are in the log file.
  log = open(os.path.join(workdir, rundir.LOG_FILE)).read()
  assert "head/kernel" in log and "[Hyperparameters]" in log
  # ... and so are the XLA options the timings depend on (vit_edge.xla_flags).
  assert re.search(r"XLA_FLAGS='[^']*--xla_cpu_experimental_ynn_fusion_type=", log)
  assert re.search(r"GLIBC_TUNABLES='[^']*'", log)  # vit_edge.hugepages.
  before = _digest(workdir)

  other_model = _run(f"--config={TINY}:model=edgevit_xxs", f"--workdir={workdir}")
  assert other_model.returncode == 1
  line = _one_error_line(other_model)
  assert "model: 'tformer_s' -> 'edgevit_xxs'" in line and "new --workdir" in line
  other_size = _run(f"--config={TINY}", "--config.image_size=64",
                    f"--workdir={workdir}")
  assert f"--config.init_from={workdir}" in _one_error_line(other_size)
  assert _digest(workdir) == before

  # The finished run still evaluates and exports.
  evaluated = _run(f"--config={TINY}", f"--workdir={workdir}", "--mode=eval")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert '"step": 4' in evaluated.stdout
  from vit_edge import export  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "tiny.tflite")
  report = export.export_from_workdir(workdir, out, num_parity_samples=2,
                                      max_eval_examples=0)
  assert os.path.getsize(out) > 0 and report is not None
