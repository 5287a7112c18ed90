"""pallas_call builders and the custom_vjp of the split gated delta rule.

Token-major, as the caller's arrays (q, k [b, tp, hk, dk]; v [b, tp, hv,
dv]; scalars [b, tp, hv, 4]; state [b, hv, dk, dv] f32), padded to whole
chunks (`pallas_gdr._padded_inputs`): a chunk of one head is a strided
[c, d] block, so no head-major copies are made (the fused family's layout
is head-major). Every intermediate between the kernels is token-major too,
except the per-chunk states [b, hv, n, dk, dv]. The
kernel bodies and the plan (which kernel runs over which grid) are in
`kernel_split`. Parallel kernels take whole chunks and the whole dk / dv; the
two sequential kernels tile dv by `BlockSizes.block_dv` and loop over chunks
inside the program (the GPU driver of `BlockSizes.chunk_loop == "kernel"`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta_rule import block_sizes
from pallas_kernels.gated_delta_rule import kernel
from pallas_kernels.gated_delta_rule import kernel_split as ks

_F32 = jnp.float32
_SLICE = type(pl.ds(0, 1))  # what pl.ds makes


def matmul_dtype(q, k, v):
  """bf16 / f16 when q, k, v all are, else f32 (see `kernel_split`)."""
  dt = q.dtype
  if dt == k.dtype == v.dtype and dt in (jnp.bfloat16, jnp.float16):
    return dt
  return jnp.dtype(_F32)


class _Rows:
  """The rows [start, start + size) of a kernel's ref (its first axis), or
  with size None the single row `start` (that axis dropped), indexed like
  a ref: every index is composed with the offset into one indexer, since
  Triton's lowering takes one indexer per load or store (a view of a view
  it refuses). Row offsets that are not static ints must be multiples of
  `align`, which is passed on as an alignment hint."""

  def __init__(self, ref, start, size: int | None, align: int):
    self.ref, self.start, self.size, self.align = ref, start, size, align
    self.dtype = ref.dtype
    rest = tuple(ref.shape[1:])
    self.shape = rest if size is None else (size,) + rest

  def _index(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
      at = next(n for n, i in enumerate(idx) if i is Ellipsis)
      fill = len(self.shape) - (len(idx) - 1)
      idx = idx[:at] + (slice(None),) * fill + idx[at + 1:]
    idx = idx + (slice(None),) * (len(self.shape) - len(idx))
    if self.size is None:
      return (self.start,) + idx
    first, rest = idx[0], idx[1:]
    if isinstance(first, slice):
      if first.step not in (None, 1):
        raise ValueError(f"_Rows: strided rows {first}")
      lo = first.start or 0
      first = pl.ds(lo, (self.size if first.stop is None else first.stop)
                    - lo)
    if not isinstance(first, _SLICE):  # one row
      return (self.start + first,) + rest
    if first.stride != 1:
      raise ValueError(f"_Rows: strided rows {first}")
    off = first.start
    align = (math.gcd(self.align, off) if isinstance(off, int)
             else self.align)
    return (pl.ds(pl.multiple_of(self.start + off, align), first.size),
            ) + rest

  def __getitem__(self, idx):
    return self.ref[self._index(idx)]

  def __setitem__(self, idx, value):
    self.ref[self._index(idx)] = value


@dataclasses.dataclass(frozen=True)
class _Win:
  """A BlockSpec over a whole-sequence array of which a windowed call
  (`_Plan` with `window`) sees only its window: `kind` "chunk" (the
  program's chunk, [c, width] rows, of a parallel kernel), "state" (the
  program's chunk of the per-chunk states), "seq" (the window's rows, of
  a sequential kernel), "seq_states" (the window's chunks of the stored
  per-chunk states, of a sequential kernel), "chunk_pair" (the first
  chunk of the program's pair, with `BlockSizes.state_stride` 2),
  "entering" (the state entering the window's backward block, of the
  states entering each block, `BlockSizes.recompute_states`) or
  "entering_seq" (the rows of those states that fall in the window)."""
  spec: object
  kind: str


@dataclasses.dataclass(frozen=True)
class _Launch:
  """One pallas_call of a split kernel, described (`_Plan.call`):
  `aliases` maps input indices to the output each is written into in
  place; `stage` is the kernel's `SPLIT_KERNELS` name."""
  body: object
  args: tuple
  grid: tuple
  in_specs: list
  out_specs: list
  out_shape: list
  aliases: dict
  stage: str

  def run(self, cfg):
    parallel = not self.stage.startswith("state_")
    bs = cfg.block_sizes
    kwargs = {}
    params = cfg.compiler_params(("parallel",) * 3,
                                 num_warps=bs.warps(self.stage, parallel),
                                 num_stages=bs.stages(self.stage))
    if params is not None:
      kwargs["compiler_params"] = params
    if self.aliases:
      kwargs["input_output_aliases"] = self.aliases
    prefix = "gated_delta_rule_bwd_" if self.stage.startswith("wy") else (
        "gated_delta_rule_")
    return pl.pallas_call(
        self.body, grid=self.grid, in_specs=self.in_specs,
        out_specs=self.out_specs, out_shape=self.out_shape,
        interpret=cfg.pallas_interpret, name=prefix + self.stage,
        **kwargs)(*self.args)


def _paired(first: _Launch, second: _Launch, stage: str) -> _Launch:
  """Two independent calls of sequential kernels over the same grid (b,
  hv, nv) as one, over (b, hv, 2 nv): programs with a last id below nv
  run `first`'s body, the others `second`'s (each on its own refs, its
  BlockSpecs seeing that id modulo nv). Its outputs are first's, then
  second's. At batch 1 a sequential kernel has b x hv x nv programs, one
  an SM, latency-bound (docs/kernels.md): two independent passes in one
  launch run side by side instead of one after the other."""
  assert first.grid == second.grid, (first.grid, second.grid)
  nv = first.grid[2]

  def wrap(spec):
    index_map = spec.index_map
    return pl.BlockSpec(spec.block_shape,
                        lambda i, h, j: index_map(i, h, lax.rem(j, nv)))

  n_in, n_out = len(first.args), len(first.out_shape)
  n_all = n_in + len(second.args)

  def body(*refs):
    ins, outs = refs[:n_all], refs[n_all:]
    task = lax.div(pl.program_id(2), nv)
    pl.when(task == 0)(lambda: first.body(*ins[:n_in], *outs[:n_out]))
    pl.when(task == 1)(lambda: second.body(*ins[n_in:], *outs[n_out:]))

  aliases = dict(first.aliases)
  aliases.update({i + n_in: o + n_out for i, o in second.aliases.items()})
  return _Launch(
      body, first.args + second.args, first.grid[:2] + (2 * nv,),
      [wrap(x) for x in first.in_specs + second.in_specs],
      [wrap(x) for x in first.out_specs + second.out_specs],
      first.out_shape + second.out_shape, aliases, stage)


class _Plan:
  """Shapes and BlockSpecs shared by the builders of one call.

  With `window` (a number of chunks), the call takes the chunks [first,
  first + window) of whole-sequence arrays, `first` (int32 [1], traced)
  the chunk index that `call` hands each kernel: the inputs
  q, k, v, the scalars, dO and h (`*_in` specs) and the gradients dq, dk,
  dv (written into the caller's arrays in place, `call`'s `aliases`) are
  whole-sequence arrays read at an offset, never sliced (copied); every
  intermediate (`tokens`, `val_chunk`, ...) is the window's length. The
  forward in blocks writes o and the stored states h the same way (the
  first block creates them, writing its rows only; the others write
  theirs into them in place).
  """

  def __init__(self, q, k, v, cfg, sq, window: int | None = None,
               first: jax.Array | None = None, backward: bool = False):
    self.b, self.tp, _, self.dk = q.shape
    self.md = matmul_dtype(q, k, v)
    f32 = cfg.block_sizes.f32_dot
    if f32 == "auto":
      f32 = "tf32x3" if self.md == _F32 else "bf16x3"
    # Interpret mode runs on the CPU, which has no TF32: IEEE f32 there.
    self.d = ks.Dots(md=self.md, f32="highest" if cfg.interpret else f32)
    self.hv, self.dv = v.shape[2], v.shape[3]
    bs = cfg.block_sizes
    self.c, self.r = bs.chunk_size, cfg.group
    # The backward's sequential kernels may take another value tile
    # (`BlockSizes.bwd_block_dv`); what they write is the same either way.
    self.bv = bs.dv_tile(self.dv, backward)
    self.tp_in, self.n_in = self.tp, self.tp // self.c  # whole arrays
    # The stored per-chunk states: every `stride`-th chunk's.
    self.stride = bs.state_stride
    self.n_stored = -(-self.n_in // self.stride)
    # recompute_states: the states entering each backward block (every
    # `every`-th chunk's, f32), which the forward writes and the backward
    # reads.
    self.every = (bs.bwd_block // self.c if bs.recompute_states
                  and bs.bwd_block is not None else None)
    self.window, self.first = window, first
    if window is not None:
      self.tp = window * self.c
    self.n, self.nv = self.tp // self.c, self.dv // self.bv
    self.sq = sq
    self.cfg = cfg
    # Gradients leave the kernels in the input dtypes where nothing is left
    # to sum (dv always; dq, dk when each key head has one value head):
    # no f32 copies and no cast passes.
    self.dq_dtype = q.dtype if cfg.group == 1 else _F32
    self.dk_dtype = k.dtype if cfg.group == 1 else _F32
    self.dv_dtype = v.dtype
    c, r = self.c, self.r
    # Parallel kernels: grid (b, hv, n), one chunk per program.
    self.par_grid = (self.b, self.hv, self.n)
    self.key_chunk = pl.BlockSpec((sq, c, sq, self.dk),
                                  lambda i, h, t: (i, t, h // r, 0))
    self.val_chunk = lambda width: pl.BlockSpec(
        (sq, c, sq, width), lambda i, h, t: (i, t, h, 0))
    self.state_chunk = pl.BlockSpec((sq, sq, sq, self.dk, self.dv),
                                    lambda i, h, t: (i, h, t, 0, 0))
    # With state_stride 2: the first chunk of the program's pair (its
    # block-local arrays, and the stored state entering it).
    stride = self.stride
    self.val_pair = lambda width: pl.BlockSpec(
        (sq, c, sq, width),
        lambda i, h, t: (i, _pair_first(t, stride), h, 0))
    # Sequential kernels: grid (b, hv, nv), whole sequence per program.
    self.seq_grid = (self.b, self.hv, self.nv)
    tp = self.tp
    self.key_seq = pl.BlockSpec((sq, tp, sq, self.dk),
                                lambda i, h, j: (i, 0, h // r, 0))
    self.head_seq = lambda width: pl.BlockSpec(
        (sq, tp, sq, width), lambda i, h, j: (i, 0, h, 0))
    self.tile_seq = pl.BlockSpec((sq, tp, sq, self.bv),
                                 lambda i, h, j: (i, 0, h, j))
    self.state_tile = pl.BlockSpec((sq, sq, self.dk, self.bv),
                                   lambda i, h, j: (i, h, 0, j))
    self.states_tile = pl.BlockSpec((sq, sq, self.n, self.dk, self.bv),
                                    lambda i, h, j: (i, h, 0, 0, j))
    self.stored_tile = pl.BlockSpec(
        (sq, sq, self.n_stored, self.dk, self.bv),
        lambda i, h, j: (i, h, 0, 0, j))
    if self.every is not None:
      self.n_entering = -(-self.n_in // self.every)
      entering = pl.BlockSpec((sq, sq, self.n_entering, self.dk, self.bv),
                              lambda i, h, j: (i, h, 0, 0, j))
      if window is None:  # one backward block: its state is row 0
        self.entering_in = pl.BlockSpec((sq, sq, sq, self.dk, self.bv),
                                        lambda i, h, j: (i, h, 0, 0, j))
        self.entering_out = entering
      else:
        self.entering_in = _Win(entering, "entering")
        self.entering_out = _Win(entering, "entering_seq")
    # The whole-sequence arrays (see the class docstring).
    if window is None:
      self.key_in, self.val_in = self.key_chunk, self.val_chunk
      self.state_in = self.state_chunk if stride == 1 else pl.BlockSpec(
          (sq, sq, sq, self.dk, self.dv),
          lambda i, h, t: (i, h, ks.stored_row(t, stride), 0, 0))
      self.key_seq_in, self.tile_seq_in = self.key_seq, self.tile_seq
      self.stored_tile_in = self.stored_tile
      self.key_pair_in = pl.BlockSpec(
          (sq, c, sq, self.dk),
          lambda i, h, t: (i, _pair_first(t, stride), h // r, 0))
    else:
      # Whole-sequence blocks: the same for parallel and sequential grids
      # (program ids i, h, then the chunk or the dv tile j).
      tpi = self.tp_in
      key_whole = pl.BlockSpec((sq, tpi, sq, self.dk),
                               lambda i, h, _: (i, 0, h // r, 0))
      self.key_in, self.key_seq_in = _Win(key_whole, "chunk"), _Win(
          key_whole, "seq")
      self.key_pair_in = _Win(key_whole, "chunk_pair")
      self.val_in = lambda width: _Win(
          pl.BlockSpec((sq, tpi, sq, width), lambda i, h, _: (i, 0, h, 0)),
          "chunk")
      self.state_in = _Win(
          pl.BlockSpec((sq, sq, self.n_stored, self.dk, self.dv),
                       lambda i, h, _: (i, h, 0, 0, 0)), "state")
      self.tile_seq_in = _Win(pl.BlockSpec((sq, tpi, sq, self.bv),
                                           lambda i, h, j: (i, 0, h, j)),
                              "seq")
      self.stored_tile_in = _Win(
          pl.BlockSpec((sq, sq, self.n_stored, self.dk, self.bv),
                       lambda i, h, j: (i, h, 0, 0, j)), "seq_states")

  def call(self, body, *args, grid, in_specs, out_specs, out_shape,
           stage: str, aliases=(), launch: bool = True):
    """One pallas_call of split kernel `stage` (a name from
    `block_sizes.SPLIT_KERNELS`), or with `launch` False its `_Launch`
    (for `_paired` to merge with another).

    Windowed plans: `aliases` pairs (output index, whole-sequence array)
    whose outputs are written into those arrays in place (only the
    window's rows change).
    """
    io_aliases = {}
    if self.window is not None:
      body, args, in_specs, out_specs, io_aliases = self._windowed(
          body, args, in_specs, out_specs, aliases)
    call = _Launch(body, tuple(args), grid, list(in_specs), list(out_specs),
                   list(out_shape), io_aliases, stage)
    return call.run(self.cfg) if launch else call

  def _windowed(self, body, args, in_specs, out_specs, aliases):
    """`call`'s arguments for a windowed plan: `first` goes in first, the
    aliased arrays last, and the body sees `_Rows` views of the
    whole-sequence refs (`_Win` specs) and no aliased inputs."""
    c, n_args = self.c, len(args)
    kinds = [x.kind if isinstance(x, _Win) else None
             for x in (*in_specs, *out_specs)]
    unwrap = lambda specs: [x.spec if isinstance(x, _Win) else x
                            for x in specs]
    in_specs, out_specs = unwrap(in_specs), unwrap(out_specs)
    alias_in = {}
    for n, (out, array) in enumerate(aliases):
      alias_in[1 + n_args + n] = out
      args = (*args, array)
      in_specs = [*in_specs, out_specs[out]]
    n_alias = len(aliases)

    s = self.stride

    def windowed(first_ref, *refs):
      start = first_ref[0]
      refs = refs[:n_args] + refs[n_args + n_alias:]
      t = pl.program_id(2)
      views = []
      for ref, kind in zip(refs, kinds):
        # With state_stride s, windows start on a multiple of s chunks.
        if kind == "chunk":
          ref = _Rows(ref, pl.multiple_of((start + t) * c, c), c, c)
        elif kind == "chunk_pair":
          ref = _Rows(ref, pl.multiple_of((start + _pair_first(t, s)) * c, c),
                      c, c)
        elif kind == "state":
          ref = _Rows(ref, ks.stored_row(start + t, s), None, 1)
        elif kind == "seq":
          ref = _Rows(ref, pl.multiple_of(start * c, c), self.tp, c)
        elif kind == "seq_states":
          ref = _Rows(ref, ks.stored_row(start, s), -(-self.n // s), 1)
        elif kind == "entering":  # windows start on a backward block
          ref = _Rows(ref, ks.stored_row(start, self.every), None, 1)
        elif kind == "entering_seq":
          ref = _Rows(ref, ks.stored_row(start, self.every),
                      -(-self.n // self.every), 1)
        views.append(ref)
      body(*views)

    first_spec = pl.BlockSpec((1,), lambda *_: (0,))
    return (windowed, (self.first, *args), [first_spec, *in_specs],
            out_specs,
            alias_in)

  def shape(self, *dims, dtype=_F32):
    return jax.ShapeDtypeStruct(dims, dtype)

  def tokens(self, width, dtype=_F32, whole: bool = False):
    """A token-major intermediate [b, tp, hv, width] (the window's tokens),
    or with `whole` a whole-sequence array (a gradient)."""
    tp = self.tp_in if whole else self.tp
    return jax.ShapeDtypeStruct((self.b, tp, self.hv, width), dtype)


def _pair_first(t, stride: int):
  """The first chunk of chunk t's pair (`BlockSizes.state_stride` 2)."""
  return t - lax.rem(t, stride)


def _prep(p: _Plan, k, v, sc, with_t: bool = False, q=None):
  """w [b, tp, hv, dk], u [b, tp, hv, dv] in md; aux [b, tp, hv, 4] f32;
  with_t: also T, [b, tp, hv, c] in md (row block n holds chunk n's T);
  with q: also the intra-chunk attention P, [b, tp, hv, c] in md."""
  bs = p.cfg.block_sizes
  out = "t" if with_t else "p" if q is not None else None
  body = functools.partial(ks.prep_kernel, has_segments=p.cfg.has_segments,
                           d=p.d, block=bs.solve_block, sub=bs.sub_chunk,
                           out=out, scale=p.cfg.scale)
  args = [k, v, sc]
  in_specs = [p.key_in, p.val_in(p.dv), p.val_in(kernel.NUM_SCALARS)]
  if out == "p":
    args.append(q)
    in_specs.append(p.key_in)
  out_specs = [p.val_chunk(p.dk), p.val_chunk(p.dv), p.val_chunk(ks.NUM_AUX)]
  out_shape = [p.tokens(p.dk, dtype=p.md),
               p.tokens(p.dv, dtype=p.md),
               p.tokens(ks.NUM_AUX)]
  if out is not None:
    out_specs.append(p.val_chunk(p.c))
    out_shape.append(p.tokens(p.c, dtype=p.md))
  return p.call(body, *args, grid=p.par_grid, in_specs=in_specs,
                out_specs=out_specs, out_shape=out_shape,
                stage="prep_out" if out == "p" else "prep")


def _block_split(tp: int, c: int, block: int | None):
  """(chunks per block, whole blocks, chunks of a shorter last block) of
  a sequence of tp tokens in blocks of `block` tokens, or None when one
  block takes it all."""
  if block is None or block >= tp:
    return None
  per = block // c
  full = (tp // c) // per
  return per, full, tp // c - full * per


def _states(p: _Plan, whole: bool):
  """(spec, shape) of the per-chunk states a sequential kernel writes: the
  stored ones of the whole sequence (`whole`; every `state_stride`-th
  chunk's; windowed plans: the window's written into them), or the
  window's own (every chunk's)."""
  if whole:
    return p.stored_tile_in, p.shape(p.b, p.hv, p.n_stored, p.dk, p.dv,
                                     dtype=p.md)
  return p.states_tile, p.shape(p.b, p.hv, p.n, p.dk, p.dv, dtype=p.md)


def _into(outputs) -> tuple:
  """`call`'s aliases: (output index, array) for each array given."""
  return tuple((i, x) for i, x in outputs if x is not None)


def _state_fwd(p: _Plan, w, u, k, aux, s0, h_whole: bool = True,
               h_in=None, launch: bool = True, entering: bool = False):
  """v' [b, tp, hv, dv] md, states h [b, hv, n, dk, dv] md, final state.
  Windowed plans: h is the whole sequence's with `h_whole` (written into
  `h_in` in place when given), else the window's. With `entering`, s0 is
  the states entering every backward block ([b, hv, blocks, dk, dv] f32,
  `BlockSizes.recompute_states`), of which the kernel reads the window's.
  launch=False: the `_Launch` instead."""
  body = functools.partial(ks.state_fwd_kernel, num_chunks=p.n, chunk=p.c,
                           d=p.d)
  h_spec, h_shape = _states(p, h_whole)
  return p.call(
      body, w, u, k, aux, s0, grid=p.seq_grid,
      in_specs=[p.head_seq(p.dk), p.tile_seq, p.key_seq_in,
                p.head_seq(ks.NUM_AUX),
                p.entering_in if entering else p.state_tile],
      out_specs=[p.tile_seq, h_spec, p.state_tile],
      out_shape=[p.tokens(p.dv, dtype=p.md), h_shape,
                 p.shape(p.b, p.hv, p.dk, p.dv)],
      stage="state_fwd", aliases=_into([(1, h_in)]), launch=launch)


def _output(p: _Plan, q, k, vn, h, aux, out_dtype, h_whole: bool = True,
            o_in=None):
  """o [b, tp, hv, dv] (windowed plans: the whole sequence's, written into
  `o_in` in place when given); h as `_state_fwd` formed it."""
  body = functools.partial(ks.output_kernel, scale=p.cfg.scale,
                           has_segments=p.cfg.has_segments, d=p.d)
  return p.call(
      body, q, k, vn, h, aux, grid=p.par_grid,
      in_specs=[p.key_in, p.key_in, p.val_chunk(p.dv),
                p.state_in if h_whole else p.state_chunk,
                p.val_chunk(ks.NUM_AUX)],
      out_specs=[p.val_in(p.dv)],
      out_shape=[p.tokens(p.dv, dtype=out_dtype, whole=True)],
      stage="output", aliases=_into([(0, o_in)]))[0]


def _state_out(p: _Plan, w, u, q, k, pm, aux, s0, out_dtype, store_states,
               o_in=None, h_in=None, entering: bool = False):
  """o [b, tp, hv, dv], the final state and, with store_states, the states
  h [b, hv, n, dk, dv] md (else None): one sequential pass. With
  `entering` (`BlockSizes.recompute_states`), in place of h the states
  entering every backward block, [b, hv, blocks, dk, dv] f32 (the state
  entering every `p.every`-th chunk). Windowed plans: o and h are the
  whole sequence's (written into `o_in`, `h_in` in place when given)."""
  out_specs = [p.tile_seq_in, p.state_tile]
  out_shape = [p.tokens(p.dv, dtype=out_dtype, whole=True),
               p.shape(p.b, p.hv, p.dk, p.dv)]
  stride = p.stride
  if entering:
    out_specs.append(p.entering_out)
    out_shape.append(p.shape(p.b, p.hv, p.n_entering, p.dk, p.dv))
    stride = p.every
  elif store_states:
    h_spec, h_shape = _states(p, True)
    out_specs.append(h_spec)
    out_shape.append(h_shape)
  outs = p.call(
      functools.partial(ks.state_out_kernel, num_chunks=p.n, chunk=p.c,
                        scale=p.cfg.scale, d=p.d, stride=stride),
      w, u, q, k, pm, aux, s0, grid=p.seq_grid,
      in_specs=[p.head_seq(p.dk), p.tile_seq, p.key_seq_in, p.key_seq_in,
                p.head_seq(p.c), p.head_seq(ks.NUM_AUX), p.state_tile],
      out_specs=out_specs, out_shape=out_shape, stage="state_out",
      aliases=_into([(0, o_in), (2, h_in)]))
  return outs[0], outs[1], (outs[2] if store_states or entering else None)


def forward(q, k, v, sc, s0, cfg, sq, store_states: bool = True):
  """(o [b, tp, hv, dv] in v.dtype, final state f32, states h in md).

  With `BlockSizes.output_in_state` (True; "inference" without
  store_states) the output comes out of the sequential pass
  (`state_out`), and without store_states h is never written (None).
  Without it the output kernel reads h, so h is always formed.

  With `BlockSizes.fwd_block` the sequence is taken in blocks of that many
  tokens, first to last, each block's final state the next one's initial
  state: w, u, the decays and v' (or P) then exist for one block at a
  time. The kernels of a block read q, k, v and the scalars at its offset
  (windowed `_Plan`s), and write o (and, with store_states, h) into whole
  arrays: the first block's calls create them, writing their own rows,
  and each later block writes its rows into them in place, so nothing is
  zeroed or copied. Without store_states (and without output_in_state) h
  exists for one block at a time too.

  With `BlockSizes.recompute_states`, a forward with store_states runs
  as one without (no per-chunk states; the output inside the sequential
  pass under output_in_state "inference") and returns in place of h the
  state entering each backward block (of bwd_block tokens), [b, hv,
  blocks, dk, dv] f32, for the backward to recompute the block's states
  from. The sequential pass `state_out` writes them as it goes (every
  bwd_block // chunk_size chunks), so the forward's blocks may be
  several backward blocks long, or the whole sequence; the three-kernel
  forward (output_in_state False) hands them from block to block instead,
  in blocks of bwd_block.
  """
  bs = cfg.block_sizes
  starts = store_states and bs.recompute_states
  store_states = store_states and not bs.recompute_states
  marks = starts and bs.state_out_for(False)  # state_out writes them
  handed = starts and not marks  # else the blocks hand them on
  split = _block_split(q.shape[1], bs.chunk_size, bs.fwd_block)
  if split is None:
    o, s, h = _forward_all(q, k, v, sc, s0, cfg, sq, store_states,
                           entering=marks)
    return o, s, (s0[:, :, None] if handed else h)
  per, full, tail = split
  kept = store_states or marks  # h: per-chunk or entering states

  def step(first, chunks, s, o, h):
    (s, o, h), (q_, k_, v_, sc_) = _in_order((s, o, h), (q, k, v, sc))
    o, s, h_block = _forward_all(
        q_, k_, v_, sc_, s, cfg, sq, store_states, window=chunks,
        first=_first(first), o_in=o, h_in=h, entering=marks)
    return s, o, (h_block if kept else None)

  entering = [s0[None]]  # the states entering each block, if handed
  s, o, h = step(0, per, s0, None, None)  # creates o (and h)
  (s, o, h), mid = _over_blocks(  # mid: the states entering, if handed
      lambda j, carry: (step(j * per, per, *carry),
                        carry[0] if handed else None), (s, o, h),
      range(1, full), bs.block_loop)
  if mid is not None:
    entering.append(mid)
  if tail:  # the last, shorter block
    entering.append(s[None])
    s, o, h = step(full * per, tail, s, o, h)
  if handed:  # [blocks, b, hv, dk, dv] -> [b, hv, blocks, dk, dv]
    h = jnp.moveaxis(jnp.concatenate(entering), 0, 2)
  return o, s, h


def _direct(name, fn, *args):
  """The `stage` hook of `_forward_all` / `_backward_all` that just calls
  the kernel (`pallas_kernels.tools.split_profile` passes one that times
  it)."""
  del name
  return fn(*args)


def _forward_all(q, k, v, sc, s0, cfg, sq, store_states, window=None,
                 first=None, o_in=None, h_in=None, stage=_direct,
                 entering: bool = False):
  """`forward` over the whole sequence at once, or (window, first: a
  windowed `_Plan`) over that window, writing o (and, with store_states,
  h; with `entering`, which needs `state_out`, the states entering the
  backward's blocks in its place) into the whole-sequence `o_in` and
  `h_in` in place (created when None). Each kernel runs as `stage(name,
  fn, *args)`."""
  p = _Plan(q, k, v, cfg, sq, window, first)
  if cfg.block_sizes.state_out_for(store_states):
    w, u, aux, pm = stage("prep", lambda *a: _prep(p, *a[:3], q=a[3]),
                          k, v, sc, q)
    return stage("state_out",
                 lambda *a: _state_out(p, *a, v.dtype, store_states, o_in,
                                       h_in, entering),
                 w, u, q, k, pm, aux, s0)
  assert not entering, "the states entering blocks come from state_out"
  w, u, aux = stage("prep", lambda *a: _prep(p, *a), k, v, sc)
  vn, h, st = stage(
      "state_fwd",
      lambda *a: _state_fwd(p, *a, h_whole=store_states, h_in=h_in),
      w, u, k, aux, s0)
  o = stage("output",
            lambda *a: _output(p, *a, v.dtype, h_whole=store_states,
                               o_in=o_in),
            q, k, vn, h, aux)
  return o, st, h


def _bwd_local(p: _Plan, q, k, w, u, h, aux, do):
  """v' recomputed [b, tp, hv, dv] md, and P^T dO in md; with
  state_stride 2 also every chunk's state [b, hv, n, dk, dv] md (the
  window's), formed from the stored ones."""
  dk, dv = p.dk, p.dv
  args = [q, k, w, u, h, aux, do]
  in_specs = [p.key_in, p.key_in, p.val_chunk(dk), p.val_chunk(dv),
              p.state_in, p.val_chunk(ks.NUM_AUX), p.val_in(dv)]
  out_specs = [p.val_chunk(dv), p.val_chunk(dv)]
  out_shape = [p.tokens(dv, dtype=p.md), p.tokens(dv, dtype=p.md)]
  if p.stride > 1:
    args += [k, w, u, aux]
    in_specs += [p.key_pair_in, p.val_pair(dk), p.val_pair(dv),
                 p.val_pair(ks.NUM_AUX)]
    out_specs.append(p.state_chunk)
    out_shape.append(p.shape(p.b, p.hv, p.n, dk, dv, dtype=p.md))
  return p.call(
      functools.partial(ks.bwd_local_kernel, scale=p.cfg.scale, d=p.d,
                        has_segments=p.cfg.has_segments, stride=p.stride),
      *args, grid=p.par_grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, stage="bwd_local")


def _bwd_pdo(p: _Plan, q, k, aux, do):
  """P^T dO in md alone (`BlockSizes.recompute_states`: state_fwd gave
  v')."""
  return p.call(
      functools.partial(ks.bwd_pdo_kernel, scale=p.cfg.scale, d=p.d,
                        has_segments=p.cfg.has_segments),
      q, k, aux, do, grid=p.par_grid,
      in_specs=[p.key_in, p.key_in, p.val_chunk(ks.NUM_AUX), p.val_in(p.dv)],
      out_specs=[p.val_chunk(p.dv)],
      out_shape=[p.tokens(p.dv, dtype=p.md)], stage="bwd_pdo")[0]


def _state_bwd(p: _Plan, q, k, w, aux, do, dvl, dst, launch: bool = True):
  """dv' in md, state cotangents dh [b, hv, n, dk, dv] md, d initial state
  (launch=False: the `_Launch`)."""
  b, hv, dk, dv = p.b, p.hv, p.dk, p.dv
  return p.call(
      functools.partial(ks.state_bwd_kernel, num_chunks=p.n, chunk=p.c,
                        scale=p.cfg.scale, d=p.d),
      q, k, w, aux, do, dvl, dst, grid=p.seq_grid,
      in_specs=[p.key_seq_in, p.key_seq_in, p.head_seq(dk),
                p.head_seq(ks.NUM_AUX), p.tile_seq_in, p.tile_seq,
                p.state_tile],
      out_specs=[p.tile_seq, p.states_tile, p.state_tile],
      out_shape=[p.tokens(dv, dtype=p.md),
                 p.shape(b, hv, p.n, dk, dv, dtype=p.md),
                 p.shape(b, hv, dk, dv)],
      stage="state_bwd", launch=launch)


def _bwd_out(p: _Plan, q, k, vn, h, dh, aux, do, dq_in=None,
             h_spec=None):
  """dq, dk (output / state paths), (dg part, 0); per value head. dq_in:
  (windowed plans) the whole-sequence dq that the window's rows are
  written into, in place."""
  dk, dv = p.dk, p.dv
  ndsc = kernel.NUM_DSCALARS
  return p.call(
      functools.partial(ks.bwd_out_kernel, scale=p.cfg.scale, d=p.d,
                        has_segments=p.cfg.has_segments,
                        block=p.cfg.block_sizes.out_block),
      q, k, vn, h, dh, aux, do, grid=p.par_grid,
      in_specs=[p.key_in, p.key_in, p.val_chunk(dv), h_spec or p.state_in,
                p.state_chunk, p.val_chunk(ks.NUM_AUX), p.val_in(dv)],
      out_specs=[p.val_in(dk), p.val_chunk(dk), p.val_chunk(ndsc)],
      out_shape=[p.tokens(dk, dtype=p.dq_dtype, whole=True),
                 p.tokens(dk, dtype=p.dk_dtype), p.tokens(ndsc)],
      stage="bwd_out", aliases=() if dq_in is None else ((0, dq_in),))


def _wy(p: _Plan, t, k, v, sc, aux, vn, dvn, h, dk_out, dsc_out, dk_in=None,
        dv_in=None, dsc_in=None, h_spec=None):
  """Gradients through the WY form: dv, dk (with bwd_out's dk_out), (dg,
  dbeta) [b, tp, hv, 2] f32 (with bwd_out's dsc_out). dk_in, dv_in,
  dsc_in: (windowed plans) the whole-sequence dk, dv and (dg, dbeta) that
  the window's rows are written into, in place."""
  dk, dv, c = p.dk, p.dv, p.c
  ndsc = kernel.NUM_DSCALARS
  return p.call(
      functools.partial(ks.wy_kernel, has_segments=p.cfg.has_segments,
                        block=p.cfg.block_sizes.wy_block, d=p.d),
      t, k, v, sc, aux, vn, dvn, h, dk_out, dsc_out, grid=p.par_grid,
      in_specs=[p.val_chunk(c), p.key_in, p.val_in(dv),
                p.val_in(kernel.NUM_SCALARS), p.val_chunk(ks.NUM_AUX),
                p.val_chunk(dv), p.val_chunk(dv), h_spec or p.state_in,
                p.val_chunk(dk), p.val_chunk(ndsc)],
      out_specs=[p.val_in(dk), p.val_in(dv), p.val_in(ndsc)],
      out_shape=[p.tokens(dk, dtype=p.dk_dtype, whole=True),
                 p.tokens(dv, dtype=p.dv_dtype, whole=True),
                 p.tokens(ndsc, whole=True)],
      stage="wy", aliases=_into([(0, dk_in), (1, dv_in), (2, dsc_in)]))


def backward(q, k, v, sc, h, do, dst, cfg, sq):
  """Gradients per value head: dq, dk [b, tp, hv, dk], dv [b, tp, hv, dv]
  (f32, or the input dtypes where no heads are left to sum: `_Plan`),
  (dg, dbeta) [b, tp, hv, 2] f32 and the initial state's.

  With `BlockSizes.bwd_block` the sequence is taken in blocks of that many
  tokens, last to first, the state cotangent passed from each block to the
  one before it: every intermediate of the backward (T, w, u, v', dv',
  the state cotangents dh, the dk partial) then exists for one block at a
  time, beside the stored states h. The kernels of a block read q, k, v,
  the scalars, dO and h at the block's offset (windowed `_Plan`s: nothing
  is sliced, that is copied) and write dq, dk and dv into the whole
  gradient arrays in place: the first block's calls create those arrays
  (writing their own rows) and each later block writes its rows into them,
  so nothing is zeroed or copied. The gradients are the same; the cost is
  five kernel launches per block (six with recompute_states, five again
  with "paired").

  With `BlockSizes.recompute_states`, h is the state entering each block
  (`forward`), and each block's per-chunk states are recomputed from it
  (`_backward_all`; "paired": `_backward_paired`).
  """
  tp, c = q.shape[1], cfg.block_sizes.chunk_size
  recompute = cfg.block_sizes.recompute_states
  split = _block_split(tp, c, cfg.block_sizes.bwd_block)
  if split is None:
    return _backward_all(q, k, v, sc, h, do, dst, cfg, sq,
                         recompute=bool(recompute))
  if recompute == "paired":
    return _backward_paired(q, k, v, sc, h, do, dst, cfg, sq, split)
  per, full, tail = split

  def step(first, chunks, ds, grads):
    (ds, grads), (q_, k_, v_, sc_, h_, do_) = _in_order(
        (ds, grads), (q, k, v, sc, h, do))
    # recompute: h_ holds the states entering every block; the kernel
    # reads this block's.
    *grads, ds = _backward_all(
        q_, k_, v_, sc_, h_, do_, ds, cfg, sq, window=chunks,
        first=_first(first), grads=grads, recompute=recompute)
    return ds, grads

  # The last block goes first (the shorter one, if the blocks do not fill
  # the sequence) and creates dq, dk, dv and (dg, dbeta); the whole blocks
  # before it follow, last to first.
  last = full if tail else full - 1
  carry = step(last * per, tail or per, dst, None)
  (ds, grads), _ = _over_blocks(
      lambda j, carry: (step(j * per, per, *carry), None), carry,
      range(last), cfg.block_sizes.block_loop, reverse=True)
  return (*grads, ds)


def _first(chunk) -> jax.Array:
  """A windowed `_Plan`'s `first`: int32 [1]."""
  return jnp.reshape(chunk, (1,)).astype(jnp.int32)


def _in_order(carry, inputs):
  """(carry, inputs) through `lax.optimization_barrier`, at the start of
  each block's step: the step's kernels read the inputs as they come out
  of it, so they run after the previous block's, which made the carry.
  Without it nothing orders a block's first kernels (prep reads only the
  inputs) after the block before, and XLA may run every block's ahead and
  hold all their intermediates at once: unrolled (`block_loop`
  "unroll"), XLA's buffer assignment of the 32k benchmark shape in
  blocks of 4096 (`pallas_kernels.tools.triton_resources.xla_temporaries`) held
  717 MiB of temporaries with recompute_states "paired", 248 with the
  barrier. A barrier moves no data; the GPU compiler removes it after
  scheduling."""
  return lax.optimization_barrier((carry, inputs))


def _over_blocks(step, carry, blocks: range, loop: str,
                 reverse: bool = False, blocks_per_step: int = 1):
  """(carry, ys) after `carry, y = step(j, carry)` for the whole blocks j
  in `blocks`, first to last or (`reverse`) last to first, the ys
  stacked in block order (None if the steps give None or there are no
  blocks): a `lax.scan`, or with `loop` "unroll" (`BlockSizes.block_loop`)
  a Python loop; "auto" unrolls when the steps take at most
  `AUTO_UNROLL_BLOCKS` blocks (`blocks_per_step` a step)."""
  if not blocks:
    return carry, None
  if loop == "auto":
    loop = ("unroll" if len(blocks) * blocks_per_step
            <= block_sizes.AUTO_UNROLL_BLOCKS else "scan")
  if loop == "scan":
    return lax.scan(lambda carry, j: step(j, carry), carry,
                    jnp.arange(blocks.start, blocks.stop), reverse=reverse)
  ys = {}
  for j in (reversed(blocks) if reverse else blocks):
    carry, ys[j] = step(j, carry)
  ys = [ys[j] for j in blocks]
  return carry, (None if ys[0] is None else jnp.stack(ys))


def _backward_paired(q, k, v, sc, h, do, dst, cfg, sq, split):
  """`backward` in blocks with `BlockSizes.recompute_states="paired"`.

  h: the state entering each block. Block j's backward needs block j's
  per-chunk states and v' (state_fwd from h[j]) before its state_bwd,
  and block j - 1's state_fwd needs only h[j - 1]: so the two run in one
  launch (`_paired`, kernel "state_pair"), and each block's states are
  formed one block ahead of its backward, carried to the next block with
  the block's prep (w, the decays, T). Per block: prep of the block
  before, bwd_pdo, state_pair, bwd_out, wy; the last block's state_fwd
  runs alone first, and the first block's state_bwd alone at the end.
  """
  per, full, tail = split
  inputs = (q, k, v, sc, do, h)

  def plan(j, chunks, q, k, v):
    return _Plan(q, k, v, cfg, sq, chunks, _first(j * per), backward=True)

  def prep(p, k, v, sc):  # -> (w, u, aux, t)
    return _prep(p, k, v, sc, with_t=True)

  def ahead(p, prepped, k, h, launch=True):
    """The state_fwd of p's block from the state entering it (in h, the
    states entering every block, of which p's window picks its block's):
    (v', states, final state)."""
    w, u, aux, _ = prepped
    return _state_fwd(p, w, u, k, aux, h, h_whole=False, launch=launch,
                      entering=True)

  def step(j, chunks, carry, pair: bool):
    carry, (q, k, v, sc, do, h) = _in_order(carry, inputs)
    ds, grads, (w, aux, t, vn, hs) = carry
    p = plan(j, chunks, q, k, v)
    dvl = _bwd_pdo(p, q, k, aux, do)
    bwd = _state_bwd(p, q, k, w, aux, do, dvl, ds, launch=not pair)
    if pair:
      p_prev = plan(j - 1, per, q, k, v)
      prepped = prep(p_prev, k, v, sc)
      outs = _paired(bwd, ahead(p_prev, prepped, k, h, launch=False),
                     "state_pair").run(cfg)
      (dvn, dh, ds), (vn_prev, hs_prev, _) = outs[:3], outs[3:]
      w_prev, _, aux_prev, t_prev = prepped
      ahead_carry = (w_prev, aux_prev, t_prev, vn_prev, hs_prev)
    else:
      dvn, dh, ds = bwd
      ahead_carry = None
    grads = _bwd_grads(p, q, k, v, sc, do, aux, t, vn, hs, dvn, dh, grads,
                       p.state_chunk)
    return ds, grads, ahead_carry

  last = full if tail else full - 1  # >= 1: there are two blocks or more
  p = plan(last, tail or per, q, k, v)
  w, u, aux, t = prep(p, k, v, sc)
  vn, hs, _ = ahead(p, (w, u, aux, t), k, h)
  carry = step(last, tail or per,
               (dst, None, (w, aux, t, vn, hs)),
               pair=True)
  # Whole blocks last - 1 ... 1, each paired with the one before it, two
  # blocks a step (an odd one first, alone). A block forms the next
  # block's intermediates while its own, carried in, are still to be
  # read: in steps of one block, what a step hands on cannot be formed in
  # the buffers it came in, so XLA forms it elsewhere and copies it in
  # and out of them every step (its count at 32k in blocks of 4096: 73
  # MiB twice a step, 264 MiB held). In steps of two, what a step hands
  # on is formed by its second block, after `_in_order`, when what came
  # in is dead: in those buffers (248 MiB, no copies).
  top = last - 1
  if top % 2:
    carry = step(top, per, carry, pair=True)
    top -= 1

  def two(i, carry):  # blocks 2i + 2, then 2i + 1
    carry = step(2 * i + 2, per, carry, pair=True)
    return step(2 * i + 1, per, carry, pair=True), None

  carry, _ = _over_blocks(two, carry, range(top // 2),
                          cfg.block_sizes.block_loop, reverse=True,
                          blocks_per_step=2)
  ds, grads, _ = step(0, per, carry, pair=False)
  return (*grads, ds)


def _bwd_grads(p: _Plan, q, k, v, sc, do, aux, t, vn, h, dvn, dh, grads,
               h_spec, stage=_direct):
  """The kernels after the state cotangent pass: bwd_out and wy. Returns
  dq, dk, dv and (dg, dbeta) (windowed plans: the whole sequence's,
  written into `grads` in place, or created by the first block)."""
  dq_in, dk_in, dv_in, dsc_in = grads or (None,) * 4
  dq, dk_out, dsc_out = stage(
      "bwd_out", lambda *a: _bwd_out(p, *a, dq_in=dq_in, h_spec=h_spec),
      q, k, vn, h, dh, aux, do)
  dk, dv, dsc = stage(
      "wy", lambda *a: _wy(p, *a, dk_in=dk_in, dv_in=dv_in, dsc_in=dsc_in,
                           h_spec=h_spec),
      t, k, v, sc, aux, vn, dvn, h, dk_out, dsc_out)
  return dq, dk, dv, dsc


def _backward_all(q, k, v, sc, h, do, dst, cfg, sq, window=None, first=None,
                  grads=None, recompute: bool = False, stage=_direct):
  """`backward` over the whole sequence at once, or (window, first: a
  windowed `_Plan`) over that window, writing dq, dk, dv and (dg, dbeta)
  into `grads` in place (created when None); dS0 is the window's. With
  `recompute`, h is the states entering every backward block ([b, hv,
  blocks, dk, dv] f32), from the window's of which state_fwd forms the
  window's per-chunk states and v' again. Each kernel runs as
  `stage(name, fn, *args)`."""
  p = _Plan(q, k, v, cfg, sq, window, first, backward=True)
  w, u, aux, t = stage("prep (with T)",
                       lambda *a: _prep(p, *a, with_t=True), k, v, sc)
  h_spec = None
  if recompute:
    vn, h, _ = stage("state_fwd (backward)",
                     lambda *a: _state_fwd(p, *a, h_whole=False,
                                           entering=True),
                     w, u, k, aux, h)
    h_spec = p.state_chunk  # the window's states
    dvl = stage("bwd_pdo", lambda *a: _bwd_pdo(p, *a), q, k, aux, do)
  else:
    vn, dvl, *hn = stage("bwd_local", lambda *a: _bwd_local(p, *a),
                         q, k, w, u, h, aux, do)
    if hn:  # state_stride 2: every chunk's state, the window's
      h, h_spec = hn[0], p.state_chunk
  dvn, dh, ds0 = stage("state_bwd", lambda *a: _state_bwd(p, *a),
                       q, k, w, aux, do, dvl, dst)
  # Per value head; `pallas_gdr` sums the heads that share a key head.
  return (*_bwd_grads(p, q, k, v, sc, do, aux, t, vn, h, dvn, dh, grads,
                      h_spec, stage), ds0)

