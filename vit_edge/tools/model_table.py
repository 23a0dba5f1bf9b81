"""Regenerates the README's model table from the registry (never typed by hand).

Usage::

    python -m vit_edge.tools.model_table            # rewrites README.md in place
    python -m vit_edge.tools.model_table --print    # prints the table only

The table sits between the markers ``<!-- model-table:start -->`` and
``<!-- model-table:end -->``. Takes a few minutes on a 2-core CPU (every model is
compiled once at its reference resolution for XLA's cost analysis).
"""

from __future__ import annotations

import pathlib

from absl import app
from absl import flags

from vit_edge import complexity
from vit_edge import models

_PRINT = flags.DEFINE_bool("print", False, "Print the table instead of editing README.")
_README = flags.DEFINE_string(
    "readme", str(pathlib.Path(__file__).resolve().parents[2] / "README.md"),
    "README to rewrite.")

START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"


def model_table() -> str:
  """Markdown table: name, params, MACs at the reference resolution, top-1, reference."""
  rows = ["| model | params | MACs (G) | XLA FLOPs/2 (G) | res | ImageNet top-1 (published) "
          "| reference |", "|---|---:|---:|---:|---:|---:|---|"]
  for name in models.list_models():
    info = models.get_model_info(name)
    stats = complexity.model_complexity(models.create_model(name), info.image_size)
    top1 = f"{info.top1:.2f}" if info.top1 is not None else "—"
    rows.append(
        f"| {name} | {stats.params:,} | {stats.macs / 1e9:.2f} | "
        f"{stats.xla_flops / 2e9:.2f} | {info.image_size} | {top1} | {info.reference} |")
  return "\n".join(rows)


def rewrite_readme(path: pathlib.Path, table: str) -> None:
  """Replaces the text between the table markers of `path` with `table`."""
  text = path.read_text(encoding="utf-8")
  if START not in text or END not in text:
    raise ValueError(f"{path} lacks the markers {START} and {END}; add them where "
                     "the table belongs.")
  head, rest = text.split(START, 1)
  _, tail = rest.split(END, 1)
  path.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")


def main(argv):
  del argv
  table = model_table()
  if _PRINT.value:
    print(table)
  else:
    rewrite_readme(pathlib.Path(_README.value), table)
    print(f"Wrote the table of {len(models.list_models())} models to {_README.value}")


if __name__ == "__main__":
  app.run(main)
