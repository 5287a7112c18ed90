"""pallas_call builders and the custom_vjp of the split gated delta rule.

Same padded, head-major layout as `pallas_gdr` (q, k [b, hk, tp, dk]; v
[b, hv, tp, dv]; scalars [b, hv, tp, 4]; state [b, hv, dk, dv] f32). The
kernel bodies and the plan (which kernel runs over which grid) are in
`kernel_split`. Parallel kernels take whole chunks and the whole dk / dv; the
two sequential kernels tile dv by `BlockSizes.block_dv` and loop over chunks
inside the program (the GPU driver of `BlockSizes.chunk_loop == "kernel"`).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta_rule import kernel
from pallas_kernels.gated_delta_rule import kernel_split as ks

_F32 = jnp.float32


def matmul_dtype(q, k, v):
  """bf16 / f16 when q, k, v all are, else f32 (see `kernel_split`)."""
  dt = q.dtype
  if dt == k.dtype == v.dtype and dt in (jnp.bfloat16, jnp.float16):
    return dt
  return jnp.dtype(_F32)


class _Plan:
  """Shapes and BlockSpecs shared by the builders of one call."""

  def __init__(self, q, k, v, cfg, sq):
    self.b, _, self.tp, self.dk = q.shape
    self.md = matmul_dtype(q, k, v)
    f32 = cfg.block_sizes.f32_dot
    if f32 == "auto":
      f32 = "tf32x3" if self.md == _F32 else "bf16x3"
    # Interpret mode runs on the CPU, which has no TF32: IEEE f32 there.
    self.d = ks.Dots(md=self.md, f32="highest" if cfg.interpret else f32)
    self.hv, self.dv = v.shape[1], v.shape[3]
    bs = cfg.block_sizes
    self.c, self.r = bs.chunk_size, cfg.group
    self.bv = bs.dv_tile(self.dv)
    self.n, self.nv = self.tp // self.c, self.dv // self.bv
    self.sq = sq
    self.cfg = cfg
    c, r = self.c, self.r
    # Parallel kernels: grid (b, hv, n), one chunk per program.
    self.par_grid = (self.b, self.hv, self.n)
    self.key_chunk = pl.BlockSpec((sq, sq, c, self.dk),
                                  lambda i, h, t: (i, h // r, t, 0))
    self.val_chunk = lambda width: pl.BlockSpec(
        (sq, sq, c, width), lambda i, h, t: (i, h, t, 0))
    self.state_chunk = pl.BlockSpec((sq, sq, sq, self.dk, self.dv),
                                    lambda i, h, t: (i, h, t, 0, 0))
    # Sequential kernels: grid (b, hv, nv), whole sequence per program.
    self.seq_grid = (self.b, self.hv, self.nv)
    tp = self.tp
    self.key_seq = pl.BlockSpec((sq, sq, tp, self.dk),
                                lambda i, h, j: (i, h // r, 0, 0))
    self.head_seq = lambda width: pl.BlockSpec(
        (sq, sq, tp, width), lambda i, h, j: (i, h, 0, 0))
    self.tile_seq = pl.BlockSpec((sq, sq, tp, self.bv),
                                 lambda i, h, j: (i, h, 0, j))
    self.state_tile = pl.BlockSpec((sq, sq, self.dk, self.bv),
                                   lambda i, h, j: (i, h, 0, j))
    self.states_tile = pl.BlockSpec((sq, sq, self.n, self.dk, self.bv),
                                    lambda i, h, j: (i, h, 0, 0, j))

  def call(self, body, *args, grid, in_specs, out_specs, out_shape,
           stage: str):
    """One pallas_call of split kernel `stage` (a name from
    `block_sizes.SPLIT_KERNELS`)."""
    parallel = not stage.startswith("state_")
    warps = self.cfg.block_sizes.warps(stage, parallel)
    kwargs = {}
    params = self.cfg.compiler_params(("parallel",) * 3, num_warps=warps)
    if params is not None:
      kwargs["compiler_params"] = params
    prefix = "gated_delta_rule_bwd_" if stage.startswith("wy") else (
        "gated_delta_rule_")
    return pl.pallas_call(
        body, grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=self.cfg.interpret,
        name=prefix + stage, **kwargs)(*args)

  def shape(self, *dims, dtype=_F32):
    return jax.ShapeDtypeStruct(dims, dtype)


def _prep(p: _Plan, k, v, sc, with_t: bool = False):
  """w [b, hv, tp, dk], u [b, hv, tp, dv] in md; aux [b, hv, tp, 4] f32;
  with_t: also T, [b, hv, tp, c] f32 (row block n holds chunk n's T)."""
  b, hv, tp = p.b, p.hv, p.tp
  body = functools.partial(ks.prep_kernel, has_segments=p.cfg.has_segments,
                           d=p.d, block=p.cfg.block_sizes.solve_block)
  out_specs = [p.val_chunk(p.dk), p.val_chunk(p.dv), p.val_chunk(ks.NUM_AUX)]
  out_shape = [p.shape(b, hv, tp, p.dk, dtype=p.md),
               p.shape(b, hv, tp, p.dv, dtype=p.md),
               p.shape(b, hv, tp, ks.NUM_AUX)]
  if with_t:
    out_specs.append(p.val_chunk(p.c))
    out_shape.append(p.shape(b, hv, tp, p.c))
  return p.call(
      body, k, v, sc, grid=p.par_grid,
      in_specs=[p.key_chunk, p.val_chunk(p.dv),
                p.val_chunk(kernel.NUM_SCALARS)],
      out_specs=out_specs, out_shape=out_shape,
      stage="prep")


def _state_fwd(p: _Plan, w, u, k, aux, s0):
  """v' [b, hv, tp, dv] md, states h [b, hv, n, dk, dv] md, final state."""
  body = functools.partial(ks.state_fwd_kernel, num_chunks=p.n, chunk=p.c,
                           d=p.d)
  return p.call(
      body, w, u, k, aux, s0, grid=p.seq_grid,
      in_specs=[p.head_seq(p.dk), p.tile_seq, p.key_seq,
                p.head_seq(ks.NUM_AUX), p.state_tile],
      out_specs=[p.tile_seq, p.states_tile, p.state_tile],
      out_shape=[p.shape(p.b, p.hv, p.tp, p.dv, dtype=p.md),
                 p.shape(p.b, p.hv, p.n, p.dk, p.dv, dtype=p.md),
                 p.shape(p.b, p.hv, p.dk, p.dv)],
      stage="state_fwd")


def _output(p: _Plan, q, k, vn, h, aux, out_dtype):
  body = functools.partial(ks.output_kernel, scale=p.cfg.scale,
                           has_segments=p.cfg.has_segments, d=p.d)
  return p.call(
      body, q, k, vn, h, aux, grid=p.par_grid,
      in_specs=[p.key_chunk, p.key_chunk, p.val_chunk(p.dv), p.state_chunk,
                p.val_chunk(ks.NUM_AUX)],
      out_specs=p.val_chunk(p.dv),
      out_shape=p.shape(p.b, p.hv, p.tp, p.dv, dtype=out_dtype),
      stage="output")


def forward(q, k, v, sc, s0, cfg, sq):
  """(o [b, hv, tp, dv] in v.dtype, final state f32, states h in md)."""
  p = _Plan(q, k, v, cfg, sq)
  w, u, aux = _prep(p, k, v, sc)
  vn, h, st = _state_fwd(p, w, u, k, aux, s0)
  return _output(p, q, k, vn, h, aux, v.dtype), st, h


def _bwd_local(p: _Plan, q, k, w, u, h, aux, do):
  """v' recomputed [b, hv, tp, dv] md, and P^T dO f32."""
  b, hv, tp, dk, dv = p.b, p.hv, p.tp, p.dk, p.dv
  return p.call(
      functools.partial(ks.bwd_local_kernel, scale=p.cfg.scale, d=p.d,
                        has_segments=p.cfg.has_segments),
      q, k, w, u, h, aux, do, grid=p.par_grid,
      in_specs=[p.key_chunk, p.key_chunk, p.val_chunk(dk), p.val_chunk(dv),
                p.state_chunk, p.val_chunk(ks.NUM_AUX), p.val_chunk(dv)],
      out_specs=[p.val_chunk(dv), p.val_chunk(dv)],
      out_shape=[p.shape(b, hv, tp, dv, dtype=p.md), p.shape(b, hv, tp, dv)],
      stage="bwd_local")


def _state_bwd(p: _Plan, q, k, w, aux, do, dvl, dst):
  """dv' f32, state cotangents dh [b, hv, n, dk, dv] md, d initial state."""
  b, hv, tp, dk, dv = p.b, p.hv, p.tp, p.dk, p.dv
  return p.call(
      functools.partial(ks.state_bwd_kernel, num_chunks=p.n, chunk=p.c,
                        scale=p.cfg.scale, d=p.d),
      q, k, w, aux, do, dvl, dst, grid=p.seq_grid,
      in_specs=[p.key_seq, p.key_seq, p.head_seq(dk), p.head_seq(ks.NUM_AUX),
                p.tile_seq, p.tile_seq, p.state_tile],
      out_specs=[p.tile_seq, p.states_tile, p.state_tile],
      out_shape=[p.shape(b, hv, tp, dv),
                 p.shape(b, hv, p.n, dk, dv, dtype=p.md),
                 p.shape(b, hv, dk, dv)],
      stage="state_bwd")


def _bwd_out(p: _Plan, q, k, vn, dvn, h, dh, aux, do):
  """dq, dk (output / state paths), dw, (dg part, 0); per value head."""
  b, hv, tp, dk, dv = p.b, p.hv, p.tp, p.dk, p.dv
  ndsc = kernel.NUM_DSCALARS
  return p.call(
      functools.partial(ks.bwd_out_kernel, scale=p.cfg.scale, d=p.d,
                        has_segments=p.cfg.has_segments,
                        block=p.cfg.block_sizes.out_block),
      q, k, vn, dvn, h, dh, aux, do, grid=p.par_grid,
      in_specs=[p.key_chunk, p.key_chunk, p.val_chunk(dv), p.val_chunk(dv),
                p.state_chunk, p.state_chunk, p.val_chunk(ks.NUM_AUX),
                p.val_chunk(dv)],
      out_specs=[p.val_chunk(dk), p.val_chunk(dk), p.val_chunk(dk),
                 p.val_chunk(ndsc)],
      out_shape=[p.shape(b, hv, tp, dk)] * 3 + [p.shape(b, hv, tp, ndsc)],
      stage="bwd_out")


def _wy_v(p: _Plan, t, v, sc, dvn):
  """dv, dxu u^T [b, hv, tp, c] (u's share of -dA), (0, dbeta part)."""
  b, hv, tp, dv, c = p.b, p.hv, p.tp, p.dv, p.c
  ndsc = kernel.NUM_DSCALARS
  return p.call(
      functools.partial(ks.wy_v_kernel, d=p.d), t, v, sc, dvn,
      grid=p.par_grid,
      in_specs=[p.val_chunk(c), p.val_chunk(dv),
                p.val_chunk(kernel.NUM_SCALARS), p.val_chunk(dv)],
      out_specs=[p.val_chunk(dv), p.val_chunk(c), p.val_chunk(ndsc)],
      out_shape=[p.shape(b, hv, tp, dv), p.shape(b, hv, tp, c),
                 p.shape(b, hv, tp, ndsc)],
      stage="wy_v")


def _wy_k(p: _Plan, t, k, sc, aux, dw, dau):
  """dk (through w and T), (dg part, dbeta part)."""
  b, hv, tp, dk, c = p.b, p.hv, p.tp, p.dk, p.c
  ndsc = kernel.NUM_DSCALARS
  return p.call(
      functools.partial(ks.wy_k_kernel, has_segments=p.cfg.has_segments,
                        d=p.d),
      t, k, sc, aux, dw, dau, grid=p.par_grid,
      in_specs=[p.val_chunk(c), p.key_chunk,
                p.val_chunk(kernel.NUM_SCALARS), p.val_chunk(ks.NUM_AUX),
                p.val_chunk(dk), p.val_chunk(c)],
      out_specs=[p.val_chunk(dk), p.val_chunk(ndsc)],
      out_shape=[p.shape(b, hv, tp, dk), p.shape(b, hv, tp, ndsc)],
      stage="wy_k")


def _wy(p: _Plan, t, k, v, sc, aux, dvn, dw):
  """`_wy_v` and `_wy_k` as one kernel in column tiles: dv, the rest of dk,
  (dg part, dbeta part)."""
  b, hv, tp, dk, dv, c = p.b, p.hv, p.tp, p.dk, p.dv, p.c
  ndsc = kernel.NUM_DSCALARS
  return p.call(
      functools.partial(ks.wy_kernel, has_segments=p.cfg.has_segments,
                        block=p.cfg.block_sizes.wy_block, d=p.d),
      t, k, v, sc, aux, dvn, dw, grid=p.par_grid,
      in_specs=[p.val_chunk(c), p.key_chunk, p.val_chunk(dv),
                p.val_chunk(kernel.NUM_SCALARS), p.val_chunk(ks.NUM_AUX),
                p.val_chunk(dv), p.val_chunk(dk)],
      out_specs=[p.val_chunk(dk), p.val_chunk(dv), p.val_chunk(ndsc)],
      out_shape=[p.shape(b, hv, tp, dk), p.shape(b, hv, tp, dv),
                 p.shape(b, hv, tp, ndsc)],
      stage="wy")


def backward(q, k, v, sc, h, do, dst, cfg, sq):
  """Gradients per value head: dq, dk [b, hv, tp, dk] f32, dv [b, hv, tp,
  dv] f32, (dg, dbeta) [b, hv, tp, 2] f32 and the initial state's."""
  p = _Plan(q, k, v, cfg, sq)
  w, u, aux, t = _prep(p, k, v, sc, with_t=True)
  vn, dvl = _bwd_local(p, q, k, w, u, h, aux, do)
  dvn, dh, ds0 = _state_bwd(p, q, k, w, aux, do, dvl, dst)
  dq, dk_out, dw, dg_out = _bwd_out(p, q, k, vn, dvn, h, dh, aux, do)
  if cfg.block_sizes.wy_block is None:
    dv, dau, dsc_v = _wy_v(p, t, v, sc, dvn)
    dk_wy, dsc_k = _wy_k(p, t, k, sc, aux, dw, dau)
    dsc = dsc_v + dsc_k + dg_out
  else:
    dk_wy, dv, dsc_wy = _wy(p, t, k, v, sc, aux, dvn, dw)
    dsc = dsc_wy + dg_out
  # The state path's gradient of each chunk's G_last: <h_n, dh_n> times the
  # masked e^{G_last}; G = cumsum(g) hands it to every token of the chunk.
  ddl = jnp.einsum("bhnkv,bhnkv->bhn", h, dh, preferred_element_type=_F32,
                   precision=jax.lax.Precision.HIGHEST)
  ddl = ddl * aux[:, :, p.c - 1::p.c, ks.AUX_DECAY_Q]
  dsc = dsc.at[..., 0].add(jnp.repeat(ddl, p.c, axis=2))
  # Per value head; `pallas_gdr` sums the heads that share a key head.
  return dq, dk_out + dk_wy, dv, dsc, ds0


def pipeline_stages(q, k, v, sc, s0, do, dst, cfg, sq):
  """Every kernel of the forward and backward as (name, jitted fn, args,
  seconds of its first call: compilation and one run).

  The args of each stage are the outputs of the stages before it, computed
  here once, so each kernel can be timed on its own (per-kernel profile of
  `experiments.bench_gated_delta_rule --profile_kernels`).
  """
  p = _Plan(q, k, v, cfg, sq)
  stages = []

  def run(name, fn, *args):
    fn = jax.jit(fn)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    stages.append((name, fn, args, time.perf_counter() - start))
    return out

  w, u, aux = run("prep", lambda *a: _prep(p, *a), k, v, sc)
  vn, h, _ = run("state_fwd", lambda *a: _state_fwd(p, *a),
                 w, u, k, aux, s0)
  run("output", lambda *a: _output(p, *a, v.dtype), q, k, vn, h, aux)
  w, u, aux, t = run("prep (with T)",
                     lambda *a: _prep(p, *a, with_t=True), k, v, sc)
  vn, dvl = run("bwd_local", lambda *a: _bwd_local(p, *a),
                q, k, w, u, h, aux, do)
  dvn, dh, _ = run("state_bwd", lambda *a: _state_bwd(p, *a),
                   q, k, w, aux, do, dvl, dst)
  _, _, dw, _ = run("bwd_out", lambda *a: _bwd_out(p, *a),
                    q, k, vn, dvn, h, dh, aux, do)
  if cfg.block_sizes.wy_block is None:
    _, dau, _ = run("wy_v", lambda *a: _wy_v(p, *a), t, v, sc, dvn)
    run("wy_k", lambda *a: _wy_k(p, *a), t, k, sc, aux, dw, dau)
  else:
    run("wy", lambda *a: _wy(p, *a), t, k, v, sc, aux, dvn, dw)
  return stages
