"""Sequence parallelism: the token axis split over the mesh axis "seq".

The sequence is cut into `n` contiguous shards, shard j holding tokens
[j * tl, (j + 1) * tl). Three ops need more than their own shard; each is a
`jax.shard_map` over the whole mesh (batch and heads stay sharded as the
rules table says) and is exact, gradients included (plain autodiff through
the collectives):

Causal conv (`causal_conv`): each shard receives the last K - 1 inputs of its
left neighbour (one `ppermute` of [b, K-1, c]); the conv then runs per shard
on [left tail | own tokens] and the first K - 1 outputs are dropped.

Gated delta rule (`gated_delta_rule`): per value head the state update
  S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
is jointly linear in (S_{t-1}, v), so over a shard S_out = A S_in + B with
A = prod_t e^{g_t} (I - beta_t k_t k_t^T)  [dk, dk] and B = the final state
from a zero start [dk, dv]. One run of the rule with the augmented state
[I | 0] (width dk + dv) and values [0 | v] yields both: the final state is
[A | B], and the outputs are [P_t | o0_t] with o0_t the zero-start output and
P_t = A_{1..t}^T (scale q_t) the query carried back to the shard start. Then
  o_t = o0_t + S_in^T P_t        (exact: o_t = S_t^T q_t, S_t linear in S_in)
The (A, B) pairs (dk * (dk + dv) floats per head, whatever the length) are
all-gathered over "seq" and folded in float32, S_in(j+1) = A_j S_in(j) + B_j,
every shard computing every prefix (n is small) and the final state. Packed
documents: a shard whose first token starts a new document gets S_in = 0.
The algebra lives in `pallas_kernels.gated_delta_rule.seq_split`, which
also cuts one sequence into parallel pieces inside a device.
With one shard the rule simply runs with its true initial state. With
`SPContext.gdr_block` set, each shard runs the rule over blocks of that many
tokens, carrying the (augmented) state from block to block and
rematerialising each block in the backward pass: the rule's intermediates
(all of a shard's chunks at once in the chunked jnp implementation) and its
saved per-chunk states then scale with the block, not the shard.

Full attention (`attention`): the few K/V heads are all-gathered over "seq";
queries stay local. Causal work is balanced without moving the tokens the
linear layers see: each shard's queries are split in two halves (2n half
blocks in all) and half block m is processed by shard m if m < n, else by
shard 2n - 1 - m (two `ppermute`s of query halves there, two of outputs
back), so every shard handles half blocks j and 2n - 1 - j and scores
(j + 1) + (2n - j) = 2n + 1 key half blocks. The local attention is a
blockwise online-softmax (flash) loop with a custom VJP that recomputes
probabilities from the saved log-sum-exp; key blocks entirely in the future
of a query block are skipped (`lax.cond`), which is where the balancing
pays.

The model consults `current()` at trace time: `qwen_jax.sharding` activates
a `SPContext` inside the functions it jits, and `GatedDeltaNet` /
`GatedAttention` then route the conv, the rule and attention through here.
Outside such a context nothing changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.gated_delta_rule import api as gdr_api
from pallas_kernels.gated_delta_rule import gated_delta_rule as gdr
from pallas_kernels.gated_delta_rule import seq_split
from qwen_jax.array_typing import Array
from qwen_jax.config import is_int

_NEG = -1e30  # same fill as qwen_jax.attention: rows behave identically
_FAR = np.iinfo(np.int32).max // 2  # position of padded keys (never seen)


@dataclasses.dataclass(frozen=True)
class SPContext:
  """What the sequence-parallel ops need: the mesh and the logical rules.

  Attributes:
    mesh: the device mesh (must have `seq_axis`).
    rules: logical-name -> mesh-axis rules (qwen_jax.sharding.RULES).
    seq_axis: mesh axis the token axis is split over.
    attention_block_q: queries per block of the local flash attention.
    attention_block_k: keys per block of the local flash attention.
    balance_attention: swap query halves so causal work is even.
    gdr_block: when set, each shard runs the gated delta rule over blocks
      of this many tokens (a `lax.scan` carrying the state, each block
      rematerialised in the backward pass), so the rule's per-chunk
      intermediates and saved states are those of one block instead of the
      whole shard. None: one call per shard.
  """
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  seq_axis: str = "seq"
  attention_block_q: int = 512
  attention_block_k: int = 512
  balance_attention: bool = True
  gdr_block: int | None = None

  def __post_init__(self):
    if self.seq_axis not in self.mesh.shape:
      raise ValueError(f"seq_axis: expected an axis of the mesh "
                       f"{dict(self.mesh.shape)}, found {self.seq_axis!r}")
    for name in ("attention_block_q", "attention_block_k", "gdr_block"):
      value = getattr(self, name)
      if name == "gdr_block" and value is None:
        continue
      if not is_int(value) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1"
                         f"{' or None' if name == 'gdr_block' else ''}, "
                         f"found {value!r}")
    if not isinstance(self.balance_attention, (bool, np.bool_)):
      raise ValueError(f"balance_attention: expected True or False, found "
                       f"{self.balance_attention!r}")

  @property
  def num_shards(self) -> int:
    return int(self.mesh.shape[self.seq_axis])

  def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> P:
    """PartitionSpec of an activation from logical names, fitted to shape.

    Mesh axes that do not divide a dimension are dropped (that dimension is
    then replicated over them); the "seq" dimension must divide.
    """
    logical = nn.logical_to_mesh_axes(tuple(names), self.rules)
    out = []
    for name, axes, size in zip(names, logical, shape):
      if axes is None:
        out.append(None)
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      axes = tuple(a for a in axes if a in self.mesh.shape)
      if name == "seq":
        n = math.prod(self.mesh.shape[a] for a in axes)
        if size % n:
          raise ValueError(
              f"sequence length: expected a multiple of the {n} sequence "
              f"shards of the mesh, found {size}")
      while axes and size % math.prod(self.mesh.shape[a] for a in axes):
        axes = axes[:-1]
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)

  def constrain(self, x: Array, spec: P) -> Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


_STACK: list[SPContext] = []


@contextlib.contextmanager
def activate(ctx: SPContext) -> Iterator[SPContext]:
  """Makes `ctx` current while tracing the body (see `current`)."""
  _STACK.append(ctx)
  try:
    yield ctx
  finally:
    _STACK.pop()


def current() -> SPContext | None:
  """The active context, or None (the model then runs unsharded code)."""
  return _STACK[-1] if _STACK else None


def _context(ctx: SPContext | None, op: str) -> SPContext:
  """`ctx`, else the active context; a ValueError naming `op` if none."""
  ctx = ctx or current()
  if ctx is None:
    raise ValueError(
        f"ctx: sequence_parallel.{op} needs a sequence-parallel context, "
        f"found none active; call it inside qwen_jax.sharding.activate(mesh) "
        f"(as the sharded programs do) or pass "
        f"ctx=qwen_jax.sharding.sp_context(mesh)")
  return ctx


def _shard_map(ctx: SPContext, fn, in_specs, out_specs):
  # check_vma=False: the bodies build float32 carries (identity states,
  # zero accumulators) that the per-axis varying-type check would reject;
  # they only use all_gather / ppermute / axis_index, whose transposes do
  # not depend on it.
  return jax.shard_map(fn, mesh=ctx.mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=False)


def _shift_right(x: Array, axis: str, n: int) -> Array:
  """Shard j receives shard j - 1's x; shard 0 receives zeros."""
  if n == 1:
    return jnp.zeros_like(x)
  return jax.lax.ppermute(x, axis, [(i, i + 1) for i in range(n - 1)])


def _join(*axes) -> Any:
  """Merges spec entries (None, a name, or a tuple) into one entry."""
  out = []
  for a in axes:
    if a is None:
      continue
    out.extend((a,) if isinstance(a, str) else a)
  return None if not out else out[0] if len(out) == 1 else tuple(out)


# ------------------------------------------------------------------- conv
def causal_conv(conv_fn: Callable[[Array, Array | None], Array], x: Array,
                kernel_size: int, segment_ids: Array | None = None,
                prefix: Array | None = None,
                ctx: SPContext | None = None) -> Array:
  """Causal depthwise conv of a sequence-sharded x, exact across shards.

  Args:
    conv_fn: (x_blocks [B, K-1+tl, c], segment_ids_blocks or None) -> the
      layer's conv with a zero prefix (it owns the kernel parameter).
    x: [b, t, c] conv inputs, t split over the seq axis.
    kernel_size: K.
    segment_ids: [b, t] packed-document ids or None.
    prefix: [b, K-1, c] inputs before the sequence (a cache) or None.
    ctx: the context; default `current()`.

  Returns:
    [b, t, c], as conv_fn over the whole sequence would give.
  """
  ctx = _context(ctx, "causal_conv")
  b, t, c = x.shape
  n, k1 = ctx.num_shards, kernel_size - 1
  tl = t // n
  if k1 == 0:
    return conv_fn(x, segment_ids)
  xs = ctx.spec(("batch", "seq", "linear_qkv"), x.shape)
  if tl < k1:
    raise ValueError(f"sequence length: expected at least {k1} tokens per "
                     f"sequence shard for the conv, found {tl}")
  seq, bspec = ctx.seq_axis, xs[0]
  has_seg, has_pre = segment_ids is not None, prefix is not None

  def body(*args):
    x = args[0]
    got = _shift_right(x[:, -k1:], seq, n)
    if has_pre:
      pre = args[-1]
      got = jnp.where(jax.lax.axis_index(seq) == 0, pre.astype(got.dtype),
                      got)
    outs = [got]
    if has_seg:
      outs.append(_shift_right(args[1][:, -k1:], seq, n))
    return tuple(outs)

  args, in_specs = [x], [xs]
  out_specs = [xs]
  if has_seg:
    args.append(segment_ids)
    in_specs.append(P(bspec, seq))
    out_specs.append(P(bspec, seq))
  if has_pre:
    args.append(prefix)
    in_specs.append(P(bspec, None, xs[2]))
  tails = _shard_map(ctx, body, tuple(in_specs), tuple(out_specs))(*args)
  # [b, n, K-1 + tl, c] blocks: each shard's own tokens behind its left
  # context; the block axis stays on "seq", so the conv is local.
  spec4 = P(bspec, seq, None, P.UNCONSTRAINED)
  spec3 = P(_join(bspec, seq), None, P.UNCONSTRAINED)
  xb = jnp.concatenate([tails[0].reshape(b, n, k1, c),
                        x.reshape(b, n, tl, c)], axis=2)
  xb = ctx.constrain(xb, spec4).reshape(b * n, k1 + tl, c)
  xb = ctx.constrain(xb, spec3)
  sb = None
  if has_seg:
    sb = jnp.concatenate([tails[1].reshape(b, n, k1),
                          segment_ids.reshape(b, n, tl)], axis=2)
    sb = ctx.constrain(sb, P(bspec, seq, None)).reshape(b * n, k1 + tl)
  y = conv_fn(xb, sb)[:, k1:]
  y = ctx.constrain(y, spec3).reshape(b, n, tl, c)
  y = ctx.constrain(y, spec4).reshape(b, t, c)
  return ctx.constrain(y, P(bspec, seq, P.UNCONSTRAINED))


# ------------------------------------------------------- gated delta rule
def _block_len(t: int, block: int | None, chunk: int) -> int:
  """Tokens per block of a t-token shard (t: no blocking).

  The largest divisor of t that is at most `block` and a multiple of the
  chunk size, else the largest divisor of t at most `block`.
  """
  if block is None or block >= t:
    return t
  best = None
  for c in range(min(block, t), 0, -1):
    if t % c == 0:
      if c % chunk == 0:
        return c
      best = best or c
  return best or t


def _blocked_rule(rule, block: int, q, k, v, g, beta, s0, seg):
  """`rule` over consecutive blocks of `block` tokens, carrying the state.

  Each block runs from the previous block's final state (reset to zero
  where a packed document starts on the block's first token, as the rule
  itself resets mid-block). The block body is a `jax.checkpoint`, so the
  backward pass keeps only the states between blocks.
  """
  b, t = v.shape[:2]
  nb = t // block
  split = lambda x: jnp.moveaxis(  # pylint: disable=g-long-lambda
      x.reshape((b, nb, block) + x.shape[2:]), 1, 0)
  xs = [split(x) for x in (q, k, v, g, beta)]
  has_seg = seg is not None
  if has_seg:
    segs = split(seg)
    # Id of the token before each block (block 0: its own first token).
    before = jnp.concatenate([segs[:1, :, 0], segs[:-1, :, -1]], axis=0)
    keep = segs[:, :, 0] == before  # [nb, b]
    xs += [segs, keep]

  @jax.checkpoint
  def step(s, x):
    if has_seg:
      qb, kb, vb, gb, bb, sb, kp = x
      s = s * kp[:, None, None, None].astype(s.dtype)
    else:
      (qb, kb, vb, gb, bb), sb = x, None
    o, s = rule(qb, kb, vb, gb, bb, initial_state=s, segment_ids=sb)
    return s, o

  final, o = jax.lax.scan(step, s0.astype(jnp.float32), tuple(xs))
  o = jnp.moveaxis(o, 0, 1)
  return o.reshape((b, t) + o.shape[3:]), final


def gated_delta_rule(q: Array, k: Array, v: Array, g: Array, beta: Array,
                     initial_state: Array | None = None,
                     segment_ids: Array | None = None,
                     scale: float | None = None,
                     implementation: str = "auto", interpret: bool = False,
                     chunk_size: int = 64, block_sizes: str = "",
                     ctx: SPContext | None = None) -> tuple[Array, Array]:
  """`gated_delta_rule` over a sequence-sharded input, exact.

  Args:
    q, k: [b, t, hk, dk]; v: [b, t, hv, dv]; g, beta: [b, t, hv] (as in
      pallas_kernels.gated_delta_rule), t split over the seq axis.
    initial_state: [b, hv, dk, dv] state before the sequence, or None.
    segment_ids: [b, t] packed-document ids, or None.
    scale: query scale (default dk ** -0.5).
    implementation, interpret, chunk_size, block_sizes: passed to the rule
      per shard.
    ctx: the context; default `current()`.

  Returns:
    (o [b, t, hv, dv] in v.dtype, final state [b, hv, dk, dv] float32).

  Raises:
    ValueError: no context (none given, none active), or bad arguments,
      named in terms of the global shapes passed here
      (`gated_delta_rule`'s checks, `api.check_inputs`).
  """
  ctx = _context(ctx, "gated_delta_rule")
  gdr_api.check_inputs(q, k, v, g, beta, initial_state, segment_ids, scale,
                       chunk_size)
  b, t, hk, dk = q.shape
  hv, dv = v.shape[2], v.shape[3]
  n, seq = ctx.num_shards, ctx.seq_axis
  qs = ctx.spec(("batch", "seq", "linear_heads_act", None), q.shape)
  vs = ctx.spec(("batch", "seq", "linear_heads_act", None), v.shape)
  if qs[2] != vs[2]:  # key and value heads must split alike
    qs, vs = P(qs[0], seq, None, None), P(vs[0], seq, None, None)
  bspec, hspec = qs[0], qs[2]
  gs = P(bspec, seq, hspec)
  ss = P(bspec, hspec, None, None)
  has_seg = segment_ids is not None
  f32 = jnp.float32
  one_call = functools.partial(gdr, scale=scale,
                               implementation=implementation,
                               interpret=interpret, chunk_size=chunk_size,
                               block_sizes=block_sizes)
  block = _block_len(t // n, ctx.gdr_block, chunk_size)

  def rule(q, k, v, g, beta, initial_state, segment_ids):
    if block == q.shape[1]:
      return one_call(q, k, v, g, beta, initial_state=initial_state,
                      segment_ids=segment_ids)
    return _blocked_rule(one_call, block, q, k, v, g, beta, initial_state,
                         segment_ids)

  def body(q, k, v, g, beta, s0, seg):
    seg = seg if has_seg else None
    if n == 1:
      return rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
    # The shard's own outputs and its affine maps in one call
    # (pallas_kernels.gated_delta_rule.seq_split, which also splits one
    # sequence inside a device).
    o_own, o_map, a, b_own = seq_split.augmented_call(
        rule, q, k, v, g, beta, seg, value_dtype=f32)
    a_all = jax.lax.all_gather(a, seq)
    b_all = jax.lax.all_gather(b_own, seq)
    idx = jax.lax.axis_index(seq)
    cont = None
    if has_seg:
      prev_last = _shift_right(seg[:, -1], seq, n)
      cont = jax.lax.all_gather((seg[:, 0] == prev_last) | (idx == 0), seq)
    ins, final = seq_split.fold_states(a_all, b_all, s0, cont)
    return seq_split.apply_incoming(o_own, o_map, ins[idx], v.dtype), final

  if initial_state is None:
    initial_state = jnp.zeros((b, hv, dk, dv), f32)
  seg_arg = segment_ids if has_seg else jnp.zeros((b, t), jnp.int32)
  fn = _shard_map(ctx, body, (qs, qs, vs, gs, gs, ss, P(bspec, seq)),
                  (vs, ss))
  return fn(q, k, v, g, beta, initial_state, seg_arg)


# ------------------------------------------------------ flash attention
def _pad_axis(x: Array, axis: int, to: int, value) -> Array:
  pad = to - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _block_mask(qp, kp, kvalid, qseg, kseg):
  """[b, bq, bk] bool: key visible to query (causal, valid, same doc)."""
  m = (kp[None, None, :] <= qp[None, :, None]) & kvalid[:, None, :]
  if qseg is not None:
    m &= qseg[:, :, None] == kseg[:, None, :]
  return m


def _flash_fwd_blocks(q, k, v, q_pos, k_pos, kvalid, qseg, kseg, bq, bk):
  """Forward over padded blocks. q [b, nq*bq, n, g, e] (pre-scaled).

  Returns o [b, nq*bq, n, g, e] (v.dtype) and lse [b, n, g, nq*bq] (f32).
  """
  b, tq, n, grp, e = q.shape
  s = k.shape[1]
  nq, nk = tq // bq, s // bk
  kmin = k_pos.reshape(nk, bk).min(axis=1)
  has_seg = qseg is not None

  def q_block(i):
    qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, 1)
    qp = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq, 0)
    qsb = (jax.lax.dynamic_slice_in_dim(qseg, i * bq, bq, 1)
           if has_seg else None)
    qmax = qp.max()

    def k_step(carry, j):
      def compute(carry):
        m, l, acc = carry
        kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 1)
        vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 1)
        kp = jax.lax.dynamic_slice_in_dim(k_pos, j * bk, bk, 0)
        kv = jax.lax.dynamic_slice_in_dim(kvalid, j * bk, bk, 1)
        ksb = (jax.lax.dynamic_slice_in_dim(kseg, j * bk, bk, 1)
               if has_seg else None)
        sc = jnp.einsum("btnge,bsne->bngts", qb, kb,
                        preferred_element_type=jnp.float32)
        mask = _block_mask(qp, kp, kv, qsb, ksb)
        sc = jnp.where(mask[:, None, None], sc, _NEG)
        m_new = jnp.maximum(m, sc.max(-1))
        p = jnp.exp(sc - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bngts,bsne->bngte", p.astype(v.dtype), vb,
                        preferred_element_type=jnp.float32)
        acc = acc * corr[..., None] + pv
        return m_new, l, acc
      return jax.lax.cond(kmin[j] <= qmax, compute, lambda c: c, carry), None

    init = (jnp.full((b, n, grp, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, n, grp, bq), jnp.float32),
            jnp.zeros((b, n, grp, bq, e), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(k_step, init, jnp.arange(nk))
    safe = jnp.where(l > 0, l, 1.0)
    o = jnp.where((l > 0)[..., None], acc / safe[..., None], 0.0)
    lse = jnp.where(l > 0, m + jnp.log(safe), jnp.inf)
    return jnp.moveaxis(o, 3, 1).astype(v.dtype), lse  # [b, bq, n, g, e]

  o, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, b, bq, ...]
  o = jnp.moveaxis(o, 0, 1).reshape(b, tq, n, grp, e)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, n, grp, tq)
  return o, lse


def _flash_bwd_blocks(q, k, v, q_pos, k_pos, kvalid, qseg, kseg, o, lse, do,
                      bq, bk):
  """Gradients (dq, dk, dv) of the blockwise attention, recomputing p."""
  b, tq, n, grp, e = q.shape
  s = k.shape[1]
  nq, nk = tq // bq, s // bk
  kmin = k_pos.reshape(nk, bk).min(axis=1)
  has_seg = qseg is not None
  f32 = jnp.float32
  # D_i = sum_e do_i o_i  [b, n, g, tq]
  dsum = jnp.einsum("btnge,btnge->bngt", do.astype(f32), o.astype(f32))

  def q_block(carry, i):
    dk_acc, dv_acc = carry
    qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, 1)
    dob = jax.lax.dynamic_slice_in_dim(do, i * bq, bq, 1)
    qp = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq, 0)
    lb = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, 3)
    db = jax.lax.dynamic_slice_in_dim(dsum, i * bq, bq, 3)
    qsb = (jax.lax.dynamic_slice_in_dim(qseg, i * bq, bq, 1)
           if has_seg else None)
    qmax = qp.max()

    def k_step(carry, j):
      def compute(carry):
        dq_b, dk_acc, dv_acc = carry
        kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 1)
        vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 1)
        kp = jax.lax.dynamic_slice_in_dim(k_pos, j * bk, bk, 0)
        kv = jax.lax.dynamic_slice_in_dim(kvalid, j * bk, bk, 1)
        ksb = (jax.lax.dynamic_slice_in_dim(kseg, j * bk, bk, 1)
               if has_seg else None)
        sc = jnp.einsum("btnge,bsne->bngts", qb, kb,
                        preferred_element_type=f32)
        mask = _block_mask(qp, kp, kv, qsb, ksb)
        sc = jnp.where(mask[:, None, None], sc, _NEG)
        p = jnp.exp(sc - lb[..., None])  # [b, n, g, bq, bk]
        dv_j = jnp.einsum("bngts,btnge->bsne", p.astype(dob.dtype), dob,
                          preferred_element_type=f32)
        dp = jnp.einsum("btnge,bsne->bngts", dob, vb,
                        preferred_element_type=f32)
        ds = p * (dp - db[..., None])
        dq_b = dq_b + jnp.einsum("bngts,bsne->btnge", ds.astype(kb.dtype), kb,
                                 preferred_element_type=f32)
        dk_j = jnp.einsum("bngts,btnge->bsne", ds.astype(qb.dtype), qb,
                          preferred_element_type=f32)
        dk_acc = jax.lax.dynamic_update_slice_in_dim(
            dk_acc, jax.lax.dynamic_slice_in_dim(dk_acc, j * bk, bk, 1)
            + dk_j, j * bk, 1)
        dv_acc = jax.lax.dynamic_update_slice_in_dim(
            dv_acc, jax.lax.dynamic_slice_in_dim(dv_acc, j * bk, bk, 1)
            + dv_j, j * bk, 1)
        return dq_b, dk_acc, dv_acc
      return jax.lax.cond(kmin[j] <= qmax, compute, lambda c: c, carry), None

    init = (jnp.zeros((b, bq, n, grp, e), f32), dk_acc, dv_acc)
    (dq_b, dk_acc, dv_acc), _ = jax.lax.scan(k_step, init, jnp.arange(nk))
    return (dk_acc, dv_acc), dq_b

  zeros = jnp.zeros((b, s, n, e), f32)
  (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), jnp.arange(nq))
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, tq, n, grp, e)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _flash(q, k, v, q_pos, k_pos, kvalid, qseg, kseg, bq, bk):
  return _flash_fwd_blocks(q, k, v, q_pos, k_pos, kvalid, qseg, kseg, bq,
                           bk)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, kvalid, qseg, kseg, bq, bk):
  o, lse = _flash_fwd_blocks(q, k, v, q_pos, k_pos, kvalid, qseg, kseg, bq,
                             bk)
  return o, (q, k, v, q_pos, k_pos, kvalid, qseg, kseg, o, lse)


def _flash_bwd(bq, bk, res, do):
  q, k, v, q_pos, k_pos, kvalid, qseg, kseg, o, lse = res
  dq, dk, dv = _flash_bwd_blocks(q, k, v, q_pos, k_pos, kvalid, qseg, kseg,
                                 o, lse, do, bq, bk)
  zero = lambda x: None if x is None else np.zeros(x.shape,  # pylint: disable=g-long-lambda
                                                   jax.dtypes.float0)
  return (dq, dk, dv, zero(q_pos), zero(k_pos), zero(kvalid), zero(qseg),
          zero(kseg))


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array,
                    key_valid: Array | None = None,
                    q_seg: Array | None = None, k_seg: Array | None = None,
                    block_q: int = 512, block_k: int = 512) -> Array:
  """Blockwise causal GQA attention (online softmax, custom VJP), in jnp.

  Same result as `qwen_jax.attention.dot_product_attention` for every query
  that sees at least one key; memory O(block_q * block_k) per head instead
  of O(t * s), and key blocks wholly after a query block are skipped.

  Args:
    q: [b, t, h, e]; k, v: [b, s, n, e] with h a multiple of n.
    q_pos: [t] query positions; k_pos: [s] key positions (visible when
      k_pos <= q_pos). Shared by the batch.
    key_valid: [b, s] bool or None (all valid).
    q_seg, k_seg: [b, t] / [b, s] packed-document ids, or None.
    block_q, block_k: block sizes (clipped to t and s).

  Returns:
    [b, t, h, e] in v.dtype.
  """
  b, t, h, e = q.shape
  s, n = k.shape[1], k.shape[2]
  bq, bk = min(block_q, t), min(block_k, s)
  tq_p, s_p = -(-t // bq) * bq, -(-s // bk) * bk
  qg = (q * (e ** -0.5)).astype(q.dtype).reshape(b, t, n, h // n, e)
  qg = _pad_axis(qg, 1, tq_p, 0)
  q_pos = _pad_axis(q_pos.astype(jnp.int32), 0, tq_p, -1)
  kp = _pad_axis(k, 1, s_p, 0)
  vp = _pad_axis(v, 1, s_p, 0)
  k_pos = _pad_axis(k_pos.astype(jnp.int32), 0, s_p, _FAR)
  if key_valid is None:
    key_valid = jnp.ones((b, s), bool)
  key_valid = _pad_axis(key_valid.astype(bool), 1, s_p, False)
  if q_seg is not None:
    q_seg = _pad_axis(q_seg, 1, tq_p, -1)
    k_seg = _pad_axis(k_seg, 1, s_p, -2)
  o = _flash(qg, kp, vp, q_pos, k_pos, key_valid, q_seg, k_seg, bq, bk)
  return o[:, :t].reshape(b, t, h, e)


# -------------------------------------------------------------- attention
def _half_owner(m: int, n: int) -> int:
  """Shard that processes query half block m (zig-zag balancing)."""
  return m if m < n else 2 * n - 1 - m


def attention(q: Array, k: Array, v: Array,
              key_valid: Array | None = None,
              segment_ids: Array | None = None,
              ctx: SPContext | None = None) -> Array:
  """Causal GQA attention over a sequence-sharded input (by token index).

  Args:
    q: [b, t, h, e] queries (RoPE applied); k, v: [b, t, n, e]; t split over
      the seq axis. Query i sees key j iff j <= i (global indices).
    key_valid: [b, t] padding mask (True/1 = token) or None.
    segment_ids: [b, t] packed-document ids or None.
    ctx: the context; default `current()`.

  Returns:
    [b, t, h, e] in v.dtype.
  """
  ctx = _context(ctx, "attention")
  b, t, h, e = q.shape
  n, seq = ctx.num_shards, ctx.seq_axis
  qs = ctx.spec(("batch", "seq", "heads", None), q.shape)
  ks = ctx.spec(("batch", "seq", "kv_heads_act", None), k.shape)
  if qs[2] != ks[2]:
    qs, ks = P(qs[0], seq, None, None), P(ks[0], seq, None, None)
  bspec = qs[0]
  tl = t // n
  balance = ctx.balance_attention and n > 1 and tl % 2 == 0
  has_seg = segment_ids is not None
  bq, bk = ctx.attention_block_q, ctx.attention_block_k

  def body(q, k, v, kvalid, seg):
    idx = jax.lax.axis_index(seq)
    # One shard: its keys are all the keys (XLA would still copy them).
    gather = ((lambda x: x) if n == 1 else functools.partial(
        jax.lax.all_gather, axis_name=seq, axis=1, tiled=True))
    kg, vg, kval = gather(k), gather(v), gather(kvalid)
    kseg = gather(seg) if has_seg else None
    k_pos = jnp.arange(t, dtype=jnp.int32)
    attend = functools.partial(flash_attention, block_q=bq, block_k=bk)
    if not balance:
      q_pos = idx * tl + jnp.arange(tl, dtype=jnp.int32)
      return attend(q, kg, vg, q_pos, k_pos, kval, seg if has_seg else None,
                    kseg)
    hl = tl // 2
    perm_a = [(j, _half_owner(2 * j, n)) for j in range(n)]
    perm_b = [(j, _half_owner(2 * j + 1, n)) for j in range(n)]
    inv = lambda perm: [(d, s) for s, d in perm]  # pylint: disable=g-long-lambda
    # Half block received through perm_a is even, through perm_b odd.
    m_a = jnp.where(idx % 2 == 0, idx, 2 * n - 1 - idx)
    m_b = jnp.where(idx % 2 == 1, idx, 2 * n - 1 - idx)
    ar = jnp.arange(hl, dtype=jnp.int32)
    outs = []
    for half, perm, m in ((slice(0, hl), perm_a, m_a),
                          (slice(hl, tl), perm_b, m_b)):
      qh = jax.lax.ppermute(q[:, half], seq, perm)
      sh = jax.lax.ppermute(seg[:, half], seq, perm) if has_seg else None
      oh = attend(qh, kg, vg, m * hl + ar, k_pos, kval, sh, kseg)
      outs.append(jax.lax.ppermute(oh, seq, inv(perm)))
    return jnp.concatenate(outs, axis=1)

  if key_valid is None:
    key_valid = jnp.ones((b, t), bool)
  seg_arg = segment_ids if has_seg else jnp.zeros((b, t), jnp.int32)
  ms = P(bspec, seq)
  fn = _shard_map(ctx, body, (qs, ks, ks, ms, ms), qs)
  return fn(q, k, v, key_valid.astype(bool), seg_arg)
