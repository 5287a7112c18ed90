"""Pallas gated delta rule kernels (interpret mode) vs float64 references.

Both chunk drivers run on CPU in Pallas interpret mode: "kernel" (the GPU /
Triton layout, one program loops over chunks) and "grid" (the TPU / Mosaic
layout, chunks on a sequential grid axis with the state in scratch). Each
case checks the output, the final state and all six gradients against the
float64 per-token references of tests/test_gated_delta_rule.py. Lowering
tests trace the kernels through the Triton and Mosaic lowerings on CPU, for
abstract H100 / TPU v5e targets (no GPU / TPU compilation happens; that needs
the hardware).

On CPU, implementation="pallas" without interpret=True raises a ValueError
naming `interpret` (there is no CPU lowering); this is tested too.

On a GPU the same cases run compiled (Triton lowering, no interpret), except
the "grid" driver, which is the Mosaic TPU layout (VMEM scratch) and has no
Triton lowering.
"""

import contextlib
import dataclasses

import jax
from jax.experimental import pallas as pl
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.tools import triton_resources
from pallas_kernels.gated_delta_rule import block_sizes
from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.gated_delta_rule import kernel
from pallas_kernels.gated_delta_rule import kernel_split
from pallas_kernels.gated_delta_rule import pallas_gdr
from pallas_kernels.gated_delta_rule import pallas_split
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
from tests import tolerances
from tests.test_gated_delta_rule import assert_scaled_close
from tests.test_gated_delta_rule import make_inputs
from tests.test_gated_delta_rule import np_recurrence
from tests.test_gated_delta_rule import reference_grads

NAMES = ("q", "k", "v", "g", "beta", "initial_state")
# Compiled kernels on a GPU / TPU; interpret mode on CPU.
_HW = jax.default_backend() if jax.default_backend() in ("gpu", "tpu") else None


@dataclasses.dataclass(frozen=True)
class Case:
  t: int
  dtype: object = jnp.float32
  with_state: bool = True
  with_segments: bool = False
  chunk_loop: str | None = "kernel"  # None: the backend's defaults
  kernels: str = "split"
  hk: int = 2
  hv: int = 4
  dk: int = 16
  dv: int = 24
  block_dv: int | None = None
  chunk_size: int = 64
  backend: str = "cpu"
  solve_block: int | None = None
  wy_block: int | None = None
  out_block: int | None = None
  sub_chunk: int | None = None
  g_scale: float = 1.0  # 0.02: slow decays (`make_inputs`)
  # Two long documents per row instead of make_inputs' ~20-token ones: a
  # boundary mid-chunk (row 0) and on a chunk edge (row 1), so states
  # cross chunks inside a document.
  long_docs: bool = False
  # BlockSizes.output_in_state; None: the backend's default (the GPU's
  # "inference", else False).
  output_in_state: bool | str | None = None
  bwd_block: int | None = None  # BlockSizes.bwd_block
  fwd_block: int | None = None  # BlockSizes.fwd_block
  state_stride: int = 1  # BlockSizes.state_stride
  recompute_states: bool | str = False  # BlockSizes.recompute_states
  bwd_block_dv: int | None = None  # BlockSizes.bwd_block_dv
  # backend "tpu": `pallas_gdr.tpu_interpreter`'s params, as pairs
  # (interpret=True, the interpreter's defaults, when empty).
  tpu_interpreter: tuple = ()


CASES = {
    "t1": Case(1),
    "t70_segments_no_state": Case(70, with_state=False, with_segments=True),
    "t200_bf16_segments": Case(200, jnp.bfloat16, with_segments=True),
    "t130_dv_tiles_chunk32": Case(130, hk=1, hv=2, dv=32, block_dv=16,
                                  chunk_size=32),
    # The solve in 16-token tiles.
    "t130_segments_solve16": Case(130, with_segments=True, solve_block=16),
    "t200_bf16_segments_solve16": Case(200, jnp.bfloat16, with_segments=True,
                                       solve_block=16, hk=1),
    # prep on whole-chunk tiles, inverted by doubling alone (the GPU
    # defaults take sub-chunks of 32 tokens).
    "t200_bf16_segments_full_tiles": Case(200, jnp.bfloat16,
                                          with_segments=True, solve_block=1,
                                          hk=1),
    # The wy and bwd_out kernels with dk in column tiles (two of 16 here).
    "t130_segments_wy16": Case(130, with_segments=True, dk=32, dv=48,
                               wy_block=16, out_block=16),
    "t130_bf16_wy16_no_state": Case(130, jnp.bfloat16, with_state=False,
                                    dk=32, dv=32, wy_block=16,
                                    solve_block=16, out_block=16),
    # The GPU defaults: dk / dv padded to powers of two (dv 72 -> 128), the
    # sequential kernels in value tiles of 16, prep by sub-chunks of 32
    # with the solve by doubling.
    "t70_gpu_defaults": Case(70, with_segments=True, dv=72, chunk_loop=None,
                             backend="gpu"),
    # The same in bf16 (bf16 tensor-core dots; on a GPU, bf16 x3 for T).
    "t130_bf16_gpu_defaults": Case(130, jnp.bfloat16, with_segments=True,
                                   chunk_loop=None, backend="gpu"),
    # Slow decays, no segments (the inputs' documents are ~20 tokens, so
    # none would cross a chunk): the state each chunk hands the next
    # (e^{G_last} S in the sequential kernels, <h_n, dh_n> e^{G_last} in
    # bwd_out) weighs in.
    "t200_slow_decay_gpu_defaults": Case(200, chunk_loop=None, backend="gpu",
                                         g_scale=0.02),
    "t150_bf16_slow_decay": Case(150, jnp.bfloat16, g_scale=0.02, hk=1),
    "t200_slow_decay_long_docs_gpu_defaults": Case(
        200, chunk_loop=None, backend="gpu", g_scale=0.02, long_docs=True),
    # The output formed inside the sequential pass (state_out, with P from
    # prep): on the GPU defaults (sub-chunk prep) with states crossing
    # chunks, in bf16 with segments and four value heads per key head, and
    # on full tiles without an initial state.
    "t200_slow_decay_long_docs_output_in_state": Case(
        200, chunk_loop=None, backend="gpu", g_scale=0.02, long_docs=True,
        output_in_state=True),
    "t130_bf16_segments_output_in_state": Case(
        130, jnp.bfloat16, with_segments=True, chunk_loop=None, backend="gpu",
        hk=1, output_in_state=True),
    "t70_segments_output_in_state_full_tiles": Case(
        70, with_state=False, with_segments=True, solve_block=1,
        output_in_state=True),
    # The backward in blocks, last to first, the state cotangent handed
    # from block to block: 320 padded tokens in two blocks of 128 and a
    # last one of 64 (slow decays, long documents: the cotangent crosses
    # blocks inside a document), and in bf16 one block of 192 and a last
    # one of 128 (with output_in_state).
    "t300_slow_decay_long_docs_bwd_block": Case(
        300, chunk_loop=None, backend="gpu", g_scale=0.02, long_docs=True,
        bwd_block=128),
    "t300_bf16_segments_bwd_block": Case(
        300, jnp.bfloat16, with_segments=True, chunk_loop=None,
        backend="gpu", hk=1, g_scale=0.02, bwd_block=192,
        output_in_state=True, fwd_block=192),
    # The forward in blocks, first to last, the state handed from block to
    # block (three kernels: blocks of 128, 128 and a last one of 64;
    # with output_in_state, above, 192 and 128), here with the backward in
    # blocks of one chunk (five blocks, none shorter).
    "t300_slow_decay_long_docs_fwd_block": Case(
        300, chunk_loop=None, backend="gpu", g_scale=0.02, long_docs=True,
        fwd_block=128, bwd_block=64),
    # Every other chunk's state stored (state_stride 2), the odd ones formed
    # again in the backward: five chunks (the last one even), slow decays
    # and documents across chunks; in bf16 with segments, and with the
    # forward and backward in blocks of two chunks and a last one of one.
    "t300_slow_decay_long_docs_stride2": Case(
        300, chunk_loop=None, backend="gpu", g_scale=0.02, long_docs=True,
        output_in_state=True, state_stride=2),
    "t300_bf16_segments_stride2_blocks": Case(
        300, jnp.bfloat16, with_segments=True, chunk_loop=None,
        backend="gpu", hk=1, g_scale=0.02, output_in_state=True,
        state_stride=2, fwd_block=128, bwd_block=128),
    # No per-chunk states stored (recompute_states): the backward forms
    # each block's again from the state entering it with state_fwd. Five
    # chunks in backward blocks of two and a last one of one, the forward
    # in one block (its sequential pass writes the state entering each
    # backward block), slow decays and documents across blocks (the GPU
    # defaults: the output inside the sequential pass under autodiff too,
    # as nothing is stored); in bf16 with segments and the three-kernel
    # forward, blocks of three chunks and a last one of two (the forward's
    # blocks hand those states on); one block that takes the whole
    # sequence.
    "t300_slow_decay_long_docs_recompute": Case(
        300, chunk_loop=None, backend="gpu", g_scale=0.02, long_docs=True,
        fwd_block=None, bwd_block=128, recompute_states=True),
    "t300_bf16_segments_recompute": Case(
        300, jnp.bfloat16, with_segments=True, chunk_loop=None,
        backend="gpu", hk=1, g_scale=0.02, output_in_state=False,
        fwd_block=192, bwd_block=192, recompute_states=True),
    "t70_slow_decay_recompute_one_block": Case(
        70, chunk_loop=None, backend="gpu", g_scale=0.02, fwd_block=256,
        bwd_block=256, recompute_states=True),
    # recompute_states "paired": each block's state_fwd in one launch with
    # the state_bwd of the block after it. Five blocks of one chunk (the
    # last paired with block 3, block 3 with block 2 as the odd one out of
    # the loop, which takes two blocks a step: blocks 2 and 1; block 0
    # alone); in bf16 with segments, blocks of three chunks and a last one
    # of two (no loop). The first with the forward in blocks of three
    # backward blocks and a last one of two, and the backward's sequential
    # kernels in one value tile where the forward's take two
    # (bwd_block_dv; dv 24 is padded to 32). Unrolled:
    # test_unrolled_blocks_equal_the_scan.
    "t300_slow_decay_long_docs_paired": Case(
        300, chunk_loop=None, backend="gpu", g_scale=0.02, long_docs=True,
        fwd_block=192, bwd_block=64, recompute_states="paired",
        bwd_block_dv=32),
    "t300_bf16_segments_paired": Case(
        300, jnp.bfloat16, with_segments=True, chunk_loop=None,
        backend="gpu", hk=1, g_scale=0.02, output_in_state=False,
        fwd_block=192, bwd_block=192, recompute_states="paired"),
    # The fused kernels: GPU driver (chunk loop in the kernel) and TPU
    # driver (chunks on the grid, state in VMEM scratch).
    "t70_bf16_segments_fused": Case(70, jnp.bfloat16, with_segments=True,
                                    kernels="fused"),
    "t130_dv_tiles_fused": Case(130, hk=1, hv=2, dv=32, block_dv=16,
                                chunk_size=32, kernels="fused"),
    # The TPU driver runs in Pallas' TPU interpreter (backend "tpu"): the
    # Mosaic compiler params, blocks moved by simulated DMAs, NaN in
    # every buffer before it is written; in the two-core case the batch
    # axis (the leading "parallel" one) is split over two simulated
    # cores, with the race detector on.
    "t130_segments_grid": Case(130, with_segments=True, chunk_loop="grid",
                               kernels="fused", backend="tpu"),
    "t70_bf16_grid_no_state": Case(70, jnp.bfloat16, with_state=False,
                                   chunk_loop="grid", kernels="fused",
                                   backend="tpu"),
    "t100_segments_grid_two_cores": Case(
        100, with_segments=True, chunk_loop="grid", kernels="fused",
        backend="tpu", block_dv=8, dv=16,
        tpu_interpreter=(("num_cores_or_threads", 2),
                         ("detect_races", True))),
    # The TPU defaults' value tiling (block_dv "auto"): a 512 x 200 state
    # is over its 256 x 256, so dv is zero-padded to 256 and taken in two
    # tiles of 128, the path of the states that do not compile whole
    # (1,024 x 200 on v4 and v5p: tests/test_tpu_compile.py).
    "t70_segments_tpu_defaults_large_state": Case(
        70, with_segments=True, chunk_loop=None, backend="tpu", hk=1, hv=1,
        dk=512, dv=200, g_scale=0.02),
    # The fused families with slow decays (no segments).
    "t150_slow_decay_fused": Case(150, kernels="fused", g_scale=0.02),
    "t150_slow_decay_grid": Case(150, chunk_loop="grid", kernels="fused",
                                 g_scale=0.02, backend="tpu"),
}


@contextlib.contextmanager
def _tpu_race_log():
  """Counts the TPU interpreter's race detectors and the races they find.

  The interpreter makes a new detector (a private class of jax's, the same
  in 0.10.2 and 0.11.2) for every kernel call and only prints what it
  finds, so one jitted forward + backward leaves the last kernel's alone;
  this records every detector's finding as it is made. Yields a dict
  {"detectors": n, "races": n}.
  """
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # pylint: disable=g-import-not-at-top
  log = {"detectors": 0, "races": 0}
  base = ipc.RaceDetectionState

  class Logged(base):

    def __init__(self, *args, **kwargs):
      log["detectors"] += 1
      super().__init__(*args, **kwargs)

    def __setattr__(self, name, value):
      if name == "races_found" and value:
        log["races"] += 1
      super().__setattr__(name, value)

  ipc.RaceDetectionState = Logged
  try:
    yield log
  finally:
    ipc.RaceDetectionState = base


def _run_case(case: Case):
  backend, interpret = case.backend, True
  if case.tpu_interpreter:
    interpret = pallas_gdr.tpu_interpreter(**dict(case.tpu_interpreter))
  if _HW is not None:
    if _HW == "gpu" and case.chunk_loop == "grid":
      pytest.skip("the 'grid' chunk driver is the Mosaic TPU layout (VMEM "
                  "scratch); it has no Triton lowering")
    backend, interpret = _HW, False
  inputs = make_inputs(500 + case.t, case.t, dtype=case.dtype,
                       with_state=case.with_state,
                       with_segments=case.with_segments, b=2, hk=case.hk,
                       hv=case.hv, dk=case.dk, dv=case.dv,
                       g_scale=case.g_scale)
  if case.long_docs:
    starts = np.array([[case.t * 9 // 20], [64]])
    inputs["segment_ids"] = jnp.asarray(
        (np.arange(case.t)[None] >= starts).astype(np.int32))
  if case.chunk_loop is None:
    changes = dict(bwd_block=case.bwd_block, fwd_block=case.fwd_block,
                   state_stride=case.state_stride,
                   recompute_states=case.recompute_states,
                   bwd_block_dv=case.bwd_block_dv)
    if case.output_in_state is not None:
      changes["output_in_state"] = case.output_in_state
    bs = dataclasses.replace(BlockSizes.get_default(backend), **changes)
  else:
    bs = BlockSizes(chunk_size=case.chunk_size, block_dv=case.block_dv,
                    chunk_loop=case.chunk_loop, kernels=case.kernels,
                    solve_block=case.solve_block, wy_block=case.wy_block,
                    out_block=case.out_block, sub_chunk=case.sub_chunk,
                    output_in_state=(False if case.output_in_state is None
                                     else case.output_in_state),
                    bwd_block=case.bwd_block, fwd_block=case.fwd_block,
                    state_stride=case.state_stride,
                    recompute_states=case.recompute_states)
  s0 = inputs["initial_state"]
  if s0 is None:
    s0 = jnp.zeros((2, case.hv, case.dk, case.dv), jnp.float32)

  def fn(q, k, v, g, beta, s0):
    return pallas_gdr.gated_delta_rule_pallas(
        q, k, v, g, beta, s0, segment_ids=inputs["segment_ids"],
        block_sizes=bs, interpret=interpret, backend=backend)

  rng = np.random.default_rng(case.t)
  r_o = rng.normal(size=(2, case.t, case.hv, case.dv)).astype(np.float32)
  r_s = rng.normal(size=(2, case.hv, case.dk, case.dv)).astype(np.float32)

  @jax.jit
  def fwd_and_grads(*args):
    (o, s), vjp = jax.vjp(fn, *args)
    return o, s, vjp((jnp.asarray(r_o, o.dtype), jnp.asarray(r_s)))

  args = [inputs[n] for n in NAMES[:5]] + [s0]
  if dict(case.tpu_interpreter).get("detect_races") and interpret:
    with _tpu_race_log() as races:
      o, s, grads = jax.block_until_ready(fwd_and_grads(*args))
    # Two kernels: the forward (states stored) and the backward.
    assert races == {"detectors": 2, "races": 0}, races
  else:
    o, s, grads = fwd_and_grads(*args)
  # Where the forward without autodiff runs other kernels than the one
  # under it (output_in_state="inference", the GPU defaults), its outputs
  # too.
  primal = None
  if bs.state_out_for(False) != bs.state_out_for(True):
    primal = jax.jit(fn)(*args)
  return inputs, (o, s), grads, (r_o, r_s), primal


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name):
  case = CASES[name]
  inputs, (o, s), grads, (r_o, r_s), primal = _run_case(case)
  o_ref, s_ref = np_recurrence(**inputs)
  runs = [("", (o, s))] + (
      [(" (no autodiff)", primal)] if primal is not None else [])
  for label, (o, s) in runs:
    assert o.shape == (2, case.t, case.hv, case.dv) and o.dtype == case.dtype
    assert (s.shape == (2, case.hv, case.dk, case.dv)
            and s.dtype == jnp.float32)
    assert_scaled_close(o, o_ref, case.dtype, "output" + label)
    assert_scaled_close(s, s_ref, case.dtype, "final state" + label)
  # The output cotangent r_o reaches the kernel rounded to o's dtype.
  r_o = np.asarray(jnp.asarray(r_o, case.dtype).astype(jnp.float32))
  expected = reference_grads(inputs, r_o, r_s)
  for n, got, want in zip(NAMES, grads, expected):
    assert got.shape == want.shape, n
    want_dtype = jnp.float32 if n == "initial_state" else case.dtype
    assert got.dtype == want_dtype, n
    assert_scaled_close(got, want, case.dtype, f"d{n}")


def test_api_dispatch_pallas_matches_chunked():
  inputs = make_inputs(3, 37, with_segments=True, hk=1, hv=3)
  o, s = gated_delta_rule(**inputs, implementation="pallas",
                          interpret=_HW is None,
                          scale=0.3, chunk_size=16)
  o_ref, s_ref = gated_delta_rule(**inputs, implementation="chunked",
                                  scale=0.3, chunk_size=16)
  assert_scaled_close(o, o_ref, jnp.float32)
  assert_scaled_close(s, s_ref, jnp.float32)


def test_api_block_sizes_reach_the_kernels():
  """gated_delta_rule(block_sizes=...) tiles the Pallas kernels (here: the
  "lean" preset, with the forward in blocks of 32 and the backward in
  blocks of 16: the output inside the sequential pass, the states
  recomputed in the backward, paired) and gives the chunked rule's output
  and gradients; a spec that sets the chunk size twice is refused by
  name."""
  inputs = make_inputs(5, 37, with_segments=True, hk=1, hv=3, g_scale=0.02)
  spec = "lean/bwd_block=16/fwd_block=32"

  def run(impl, **kw):
    def loss(q, k, v, g, beta):
      o, s = gated_delta_rule(q, k, v, g, beta, inputs["initial_state"],
                              segment_ids=inputs["segment_ids"],
                              implementation=impl, chunk_size=8, **kw)
      return jnp.sum(o * jnp.cos(o)) + jnp.sum(s), o
    args = [inputs[n] for n in NAMES[:5]]
    grad = jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True)
    return grad(*args), jax.make_jaxpr(grad)(*args)

  ((_, o), grads), jaxpr = run("pallas", interpret=_HW is None,
                               block_sizes=spec)
  ((_, o_ref), grads_ref), _ = run("chunked")
  assert "gated_delta_rule_state_out" in str(jaxpr)
  assert "gated_delta_rule_state_pair" in str(jaxpr)
  assert_scaled_close(o, o_ref, jnp.float32)
  for name, got, want in zip(NAMES, grads, grads_ref):
    assert_scaled_close(got, want, jnp.float32, f"d{name}")
  with pytest.raises(ValueError, match="chunk_size"):
    gated_delta_rule(**inputs, implementation="pallas", interpret=True,
                     block_sizes="chunk_size=16")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU behaviour")
def test_pallas_without_interpret_on_cpu_raises():
  inputs = make_inputs(0, 4)
  with pytest.raises(ValueError, match="interpret"):
    gated_delta_rule(**inputs, implementation="pallas")


def test_tpu_interpreter_runs_the_tpu_kernels_only():
  """interpret=True with backend "tpu" gives the fused kernels Pallas' TPU
  interpreter and their Mosaic params; the split (GPU) kernels keep the
  generic interpreter, and TPU interpreter params elsewhere are refused."""
  inputs = make_inputs(1, 20)
  params = pallas_gdr.tpu_interpreter(detect_races=True)
  cfg = lambda backend, kernels, interpret: pallas_gdr._prepare(  # pylint: disable=protected-access
      *(inputs[n] for n in NAMES), None, None,
      BlockSizes(kernels=kernels, chunk_loop=(
          "grid" if kernels == "fused" else "kernel")),
      interpret, backend)[-1]
  tpu_fused = cfg("tpu", "fused", True)
  assert tpu_fused.pallas_interpret == pallas_gdr.tpu_interpreter()
  assert tpu_fused.compiler_params(("parallel",)) is not None
  assert cfg("tpu", "fused", params).pallas_interpret == params
  for backend, kernels in (("tpu", "split"), ("gpu", "split"),
                           ("cpu", "fused")):
    generic = cfg(backend, kernels, True)
    assert generic.pallas_interpret is True
    assert generic.compiler_params(("parallel",)) is None
    with pytest.raises(ValueError, match="TPU interpreter params"):
      cfg(backend, kernels, params)


def test_gpu_sub_chunk_below_16_raises():
  """Triton's smallest tensor-core product is 16 wide: named, not a
  lowering failure deep in Triton."""
  inputs = make_inputs(0, 70)
  bs = dataclasses.replace(BlockSizes.get_default("gpu"), sub_chunk=8)
  with pytest.raises(ValueError, match="sub_chunk=8"):
    pallas_gdr.gated_delta_rule_pallas(
        *[inputs[n] for n in NAMES], block_sizes=bs, interpret=True,
        backend="gpu")


@pytest.mark.parametrize("algorithm", sorted(tolerances.MIXED_DOT_REL))
def test_mixed_products_split_the_f32_operand(algorithm):
  """Dots.fm / fm_nt (f32 matrix x stored bf16 matrix): on bf16 inputs the
  f32 operand is cut into bf16 parts, one tensor-core product each. Plain
  jnp on CPU, the same code the kernels trace; against float64."""
  rng = np.random.default_rng(7)
  a = rng.normal(size=(64, 64)).astype(np.float32)
  b = jnp.asarray(rng.normal(size=(64, 128)), jnp.bfloat16)
  want = a.astype(np.float64) @ np.asarray(b, np.float64)
  d = kernel_split.Dots(md=jnp.bfloat16, f32=algorithm)
  bound = tolerances.MIXED_DOT_REL[algorithm]
  assert tolerances.max_rel_err(d.fm(jnp.asarray(a), b), want) < bound
  assert tolerances.max_rel_err(d.fm_nt(jnp.asarray(a), b.T), want) < bound


def test_unit_lower_inverse():
  rng = np.random.default_rng(0)
  a = np.tril(rng.normal(size=(64, 64)) * 0.2, -1).astype(np.float32)
  got = kernel.unit_lower_inverse(jnp.asarray(a))
  want = np.linalg.inv(np.eye(64) + a.astype(np.float64))
  tolerances.assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("c,block", [(64, 16), (64, 8), (64, 32), (32, 8),
                                     (64, 64), (64, 1), (64, 2), (48, 16),
                                     (48, 1)])
def test_block_unit_lower_inverse(c, block):
  """Diagonal blocks by substitution, merged by doubling (block 1: by
  doubling alone; 48 tokens: a last block of another size)."""
  rng = np.random.default_rng(c + block)
  a = np.tril(rng.normal(size=(c, c)) * 0.3, -1).astype(np.float32)
  dot = lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST)
  got = kernel.block_unit_lower_inverse(jnp.asarray(a), block, dot)
  want = np.linalg.inv(np.eye(c) + a.astype(np.float64))
  tolerances.assert_close(got, want, jnp.float32)


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="chunk_size"):
    BlockSizes(chunk_size=12)
  with pytest.raises(ValueError, match="chunk_loop"):
    BlockSizes(chunk_loop="warp")
  with pytest.raises(ValueError, match="kernels"):
    BlockSizes(kernels="many")
  with pytest.raises(ValueError, match="kernels"):
    BlockSizes(chunk_loop="grid")  # "split" needs the in-kernel chunk loop
  with pytest.raises(ValueError, match="solve_block"):
    BlockSizes(solve_block=24)
  with pytest.raises(ValueError, match="sub_chunk"):
    BlockSizes(sub_chunk=24)
  with pytest.raises(ValueError, match="block_dv"):
    BlockSizes(block_dv=24).dv_tile(64)
  # The backward's sequential kernels' own tile: checked like block_dv,
  # used only where the backward asks, split kernels only.
  tiles = BlockSizes(block_dv=16, bwd_block_dv=32)
  assert (tiles.dv_tile(64), tiles.dv_tile(64, backward=True)) == (16, 32)
  assert BlockSizes(block_dv=16).dv_tile(64, backward=True) == 16
  with pytest.raises(ValueError, match="bwd_block_dv: expected a divisor "
                     "of dv=64, found 24"):
    BlockSizes(bwd_block_dv=24).dv_tile(64, backward=True)
  with pytest.raises(ValueError, match="bwd_block_dv: expected a positive"):
    BlockSizes(bwd_block_dv=0)
  with pytest.raises(ValueError, match="bwd_block_dv: only the split"):
    BlockSizes(bwd_block_dv=32, kernels="fused")
  with pytest.raises(ValueError, match="kernel_warps"):
    BlockSizes(kernel_warps="wy_q:8")
  with pytest.raises(ValueError, match="kernel_warps"):
    BlockSizes(kernel_warps="wy:6")
  with pytest.raises(ValueError, match="kernel_warps"):
    BlockSizes(kernel_warps="wy=8")
  with pytest.raises(ValueError, match="output_in_state"):
    BlockSizes(output_in_state="yes")
  with pytest.raises(ValueError, match="output_in_state"):
    BlockSizes(kernels="fused", output_in_state=True)
  assert BlockSizes.from_spec("output_in_state=True", "gpu").output_in_state
  # "inference": state_out for the forward without autodiff only.
  infer = BlockSizes.from_spec("output_in_state=inference", "cpu")
  assert (infer.state_out_for(store_states=False),
          infer.state_out_for(store_states=True)) == (True, False)
  assert [BlockSizes(output_in_state=x).state_out_for(store)
          for x in (True, False) for store in (True, False)] == [
              True, True, False, False]
  # The GPU defaults' "inference" does not stand in the way of the fused
  # kernels (whose loop forms the output anyway).
  assert BlockSizes.from_spec("kernels=fused",
                              "gpu").output_in_state == "inference"
  with pytest.raises(ValueError, match="state_stride.*output_in_state"):
    BlockSizes(state_stride=2, output_in_state="inference")
  with pytest.raises(ValueError, match="bwd_block"):
    BlockSizes(bwd_block=100)  # not a multiple of the chunk
  with pytest.raises(ValueError, match="bwd_block"):
    BlockSizes(bwd_block=32)  # less than a chunk
  with pytest.raises(ValueError, match="bwd_block"):
    BlockSizes(kernels="fused", bwd_block=128)
  with pytest.raises(ValueError, match="fwd_block"):
    BlockSizes(fwd_block=96)  # not a multiple of the chunk
  with pytest.raises(ValueError, match="fwd_block"):
    BlockSizes(kernels="fused", fwd_block=128)
  with pytest.raises(ValueError, match="state_stride"):
    BlockSizes(state_stride=3)
  with pytest.raises(ValueError, match="state_stride.*output_in_state"):
    BlockSizes(state_stride=2)  # the output kernel reads every state
  with pytest.raises(ValueError, match="bwd_block.*pairs"):
    BlockSizes(state_stride=2, output_in_state=True, bwd_block=192)
  # The three-kernel forward hands on the states entering the backward's
  # blocks from its own blocks: the same blocks.
  with pytest.raises(ValueError, match="recompute_states.*output_in_state="
                     "False.*fwd_block must equal"):
    BlockSizes(recompute_states=True, bwd_block=128)  # no forward blocks
  with pytest.raises(ValueError, match="recompute_states.*fwd_block must "
                     "equal"):
    BlockSizes(recompute_states=True, fwd_block=256, bwd_block=128)
  # state_out writes them: forward blocks of whole backward blocks, or none.
  with pytest.raises(ValueError, match="recompute_states: fwd_block must be "
                     "None or a multiple of bwd_block"):
    BlockSizes(recompute_states=True, output_in_state="inference",
               fwd_block=384, bwd_block=256)
  for fwd_block in (None, 128, 512):
    assert BlockSizes(recompute_states="paired", output_in_state=True,
                      fwd_block=fwd_block, bwd_block=128).fwd_block == (
                          fwd_block)
  with pytest.raises(ValueError, match="recompute_states.*state_stride"):
    BlockSizes(recompute_states=True, fwd_block=128, bwd_block=128,
               output_in_state=True, state_stride=2)
  with pytest.raises(ValueError, match="recompute_states: expected"):
    BlockSizes(recompute_states="yes", fwd_block=128, bwd_block=128)
  with pytest.raises(ValueError, match="recompute_states: needs.*a "
                     "bwd_block"):
    BlockSizes(recompute_states="paired", fwd_block=128)
  assert BlockSizes.from_spec(
      "recompute_states=paired/fwd_block=128/bwd_block=128",
      "gpu").recompute_states == "paired"
  # Presets stand for their fields; later items win, on any backend whose
  # kernels are split.
  for backend in ("gpu", "cpu"):
    lean = BlockSizes.from_spec("lean/bwd_block=2048", backend)
    assert (lean.recompute_states, lean.fwd_block, lean.bwd_block,
            lean.output_in_state) == ("paired", 16384, 2048, "inference")
  with pytest.raises(ValueError, match="only the split forward is taken "
                     "in blocks; found kernels='fused'"):
    BlockSizes.from_spec("lean", "tpu")  # the fused kernels
  with pytest.raises(ValueError, match="or a preset from.*'lean'.*found "
                     "'fast'"):
    BlockSizes.parse_spec("fast")
  # Per-kernel stages, as kernel_warps: state_pair takes at most 2 unless
  # named (its two passes share one program's shared memory).
  bs = BlockSizes.from_spec("num_stages=3/kernel_stages=state_bwd:1", "gpu")
  assert bs.kernel_stages == (("state_bwd", 1),)
  assert [bs.stages(x) for x in ("state_fwd", "state_bwd", "state_pair")
          ] == [3, 1, 2]
  assert BlockSizes(kernel_stages="state_pair:3+wy:1").stages(
      "state_pair") == 3
  with pytest.raises(ValueError, match="kernel_stages"):
    BlockSizes(kernel_stages="state_pear:2")
  with pytest.raises(ValueError, match="kernel_stages"):
    BlockSizes(kernel_stages="state_bwd:0")
  with pytest.raises(ValueError, match="kernel_stages"):
    BlockSizes(kernel_stages="state_bwd=2")
  # bwd_local forms whole states with state_stride 2: twice the warps,
  # unless named.
  lean = BlockSizes(state_stride=2, output_in_state=True)
  assert lean.warps("bwd_local", True) == 2 * lean.num_warps_intra
  assert lean.warps("wy", True) == lean.num_warps_intra
  assert dataclasses.replace(lean, kernel_warps="bwd_local:4").warps(
      "bwd_local", True) == 4
  assert not BlockSizes.from_spec("output_in_state=False",
                                  "gpu").output_in_state
  assert BlockSizes.from_spec("", "gpu") == BlockSizes.get_default("gpu")
  assert BlockSizes.from_spec("solve_block=None/kernel_warps=wy:2",
                              "gpu") == dataclasses.replace(
                                  BlockSizes.get_default("gpu"),
                                  solve_block=None, kernel_warps="wy:2")
  with pytest.raises(ValueError, match="field=value"):
    BlockSizes.from_spec("solve_blocks=16", "gpu")
  warps = BlockSizes(num_warps=2, num_warps_intra=4,
                     kernel_warps="wy:8+state_bwd:1")
  assert warps == BlockSizes(num_warps=2, num_warps_intra=4,
                             kernel_warps=(("state_bwd", 1), ("wy", 8)))
  assert [warps.warps(name, parallel) for name, parallel in
          [("wy", True), ("bwd_out", True), ("state_bwd", False),
           ("state_fwd", False)]] == [8, 4, 1, 2]
  assert BlockSizes.get_default("tpu").chunk_loop == "grid"
  assert BlockSizes.get_default("gpu").chunk_loop == "kernel"
  assert BlockSizes.get_default("gpu").kernels == "split"
  assert BlockSizes.get_default("tpu").kernels == "fused"


def test_tpu_value_tiles():
  """block_dv "auto" (the TPU defaults): all of dv while the [dk, dv]
  state is at most 256 x 256 elements or dv is no multiple of 128 after
  padding; else the largest multiple of 128 dividing dv that keeps
  [dk, tile] within it (128 at least); dv padded to a multiple of 128
  only where a whole state would be too large. Resolved per head dims
  (`for_dims`) before any kernel reads it."""
  pad, tile = block_sizes.tpu_padded_dv, block_sizes.tpu_value_tile
  assert [(pad(dk, dv), tile(dk, pad(dk, dv))) for dk, dv in [
      (128, 128), (256, 256), (64, 1000), (512, 512), (256, 512),
      (128, 1024), (1024, 256), (384, 384), (512, 200)]] == [
          (128, None), (256, None), (1000, None), (512, 128), (512, 256),
          (1024, 512), (256, 128), (384, 128), (256, 128)]
  auto = BlockSizes.get_default("tpu")
  assert auto.block_dv == "auto"
  assert auto.for_dims(512, 512).block_dv == 128
  assert auto.for_dims(128, 128).block_dv is None
  assert BlockSizes(block_dv=64).for_dims(512, 512).block_dv == 64
  with pytest.raises(ValueError, match="for_dims"):
    auto.dv_tile(128)
  with pytest.raises(ValueError, match="block_dv"):
    BlockSizes(block_dv="whole")
  # The fused "kernel" chunk loop holds whole sequences per program: not
  # on a TPU (it has no Mosaic grid either).
  x = jnp.zeros((1, 64, 1, 128), jnp.float32)
  g = jnp.zeros((1, 64, 1), jnp.float32)
  with pytest.raises(ValueError, match="chunk_loop='kernel'"):
    pallas_gdr.gated_delta_rule_pallas(
        x, x, x, g, g, backend="tpu",
        block_sizes=BlockSizes(chunk_loop="kernel", kernels="fused"))


# What each lowering emits for one pallas_call.
_CUSTOM_CALLS = {
    "cuda": "stablehlo.custom_call @__gpu$xla.gpu.triton(",
    "tpu": "stablehlo.custom_call @tpu_custom_call(",
}


def _abstract_target(platform):
  """A context that makes `platform` the lowering target (no hardware);
  skips where this jax cannot name one."""
  try:
    return triton_resources.abstract_target(platform)
  except RuntimeError as e:
    pytest.skip(str(e))


# (platform, kernels, solve_block, wy_block, sub_chunk) -> pallas_calls in an inference
# forward, the custom_vjp forward and the backward, and kernel names that
# must appear. The GPU defaults' inference forward is prep_out and
# state_out (output_in_state="inference"), the forward under autodiff
# prep, state_fwd and output.
_SPLIT_NAMES = ("gated_delta_rule_prep_out", "gated_delta_rule_state_out",
                "gated_delta_rule_prep", "gated_delta_rule_state_fwd",
                "gated_delta_rule_output", "gated_delta_rule_state_bwd",
                "gated_delta_rule_bwd_out", "gated_delta_rule_bwd_wy")
_LOWERINGS = {
    ("cuda", "split", None, None, None): (2 + 3 + 5, _SPLIT_NAMES),
    ("cuda", "split", 16, None, None): (2 + 3 + 5, _SPLIT_NAMES),
    ("cuda", "split", 16, 64, None): (2 + 3 + 5, _SPLIT_NAMES),
    ("cuda", "split", 1, 64, 32): (2 + 3 + 5, _SPLIT_NAMES),
    ("cuda", "split", 1, 64, None): (2 + 3 + 5, _SPLIT_NAMES),
    ("cuda", "fused", None, None, None): (3, ("gated_delta_rule_fwd",
                                              "gated_delta_rule_bwd")),
    ("tpu", "fused", None, None, None): (3, ("gated_delta_rule_fwd",
                                             "gated_delta_rule_bwd")),
}


@pytest.mark.parametrize("platform,kernels,solve_block,wy_block,sub_chunk",
                         list(_LOWERINGS))
def test_lowers_for_accelerators(platform, kernels, solve_block, wy_block,
                                 sub_chunk):
  """Forward (with and without autodiff) and backward lower on CPU.

  Traces through the real Triton / Mosaic lowerings (Pallas -> Triton IR /
  Mosaic MLIR, serialised into the custom call); nothing is compiled.
  """
  if jax.default_backend() != "cpu":
    pytest.skip("lowering smoke test for CPU-only machines")
  backend = "gpu" if platform == "cuda" else "tpu"
  blocks = dataclasses.replace(BlockSizes.get_default(backend),
                               kernels=kernels, solve_block=solve_block,
                               wy_block=wy_block, out_block=wy_block,
                               sub_chunk=sub_chunk)
  inputs = make_inputs(1, 130, dtype=jnp.bfloat16, with_segments=True,
                       hk=1, hv=2, dk=128, dv=128)
  seg = inputs.pop("segment_ids")

  def fwd(q, k, v, g, beta, initial_state):
    return pallas_gdr.gated_delta_rule_pallas(
        q, k, v, g, beta, initial_state, segment_ids=seg, backend=backend,
        block_sizes=blocks)

  def loss(*args):
    o, s = fwd(*args)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  def infer_and_grads(*args):
    # Inference forward (no per-chunk states), then the custom_vjp forward
    # (stores them) and the backward: three pallas_calls.
    return fwd(*args), jax.grad(loss, argnums=tuple(range(6)))(*args)

  with _abstract_target(platform):
    text = jax.jit(infer_and_grads).trace(
        *[inputs[n] for n in NAMES]).lower(
            lowering_platforms=(platform,)).as_text()
  other = "tpu" if platform == "cuda" else "cuda"
  calls, names = _LOWERINGS[(platform, kernels, solve_block, wy_block,
                             sub_chunk)]
  assert text.count(_CUSTOM_CALLS[platform]) == calls, _CUSTOM_CALLS[platform]
  assert _CUSTOM_CALLS[other] not in text
  for name in names:
    assert name in text, name


def _eqns(fn, *args) -> list:
  """Every equation of fn's jaxpr, nested jaxprs included (not the kernel
  bodies inside pallas_calls)."""
  eqns = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      eqns.append(eqn)
      if eqn.primitive.name != "pallas_call":
        for sub in jex_core.jaxprs_in_params(eqn.params):
          visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return eqns


def _pallas_call_outputs(fn, *args):
  """The output shapes of every pallas_call in fn's jaxpr (nested jaxprs
  included)."""
  return [[v.aval.shape for v in eqn.outvars] for eqn in _eqns(fn, *args)
          if eqn.primitive.name == "pallas_call"]


@pytest.mark.parametrize("output_in_state", [False, True, "inference"])
def test_inference_forward_stores_per_chunk_states_only_when_needed(
    output_in_state):
  """With output_in_state (True or "inference") an inference forward
  writes no per-chunk states ([b, hv, n, dk, dv]); the forward under
  autodiff keeps them for the backward. Without it the output kernel reads
  them, so both write them."""
  inputs = make_inputs(4, 130, hk=1, hv=2, dk=16, dv=32)
  bs = dataclasses.replace(BlockSizes.get_default("gpu"),
                           output_in_state=output_in_state)

  def fwd(q, k, v, g, beta, s0):
    return pallas_gdr.gated_delta_rule_pallas(
        q, k, v, g, beta, s0, segment_ids=inputs["segment_ids"],
        block_sizes=bs, interpret=True, backend="gpu")

  def grads(*args):
    return jax.grad(lambda *a: jnp.sum(fwd(*a)[0]),
                    argnums=tuple(range(6)))(*args)

  args = [inputs[n] for n in NAMES]
  n_chunks = -(-130 // bs.chunk_size)
  states = (inputs["q"].shape[0], 2, n_chunks, 16, 32)

  def states_written(fn):
    return sum(shape == states for outs in _pallas_call_outputs(fn, *args)
               for shape in outs)

  assert states_written(fwd) == (0 if output_in_state else 1)
  def names(fn):
    return [eqn.params["name"] for eqn in _eqns(fn, *args)
            if eqn.primitive.name == "pallas_call"]

  # "inference": the state_out pass without autodiff, the three kernels
  # under it.
  assert names(fwd) == (
      ["gated_delta_rule_prep", "gated_delta_rule_state_fwd",
       "gated_delta_rule_output"] if not output_in_state else
      ["gated_delta_rule_prep_out", "gated_delta_rule_state_out"])
  assert ("gated_delta_rule_state_out" in names(grads)) == (
      output_in_state is True)
  # The forward under autodiff writes them once (and the backward's state
  # cotangents have the same shape).
  assert states_written(grads) == 2


def _grad_lowered_for_cuda(bs: BlockSizes, t: int, d: int) -> str:
  """The StableHLO text of forward+backward (gradients of q, k, v, g, beta)
  lowered for CUDA on the CPU, bf16, one key head and two value heads."""
  if jax.default_backend() != "cpu":
    pytest.skip("lowering smoke test for CPU-only machines")
  inputs = make_inputs(2, t, dtype=jnp.bfloat16, hk=1, hv=2, dk=d, dv=d)

  def loss(q, k, v, g, beta):
    o, s = pallas_gdr.gated_delta_rule_pallas(
        q, k, v, g, beta, backend="gpu", block_sizes=bs)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  with _abstract_target("cuda"):
    return jax.jit(jax.grad(loss, argnums=tuple(range(5)))).trace(
        *[inputs[n] for n in NAMES[:5]]).lower(
            lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("f32_dot", block_sizes.F32_DOTS)
def test_every_f32_dot_lowers_for_cuda(f32_dot):
  """Each f32 dot algorithm of the split kernels passes the Triton lowering
  (forward and backward). Interpret mode computes them all in IEEE f32, so
  this is the CPU's only check that the GPU accepts them."""
  text = _grad_lowered_for_cuda(
      dataclasses.replace(BlockSizes.get_default("gpu"), f32_dot=f32_dot),
      t=70, d=32)
  assert text.count(_CUSTOM_CALLS["cuda"]) == 3 + 5


def test_backward_in_blocks_keeps_one_block_of_intermediates():
  """The jaxpr liveness count of forward+backward (pallas_kernels.tools.
  triton_resources, the estimate that matched XLA's measured temporaries
  on the H100 within 12%): with bwd_block the state cotangents and the
  backward's other intermediates are alive for one block at a time, so
  at the peak the only whole-sequence state array is h."""
  # Arrays under 1 MiB are not listed at the peak: states of 4 MiB here,
  # whole token arrays of 2 MiB, a block's of 0.25 MiB.
  shape = dict(batch=1, seq_len=4096, key_heads=2, heads=2, dk=128,
               dv=128, dtype=jnp.bfloat16)
  states = f"bfloat16[1,2,{4096 // 64},128,128]"
  peaks = {}
  for block in (None, 512):
    bs = dataclasses.replace(BlockSizes.get_default("gpu"), bwd_block=block)
    try:
      est = triton_resources.memory_estimate(bs, **shape)
    except RuntimeError as e:  # no abstract CUDA target in this jax
      pytest.skip(str(e))
    peaks[block] = est["peak_mib"]
    whole = [t for _, t in est["at_peak"] if t == states]
    assert len(whole) == (2 if block is None else 1), (block, est["at_peak"])
  assert peaks[512] < 0.8 * peaks[None], peaks


@pytest.mark.parametrize("output_in_state", [False, True])
def test_forward_in_blocks_keeps_one_block_of_intermediates(output_in_state):
  """The jaxpr liveness count of an inference forward: with fwd_block, w,
  u, the decays and v' (or P), and without output_in_state the states h
  too, are alive for one block at a time, so at the peak the only
  whole-sequence array is the output."""
  t, hv, d = 4096, 2, 128
  args = triton_resources._abstract_args(  # pylint: disable=protected-access
      1, t, hv, hv, d, d, jnp.bfloat16, False)[:5]
  whole = {f"bfloat16[1,{t},{hv},{d}]", f"bfloat16[1,{t},{hv},64]",
           f"float32[1,{t},{hv},4]", f"bfloat16[1,{hv},{t // 64},{d},{d}]"}
  peaks = {}
  for block in (None, 512):
    bs = dataclasses.replace(BlockSizes.get_default("gpu"), fwd_block=block,
                             output_in_state=output_in_state)
    peak, at_peak = triton_resources.live_temporaries(
        lambda *a: pallas_gdr.gated_delta_rule_pallas(  # pylint: disable=cell-var-from-loop
            *a, backend="gpu", block_sizes=bs), *args)
    peaks[block] = peak
    whole_at_peak = [x for _, x in at_peak if x in whole]
    if block is None:
      assert len(whole_at_peak) >= 3, at_peak  # o, w, u, ...
    else:
      assert whole_at_peak == [f"bfloat16[1,{t},{hv},{d}]"], at_peak  # o
  assert peaks[512] < 0.5 * peaks[None], peaks


def _op_memory(spec: str, shape: dict) -> dict:
  """`memory_estimate` of the rule as an operation under `spec` (skips
  where this jax has no abstract CUDA target)."""
  try:
    return triton_resources.memory_estimate(
        BlockSizes.from_spec(spec, "gpu"), op_level=True, **shape)
  except RuntimeError as e:  # no abstract CUDA target in this jax
    pytest.skip(str(e))


def test_states_of_every_other_chunk_meet_the_memory_target():
  """The jaxpr liveness count of the rule as an operation (forward and
  backward; the cotangents arguments, the outputs and gradients results,
  as XLA counts temporaries): with output_in_state, the forward and the
  backward in blocks and state_stride 2, what it holds beyond its inputs
  and outputs fits in the bytes of the per-chunk states (the memory
  bound, `chunk_states_bytes` of the benchmark): half of them stored
  (every other chunk's), the rest of the room for one block's
  intermediates. Without the stride, or without the
  forward in blocks, it does not fit."""
  t, hv, d = 4096, 2, 128
  shape = dict(batch=1, seq_len=t, key_heads=hv, heads=hv, dk=d, dv=d,
               dtype=jnp.bfloat16)
  n = t // 64
  allowance = hv * n * d * d * 2 / 2**20  # MiB, bf16 like the inputs
  lean = "output_in_state=True/fwd_block=256/bwd_block=256/state_stride=2"
  peaks = {}
  for spec in (lean, lean.replace("/state_stride=2", ""),
               lean.replace("fwd_block=256/", "")):
    est = _op_memory(spec, shape)
    peaks[spec] = est["peak_mib"]
    if spec == lean:
      # The stored states, half of the per-chunk ones, and no whole array
      # of every chunk's states or of tokens.
      assert est["at_peak"][0] == (
          allowance / 2, f"bfloat16[1,{hv},{n // 2},{d},{d}]"), est
      assert all(mib < allowance / 2 for mib, _ in est["at_peak"][1:]), est
  assert peaks[lean] <= allowance, peaks
  assert min(peaks[s] for s in peaks if s != lean) > allowance, peaks


def test_recomputed_states_meet_the_memory_target():
  """recompute_states: the same count with no per-chunk states stored, in
  eight blocks (half the blocks the stride-2 form above needs here):
  one block's intermediates and the state entering each block, within
  the per-chunk states' bytes (3.5 of 4 MiB here; 158 of 256 at 32k
  tokens and 16 heads); no array of every chunk's states
  or of all tokens but the scalars at the peak. In 2 blocks (its
  intermediates four times as large) it does not fit."""
  t, hv, d = 4096, 2, 128
  shape = dict(batch=1, seq_len=t, key_heads=hv, heads=hv, dk=d, dv=d,
               dtype=jnp.bfloat16)
  allowance = hv * (t // 64) * d * d * 2 / 2**20  # MiB, bf16
  peaks = {}
  for block in (512, 2048):
    est = _op_memory(
        f"recompute_states=True/fwd_block={block}/bwd_block={block}", shape)
    peaks[block] = est["peak_mib"]
    if block == 512:
      whole = [(mib, a) for mib, a in est["at_peak"]
               if f",{t}," in a and not a.startswith("float32")
               or f",{t // 64},{d},{d}]" in a]
      assert not whole, est
  assert peaks[512] <= allowance, peaks
  assert peaks[2048] > allowance, peaks



# The benchmark's shape (B=1, T=32768, H=16, D=128, bf16) and the memory
# bound there: the bytes of the per-chunk states, 512 chunks x 16 heads of
# 128 x 128 in bf16 (256 MiB).
_BENCH_SHAPE = dict(batch=1, seq_len=32768, key_heads=16, heads=16, dk=128,
                    dv=128, dtype=jnp.bfloat16)
_BENCH_BOUND_MIB = 16 * 512 * 128 * 128 * 2 / 2**20


@pytest.mark.parametrize("count", ["xla", "jaxpr"])
@pytest.mark.parametrize("spec, within", [
    ("", False),  # the GPU defaults store every chunk's state, and more
    ("output_in_state=True/fwd_block=2048/bwd_block=2048/state_stride=2",
     True),
    ("recompute_states=True/fwd_block=4096/bwd_block=4096", True),
    ("lean", True),  # paired, the forward in blocks of 16384
    ("recompute_states=paired/fwd_block=4096/bwd_block=4096/"
     "block_loop=scan", True),
])
def test_memory_bound_at_the_benchmark_shape(spec, within, count):
  """Forward+backward's temporaries as an operation at the benchmark's
  shape: the memory-lean tilings within the memory bound, the defaults
  not. Counted by XLA ("xla": `triton_resources.xla_memory`, the program
  lowered for CUDA through the host compiler's copy insertion, scheduling
  and buffer assignment, which gave the H100's measured numbers to the
  tenth of a MiB), and there no loop may copy a block's arrays: the paired
  backward in steps of one block copied its carried block (73 MiB) in and
  out every step and held 264 MiB; unrolled without
  `pallas_split._in_order`, XLA ran every block's prep ahead and held 717.
  And by the jaxpr liveness count in program order ("jaxpr",
  `memory_estimate`), which every jax here can make: jax 0.10's host
  compiler drops the blocks' ordering barriers before it schedules, so
  its XLA count of the blocked tilings is not the GPU's and is skipped."""
  blocks = BlockSizes.from_spec(spec, "gpu")
  if count == "jaxpr":
    got = _op_memory(spec, _BENCH_SHAPE)
    assert (got["peak_mib"] <= _BENCH_BOUND_MIB) == within, got["peak_mib"]
    return
  if ((blocks.fwd_block or blocks.bwd_block)
      and not triton_resources.host_schedules_barriers()):
    pytest.skip(f"jax {jax.__version__}'s host compiler removes the blocks' "
                "optimization barriers before scheduling, the GPU's after")
  try:
    got = triton_resources.xla_memory(blocks, **_BENCH_SHAPE)
  except RuntimeError as e:  # no abstract CUDA target in this jax
    pytest.skip(str(e))
  assert (got["temp_mib"] <= _BENCH_BOUND_MIB) == within, got
  assert all(mib < 8 for mib, _ in got["copies"]), got


def test_rows_view_composes_indices():
  """`pallas_split._Rows` (the blocked backward's view of whole-sequence
  refs) turns each index form the kernels use into one index of the
  underlying ref: rows relative to the window, all rows, one row, and a
  single squeezed row; for loads and stores."""
  x = jnp.asarray(np.random.default_rng(11).normal(size=(64, 8)),
                  jnp.float32)
  rows = pallas_split._Rows  # pylint: disable=protected-access

  def body(x_ref, o_ref, o2_ref):
    win = rows(x_ref, 16, 32, 16)  # rows 16 .. 47
    o_ref[0] = win[pl.ds(0, 8), :]
    o_ref[1] = win[pl.ds(8, 8)]
    o_ref[2] = win[16:24, :]
    o_ref[3] = jnp.broadcast_to(win[3, :][None, :], (8, 8))
    o_ref[4] = win[...][24:32]
    o_ref[5] = jnp.broadcast_to(rows(x_ref, 5, None, 1)[...][None, :],
                                (8, 8))
    o2_ref[...] = jnp.zeros_like(o2_ref)
    rows(o2_ref, 8, 16, 8)[pl.ds(8, 8), :] = x_ref[pl.ds(0, 8), :]

  o, o2 = pl.pallas_call(
      body, out_shape=[jax.ShapeDtypeStruct((6, 8, 8), jnp.float32),
                       jax.ShapeDtypeStruct((64, 8), jnp.float32)],
      interpret=True)(x)
  x = np.asarray(x)
  want = [x[16:24], x[24:32], x[32:40], np.broadcast_to(x[19], (8, 8)),
          x[40:48], np.broadcast_to(x[5], (8, 8))]
  np.testing.assert_array_equal(np.asarray(o), np.stack(want))
  want2 = np.zeros_like(x)
  want2[16:24] = x[:8]
  np.testing.assert_array_equal(np.asarray(o2), want2)


@pytest.mark.parametrize("spec", [
    "bwd_block=128", "fwd_block=128", "fwd_block=128/output_in_state=True",
    "recompute_states=True/fwd_block=128/bwd_block=128",
    "recompute_states=paired/fwd_block=128/bwd_block=128"])
def test_blocks_read_whole_arrays_at_an_offset(spec):
  """bwd_block: the kernels of each block read q, k, v, dO and the stored
  states h where they are (an offset into the whole arrays), so the
  backward slices (copies) none of them; the old form sliced each block's
  share of all five, one more pass over them in all. fwd_block: the same
  for the forward's q, k, v and scalars, and o and h are written in place
  (nothing is sliced, padded or concatenated into them)."""
  t, hv, d = 192, 2, 16
  inputs = make_inputs(5, t, hk=1, hv=hv, dk=d, dv=d)
  bs = BlockSizes.from_spec(spec, "gpu")

  def loss(q, k, v, g, beta):
    o, s = pallas_gdr.gated_delta_rule_pallas(
        q, k, v, g, beta, block_sizes=bs, interpret=True, backend="gpu")
    return jnp.sum(o) + jnp.sum(s)

  eqns = _eqns(jax.grad(loss, argnums=tuple(range(5))),
               *[inputs[n] for n in NAMES[:5]])
  b = inputs["q"].shape[0]
  whole = {(b, t, 1, d), (b, t, hv, d), (b, hv, t // 64, d, d)}
  copied = [(eqn.primitive.name, tuple(x.aval.shape))
            for eqn in eqns
            if eqn.primitive.name in ("slice", "dynamic_slice",
                                      "dynamic_update_slice", "concatenate",
                                      "pad")
            for x in (*eqn.invars, *eqn.outvars)
            if hasattr(x.aval, "shape") and tuple(x.aval.shape) in whole]
  assert not copied, copied
  # Each block's kernels ran on the window (t = 192: two blocks of 128
  # and 64 tokens): the pallas_calls saw both window lengths.
  windows = {shape[1] for eqn in eqns if eqn.primitive.name == "pallas_call"
             for shape in (x.aval.shape for x in eqn.outvars)
             if len(shape) == 4 and shape[2] == hv}
  assert {128, 64} <= windows, windows


def test_backward_in_blocks_lowers_for_cuda():
  """bwd_block: the backward's five kernels inside a loop over whole
  blocks (block_loop "scan"), and once more for the shorter last block
  (130 tokens, 192 padded: one block of 128 in the loop, then 64)."""
  text = _grad_lowered_for_cuda(
      dataclasses.replace(BlockSizes.get_default("gpu"), bwd_block=128,
                          block_loop="scan"),
      t=130, d=128)
  assert text.count(_CUSTOM_CALLS["cuda"]) == 3 + 5 + 5
  assert "stablehlo.while" in text


def test_forward_in_blocks_lowers_for_cuda():
  """fwd_block: the forward's three kernels for the first block, inside a
  loop (block_loop "scan") for the next whole ones, and for the shorter
  last block (300 tokens, 320 padded: 128, 128, 64), then the backward's
  five."""
  text = _grad_lowered_for_cuda(
      dataclasses.replace(BlockSizes.get_default("gpu"), fwd_block=128,
                          block_loop="scan"),
      t=300, d=128)
  assert text.count(_CUSTOM_CALLS["cuda"]) == 3 + 3 + 3 + 5
  assert "stablehlo.while" in text


def test_stored_states_of_every_other_chunk_lower_for_cuda():
  """state_stride 2 with the forward and backward in blocks of two chunks
  (300 tokens, 320 padded: 2, 2 and 1 chunks): prep and state_out per
  forward block, five kernels per backward block, loops for both
  (block_loop "scan")."""
  text = _grad_lowered_for_cuda(BlockSizes.from_spec(
      "output_in_state=True/fwd_block=128/bwd_block=128/state_stride=2/"
      "block_loop=scan", "gpu"), t=300, d=128)
  assert text.count(_CUSTOM_CALLS["cuda"]) == 3 * 2 + 2 * 5
  assert text.count("stablehlo.while") == 2


def test_recomputed_states_keep_no_per_chunk_states_for_the_backward():
  """What the forward hands the backward (the residuals of `jax.vjp`,
  held across a whole model's forward for every Gated DeltaNet layer):
  with the defaults the state entering every chunk, [b, hv, n, dk, dv];
  with recompute_states only q, k, v, the packed scalars and the state
  entering each block. (At 32k tokens, 16 heads, D = 128, bf16: 652 MiB
  against 404 a layer, 4.4 GiB over Qwen3.5-0.8B's 18 such layers.)"""
  b, t, hv, d = 1, 1024, 2, 128
  sds = jax.ShapeDtypeStruct
  args = [sds((b, t, hv, d), jnp.bfloat16)] * 3 + [sds((b, t, hv),
                                                       jnp.float32)] * 2
  for spec in ("", "recompute_states=True/fwd_block=256/bwd_block=256"):
    bs = BlockSizes.from_spec(spec, "gpu")
    fn = lambda *a, bs=bs: pallas_gdr.gated_delta_rule_pallas(
        *a, backend="gpu", block_sizes=bs, interpret=True)
    res = jax.tree_util.tree_leaves(
        jax.eval_shape(lambda *a, fn=fn: jax.vjp(fn, *a)[1], *args))
    states = [x.shape for x in res if x.shape[-3:] == (t // 64, d, d)]
    assert bool(states) == (spec == ""), (spec, states)
  # recompute_states: q, k, v, per-token scalars (packed, or columns of
  # them) and the state entering each of the four blocks, nothing else.
  kinds = sorted(
      "qkv" if (x.shape, x.dtype) == (args[0].shape, args[0].dtype)
      else "scalars" if x.shape[:3] == (b, t, hv) and x.shape[3] <= 4
      else "entering" if (x.shape, x.dtype) == ((b, hv, t // 256, d, d),
                                                 jnp.float32)
      else f"other {x.shape} {x.dtype}" for x in res)
  assert kinds.count("qkv") == 3 and kinds.count("entering") == 1, kinds
  assert set(kinds) == {"qkv", "scalars", "entering"}, kinds


def test_unrolled_blocks_equal_the_scan():
  """block_loop="unroll" writes each block's kernels out instead of a
  lax.scan over them: the same kernels on the same windows, so the same
  output, final state and gradients (recompute_states "paired", the
  forward and backward in four blocks of one chunk, so the backward pairs
  the last block, then one loop step of two blocks, then the first alone; slow
  decays, documents across blocks)."""
  spec = "recompute_states=paired/fwd_block=64/bwd_block=64"
  inputs = make_inputs(17, 200, with_segments=True, b=1, hk=1, hv=1,
                       dk=16, dv=16, g_scale=0.02)
  inputs["segment_ids"] = jnp.asarray(
      (np.arange(200)[None] >= 100).astype(np.int32))
  rng = np.random.default_rng(17)
  r_o = jnp.asarray(rng.normal(size=inputs["v"].shape), jnp.float32)
  out = {}
  for loop in ("scan", "unroll", "auto"):
    bs = BlockSizes.from_spec(f"{spec}/block_loop={loop}", "gpu")

    def loss(*args, bs=bs):
      o, st = pallas_gdr.gated_delta_rule_pallas(
          *args, segment_ids=inputs["segment_ids"], block_sizes=bs,
          interpret=True, backend="gpu")
      return jnp.sum(o * r_o) + jnp.sum(st), (o, st)

    args = [inputs[n] for n in NAMES]
    eqns = _eqns(jax.grad(lambda *a: loss(*a)[0]), *args)
    loops = [e for e in eqns if e.primitive.name in ("scan", "while")]
    # "auto" (the default) unrolls four blocks (AUTO_UNROLL_BLOCKS).
    assert bool(loops) == (loop == "scan"), (loop, len(loops))
    if loop == "auto":
      break  # the same program as "unroll"
    (_, (o, st)), grads = jax.jit(jax.value_and_grad(
        loss, argnums=tuple(range(6)), has_aux=True))(*args)
    out[loop] = (o, st, *grads)
  for name, a, b in zip(("o", "state", *NAMES), out["scan"],
                        out["unroll"]):
    tolerances.assert_close(a, b, jnp.float32, scale=0.01, err_msg=name)


def test_auto_block_loop_scans_beyond_its_cap(monkeypatch):
  """block_loop "auto" (the default) unrolls a loop of at most
  AUTO_UNROLL_BLOCKS blocks and scans a longer one, counted in blocks:
  the paired backward takes two a step. Four blocks of one chunk under
  recompute_states "paired": the forward's loop takes three blocks, the
  backward's one step of two. A cap of 3 unrolls both, 2 scans the
  forward's alone, 1 both (counting the backward's steps instead of its
  blocks would unroll it)."""
  inputs = make_inputs(23, 256, b=1, hk=1, hv=1, dk=16, dv=16)
  args = [inputs[n] for n in NAMES]
  bs = BlockSizes.from_spec(
      "recompute_states=paired/fwd_block=64/bwd_block=64", "gpu")
  assert bs.block_loop == "auto"

  def loss(*a):
    o, st = pallas_gdr.gated_delta_rule_pallas(
        *a, block_sizes=bs, interpret=True, backend="gpu")
    return jnp.sum(o) + jnp.sum(st)

  def loops(cap):
    monkeypatch.setattr(block_sizes, "AUTO_UNROLL_BLOCKS", cap)
    return sum(e.primitive.name in ("scan", "while")
               for e in _eqns(jax.grad(loss, argnums=tuple(range(6))),
                              *args))

  assert [loops(cap) for cap in (3, 2, 1)] == [0, 1, 2]


def test_recomputed_states_lower_for_cuda():
  """recompute_states with blocks of two chunks (300 tokens, 320 padded:
  2, 2 and 1 chunks): prep (with P) and state_out per forward block (no
  states written), and per backward block prep, state_fwd (the block's
  states again), bwd_pdo, state_bwd, bwd_out and wy; loops for both
  (block_loop "scan")."""
  text = _grad_lowered_for_cuda(BlockSizes.from_spec(
      "recompute_states=True/fwd_block=128/bwd_block=128/block_loop=scan",
      "gpu"), t=300, d=128)
  assert text.count(_CUSTOM_CALLS["cuda"]) == 3 * 2 + 2 * 6
  assert text.count("stablehlo.while") == 2
  for name in ("state_out", "state_fwd", "bwd_pdo"):
    assert f'"gated_delta_rule_{name}"' in text, name
  assert '"gated_delta_rule_bwd_local"' not in text


def test_paired_recomputed_states_lower_for_cuda():
  """recompute_states "paired" in blocks of one chunk (300 tokens, 320
  padded: 5 blocks): the forward as above (block 0, then a loop). The
  backward runs the last block's prep and state_fwd alone, then per block
  bwd_pdo, the prep of the block before, one state_pair (this block's
  state_bwd, the one before's state_fwd), bwd_out and wy: block 4, block
  3 (an odd one out), then blocks 2 and 1 in a loop of two blocks a step
  (block_loop "scan"); and for block 0 bwd_pdo, state_bwd, bwd_out and
  wy."""
  text = _grad_lowered_for_cuda(BlockSizes.from_spec(
      "recompute_states=paired/fwd_block=64/bwd_block=64/block_loop=scan",
      "gpu"), t=300, d=128)
  assert text.count(_CUSTOM_CALLS["cuda"]) == 2 * 2 + 2 + 5 * 4 + 4
  assert text.count("stablehlo.while") == 2
  assert text.count('"gated_delta_rule_state_pair"') == 4
  assert text.count('"gated_delta_rule_state_fwd"') == 1
  assert text.count('"gated_delta_rule_state_bwd"') == 1
  assert text.count("stablehlo.optimization_barrier") == 2 + 2 + 3


def test_output_in_state_lowers_for_cuda():
  """With output_in_state the inference forward and the custom_vjp forward
  are two pallas_calls each (prep with P, state_out) and the backward
  five; no state_fwd or output kernel is left."""
  if jax.default_backend() != "cpu":
    pytest.skip("lowering smoke test for CPU-only machines")
  bs = dataclasses.replace(BlockSizes.get_default("gpu"),
                           output_in_state=True)
  inputs = make_inputs(2, 130, dtype=jnp.bfloat16, with_segments=True,
                       hk=1, hv=2, dk=128, dv=128)
  seg = inputs.pop("segment_ids")

  def fwd(*args):
    return pallas_gdr.gated_delta_rule_pallas(
        *args, segment_ids=seg, backend="gpu", block_sizes=bs)

  def infer_and_grads(*args):
    loss = lambda *a: jnp.sum(fwd(*a)[0].astype(jnp.float32))
    return fwd(*args), jax.grad(loss, argnums=tuple(range(6)))(*args)

  with _abstract_target("cuda"):
    text = jax.jit(infer_and_grads).trace(
        *[inputs[n] for n in NAMES]).lower(
            lowering_platforms=("cuda",)).as_text()
  assert text.count(_CUSTOM_CALLS["cuda"]) == 2 + 2 + 5
  assert text.count("gated_delta_rule_state_out") >= 2
  for absent in ("gated_delta_rule_state_fwd", "gated_delta_rule_output"):
    assert absent not in text, absent


@pytest.mark.parametrize("with_segments", [False, True])
def test_blocked_solve_matches_row_by_row(with_segments):
  """The prep kernel's blocked solve, and its sub-chunks (two and four
  diagonal blocks), give the row-by-row T, w, u and decays."""
  inputs = make_inputs(7, 150, with_segments=with_segments, b=1, hk=1, hv=2,
                       dk=16, dv=32)
  outs = {}
  variants = [(None, None), (1, None), (8, None), (16, None), (None, 32),
              (1, 32), (4, 16), (1, 16)]
  for solve_block, sub_chunk in variants:
    bs = BlockSizes(solve_block=solve_block, sub_chunk=sub_chunk)
    cfg = pallas_gdr._Config(  # pylint: disable=protected-access
        scale=0.25, group=2, block_sizes=bs, backend="cpu", interpret=True,
        has_segments=with_segments)
    q, k, v, sc = pallas_gdr._padded_inputs(  # pylint: disable=protected-access
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
        inputs["segment_ids"], bs.chunk_size, 0, 0, token_major=True)
    plan = pallas_split._Plan(q, k, v, cfg, pallas_gdr._SQ)  # pylint: disable=protected-access
    outs[solve_block, sub_chunk] = pallas_split._prep(  # pylint: disable=protected-access
        plan, k, v, sc, with_t=True)
  for variant in variants[1:]:
    for name, got, want in zip(("w", "u", "aux", "T"), outs[variant],
                               outs[None, None]):
      tolerances.assert_close(
          got, want, jnp.float32,
          err_msg=f"{name}, (solve_block, sub_chunk)={variant}")
