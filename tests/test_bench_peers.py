"""The peer benchmark (vit_edge.tools.bench_peers).

Its engines need the optional `.[peers]` extra (torch, timm, onnxruntime), which CI
does not install: those tests skip without it; the rest run everywhere.
"""

import json
import sys

import pytest

from vit_edge.tools import bench_peers


def _row(model, threads, ms, train=None):
  row = {"model": model, "image_size": 224, "threads": threads,
         "ms": dict(zip(bench_peers.ENGINES, ms))}
  if train:
    row["train_img_s"] = dict(zip(("jax", "torch"), train))
  return row


def test_table_gives_the_issue_ratios():
  report = {"torch_jax_max_abs_logit_diff": 2e-6,
            "tflite_int8": {"int8_activations": "dynamic", "relative_logit_error": 0.02}}
  # torch, ORT fp32, ORT int8 dynamic, ORT int8 static, TFLite fp32, TFLite int8.
  rows = [_row("deit_tiny_patch16", 1, (30.0, 10.0, 6.0, 4.0, 8.0, 3.0), (12.0, 16.0)),
          _row("deit_tiny_patch16", 2, (20.0, 6.0, 3.0, 5.0, 6.6, 1.5))]
  lines = bench_peers.table(rows, {"deit_tiny_patch16": report}).splitlines()
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
  head = cells[0]
  one, two = (dict(zip(head, c)) for c in cells[2:])
  assert one["TFLite/ORT fp32"] == "0.80" and two["TFLite/ORT fp32"] == "1.10"
  # Against the better of ONNX Runtime's two int8 forms.
  assert one["TFLite int8/best ORT int8"] == "0.75" and two["TFLite int8/best ORT int8"] == "0.50"
  assert one["JAX/torch train"] == "0.75" and two["JAX/torch train"] == "-"
  assert one["TFLite int8 form, rel. logit err"] == "dynamic, 0.020"


def test_without_the_extra_it_says_how_to_install_it(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)
  assert bench_peers.main(["--models=deit_tiny_patch16"]) == 2
  assert "pip install -e '.[peers]'" in capsys.readouterr().err


def test_a_training_turn_gets_one_model_and_all_of_its_training():
  """A parent run timing a subset of its models hands each worker one model and
  --train_models=all (a subset naming other models failed the worker's check)."""
  parent = ["--models=edgevit_xxs,tformer_s", "--train_models=tformer_s",
            "--threads=2", "--rounds=2"]
  args = bench_peers._parser().parse_args(
      bench_peers._train_turn_argv("jax", "tformer_s", parent))
  assert (args.models, args.train_models, args.train_worker) == ("tformer_s", "all", "jax")
  assert (args.threads, args.rounds) == ("2", 2)


def test_bad_arguments_are_clear_errors(capsys, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  pytest.importorskip("onnxruntime")
  out = f"--out_dir={tmp_path}"
  assert bench_peers.main(["--models=resnet50", out]) == 2
  assert "no PyTorch reference for 'resnet50'" in capsys.readouterr().err
  assert bench_peers.main(["--models=edgevit_xxs", out]) == 2
  assert "--edgevit_src=<clone>/src/edgevit.py" in capsys.readouterr().err
  assert bench_peers.main(["--models=tformer_s", "--threads=0", out]) == 2
  assert "expected counts >= 1" in capsys.readouterr().err
  assert bench_peers.main(["--models=tformer_s", "--train_models=deit_tiny_patch16",
                           out]) == 2
  assert "must be 'all' or a subset of --models" in capsys.readouterr().err


def test_a_small_run_ports_the_weights_and_times_every_engine(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  pytest.importorskip("onnxruntime")
  assert bench_peers.main(["--models=tformer_s", "--image_size=32", "--threads=1",
                           "--runs=2", "--warmup=1", "--rounds=1", "--train_steps=1",
                           "--train_batch=2", "--calibration_samples=8",
                           f"--out_dir={tmp_path}"]) == 0
  with open(tmp_path / "results.json") as f:
    result = json.load(f)
  (row,) = result["rows"]
  assert set(row["ms"]) == set(bench_peers.ENGINES) and all(row["ms"].values())
  assert set(row["train_img_s"]) == {"jax", "torch"}
  # PyTorch's TFormer and vit_edge's compute the same function on the same weights.
  assert result["reports"]["tformer_s"]["torch_jax_max_abs_logit_diff"] < 1e-4
  # Every round and training turn probed the host's speed (the stability table).
  assert len(row["host_gmacs_rounds"]) == 1 and all(row["host_gmacs_rounds"])
  assert {k: len(v) for k, v in row["train_host_gmacs_rounds"].items()} == {
      "jax": 1, "torch": 1}
  out = capsys.readouterr().out
  assert "| tformer_s | 32 | 1 |" in out and "host GMAC/s, JAX turns" in out


def test_efficiency_table_shares_of_the_gemm_peak():
  # The exporter's rewrites left the TFLite file 1.5 of the model's 2 GMAC.
  report = {"macs": 2_000_000_000, "tflite_fp32": {"macs": 1_500_000_000}}
  row = _row("deit_tiny_patch16", 1, (40.0, 20.0, 6.0, 4.0, 50.0, 3.0), (5.0, 10.0))
  row["matmul_peak_gmacs"] = {"numpy": 100.0, "torch": 80.0}
  old_row = _row("deit_tiny_patch16", 2, (20.0, 6.0, 3.0, 5.0, 6.6, 1.5))
  lines = bench_peers.efficiency_table(
      [row, old_row], {"deit_tiny_patch16": report}).splitlines()
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
  assert len(cells) == 3  # The row without a measured peak is left out.
  got = dict(zip(cells[0], cells[2]))
  assert got["GMAC/image"] == "2.00" and got["GEMM peak GMAC/s"] == "100.0"
  assert got["TFLite file GMAC/image"] == "1.50"
  # 2 GMAC in 40 / 20 ms and the file's 1.5 in 50 ms, against the faster
  # library's 100 GMAC/s.
  assert got["torch"] == "50.0 (50%)" and got["ORT fp32"] == "100.0 (100%)"
  assert got["TFLite fp32"] == "30.0 (30%)"
  # Training: 3 x 2 GMAC per image at 5 and 10 img/s.
  assert got["JAX train"] == "30.0 (30%)" and got["torch train"] == "60.0 (60%)"


def test_stability_table_warns_about_rounds_on_a_slowed_host():
  steady = _row("edgevit_xxs", 1, (30.0, 19.0, 16.0, 18.0, 15.5, 16.1), (9.0, 8.0))
  steady["host_gmacs_rounds"] = [47.0, 46.5]
  steady["train_host_gmacs_rounds"] = {"jax": [46.0, 45.9], "torch": [47.0, 46.1]}
  slowed = _row("deit_tiny_patch16", 1, (38.0, 32.0, 22.0, 27.0, 29.7, 29.8))
  slowed["host_gmacs_rounds"] = [46.8, 21.0, 47.0]  # Round 2 on a throttled host.
  old = _row("tformer_s", 2, (20.0, 6.0, 3.0, 5.0, 6.6, 1.5))  # Before the probes.
  text, warnings = bench_peers.stability_table([steady, slowed, old])
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()]
  assert len(cells) == 4  # Header, rule, and the two probed rows.
  got = dict(zip(cells[0], cells[2]))
  assert got["host GMAC/s, inference rounds"] == "46.5-47.0"
  assert got["host GMAC/s, JAX turns"] == "45.9-46.0"
  assert dict(zip(cells[0], cells[3]))["host GMAC/s, JAX turns"] == "-"
  (warning,) = warnings
  assert "deit_tiny_patch16's inference rounds 2 at 1 thread(s)" in warning
  assert "21.0 GMAC/s against the run's best 47.0" in warning
