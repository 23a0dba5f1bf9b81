"""One training run in a subprocess, for the benchmark tools (no absl flags here, so
any tool can import it).

Example::

    results, seconds = train_in_subprocess("configs/edgevit_xxs.py:fashion", "/tmp/run")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_in_subprocess(config: str, workdir: str, *config_flags: str
                        ) -> tuple[dict[str, float], float]:
  """Trains `config` (path[:arg]) into workdir: (final metrics, wall seconds).

  A finished run is not retrained (main resumes and only re-evaluates). Raises
  RuntimeError with the command and the end of its stderr when the run fails.
  """
  cmd = [sys.executable, "-m", "vit_edge.main", f"--config={config}",
         f"--workdir={workdir}", *config_flags]
  start = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1]), time.time() - start


def top1_percent(results: dict[str, float]) -> float:
  """Eval top-1 in percent, of the EMA parameters when the run kept them."""
  return 100 * results.get("eval_ema/top1", results["eval/top1"])
