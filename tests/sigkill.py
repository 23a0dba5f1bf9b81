"""Shared check: a run killed with SIGKILL after a checkpoint resumes to the same end.

Usage (``main_cmd(workdir, *flags)`` returns a ``python -m vit_edge.main`` argv)::

    sigkill.assert_resume_matches_uninterrupted(main_cmd, tmp_path, flags, kill_at=4,
                                                final_step=8, cwd=REPO)
"""

import json
import os
import signal
import subprocess
import time

import pytest


def _final_metrics(proc: subprocess.CompletedProcess) -> dict:
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_resume_matches_uninterrupted(main_cmd, tmp_path, flags, *, kill_at: int,
                                        final_step: int, cwd: str,
                                        timeout: float = 900) -> None:
  """Straight run vs a run killed once checkpoint `kill_at` exists, then resumed."""
  run = lambda workdir: subprocess.run(main_cmd(workdir, *flags), capture_output=True,
                                       text=True, cwd=cwd, timeout=timeout)
  expected = _final_metrics(run(tmp_path / "straight"))

  killed_dir = tmp_path / "killed"
  victim = subprocess.Popen(main_cmd(killed_dir, *flags), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)
  deadline = time.time() + timeout
  while not (killed_dir / "checkpoints" / str(kill_at)).is_dir():
    assert victim.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.communicate()
  saved = sorted(int(d) for d in os.listdir(killed_dir / "checkpoints") if d.isdigit())
  assert kill_at in saved and final_step not in saved, saved

  resumed = run(killed_dir)
  assert "Resumed from" in resumed.stderr
  final = _final_metrics(resumed)
  assert final["step"] == final_step
  for key in ("eval/loss", "eval/top1"):
    assert final[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)
