"""tools/profile_train: classifying compiled HLO instructions by kind and direction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge.tools import profile_train

_HLO = """\
HloModule jit_train_step, entry_computation_layout={()->f32[]}

%fused_dot (param_0: f32[8,8]) -> f32[8,8] {
  %param_0 = f32[8,8]{1,0} parameter(0)
  ROOT %dot.1 = f32[8,8]{1,0} dot(%param_0, %param_0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%wrapped_reduce-window_computation.2 (p0: f32[2,6,6,3], p1: s32[2,6,6,3], c0: f32[], c1: s32[]) -> (f32[2,4,4,3], s32[2,4,4,3]) {
  %p0 = f32[2,6,6,3]{3,2,1,0} parameter(0)
  %p1 = s32[2,6,6,3]{3,2,1,0} parameter(1)
  %c0 = f32[] parameter(2)
  %c1 = s32[] parameter(3)
  ROOT %reduce-window.2 = (f32[2,4,4,3]{3,2,1,0}, s32[2,4,4,3]{3,2,1,0}) reduce-window(%p0, %p1, %c0, %c1), window={size=1x3x3x1}, to_apply=%region
}

%wrapped_iota_computation.3 () -> s32[2,6,6,3] {
  ROOT %iota.3 = s32[2,6,6,3]{3,2,1,0} iota(), iota_dimension=1
}

ENTRY %main.10 (Arg_0.1: f32[2,8,8,3], Arg_1.2: f32[3,3,1,3]) -> f32[] {
  %Arg_0.1 = f32[2,8,8,3]{3,2,1,0} parameter(0)
  %Arg_1.2 = f32[3,3,1,3]{3,2,1,0} parameter(1)
  %convolution.3 = f32[2,8,8,3]{3,2,1,0} convolution(%Arg_0.1, %Arg_1.2), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, feature_group_count=3, metadata={op_name="jit(train_step)/jvp(M)/conv_general_dilated"}
  %convolution.4 = f32[2,8,8,3]{3,2,1,0} convolution(%convolution.3, %Arg_1.2), window={size=3x3 pad=1_1x1_1 lhs_dilate=2x2}, dim_labels=b01f_01io->b01f, feature_group_count=3, metadata={op_name="jit(train_step)/transpose(jvp(M))/conv_general_dilated"}
  %copy.5 = f32[2,8,8,3]{3,2,1,0} copy(%convolution.4)
  %convolution.6 = f32[3,3,1,3]{3,2,1,0} convolution(%Arg_0.1, %copy.5), window={size=8x8 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf
  %ynn_fusion.7 = f32[8,8]{1,0} fusion(%Arg_1.2), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(train_step)/jvp(M)/dot_general"}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %wrapped_iota.3 = s32[2,6,6,3]{3,2,1,0} fusion(), kind=kLoop, calls=%wrapped_iota_computation.3
  %wrapped_reduce-window.2 = (f32[2,4,4,3]{3,2,1,0}, s32[2,4,4,3]{3,2,1,0}) fusion(%convolution.4, %wrapped_iota.3), kind=kLoop, calls=%wrapped_reduce-window_computation.2
  ROOT %add.8 = f32[] add(%Arg_0.1, %Arg_0.1), metadata={op_name="jit(train_step)/add"}
}
"""


def test_kinds_and_directions_of_handwritten_hlo():
  module = profile_train.HloModule(_HLO)
  expect = {
      "convolution.3": ("depthwise/grouped conv", "forward"),
      "convolution.4": ("depthwise/grouped conv, lhs-dilated (strided input gradient)",
                        "backward"),
      # XLA-made (no op_name): a copy of a gradient and a kernel gradient that reads
      # a forward activation and that copy are both backward.
      "copy.5": ("transpose/copy", "backward"),
      "convolution.6": ("conv", "backward"),
      "ynn_fusion.7": ("matmul (YNNPACK)", "forward"),
      "wrapped_reduce-window.2": ("max-pool gradient: arg-max reduce-window", "backward"),
      "wrapped_iota.3": ("max-pool gradient: index arrays (iota)", "backward"),
      "add.8": ("elementwise", "optimiser/rest"),
  }
  for name, (kind, direction) in expect.items():
    instruction = module.instructions[name]
    assert (module.kind(instruction), module.direction(instruction)) == (kind, direction), name


def test_tables_from_hand_numbers():
  lines = profile_train.phase_table({"forward": 1.0, "forward+backward": 3.0, "step": 4.0})
  assert "| forward | 1.000 | 25% |" in lines
  assert "| backward | 2.000 | 50% |" in lines
  assert "| optimiser/rest | 1.000 | 25% |" in lines
  module = profile_train.HloModule(_HLO)
  table = "\n".join(profile_train.kind_table(
      module, {"convolution.4": 3.0, "convolution.3": 1.0}, top=1))
  assert "| depthwise/grouped conv | forward | 1.000 | 25.0% |" in table
  assert "| convolution.4 |" in table and "| convolution.3 |" not in table


def test_every_thunk_of_a_real_compiled_step_is_parsed():
  """The parser reads XLA:CPU's own text: every entry instruction, with op_names."""
  def loss(w, x):
    y = jax.lax.reduce_window(jnp.tanh(x @ w), -jnp.inf, jax.lax.max, (1, 2), (1, 1),
                              "SAME")
    return jnp.sum(y)
  w, x = jnp.ones((4, 4)), jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)),
                                       jnp.float32)
  text = jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()
  module = profile_train.HloModule(text)
  entry = [line for line in text.splitlines() if line.startswith("ENTRY")]
  assert entry and module.computations
  directions = {module.direction(i) for i in module.instructions.values()
                if i.opcode not in ("parameter", "constant")}
  assert "backward" in directions


def test_async_thunks_last_until_their_end_event():
  """An Eigen matmul thunk (dots off YNNPACK, the default) runs asynchronously: its
  own event is the launch, its time runs until ``end: <name>``."""
  events = [("dot.1", 0, 10), ("fusion.2", 20, 30), ("end: dot.1", 1000, 5),
            ("fusion.3", 1100, 50), ("end: fusion.3", 1150, 1), ("other", 0, 99),
            ("dot.1", 2000, 10), ("end: dot.1", 2500, 0)]
  seconds = profile_train.line_seconds(events, {"dot.1", "fusion.2", "fusion.3"})
  assert seconds["dot.1"] == pytest.approx((1005 + 500) * 1e-12)
  assert seconds["fusion.2"] == pytest.approx(30e-12)
  assert seconds["fusion.3"] == pytest.approx(51e-12)
  assert "other" not in seconds
