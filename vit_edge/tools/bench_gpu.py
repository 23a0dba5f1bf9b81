"""Training throughput and MFU on a GPU: vit_edge (JAX) against PyTorch eager and compiled.

For each model, at batch ``--batch_size`` and the model's resolution, in bfloat16
compute with float32 parameters (Flax ``dtype=bfloat16``; PyTorch autocast):

* vit_edge's train step, written here with what the trainer uses (softmax
  cross-entropy, AdamW, global-norm clipping at 1.0), jitted, parameters donated:
  ``jax`` as models are by default, ``jax_lax_grads`` without the custom CPU
  gradients of ``layers`` (on a GPU cuDNN's own convolution gradients may be the
  better ones), ``jax_unfused_attention`` with XLA's attention instead of cuDNN's
  fused one;
* the reference PyTorch model (``peer_models``: timm, or EdgeViT's official file)
  with the same step, eager and under ``torch.compile``.

A figure is images per second over ``--steps`` steps after ``--warmup`` steps.
MFU is 6 x the forward conv/matmul MACs per image (``bench_peers.model_macs``;
forward, input gradient, weight gradient at 2 FLOPs per MAC) times img/s over
``--peak_tflops`` (the H200's dense bf16 peak, 989 TFLOP/s, by default); the
table also gives the rate of one large bf16 matmul measured in the same process.

    python -m vit_edge.tools.bench_gpu --models=deit_small_patch16,edgevit_s \\
        --edgevit_src=/tmp/edgevit/src/edgevit.py --batch_size=256

Needs jax with a GPU backend and, for the PyTorch columns, torch and timm (the
`.[peers]` extra). Not run by the tests: it needs an accelerator.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence


# vit_edge's train step with its CPU custom gradients (`layers.use_fast_gradients`)
# and cuDNN fused attention (`layers.use_fused_attention`) on or off.
_JAX_VARIANTS = {
    "jax": dict(fast_gradients=True, fused_attention=True),
    "jax_lax_grads": dict(fast_gradients=False, fused_attention=True),
    "jax_unfused_attention": dict(fast_gradients=True, fused_attention=False),
}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vit_edge.tools.bench_gpu",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="deit_small_patch16,edgevit_s")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--image_size", type=int, default=0, help="0: each model's own")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--peak_tflops", type=float, default=989.0)
  p.add_argument("--matmul_size", type=int, default=8192)
  p.add_argument("--frameworks",
                 default="jax,jax_lax_grads,jax_unfused_attention,torch,torch_compile")
  p.add_argument("--edgevit_src", default="")
  p.add_argument("--out", default="", help="also write the rows as JSON here")
  p.add_argument("--profile_dir", default="",
                 help="also trace 3 steps of each vit_edge variant here and print "
                      "where the GPU's time goes (kernel kinds, slowest kernels)")
  p.add_argument("--profile_top", type=int, default=20)
  return p


def _create(name: str, size: int, **kwargs):
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  return models.create_model_at_size(name, size, num_classes=1000, **kwargs)


def _timed(step: Callable[[], Any], sync: Callable[[Any], Any], steps: int,
           warmup: int) -> float:
  """Seconds per step; `sync` waits for the device."""
  for _ in range(warmup):
    out = step()
  sync(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = step()
  sync(out)
  return (time.perf_counter() - start) / steps


def jax_seconds(name: str, batch: int, size: int, steps: int, warmup: int,
                fast_gradients: bool, fused_attention: bool,
                profile_dir: str = "") -> float:
  """Seconds per train step; with `profile_dir`, also traces 3 steps into it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from vit_edge.models import layers  # pylint: disable=g-import-not-at-top
  layers.use_fast_gradients(fast_gradients)
  layers.use_fused_attention(fused_attention)
  try:
    model = _create(name, size, dtype=jnp.bfloat16)
    key = jax.random.key(0)
    images = jax.random.normal(key, (batch, size, size, 3), jnp.float32)
    labels = jax.random.randint(key, (batch,), 0, 1000)
    variables = model.init(key, images[:1], train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-3, weight_decay=0.05))
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats, rng, images, labels):
      mutable = ["batch_stats"] if batch_stats else []
      (logits, _), updates = model.apply(
          {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})},
          images.astype(jnp.bfloat16), train=True, rngs={"dropout": rng},
          mutable=mutable)
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), labels).mean()
      return loss, updates.get("batch_stats", batch_stats)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, batch_stats, opt_state, rng, images, labels):
      rng, dropout_rng = jax.random.split(rng)
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch_stats, dropout_rng, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), batch_stats, opt_state, rng, loss

    carry = [params, batch_stats, opt_state, key]

    def one_step():
      # The batch is an argument, as in the trainer (a closed-over array would be
      # a compile-time constant that XLA folds).
      out = step(*carry, images, labels)
      carry[:] = out[:4]
      return out[4]

    seconds = _timed(one_step, jax.block_until_ready, steps, warmup)
    if profile_dir:
      with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(3):
          loss = one_step()
        jax.block_until_ready(loss)
    return seconds
  finally:
    layers.use_fast_gradients(True)
    layers.use_fused_attention(True)


def torch_seconds(name: str, batch: int, size: int, steps: int, warmup: int,
                  compiled: bool, edgevit_src: str) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  from vit_edge.tools import peer_models  # pylint: disable=g-import-not-at-top
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  model = peer_models.build(name, 1000, size, edgevit_src).cuda().train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05,
                                fused=True)
  forward = torch.compile(model) if compiled else model
  x = torch.randn(batch, 3, size, size, device="cuda")
  y = torch.randint(0, 1000, (batch,), device="cuda")

  def one_step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = torch.nn.functional.cross_entropy(forward(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss

  return _timed(one_step, lambda _: torch.cuda.synchronize(), steps, warmup)


# What a GPU kernel computes, from its name (cuBLAS/CUTLASS GEMMs, cuDNN attention
# and convolutions, XLA's own fusions); the first pattern that matches wins.
_KERNEL_KINDS = (
    ("attention", re.compile(r"fmha|flash|attention|sdpa", re.I)),
    ("convolution", re.compile(r"conv(?!ert)|implicit_gemm|wgrad|dgrad|fprop", re.I)),
    ("matmul", re.compile(r"gemm|xmma|cutlass|cublas|matmul|sm\d+_", re.I)),
    ("reduction", re.compile(r"reduc", re.I)),
    ("transpose / copy", re.compile(r"transpose|copy|memcpy|memset", re.I)),
    ("other fusion", re.compile(r"fusion", re.I)),
)


def kernel_kind(name: str) -> str:
  for kind, pattern in _KERNEL_KINDS:
    if pattern.search(name):
      return kind
  return "other"


def kernel_seconds(trace_dir: str) -> dict[str, float]:
  """Seconds per kernel name in the newest perfetto trace under `trace_dir`.

  Device processes (``/device:GPU:0`` ...) only; their events are the kernels
  and copies the device ran. Empty where the trace has no device process (a CPU).
  """
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir!r}: the profiler "
                            "wrote nothing there.")
  with gzip.open(paths[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  devices = {e["pid"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"
             and str(e.get("args", {}).get("name", "")).startswith("/device:")}
  seconds: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in devices:
      seconds[e["name"]] += e.get("dur", 0) / 1e6
  return dict(seconds)


def kernel_table(seconds: dict[str, float], top: int) -> list[str]:
  """Markdown: time per kernel kind, then the `top` slowest kernels."""
  total = sum(seconds.values()) or 1.0
  kinds: dict[str, float] = collections.defaultdict(float)
  for name, t in seconds.items():
    kinds[kernel_kind(name)] += t
  lines = ["| kernel kind | device s (3 steps) | share |", "|---|---:|---:|"]
  lines += [f"| {k} | {t:.4f} | {100 * t / total:.1f}% |"
            for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])]
  lines += ["", "| kernel | kind | device s (3 steps) | share |", "|---|---|---:|---:|"]
  lines += [f"| `{n[:90]}` | {kernel_kind(n)} | {t:.4f} | {100 * t / total:.1f}% |"
            for n, t in sorted(seconds.items(), key=lambda kv: -kv[1])[:top]]
  return lines


def matmul_tflops(n: int = 8192, runs: int = 10) -> float:
  """bf16 n x n x n matmul rate through JAX (TFLOP/s), the practical peak."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  seconds = _timed(lambda: matmul(a), jax.block_until_ready, runs, 3)
  return 2 * n ** 3 / seconds / 1e12


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  from vit_edge.tools import bench_peers  # pylint: disable=g-import-not-at-top
  frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
  unknown = set(frameworks) - set(_JAX_VARIANTS) - {"torch", "torch_compile"}
  if unknown:
    print(f"error: --frameworks: unknown {sorted(unknown)}; choose from "
          f"{', '.join(_JAX_VARIANTS)}, torch, torch_compile.", file=sys.stderr)
    return 2
  names = [m.strip() for m in args.models.split(",") if m.strip()]
  try:
    for name in names:
      models.get_model_info(name)
  except KeyError as e:
    print(f"error: --models: {e.args[0]}", file=sys.stderr)
    return 2
  if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
    print("error: --batch_size and --steps must be >= 1 and --warmup >= 0.",
          file=sys.stderr)
    return 2
  import jax  # pylint: disable=g-import-not-at-top
  print(f"devices: {jax.devices()}", flush=True)
  peak = matmul_tflops(args.matmul_size)
  print(f"bf16 {args.matmul_size}^3 matmul through JAX: {peak:.1f} TFLOP/s", flush=True)
  rows = []
  for name in names:
    info = models.get_model_info(name)
    size = args.image_size or info.image_size
    flops = 6 * bench_peers.model_macs(name, size)
    for framework in frameworks:
      try:
        if framework in _JAX_VARIANTS:
          trace_dir = (os.path.join(args.profile_dir, f"{name}_{framework}")
                       if args.profile_dir else "")
          seconds = jax_seconds(name, args.batch_size, size, args.steps, args.warmup,
                                profile_dir=trace_dir, **_JAX_VARIANTS[framework])
          if trace_dir:
            table = kernel_table(kernel_seconds(trace_dir), args.profile_top)
            print(f"\nwhere {name} / {framework}'s device time goes:\n"
                  + "\n".join(table) + "\n", flush=True)
        else:
          seconds = torch_seconds(name, args.batch_size, size, args.steps, args.warmup,
                                  framework == "torch_compile", args.edgevit_src)
      except Exception as e:  # pylint: disable=broad-except
        print(f"[{name}, {framework}] failed: {type(e).__name__}: {e}", flush=True)
        continue
      img_s = args.batch_size / seconds
      row = {"model": name, "image_size": size, "batch": args.batch_size,
             "framework": framework, "img_s": img_s, "train_gflop_per_image": flops / 1e9,
             "mfu": img_s * flops / (args.peak_tflops * 1e12),
             "share_of_matmul_rate": img_s * flops / (peak * 1e12)}
      rows.append(row)
      print(json.dumps(row), flush=True)
      if args.out:
        with open(args.out, "w") as f:
          json.dump({"matmul_tflops": peak, "rows": rows}, f, indent=2)
  print("\n| model | res | batch | framework | img/s | train GFLOP/img | MFU (of "
        f"{args.peak_tflops:.0f}) | share of the {peak:.0f} TFLOP/s matmul |")
  print("|---|---:|---:|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['framework']} | "
          f"{r['img_s']:.0f} | {r['train_gflop_per_image']:.2f} | {100 * r['mfu']:.1f}% | "
          f"{100 * r['share_of_matmul_rate']:.1f}% |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
