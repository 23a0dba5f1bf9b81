"""vit_edge.xla_flags: the XLA:CPU defaults, when they apply and that they take effect."""

import os
import subprocess
import sys

import pytest

from vit_edge import xla_flags

_OPTION = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"


@pytest.fixture
def fresh_process(monkeypatch):
  """As if no JAX computation had run yet, with no user XLA_FLAGS."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv(xla_flags.OPT_OUT_VARIABLE, raising=False)
  monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)


def test_adds_the_defaults_once(fresh_process):
  del fresh_process
  assert xla_flags.apply_defaults() == [_OPTION]
  assert os.environ["XLA_FLAGS"] == _OPTION
  assert not xla_flags.apply_defaults()
  assert os.environ["XLA_FLAGS"] == _OPTION


def test_keeps_other_user_flags(fresh_process, monkeypatch):
  del fresh_process
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  xla_flags.apply_defaults()
  assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {_OPTION}"


@pytest.mark.parametrize("user_value", ["", "+eltwise", "default"])
def test_a_user_value_of_the_option_wins(fresh_process, monkeypatch, user_value):
  del fresh_process
  user = f"--xla_cpu_experimental_ynn_fusion_type={user_value}"
  monkeypatch.setenv("XLA_FLAGS", user)
  assert not xla_flags.apply_defaults()
  assert os.environ["XLA_FLAGS"] == user


def test_opt_out_unchecked_jaxlib_and_started_backend(fresh_process, monkeypatch):
  del fresh_process
  monkeypatch.setenv(xla_flags.OPT_OUT_VARIABLE, "0")
  assert not xla_flags.apply_defaults()
  monkeypatch.delenv(xla_flags.OPT_OUT_VARIABLE)
  monkeypatch.setattr(xla_flags, "CHECKED_JAXLIB_VERSIONS", ("0.0.1",))
  assert not xla_flags.apply_defaults()
  monkeypatch.undo()
  # Once a computation has started the backend, it is too late to change anything.
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert not xla_flags.apply_defaults()
  assert "XLA_FLAGS" not in os.environ


@pytest.mark.parametrize("value", ["false", "off", "2", ""])
def test_an_unknown_switch_value_is_an_error_naming_it(fresh_process, monkeypatch, value):
  del fresh_process
  monkeypatch.setenv(xla_flags.OPT_OUT_VARIABLE, value)
  with pytest.raises(ValueError, match=f"VIT_EDGE_XLA_DEFAULTS={value!r}.*expected 0"):
    xla_flags.apply_defaults()
  assert "XLA_FLAGS" not in os.environ


_PROBE = """
import jax, jax.numpy as jnp
from vit_edge import xla_flags
xla_flags.apply_defaults()
text = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
print("ynn_dot" if "ynn_fusion" in text else "eigen_dot")
"""


@pytest.mark.parametrize("opt_out,expected", [("1", "eigen_dot"), ("0", "ynn_dot")])
def test_the_default_reaches_xla(opt_out, expected):
  """In a new process the option changes the compiled program (dots off YNNPACK)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env[xla_flags.OPT_OUT_VARIABLE] = opt_out
  result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
  assert result.stdout.split()[-1] == expected
