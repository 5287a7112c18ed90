"""Tiling choices of the Pallas gated delta rule kernels: `BlockSizes`.

`BlockSizes` is frozen (hashable), so it can be a static argument of `jit`
and of the kernels' `custom_vjp`. Its fields are checked here and parsed
from spec strings; the tuned values per backend (`get_default`), the
presets and the tuned constants are the table in `tuned_block_sizes`.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax

from jax import lax

from pallas_kernels.gated_delta_rule import tuned_block_sizes

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

# How the work is split into kernels:
#   "split": state-independent work (decays, the UT / WY solve, outputs,
#     most gradients) in kernels parallel over chunks; the sequential pass
#     only carries the state (kernel_split.py). GPU default. Needs
#     chunk_loop "kernel".
#   "fused": one forward and one backward kernel that do all of a chunk's
#     work inside the sequential pass (kernel.py). TPU default (with
#     chunk_loop "grid"); on GPU kept for comparison.
KERNELS = ("split", "fused")

# How the split forward and backward in blocks (`fwd_block`, `bwd_block`)
# step from block to block:
#   "scan": the whole blocks after the first (forward) or before the last
#     (backward) in a `lax.scan`: one copy of a block's kernels in the
#     program, a loop on the device.
#   "unroll": a Python loop, each block's kernels written out in the
#     program: no loop on the device (where XLA's loop costs a step, it is
#     gone), and more to compile for many blocks.
#   "auto" (the default): "unroll" when the loop takes at most
#     `AUTO_UNROLL_BLOCKS` blocks, else "scan": the cap keeps the program
#     (and its compile) from growing with long sequences in short blocks.
BLOCK_LOOPS = ("auto", "scan", "unroll")
AUTO_UNROLL_BLOCKS = tuned_block_sizes.AUTO_UNROLL_BLOCKS

# How the split kernels compute f32 x f32 products (`BlockSizes.f32_dot`).
# "highest" is IEEE f32; on Triton that is a dot on the CUDA cores, not the
# tensor cores, and over ten times slower (docs/measurements/
# 2026-11-26-h100-fb7591c/tuning_notes.md). "tf32x3" splits each operand
# into a TF32 high and low part and sums three tensor-core products:
# about f32 accuracy. The bf16 splits are the same idea with bf16 parts
# (x3: ~16 bits, x6: ~24 bits); "bf16" rounds both operands to bf16 once
# (flash-linear-attention's precision for T, w, u).
F32_ALGORITHMS = {
    "highest": lax.Precision.HIGHEST,
    "bf16": lax.DotAlgorithmPreset.BF16_BF16_F32,
    "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    "bf16x6": lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
}
# Accepted values of `f32_dot`. "auto" resolves per call in `pallas_split`:
# "bf16x3" when q, k, v are bf16 (the stored tensors then enter their
# products in bf16 anyway), "tf32x3" when they are f32.
F32_DOTS = ("auto",) + tuple(F32_ALGORITHMS)

# The split family's kernels, as `BlockSizes.kernel_warps` names them (the
# pallas_call names without the "gated_delta_rule_" / "bwd_" prefixes).
# "prep" is the forward's prep (w, u, decays) and the backward's (with T);
# "prep_out" the forward's prep that also writes P for state_out;
# "bwd_pdo" the backward's P^T dO alone (`recompute_states`);
# "state_pair" one block's state_bwd and the block before it's state_fwd
# in one launch (`recompute_states="paired"`).
SPLIT_KERNELS = ("prep", "prep_out", "state_fwd", "output", "state_out",
                 "bwd_local", "bwd_pdo", "state_bwd", "state_pair",
                 "bwd_out", "wy")


def _bool_or(field: str, value, word: str) -> None:
  """Checks a field that takes True, False or one string."""
  if not (isinstance(value, bool) or value == word):
    raise ValueError(f"{field}: expected True, False or {word!r}, found "
                     f"{value!r}")


# The int fields of `BlockSizes`; those that also take None (and block_dv,
# which also takes "auto", checked on its own).
_INT_FIELDS = ("chunk_size", "num_warps", "num_stages", "num_warps_intra",
               "state_stride")
_OPTIONAL_INT_FIELDS = ("solve_block", "sub_chunk", "wy_block", "out_block",
                        "bwd_block", "fwd_block", "bwd_block_dv")


def _is_int(value) -> bool:
  """A real integer: int or a numpy integer, not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _power_of_two(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def _per_kernel(field: str, value, what: str, ok) -> tuple:
  """A `kernel_warps` / `kernel_stages` value (pairs, or a string
  "name:n,name:n" with "+" also separating) as sorted (name, n) pairs,
  each name from `SPLIT_KERNELS`, each n with ok(n) (`what` says how)."""
  pairs = value
  if isinstance(pairs, str):
    try:
      pairs = tuple((name, int(n)) for name, n in
                    (item.split(":") for item in
                     pairs.replace("+", ",").split(",") if item))
    except ValueError as e:
      raise ValueError(f"{field}: expected 'name:n,...', found "
                       f"{value!r}") from e
  pairs = tuple(sorted((str(name), int(n)) for name, n in pairs))
  for name, n in pairs:
    if name not in SPLIT_KERNELS or not ok(n):
      raise ValueError(f"{field}: expected kernel names from "
                       f"{SPLIT_KERNELS} with {what}, found {name}:{n}")
  return pairs


def target_backend() -> str:
  """The backend a program is being built for: the platform ("gpu" or
  "tpu") of the abstract device of the current abstract mesh, where the
  caller names one (`jax.sharding.use_abstract_mesh` with an
  `AbstractDevice`: jax's way to compile for hardware that is not here,
  as `pallas_kernels.tools.tpu_compile` does), else
  `jax.default_backend()`."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  platform = getattr(device, "platform", None)
  return platform if platform in ("gpu", "tpu") else jax.default_backend()


# The fused kernels' state tile on a TPU: at most this many elements
# (dk x block_dv); see `tuned_block_sizes.TPU_STATE_TILE`.
TPU_STATE_TILE = tuned_block_sizes.TPU_STATE_TILE


def tpu_padded_dv(dk: int, dv: int) -> int:
  """The value dim the fused TPU kernels take under block_dv "auto": dv,
  or, when the whole [dk, dv] state exceeds `TPU_STATE_TILE` and dv is
  not a multiple of 128 (Mosaic's lane width: a tile must be one, or all
  of dv), dv zero-padded up to one so that it can be tiled."""
  if dk * dv <= TPU_STATE_TILE or dv % 128 == 0:
    return dv
  return -(-dv // 128) * 128


def tpu_value_tile(dk: int, dv: int) -> int | None:
  """block_dv "auto" for a (padded: `tpu_padded_dv`) value dim dv: None
  (all of dv) when the whole [dk, dv] state fits `TPU_STATE_TILE` or dv
  is not a multiple of 128; else the largest multiple of 128 dividing dv
  whose [dk, tile] fits, and 128 at least."""
  if dk * dv <= TPU_STATE_TILE or dv % 128:
    return None
  tiles = [t for t in range(128, dv, 128) if dv % t == 0]
  fitting = [t for t in tiles if dk * t <= TPU_STATE_TILE]
  return max(fitting) if fitting else 128


# Named tilings, usable as items of a spec string (`BlockSizes.parse_spec`):
# `tuned_block_sizes.PRESETS`. "lean" keeps no per-chunk states (the
# backward recomputes them in blocks of 4096 tokens, each block's
# recomputation in one launch beside the block after it; the forward in
# blocks of 16384). Needs the split kernels (the GPU's; not the TPU's
# fused ones).
PRESETS = tuned_block_sizes.PRESETS


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the chunked gated delta rule kernels.

  The int fields take ints (numpy integers too, stored as int; not bools
  or strings): a ValueError names the field otherwise.

  Attributes:
    chunk_size: tokens per chunk (the UT/WY transform size). 64 matches the
      reference and FLA; must be a multiple of 8 (16 on GPU).
    block_dv: value-dim tile of the state, or None for all of dv. Each tile
      is an independent program (more parallelism, the intra-chunk solve is
      recomputed per tile); the backward sums the tiles' partial gradients.
      "auto" (the TPU default): `tpu_value_tile`, all of dv unless the
      state is too large for the fused kernels' scoped VMEM.
    bwd_block_dv: None, or the value-dim tile of the split backward's
      sequential kernels (state_bwd, the recomputing state_fwd and their
      pair) in place of block_dv, which then tiles the forward's only.
      Each program reads its head's whole q, k and w for its tile, so a
      wider tile reads them fewer times (the pair of `recompute_states`
      "paired" may be bound by those reads: docs/kernels.md) for fewer
      programs.
    chunk_loop: "kernel" or "grid", see `CHUNK_LOOPS`.
    num_warps: Triton warps per program (GPU only), a power of two; for
      "split", of the sequential kernels.
    num_stages: Triton pipelining stages (GPU only), at least 1.
    kernels: "split" or "fused", see `KERNELS`. block_dv tiles the
      sequential kernels of "split"; its parallel kernels take all of dv.
    num_warps_intra: Triton warps of the parallel kernels of "split", a
      power of two.
    solve_block: None, or a divisor of chunk_size: "split" then inverts
      the chunk's triangular matrix in blocks
      (`kernel.block_unit_lower_inverse`): forward substitution on the
      diagonal blocks of this many tokens, all at once, then merging pairs
      of blocks by [c, c] products until they cover the chunk; 1 merges
      from single tokens (products only). None: row by row over the whole
      chunk. With sub_chunk, the same inside each diagonal block of
      sub_chunk tokens (clipped to sub_chunk).
    sub_chunk: None, or a divisor of chunk_size (at least 16 on GPU): the
      split family's prep kernel takes the chunk in sub-chunks of this many
      tokens and forms only the blocks of k k^T, T and T x on and below
      the diagonal (`kernel_split._prep_sub_chunks`), instead of
      full-tile products that are zero above it.
    f32_dot: how the split kernels multiply f32 matrices (T, w, u and
      their gradients; everything when the inputs are f32): "highest"
      (IEEE f32, on Triton the CUDA cores), "tf32x3" (three TF32
      tensor-core products, about f32 accuracy), "bf16x3", "bf16x6",
      "bf16" (one bf16 product, flash-linear-attention's precision) or
      "auto" (bf16x3 for bf16 inputs, tf32x3 for f32 inputs).
      Interpret mode always computes IEEE f32 (the CPU has no TF32).
    wy_block: None, or a column width: the split backward's wy kernel
      (the gradients through the WY form) takes dk this many columns at a
      time (all of dk when it does not divide it) instead of whole.
    out_block: None, or a column width: the split backward's bwd_out
      kernel takes dk (the rows of the [dk, dv] states) this many columns
      at a time instead of whole.
    kernel_warps: Triton warps of single split kernels, overriding
      num_warps / num_warps_intra: pairs (name from `SPLIT_KERNELS`,
      warps), or a string "bwd_out:8,wy:8" ("+" also separates, for
      command-line lists: "bwd_out:8+wy:8").
    kernel_stages: Triton pipelining stages of single split kernels,
      overriding num_stages, as kernel_warps names them ("state_bwd:2").
      What they change is the sequential kernels' loop over chunks: each
      stage is one more chunk's loads in flight, and shared memory.
    output_in_state: True: the split forward forms each chunk's output
      inside the sequential pass (one `state_out` kernel in place of
      state_fwd and output): v' and the entering states stay in
      registers, an inference forward writes no per-chunk states at all,
      and prep also writes the intra-chunk attention (q k^T) * Gamma for
      the loop to read ("prep_out"). False: state_fwd writes v' and the
      states, and the parallel output kernel reads them back.
      "inference": True for a forward that is not differentiated (the
      custom_vjp's primal: no per-chunk states kept), False for the
      forward under autodiff, whose states the backward reads
      (`state_out_for`). The fused kernels' forward forms the output in
      its loop anyway, so they take True only from split and ignore
      "inference".
    bwd_block: None, or a multiple of chunk_size: the split backward takes
      the sequence in blocks of this many tokens, last to first (stepped
      as `block_loop` says), so its intermediates (T, w, u, v', dv', the state
      cotangents, the dk partial) exist for one block at a time beside the
      stored per-chunk states. None: the whole sequence at once.
    fwd_block: None, or a multiple of chunk_size: the split forward takes
      the sequence in blocks of this many tokens, first to last, the state
      handed from block to block, so that w, u, v' (or P) and the decays
      exist for one block at a time; o and the stored states are written
      into whole arrays in place. None: the whole sequence at once.
    state_stride: 1, or 2: the split forward stores the state entering
      every other chunk (the even ones) for the backward, which forms each
      odd chunk's from the even one before it (one step of the recurrence,
      in its parallel bwd_local kernel), for the backward's block only:
      half the stored states, for one more product pair per odd chunk.
      Needs output_in_state=True (the three-kernel forward's output
      kernel reads every chunk's state), and fwd_block / bwd_block of
      whole pairs of chunks.
    block_loop: "auto", "scan" or "unroll", see `BLOCK_LOOPS`: how
      fwd_block and bwd_block step from block to block; the same kernels
      either way.
    recompute_states: False, or True: the forward under autodiff stores
      no per-chunk states, only the state entering each block of
      bwd_block tokens (f32, one [dk, dv] per block and head), and the
      backward recomputes each block's per-chunk states with the
      sequential forward kernel (state_fwd, which also gives v') from it
      before its own kernels; its parallel bwd_local then forms P^T dO
      alone ("bwd_pdo"). One more sequential pass in the backward for
      no stored states: with blocks, what the rule holds is one block's
      intermediates. Needs state_stride 1, and fwd_block None or a
      multiple of bwd_block (the forward's sequential pass, `state_out`,
      writes the state entering each backward block as it passes it;
      with output_in_state False the three-kernel forward's blocks hand
      them on instead, so there fwd_block == bwd_block).
      "paired": the same, with the recomputation of each block's states
      run beside the backward pass of the block after it: blocks j and
      j - 1 are independent there (j's state cotangent pass needs its own
      states, j - 1's states only the state entering j - 1), so one
      launch, "state_pair", runs block j's state_bwd and block j - 1's
      state_fwd as twice the programs of either (one more block's
      intermediates alive).
  """
  chunk_size: int = 64
  block_dv: int | None = None
  bwd_block_dv: int | None = None
  chunk_loop: str = "kernel"
  num_warps: int = 4
  num_stages: int = 1
  kernels: str = "split"
  num_warps_intra: int = 4
  solve_block: int | None = None
  sub_chunk: int | None = None
  f32_dot: str = "highest"
  wy_block: int | None = None
  out_block: int | None = None
  kernel_warps: tuple[tuple[str, int], ...] = ()
  kernel_stages: tuple[tuple[str, int], ...] = ()
  output_in_state: bool | str = False
  bwd_block: int | None = None
  fwd_block: int | None = None
  state_stride: int = 1
  recompute_states: bool | str = False
  block_loop: str = "auto"

  def __post_init__(self):
    # Types first (a spec's unparsed value stays a string; True is an int
    # to Python); numpy integers become ints.
    for name in _INT_FIELDS + _OPTIONAL_INT_FIELDS:
      value = getattr(self, name)
      if value is None and name in _OPTIONAL_INT_FIELDS:
        continue
      if not _is_int(value):
        none = " or None" if name in _OPTIONAL_INT_FIELDS else ""
        raise ValueError(f"{name}: expected an int{none}, found {value!r}")
      object.__setattr__(self, name, int(value))
    if _is_int(self.block_dv):
      object.__setattr__(self, "block_dv", int(self.block_dv))
    for name in ("num_warps", "num_warps_intra"):
      if not _power_of_two(getattr(self, name)):
        raise ValueError(f"{name}: expected a power-of-two number of warps "
                         f"(1, 2, 4, 8, ...), found {getattr(self, name)}")
    if self.num_stages < 1:
      raise ValueError(f"num_stages: expected a positive int, found "
                       f"{self.num_stages}")
    object.__setattr__(self, "kernel_warps", _per_kernel(
        "kernel_warps", self.kernel_warps, "a power-of-two number of warps",
        _power_of_two))
    object.__setattr__(self, "kernel_stages", _per_kernel(
        "kernel_stages", self.kernel_stages, "a positive number of stages",
        lambda n: n >= 1))
    if self.chunk_size < 1 or self.chunk_size % 8:
      raise ValueError(f"chunk_size: expected a positive multiple of 8, "
                       f"found {self.chunk_size}")
    if self.block_dv not in (None, "auto") and not (
        _is_int(self.block_dv) and self.block_dv >= 1):
      raise ValueError(f"block_dv: expected a positive int, None or "
                       f"'auto', found {self.block_dv!r}")
    if self.chunk_loop not in CHUNK_LOOPS:
      raise ValueError(f"chunk_loop: expected one of {CHUNK_LOOPS}, found "
                       f"{self.chunk_loop!r}")
    if self.kernels not in KERNELS:
      raise ValueError(f"kernels: expected one of {KERNELS}, found "
                       f"{self.kernels!r}")
    if self.solve_block is not None and (
        self.solve_block < 1 or self.chunk_size % self.solve_block):
      raise ValueError(f"solve_block: expected None or a divisor of "
                       f"chunk_size={self.chunk_size}, found "
                       f"{self.solve_block}")
    if self.sub_chunk is not None and (
        self.sub_chunk < 1 or self.chunk_size % self.sub_chunk):
      raise ValueError(f"sub_chunk: expected None or a divisor of "
                       f"chunk_size={self.chunk_size}, found "
                       f"{self.sub_chunk}")
    if self.f32_dot not in F32_DOTS:
      raise ValueError(f"f32_dot: expected one of {F32_DOTS}, found "
                       f"{self.f32_dot!r}")
    for name in ("wy_block", "out_block", "bwd_block_dv"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name}: expected a positive int or None, found "
                         f"{value}")
    if self.bwd_block_dv is not None and self.kernels != "split":
      raise ValueError(f"bwd_block_dv: only the split backward has "
                       f"sequential kernels of its own to tile; found "
                       f"kernels={self.kernels!r}")
    _bool_or("output_in_state", self.output_in_state, "inference")
    if self.output_in_state is True and self.kernels != "split":
      raise ValueError(f"output_in_state: only the split kernels have a "
                       f"separate output kernel to fold into their "
                       f"sequential pass; found kernels={self.kernels!r}")
    for name, what in (("fwd_block", "forward"), ("bwd_block", "backward")):
      block = getattr(self, name)
      if block is not None and (not isinstance(block, int)
                                or block < self.chunk_size
                                or block % self.chunk_size):
        raise ValueError(f"{name}: expected None or a positive multiple of "
                         f"chunk_size={self.chunk_size}, found {block!r}")
      if block is not None and self.kernels != "split":
        raise ValueError(f"{name}: only the split {what} is taken in "
                         f"blocks; found kernels={self.kernels!r}")
    if self.state_stride not in (1, 2):
      raise ValueError(f"state_stride: expected 1 or 2, found "
                       f"{self.state_stride!r}")
    if self.state_stride == 2:
      if self.kernels != "split" or self.output_in_state is not True:
        raise ValueError(
            "state_stride: 2 needs kernels='split' with output_in_state=True "
            "(the three-kernel forward's output kernel reads every chunk's "
            f"state); found kernels={self.kernels!r}, output_in_state="
            f"{self.output_in_state!r}")
      for name in ("fwd_block", "bwd_block"):
        block = getattr(self, name)
        if block is not None and block % (2 * self.chunk_size):
          raise ValueError(
              f"{name}: with state_stride=2 blocks hold whole pairs of "
              f"chunks (a multiple of {2 * self.chunk_size}); found {block}")
    if self.block_loop not in BLOCK_LOOPS:
      raise ValueError(f"block_loop: expected one of {BLOCK_LOOPS}, found "
                       f"{self.block_loop!r}")
    _bool_or("recompute_states", self.recompute_states, "paired")
    if self.recompute_states and (
        self.kernels != "split" or self.bwd_block is None
        or self.state_stride != 1):
      raise ValueError(
          "recompute_states: needs kernels='split' with a bwd_block (the "
          "backward recomputes each block's states from the state entering "
          "it) and state_stride=1; found kernels="
          f"{self.kernels!r}, bwd_block={self.bwd_block!r}, state_stride="
          f"{self.state_stride!r}")
    if self.recompute_states and self.fwd_block != self.bwd_block:
      if self.state_out_for(False):
        if self.fwd_block is not None and self.fwd_block % self.bwd_block:
          raise ValueError(
              "recompute_states: fwd_block must be None or a multiple of "
              "bwd_block (the forward's sequential pass writes the state "
              "entering each backward block; a forward block starts on "
              f"one); found fwd_block={self.fwd_block}, bwd_block="
              f"{self.bwd_block}")
      else:
        raise ValueError(
            "recompute_states: with output_in_state=False (the three-kernel "
            "forward, whose blocks hand on the state entering each backward "
            "block) fwd_block must equal bwd_block; found fwd_block="
            f"{self.fwd_block!r}, bwd_block={self.bwd_block!r}")
    if self.kernels == "split" and self.chunk_loop != "kernel":
      raise ValueError("kernels: 'split' loops over chunks inside its "
                       "sequential kernels (chunk_loop='kernel'); found "
                       f"chunk_loop={self.chunk_loop!r}. Use kernels="
                       "'fused' for the 'grid' driver")

  @classmethod
  def get_default(cls, backend: str) -> "BlockSizes":
    """Defaults for `backend` ("gpu", "tpu" or "cpu" for interpret mode):
    its row of `tuned_block_sizes.DEFAULTS` over the dataclass defaults
    (which any other backend gets)."""
    return cls(**tuned_block_sizes.DEFAULTS.get(backend, {}))

  @classmethod
  def parse_spec(cls, spec: str) -> dict:
    """'kernels=fused/block_dv=64' ('/'-separated field=value pairs; ""
    for none) -> {field: value}. Integers, None, True and False are
    parsed; other values stay strings. An item that is a name from
    `PRESETS` stands for its fields ("lean/bwd_block=2048": the lean
    preset with blocks of 2048; later items win)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for item in filter(None, spec.split("/")):
      if item in PRESETS:
        changes.update(cls.parse_spec(PRESETS[item]))
        continue
      name, sep, value = item.partition("=")
      if not sep or name not in fields:
        raise ValueError(f"BlockSizes spec {spec!r}: expected field=value "
                         f"pairs with fields from {sorted(fields)}, or a "
                         f"preset from {sorted(PRESETS)}, found {item!r}")
      changes[name] = ({"None": None, "True": True, "False": False}[value]
                       if value in ("None", "True", "False") else
                       int(value) if value.lstrip("-").isdigit() else value)
    return changes

  @classmethod
  def from_spec(cls, spec: str, backend: str) -> "BlockSizes":
    """`backend`'s defaults with the fields of `spec` (`parse_spec`)
    replaced."""
    return dataclasses.replace(cls.get_default(backend),
                               **cls.parse_spec(spec))

  def state_out_for(self, store_states: bool) -> bool:
    """Whether a split forward that keeps its per-chunk states for the
    backward (`store_states`, the forward under autodiff) or not (an
    inference forward) forms the output inside the sequential pass."""
    if self.output_in_state == "inference":
      return not store_states
    return bool(self.output_in_state)

  def warps(self, kernel: str, parallel: bool) -> int:
    """Triton warps of split kernel `kernel` (a `SPLIT_KERNELS` name)."""
    default = self.num_warps_intra if parallel else self.num_warps
    if kernel == "bwd_local" and self.state_stride > 1:
      # It also forms a whole [dk, dv] f32 state (odd chunks): compiled
      # for sm_90 at D = 128, in 4 warps ptxas spills 236 bytes a thread,
      # in 8 none (236 registers).
      default *= 2
    return dict(self.kernel_warps).get(kernel, default)

  def stages(self, kernel: str) -> int:
    """Triton pipelining stages of split kernel `kernel`."""
    default = self.num_stages
    if kernel == "state_pair":
      # Twice the programs of state_bwd, so they must fit two an SM:
      # compiled for sm_90 at D = 128 in value tiles of 16 (the two
      # passes share their shared memory), it takes 160 KiB in 3 stages
      # (one program an SM: 256 programs at 32k tokens and 16 heads run
      # in two waves) and 107 KiB in 2 (two an SM, one wave).
      default = min(default, 2)
    return dict(self.kernel_stages).get(kernel, default)

  def for_dims(self, dk: int, dv: int) -> "BlockSizes":
    """These tiles for key and value dims dk, dv: block_dv "auto"
    resolved (`tpu_value_tile`), the rest as they are."""
    if self.block_dv != "auto":
      return self
    return dataclasses.replace(self, block_dv=tpu_value_tile(dk, dv))

  def dv_tile(self, dv: int, backward: bool = False) -> int:
    """The value-dim tile actually used for a value dim `dv` (`backward`:
    by the split backward's sequential kernels, `bwd_block_dv`)."""
    name, tile = "block_dv", self.block_dv
    if backward and self.bwd_block_dv is not None:
      name, tile = "bwd_block_dv", self.bwd_block_dv
    if tile == "auto":
      raise ValueError("block_dv: 'auto' is resolved for the head dims "
                       "first (BlockSizes.for_dims)")
    if tile is None or tile >= dv:
      return dv
    if dv % tile:
      raise ValueError(f"{name}: expected a divisor of dv={dv}, found "
                       f"{tile}")
    return tile
