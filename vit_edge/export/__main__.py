"""``python -m vit_edge.export``: see :mod:`vit_edge.export.cli`."""

import sys

from vit_edge.export import cli

if __name__ == "__main__":
  sys.exit(cli.run())
