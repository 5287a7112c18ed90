"""The mixture-of-experts MLP of Qwen3.5's MoE models.

A layer whose `cfg.mlp_types[i]` is "moe" replaces the dense SwiGLU with
(transformers' models/qwen3_5_moe `Qwen3_5MoeSparseMoeBlock`):

  p        = softmax(x W_router)                      [T, E], float32
  (w, e)   = top_k(p, k);  w = w / sum(w)             k experts per token
  routed   = sum_j w_j * SwiGLU_{e_j}(x)              experts of width I
  y        = routed + sigmoid(x w_gate) * SwiGLU_shared(x)

Parameters (under the layer's `mlp`): `router/kernel [d, E]`, the stacked
experts `gate_up_proj [E, d, 2I]` (the gate's I columns, then the up
projection's) and `down_proj [E, I, d]`, `shared_expert/{gate,up,down}_proj`
and `shared_expert_gate/kernel [d, 1]`. The stacked experts are
transformers' fused `experts.gate_up_proj [E, 2I, d]` and
`experts.down_proj [E, d, I]` with the last two axes swapped, as every
torch Linear is transposed here.

Dropless: every (token, expert) pair is computed. `moe_implementation`
"ragged" sorts the T * k pairs by expert and runs one grouped matmul per
projection (`jax.lax.ragged_dot`, group sizes = tokens per expert), so the
work is that of the chosen experts only; "dense" runs every expert on every
token and weights the results by the routing (E / k times the work; the
plain reference, and a choice for tiny models).

Expert parallelism (a mesh with an "expert" axis): each device holds
E / n experts, and tokens reach them by `cfg.moe_dispatch`, a gather of
the expert group's tokens or an all-to-all of the routed pairs
(`experts_expert_parallel`); the all-to-all may cap each destination's
pairs (`cfg.moe_capacity_factor`, `pair_capacity`) and drop the rest.

The router's statistics for the load-balancing loss (Switch Transformer,
arXiv:2101.03961, eqs. 4-6, as transformers' `load_balancing_loss_func`)
are sown into the "intermediates" collection as `router_stats`: per
expert, the fraction of routed slots it received and its mean routing
probability, over the tokens of the call (`router_stats` below).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen_jax import layers
from qwen_jax import sequence_parallel
from qwen_jax.array_typing import Array
from qwen_jax.config import QwenConfig
from qwen_jax.mlp import MLP


def route(logits: Array, k: int) -> tuple[Array, Array]:
  """Top-k routing: (weights [T, k] float32 summing to 1, experts [T, k]).

  The softmax is over all experts in float32, the k largest are kept and
  renormalised (transformers' `Qwen3_5MoeTopKRouter`).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top, idx = jax.lax.top_k(probs, k)
  return top / jnp.sum(top, axis=-1, keepdims=True), idx


def router_stats(logits: Array, idx: Array, num_experts: int,
                 mask: Array | None = None) -> Array:
  """[2, E] float32: the fraction of routed slots each expert got, and its
  mean routing probability, over the tokens where `mask` ([T]) is True."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  m = (jnp.ones(logits.shape[:1], jnp.float32) if mask is None
       else mask.astype(jnp.float32))
  n = jnp.maximum(jnp.sum(m), 1.0)
  counts = jnp.zeros((num_experts,), jnp.float32).at[idx].add(
      jnp.broadcast_to(m[:, None], idx.shape))
  return jnp.stack([counts / n, jnp.sum(probs * m[:, None], axis=0) / n])


def load_balancing_loss(stats: Array) -> Array:
  """E * sum_e f_e P_e from `router_stats` (one layer's [2, E] or a stack's
  [..., 2, E], averaged over the leading axes first, as transformers sums
  counts and probabilities over layers before the product)."""
  s = stats.reshape((-1,) + stats.shape[-2:]).mean(axis=0)
  return stats.shape[-1] * jnp.sum(s[0] * s[1])


def _sown(intermediates, name: str) -> list[Array]:
  """The values the layers sowed under `name`, in tree order."""
  return [x for path, x in jax.tree_util.tree_flatten_with_path(
      intermediates)[0] if any(getattr(k, "key", None) == name
                               for k in path)]


def collected_router_stats(intermediates) -> Array:
  """[n, 2, E]: every "moe" layer's `router_stats` from the
  "intermediates" collection of `Qwen35.apply(..., mutable=
  ["intermediates"])` (a scanned stack's come with a leading periods
  axis, flattened here)."""
  leaves = _sown(intermediates, "router_stats")
  if not leaves:
    raise ValueError("intermediates: expected router_stats of mixture-of-"
                     "experts layers, found none (a dense model?)")
  return jnp.concatenate([x.reshape((-1,) + x.shape[-2:]) for x in leaves])


def load_summary(stats: Array, k: int) -> dict[str, Array]:
  """Scalars of the routing for metrics: the load-balancing loss and the
  busiest and idlest expert's share of the routed slots relative to an
  even share (1 = balanced; 0 = an expert received no token)."""
  load = stats[:, 0] * stats.shape[-1] / k  # [n, E], mean 1 per layer
  return {"router_aux_loss": load_balancing_loss(stats),
          "expert_load_max": jnp.max(load),
          "expert_load_min": jnp.min(load)}


def routing_metrics(intermediates, k: int) -> dict[str, Array]:
  """`load_summary` of the collected router statistics, plus
  "expert_dropped_share" (the mean over layers of the routed pairs
  dropped) where a capacity factor may drop pairs (`moe_capacity_factor`
  with the all-to-all dispatch); elsewhere every pair is computed."""
  out = load_summary(collected_router_stats(intermediates), k)
  dropped = _sown(intermediates, "dropped_share")
  if dropped:
    out["expert_dropped_share"] = jnp.mean(
        jnp.concatenate([x.reshape(-1) for x in dropped]))
  return out


def experts_ragged(x: Array, weights: Array, idx: Array, gate_up: Array,
                   down: Array) -> Array:
  """The routed experts' sum by grouped matmuls over expert-sorted pairs.

  Args:
    x: [T, d] tokens.
    weights: [T, k] routing weights.
    idx: [T, k] int expert ids.
    gate_up: [E, d, 2I] stacked gate and up projections.
    down: [E, I, d] stacked down projections.

  Returns:
    [T, d]: sum_j weights[:, j] * SwiGLU_{idx[:, j]}(x), in x's dtype.
  """
  t, k = idx.shape
  e = gate_up.shape[0]
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.zeros((e,), jnp.int32).at[flat].add(1)
  xs = x[order // k]
  h = jax.lax.ragged_dot(xs, gate_up.astype(x.dtype), group_sizes)
  g, u = jnp.split(h, 2, axis=-1)
  y = jax.lax.ragged_dot(jax.nn.silu(g) * u, down.astype(x.dtype),
                         group_sizes)
  y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
  # Back to (token, slot) order; the k slots of a token are summed.
  inverse = jnp.argsort(order)
  return y[inverse].reshape(t, k, -1).sum(axis=1)


def experts_dense(x: Array, weights: Array, idx: Array, gate_up: Array,
                  down: Array) -> Array:
  """`experts_ragged`'s result with every expert run on every token."""
  e = gate_up.shape[0]
  combine = jnp.zeros((x.shape[0], e), jnp.float32).at[
      jnp.arange(x.shape[0])[:, None], idx].add(weights.astype(jnp.float32))
  h = jnp.einsum("td,edf->tef", x, gate_up.astype(x.dtype))
  g, u = jnp.split(h, 2, axis=-1)
  y = jnp.einsum("tei,eid->ted", jax.nn.silu(g) * u, down.astype(x.dtype))
  return jnp.einsum("ted,te->td", y, combine.astype(y.dtype))


EXPERT_IMPLEMENTATIONS = {"ragged": experts_ragged, "dense": experts_dense}

# The experts as the decode layout stores them (`qwen_jax.quantize`):
# output-major matrices [E, out, in] in the layout's dtype, with a float32
# scale [E, out] per output channel when they are int8 (w ~ q * scale).
GATE_UP_T, GATE_UP_SCALE = "gate_up_proj_t", "gate_up_proj_scale"
DOWN_T, DOWN_SCALE = "down_proj_t", "down_proj_scale"
# Routed (token, expert) pairs up to which the stored experts are read pair
# by pair (a decoded token reads its k experts' matrices and no other);
# above it every expert is converted once for the grouped matmul.
GATHER_PAIRS_MAX = 16


def _stored_as_float(w_t: Array, scale: Array | None, dtype: Any) -> Array:
  """Stored matrices [..., out, in] as `dtype` values in float32 (an int8
  matrix exactly; its scale is applied after the product)."""
  if w_t.dtype == jnp.int8 or scale is not None:
    return w_t.astype(jnp.float32)
  return w_t.astype(dtype).astype(jnp.float32)


def experts_stored(x: Array, weights: Array, idx: Array, gate_up_t: Array,
                   gate_up_scale: Array | None, down_t: Array,
                   down_scale: Array | None) -> Array:
  """`experts_ragged`'s result from the decode layout's experts.

  Up to GATHER_PAIRS_MAX routed pairs, each pair's two matrices are
  gathered and applied as `Dense` computes (inputs rounded to x's dtype,
  float32 sums, an int8 matrix's scale applied per output channel, the
  result in x's dtype): decoding reads the routed experts alone. Above it
  every expert is converted to x's dtype and `experts_ragged` runs.

  Args:
    x: [T, d] tokens; weights, idx: [T, k] routing.
    gate_up_t: [E, 2I, d]; down_t: [E, d, I] (float, or int8 with the
      scales gate_up_scale [E, 2I] and down_scale [E, d]; else None).
  """
  dtype = x.dtype
  t, k = idx.shape
  if t * k > GATHER_PAIRS_MAX:
    def dense(w_t, scale):
      w = _stored_as_float(w_t, scale, dtype)
      if scale is not None:
        w = w * scale.astype(jnp.float32)[..., None]
      return jnp.swapaxes(w, -1, -2).astype(dtype)
    return experts_ragged(x, weights, idx, dense(gate_up_t, gate_up_scale),
                          dense(down_t, down_scale))

  def product(h, w_t, scale):  # h [T, k, in] -> [T, k, out] per pair
    y = jnp.einsum("tki,tkoi->tko", h.astype(jnp.float32),
                   _stored_as_float(w_t[idx], scale, dtype))
    if scale is not None:
      y = y * scale[idx].astype(jnp.float32)
    return y.astype(dtype)

  h = product(jnp.broadcast_to(x[:, None, :], (t, k, x.shape[-1])),
              gate_up_t, gate_up_scale)
  g, u = jnp.split(h, 2, axis=-1)
  y = product(jax.nn.silu(g) * u, down_t, down_scale)
  y = y * weights[..., None].astype(y.dtype)
  return y.sum(axis=1)


# The mesh axis the experts' weights are split over (qwen_jax.sharding).
EXPERT_AXIS = "expert"


def _local_experts(x: Array, weights: Array, idx: Array, gate_up: Array,
                   down: Array, axis: str) -> Array:
  """One expert shard's part of `experts_ragged` (inside a shard_map).

  This shard holds experts [s * E_l, (s + 1) * E_l); the pairs routed
  elsewhere go to an extra all-zero group, so the grouped matmul keeps a
  static shape and they add nothing. The shards' parts sum to the whole.
  """
  e_local = gate_up.shape[0]
  shard = jax.lax.axis_index(axis)
  local = idx - shard * e_local
  here = (local >= 0) & (local < e_local)
  local = jnp.where(here, local, e_local)
  zero = lambda w: jnp.zeros((1,) + w.shape[1:], w.dtype)
  return experts_ragged(
      x, jnp.where(here, weights, 0).astype(weights.dtype), local,
      jnp.concatenate([gate_up, zero(gate_up)]),
      jnp.concatenate([down, zero(down)]))


def pair_capacity(tokens: int, k: int, e_local: int, n: int,
                  capacity_factor: float) -> int:
  """Slots per destination device of the all-to-all dispatch.

  One device sends at most tokens * min(k, e_local) pairs to another
  (a token's k experts are distinct), so that many is dropless; a
  capacity factor c > 0 allows ceil(c * tokens * k / n), an even share
  times c, and never more than the dropless size.
  """
  dropless = tokens * min(k, e_local)
  if capacity_factor <= 0:
    return dropless
  return max(1, min(dropless, math.ceil(capacity_factor * tokens * k / n)))


def _all_to_all_experts(x: Array, weights: Array, idx: Array,
                        gate_up: Array, down: Array, axis: str, n: int,
                        capacity_factor: float) -> tuple[Array, Array]:
  """One device's part of the all-to-all dispatch (inside a shard_map).

  The T * k (token, expert) pairs, token-major, go to bucket
  `expert // E_l` (the device holding the expert) in that order; a
  bucket keeps its first `pair_capacity` pairs. An all-to-all over
  `axis` hands each device the pairs of its experts from every device,
  it runs them as one grouped matmul (empty slots in an all-zero group),
  a second all-to-all returns the results to the pairs' devices, which
  weight them and sum each token's k slots.

  Args:
    x: [T, d] this device's tokens; weights, idx: [T, k].
    gate_up, down: this device's E_l experts.
    axis: the expert mesh axis, of size n.
    capacity_factor: see `pair_capacity`.

  Returns:
    ([T, d] routed sum, the number of pairs dropped here as float32).
  """
  t, k = idx.shape
  d = x.shape[-1]
  e_local = gate_up.shape[0]
  cap = pair_capacity(t, k, e_local, n, capacity_factor)
  flat = idx.reshape(-1)
  dest = flat // e_local
  # Each pair's place in its bucket: how many earlier pairs share it.
  onehot = jax.nn.one_hot(dest, n, dtype=jnp.int32)
  place = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
  kept = place < cap
  slot = jnp.where(kept, dest * cap + place, n * cap)  # n * cap: dropped
  send_x = jnp.zeros((n * cap, d), x.dtype).at[slot].set(
      x[jnp.arange(t * k) // k], mode="drop")
  send_e = jnp.full((n * cap,), e_local, jnp.int32).at[slot].set(
      flat % e_local, mode="drop")
  recv_x, recv_e = (
      jax.lax.all_to_all(a.reshape((n, cap) + a.shape[1:]), axis, 0, 0)
      for a in (send_x, send_e))
  zero = lambda w: jnp.zeros((1,) + w.shape[1:], w.dtype)
  y = experts_ragged(
      recv_x.reshape(n * cap, d), jnp.ones((n * cap, 1), x.dtype),
      recv_e.reshape(n * cap, 1), jnp.concatenate([gate_up, zero(gate_up)]),
      jnp.concatenate([down, zero(down)]))
  back = jax.lax.all_to_all(y.reshape(n, cap, d), axis, 0, 0)
  back = back.reshape(n * cap, d)[jnp.minimum(slot, n * cap - 1)]
  w = jnp.where(kept, weights.reshape(-1), 0).astype(back.dtype)
  out = (back * w[:, None]).reshape(t, k, d).sum(axis=1)
  return out, jnp.sum(~kept).astype(jnp.float32)


def experts_expert_parallel(ctx: sequence_parallel.SPContext, x: Array,
                            weights: Array, idx: Array, gate_up: Array,
                            down: Array, dispatch: str = "gather",
                            capacity_factor: float = 0.0
                            ) -> tuple[Array, Array]:
  """`experts_ragged` with the experts split over the mesh's expert axis.

  Each device holds E / n experts. When the batch is split over the expert
  axis too (with data and fsdp; tokens over seq), the expert group's
  tokens reach the experts by `dispatch`:

    "gather"      a device gathers the group's tokens, runs its experts on
                  the pairs routed to them, and a reduce-scatter over the
                  axis sums the parts and returns each device its tokens;
    "all_to_all"  a device sends each of its (token, expert) pairs to the
                  expert's device and gets the results back
                  (`_all_to_all_experts`): each device receives the pairs
                  it computes rather than every token of the group.

  When the batch does not divide over the axis (it is then replicated over
  it), every device has the group's tokens already: it runs its experts
  on them and a sum over the axis combines the parts.

  Args:
    ctx: the active sharding context (its mesh has EXPERT_AXIS).
    x: [b, t, d]; weights, idx: [b, t, k]; gate_up: [E, d, 2I];
      down: [E, I, d].
    dispatch: "gather" or "all_to_all".
    capacity_factor: "all_to_all" only; see `pair_capacity`.

  Returns:
    ([b, t, d], the share of the routed pairs dropped: 0 but for
    "all_to_all" with a capacity factor).

  Raises:
    ValueError: E not a multiple of the expert axis' size.
  """
  n = int(ctx.mesh.shape[EXPERT_AXIS])
  if gate_up.shape[0] % n:
    raise ValueError(f"num_experts: expected a multiple of the mesh's "
                     f"{EXPERT_AXIS} axis ({n}), found {gate_up.shape[0]}")
  xs = ctx.spec(("batch", "seq", None), x.shape)
  ks = ctx.spec(("batch", "seq", None), idx.shape)
  es = P(EXPERT_AXIS, None, None)

  batch_axes = xs[0] if isinstance(xs[0], tuple) else (xs[0],)
  split = EXPERT_AXIS in batch_axes
  every_axis = tuple(ctx.mesh.axis_names)

  def body(xl, wl, il, gl, dl):
    b, t, d = xl.shape
    k = il.shape[-1]
    if split and dispatch == "all_to_all":
      y, dropped = _all_to_all_experts(
          xl.reshape(b * t, d), wl.reshape(b * t, k), il.reshape(b * t, k),
          gl, dl, EXPERT_AXIS, n, capacity_factor)
      # Every device holds as many pairs: the mean of the shares is the
      # share of the whole batch.
      share = jax.lax.pmean(dropped / (b * t * k), every_axis)
      return y.reshape(b, t, d), share
    if split:  # the expert group's tokens, batch-major
      xl, wl, il = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
                    for a in (xl, wl, il))
      b = xl.shape[0]
    y = _local_experts(xl.reshape(b * t, d), wl.reshape(b * t, -1),
                       il.reshape(b * t, -1), gl, dl, EXPERT_AXIS)
    y = y.reshape(b, t, d)
    if split:
      y = jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0,
                               tiled=True)
    else:
      y = jax.lax.psum(y, EXPERT_AXIS)
    return y, jnp.zeros((), jnp.float32)

  return jax.shard_map(body, mesh=ctx.mesh, in_specs=(xs, ks, ks, es, es),
                       out_specs=(xs, P()), check_vma=False)(
                           x, weights, idx, gate_up, down)


def _expert_context() -> sequence_parallel.SPContext | None:
  """The active sharding context when its mesh splits the experts."""
  ctx = sequence_parallel.current()
  if ctx is None or ctx.mesh.shape.get(EXPERT_AXIS, 1) == 1:
    return None
  return ctx


class SparseMoeBlock(nn.Module):
  """Routed experts plus a gated shared expert (see the module docstring).

  Attributes:
    cfg: the model config (num_experts, num_experts_per_tok,
      moe_intermediate_size, shared_expert_intermediate_size,
      moe_implementation).
  """
  cfg: QwenConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """[b, t, d] -> [b, t, d]; `mask` ([b, t], True = token) only limits
    the router statistics to real tokens."""
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t, d = x.shape
    e, k, f = (cfg.num_experts, cfg.num_experts_per_tok,
               cfg.moe_intermediate_size)
    xf = x.reshape(b * t, d).astype(dtype)
    logits = layers.Dense(e, ("embed", None), False, dtype, pdtype,
                          name="router")(xf)
    weights, idx = route(logits, k)
    self.sow("intermediates", "router_stats", router_stats(
        logits, idx, e, None if mask is None else mask.reshape(-1)))
    # transformers casts the renormalised weights to the logits' dtype.
    weights = weights.astype(dtype)
    ctx = _expert_context()
    if self.has_variable("params", GATE_UP_T):  # the decode layout
      if ctx is not None:
        raise ValueError("the decode layout's experts (qwen_jax.quantize) "
                         "run on one device, found an expert mesh axis")
      get = lambda n: (self.get_variable("params", n)
                       if self.has_variable("params", n) else None)
      routed = experts_stored(xf, weights, idx, get(GATE_UP_T),
                              get(GATE_UP_SCALE), get(DOWN_T),
                              get(DOWN_SCALE))
      return self._with_shared_expert(x, routed.reshape(b, t, d))
    init = nn.initializers.normal(0.02)
    gate_up = self.param(
        "gate_up_proj",
        layers.param_init(init, ("expert", "embed", "moe_mlp")),
        (e, d, 2 * f), pdtype)
    down = self.param(
        "down_proj", layers.param_init(init, ("expert", "moe_mlp", "embed")),
        (e, f, d), pdtype)
    if ctx is not None:
      routed, dropped = experts_expert_parallel(
          ctx, xf.reshape(b, t, d), weights.reshape(b, t, k),
          idx.reshape(b, t, k), gate_up.astype(dtype), down.astype(dtype),
          cfg.moe_dispatch, cfg.moe_capacity_factor)
      if cfg.moe_capacity_factor > 0:
        self.sow("intermediates", "dropped_share", dropped)
    else:
      routed = EXPERT_IMPLEMENTATIONS[cfg.moe_implementation](
          xf, weights, idx, gate_up, down)
    return self._with_shared_expert(x, routed.reshape(b, t, d))

  def _with_shared_expert(self, x: Array, routed: Array) -> Array:
    """routed + sigmoid(gate(x)) * shared_expert(x)."""
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    shared = MLP(cfg, cfg.shared_expert_intermediate_size,
                 name="shared_expert")(x)
    gate = layers.Dense(1, ("embed", None), False, dtype, pdtype,
                        name="shared_expert_gate")(x)
    return routed + jax.nn.sigmoid(gate) * shared
