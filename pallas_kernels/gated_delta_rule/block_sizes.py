"""Tiling choices of the Pallas gated delta rule kernels, per backend.

`BlockSizes` is frozen (hashable), so it can be a static argument of `jit`
and of the kernels' `custom_vjp`.
"""

from __future__ import annotations

import dataclasses

# How the sequential pass over chunks is driven:
#   "kernel": one program per (batch, head, dv tile) loops over all chunks
#     with `lax.fori_loop`, reading chunk slices of whole-sequence refs and
#     keeping the state in registers (Triton: no scratch, no sequential
#     grid axis).
#   "grid": the chunk index is the last grid axis ("arbitrary"), blocks are
#     one chunk, and the state lives in a VMEM scratch buffer that persists
#     across grid steps (Mosaic TPU, where a whole sequence does not fit in
#     VMEM).
CHUNK_LOOPS = ("kernel", "grid")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the chunked gated delta rule kernels.

  Attributes:
    chunk_size: tokens per chunk (the UT/WY transform size). 64 matches the
      reference and FLA; must be a multiple of 8 (16 on GPU).
    block_dv: value-dim tile of the state, or None for all of dv. Each tile
      is an independent program (more parallelism, the intra-chunk solve is
      recomputed per tile); the backward sums the tiles' partial gradients.
    chunk_loop: "kernel" or "grid", see `CHUNK_LOOPS`.
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton pipelining stages (GPU only).
  """
  chunk_size: int = 64
  block_dv: int | None = None
  chunk_loop: str = "kernel"
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    if self.chunk_size < 1 or self.chunk_size % 8:
      raise ValueError(f"chunk_size: expected a positive multiple of 8, "
                       f"found {self.chunk_size}")
    if self.block_dv is not None and self.block_dv < 1:
      raise ValueError(f"block_dv: expected a positive int or None, found "
                       f"{self.block_dv}")
    if self.chunk_loop not in CHUNK_LOOPS:
      raise ValueError(f"chunk_loop: expected one of {CHUNK_LOOPS}, found "
                       f"{self.chunk_loop!r}")

  @classmethod
  def get_default(cls, backend: str) -> "BlockSizes":
    """Defaults for `backend` ("gpu", "tpu" or "cpu" for interpret mode)."""
    if backend == "tpu":
      return cls(chunk_loop="grid")
    if backend == "gpu":
      # A [128, 128] f32 state per program spills registers; tiles of 64
      # value columns halve it (dv is padded to a power of two on GPU).
      return cls(chunk_loop="kernel", block_dv=64, num_warps=4,
                 num_stages=1)
    return cls()

  def dv_tile(self, dv: int) -> int:
    """The value-dim tile actually used for a value dim `dv`."""
    if self.block_dv is None or self.block_dv >= dv:
      return dv
    if dv % self.block_dv:
      raise ValueError(f"block_dv: expected a divisor of dv={dv}, found "
                       f"{self.block_dv}")
    return self.block_dv
