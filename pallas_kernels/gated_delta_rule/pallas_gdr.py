"""Pallas chunked gated delta rule: pallas_call builders and the custom_vjp.

Layout inside: head-major, time padded to whole chunks,

  q, k     [b, hk, tp, dk]   (input dtype; value head h reads key head h // r)
  v        [b, hv, tp, dv]   (input dtype)
  scalars  [b, hv, tp, 4]    f32: g, beta, resets-so-far-in-chunk, 0
  state    [b, hv, dk, dv]   f32

The forward kernel writes o, the final state and (only under autodiff) the
state entering every chunk, [b, hv, n, dk, dv] f32: the one thing the
backward does not recompute. The backward kernel walks the chunks last to
first, recomputes each chunk's decays, masks and UT/WY inverse, and carries
dS, the cotangent of the state, from chunk to chunk.

Backends: GPU lowers through Pallas Triton ("kernel" chunk loop), TPU
through Mosaic ("grid" chunk loop with VMEM scratch); `interpret=True` runs
either on any backend (CPU tests). Without interpret on CPU,
`gated_delta_rule_pallas` raises a ValueError naming `interpret`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

from pallas_kernels.gated_delta_rule import block_sizes as block_sizes_lib
from pallas_kernels.gated_delta_rule import kernel
from pallas_kernels.gated_delta_rule import pallas_split
from pallas_kernels.gated_delta_rule import reference
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes

_F32 = jnp.float32
# A dimension dropped from the kernel's view of a block (jax >= 0.7 spells
# it pl.squeezed / pl.Squeezed(); None still works on older versions).
_SQ = getattr(pl, "squeezed", None)


# ---------------------------------------------------------------------------
# Compatibility shim. The Pallas names used here are the same in jax 0.10.2
# and 0.11.2 (checked); the fallbacks are the spellings of older releases.
# jax 0.11 deprecates the Triton lowering (it warns with a DeprecationWarning,
# not an error) and needs a GPU, or an abstract one, to lower for it.
# ---------------------------------------------------------------------------


def triton_compiler_params(num_warps: int, num_stages: int):
  pl_triton = importlib.import_module("jax.experimental.pallas.triton")
  cls = (getattr(pl_triton, "CompilerParams", None)
         or getattr(pl_triton, "TritonCompilerParams"))
  return cls(num_warps=num_warps, num_stages=num_stages)


def _tpu_module():
  return importlib.import_module("jax.experimental.pallas.tpu")


def _tpu_compiler_params(dimension_semantics: tuple[str, ...]):
  pltpu = _tpu_module()
  cls = (getattr(pltpu, "CompilerParams", None)
         or getattr(pltpu, "TPUCompilerParams"))
  return cls(dimension_semantics=dimension_semantics)


def tpu_interpreter(**params):
  """Pallas' TPU interpreter (`pltpu.InterpretParams`), for `interpret=`.

  It runs a Mosaic kernel on the CPU as a TPU would: with its compiler
  params (dimension semantics, a megacore split of the leading parallel
  axis over `num_cores_or_threads` simulated cores), blocks copied in and
  out by simulated DMAs, uninitialised buffers filled with NaN,
  out-of-bounds reads raised, and optionally a race detector
  (`detect_races=True`). `interpret=True` with backend "tpu" uses it with
  its defaults; the generic interpreter (`interpret=True` elsewhere) runs
  the kernel body on whole arrays with none of that.
  """
  return _tpu_module().InterpretParams(**params)


def _vmem(shape, dtype):
  """A VMEM scratch buffer (also understood by the interpreter)."""
  pltpu = _tpu_module()
  vmem = getattr(pltpu, "VMEM", None)
  if vmem is None:  # older spelling
    vmem = pltpu.TPUMemorySpace.VMEM
  return vmem(shape, dtype)


# ---------------------------------------------------------------------------
# Static configuration.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static arguments of the core (hashable for custom_vjp / jit)."""
  scale: float
  group: int  # r = hv // hk
  block_sizes: BlockSizes
  backend: str  # "gpu", "tpu" or "cpu"
  # False, True, or `tpu_interpreter(...)`'s params (the fused kernels on
  # backend "tpu"); see `pallas_interpret`.
  interpret: object
  has_segments: bool

  @property
  def tpu_interpreted(self) -> bool:
    """The fused kernels run in the TPU interpreter (backend "tpu")."""
    return (bool(self.interpret) and self.backend == "tpu"
            and self.block_sizes.kernels == "fused")

  @property
  def pallas_interpret(self):
    """`pallas_call`'s interpret argument: the TPU interpreter for the
    fused kernels on backend "tpu" (default params for `True`), else a
    bool."""
    if self.tpu_interpreted:
      return (tpu_interpreter() if self.interpret is True
              else self.interpret)
    return bool(self.interpret)

  @property
  def token_major(self) -> bool:
    """The split kernels take [b, t, h, d]; the fused ones [b, h, t, d]."""
    return self.block_sizes.kernels == "split"

  def compiler_params(self, semantics: tuple[str, ...],
                      num_warps: int | None = None,
                      num_stages: int | None = None):
    if self.interpret and not self.tpu_interpreted:
      return None
    if self.backend == "gpu":
      return triton_compiler_params(
          num_warps or self.block_sizes.num_warps,
          num_stages or self.block_sizes.num_stages)
    if self.backend == "tpu":
      return _tpu_compiler_params(semantics)
    return None


def _call(body, *args, grid, in_specs, out_specs, out_shape, cfg,
          semantics, scratch_shapes=(), name):
  kwargs = {}
  params = cfg.compiler_params(semantics)
  if params is not None:
    kwargs["compiler_params"] = params
  if scratch_shapes:
    kwargs["scratch_shapes"] = list(scratch_shapes)
  return pl.pallas_call(
      body, grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=cfg.pallas_interpret, name=name,
      **kwargs)(*args)


# ---------------------------------------------------------------------------
# Forward / backward builders.
# ---------------------------------------------------------------------------


def _fwd(q, k, v, sc, s0, cfg: _Config, store_states: bool):
  """Runs the forward kernel; returns (o, final_state, states or None)."""
  b, _, tp, dk = q.shape
  hv, dv = v.shape[1], v.shape[3]
  bs = cfg.block_sizes
  c, bv, r = bs.chunk_size, bs.dv_tile(dv), cfg.group
  n, nv = tp // c, dv // bs.dv_tile(dv)
  out_shape = [jax.ShapeDtypeStruct((b, hv, tp, dv), v.dtype),
               jax.ShapeDtypeStruct((b, hv, dk, dv), _F32)]
  if store_states:
    out_shape.append(jax.ShapeDtypeStruct((b, hv, n, dk, dv), _F32))
  semantics = ("parallel",) * 3 + ("arbitrary",)
  state_spec_shape = (_SQ, _SQ, dk, bv)
  if bs.chunk_loop == "kernel":
    grid = (b, hv, nv)
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, tp, dk), lambda i, h, j: (i, h // r, 0, 0)),
        pl.BlockSpec((_SQ, _SQ, tp, dk), lambda i, h, j: (i, h // r, 0, 0)),
        pl.BlockSpec((_SQ, _SQ, tp, bv), lambda i, h, j: (i, h, 0, j)),
        pl.BlockSpec((_SQ, _SQ, tp, kernel.NUM_SCALARS),
                     lambda i, h, j: (i, h, 0, 0)),
        pl.BlockSpec(state_spec_shape, lambda i, h, j: (i, h, 0, j)),
    ]
    out_specs = [
        pl.BlockSpec((_SQ, _SQ, tp, bv), lambda i, h, j: (i, h, 0, j)),
        pl.BlockSpec(state_spec_shape, lambda i, h, j: (i, h, 0, j)),
    ]
    if store_states:
      out_specs.append(pl.BlockSpec((_SQ, _SQ, n, dk, bv),
                                    lambda i, h, j: (i, h, 0, 0, j)))
    body = kernel.bind(kernel.fwd_loop_kernel, num_chunks=n, chunk=c,
                       scale=cfg.scale, has_segments=cfg.has_segments)
    scratch = ()
  else:
    grid = (b, hv, nv, n)
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, c, dk),
                     lambda i, h, j, t: (i, h // r, t, 0)),
        pl.BlockSpec((_SQ, _SQ, c, dk),
                     lambda i, h, j, t: (i, h // r, t, 0)),
        pl.BlockSpec((_SQ, _SQ, c, bv), lambda i, h, j, t: (i, h, t, j)),
        pl.BlockSpec((_SQ, _SQ, c, kernel.NUM_SCALARS),
                     lambda i, h, j, t: (i, h, t, 0)),
        pl.BlockSpec(state_spec_shape, lambda i, h, j, t: (i, h, 0, j)),
    ]
    out_specs = [
        pl.BlockSpec((_SQ, _SQ, c, bv), lambda i, h, j, t: (i, h, t, j)),
        pl.BlockSpec(state_spec_shape, lambda i, h, j, t: (i, h, 0, j)),
    ]
    if store_states:
      out_specs.append(pl.BlockSpec((_SQ, _SQ, _SQ, dk, bv),
                                    lambda i, h, j, t: (i, h, t, 0, j)))
    body = kernel.bind(kernel.fwd_grid_kernel, scale=cfg.scale,
                       has_segments=cfg.has_segments,
                       store_states=store_states)
    scratch = (_vmem((dk, bv), _F32),)
  outs = _call(body, q, k, v, sc, s0, grid=grid, in_specs=in_specs,
               out_specs=out_specs, out_shape=out_shape, cfg=cfg,
               semantics=semantics, scratch_shapes=scratch,
               name="gated_delta_rule_fwd")
  if store_states:
    return outs[0], outs[1], outs[2]
  return outs[0], outs[1], None


def _bwd(q, k, v, sc, states, do, dst, cfg: _Config):
  """Runs the backward kernel; returns per-value-head partial gradients.

  Returns:
    dq, dk [b, hv, nv, tp, dk] f32 (partial over dv tiles), dv [b, hv, tp,
    dv] f32, dsc [b, hv, nv, tp, 2] f32 (dg, dbeta partials), ds0 [b, hv,
    dk, dv] f32.
  """
  b, _, tp, dk = q.shape
  hv, dv = v.shape[1], v.shape[3]
  bs = cfg.block_sizes
  c, bv, r = bs.chunk_size, bs.dv_tile(dv), cfg.group
  n, nv = tp // c, dv // bs.dv_tile(dv)
  nsc, ndsc = kernel.NUM_SCALARS, kernel.NUM_DSCALARS
  out_shape = [
      jax.ShapeDtypeStruct((b, hv, nv, tp, dk), _F32),
      jax.ShapeDtypeStruct((b, hv, nv, tp, dk), _F32),
      jax.ShapeDtypeStruct((b, hv, tp, dv), _F32),
      jax.ShapeDtypeStruct((b, hv, nv, tp, ndsc), _F32),
      jax.ShapeDtypeStruct((b, hv, dk, dv), _F32),
  ]
  semantics = ("parallel",) * 3 + ("arbitrary",)
  st = (_SQ, _SQ, dk, bv)
  if bs.chunk_loop == "kernel":
    grid = (b, hv, nv)
    kmap = lambda i, h, j: (i, h // r, 0, 0)
    vmap = lambda i, h, j: (i, h, 0, j)
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, tp, dk), kmap),
        pl.BlockSpec((_SQ, _SQ, tp, dk), kmap),
        pl.BlockSpec((_SQ, _SQ, tp, bv), vmap),
        pl.BlockSpec((_SQ, _SQ, tp, nsc), lambda i, h, j: (i, h, 0, 0)),
        pl.BlockSpec((_SQ, _SQ, n, dk, bv), lambda i, h, j: (i, h, 0, 0, j)),
        pl.BlockSpec((_SQ, _SQ, tp, bv), vmap),
        pl.BlockSpec(st, vmap),
    ]
    pmap = lambda i, h, j: (i, h, j, 0, 0)
    out_specs = [
        pl.BlockSpec((_SQ, _SQ, _SQ, tp, dk), pmap),
        pl.BlockSpec((_SQ, _SQ, _SQ, tp, dk), pmap),
        pl.BlockSpec((_SQ, _SQ, tp, bv), vmap),
        pl.BlockSpec((_SQ, _SQ, _SQ, tp, ndsc), pmap),
        pl.BlockSpec(st, vmap),
    ]
    body = kernel.bind(kernel.bwd_loop_kernel, num_chunks=n, chunk=c,
                       scale=cfg.scale, has_segments=cfg.has_segments)
    scratch = ()
  else:
    grid = (b, hv, nv, n)
    last = n - 1  # chunks are visited in reverse: block index last - t
    kmap = lambda i, h, j, t: (i, h // r, last - t, 0)
    vmap = lambda i, h, j, t: (i, h, last - t, j)
    smap = lambda i, h, j, t: (i, h, 0, j)
    pmap = lambda i, h, j, t: (i, h, j, last - t, 0)
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, c, dk), kmap),
        pl.BlockSpec((_SQ, _SQ, c, dk), kmap),
        pl.BlockSpec((_SQ, _SQ, c, bv), vmap),
        pl.BlockSpec((_SQ, _SQ, c, nsc),
                     lambda i, h, j, t: (i, h, last - t, 0)),
        pl.BlockSpec((_SQ, _SQ, _SQ, dk, bv),
                     lambda i, h, j, t: (i, h, last - t, 0, j)),
        pl.BlockSpec((_SQ, _SQ, c, bv), vmap),
        pl.BlockSpec(st, smap),
    ]
    out_specs = [
        pl.BlockSpec((_SQ, _SQ, _SQ, c, dk), pmap),
        pl.BlockSpec((_SQ, _SQ, _SQ, c, dk), pmap),
        pl.BlockSpec((_SQ, _SQ, c, bv), vmap),
        pl.BlockSpec((_SQ, _SQ, _SQ, c, ndsc), pmap),
        pl.BlockSpec(st, smap),
    ]
    body = kernel.bind(kernel.bwd_grid_kernel, scale=cfg.scale,
                       has_segments=cfg.has_segments)
    scratch = (_vmem((dk, bv), _F32),)
  return _call(body, q, k, v, sc, states, do, dst, grid=grid,
               in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
               cfg=cfg, semantics=semantics, scratch_shapes=scratch,
               name="gated_delta_rule_bwd")


# ---------------------------------------------------------------------------
# custom_vjp over the padded, head-major layout.
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, sc, s0, cfg: _Config):
  if cfg.block_sizes.kernels == "split":
    o, st, _ = pallas_split.forward(q, k, v, sc, s0, cfg, _SQ,
                                    store_states=False)
  else:
    o, st, _ = _fwd(q, k, v, sc, s0, cfg, store_states=False)
  return o, st


def _core_fwd(q, k, v, sc, s0, cfg: _Config):
  if cfg.block_sizes.kernels == "split":
    o, st, states = pallas_split.forward(q, k, v, sc, s0, cfg, _SQ)
  else:
    o, st, states = _fwd(q, k, v, sc, s0, cfg, store_states=True)
  return (o, st), (q, k, v, sc, states)


def _core_bwd(cfg: _Config, res, cts):
  q, k, v, sc, states = res
  do, dst = cts
  if cfg.block_sizes.kernels == "split":
    dq, dk, dv, dsc, ds0 = pallas_split.backward(
        q, k, v, sc, states, do, dst.astype(_F32), cfg, _SQ)
  else:
    dq, dk, dv, dsc, ds0 = _bwd(q, k, v, sc, states, do, dst.astype(_F32),
                                cfg)
    # Sum the partials of the dv tiles: [b, hv, nv, tp, d] -> [b, hv, tp, d].
    dq, dk, dsc = (jnp.sum(x, axis=2) for x in (dq, dk, dsc))

  def fold(x):  # value heads of a key head: [.., hv, ..] -> [.., hk, ..]
    if cfg.group == 1:
      return x
    if cfg.token_major:  # [b, tp, hv, d]
      b, tp, hv, d = x.shape
      return jnp.sum(x.reshape(b, tp, hv // cfg.group, cfg.group, d), axis=3)
    b, hv, tp, d = x.shape
    return jnp.sum(x.reshape(b, hv // cfg.group, cfg.group, tp, d), axis=2)

  pad = kernel.NUM_SCALARS - kernel.NUM_DSCALARS
  dsc = jnp.pad(dsc, ((0, 0),) * 3 + ((0, pad),)).astype(sc.dtype)
  return (fold(dq).astype(q.dtype), fold(dk).astype(k.dtype),
          dv.astype(v.dtype), dsc, ds0)


_core.defvjp(_core_fwd, _core_bwd)


# ---------------------------------------------------------------------------
# Public entry.
# ---------------------------------------------------------------------------


def _next_pow2(x: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (x - 1).bit_length())


def _heads_first(x: jax.Array, d_pad: int = 0, *, tp: int) -> jax.Array:
  """[b, t, h, d] -> [b, h, tp, d + d_pad] (zero padding)."""
  t = x.shape[1]
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, tp - t), (0, d_pad)))


def _tokens_first(x: jax.Array, d_pad: int = 0, *, tp: int) -> jax.Array:
  """[b, t, h, d] -> [b, tp, h, d + d_pad] (zero padding; no copy when
  there is nothing to pad)."""
  t = x.shape[1]
  if tp == t and not d_pad:
    return x
  return jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, d_pad)))


def _padded_inputs(q, k, v, g, beta, segment_ids, chunk: int, dk_pad: int,
                   dv_pad: int, token_major: bool = False):
  """The kernels' layout: (q, k [b, hk, tp, dk + dk_pad], v [b, hv, tp,
  dv + dv_pad], scalars [b, hv, tp, 4] f32), tp = t rounded up to chunks;
  with `token_major` (the split kernels) the same with tp and the heads in
  the caller's order, [b, tp, h, d], which needs no copy when nothing is
  padded."""
  b, t = q.shape[:2]
  hv = v.shape[2]
  tp = max(chunk, -(-t // chunk) * chunk)
  to_layout = functools.partial(
      _tokens_first if token_major else _heads_first, tp=tp)
  qh = to_layout(q, dk_pad)
  kh = to_layout(k, dk_pad)
  vh = to_layout(v, dv_pad)
  gb = jnp.stack([g.astype(_F32), beta.astype(_F32)], axis=-1)
  gb = to_layout(gb)  # padded tokens: g = beta = 0
  if segment_ids is None:
    resets = jnp.zeros((b, tp), _F32)
  else:
    # Edge padding keeps padded tokens in the last segment.
    seg = reference.pad_to_chunks(segment_ids, chunk, mode="edge")
    flags = reference.reset_flags(seg).astype(_F32)  # [b, tp]
    # Resets so far within each chunk (one at position 0 counts: the
    # carried state does not reach that chunk).
    resets = jnp.cumsum(flags.reshape(b, -1, chunk), axis=-1).reshape(b, tp)
  if token_major:
    resets = jnp.broadcast_to(resets[:, :, None, None], (b, tp, hv, 1))
  else:
    resets = jnp.broadcast_to(resets[:, None, :, None], (b, hv, tp, 1))
  sc = jnp.concatenate(
      [gb, resets, jnp.zeros_like(resets)], axis=-1)  # [.., 4]
  return qh, kh, vh, sc


def gated_delta_rule_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Chunked gated delta rule in Pallas (forward and backward kernels).

  Same contract as `api.gated_delta_rule` (shapes are assumed validated).

  Args:
    q, k: [b, t, hk, dk] (bf16 or f32).
    v: [b, t, hv, dv], hv a multiple of hk.
    g: [b, t, hv] log decay, finite and <= 0 (not checked here: the
      kernels use exp of its in-chunk cumulative sums, so g > 0 gives wrong
      results, far off the per-token rule from g ~ 0.2, and -inf NaN).
    beta: [b, t, hv].
    initial_state: [b, hv, dk, dv] or None (zeros).
    scale: query scale, a static number (not a traced value), default
      dk ** -0.5.
    segment_ids: [b, t] ints or None; the state resets where the id changes.
    block_sizes: tiles; default `BlockSizes.get_default(backend)`.
    interpret: run the kernels in Pallas interpret mode: True, or
      `tpu_interpreter(...)`'s params. With backend "tpu", the fused
      kernels (the TPU family) run in Pallas' TPU interpreter, which
      simulates the TPU's DMAs, cores and memory (default params for
      True); every other kernel in the generic interpreter.
    backend: "gpu", "tpu" or "cpu"; default `block_sizes.target_backend()`
      (the abstract mesh's device where one is named, else
      `jax.default_backend()`). Picks the lowering, the default block
      sizes and dk / dv padding (GPU pads both to a power of two, at least
      16, as Triton requires; TPU pads dv to a multiple of 128 where
      block_dv "auto" must tile a large state).

  Returns:
    (o [b, t, hv, dv] in v.dtype, final_state [b, hv, dk, dv] float32).

  Raises:
    ValueError: on a backend without a Pallas lowering (CPU) when
      `interpret` is False, or on bad block sizes.
  """
  qh, kh, vh, sc, s0, cfg = _prepare(q, k, v, g, beta, initial_state,
                                     scale, segment_ids, block_sizes,
                                     interpret, backend)
  o, st = _core(qh, kh, vh, sc, s0, cfg)
  t, dk, dv = q.shape[1], q.shape[3], v.shape[3]
  if cfg.token_major:
    o = o[:, :t, :, :dv]
  else:
    o = jnp.swapaxes(o[:, :, :t, :dv], 1, 2)
  return o, st[:, :, :dk, :dv]


def _prepare(q, k, v, g, beta, initial_state, scale, segment_ids,
             block_sizes, interpret, backend):
  """Checks the backend and tiles; returns the kernels' inputs and config:
  (q, k, v, scalars, initial state, _Config) in the padded layout."""
  backend = backend or block_sizes_lib.target_backend()
  if not isinstance(interpret, (bool, np.bool_)) and not isinstance(
      interpret, getattr(_tpu_module(), "InterpretParams", ())):
    raise ValueError(
        f"interpret: expected True, False or TPU interpreter params "
        f"(`tpu_interpreter()`), found {interpret!r}")
  if backend not in ("gpu", "tpu") and not interpret:
    raise ValueError(
        f"interpret: the Pallas gated delta rule has no lowering for backend "
        f"{backend!r}; pass interpret=True (slow, for tests) or use "
        f"implementation='chunked'")
  bs = block_sizes or BlockSizes.get_default(backend)
  if not isinstance(interpret, bool) and (backend != "tpu"
                                          or bs.kernels != "fused"):
    raise ValueError(
        f"interpret: TPU interpreter params run the fused kernels on "
        f"backend 'tpu' only (got backend {backend!r}, kernels "
        f"{bs.kernels!r}); pass interpret=True there")
  if backend == "tpu" and bs.kernels == "split" and not interpret:
    raise ValueError(
        "block_sizes: kernels='split' keeps whole sequences per program in "
        "its sequential kernels, which does not fit TPU VMEM; use "
        "kernels='fused' with chunk_loop='grid' (the TPU default)")
  if backend == "tpu" and bs.chunk_loop == "kernel" and not interpret:
    raise ValueError(
        "block_sizes: chunk_loop='kernel' keeps whole sequences per program, "
        "which does not fit TPU VMEM, and has no Mosaic grid; use "
        "chunk_loop='grid' (the TPU default)")
  if (backend == "gpu" and bs.sub_chunk is not None
      and bs.sub_chunk < min(16, bs.chunk_size)):
    raise ValueError(f"block_sizes: sub_chunk={bs.sub_chunk} is below 16, "
                     f"the smallest tensor-core product Triton accepts")
  b, _, hk, dk = q.shape
  hv, dv = v.shape[2], v.shape[3]
  if scale is None:
    scale = dk ** -0.5
  if isinstance(scale, jax.core.Tracer):
    raise ValueError(
        "scale: expected a static number for the Pallas kernels, found a "
        "traced value; gated_delta_rule(..., implementation='pallas') "
        "takes one (it scales q first)")
  bs, dk_p, dv_p = kernel_tiles(bs, backend, dk, dv)  # validates block_dv
  cfg = _Config(scale=float(scale), group=hv // hk, block_sizes=bs,
                backend=backend, interpret=interpret,
                has_segments=segment_ids is not None)
  qh, kh, vh, sc = _padded_inputs(q, k, v, g, beta, segment_ids,
                                  bs.chunk_size, dk_p - dk, dv_p - dv,
                                  token_major=cfg.token_major)
  if initial_state is None:
    s0 = jnp.zeros((b, hv, dk_p, dv_p), _F32)
  else:
    s0 = jnp.pad(initial_state.astype(_F32),
                 ((0, 0), (0, 0), (0, dk_p - dk), (0, dv_p - dv)))
  return qh, kh, vh, sc, s0, cfg


def kernel_dims(bs: BlockSizes, backend: str, dk: int, dv: int
                ) -> tuple[int, int]:
  """The key and value dims the kernels take for head dims dk, dv: GPU
  pads both to a power of two (at least 16, as Triton requires); TPU
  under block_dv "auto" pads dv where a large state must be tiled
  (`block_sizes.tpu_padded_dv`); otherwise dk, dv."""
  if backend == "gpu":
    return _next_pow2(dk), _next_pow2(dv)
  if bs.block_dv == "auto":
    return dk, block_sizes_lib.tpu_padded_dv(dk, dv)
  return dk, dv


def kernel_tiles(bs: BlockSizes, backend: str, dk: int, dv: int,
                 origin: str = "") -> tuple[BlockSizes, int, int]:
  """(bs for the padded dims, dk_p, dv_p) (`kernel_dims`), with block_dv
  checked against dv_p; the error names dv_p and, where it differs, what
  it came from (`origin`, default the value dim dv padded)."""
  dk_p, dv_p = kernel_dims(bs, backend, dk, dv)
  bs = bs.for_dims(dk_p, dv_p)
  try:
    bs.dv_tile(dv_p)
  except ValueError as e:
    if dv_p == dv and not origin:
      raise
    what = origin or f"the value dim {dv}"
    if dv_p != dv:
      what += f", padded for the {backend} kernels"
    raise ValueError(f"block_dv: expected a divisor of dv={dv_p} ({what}), "
                     f"found {bs.block_dv}") from e
  bs.dv_tile(dv_p, backward=True)  # bwd_block_dv, named in its error
  return bs, dk_p, dv_p


def block_sizes_for(backend: str, chunk_size: int,
                    spec: str = "") -> BlockSizes:
  """`backend`'s default BlockSizes at `chunk_size`, with the fields of
  `spec` (`BlockSizes.from_spec`) replaced. Default blocks that do not
  divide another chunk size fall back (row by row, whole chunks); blocks
  that `spec` names are kept and checked."""
  bs = BlockSizes.get_default(backend)
  solve_block, sub_chunk = (
      None if x is None or chunk_size % x else x
      for x in (bs.solve_block, bs.sub_chunk))
  bs = dataclasses.replace(bs, chunk_size=chunk_size, solve_block=solve_block,
                           sub_chunk=sub_chunk)
  changes = BlockSizes.parse_spec(spec)
  if "chunk_size" in changes:
    raise ValueError(f"block_sizes: {spec!r} sets chunk_size; pass it as "
                     f"chunk_size (now {chunk_size})")
  return dataclasses.replace(bs, **changes)


def api_entry(q, k, v, g, beta, initial_state, scale, segment_ids,
              chunk_size: int, interpret: bool,
              block_sizes: BlockSizes | None = None):
  """Adapter with the signature of `api._IMPLEMENTATIONS` entries;
  `block_sizes` as the api builds it (`block_sizes_for`), default this
  backend's at `chunk_size`."""
  backend = block_sizes_lib.target_backend()
  bs = block_sizes or block_sizes_for(backend, chunk_size)
  if isinstance(scale, jax.core.Tracer):
    # The kernels take the scale as a static argument: a traced one (the
    # api accepts it on every implementation) scales q here, in q's dtype.
    if scale.shape:
      raise ValueError(f"scale: expected a scalar, found shape "
                       f"{tuple(scale.shape)}")
    ct = jnp.promote_types(q.dtype, _F32)
    q = (q.astype(ct) * scale.astype(ct)).astype(q.dtype)
    scale = 1.0
  return gated_delta_rule_pallas(q, k, v, g, beta, initial_state, scale,
                                 segment_ids, block_sizes=bs,
                                 interpret=interpret, backend=backend)
