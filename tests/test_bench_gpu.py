"""bench_gpu's parts that run without a GPU: the kernel classes and the trace reading."""

import gzip
import json

import pytest

from vit_edge.tools import bench_gpu


@pytest.mark.parametrize("name,kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("gemm_fusion_dot_12", "matmul"),
    ("loop_convert_fusion_3", "other fusion"),
    ("input_reduce_fusion_1", "reduction"),
    ("loop_transpose_fusion", "transpose / copy"),
    ("MemcpyH2D", "transpose / copy"),
    ("rng_bit_generator", "other"),
])
def test_kernel_kind(name, kind):
  assert bench_gpu.kernel_kind(name) == kind


def test_kernel_seconds_sums_device_events_only(tmp_path):
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
      {"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "dur": 9000},
      {"ph": "X", "pid": 2, "tid": 7, "name": "loop_add_fusion", "dur": 250},
      {"ph": "X", "pid": 2, "tid": 8, "name": "loop_add_fusion", "dur": 250},
      {"ph": "X", "pid": 2, "tid": 7, "name": "sm90_xmma_gemm_bf16", "dur": 1500},
  ]
  run = tmp_path / "plugins" / "profile" / "run1"
  run.mkdir(parents=True)
  with gzip.open(run / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  seconds = bench_gpu.kernel_seconds(str(tmp_path))
  assert seconds == pytest.approx({"loop_add_fusion": 5e-4, "sm90_xmma_gemm_bf16": 1.5e-3})
  table = bench_gpu.kernel_table(seconds, top=1)
  assert "| matmul | 0.0015 | 75.0% |" in table
  assert "| other fusion | 0.0005 | 25.0% |" in table
  assert sum("sm90_xmma_gemm_bf16" in line for line in table) == 1


def test_kernel_seconds_without_a_trace_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz under"):
    bench_gpu.kernel_seconds(str(tmp_path))


def test_unknown_framework_is_a_clear_error(capsys):
  assert bench_gpu.main(["--frameworks=jax,tensorflow"]) == 2
  assert "unknown ['tensorflow']" in capsys.readouterr().err


def test_unknown_model_and_bad_counts_are_clear_errors(capsys):
  assert bench_gpu.main(["--models=deit_nonexistent"]) == 2
  assert "--models: Unknown model name 'deit_nonexistent'" in capsys.readouterr().err
  assert bench_gpu.main(["--models=deit_tiny_patch16", "--steps=0"]) == 2
  assert "--steps must be >= 1" in capsys.readouterr().err
