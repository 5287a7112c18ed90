"""pallas_kernels.tools.triton_resources: split kernels compile for sm_90.

Without a GPU this is the furthest the CPU can take the Triton path: the
Pallas lowering's Triton IR through the `triton` package's whole pipeline
(TTGIR, LLVM, PTX, ptxas) for Hopper. Every kernel of the GPU defaults must
compile and fit an SM (registers, shared memory); the resource arithmetic
is checked against a step-by-step count.
"""

import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.tools import triton_resources as tr
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes

_ROOT = pathlib.Path(__file__).resolve().parents[1]

# What ptxas 12.8 printed for a Pallas kernel (the format the tool parses).
_PTXAS_REPORT = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'gated_delta_rule_prep' for 'sm_90a'
ptxas info    : Function properties for gated_delta_rule_prep
    104 bytes stack frame, 96 bytes spill stores, 100 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 104 bytes cumulative stack size
"""

# The GPU defaults' kernels: the inference forward's (prep_out, state_out:
# output_in_state="inference") and forward+backward's.
_SPLIT_KERNELS = {"gated_delta_rule_prep", "gated_delta_rule_prep_out",
                  "gated_delta_rule_state_out", "gated_delta_rule_state_fwd",
                  "gated_delta_rule_output", "gated_delta_rule_bwd_local",
                  "gated_delta_rule_state_bwd", "gated_delta_rule_bwd_out",
                  "gated_delta_rule_bwd_wy"}


def test_importable_beside_other_experiments():
  """Its flags are defined only when it runs as a command: tests import
  experiments whose flags share names (--batch, --json_out) in one
  process. A subprocess, so that this process's flags do not matter."""
  code = ("import experiments.forward, experiments.compare_ratios, "
          "experiments.long_context, experiments.train, "
          "pallas_kernels.tools.triton_resources")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=_ROOT,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


def test_parse_ptxas():
  assert tr.parse_ptxas(_PTXAS_REPORT) == dict(
      registers=255, spill_stores=96, spill_loads=100, stack=104)
  with pytest.raises(ValueError, match="register"):
    tr.parse_ptxas("ptxas info    : 11 bytes gmem\n")


def _count_blocks(registers, num_warps, shared):
  """Resident blocks per SM by adding one block at a time."""
  per_warp = math.ceil(registers * 32 / tr.REG_ALLOC_UNIT) * tr.REG_ALLOC_UNIT
  blocks = 0
  while True:
    n = blocks + 1
    if (n * num_warps * per_warp > tr.REGS_PER_SM
        or n * num_warps > tr.MAX_WARPS_PER_SM
        or n > tr.MAX_BLOCKS_PER_SM
        or (shared and n * (shared + tr.SMEM_RESERVED_PER_BLOCK)
            > tr.SMEM_PER_SM)):
      return blocks
    blocks = n


@pytest.mark.parametrize("registers,num_warps,shared", [
    (255, 4, 12 * 1024), (128, 4, 48 * 1024), (80, 4, 164 * 1024),
    (40, 2, 0), (64, 8, 1024), (32, 1, 0), (168, 8, 100 * 1024)])
def test_blocks_per_sm(registers, num_warps, shared):
  got = tr.blocks_per_sm(registers, num_warps, shared)
  assert got["blocks"] == _count_blocks(registers, num_warps, shared)


def test_lowered_kernels_of_the_split_family():
  """The lowering yields each split kernel with its launch parameters."""
  if jax.default_backend() != "cpu":
    pytest.skip("lowering test for CPU-only machines")
  blocks = BlockSizes.from_spec("kernel_warps=wy:2", "gpu")
  kernels = tr.lowered_kernels(blocks, 1, 200, 1, 2, 128, 64, jnp.bfloat16,
                               segments=True)
  assert {k.name for k in kernels} == _SPLIT_KERNELS
  chunks = math.ceil(200 / blocks.chunk_size)
  for k in kernels:
    sequential = "state" in k.name
    assert k.num_warps == (2 if k.name.endswith("_wy") else
                           blocks.num_warps if sequential
                           else blocks.num_warps_intra)
    assert k.num_stages == blocks.num_stages
    # (value heads, chunks or dv tiles, batch) in some order.
    assert k.programs == 2 * (64 // blocks.block_dv if sequential
                              else chunks), (k.name, k.grid)
    assert k.ir_bytecode.startswith(b"ML\xefR")  # MLIR bytecode


def _compile_for_hopper(variants=(), only=(), seq_len: int = 130):
  """`tr.run` at a small bf16 shape with segments: every kernel compiled
  for sm_90 (needs the `triton` package; CI installs it, setup.cfg extra
  "triton", and so does the GPU machine)."""
  if jax.default_backend() != "cpu":
    pytest.skip("lowering test for CPU-only machines")
  import triton  # pylint: disable=g-import-not-at-top,unused-import
  return tr.run(variants, batch=1, seq_len=seq_len, key_heads=1, heads=2,
                dk=128, dv=128, dtype="bfloat16", segments=True,
                only=only)["kernels"]


def _assert_fits_an_sm(row):
  r = row["resources"]
  assert r["registers"] <= 255, row
  assert 0 < r["shared"] + tr.SMEM_RESERVED_PER_BLOCK <= tr.SMEM_PER_SM, row
  assert r["blocks"] >= 1, row


def test_default_kernels_compile_for_hopper():
  """Every kernel of the GPU defaults compiles for sm_90 and fits an SM."""
  rows = _compile_for_hopper()
  for row in rows:
    _assert_fits_an_sm(row)
  assert {row["kernel"] for row in rows} == _SPLIT_KERNELS


def test_prep_on_full_tiles_compiles_for_hopper():
  """prep on whole-chunk tiles (`sub_chunk=None`, the alternative that
  `gpu_checks.sh prep32k` times beside the defaults) compiles for sm_90
  and fits an SM, forward and backward calls."""
  # As timed in docs/measurements/2026-11-26-h100-fb7591c/prep32k.json.
  spec = "sub_chunk=None/kernel_warps=prep:4"
  rows = [r for r in _compile_for_hopper((spec,), ("prep",))
          if r["blocks"] == f"pallas[{spec}]"]
  # The inference forward's prep (with P), forward+backward's two.
  assert sorted(r["kernel"] for r in rows) == [
      "gated_delta_rule_prep"] * 2 + ["gated_delta_rule_prep_out"], rows
  for row in rows:
    _assert_fits_an_sm(row)


def test_output_in_state_compiles_for_hopper():
  """The forward with the output in the sequential pass: prep with P (and
  the backward's prep with T) and state_out with and without the per-chunk
  states compile for sm_90 and fit an SM."""
  label = "pallas[output_in_state=True]"
  rows = [r for r in _compile_for_hopper(("output_in_state=True",),
                                         ("state_out", "prep"))
          if r["blocks"] == label]
  assert sorted(r["kernel"] for r in rows) == [
      "gated_delta_rule_prep", "gated_delta_rule_prep_out"] + [
          "gated_delta_rule_state_out"] * 2
  for row in rows:
    _assert_fits_an_sm(row)


def test_paired_state_passes_compile_for_hopper():
  """state_pair (recompute_states "paired": one block's state_bwd and the
  block before's state_fwd in one launch) compiles for sm_90 with two
  programs an SM, so its twice the programs of state_bwd run in one wave
  at 32k tokens (128 + 128 for 132 SMs): in 2 stages, its default. In
  the 3 of the other sequential kernels it takes state_bwd's shared
  memory, one program an SM. (Blocks of 8 chunks: a loop of one chunk
  is not pipelined.)"""
  base = "recompute_states=paired/fwd_block=512/bwd_block=512"
  rows = {r["blocks"]: r for r in _compile_for_hopper(
      (base, base + "/kernel_stages=state_pair:3"), ("state_pair",),
      seq_len=1024)}
  two, three = rows[f"pallas[{base}]"], rows[
      f"pallas[{base}/kernel_stages=state_pair:3]"]
  for row in (two, three):
    assert row["kernel"] == "gated_delta_rule_state_pair", row
    _assert_fits_an_sm(row)
    assert row["programs"] == 2 * 2 * (128 // 16), row  # 2 x heads x tiles
  assert (two["num_stages"], three["num_stages"]) == (2, 3)
  assert two["resources"]["blocks"] >= 2, two
  assert three["resources"]["blocks"] == 1, three


@pytest.mark.parametrize("wrap", [False, True])
def test_live_temporaries_of_a_chain(wrap):
  """a = x x, b = a x, c = b a: a is alive until c is made, so three
  [n, n] arrays at once (the argument x is the caller's). Inside a jit,
  the same."""
  def chain(x):
    a = x @ x
    b = a @ x
    return b @ a

  n = 96
  fn = jax.jit(chain) if wrap else chain
  peak, at_peak = tr.live_temporaries(
      fn, jax.ShapeDtypeStruct((n, n), jnp.float32))
  assert peak == 3 * n * n * 4
  assert at_peak == []  # nothing of 1 MiB or more

  def twice(x):  # the first product is dead before the second is made
    y = (x @ x).sum()
    return y + (x @ x).sum()

  peak, _ = tr.live_temporaries(
      twice, jax.ShapeDtypeStruct((n, n), jnp.float32))
  assert peak == n * n * 4 + 4 + 4  # one [n, n] product and two scalars


def test_kernel_traffic_counts_each_array_of_each_call():
  """Two pallas_calls (an add of two [n, d] f32 arrays into one bf16, then
  a copy of it), one inside a jit: bytes read and written per call, in
  program order, and the floor time at the tool's bandwidth."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  n, d = 64, 256

  def add_kernel(x_ref, y_ref, o_ref):
    o_ref[...] = (x_ref[...] + y_ref[...]).astype(o_ref.dtype)

  def copy_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]

  def program(x, y):
    s = pl.pallas_call(add_kernel, name="add",
                       out_shape=jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
                       interpret=True)(x, y)
    return jax.jit(lambda z: pl.pallas_call(
        copy_kernel, name="copy", out_shape=jax.ShapeDtypeStruct(
            (n, d), jnp.bfloat16), interpret=True)(z))(s)

  arg = jax.ShapeDtypeStruct((n, d), jnp.float32)
  rows = tr.kernel_traffic(program, arg, arg)
  assert [(r["kernel"], r["read"], r["written"]) for r in rows] == [
      ("add", 2 * n * d * 4, n * d * 2), ("copy", n * d * 2, n * d * 2)]
  assert rows[0]["floor_ms"] == pytest.approx(
      (2 * n * d * 4 + n * d * 2) / tr.HBM_BYTES_PER_S * 1e3)


def _triton_add(n: int, d: int):
  """An elementwise add of two [n, d] f32 arrays as a Pallas kernel
  compiled for the GPU (a Triton custom call when lowered for CUDA)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top

  def kernel(x_ref, y_ref, o_ref):
    o_ref[...] = x_ref[...] + y_ref[...]

  return pl.pallas_call(
      kernel, name="add", out_shape=jax.ShapeDtypeStruct((n, d), jnp.float32),
      grid=(n // 64,), in_specs=[pl.BlockSpec((64, d), lambda i: (i, 0))] * 2,
      out_specs=pl.BlockSpec((64, d), lambda i: (i, 0)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1))


def test_xla_temporaries_of_kernel_chains():
  """The host compiler's buffer assignment of programs lowered for CUDA,
  with their kernels as Triton custom calls. A chain a = x + x,
  b = a + x, c = b + a holds a and b (c is the result): two [n, d]
  arrays. A loop whose step forms the next carry while the old one is
  still to be read (by a kernel nothing orders before the new one's)
  makes XLA copy the carry, which the count lists; forming the next carry
  after the old one's last read, it copies nothing."""
  n, d = 512, 1024  # 2 MiB a [n, d] f32 array
  add = _triton_add(n, d)
  arg = jax.ShapeDtypeStruct((n, d), jnp.float32)

  def chain(x):
    a = add(x, x)
    b = add(a, x)
    return add(b, a)

  try:
    got = tr.xla_temporaries(chain, arg)
  except RuntimeError as e:  # no abstract CUDA target in this jax
    pytest.skip(str(e))
  assert got == dict(temp_mib=2 * n * d * 4 / 2**20, copies=[]), got

  def carried(ordered: bool):
    def step(_, carry):
      a, b = carry
      if ordered:  # a's last read comes before the new a is made
        t = add(a, b)
        return add(t, x_of[0]), add(t, t)
      # nothing orders a's read (making the new b) before the new a
      return add(b, b), add(a, b)
    x_of = []

    def program(x):
      x_of[:] = [x]
      a = add(x, x)
      return jax.lax.fori_loop(0, 4, step, (a, add(a, x)))
    return program

  copied = tr.xla_temporaries(carried(False), arg)
  assert (n * d * 4 / 2**20, f"f32[{n},{d}]") in copied["copies"], copied
  assert tr.xla_temporaries(carried(True), arg)["copies"] == []
