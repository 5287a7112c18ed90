"""The gated delta rule over pieces of a sequence that run in parallel.

The state after a piece is affine in the state before it: S_out = A S_in + B,
and every output is affine in S_in too. One call of any implementation gives
both parts at once: run it from the augmented state [I | 0] (dk + dv
columns) on the augmented values [0 | v]. Then the last dv columns of the
outputs and final state are the piece's own (from a zero state), and the
first dk columns are the maps A (final state) and M_t (outputs, o_t +=
M_t S_in). With each piece's (A, B), a short sequential fold gives every
piece's true incoming state.

Two users of the same algebra:
  * `split_sequence`: one long sequence on one device, cut into pieces that
    become batch rows, so the kernels see `pieces` x more programs (at batch
    1 the sequential pass otherwise has only heads x dv-tiles programs);
  * `qwen_jax.sequence_parallel`: the pieces are the sequence shards of
    several devices, folded after an all-gather.
The price is the dk extra value columns (2x the state work for dk = dv).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST

# rule(q, k, v, g, beta, initial_state=, segment_ids=) -> (o, final_state)
Rule = Callable[..., tuple[jax.Array, jax.Array]]


def augmented_call(rule: Rule, q, k, v, g, beta, segment_ids=None,
                   value_dtype=None):
  """One call of `rule` from [I | 0]; returns (o_own, o_map, a, b).

  Args:
    rule: an implementation of the gated delta rule.
    q, k, v, g, beta, segment_ids: one piece ([b, t, ...]).
    value_dtype: dtype of the augmented values (default v.dtype).

  Returns:
    o_own [b, t, hv, dv] (the piece's outputs from a zero state), o_map
    [b, t, hv, dk] (o_t += o_map_t @ S_in), a [b, hv, dk, dk] and
    b [b, hv, dk, dv] (S_out = a @ S_in + b), all float32 but o_own / o_map
    (value_dtype).
  """
  bsz, t, hv = v.shape[:3]
  dk, dv = q.shape[-1], v.shape[-1]
  value_dtype = value_dtype or v.dtype
  eye = jnp.broadcast_to(jnp.eye(dk, dtype=_F32), (bsz, hv, dk, dk))
  s_aug = jnp.concatenate([eye, jnp.zeros((bsz, hv, dk, dv), _F32)], -1)
  v_aug = jnp.concatenate([jnp.zeros((bsz, t, hv, dk), value_dtype),
                           v.astype(value_dtype)], -1)
  o_aug, end = rule(q, k, v_aug, g, beta, initial_state=s_aug,
                    segment_ids=segment_ids)
  return o_aug[..., dk:], o_aug[..., :dk], end[..., :dk], end[..., dk:]


def fold_states(a_all, b_all, s0, cont=None):
  """Incoming state of every piece and the final state (float32).

  Args:
    a_all: [n, b, h, dk, dk]; b_all: [n, b, h, dk, dv] (pieces in order).
    s0: [b, h, dk, dv] state before the first piece.
    cont: [n, b] bool (False: the piece starts a new document, so nothing
      carries into it) or None.
  """
  s, ins = s0.astype(_F32), []
  for i in range(a_all.shape[0]):
    if cont is not None:
      s = s * cont[i][:, None, None, None].astype(s.dtype)
    ins.append(s)
    s = jnp.einsum("bhij,bhjv->bhiv", a_all[i], s,
                   precision=_HIGHEST) + b_all[i]
  return jnp.stack(ins), s


def apply_incoming(o_own, o_map, s_in, out_dtype):
  """o = o_own + o_map @ s_in per token ([b, t, h, .]; s_in [b, h, dk, dv])."""
  o = o_own.astype(_F32) + jnp.einsum("bthk,bhkv->bthv", o_map.astype(_F32),
                                      s_in, precision=_HIGHEST)
  return o.astype(out_dtype)


def split_sequence(rule: Rule, pieces: int, chunk_size: int, q, k, v, g,
                   beta, initial_state=None, segment_ids=None):
  """`rule` over `pieces` parallel pieces of the sequence; exact.

  The sequence is padded to pieces x L tokens (L a multiple of chunk_size;
  padded tokens have beta = g = 0, so they change nothing) and reshaped so
  that piece p of row i is batch row i * pieces + p.

  Returns:
    (o [b, t, hv, dv] in v.dtype, final state [b, hv, dk, dv] float32).
  """
  bsz, t, _, dk = q.shape
  hv, dv = v.shape[2], v.shape[3]
  length = -(-t // pieces)
  length = -(-length // chunk_size) * chunk_size
  tp = pieces * length

  def cut(x, mode="constant"):
    pad = [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad, mode=mode)
    return x.reshape((bsz * pieces, length) + x.shape[2:])

  seg = None if segment_ids is None else cut(segment_ids, "edge")
  o_own, o_map, a, b = augmented_call(
      rule, cut(q), cut(k), cut(v), cut(g), cut(beta), seg)
  per_piece = lambda x: jnp.moveaxis(  # pylint: disable=g-long-lambda
      x.reshape((bsz, pieces) + x.shape[1:]), 1, 0)
  cont = None
  if seg is not None:
    seg = seg.reshape(bsz, pieces, length)
    before = jnp.concatenate([seg[:, :1, 0], seg[:, :-1, -1]], axis=1)
    cont = jnp.moveaxis(seg[:, :, 0] == before, 1, 0)  # [pieces, b]
  if initial_state is None:
    initial_state = jnp.zeros((bsz, hv, dk, dv), _F32)
  ins, final = fold_states(per_piece(a), per_piece(b), initial_state, cont)
  s_in = jnp.moveaxis(ins, 0, 1).reshape((bsz * pieces,) + ins.shape[2:])
  o = apply_incoming(o_own, o_map, s_in, v.dtype)
  return o.reshape((bsz, tp) + o.shape[2:])[:, :t], final
