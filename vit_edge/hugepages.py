"""Transparent huge pages for the buffers of XLA:CPU's train steps (glibc).

XLA:CPU allocates each execution's temporary buffer (everything a train step keeps
for its backward: 2.1 GB for EdgeViT-XXS at batch 32) with malloc and frees it when
the step ends. glibc serves an allocation that large with mmap and gives it back with
munmap, so every step faults the whole buffer in again and the kernel zeroes it,
4 KiB at a time: 510,000 page faults per EdgeViT-XXS step, a quarter to a third of
the step's CPU time spent in the kernel. glibc's tunable ``glibc.malloc.hugetlb=1``
(glibc >= 2.35) makes malloc mark such mappings for transparent huge pages
(madvise), so they fault in 2 MiB at a time: about 1,400 faults per step. README
"Performance notes" has the measurements.

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so the command-line entry
points call :func:`restart_with_hugepages` first. Where the tunable applies and is
not set, it replaces the process (``os.execve``: the same PID, arguments, working
directory and open files) with the same command and the tunable added; child
processes inherit it. A running notebook kernel cannot do that; ``train.Trainer``
logs how to set it instead (:func:`log_hint_if_missing`).

Nothing changes where glibc is older than 2.35 or absent (macOS, musl), where
transparent huge pages are not in ``madvise`` mode (``[never]``: none; ``[always]``:
the kernel already uses them), or where ``GLIBC_TUNABLES`` already sets
``glibc.malloc.hugetlb``: a value of your own wins, and ``glibc.malloc.hugetlb=0``
turns this off. It changes where memory comes from, not what is computed.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

from absl import logging

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
MIN_GLIBC = (2, 35)  # The first glibc with the tunable.
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> Optional[tuple[int, int]]:
  """(major, minor) of the running glibc, or None without glibc."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):  # No confstr, no such name, musl.
    return None


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
  """The kernel's transparent huge page mode (the bracketed word), or None."""
  try:
    with open(path, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def tunable_missing(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether the tunable would apply here and is not set in ``environ``."""
  if f"{TUNABLE}=" in environ.get("GLIBC_TUNABLES", ""):
    return False  # Set by the user (or by an earlier restart): theirs wins.
  version = glibc_version()
  return version is not None and version >= MIN_GLIBC and thp_mode() == "madvise"


def with_tunable(tunables: str) -> str:
  """``GLIBC_TUNABLES`` with the setting added (tunables are colon-separated)."""
  return ":".join(t for t in (tunables, SETTING) if t)


def restart_with_hugepages() -> None:
  """Re-executes this command with the tunable set, where it is missing.

  Call it first in a command-line entry point, before JAX starts its backend
  (nothing started before it survives). Returns without doing anything where the
  tunable does not apply or is already set, so a restarted process continues.
  """
  if not tunable_missing() or not sys.executable:  # Embedded interpreters have none.
    return
  env = dict(os.environ, GLIBC_TUNABLES=with_tunable(os.environ.get("GLIBC_TUNABLES", "")))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # The process is unchanged; it runs on without the tunable.
    logging.warning("Could not restart with GLIBC_TUNABLES=%s (%s); continuing "
                    "without it.", env["GLIBC_TUNABLES"], e)


_hint_logged = False


def log_hint_if_missing() -> None:
  """Logs once how to set the tunable, for processes that cannot restart."""
  global _hint_logged
  if _hint_logged or not tunable_missing():
    return
  _hint_logged = True
  logging.warning(
      "Training on the CPU without transparent huge pages for XLA's step buffers: "
      "set GLIBC_TUNABLES=%s in the environment before Python starts (for a "
      "notebook, in the kernel's environment). Train steps took 1.1-1.4x less time "
      "with it (README \"Performance notes\"). The command-line tools set it "
      "themselves.", SETTING)
