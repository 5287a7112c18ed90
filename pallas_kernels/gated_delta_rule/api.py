"""Public entry point of the gated delta rule: validation and dispatch.

Implementations live in a registry (`_IMPLEMENTATIONS`) so adding a backend
is one line. "auto" picks per backend from `AUTO` (one line to change).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import block_sizes as block_sizes_lib
from pallas_kernels.gated_delta_rule import pallas_gdr
from pallas_kernels.gated_delta_rule import reference
from pallas_kernels.gated_delta_rule import seq_split


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
# has been measured there. GPU: the Pallas kernels (H100, 2026-11-26,
# BENCHMARKS.md: about 10x the chunked jnp rule's speed forward and
# forward+backward at 32k tokens, bf16, and within 10% of FLA's either
# way). TPU: the chunked rule, since the
# Pallas kernels have never been compiled for a TPU;
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
      # float64 (CPU tests, finite differences): the kernels compute in
      # f32, so the chunked rule keeps the precision asked for.
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


def _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size,
              seq_splits=1):
  if q.ndim != 4:
    raise ValueError(f"q: expected rank 4 [b, t, hk, dk], found shape "
                     f"{tuple(q.shape)}")
  b, t, hk, dk = q.shape
  _check("k", k.shape, (b, t, hk, dk))
  if v.ndim != 4 or tuple(v.shape[:2]) != (b, t):
    raise ValueError(f"v: expected shape ({b}, {t}, hv, dv), found "
                     f"{tuple(v.shape)}")
  hv, dv = v.shape[2], v.shape[3]
  if hv % hk:
    raise ValueError(f"v: expected a head count hv that is a multiple of "
                     f"hk={hk}, found hv={hv}")
  _check("g", g.shape, (b, t, hv))
  _check("beta", beta.shape, (b, t, hv))
  if initial_state is not None:
    _check("initial_state", initial_state.shape, (b, hv, dk, dv))
  if segment_ids is not None:
    _check("segment_ids", segment_ids.shape, (b, t))
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size: expected a positive int, found "
                     f"{chunk_size!r}")
  if not isinstance(seq_splits, int) or seq_splits < 1:
    raise ValueError(f"seq_splits: expected a positive int, found "
                     f"{seq_splits!r}")


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
    block_sizes: str = "",
) -> tuple[jax.Array, jax.Array]:
  """Gated delta rule over a sequence (Gated DeltaNet's token mixer).

  Per value head, with state S [dk, dv]:
    S~_t = exp(g_t) S_{t-1}
    S_t = S~_t + beta_t k_t (v_t - S~_t^T k_t)^T
    o_t = S_t^T (scale q_t)
  No L2 normalisation happens here (the layer does it). Math is float32.

  Args:
    q: [b, t, hk, dk] queries.
    k: [b, t, hk, dk] keys.
    v: [b, t, hv, dv] values; hv a multiple of hk, value head j uses key head
      j // (hv // hk).
    g: [b, t, hv] log decay (<= 0).
    beta: [b, t, hv] write strength, usually in (0, 1).
    initial_state: [b, hv, dk, dv] or None (zeros). With segment_ids it seeds
      only the first segment.
    scale: query scale; default dk ** -0.5.
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
      "output_in_state=True/bwd_block=4096" ("" for the defaults; the chunk
      size comes from `chunk_size`). Checked whatever the implementation,
      used only where the Pallas kernels run (tiling never changes the
      result beyond rounding).

  Returns:
    (o [b, t, hv, dv] in v.dtype, final_state [b, hv, dk, dv] float32).

  Raises:
    ValueError: unknown implementation or inconsistent shapes.
  """
  name = _resolve(implementation, v.dtype)
  _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size,
            seq_splits)
  impl = _IMPLEMENTATIONS[name]
  if block_sizes or name == "pallas":
    # Built (and checked, with named errors) whatever the implementation.
    tiles = pallas_gdr.block_sizes_for(block_sizes_lib.target_backend(),
                                       chunk_size, block_sizes)
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
