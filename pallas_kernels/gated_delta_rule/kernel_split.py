"""Kernel bodies of the split (multi-kernel) Pallas gated delta rule.

The fused kernels of `kernel.py` do all of a chunk's work inside the
sequential pass over chunks, so only b x hv x (dv tiles) programs run, each
paying the intra-chunk triangular solve 64 times in a row. Here the work that
does not depend on the carried state runs in kernels that are parallel over
chunks, and the sequential pass keeps only the state algebra (the layout of
flash-linear-attention's chunked kernels):

  forward   prep    (b, hv, n)   G, decays, T = (I + A)^-1, w = T(beta e^G k),
                                 u = T(beta v)                     [parallel]
            state   (b, hv, nv)  per chunk: h_n = S, v' = u - w S,
                                 S <- e^{G_last} S + k^T (e^{G_last-G} v')
                                                                 [sequential]
            output  (b, hv, n)   o = scale e^G (q h_n) + ((q k^T scale) * Gam) v'
                                                                   [parallel]
  backward  prep again (w, u are recomputed, not stored)
            local   (b, hv, n)   v' = u - w h_n, dv'_local = P^T dO
            state   (b, hv, nv)  chunks last to first, carrying dS:
                                 dh_n = dS, dv' = dv'_local + e^{G_last-G} (k dS),
                                 dS <- e^{G_last} dS + q^T (scale e^G dO) - w^T dv'
            out     (b, hv, n)   dq, dk and the decay gradient of the
                                 output / state path
            wy      (b, hv, n)   dv, dk, dbeta and the decay gradient through
                                 u, w and T = (I + A)^-1: with dxu = T^T dv',
                                 dv = beta dxu, T^T dw = -dxu h_n^T and
                                 dA = -dxu v'^T (no dT, no dw)
  (the backward's prep also writes T [c, c] per chunk for the wy kernel,
  so the solve runs twice per training step, not three times).
  Every array is token-major, [b, tp, h, .], except the states.

What autodiff keeps from the forward is the state entering every chunk,
h [b, hv, n, dk, dv], in the matmul dtype.

Matmul dtype `md`: the input dtype when q, k, v are all bf16, else f32. Dots
whose operands are stored in `md` (q, k, v, w, u, h, v') run in `md` on the
tensor cores with f32 accumulation, as flash-linear-attention does; products
of two bf16 numbers are exact in f32, so decays and the query scale are
applied to f32 results rather than folded into bf16 operands. The solve is
f32 vector arithmetic; products of f32 matrices (T, w, u and their
gradients) use the algorithm `Dots.f32` names (`BlockSizes.f32_dot`: IEEE
f32, or tensor-core splits of about f32 accuracy on a GPU), since the solve
amplifies rounding; an f32 matrix times a stored one splits only the f32
side (`Dots.fm`). The backward's intermediates (T, v', P^T dO, dv', the
dk of bwd_out) are stored in `md` too, as flash-linear-attention stores
them: T is f32 only inside the forward's prep.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta_rule import block_sizes
from pallas_kernels.gated_delta_rule import kernel

_F32 = jnp.float32
_iota = kernel._iota  # pylint: disable=protected-access
_pick_col = kernel._pick_col  # pylint: disable=protected-access
_load = kernel._load  # pylint: disable=protected-access
_sum_all = kernel._sum_all  # pylint: disable=protected-access


def _transpose(x: jax.Array) -> jax.Array:
  """[c, 1] <-> [1, c]. A Triton transpose: the split kernels only lower
  for GPUs (the fused kernels' masked form costs a [c, c] reduction)."""
  return x.T


# Columns of the per-token "aux" array [.., t, 4] that `prep_kernel` writes.
AUX_G, AUX_DECAY_Q, AUX_DECAY_K, AUX_RESETS = 0, 1, 2, 3
NUM_AUX = 4


@dataclasses.dataclass(frozen=True)
class Dots:
  """How a kernel multiplies.

  Attributes:
    md: dtype of the dots whose operands are stored tensors (q, k, v, w, u,
      h, v'): bf16 when the inputs are (products of two bf16 numbers are
      exact in f32), else f32.
    f32: name in `block_sizes.F32_ALGORITHMS`: the algorithm of f32 x f32
      products (T, w, u
      and their gradients, and stored operands when md is f32).
  """
  md: object = _F32
  f32: str = "highest"

  def _general(self, a, b, dims, dtype):
    if jnp.dtype(dtype) == _F32:
      algo = block_sizes.F32_ALGORITHMS[self.f32]
      precision = (algo if isinstance(algo, lax.DotAlgorithmPreset)
                   else (algo, algo))
    else:
      precision = (lax.Precision.DEFAULT, lax.Precision.DEFAULT)
    return lax.dot_general(a.astype(dtype), b.astype(dtype),
                           (dims, ((), ())), precision=precision,
                           preferred_element_type=_F32)

  def mm(self, a, b):
    """a @ b, operands in md (stored tensors), f32 accumulation."""
    return self._general(a, b, ((1,), (0,)), self.md)

  def mm_nt(self, a, b):
    """a @ b^T in md."""
    return self._general(a, b, ((1,), (1,)), self.md)

  def mm_tn(self, a, b):
    """a^T @ b in md."""
    return self._general(a, b, ((0,), (0,)), self.md)

  def f(self, a, b):
    """a @ b in f32 (the `f32` algorithm)."""
    return self._general(a, b, ((1,), (0,)), _F32)

  # Products of an f32 matrix `a` with a stored one `b` (held in md). When
  # md is bf16 and the f32 algorithm splits operands into bf16 parts, b's
  # low parts are zero: only a is split, and each part of a meets b in one
  # bf16 product (bf16x3: 2 products instead of 3, bf16: 1).
  _BF16_PARTS = {"bf16": 1, "bf16x3": 2, "bf16x6": 3}

  def _mixed(self, a, b, dims):
    parts = self._BF16_PARTS.get(self.f32)
    if parts is None or jnp.dtype(self.md) != jnp.bfloat16:
      return self._general(a, b, dims, _F32)
    b = b.astype(self.md)
    out, rest = None, a
    for i in range(parts):
      part = rest.astype(self.md)
      term = self._general(part, b, dims, self.md)
      out = term if out is None else out + term
      if i + 1 < parts:
        rest = rest - part.astype(_F32)
    return out

  def fm(self, a, b):
    """a @ b: a f32, b a stored tensor (exact in md)."""
    return self._mixed(a, b, ((1,), (0,)))

  def fm_nt(self, a, b):
    """a @ b^T: a f32, b a stored tensor (exact in md)."""
    return self._mixed(a, b, ((1,), (1,)))


def _last(col: jax.Array) -> jax.Array:
  """The last element of a column [c, 1] as [1, 1]."""
  c = col.shape[0]
  return jnp.sum(jnp.where(_iota((c, 1), 0) == c - 1, col, 0.0), axis=0,
                 keepdims=True)


def _decays(aux: jax.Array, has_segments: bool):
  """(gamma [c, c], e^G [c, 1], e^{G_last - G} [c, 1], e^{G_last} [1, 1]).

  The masked values that `kernel.chunk_intra` computes, rebuilt from the aux
  columns without the triangular solve.
  """
  c = aux.shape[0]
  rows, cols = _iota((c, c), 0), _iota((c, c), 1)
  g = _pick_col(aux, AUX_G)
  decay_q = _pick_col(aux, AUX_DECAY_Q)
  decay_k = _pick_col(aux, AUX_DECAY_K)
  mask = rows >= cols
  if has_segments:
    resets = _pick_col(aux, AUX_RESETS)
    mask = mask & (resets == _transpose(resets))
  gamma = kernel.masked_exp(g - _transpose(g), mask)
  # e^{G_last} masked as chunk_intra masks it = decay_q at the last row.
  return gamma, decay_q, decay_k, _last(decay_q)


def _aux(g_cum, decay_q, decay_k, resets):
  """The aux columns [c, NUM_AUX] from four [c, 1] columns."""
  col = _iota((g_cum.shape[0], NUM_AUX), 1)
  return jnp.where(
      col == AUX_G, g_cum,
      jnp.where(col == AUX_DECAY_Q, decay_q,
                jnp.where(col == AUX_DECAY_K, decay_k, resets)))


def _decay_grad(dgg, col_terms, last_term):
  """dg [c, 1] from the gradient w.r.t. G, then through G = cumsum(g).

  Args:
    dgg: [c, c] dGamma * Gamma (Gamma_ij = exp(G_i - G_j)).
    col_terms: [c, 1] terms of dG_i that are per row.
    last_term: [1, 1] extra gradient of G_last.
  """
  c = dgg.shape[0]
  rows, cols = _iota((c, c), 0), _iota((c, c), 1)
  dg_row = (_transpose(jnp.sum(dgg, axis=1, keepdims=True) + col_terms)
            - jnp.sum(dgg, axis=0, keepdims=True))
  dg_row = dg_row + jnp.where(_iota((1, c), 1) == c - 1, last_term, 0.0)
  # G = cumsum(g)  =>  dg_i = sum_{j >= i} dG_j.
  return jnp.sum(jnp.where(cols >= rows, dg_row, 0.0), axis=1, keepdims=True)


# ---------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------


def prep_kernel(k_ref, v_ref, sc_ref, *refs, has_segments: bool, d: Dots,
                block: int | None = None, sub: int | None = None,
                out: str | None = None, scale: float = 1.0):
  """One chunk: decays, the UT / WY inverse, w and u (parallel over chunks).

  The inverse is row by row, or with `block` in diagonal blocks of that
  many tokens and full-tile products (`kernel.block_unit_lower_inverse`).
  With `sub` (a divisor of the chunk) the chunk is taken in sub-chunks of
  that many tokens and only the blocks on and below the diagonal are
  formed (`_prep_sub_chunks`).

  refs: (w, u, aux) outputs, and per `out`: "t" (the backward's call) T as
  a fourth output; "p" (the forward's call with
  `BlockSizes.output_in_state`) q as a fourth input before them and the
  intra-chunk attention P = scale (q k^T) * Gamma (lower triangle with the
  diagonal, within segments) as a fourth output, so the sequential pass
  reads P instead of forming it once per value tile.
  """
  q_ref = t_ref = p_ref = None
  if out == "p":
    q_ref, *refs = refs
  w_ref, u_ref, aux_ref, *extra = refs
  if out == "t":
    t_ref = extra[0]
  elif out == "p":
    p_ref = extra[0]
  if sub is not None and sub < k_ref.shape[0]:
    _prep_sub_chunks(k_ref, v_ref, sc_ref, w_ref, u_ref, aux_ref, t_ref,
                     q_ref=q_ref, p_ref=p_ref, scale=scale,
                     has_segments=has_segments, d=d, block=block, sub=sub)
    return
  k, sc = k_ref[...], _load(sc_ref)
  inverse = None
  if block is not None and block < k.shape[0]:
    inverse = functools.partial(kernel.block_unit_lower_inverse, block=block,
                                dot=d.f)
  x = kernel.chunk_intra(k.astype(_F32), sc, has_segments, kk=d.mm_nt(k, k),
                         inverse=inverse, transpose=_transpose)
  if t_ref is not None:
    t_ref[...] = x.t.astype(t_ref.dtype)
  # T (beta v) = (T diag(beta)) v: the stored v and k enter as they are.
  u_ref[...] = d.fm(x.t * _transpose(x.beta), v_ref[...]).astype(
      u_ref.dtype)
  w_ref[...] = d.fm(x.t * _transpose(x.beta * x.decay_q), k).astype(
      w_ref.dtype)
  aux_ref[...] = _aux(x.g_cum, x.decay_q, x.decay_k,
                      _pick_col(sc, kernel.RESET_COL))
  if p_ref is not None:  # chunk_intra's Gamma has P's mask
    p_ref[...] = (d.mm_nt(q_ref[...], k) * (x.gamma * scale)).astype(
        p_ref.dtype)


def _prep_sub_chunks(k_ref, v_ref, sc_ref, w_ref, u_ref, aux_ref, t_ref, *,
                     q_ref, p_ref, scale: float, has_segments: bool, d: Dots,
                     block: int | None, sub: int):
  """`prep_kernel` by sub-chunks of `sub` tokens: blocks of T on and below
  the diagonal only.

  With the chunk cut into m sub-chunks (rows i, columns j of [m, m] blocks
  of [sub, sub]), T = (I + A)^-1 is unit lower triangular by blocks:

    T_ii = (I + A_ii)^-1                     (`block_unit_lower_inverse`)
    T_ij = -T_ii sum_{j <= l < i} A_il T_lj  (i > j)

  and w_i = sum_{j <= i} T_ij (beta e^G k)_j, u_i likewise. The full-tile
  form multiplies [c, c] tiles that are zero above the diagonal (and, in
  the doubling, mostly zero below it too): at c = 64 with sub = 32 (and
  doubling from single tokens) the solve's f32 products shrink from ten
  of 64^3 to eight of 32^3 in each diagonal block and two for the block
  below them, and kk, w and u skip the block above the diagonal. Each sub-chunk is loaded from the
  refs (Triton values cannot be sliced); all shapes stay >= 16 for the
  tensor cores. P (with `p_ref`) is formed beside A, block by block.
  """
  c = k_ref.shape[0]
  m = c // sub
  rows_of = [slice(i * sub, (i + 1) * sub) for i in range(m)]
  inverse = functools.partial(
      kernel.block_unit_lower_inverse, block=min(block or sub, sub), dot=d.f)
  rows, cols = _iota((sub, sub), 0), _iota((sub, sub), 1)
  # Per sub-chunk: the scalars, G (inclusive cumsum over the whole chunk),
  # as a column and as a row.
  scs = [_load(sc_ref, r) for r in rows_of]
  betas = [_pick_col(x, kernel.BETA_COL) for x in scs]
  resets = [_pick_col(x, kernel.RESET_COL) for x in scs]
  g_rows, offset = [], jnp.zeros((1, 1), _F32)
  for x in scs:
    g_row = offset + jnp.sum(
        jnp.where(rows <= cols, _pick_col(x, kernel.G_COL), 0.0), axis=0,
        keepdims=True)  # [1, sub]: G_j = offset + sum_{i <= j} g_i
    g_rows.append(g_row)
    offset = _pick_col(g_row, sub - 1)
  g_last = offset
  g_cols = [_transpose(x) for x in g_rows]
  resets_rows = [_transpose(x) for x in resets]
  resets_last = _pick_col(resets_rows[-1], sub - 1)
  decay_q, decay_k = zip(*(
      kernel.row_decays(x, g_last, *((r, resets_last) if has_segments
                                     else ()))
      for x, r in zip(g_cols, resets)))

  def gamma_block(i, j, strict: bool):
    """Gam_ij (i >= j) masked to the lower triangle (strictly, or with
    the diagonal) and to equal segments. Below the diagonal blocks
    G_i - G_j needs no mask against overflow."""
    mask = None
    if i == j:
      mask = (rows > cols) if strict else (rows >= cols)
    if has_segments:
      same = resets[i] == resets_rows[j]
      mask = same if mask is None else mask & same
    diff = g_cols[i] - g_rows[j]
    return jnp.exp(diff) if mask is None else kernel.masked_exp(diff, mask)

  def a_block(i, j):
    """A_ij = strict_lower(beta_i (k_i . k_j) Gam_ij) for i >= j; with
    p_ref also writes P_ij = scale (q_i . k_j) Gam_ij (the same exps, with
    the diagonal)."""
    k_i = k_ref[rows_of[i], :]
    k_j = k_i if i == j else k_ref[rows_of[j], :]
    kk = d.mm_nt(k_i, k_j)
    if p_ref is None:
      return betas[i] * kk * gamma_block(i, j, strict=True)
    gamma = gamma_block(i, j, strict=False)
    p_ref[rows_of[i], rows_of[j]] = (
        d.mm_nt(q_ref[rows_of[i], :], k_j) * (gamma * scale)).astype(
            p_ref.dtype)
    if i == j:
      gamma = jnp.where(rows > cols, gamma, 0.0)
    return betas[i] * kk * gamma

  t = {}
  for i in range(m):
    a_row = [a_block(i, l) for l in range(i + 1)]
    if p_ref is not None:
      for j in range(i + 1, m):
        p_ref[rows_of[i], rows_of[j]] = jnp.zeros((sub, sub), p_ref.dtype)
    t[i, i] = inverse(a_row[i])
    for j in range(i - 1, -1, -1):
      acc = None
      for l in range(j, i):
        term = d.f(a_row[l], t[l, j])
        acc = term if acc is None else acc + term
      t[i, j] = -d.f(t[i, i], acc)
  for i in range(m):
    # u, then w: one [sub, d] accumulator alive at a time.
    for out_ref, x_ref, col in ((u_ref, v_ref, None), (w_ref, k_ref, decay_q)):
      acc = None
      for j in range(i + 1):
        scale_j = betas[j] if col is None else betas[j] * col[j]
        term = d.fm(t[i, j] * _transpose(scale_j), x_ref[rows_of[j], :])
        acc = term if acc is None else acc + term
      out_ref[rows_of[i], :] = acc.astype(out_ref.dtype)
    aux_ref[rows_of[i], :] = _aux(g_cols[i], decay_q[i], decay_k[i],
                                  resets[i])
    if t_ref is not None:
      for j in range(m):
        block_ij = t[i, j] if j <= i else jnp.zeros((sub, sub), _F32)
        t_ref[rows_of[i], rows_of[j]] = block_ij.astype(t_ref.dtype)


def _decay_last(aux_ref, i, chunk: int) -> jax.Array:
  """e^{G_last} of chunk i as [1, 1] (masked as `_decays` masks it): the
  decay_q column of the chunk's last row, loaded alone. Taking it from the
  chunk's [c, 4] tile instead is a reduction across the warps (shuffles,
  shared memory and barriers) in every step of the sequential loops."""
  return _pick_col(_load(aux_ref, pl.ds(i * chunk + chunk - 1, 1)),
                   AUX_DECAY_Q)


def state_fwd_kernel(w_ref, u_ref, k_ref, aux_ref, s0_ref, vn_ref, h_ref,
                     st_ref, *, num_chunks: int, chunk: int, d: Dots):
  """The sequential pass: states entering each chunk and v' (one dv tile)."""

  def body(i, s):
    rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
    h_ref[i] = s.astype(h_ref.dtype)
    aux = _load(aux_ref, rows)
    vn = _load(u_ref, rows) - d.mm(w_ref[rows, :], s)
    vn_ref[rows, :] = vn.astype(vn_ref.dtype)
    decay_k = _pick_col(aux, AUX_DECAY_K)
    return (_decay_last(aux_ref, i, chunk) * s
            + d.mm_tn(k_ref[rows, :], decay_k * vn))

  st_ref[...] = lax.fori_loop(0, num_chunks, body, _load(s0_ref))


def stored_row(chunk, stride: int):
  """The row of the stored per-chunk states that holds the state entering
  `chunk`, with every `stride`-th chunk's stored (`BlockSizes.state_stride`;
  `chunk` itself without a stride). lax.div: the index is not negative, and
  jnp's floor division does not lower for Triton inside a loop."""
  return chunk if stride == 1 else lax.div(chunk, stride)


def state_out_kernel(w_ref, u_ref, q_ref, k_ref, p_ref, aux_ref, s0_ref,
                     o_ref, st_ref, *h_ref, num_chunks: int, chunk: int,
                     scale: float, d: Dots, stride: int = 1):
  """`state_fwd_kernel` and `output_kernel` in one sequential pass (one dv
  tile; `BlockSizes.output_in_state`).

  Each chunk's output is formed where its entering state and v' already are
  in registers, so neither goes through HBM: v' is not written at all (the
  backward recomputes it in bwd_local), and h only when `h_ref` is given
  (the custom_vjp forward; an inference forward stores no per-chunk
  states). The intra-chunk attention P comes from prep (`prep_kernel`,
  out="p"), so the loop adds q h and P v' to state_fwd's products and no
  decay masks. With `stride` 2 only the states entering even chunks are
  stored (`h_ref` holds half as many; `BlockSizes.state_stride`).
  """

  # lax.rem: the counter is not negative, and jnp's remainder does not
  # lower for Triton inside the loop.
  def store(i, s):
    h_ref[0][stored_row(i, stride)] = s.astype(h_ref[0].dtype)

  def body(i, s):
    rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
    if h_ref and stride == 1:
      store(i, s)
    elif h_ref:
      pl.when(lax.rem(i, stride) == 0)(lambda: store(i, s))
    aux = _load(aux_ref, rows)
    vn = _load(u_ref, rows) - d.mm(w_ref[rows, :], s)
    o = ((_pick_col(aux, AUX_DECAY_Q) * scale) * d.mm(q_ref[rows, :], s)
         + d.mm(p_ref[rows, :], vn))
    o_ref[rows, :] = o.astype(o_ref.dtype)
    decay_k = _pick_col(aux, AUX_DECAY_K)
    return (_decay_last(aux_ref, i, chunk) * s
            + d.mm_tn(k_ref[rows, :], decay_k * vn))

  st_ref[...] = lax.fori_loop(0, num_chunks, body, _load(s0_ref))


def output_kernel(q_ref, k_ref, vn_ref, h_ref, aux_ref, o_ref, *,
                  scale: float, has_segments: bool, d: Dots):
  """One chunk's output from the state entering it (parallel over chunks)."""
  q, k = q_ref[...], k_ref[...]
  gamma, decay_q, _, _ = _decays(_load(aux_ref), has_segments)
  p = d.mm_nt(q, k) * (gamma * scale)
  o = (decay_q * scale) * d.mm(q, h_ref[...]) + d.mm(p, vn_ref[...])
  o_ref[...] = o.astype(o_ref.dtype)


# ---------------------------------------------------------------------------
# Backward.
# ---------------------------------------------------------------------------


def bwd_local_kernel(q_ref, k_ref, w_ref, u_ref, h_ref, aux_ref, do_ref,
                     *refs, scale: float, has_segments: bool, d: Dots,
                     stride: int = 1):
  """v' recomputed from the stored state, and P^T dO (parallel).

  With `stride` 2 (`BlockSizes.state_stride`) h_ref holds the state
  entering the even chunk of this chunk's pair, refs start with that
  chunk's k, w, u and aux, and the chunk's own state (for odd chunks one
  step of the recurrence from the even one, as the forward took it) is
  written to the last ref for the kernels after this one.
  """
  if stride == 1:
    vn_ref, dvl_ref = refs
    h = h_ref[...]
  else:
    k0_ref, w0_ref, u0_ref, aux0_ref, vn_ref, dvl_ref, hn_ref = refs
    h0 = h_ref[...]

    def step():  # odd chunks only: their pair's chunk 0 read, two products
      aux0 = _load(aux0_ref)
      vn0 = _load(u0_ref) - d.mm(w0_ref[...], h0)
      return (_last(_pick_col(aux0, AUX_DECAY_Q)) * h0.astype(_F32)
              + d.mm_tn(k0_ref[...], _pick_col(aux0, AUX_DECAY_K) * vn0))

    h = lax.cond(lax.rem(pl.program_id(2), 2) == 1, step,
                 lambda: h0.astype(_F32)).astype(hn_ref.dtype)
    hn_ref[...] = h
  vn = _load(u_ref) - d.mm(w_ref[...], h)
  vn_ref[...] = vn.astype(vn_ref.dtype)
  bwd_pdo_kernel(q_ref, k_ref, aux_ref, do_ref, dvl_ref, scale=scale,
                 has_segments=has_segments, d=d)


def bwd_pdo_kernel(q_ref, k_ref, aux_ref, do_ref, dvl_ref, *, scale: float,
                   has_segments: bool, d: Dots):
  """P^T dO (parallel), P = (q k^T) * scale * Gamma: bwd_local's part
  that needs no state, alone where the backward's recomputing state_fwd
  gave v' (`BlockSizes.recompute_states`)."""
  gamma, _, _, _ = _decays(_load(aux_ref), has_segments)
  p = d.mm_nt(q_ref[...], k_ref[...]) * (gamma * scale)
  dvl_ref[...] = d.mm_tn(p, do_ref[...]).astype(dvl_ref.dtype)


def state_bwd_kernel(q_ref, k_ref, w_ref, aux_ref, do_ref, dvl_ref, dst_ref,
                     dvn_ref, dh_ref, ds0_ref, *, num_chunks: int, chunk: int,
                     scale: float, d: Dots):
  """The sequential backward pass (chunks last to first), one dv tile."""

  def body(j, ds):
    i = num_chunks - 1 - j
    rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
    dh_ref[i] = ds.astype(dh_ref.dtype)
    aux = _load(aux_ref, rows)
    decay_q = _pick_col(aux, AUX_DECAY_Q)
    decay_k = _pick_col(aux, AUX_DECAY_K)
    dvn = _load(dvl_ref, rows) + decay_k * d.mm(k_ref[rows, :], ds)
    dvn_ref[rows, :] = dvn.astype(dvn_ref.dtype)
    do = _load(do_ref, rows) * (decay_q * scale)
    return (_decay_last(aux_ref, i, chunk) * ds + d.mm_tn(q_ref[rows, :], do)
            - d.mm_tn(w_ref[rows, :], dvn))

  ds0_ref[...] = lax.fori_loop(0, num_chunks, body, _load(dst_ref))


def _column_tiles(width: int, block: int | None) -> list:
  """Static windows of `block` columns, or one window of all `width`
  columns when `block` is None or does not divide `width`."""
  if block is None or block >= width or width % block:
    return [slice(None)]
  return [pl.ds(j * block, block) for j in range(width // block)]


def bwd_out_kernel(q_ref, k_ref, vn_ref, h_ref, dh_ref, aux_ref, do_ref,
                   dq_ref, dk_ref, dg_ref, *, scale: float,
                   has_segments: bool, d: Dots, block: int | None = None):
  """Gradients through the output and the state update (parallel).

  Writes dq, the part of dk from those paths (`wy_kernel` adds the rest)
  and that part of dg as [c, 2] (dg, 0), including the state path's
  gradient of G_last, <h_n, dh_n> e^{G_last}. With `block`, dk is taken
  that many columns (rows of the states h, dh) at a time.
  """
  gamma, decay_q, decay_k, decay_last = _decays(_load(aux_ref),
                                                has_segments)
  qk = d.mm_nt(q_ref[...], k_ref[...]) * scale
  vn = vn_ref[...]
  dp = d.mm_nt(do_ref[...], vn)
  dpg = dp * gamma
  c = q_ref.shape[0]
  deg = jnp.zeros((c, 1), _F32)
  dkdec = jnp.zeros((c, 1), _F32)
  hdh = jnp.zeros((1, 1), _F32)  # <h_n, dh_n>
  for cols_k in _column_tiles(q_ref.shape[1], block):
    q, k = q_ref[:, cols_k].astype(_F32), k_ref[:, cols_k].astype(_F32)
    h, dh = h_ref[cols_k, :], dh_ref[cols_k, :]
    dos = d.mm_nt(do_ref[...], h)                     # dO h^T  [c, dk]
    dq_ref[:, cols_k] = ((decay_q * dos + d.mm(dpg, k)) * scale).astype(
        dq_ref.dtype)
    dkd = d.mm_nt(vn, dh)                             # v' dS'^T [c, dk]
    hdh = hdh + _sum_all(h.astype(_F32) * dh.astype(_F32))
    dk_ref[:, cols_k] = (d.mm_tn(dpg, q) * scale + decay_k * dkd).astype(
        dk_ref.dtype)
    deg = deg + jnp.sum(q * dos, axis=1, keepdims=True)
    dkdec = dkdec + jnp.sum(k * dkd, axis=1, keepdims=True)
  deg = deg * scale
  dkdec = dkdec * decay_k
  # G_last scales the carried state (S' = e^{G_last} h_n + ...) and the
  # keys' decays.
  dg = _decay_grad(dp * qk * gamma, deg * decay_q - dkdec,
                   jnp.sum(dkdec, axis=0, keepdims=True) + hdh * decay_last)
  # [c, 2] like wy_kernel's (dg, dbeta); no dbeta on this path.
  dg_ref[...] = jnp.where(_iota(dg_ref.shape, 1) == 0, dg, 0.0)


def _write_wy_scalars(dsc_ref, da, kkg, beta, eg, kdxw, dbeta, dscin):
  """(dg, dbeta) [c, 2]: `dscin` (bwd_out's part) plus the WY path's,
  through A (da; kkg is k k^T * Gamma), through w (kdxw = rowsum(k * T^T
  dw)), plus `dbeta` from elsewhere."""
  dakkg = da * kkg
  dbeta = dbeta + eg * kdxw + jnp.sum(dakkg, axis=1, keepdims=True)
  dg = _decay_grad(dakkg * beta, beta * kdxw * eg, jnp.zeros((1, 1), _F32))
  dsc_ref[...] = dscin + jnp.where(_iota(dsc_ref.shape, 1) == 0, dg, dbeta)


def _strict_lower(x):
  c = x.shape[0]
  return jnp.where(_iota((c, c), 0) > _iota((c, c), 1), x, 0.0)


def wy_kernel(t_ref, k_ref, v_ref, sc_ref, aux_ref, vn_ref, dvn_ref, h_ref,
              dkin_ref, dscin_ref, dk_ref, dv_ref, dsc_ref, *,
              has_segments: bool, block: int | None, d: Dots):
  """Gradients through u = T(beta v), w = T(beta e^G k), T = (I + A)^-1
  (parallel over chunks).

  u and w enter the rest only through v' = u - w h_n, so du = dv' and
  dw = -dv' h_n^T. With dxu = T^T du:
    dv = beta * dxu,   dxw = T^T dw = -dxu h_n^T,
    T^T dT T^T = dxu u^T + dxw w^T = dxu (u - w h_n)^T = dxu v'^T,
  so dA = -dxu v'^T (strictly lower) from the v' the backward already
  has: neither dT, nor dw, nor u and w are formed or read. Writes dv, the
  rest of dk (plus dkin, bwd_out's part) and (dg, dbeta) as [c, 2] (plus
  dscin, bwd_out's part: the chunk's whole scalar gradients, so that no
  XLA op outside sums the two). With `block`, dk is taken that many
  columns at a time.
  """
  t = t_ref[...]
  beta = _pick_col(_load(sc_ref), kernel.BETA_COL)
  gamma, eg, _, _ = _decays(_load(aux_ref), has_segments)
  dxu = d.mm_tn(t, dvn_ref[...])
  dv_ref[...] = (beta * dxu).astype(dv_ref.dtype)
  dbeta = jnp.sum(v_ref[...].astype(_F32) * dxu, axis=1, keepdims=True)
  da = -_strict_lower(d.fm_nt(dxu, vn_ref[...]))
  # A = beta (k k^T * Gamma): d(k k^T) k + d(k k^T)^T k in one product.
  dkk = da * beta * gamma
  dkk = dkk + dkk.T
  bek = beta * eg
  c = t_ref.shape[0]
  kk = jnp.zeros((c, c), _F32)
  kdxw = jnp.zeros((c, 1), _F32)
  for cols_k in _column_tiles(k_ref.shape[1], block):
    k = k_ref[:, cols_k]
    kk = kk + d.mm_nt(k, k)  # exact products of stored keys
    dxw = -d.fm_nt(dxu, h_ref[cols_k, :])
    dk_ref[:, cols_k] = (dkin_ref[:, cols_k].astype(_F32) + bek * dxw
                         + d.fm(dkk, k)).astype(dk_ref.dtype)
    kdxw = kdxw + jnp.sum(k.astype(_F32) * dxw, axis=1, keepdims=True)
  _write_wy_scalars(dsc_ref, da, kk * gamma, beta, eg, kdxw, dbeta,
                    _load(dscin_ref))
