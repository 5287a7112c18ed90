"""Public entry point of the gated delta rule: validation and dispatch.

Implementations live in a registry (`_IMPLEMENTATIONS`) so adding a backend
is one line. "auto" picks per backend from `AUTO` (one line to change).
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule import block_sizes as block_sizes_lib
from pallas_kernels.gated_delta_rule import pallas_gdr
from pallas_kernels.gated_delta_rule import reference
from pallas_kernels.gated_delta_rule import seq_split
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes


def _recurrent(q, k, v, g, beta, initial_state, scale, segment_ids,
               chunk_size, interpret):
  del chunk_size, interpret  # unused by the per-token scan
  return reference.recurrent_gated_delta_rule(
      q, k, v, g, beta, initial_state, scale, segment_ids)


def _chunked(q, k, v, g, beta, initial_state, scale, segment_ids,
             chunk_size, interpret):
  del interpret
  return reference.chunked_gated_delta_rule(
      q, k, v, g, beta, initial_state, scale, segment_ids, chunk_size)


# name -> fn(q, k, v, g, beta, initial_state, scale, segment_ids, chunk_size,
#            interpret) -> (o, final_state)
_IMPLEMENTATIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "recurrent": _recurrent,
    "chunked": _chunked,
    "pallas": pallas_gdr.api_entry,
}


# What implementation="auto" runs, per jax backend: the fastest path that
# has been measured there. GPU: the Pallas kernels (on an H100 at 32k
# tokens, bf16: about 10x the chunked jnp rule's speed,
# docs/measurements/2026-11-26-h100-fb7591c/bench32k.json; FLA's
# forward+backward took 1.12x to 1.14x as long in 2026-11-27-h100-e58d8ea/
# defaults32k.json and repeat32k.json). TPU: the chunked rule. The fused
# Pallas kernels are compiled, not run, for TPU v4, v5e, v5p and v6e by
# libtpu's deviceless compiler in CI (pallas_kernels.tools.tpu_compile,
# tests/test_tpu_compile.py), but have not been timed on a TPU;
# implementation="pallas" runs them there.
AUTO: dict[str, str] = {"gpu": "pallas", "tpu": "chunked"}


def available_implementations() -> tuple[str, ...]:
  """Names accepted by `implementation` (besides "auto")."""
  return tuple(_IMPLEMENTATIONS)


def _resolve(implementation: str, dtype=None) -> str:
  if implementation == "auto":
    name = AUTO.get(block_sizes_lib.target_backend(), "chunked")
    if name == "pallas" and dtype is not None and jnp.dtype(dtype) not in (
        jnp.float32, jnp.bfloat16, jnp.float16):
      # float64 (CPU tests under jax_enable_x64): the kernels take f32,
      # bf16 and f16 inputs only, so these go to the chunked rule. It also
      # computes in float32 (reference._prepare casts up); the output
      # comes back in float64, at float32 precision.
      name = "chunked"
    return name
  if implementation not in _IMPLEMENTATIONS:
    names = ("auto",) + available_implementations()
    raise ValueError(
        f"implementation: expected one of {names}, found {implementation!r}")
  return implementation


def _check(name: str, shape, expected) -> None:
  if tuple(shape) != tuple(expected):
    raise ValueError(
        f"{name}: expected shape {tuple(expected)}, found {tuple(shape)}")


_ARRAYS = ("q", "k", "v", "g", "beta", "initial_state", "segment_ids")
# Inputs that enter the arithmetic: real floating types only (ints would
# truncate the output, which is in v.dtype; complex would lose the
# imaginary part).
_FLOAT_ARRAYS = ("q", "k", "v", "g", "beta", "initial_state")


def _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size,
              seq_splits=1):
  arrays = dict(zip(_ARRAYS, (q, k, v, g, beta, initial_state, segment_ids)))
  for name, x in arrays.items():
    if x is None and name in ("initial_state", "segment_ids"):
      continue
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise ValueError(f"{name}: expected an array, found "
                       f"{type(x).__name__}")
  if q.ndim != 4:
    raise ValueError(f"q: expected rank 4 [b, t, hk, dk], found shape "
                     f"{tuple(q.shape)}")
  b, t, hk, dk = q.shape
  for dim, size in (("batch size b", b), ("key head count hk", hk),
                    ("key head dim dk", dk)):
    if size < 1:
      raise ValueError(f"q: expected a {dim} of at least 1 in "
                       f"[b, t, hk, dk], found shape {tuple(q.shape)}")
  _check("k", k.shape, (b, t, hk, dk))
  if v.ndim != 4 or tuple(v.shape[:2]) != (b, t):
    raise ValueError(f"v: expected shape ({b}, {t}, hv, dv), found "
                     f"{tuple(v.shape)}")
  hv, dv = v.shape[2], v.shape[3]
  for dim, size in (("value head count hv", hv), ("value head dim dv", dv)):
    if size < 1:
      raise ValueError(f"v: expected a {dim} of at least 1 in "
                       f"[b, t, hv, dv], found shape {tuple(v.shape)}")
  if hv % hk:
    raise ValueError(f"v: expected a head count hv that is a multiple of "
                     f"hk={hk}, found hv={hv}")
  _check("g", g.shape, (b, t, hv))
  _check("beta", beta.shape, (b, t, hv))
  if initial_state is not None:
    _check("initial_state", initial_state.shape, (b, hv, dk, dv))
  if segment_ids is not None:
    _check("segment_ids", segment_ids.shape, (b, t))
  for name in _FLOAT_ARRAYS:
    x = arrays[name]
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name}: expected a real floating dtype (float32, "
                       f"bfloat16, float16 or float64), found {x.dtype}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size: expected a positive int, found "
                     f"{chunk_size!r}")
  if not isinstance(seq_splits, int) or seq_splits < 1:
    raise ValueError(f"seq_splits: expected a positive int, found "
                     f"{seq_splits!r}")


def _check_scale(scale) -> None:
  """None, a real number, or a 0-d real array (concrete or traced)."""
  if scale is None or isinstance(scale, numbers.Real):
    return
  shape, dtype = getattr(scale, "shape", None), getattr(scale, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"scale: expected None, a real number or a 0-d real "
                     f"array, found {scale!r}")
  if tuple(shape) != () or not (jnp.issubdtype(dtype, jnp.floating)
                                or jnp.issubdtype(dtype, jnp.integer)
                                or jnp.issubdtype(dtype, jnp.bool_)):
    raise ValueError(f"scale: expected None, a real number or a 0-d real "
                     f"array, found an array of shape {tuple(shape)} and "
                     f"dtype {dtype}")


def _check_log_decay(g) -> None:
  """g's values, where they are known without tracing: finite and <= 0.

  Skipped for tracers (under jit, grad, vmap, ...: nothing is checked and
  nothing is added to the program) and for arrays this process cannot
  read whole (multi-host). The check reads g on the host (numpy), so it
  binds no jax operation even while a jit traces a closed-over g.
  """
  if isinstance(g, jax.core.Tracer):
    return
  if isinstance(g, jax.Array) and not g.is_fully_addressable:
    return
  x = np.asarray(g)
  if x.size == 0:
    return
  if x.dtype != np.float64:
    x = x.astype(np.float32)
  finite = np.isfinite(x)
  if not finite.all():
    bad = x[~finite]
    raise ValueError(
        f"g: expected finite log decays (<= 0), found {bad.size} non-finite "
        f"value(s) (first {bad[0]}); -inf (complete forgetting) gives NaN "
        f"on the chunked and Pallas paths: use a large negative finite "
        f"value such as -100 instead")
  if (x > 0).any():
    raise ValueError(
        f"g: expected log decays <= 0, found {int((x > 0).sum())} value(s) "
        f"> 0 (max {float(x.max()):g}); g is the LOG decay: if you passed "
        f"the decay alpha in (0, 1), pass log(alpha)")


def check_inputs(q, k, v, g, beta, initial_state=None, segment_ids=None,
                 scale=None, chunk_size: int = 64, seq_splits: int = 1,
                 check_values: bool = True) -> None:
  """The checks of `gated_delta_rule` on its array arguments and scale.

  Shapes and dtypes are static (checked under jit too); g's values only
  where g is a concrete array and `check_values` is true (see
  `gated_delta_rule`). Also used by `qwen_jax.sequence_parallel.
  gated_delta_rule` on the global arrays, so that its errors name the
  shapes its caller passed.

  Raises:
    ValueError: naming the argument, what was expected and what was found.
  """
  _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size,
            seq_splits)
  _check_scale(scale)
  if check_values:
    _check_log_decay(g)


def tiles_for(block_sizes, chunk_size: int, backend: str | None = None
              ) -> BlockSizes:
  """The kernels' `BlockSizes` from `gated_delta_rule`'s `block_sizes`
  argument: a spec string over `backend`'s defaults (None as ""), or a
  `BlockSizes` whose chunk size must be `chunk_size`."""
  backend = backend or block_sizes_lib.target_backend()
  if block_sizes is None:
    block_sizes = ""
  if isinstance(block_sizes, BlockSizes):
    if block_sizes.chunk_size != chunk_size:
      raise ValueError(
          f"block_sizes: expected a BlockSizes with chunk_size equal to "
          f"chunk_size={chunk_size}, found chunk_size="
          f"{block_sizes.chunk_size}; pass chunk_size="
          f"{block_sizes.chunk_size} too")
    return block_sizes
  if not isinstance(block_sizes, str):
    raise ValueError(f"block_sizes: expected a spec string such as "
                     f"'block_dv=16/num_stages=3', None or a BlockSizes, "
                     f"found {block_sizes!r}")
  return pallas_gdr.block_sizes_for(backend, chunk_size, block_sizes)


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "auto",
    interpret: bool = False,
    chunk_size: int = 64,
    segment_ids: jax.Array | None = None,
    seq_splits: int = 1,
    block_sizes: str | BlockSizes | None = "",
    check_values: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Gated delta rule over a sequence (Gated DeltaNet's token mixer).

  Per value head, with state S [dk, dv]:
    S~_t = exp(g_t) S_{t-1}
    S_t = S~_t + beta_t k_t (v_t - S~_t^T k_t)^T
    o_t = S_t^T (scale q_t)
  No L2 normalisation happens here (the layer does it). Math is float32 on
  every implementation, float64 inputs included (their output comes back
  in float64, at float32 precision).

  Args:
    q: [b, t, hk, dk] queries.
    k: [b, t, hk, dk] keys.
    v: [b, t, hv, dv] values; hv a multiple of hk, value head j uses key head
      j // (hv // hk).
    g: [b, t, hv] log decay: finite and <= 0 (log(alpha) for a decay
      alpha in (0, 1]). Where g is a concrete array its values are checked
      (a ValueError for g > 0, NaN or +-inf); under jit (or grad, vmap)
      they are not, and g > 0 gives wrong results (far off the per-token
      rule once g > 0.1 or so, non-finite at g ~ 1.5) and -inf gives NaN
      on the "chunked" and "pallas" paths. For complete forgetting use a
      large finite value such as -100.
    beta: [b, t, hv] write strength, usually in (0, 1).
    initial_state: [b, hv, dk, dv] or None (zeros). With segment_ids it seeds
      only the first segment.
    q, k, v, g, beta and initial_state must have real floating dtypes.
    scale: query scale: a real number, a 0-d real array (traced too; on
      "pallas" a traced scale multiplies q, in q's dtype, before the
      kernels, which take a static scale), or None for dk ** -0.5.
    implementation: "auto", or a name from `available_implementations()`.
    interpret: run Pallas kernels in interpret mode (CPU tests).
    chunk_size: tokens per chunk for chunked implementations.
    segment_ids: [b, t] ints or None. Packed documents: the state resets to
      zero wherever the id differs from the previous position's.
    seq_splits: cut each sequence into this many pieces that run in
      parallel (as extra batch rows) and join them through their affine
      state maps (`seq_split`); exact, about 2x the state work for
      dk = dv, for more parallelism at small batch.
    block_sizes: tiling of the Pallas kernels as a `BlockSizes.from_spec`
      string over the backend's defaults, e.g.
      "output_in_state=True/bwd_block=4096" or "lean" (a preset that
      stores no per-chunk states: `block_sizes.PRESETS`) ("" or None for
      the defaults; the chunk size comes from `chunk_size`), or a whole
      `BlockSizes` (its chunk_size must equal `chunk_size`). Checked
      whatever the implementation, block_dv included (it must divide the
      value dim the kernels would see: dv, padded on GPU, plus dk with
      seq_splits > 1), used only where the Pallas kernels run (tiling
      never changes the result beyond rounding).
    check_values: check a concrete g's values (it is read to the host,
      which waits for it). False skips only that check, for callers whose
      g is <= 0 by construction: Qwen3.5's Gated DeltaNet layer forms it as
      -exp(A_log) * softplus(.), and passes False so that a model called
      without jit does not wait for every layer's g.

  Returns:
    (o [b, t, hv, dv] in v.dtype, final_state [b, hv, dk, dv] float32).

  Raises:
    ValueError: unknown implementation, inconsistent shapes, empty
      dimensions (b, hk, dk, hv or dv of 0), non-floating dtypes, a
      concrete g with values > 0 or non-finite, a scale that is not a
      real scalar, or bad block sizes; each names the argument.
  """
  check_inputs(q, k, v, g, beta, initial_state, segment_ids, scale,
               chunk_size, seq_splits, check_values)
  name = _resolve(implementation, v.dtype)
  impl = _IMPLEMENTATIONS[name]
  if (block_sizes is not None and not isinstance(block_sizes, str)) or (
      block_sizes or name == "pallas"):
    # Built (and checked, with named errors) whatever the implementation,
    # block_dv against the value dim the kernels would see.
    backend = block_sizes_lib.target_backend()
    tiles = tiles_for(block_sizes, chunk_size, backend)
    dk, dv = q.shape[3], v.shape[3]
    pallas_gdr.kernel_tiles(
        tiles, backend, dk, dv + dk if seq_splits > 1 else dv,
        "" if seq_splits == 1 else
        f"dv={dv} plus the dk={dk} columns that seq_splits > 1 adds")
    if name == "pallas":
      impl = functools.partial(impl, block_sizes=tiles)
  if seq_splits > 1:
    # (the pieces keep q's dk, so a default scale stays dk ** -0.5)
    def rule(q, k, v, g, beta, initial_state, segment_ids):
      return impl(q, k, v, g, beta, initial_state, scale, segment_ids,
                  chunk_size, interpret)

    return seq_split.split_sequence(rule, seq_splits, chunk_size, q, k, v, g,
                                    beta, initial_state, segment_ids)
  return impl(q, k, v, g, beta, initial_state, scale, segment_ids,
              chunk_size, interpret)
