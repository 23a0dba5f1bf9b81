"""vit_edge.tools.op_probes: each probe builds the two forms it claims to compare."""

import pytest

from vit_edge.tools import op_probes


def _batch_matmul_input_types(path):
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  from ai_edge_litert.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(f.read()))
  graph = model.subgraphs[0]
  names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
  return {names[graph.tensors[i].type] for op in graph.operators
          if flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) == "BATCH_MATMUL"
          for i in op.inputs}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("probes"))
  return {name: op_probes.build_files(name, "tiny", out) for name in op_probes.PROBES}


def test_int8_attention_compares_float_with_int8_products(files):
  a, b = files["int8_attention"]
  assert op_probes._ops(a).count("BATCH_MATMUL") == 2  # pylint: disable=protected-access
  assert _batch_matmul_input_types(a) == {"FLOAT32"}
  assert _batch_matmul_input_types(b) == {"INT8"}
  # Same computation: int8 is off by its quantisation steps, not by a wrong graph.
  assert 0 < op_probes.output_gap("int8_attention", "tiny", (a, b)) < 0.2
  assert op_probes._undelegated(b, 1)["BATCH_MATMUL"] == 2  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["pad_fusion", "pad_fusion_stem"])
def test_pad_fusion_differs_by_the_pad_alone(files, name):
  a, b = files[name]
  ops_a, ops_b = op_probes._ops(a), op_probes._ops(b)  # pylint: disable=protected-access
  assert ops_a[0] == "PAD" and ops_a[1:] == ops_b and "PAD" not in ops_b
  shape_a, shape_b = op_probes.PROBES[name].input_shapes("tiny")
  assert shape_b[1:3] == (shape_a[1] + 2, shape_a[2] + 2)


def test_silu_forms_are_equal_through_logistic_and_tanh(files):
  a, b = files["silu_forms"]
  assert "LOGISTIC" in op_probes._ops(a) and "TANH" not in op_probes._ops(a)  # pylint: disable=protected-access
  assert "TANH" in op_probes._ops(b) and "LOGISTIC" not in op_probes._ops(b)  # pylint: disable=protected-access
  assert op_probes.output_gap("silu_forms", "tiny", (a, b)) < 1e-5


def test_main_prints_one_row_per_probe_and_thread(tmp_path, capsys):
  assert op_probes.main(["--probes=silu_forms,pad_fusion", "--threads=1,2",
                         "--pairs=2", "--warmup=1", "--size=tiny",
                         f"--out_dir={tmp_path}"]) == 0
  rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| silu")
          or l.startswith("| pad")]
  assert len(rows) == 4 and "| x * sigmoid(x) | h + h * tanh(h) |" in rows[0]


@pytest.mark.parametrize("argv, named", [(["--probes=silu"], "'silu'"),
                                          (["--threads=0"], "--threads='0'"),
                                          (["--pairs=0"], "--pairs=0"),
                                          (["--out_dir=FILE"], "is a file")])
def test_bad_flags_are_named(argv, named, tmp_path):
  file = tmp_path / "notes.txt"
  file.write_text("not a folder")
  argv = [a.replace("FILE", str(file)) for a in argv]
  with pytest.raises(SystemExit, match=named):
    op_probes.main(argv + ["--size=tiny"])
