"""The tuned tilings: what each backend gets by default, per shape.

A regression check of moving the tuned tile sizes out of `BlockSizes`'
code into a table (`tuned_block_sizes`): every expected value below was
printed by the code before the move (commit 034827f, where
`BlockSizes.get_default` spelt the defaults out inline), so a table
entry that differs from what the code chose then fails here. A change
of a default made on purpose changes this file with it.
"""

import dataclasses

import pytest

from pallas_kernels.gated_delta_rule import block_sizes
from pallas_kernels.gated_delta_rule import pallas_gdr
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes

# BlockSizes.get_default(backend) at 034827f (fields not named: the
# dataclass defaults, which are "cpu"'s).
_DEFAULTS = {
    "gpu": BlockSizes(
        chunk_size=64, block_dv=16, bwd_block_dv=None, chunk_loop="kernel",
        num_warps=4, num_stages=3, kernels="split", num_warps_intra=4,
        solve_block=1, sub_chunk=32, f32_dot="auto", wy_block=64,
        out_block=32, kernel_warps=(("prep", 2), ("prep_out", 4)),
        kernel_stages=(), output_in_state="inference", bwd_block=None,
        fwd_block=None, state_stride=1, recompute_states=False,
        block_loop="auto"),
    "tpu": BlockSizes(
        chunk_size=64, block_dv="auto", bwd_block_dv=None, chunk_loop="grid",
        num_warps=4, num_stages=1, kernels="fused", num_warps_intra=4,
        solve_block=None, sub_chunk=None, f32_dot="highest", wy_block=None,
        out_block=None, kernel_warps=(), kernel_stages=(),
        output_in_state=False, bwd_block=None, fwd_block=None,
        state_stride=1, recompute_states=False, block_loop="auto"),
    "cpu": BlockSizes(
        chunk_size=64, block_dv=None, bwd_block_dv=None, chunk_loop="kernel",
        num_warps=4, num_stages=1, kernels="split", num_warps_intra=4,
        solve_block=None, sub_chunk=None, f32_dot="highest", wy_block=None,
        out_block=None, kernel_warps=(), kernel_stages=(),
        output_in_state=False, bwd_block=None, fwd_block=None,
        state_stride=1, recompute_states=False, block_loop="auto"),
}


@pytest.mark.parametrize("backend", sorted(_DEFAULTS))
def test_defaults_per_backend(backend):
  assert BlockSizes.get_default(backend) == _DEFAULTS[backend]
  assert BlockSizes.from_spec("", backend) == _DEFAULTS[backend]


# (backend, chunk_size) -> (solve_block, sub_chunk) of
# `pallas_gdr.block_sizes_for` at 034827f: default blocks that do not
# divide the chunk fall back to None (row by row, whole chunks).
_PER_CHUNK = {
    ("gpu", 16): (1, None), ("gpu", 32): (1, 32), ("gpu", 64): (1, 32),
    ("gpu", 128): (1, 32),
    ("tpu", 16): (None, None), ("tpu", 64): (None, None),
    ("cpu", 16): (None, None), ("cpu", 128): (None, None),
}


@pytest.mark.parametrize("backend,chunk", sorted(_PER_CHUNK))
def test_defaults_per_chunk_size(backend, chunk):
  got = pallas_gdr.block_sizes_for(backend, chunk)
  solve_block, sub_chunk = _PER_CHUNK[backend, chunk]
  assert got == dataclasses.replace(
      _DEFAULTS[backend], chunk_size=chunk, solve_block=solve_block,
      sub_chunk=sub_chunk)


# (backend, dk, dv) -> (dk, dv the kernels take, the resolved block_dv,
# the forward's value tile, the backward's) of `pallas_gdr.kernel_tiles`
# over the defaults at chunk 64, at 034827f. GPU pads both dims to a
# power of two and tiles dv by 16; the TPU's block_dv "auto" keeps the
# whole state up to 256 x 256 elements, else pads dv to a multiple of
# 128 and tiles it.
_PER_SHAPE = {
    ("gpu", 128, 128): (128, 128, 16, 16, 16),
    ("gpu", 16, 24): (16, 32, 16, 16, 16),
    ("gpu", 512, 200): (512, 256, 16, 16, 16),
    ("gpu", 64, 1000): (64, 1024, 16, 16, 16),
    ("gpu", 128, 72): (128, 128, 16, 16, 16),
    ("tpu", 128, 128): (128, 128, None, 128, 128),
    ("tpu", 16, 24): (16, 24, None, 24, 24),
    ("tpu", 512, 512): (512, 512, 128, 128, 128),
    ("tpu", 512, 200): (512, 256, 128, 128, 128),
    ("tpu", 1024, 256): (1024, 256, 128, 128, 128),
    ("tpu", 64, 1000): (64, 1000, None, 1000, 1000),
    ("cpu", 512, 200): (512, 200, None, 200, 200),
    ("cpu", 128, 72): (128, 72, None, 72, 72),
}


@pytest.mark.parametrize("backend,dk,dv", sorted(_PER_SHAPE))
def test_tiles_per_shape(backend, dk, dv):
  bs, dk_p, dv_p = pallas_gdr.kernel_tiles(
      pallas_gdr.block_sizes_for(backend, 64), backend, dk, dv)
  assert (dk_p, dv_p, bs.block_dv, bs.dv_tile(dv_p),
          bs.dv_tile(dv_p, backward=True)) == _PER_SHAPE[backend, dk, dv]


def test_presets_and_loop_constants():
  """The "lean" preset over the GPU defaults, and the tuned constants the
  kernels read through `block_sizes`, as at 034827f."""
  assert BlockSizes.from_spec("lean", "gpu") == dataclasses.replace(
      _DEFAULTS["gpu"], output_in_state="inference",
      recompute_states="paired", fwd_block=16384, bwd_block=4096)
  assert sorted(block_sizes.PRESETS) == ["lean"]
  assert block_sizes.AUTO_UNROLL_BLOCKS == 16
  assert block_sizes.TPU_STATE_TILE == 256 * 256
