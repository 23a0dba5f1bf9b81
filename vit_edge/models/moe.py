"""A mixture-of-experts FFN with exportable per-image routing (top-1 / top-2).

Reference for routers and capacity: V-MoE (Riquelme et al. 2021,
google-research/vmoe ``vmoe/nn/routing.py`` and ``vmoe/moe.py``); see
../shared/reference/methods.md section 4. The seed paper (Mensah et al., arXiv
2411.07834) has no public code, so where this module goes beyond V-MoE it is a
documented reconstruction.

What follows V-MoE:

* the router is one Dense(E) without bias (Flax's default lecun-normal init);
* in training, Gaussian noise of std ``noise_scale / E`` is added to the router
  logits (drawn from the 'dropout' rng stream the train step already passes);
  at eval the router is deterministic;
* combine weights are the softmax probabilities of the chosen experts, not
  renormalised over the K choices;
* expert capacity ``C = ceil(S * K * cf / E)`` rounded up to a multiple of 4
  (``capacity_multiple``), S the tokens of one group; the training and the
  eval/export capacity factors are separate fields;
* the k-th choices of all tokens take slots only after every (k-1)-th choice
  (cumsum over one-hot masks), so a second choice never evicts a first choice;
* a group is one image (V-MoE groups tokens across images for throughput):
  routing one image never depends on the others, so a batch-1 TFLite export
  computes exactly what the batched model computes.

Where this differs, and why:

* no batch-priority routing: it needs a sort, which TF 2.21 cannot convert;
* top-2 is argmax, then argmax with the first choice masked out (no
  ``lax.top_k``, which does not convert either);
* dispatch is a gather through a slot -> token index table (V-MoE uses a
  one-hot einsum): measured 1.8x a dense FFN against 2.4x for the einsum
  (methods.md). The table is built by a product of one-hot masks with the token
  indices (a BATCH_MATMUL), and combining gathers each token's expert output
  back: no scatter, builtin TFLite ops only (ARG_MAX, ONE_HOT, CUMSUM, GATHER,
  BATCH_MATMUL);
* ``C`` is capped at S: an expert receives each token at most once (the K
  choices of a token are distinct), so slots beyond S could never be filled.
  The outputs are the same as without the cap.

A token dropped by every expert it chose (its slot index >= C) gets zeros from
this layer; in a pre-norm transformer it then passes unchanged through the
residual. The layer returns ``(y, aux)``, ``aux`` holding what the balance losses
(`vit_edge.objectives.balance`) and the routing picture need; see
:data:`AUX_FIELDS`.

Example::

    ffn = MoeFfn(hidden_features=256, num_experts=4, num_selected=2)
    variables = ffn.init(jax.random.key(0), x)          # x: [B, ..., d]
    y, aux = ffn.apply(variables, x, deterministic=False,
                       rngs={"dropout": jax.random.key(1)})
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_edge.models import layers

Dtype = Any

# The keys of the aux dict returned by MoeFfn (token axes flattened to S):
AUX_FIELDS = {
    "moe_expert": "[B, S, K] int32, the k-th expert chosen by each token",
    "moe_gate": "[B, S, K] float32, its combine weight (softmax probability)",
    "moe_kept": "[B, S, K] float32, 1 where the choice got a slot (0: dropped)",
    "moe_router_logits": "[B, S, E] float32, the router logits without noise",
    "moe_router_logits_noisy": "[B, S, E] float32, with the training noise "
                               "(equal to the logits at eval)",
    "moe_noise_std": "[] float32, std of that noise (0 at eval)",
    "moe_expert_load": "[B, E] float32, tokens processed by each expert",
}
AUX_PREFIX = "moe_"


def expert_capacity(num_tokens: int, num_experts: int, num_selected: int,
                    capacity_factor: float, multiple: int = 4) -> int:
  """Slots per expert: ``ceil(S K cf / E)`` rounded up to `multiple`, at most S.

  Example: ``expert_capacity(64, 4, 2, 1.05) == 36`` (ceil(33.6) = 34 -> 36).
  """
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor}; expected > 0 (V-MoE "
                     "trains with 1.05).")
  capacity = math.ceil(num_tokens * num_selected * capacity_factor / num_experts)
  capacity = -(-capacity // multiple) * multiple
  return max(1, min(capacity, num_tokens))


@dataclasses.dataclass(frozen=True)
class Routing:
  """Per image routing of S tokens to K of E experts with C slots each.

  expert: [B, S, K] int32, gate: [B, S, K] float, slot: [B, S, K] int32 (the
  position in the expert's buffer, possibly >= C), kept: [B, S, K] bool.
  """
  expert: jax.Array
  gate: jax.Array
  slot: jax.Array
  kept: jax.Array


def route(probs: jax.Array, num_selected: int, capacity: int) -> Routing:
  """Top-K routing of ``probs`` [B, S, E] by argmax / masked argmax and cumsum.

  Slots are given in token order within each choice rank, all first choices
  before any second choice, as V-MoE's TopExpertsPerItem dispatcher.
  """
  num_experts = probs.shape[-1]
  if not 1 <= num_selected <= num_experts:
    raise ValueError(f"num_selected={num_selected}; expected 1..{num_experts} "
                     "(the number of experts).")
  remaining = probs
  taken = jnp.zeros((probs.shape[0], num_experts), jnp.int32)  # [B, E]
  experts, gates, slots = [], [], []
  for _ in range(num_selected):
    choice = jnp.argmax(remaining, axis=-1).astype(jnp.int32)       # [B, S]
    mask = jax.nn.one_hot(choice, num_experts, dtype=jnp.int32)     # [B, S, E]
    gates.append(jnp.sum(probs * mask.astype(probs.dtype), axis=-1))
    # Position among this rank's tokens of the same expert, after every token
    # of earlier ranks that chose it.
    position = jnp.cumsum(mask, axis=1) - 1 + taken[:, None, :]
    slots.append(jnp.sum(position * mask, axis=-1))
    taken = taken + jnp.sum(mask, axis=1)
    experts.append(choice)
    # Mask the chosen expert (probabilities are >= 0, so -1 is never chosen).
    remaining = jnp.where(mask > 0, -1.0, remaining)
  slot = jnp.stack(slots, axis=-1)
  return Routing(expert=jnp.stack(experts, axis=-1), gate=jnp.stack(gates, axis=-1),
                 slot=slot, kept=slot < capacity)


def slot_table(routing: Routing, num_experts: int, capacity: int) -> jax.Array:
  """The token index [B, E, C] int32 of every expert slot.

  Built without scatter: the product of one-hot(expert) and one-hot(slot) masks
  summed against the token indices (one batched matmul). An empty slot points at
  token 0 and is never combined.
  """
  b, s, _ = routing.expert.shape
  expert_mask = jax.nn.one_hot(routing.expert, num_experts, dtype=jnp.float32)
  # A dropped choice has slot >= C: one_hot gives it an all-zero row.
  slot_mask = jax.nn.one_hot(routing.slot, capacity, dtype=jnp.float32)
  # [B, S, E, C]: which (expert, slot) each token occupies, over its K choices.
  dispatch = jnp.einsum("bske,bskc->bsec", expert_mask, slot_mask)
  token_ids = jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32), (b, s))
  table = jnp.einsum("bs,bsec->bec", token_ids, dispatch)
  return jnp.round(table).astype(jnp.int32)


class MoeFfn(nn.Module):
  """Mixture of E expert FFNs (d -> h -> d, SiLU) with top-K routing per token.

  Drop-in for the FFN of a transformer layer (``ffn(hidden_features=..., dtype=...,
  name=...)``, applied as ``ffn(x, deterministic=...)``); returns ``(y, aux)``.
  Tokens are every position of ``x`` but the last axis, grouped per image (axis
  0): x of shape [B, P, N, d] routes the P * N tokens of each image.

  Attributes:
    hidden_features: the dense FFN's hidden width (given by the host layer).
    num_experts: E.
    num_selected: K, 1 or 2 (any K <= E works).
    expert_hidden_ratio: each expert's hidden width is
      ``int(hidden_features * expert_hidden_ratio)``.
    capacity_factor_train: cf while training (V-MoE: 1.05).
    capacity_factor_eval: cf at eval and in exported files.
    noise_scale: training noise std is ``noise_scale / E`` (V-MoE: 1).
    capacity_multiple: capacity rounded up to this multiple (V-MoE: 4).
    act: the experts' activation (SiLU, as MobileViTv2's ConvMlp).
    dispatch: "gather" runs each expert on its C slots (training); "dense" runs
      every expert on every token with zero weight where not chosen or dropped:
      the same outputs from fewer TFLite ops; "auto" chooses per layer (see
      :meth:`resolved_dispatch`; the export form).
    dtype: compute dtype of the experts; the router runs in float32.
  """

  hidden_features: int
  num_experts: int = 4
  num_selected: int = 1
  expert_hidden_ratio: float = 1.0
  capacity_factor_train: float = 1.05
  capacity_factor_eval: float = 1.25
  noise_scale: float = 1.0
  capacity_multiple: int = 4
  dispatch: str = "gather"
  act: Callable[[jax.Array], jax.Array] = nn.silu
  dtype: Dtype = jnp.float32

  def capacity(self, num_tokens: int, train: bool) -> int:
    cf = self.capacity_factor_train if train else self.capacity_factor_eval
    return expert_capacity(num_tokens, self.num_experts, self.num_selected, cf,
                           self.capacity_multiple)

  def resolved_dispatch(self, num_tokens: int, train: bool) -> str:
    """"gather" or "dense" for a layer of `num_tokens` tokens per image.

    "auto" picks "dense" where running every expert on every token costs at
    most twice the expert slots' MACs (S <= 2C: top-2 at cf 1.25), "gather"
    elsewhere (top-1: the dense form would compute 3.2x the slots). That is
    where the dense form was the faster TFLite graph (tools/bench_moe.py).
    """
    if self.dispatch == "auto":
      return "dense" if num_tokens <= 2 * self.capacity(num_tokens, train) else "gather"
    if self.dispatch not in ("gather", "dense"):
      raise ValueError(f"dispatch={self.dispatch!r}; expected 'gather' (slots, "
                       "the training form), 'dense' (every expert on every "
                       "token) or 'auto' (the cheaper of the two; the export "
                       "form).")
    return self.dispatch

  @property
  def expert_hidden(self) -> int:
    return max(1, int(self.hidden_features * self.expert_hidden_ratio))

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    train = not deterministic
    shape, dim = x.shape, x.shape[-1]
    b = shape[0]
    tokens = x.reshape(b, -1, dim)
    s, e, h = tokens.shape[1], self.num_experts, self.expert_hidden
    capacity = self.capacity(s, train)

    logits = nn.Dense(e, use_bias=False, dtype=jnp.float32, name="router")(
        tokens.astype(jnp.float32))
    noise_std = self.noise_scale / e if train else 0.0
    noisy = logits
    if train and noise_std > 0:
      noisy = logits + noise_std * jax.random.normal(self.make_rng("dropout"),
                                                     logits.shape)
    probs = jax.nn.softmax(noisy, axis=-1)
    routing = route(probs, self.num_selected, capacity)
    kernel_init = layers.trunc_normal
    w1 = self.param("wi", kernel_init, (e, dim, h))
    b1 = self.param("bi", nn.initializers.zeros, (e, h))
    w2 = self.param("wo", kernel_init, (e, h, dim))
    b2 = self.param("bo", nn.initializers.zeros, (e, dim))
    experts = (w1.astype(self.dtype), b1.astype(self.dtype), w2.astype(self.dtype),
               b2.astype(self.dtype))
    dispatch = self.resolved_dispatch(s, train)
    if dispatch == "gather":
      y = self._gather_dispatch(tokens.astype(self.dtype), routing, experts, capacity)
    else:
      y = self._dense_dispatch(tokens.astype(self.dtype), routing, experts)
    y = y.reshape(shape)
    # Tokens each expert processed (its kept choices): the same in both forms.
    load = jnp.sum(jax.nn.one_hot(routing.expert, e, dtype=jnp.float32)
                   * routing.kept.astype(jnp.float32)[..., None], axis=(1, 2))

    aux = {
        "moe_expert": routing.expert,
        "moe_gate": routing.gate,
        "moe_kept": routing.kept.astype(jnp.float32),
        "moe_router_logits": logits,
        "moe_router_logits_noisy": noisy,
        "moe_noise_std": jnp.asarray(noise_std, jnp.float32),
        "moe_expert_load": load,
    }
    return y, aux

  def _gather_dispatch(self, tokens, routing: Routing, experts, capacity: int):
    """Runs each expert on its C slots only (what training runs): [B, S, d]."""
    w1, b1, w2, b2 = experts
    b, s, dim = tokens.shape
    e = self.num_experts
    table = slot_table(routing, e, capacity)
    # Dispatch: gather each slot's token ([B*S, d] rows; batch offsets added).
    flat_tokens = tokens.reshape(b * s, dim)
    offsets = (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None]
    expert_in = jnp.take(flat_tokens, (table + offsets).reshape(-1), axis=0,
                         mode="clip").reshape(b, e, capacity, dim)
    hidden = self.act(jnp.einsum("becd,edh->bech", expert_in, w1) + b1[:, None, :])
    expert_out = jnp.einsum("bech,ehd->becd", hidden, w2) + b2[:, None, :]
    # Combine: gather each choice's slot output back to its token.
    flat_out = expert_out.reshape(b * e * capacity, dim)
    index = (jnp.arange(b, dtype=jnp.int32)[:, None, None] * (e * capacity)
             + routing.expert * capacity + jnp.minimum(routing.slot, capacity - 1))
    chosen = jnp.take(flat_out, index.reshape(-1), axis=0, mode="clip")
    chosen = chosen.reshape(b, s, self.num_selected, dim)
    weight = (routing.gate * routing.kept.astype(routing.gate.dtype)).astype(tokens.dtype)
    return jnp.sum(chosen * weight[..., None], axis=2)

  def _dense_dispatch(self, tokens, routing: Routing, experts):
    """Runs every expert on every token and weights each output by its combine
    weight (gate if chosen and kept, else 0): [B, S, d].

    The same outputs as the gather form (a dropped or unchosen expert weighs 0),
    from two plain matmuls: the E experts side by side are one FFN of hidden
    E * h whose hidden units are scaled by their expert's weight. It computes
    E / (K cf) times the slot MACs but no gathers, which is faster in TFLite at
    these sizes (tools/bench_moe.py, table 2).
    """
    w1, b1, w2, b2 = experts
    e, dim, h = w1.shape
    weight = jnp.einsum(
        "bske,bsk->bse", jax.nn.one_hot(routing.expert, e, dtype=routing.gate.dtype),
        routing.gate * routing.kept.astype(routing.gate.dtype)).astype(tokens.dtype)
    hidden = self.act(tokens @ jnp.transpose(w1, (1, 0, 2)).reshape(dim, e * h)
                      + b1.reshape(e * h))
    hidden = hidden * jnp.repeat(weight, h, axis=-1)
    return hidden @ w2.reshape(e * h, dim) + weight @ b2


def layer_macs(num_tokens: int, dim: int, expert_hidden: int, num_experts: int,
               num_selected: int, capacity: int, dispatch: str = "gather"
               ) -> tuple[int, int]:
  """(MACs the layer computes, MACs its tokens use) for one image.

  Computed, "gather" dispatch: router ``S d E``, the dispatch products
  ``S K E C + S E C`` (one-hot product and index table) and every expert slot
  ``E C 2 d h``, whether filled or not. "dense" dispatch: router, the combine
  weights ``S K E``, every expert on every token ``S E 2 d h`` and the weighted
  output biases ``S E d``. Used by the tokens: router plus ``K 2 d h`` per token
  (what a sparse kernel that skipped empty slots would run). Mirrors
  :class:`MoeFfn` exactly; tests check it against the jaxpr count.
  """
  s, d, h, e, k, c = (num_tokens, dim, expert_hidden, num_experts, num_selected,
                      capacity)
  router = s * d * e
  if dispatch == "dense":
    computed = router + s * k * e + s * e * 2 * d * h + s * e * d
  else:
    computed = router + s * k * e * c + s * e * c + e * c * 2 * d * h
  used = router + s * k * 2 * d * h
  return computed, used


def routed_layers(aux: dict[str, Any]) -> list[str]:
  """Sorted prefixes of the MoE layers in a model's aux ("stage5_layer0", ...)."""
  return sorted(k[: -len("/moe_expert")] for k in aux if k.endswith("/moe_expert"))
