"""Where a train step's time goes on this machine, per model (prints Markdown tables).

    python -m vit_edge.tools.profile_train --models=mobilevitv2_050 --image_size=256

For each model, on random data already on the device (the same setup as
``bench_train --mode=throughput``: the offline config's AdamW and objective, float32):

1. **Phases**, medians over ``--rounds`` interleaved rounds: forward (the
   objective's loss in train mode, `train.student_loss`), backward (loss and
   gradient minus forward) and the rest of the jitted step (mixup, AdamW, EMA,
   metrics: the full step minus loss and gradient).
2. **Op kinds**: one profiled train step (``jax.profiler``). XLA:CPU names each
   executed thunk after its HLO instruction; each is classed by what it computes
   (its opcode; for a fusion, the ops it fuses) and by the JAX ``op_name`` XLA
   keeps: ``transpose(jvp(...))`` is backward, ``jvp(...)`` forward, anything
   else the optimiser and the rest. Times are summed over the XLA threads, so
   shares are of CPU time, not of wall time; an asynchronous thunk (an Eigen
   matmul, which the default XLA options give every dot) counts from its start
   to its ``end:`` event.
3. **The slowest instructions** of that step, with shapes and JAX op names.

Nothing here is run by the tests except the HLO classification (tests/test_profile_train.py).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import statistics
import tempfile
import time
from typing import Container, Iterable

from absl import app
from absl import flags

from vit_edge import hugepages

_MODELS = flags.DEFINE_list("models", ["tformer_s"], "Registered model names.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Resolution.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds of the phases.")
_TOP = flags.DEFINE_integer("top", 12, "Slowest instructions listed per model.")

BACKWARD, FORWARD, REST = "backward", "forward", "optimiser/rest"


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction of a compiled module, as much as the profile needs."""
  name: str
  shape: str
  opcode: str
  attributes: str
  computation: str

  def attribute(self, pattern: str) -> str | None:
    match = re.search(pattern, self.attributes)
    return match.group(1) if match else None

  @property
  def op_name(self) -> str:
    return self.attribute(r'op_name="([^"]*)"') or ""

  @property
  def called(self) -> str | None:
    return self.attribute(r"calls=%?([\w.\-]+)")


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")


class HloModule:
  """The instructions of `compiled.as_text()`, by name and by computation."""

  def __init__(self, text: str):
    self.instructions: dict[str, Instruction] = {}
    self.computations: dict[str, list[Instruction]] = collections.defaultdict(list)
    computation = ""
    for line in text.splitlines():
      head = _COMPUTATION.match(line)
      if head and not line.startswith(" "):
        computation = head.group(1)
        continue
      body = _INSTRUCTION.match(line)
      if body:
        instruction = Instruction(*body.groups()[:3], attributes=body.group(4),
                                  computation=computation)
        self.instructions[instruction.name] = instruction
        self.computations[computation].append(instruction)
    self.consumers: dict[str, list[str]] = collections.defaultdict(list)
    for instruction in self.instructions.values():
      for operand in self.operands(instruction):
        self.consumers[operand].append(instruction.name)

  def operands(self, instruction: Instruction) -> list[str]:
    """Names of the instructions it reads (in its own computation)."""
    args = instruction.attributes.split("), ")[0]
    return [name for name in re.findall(r"%([\w.\-]+)", args)
            if name in self.instructions
            and self.instructions[name].computation == instruction.computation]

  def fused(self, instruction: Instruction) -> list[Instruction]:
    """The instruction itself, or for a fusion the instructions it fuses."""
    if instruction.opcode != "fusion" or instruction.called is None:
      return [instruction]
    inner = []
    for member in self.computations.get(instruction.called, []):
      inner.extend(self.fused(member))
    return inner or [instruction]

  def kind(self, instruction: Instruction) -> str:
    """What the instruction computes, in the words of the README's profile tables."""
    members = self.fused(instruction)
    opcodes = {m.opcode for m in members}
    ynn = "__ynn_fusion" in instruction.attributes
    for member in members:
      if member.opcode == "convolution":
        groups = int(member.attribute(r"feature_group_count=(\d+)") or 1)
        window = member.attribute(r"window=\{([^}]*)\}") or ""
        name = "depthwise/grouped conv" if groups > 1 else "conv"
        if "lhs_dilate" in window:
          name += ", lhs-dilated (strided input gradient)"
        return name + (" (YNNPACK)" if ynn else "")
    if "dot" in opcodes:
      return "matmul (YNNPACK)" if ynn else "matmul"
    if opcodes <= {"iota", "parameter"}:
      readers = [self.instructions[n] for n in self.consumers.get(instruction.name, [])]
      if any(self._argmax_window(self.fused(r)) for r in readers):
        return "max-pool gradient: index arrays (iota)"
      return "iota (index arrays)"
    if self._argmax_window(members):
      # XLA:CPU expands select-and-scatter (the max-pool gradient) into a
      # reduce-window that carries the arg-max indices, then a scatter.
      return "max-pool gradient: arg-max reduce-window"
    for opcode, name in (("select-and-scatter", "max-pool gradient (select-and-scatter)"),
                         ("reduce-window", "pooling (reduce-window)"),
                         ("scatter", "scatter"), ("gather", "gather"),
                         ("reduce", "reduction (norms, sums)")):
      if opcode in opcodes:
        return name + (" (YNNPACK)" if ynn else "")
    if opcodes & {"transpose", "copy"}:
      return "transpose/copy"
    return "elementwise"

  @staticmethod
  def _argmax_window(members: list[Instruction]) -> bool:
    return any(m.opcode == "reduce-window" and "s32" in m.shape for m in members)

  def own_direction(self, instruction: Instruction) -> str | None:
    """From the op_name JAX wrote into the HLO; None where XLA made the op."""
    names = [instruction.op_name] + [m.op_name for m in self.fused(instruction)]
    if any("transpose(jvp(" in op_name for op_name in names):
      return BACKWARD
    if any("jvp(" in op_name for op_name in names):
      return FORWARD
    if any(names):
      return REST
    return None

  def _upstream_directions(self, name: str) -> set[str]:
    """Directions of the nearest labelled ops `name` reads, through unlabelled ones."""
    found, frontier, seen = set(), [name], set()
    for _ in range(8):
      next_frontier = []
      for current in frontier:
        if current in seen:
          continue
        seen.add(current)
        direction = self.own_direction(self.instructions[current])
        if direction:
          found.add(direction)
        else:
          next_frontier.extend(self.operands(self.instructions[current]))
      frontier = next_frontier
    return found

  def direction(self, instruction: Instruction) -> str:
    """forward, backward or optimiser/rest.

    An op XLA made itself (an expanded select-and-scatter, a layout copy) has no
    op_name: it is backward if any op it reads (through other unlabelled ops) is,
    else forward if any is. One that reads nothing labelled (an iota) takes the
    direction of its consumers, found the same way.
    """
    found = self._upstream_directions(instruction.name)
    if not found:
      for consumer in self.consumers.get(instruction.name, []):
        found |= self._upstream_directions(consumer)
    # Forward ops never read backward values: an op that reads any (a kernel
    # gradient reads an activation and an output gradient) is backward.
    for direction in (BACKWARD, FORWARD, REST):
      if direction in found:
        return direction
    return REST


def thunk_seconds(trace_dir: str, known: Iterable[str]) -> dict[str, float]:
  """Seconds per HLO instruction in a jax.profiler trace, summed over threads."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  known = set(known)  # Once, not per trace line.
  totals: dict[str, float] = collections.Counter()
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
      space.ParseFromString(f.read())
    for plane in space.planes:
      for line in plane.lines:
        events = [(plane.event_metadata[e.metadata_id].name, e.offset_ps, e.duration_ps)
                  for e in line.events]
        totals.update(line_seconds(events, known))
  return dict(totals)


def line_seconds(events: Iterable[tuple[str, int, int]], known: Container[str]
                 ) -> dict[str, float]:
  """Seconds per known instruction from one trace line's (name, offset, duration) in ps.

  A thunk that XLA:CPU runs asynchronously (an Eigen matmul on its thread pool)
  records a short event when it starts and an ``end: <name>`` event when it is
  done; it lasts from the first to the end of the second. A synchronous one is
  its own event's duration.
  """
  totals: dict[str, float] = collections.Counter()
  started: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
  for name, offset, duration in sorted(events, key=lambda e: e[1]):
    if name.startswith("end: ") and started.get(name[5:]):
      start, own = started[name[5:]].pop(0)
      totals[name[5:]] += (max(offset + duration - start, own) - own) * 1e-12
    elif name in known:
      totals[name] += duration * 1e-12
      started[name].append((offset, duration))
  return dict(totals)


def phase_functions(trainer, batch):
  """Jitted (forward, forward+backward) of `train.student_loss`, on unmixed targets."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top
  objective, model = trainer.objective, trainer.model
  targets = jax.nn.one_hot(batch["label"], trainer.ds_info.num_classes)
  teacher_variables = trainer.teacher_variables

  def loss(trainable, state):
    images = batch["image"]
    teacher = objective.teacher_outputs(teacher_variables, images)
    return train.student_loss(trainable, state, images, targets, teacher,
                              jax.random.key(0), model=model, objective=objective)

  def forward(state):
    return loss((state["params"], state["objective_params"]), state)[0]

  def forward_backward(state):
    return jax.value_and_grad(loss, has_aux=True)(
        (state["params"], state["objective_params"]), state)

  return jax.jit(forward), jax.jit(forward_backward)


def _seconds(fn, *args) -> tuple[float, object]:
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def profile_model(name: str, batch_size: int, image_size: int, rounds: int,
                  top: int) -> str:
  """The three Markdown tables for one model (module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_edge.tools import step_timing  # pylint: disable=g-import-not-at-top
  trainer, state, batch = step_timing.timing_setup(name, batch_size, image_size)
  forward, forward_backward = phase_functions(trainer, batch)
  times = collections.defaultdict(list)
  with jax.set_mesh(trainer.mesh):
    compiled = trainer._train_step.lower(  # pylint: disable=protected-access
        state, batch, trainer.teacher_variables).compile()
    module = HloModule(compiled.as_text())
    for round_ in range(rounds + 1):  # Round 0 compiles and warms up.
      for label, fn in (("forward", forward), ("forward+backward", forward_backward)):
        seconds, _ = _seconds(fn, state)
        times[label].append(seconds)
      seconds, (state, _) = _seconds(trainer.train_step, state, batch)
      times["step"].append(seconds)
      del round_
    trace_dir = tempfile.mkdtemp(prefix="profile_train_")
    jax.profiler.start_trace(trace_dir)
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
  median = {k: statistics.median(v[1:]) for k, v in times.items()}
  lines = [f"#### {name}, batch {batch_size}, {image_size} px, "
           f"{jax.devices()[0].device_kind}", "",
           *phase_table(median), "",
           *kind_table(module, thunk_seconds(trace_dir, module.instructions), top)]
  return "\n".join(lines)


def phase_table(median: dict[str, float]) -> list[str]:
  step = median["step"]
  rows = (("forward", median["forward"]),
          ("backward", median["forward+backward"] - median["forward"]),
          ("optimiser/rest", step - median["forward+backward"]))
  lines = ["| phase | s | share of the step |", "|---|---:|---:|"]
  lines += [f"| {label} | {s:.3f} | {100 * s / step:.0f}% |" for label, s in rows]
  lines.append(f"| full jitted step | {step:.3f} | 100% |")
  return lines


def kind_table(module: HloModule, seconds: dict[str, float], top: int) -> list[str]:
  """Time by (kind, direction), then the `top` slowest instructions."""
  total = sum(seconds.values()) or 1.0
  by_kind = collections.Counter()
  for name, s in seconds.items():
    instruction = module.instructions[name]
    by_kind[(module.kind(instruction), module.direction(instruction))] += s
  lines = ["| op kind | direction | CPU s | share |", "|---|---|---:|---:|"]
  lines += [f"| {kind} | {direction} | {s:.3f} | {100 * s / total:.1f}% |"
            for (kind, direction), s in by_kind.most_common()]
  lines += ["", "| instruction | kind | direction | shape | JAX op | CPU s | share |",
            "|---|---|---|---|---|---:|---:|"]
  for name, s in collections.Counter(seconds).most_common(top):
    instruction = module.instructions[name]
    op_name = (instruction.op_name or next(
        (m.op_name for m in module.fused(instruction) if m.op_name), ""))
    lines.append(
        f"| {name} | {module.kind(instruction)} | {module.direction(instruction)} | "
        f"`{instruction.shape.split('{')[0]}` | `{op_name[-70:]}` | {s:.3f} | "
        f"{100 * s / total:.1f}% |")
  return lines


def main(argv):
  del argv
  for name in _MODELS.value:
    print(profile_model(name, _BATCH.value, _IMAGE_SIZE.value, _ROUNDS.value,
                        _TOP.value), flush=True)
    print()


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  app.run(main)
