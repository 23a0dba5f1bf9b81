"""vit_edge.hugepages: when the glibc tunable applies, and the restart that sets it."""

import os
import subprocess
import sys

import pytest

from vit_edge import hugepages


@pytest.fixture
def applicable(monkeypatch):
  """A glibc and kernel where the tunable applies, and no GLIBC_TUNABLES yet."""
  monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)


def test_missing_only_where_it_applies(applicable, monkeypatch):
  del applicable
  assert hugepages.tunable_missing()
  monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 34))
  assert not hugepages.tunable_missing()
  monkeypatch.setattr(hugepages, "glibc_version", lambda: None)  # macOS, musl.
  assert not hugepages.tunable_missing()
  monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
  for mode in ("always", "never", None):
    monkeypatch.setattr(hugepages, "thp_mode", lambda mode=mode: mode)
    assert not hugepages.tunable_missing(), mode


@pytest.mark.parametrize("tunables", ["glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=2",
                                      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"])
def test_a_user_value_wins(applicable, monkeypatch, tunables):
  del applicable
  monkeypatch.setenv("GLIBC_TUNABLES", tunables)
  assert not hugepages.tunable_missing()


def test_other_tunables_are_kept():
  assert hugepages.with_tunable("") == "glibc.malloc.hugetlb=1"
  assert (hugepages.with_tunable("glibc.malloc.arena_max=2")
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("text,mode", [("always [madvise] never\n", "madvise"),
                                       ("[always] madvise never\n", "always"),
                                       ("always madvise [never]\n", "never"),
                                       ("garbled\n", None)])
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert hugepages.thp_mode(str(path)) == mode
  assert hugepages.thp_mode(str(tmp_path / "absent")) is None


def test_glibc_version_matches_the_platform_module():
  import platform  # pylint: disable=g-import-not-at-top
  name, version = platform.libc_ver()
  if name != "glibc":
    assert hugepages.glibc_version() is None
  else:
    assert hugepages.glibc_version() == tuple(int(p) for p in version.split(".")[:2])


_PROBE = """
import os, sys
print("pid", os.getpid(), flush=True)
from vit_edge import hugepages
hugepages.restart_with_hugepages()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


def test_restart_adds_the_tunable_and_keeps_the_command():
  """In a new process: the same PID and arguments come back with the tunable set."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"
  # Run the check in the child so the answer is about the child's environment.
  applies = subprocess.run(
      [sys.executable, "-c", "from vit_edge import hugepages as h; print("
       "h.glibc_version() is not None and h.glibc_version() >= h.MIN_GLIBC and "
       "h.thp_mode() == 'madvise')"],
      env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
  result = subprocess.run([sys.executable, "-c", _PROBE, "--flag=1", "x"], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
  lines = result.stdout.split("\n")
  pids = [line.split()[1] for line in lines if line.startswith("pid ")]
  after = [line.split(" ", 3) for line in lines if line.startswith("after ")]
  assert len(after) == 1 and after[0][3] == "['--flag=1', 'x']"
  if applies == "True":
    # Printed once before the restart and once after it, by the same process.
    assert len(pids) == 2 and pids[0] == pids[1] == after[0][1]
    assert after[0][2] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
  else:
    assert len(pids) == 1 and after[0][2] == "glibc.malloc.arena_max=4"


def test_a_failed_restart_runs_on(applicable, monkeypatch):
  del applicable

  def refuse(*args):
    raise PermissionError(13, "exec refused", args[0])

  monkeypatch.setattr(os, "execve", refuse)
  hugepages.restart_with_hugepages()  # Logs and returns.
  assert "GLIBC_TUNABLES" not in os.environ
