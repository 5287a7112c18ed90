"""Pure-jnp references for the gated delta rule: per-token and chunked.

Shapes (see `api.gated_delta_rule`): q, k [b, t, hk, dk]; v [b, t, hv, dv];
g, beta [b, t, hv]; state [b, hv, dk, dv]. Per value head:

  S~_t = exp(g_t) S_{t-1}
  S_t = S~_t + beta_t k_t (v_t - S~_t^T k_t)^T
  o_t = S_t^T (scale q_t)

With `segment_ids`, the carried state is reset to zero at every position whose
segment id differs from the previous position's (packed documents never share
state); `initial_state` only seeds the first segment.

Both functions compute in float32 (inputs are cast up, float64 ones
included), return the output in v.dtype and the final state in float32, and
are differentiable by plain autodiff.

g is the log decay: finite and <= 0. Nothing here checks it (the public
`api.gated_delta_rule` does, where g is concrete). The chunked form uses
exp(cumsum(g)) inside a chunk, so g > 0 makes it ill-conditioned (results
far off the per-token rule from g ~ 0.3, non-finite from g ~ 1.5), and
g = -inf gives NaN there ((-inf) - (-inf) in the pairwise decays); the
per-token rule stays finite in both cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import block_sizes

_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec: str, *args: jax.Array) -> jax.Array:
  # Full f32 matmuls: accelerators otherwise default to bf16 passes.
  return jnp.einsum(spec, *args, precision=_HIGHEST)


def expand_key_heads(x: jax.Array, hv: int) -> jax.Array:
  """Repeats key heads so value head j uses key head j // (hv // hk)."""
  hk = x.shape[2]
  return x if hk == hv else jnp.repeat(x, hv // hk, axis=2)


def reset_flags(segment_ids: jax.Array) -> jax.Array:
  """[b, t] bool: True where the state resets (segment id changes)."""
  changed = segment_ids[:, 1:] != segment_ids[:, :-1]
  first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
  return jnp.concatenate([first, changed], axis=1)


def _prepare(q, k, v, g, beta, initial_state, scale):
  """Casts to f32, expands key heads, scales q, fills a zero state."""
  b, _, _, dk = q.shape
  hv, dv = v.shape[2], v.shape[3]
  if scale is None:
    scale = dk ** -0.5
  f32 = jnp.float32
  q = expand_key_heads(q.astype(f32), hv) * scale
  k = expand_key_heads(k.astype(f32), hv)
  if initial_state is None:
    initial_state = jnp.zeros((b, hv, dk, dv), f32)
  return (q, k, v.astype(f32), g.astype(f32), beta.astype(f32),
          initial_state.astype(f32))


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Token-by-token gated delta rule (lax.scan over time).

  Args:
    q: [b, t, hk, dk] queries.
    k: [b, t, hk, dk] keys.
    v: [b, t, hv, dv] values, hv a multiple of hk.
    g: [b, t, hv] log decay (finite, <= 0; not checked here).
    beta: [b, t, hv] write strength.
    initial_state: [b, hv, dk, dv] or None (zeros).
    scale: query scale, default dk ** -0.5.
    segment_ids: [b, t] ints or None; the state resets where it changes.

  Returns:
    (o [b, t, hv, dv] in v.dtype, final_state [b, hv, dk, dv] float32).
  """
  out_dtype = v.dtype
  q, k, v, g, beta, s0 = _prepare(q, k, v, g, beta, initial_state, scale)
  if segment_ids is None:
    reset = jnp.zeros(g.shape[:2], bool)
  else:
    reset = reset_flags(segment_ids)

  def step(s, x):
    q_t, k_t, v_t, g_t, b_t, r_t = x  # [b, h, *]
    s = jnp.where(r_t[:, None, None, None], 0.0, s)
    s = s * jnp.exp(g_t)[..., None, None]
    pred = _einsum("bhkv,bhk->bhv", s, k_t)
    delta = b_t[..., None] * (v_t - pred)
    s = s + k_t[..., :, None] * delta[..., None, :]
    o_t = _einsum("bhkv,bhk->bhv", s, q_t)
    return s, o_t

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, reset))
  state, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1).astype(out_dtype), state


def pad_to_chunks(x: jax.Array, chunk_size: int, axis: int = 1,
                  mode: str = "zeros") -> jax.Array:
  """Pads `axis` up to a multiple of chunk_size (zeros or edge values)."""
  t = x.shape[axis]
  pad = (-t) % chunk_size
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  if mode == "edge":
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths)


def chunk_masks(seg: jax.Array, seg_prev: jax.Array):
  """Segment masks for one chunk layout.

  Args:
    seg: [..., n, c] segment ids per chunk.
    seg_prev: [..., n] segment id of the token before each chunk (for the
      first chunk, the first token's id, so the initial state applies).

  Returns:
    same [..., n, c, c] bool, same-segment pairs; carry [..., n, c] bool,
    positions that still see the state carried into the chunk.
  """
  same = seg[..., :, None] == seg[..., None, :]
  carry = seg == seg_prev[..., None]
  return same, carry


def _substitute(a: jax.Array, rhs: jax.Array) -> jax.Array:
  """Row-by-row forward substitution: X with (I + A) X = rhs, A strict."""
  c = a.shape[-1]

  def row(i, x):
    # Rows >= i of x are still zero, so the full row of `a` can be used.
    a_i = jax.lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)
    r_i = jax.lax.dynamic_index_in_dim(rhs, i, axis=-2, keepdims=False)
    x_i = r_i - _einsum("...j,...jm->...m", a_i, x)
    return jax.lax.dynamic_update_index_in_dim(x, x_i, i, axis=-2)

  return jax.lax.fori_loop(0, c, row, jnp.zeros_like(rhs))


@jax.custom_vjp
def _solve_unit_lower_loop(a: jax.Array, rhs: jax.Array) -> jax.Array:
  return _substitute(a, rhs)


def _solve_fwd(a, rhs):
  x = _substitute(a, rhs)
  return x, (a, x)


def _solve_bwd(res, dx):
  a, x = res
  # (I + A)^T d_rhs = dx: an upper solve, i.e. a lower one with reversed
  # rows and columns.
  flip = lambda m: jnp.flip(m, axis=(-2, -1))
  at = flip(jnp.swapaxes(a, -1, -2))
  d_rhs = jnp.flip(_substitute(at, jnp.flip(dx, axis=-2)), axis=-2)
  c = a.shape[-1]
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  d_a = jnp.where(strict, -_einsum("...im,...jm->...ij", d_rhs, x), 0.0)
  return d_a.astype(a.dtype), d_rhs.astype(dx.dtype)


_solve_unit_lower_loop.defvjp(_solve_fwd, _solve_bwd)


def solve_unit_lower(a: jax.Array, rhs: jax.Array) -> jax.Array:
  """Solves (I + A) X = rhs for strictly lower-triangular A.

  On CPU this is a forward-substitution loop with a custom VJP (which keeps
  only A and X for the backward): jaxlib 0.10's batched CPU LAPACK trsm,
  behind jax.scipy.linalg.solve_triangular, can deadlock when two solves
  run at once on a 2-thread pool (e.g. two layers' solves in one program).
  Elsewhere it is jax.scipy.linalg.solve_triangular.

  Args:
    a: [..., c, c] strictly lower-triangular (the diagonal and above must be
      zero).
    rhs: [..., c, m].

  Returns:
    X: [..., c, m].
  """
  if block_sizes.target_backend() == "cpu":
    return _solve_unit_lower_loop(a, rhs)
  c = a.shape[-1]
  return jax.scipy.linalg.solve_triangular(
      a + jnp.eye(c, dtype=a.dtype), rhs, lower=True, unit_diagonal=True)


def chunk_intra(k, v, g, beta, same=None, carry=None):
  """Per-chunk quantities of the UT/WY transform, all heads and chunks.

  Args:
    k, v: [b, h, n, c, d] f32 keys and values.
    g, beta: [b, h, n, c] f32.
    same, carry: masks from `chunk_masks` broadcastable to [b, h, n, c(, c)],
      or None when there is no packing.

  Returns:
    dict with G (cumsum of g), gamma (masked pairwise decay [.., c, c]),
    u, w (the UT transform's new values and state-read keys), decay_q
    (exp(G) masked by carry), decay_k (exp(G_last - G) masked to the last
    segment), decay_last (exp(G_last) masked by carry of the last position).
  """
  c = g.shape[-1]
  big_g = jnp.cumsum(g, axis=-1)
  causal = jnp.tril(jnp.ones((c, c), bool))
  mask = causal if same is None else causal & same
  diff = big_g[..., :, None] - big_g[..., None, :]
  # Mask before exp: the upper triangle would overflow.
  gamma = jnp.exp(jnp.where(mask, diff, -jnp.inf))
  eg = jnp.exp(big_g)
  if carry is not None:
    eg = jnp.where(carry, eg, 0.0)
  kk = _einsum("...id,...jd->...ij", k, k)
  a = beta[..., :, None] * kk * gamma
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  rhs = jnp.concatenate(
      [beta[..., None] * v, (beta * eg)[..., None] * k], axis=-1)
  # T = (I + A)^-1 applied by a unit-lower-triangular solve.
  sol = solve_unit_lower(jnp.where(strict, a, 0.0), rhs)
  dv = v.shape[-1]
  u, w = sol[..., :dv], sol[..., dv:]
  last_g = big_g[..., -1:]
  decay_k = jnp.exp(last_g - big_g)
  if same is not None:
    decay_k = jnp.where(same[..., -1, :], decay_k, 0.0)
  return dict(big_g=big_g, gamma=gamma, u=u, w=w, decay_q=eg,
              decay_k=decay_k, decay_last=eg[..., -1])


def chunked_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
  """Chunked (UT/WY) gated delta rule; same contract as the recurrent one.

  Within each chunk of `chunk_size` tokens the delta updates are solved in
  parallel (a unit-lower-triangular solve), then a lax.scan over chunks
  carries the state. Any length: t is padded with g = beta = k = v = q = 0.
  g must be finite and <= 0 (module docstring: g > 0 gives wrong results,
  -inf NaN; not checked here).

  Args:
    q, k, v, g, beta, initial_state, scale, segment_ids: as in
      `recurrent_gated_delta_rule`.
    chunk_size: tokens per chunk.

  Returns:
    (o [b, t, hv, dv] in v.dtype, final_state [b, hv, dk, dv] float32).
  """
  out_dtype = v.dtype
  b, t = q.shape[:2]
  q, k, v, g, beta, s0 = _prepare(q, k, v, g, beta, initial_state, scale)
  h, c = v.shape[2], chunk_size

  def to_chunks(x):  # [b, t, h, ...] -> [b, h, n, c, ...]
    x = pad_to_chunks(x, c)
    x = x.reshape((b, -1, c) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)

  qc, kc, vc, gc, bc = (to_chunks(x) for x in (q, k, v, g, beta))
  same = carry = None
  if segment_ids is not None:
    # Edge padding keeps the padded tail in the last segment.
    seg = pad_to_chunks(segment_ids, c, mode="edge").reshape(b, -1, c)
    seg_prev = jnp.concatenate([seg[:, :1, 0], seg[:, :-1, -1]], axis=1)
    same, carry = chunk_masks(seg, seg_prev)
    same, carry = same[:, None], carry[:, None]  # broadcast over heads
  intra = chunk_intra(kc, vc, gc, bc, same, carry)
  # Intra-chunk attention including the diagonal.
  att = _einsum("...id,...jd->...ij", qc, kc) * intra["gamma"]
  qg = intra["decay_q"][..., None] * qc
  kd = intra["decay_k"][..., None] * kc
  decay_last = intra["decay_last"]

  def step(s, x):
    u, w, qg_n, att_n, kd_n, dl = x
    v_new = u - _einsum("bhck,bhkv->bhcv", w, s)
    o = _einsum("bhck,bhkv->bhcv", qg_n, s)
    o = o + _einsum("bhij,bhjv->bhiv", att_n, v_new)
    s = dl[..., None, None] * s + _einsum("bhck,bhcv->bhkv", kd_n, v_new)
    return s, o

  xs = (intra["u"], intra["w"], qg, att, kd, decay_last)
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in xs)
  state, o = jax.lax.scan(step, s0, xs)
  # o: [n, b, h, c, dv] -> [b, n*c, h, dv]
  o = jnp.moveaxis(o, 0, 1)  # [b, n, h, c, dv]
  o = jnp.swapaxes(o, 2, 3).reshape(b, -1, h, o.shape[-1])
  return o[:, :t].astype(out_dtype), state
