"""What each Pallas Triton kernel asks of a Hopper SM, without a GPU.

Lowers the split (or fused) gated delta rule for CUDA on this machine,
forward and backward, takes the Triton IR that Pallas serialises into each
`__gpu$xla.gpu.triton` custom call, and compiles it for sm_90 with the
`triton` Python package (its bundled `ptxas`). For each kernel it prints
registers per thread, bytes spilled to local memory, shared memory, the
thread blocks one SM can hold (registers, shared memory and the 64-warp
limit), and how many waves the grid makes on 132 SMs. With `--memory` it
also estimates the forward+backward's peak of temporaries, from the
order of the program's jaxpr (`live_temporaries`), has XLA count them
(`xla_temporaries`: the host compiler's buffer assignment of the program
lowered for CUDA, which gave the H100's measured numbers), and gives
each kernel's HBM traffic floor: the bytes of its input and output
arrays at `HBM_BYTES_PER_S` (`kernel_traffic`).

No GPU is needed: this is what a machine without one can learn about a
tiling. It is not a timing, and it is an approximation of what runs: on a
GPU, XLA compiles the same IR with the Triton it bundles, whose passes
(layouts, software pipelining) may differ from the Python package's. Spills
and register-limited occupancy are what it is for.

  pip install triton==3.6.0   # the Triton of the H100/H200 machine
  python -m pallas_kernels.tools.triton_resources --seq_len 32768 \
      --variants "wy_block=None/out_block=None,num_warps_intra=8"

Variants are '/'-separated BlockSizes field=value pairs over the GPU
defaults, as in bench_gated_delta_rule's --pallas_variants.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
import time

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import pallas_gdr
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes

# Hopper (sm_90) per-SM limits, from NVIDIA's CUDA C programming guide
# (compute capability 9.0) and the H100/H200 SM count.
SM_COUNT = 132
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256        # registers are allocated per warp in these units
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024

TRITON_CALL = "__gpu$xla.gpu.triton"
# Lowering without the hardware: the Triton lowering asks for the GPU's
# compute capability (jax >= 0.11 raises "No supported GPU devices found"
# without a GPU or an abstract one) and the Mosaic lowering for the TPU
# generation. Both read it from the abstract device of the current abstract
# mesh, public API in jax 0.10 and 0.11.
ABSTRACT_DEVICES = {
    "cuda": dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                 platform="gpu"),
    "tpu": dict(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
}


def abstract_target(platform: str = "cuda", **device):
  """A context under which lowering targets an abstract H100 ("cuda") or
  TPU v5e ("tpu"), with no such hardware here; `device` replaces fields
  of that abstract device (another TPU's device_kind and num_cores).

  Raises RuntimeError when this jax cannot name one without the hardware.
  """
  sharding = jax.sharding
  if not (hasattr(sharding, "AbstractDevice")
          and hasattr(sharding, "use_abstract_mesh")):
    raise RuntimeError(f"jax {jax.__version__} has no "
                       f"jax.sharding.AbstractDevice: cannot name a "
                       f"{platform} target without the hardware")
  device = sharding.AbstractDevice(**{**ABSTRACT_DEVICES[platform],
                                      **device})
  try:
    mesh = sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  except TypeError as e:
    raise RuntimeError(f"jax {jax.__version__}: AbstractMesh takes no "
                       f"abstract_device ({e}): cannot name a {platform} "
                       f"target") from e
  return sharding.use_abstract_mesh(mesh)


@dataclasses.dataclass
class TritonKernel:
  """One Pallas Triton kernel as lowered: its IR and launch parameters."""
  name: str
  num_warps: int
  num_stages: int
  grid: tuple[int, int, int]
  ir_bytecode: bytes

  @property
  def programs(self) -> int:
    return math.prod(self.grid)


def rule_args(batch: int, seq_len: int, key_heads: int, heads: int, dk: int,
              dv: int, dtype, segments: bool = False,
              initial_state: bool = False) -> tuple:
  """The gated delta rule's inputs as ShapeDtypeStructs: q, k, v, g,
  beta, the initial state (or None), segment ids (or None)."""
  sds = jax.ShapeDtypeStruct
  return (sds((batch, seq_len, key_heads, dk), dtype),
          sds((batch, seq_len, key_heads, dk), dtype),
          sds((batch, seq_len, heads, dv), dtype),
          sds((batch, seq_len, heads), jnp.float32),
          sds((batch, seq_len, heads), jnp.float32),
          sds((batch, heads, dk, dv), jnp.float32) if initial_state else None,
          sds((batch, seq_len), jnp.int32) if segments else None)


def _abstract_args(batch, seq_len, key_heads, heads, dk, dv, dtype, segments):
  """`rule_args` without the initial state: q, k, v, g, beta, segment ids
  (or None)."""
  *inputs, _, segment_ids = rule_args(batch, seq_len, key_heads, heads, dk,
                                      dv, dtype, segments)
  return (*inputs, segment_ids)


def _forward(blocks: BlockSizes):
  def forward(q, k, v, g, beta, segment_ids):
    return pallas_gdr.gated_delta_rule_pallas(
        q, k, v, g, beta, None, segment_ids=segment_ids, backend="gpu",
        block_sizes=blocks)
  return forward


def as_operation(forward, n_diff: int = 5):
  """The forward+backward of `forward` as one operation, as a training step
  runs it: `op(*inputs, do, dst) -> ((o, final_state), gradients of the
  first n_diff inputs)`, the cotangents of o and the final state taken as
  arguments and the output returned, so that XLA keeps every kernel that
  forms o and counts as temporaries only what the rule holds beyond its
  inputs and outputs. Inputs after the first n_diff (segment ids) are
  passed through, not differentiated."""
  def op(*args):
    *inputs, do, dst = args
    diff, rest = inputs[:n_diff], inputs[n_diff:]
    out, vjp = jax.vjp(lambda *a: forward(*a, *rest), *diff)
    return out, vjp((do, dst))
  return op


def _loss(blocks: BlockSizes):
  forward = _forward(blocks)

  def loss(*args):
    o, s = forward(*args)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
  return loss


def _flat_eqns(closed):
  """([(input vars, output vars, eqn)], result vars) of a closed jaxpr,
  with sub-jaxprs (jit, custom_vjp) inlined; pallas_calls stay whole."""
  from jax.extend import core as jcore  # pylint: disable=g-import-not-at-top

  def inline(jaxpr, env):
    def name(x):
      return env.get(x, x) if isinstance(x, jcore.Var) else x
    for eqn in jaxpr.eqns:
      sub = next((eqn.params[key] for key in ("jaxpr", "call_jaxpr",
                                              "fun_jaxpr")
                  if key in eqn.params), None)
      if eqn.primitive.name == "optimization_barrier":
        # Moves no data: its outputs are its inputs.
        for inside, outside in zip(eqn.invars, eqn.outvars):
          env[outside] = name(inside)
      elif sub is not None and eqn.primitive.name != "pallas_call":
        sub = getattr(sub, "jaxpr", sub)
        inner = {a: name(b) for a, b in zip(sub.invars, eqn.invars)}
        yield from inline(sub, inner)
        for inside, outside in zip(sub.outvars, eqn.outvars):
          env[outside] = inner.get(inside, inside) if isinstance(
              inside, jcore.Var) else inside
      else:
        yield [name(x) for x in eqn.invars], list(eqn.outvars), eqn

  env = {}
  eqns = list(inline(closed.jaxpr, env))
  results = {env.get(x, x) for x in closed.jaxpr.outvars
             if isinstance(x, jcore.Var)}
  return eqns, results


def _nbytes(x) -> int:
  aval = getattr(x, "aval", None)
  return (math.prod(aval.shape) * aval.dtype.itemsize
          if hasattr(aval, "shape") else 0)


def live_temporaries(fn, *args) -> tuple[int, list[tuple[int, str]]]:
  """Peak bytes of arrays alive at once while `fn(*args)` runs, in the
  order of its jaxpr: each equation's outputs are allocated before its
  dead inputs are freed; the arguments are not counted (the caller owns
  them), the results stay to the end. Sub-jaxprs (jit, custom_vjp) are
  inlined. An estimate of what XLA reports as temporaries: XLA schedules
  and fuses on its own, but Pallas calls are neither fused nor reordered
  across their data dependencies. Returns (peak bytes, [(bytes, type)] of
  the arrays of 1 MiB or more alive at the peak, largest first)."""
  return _peak_of(*_flat_eqns(jax.make_jaxpr(fn)(*args)))


def _aliased_inputs(ins, eqn) -> list:
  """The inputs of a pallas_call equation that its outputs alias
  (`input_output_aliases`), else []."""
  if eqn.primitive.name != "pallas_call":
    return []
  return [ins[i] for i, _ in eqn.params.get("input_output_aliases", ())]


def _peak_of(eqns, results, count_results: bool = True
             ) -> tuple[int, list[tuple[int, str]]]:
  """`live_temporaries` of `_flat_eqns`' output; without `count_results`
  the program's results are not counted either (as XLA counts
  temporaries: the results are its outputs), nor the arrays written into
  them in place (a pallas_call input aliased to an output that is, or is
  written into, a result: the same buffer)."""
  from jax.extend import core as jcore  # pylint: disable=g-import-not-at-top
  last_use = {}
  for i, (ins, _, _) in enumerate(eqns):
    for x in ins:
      if isinstance(x, jcore.Var):
        last_use[x] = i

  outputs = set(results)
  for ins, outs, eqn in reversed(eqns):
    for i, o in (eqn.params.get("input_output_aliases", ())
                 if eqn.primitive.name == "pallas_call" else ()):
      if outs[o] in outputs and isinstance(ins[i], jcore.Var):
        outputs.add(ins[i])
  live, peak, at_peak = {}, 0, []
  for i, (ins, outs, eqn) in enumerate(eqns):
    # A pallas_call output aliased to an input that dies here takes over
    # its buffer (written in place, as the blocked backward's gradients).
    for x in _aliased_inputs(ins, eqn):
      if (isinstance(x, jcore.Var) and x in live and x not in results
          and last_use.get(x, -1) <= i):
        del live[x]
    for x in outs:
      if count_results or x not in outputs:
        live[x] = _nbytes(x)
    total = sum(live.values())
    if total > peak:
      peak = total
      at_peak = sorted(((n, str(x.aval)) for x, n in live.items()
                        if n >= 1 << 20), reverse=True)
    for x in ins + outs:
      if (isinstance(x, jcore.Var) and x in live and x not in results
          and last_use.get(x, -1) <= i):
        del live[x]
  return peak, at_peak


# The bandwidth of the traffic floor: a round figure below the H100 SXM's
# 3.35 TB/s HBM3 peak (NVIDIA's H100 datasheet), since a kernel that only
# streams its arrays does not reach the peak. Assumed, not measured here:
# the floor compares kernels with their own bytes, it predicts no time.
HBM_BYTES_PER_S = 2.5e12


def kernel_traffic(fn, *args) -> list[dict]:
  """Each pallas_call of `fn(*args)` in program order: its name, the
  bytes of its input arrays (read) and of its outputs (written), and the
  time those take at `HBM_BYTES_PER_S`. A floor, not a prediction:
  programs that read the same block (the sequential kernels' value tiles
  all read w, k, q) are counted once, as if L2 served the rest, and the
  XLA ops between kernels are left out. A kernel of the blocked backward
  (`BlockSizes.bwd_block`) reads only its block of the whole-sequence
  arrays it is given, but is counted with all of them, and its outputs
  as whole arrays: its floor is an overestimate."""
  return _traffic_of(_flat_eqns(jax.make_jaxpr(fn)(*args))[0])


def _traffic_of(eqns) -> list[dict]:
  """`kernel_traffic` of `_flat_eqns`' equations."""
  rows = []
  for ins, outs, eqn in eqns:
    if eqn.primitive.name != "pallas_call":
      continue
    name = str(eqn.params.get("name_and_src_info",
                              eqn.params.get("name", "?")))
    # An aliased input is the buffer an output is written into, not read.
    aliased = {id(x) for x in _aliased_inputs(ins, eqn)}
    read = sum(_nbytes(x) for x in ins if id(x) not in aliased)
    written = sum(_nbytes(x) for x in outs)
    rows.append(dict(kernel=name.split(" ")[0], read=read, written=written,
                     floor_ms=(read + written) / HBM_BYTES_PER_S * 1e3))
  return rows


def lowered_kernels(blocks: BlockSizes, batch: int, seq_len: int,
                    key_heads: int, heads: int, dk: int, dv: int,
                    dtype, segments: bool = False) -> list[TritonKernel]:
  """The Triton kernels of an inference forward, the autodiff forward and
  the backward, in lowering order, each distinct IR once."""
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top

  args = _abstract_args(batch, seq_len, key_heads, heads, dk, dv, dtype,
                        segments)
  forward, grad = _forward(blocks), jax.grad(_loss(blocks),
                                             argnums=tuple(range(5)))

  def both(*a):
    return forward(*a), grad(*a)

  with abstract_target("cuda"):
    lowered = jax.jit(both).trace(*args).lower(
        lowering_platforms=("cuda",))
  module = lowered.compiler_ir("stablehlo")

  found, seen = [], set()

  def visit(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          child = child.operation
          if (child.name == "stablehlo.custom_call" and
              ir.StringAttr(child.attributes["call_target_name"]).value
              == TRITON_CALL):
            config = ir.DictAttr(child.attributes["mhlo.backend_config"])
            get_int = lambda key: ir.IntegerAttr(config[key]).value  # pylint: disable=cell-var-from-loop
            code = ir.StringAttr(config["ir"]).value_bytes
            if code not in seen:
              seen.add(code)
              found.append(TritonKernel(
                  name=ir.StringAttr(config["name"]).value,
                  num_warps=get_int("num_warps"),
                  num_stages=get_int("num_stages"),
                  grid=(get_int("grid_x"), get_int("grid_y"),
                        get_int("grid_z")),
                  ir_bytecode=code))
          visit(child)

  visit(module.operation)
  return found


def ir_text(bytecode: bytes) -> str:
  """Triton IR bytecode (as Pallas serialises it) -> its textual form,
  which the `triton` package parses."""
  # pylint: disable=g-import-not-at-top
  from jax._src.interpreters import mlir
  from jax._src.lib.mlir import ir
  from jax._src.lib.triton import dialect as tt_dialect
  context = mlir.make_ir_context()
  tt_dialect.register_dialect(context)
  with context:
    return ir.Module.parse(bytecode).operation.get_asm(
        enable_debug_info=False)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(report: str) -> dict[str, int]:
  """Registers, spill stores/loads and stack frame bytes from `ptxas -v`."""
  used = _PTXAS_USED.search(report)
  spill = _PTXAS_SPILL.search(report)
  stack = _PTXAS_STACK.search(report)
  if used is None:
    raise ValueError(f"no register count in ptxas output:\n{report}")
  return dict(registers=int(used.group(1)),
              spill_stores=int(spill.group(1)) if spill else 0,
              spill_loads=int(spill.group(2)) if spill else 0,
              stack=int(stack.group(1)) if stack else 0)


def blocks_per_sm(registers: int, num_warps: int, shared: int) -> dict:
  """Resident thread blocks per Hopper SM and what limits them."""
  per_warp = math.ceil(registers * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
  limits = {
      "registers": (REGS_PER_SM // per_warp) // num_warps,
      "warps": MAX_WARPS_PER_SM // num_warps,
      "blocks": MAX_BLOCKS_PER_SM,
  }
  if shared:
    limits["shared"] = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK)
  limit = min(limits, key=limits.get)
  return dict(blocks=limits[limit], limited_by=limit)


def compile_kernel(kernel: TritonKernel, arch: int, workdir: str) -> dict:
  """Compiles one kernel with the `triton` package; its resources."""
  # pylint: disable=g-import-not-at-top
  import triton
  from triton.backends.compiler import GPUTarget
  digest = hashlib.sha1(kernel.ir_bytecode).hexdigest()[:10]
  path = os.path.join(workdir, f"{kernel.name}_{digest}.ttir")
  with open(path, "w") as f:
    f.write(ir_text(kernel.ir_bytecode))
  t0 = time.perf_counter()
  compiled = triton.compile(
      path, target=GPUTarget("cuda", arch, 32),
      options=dict(num_warps=kernel.num_warps,
                   num_stages=kernel.num_stages))
  seconds = time.perf_counter() - t0
  ptx = path[:-5] + ".ptx"
  with open(ptx, "w") as f:
    f.write(compiled.asm["ptx"])
  ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__),
                       "bin", "ptxas")
  target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
  report = subprocess.run([ptxas, "-v", f"-arch={target}", ptx, "-o",
                           os.devnull], capture_output=True, text=True,
                          check=True).stderr
  out = parse_ptxas(report)
  out["shared"] = int(compiled.metadata.shared)
  out["compile_s"] = round(seconds, 1)
  out.update(blocks_per_sm(out["registers"], kernel.num_warps,
                           out["shared"]))
  out["waves"] = round(kernel.programs / (out["blocks"] * SM_COUNT), 2)
  return out


def memory_estimate(blocks: BlockSizes, batch: int, seq_len: int,
                    key_heads: int, heads: int, dk: int, dv: int, dtype,
                    segments: bool = False, op_level: bool = False) -> dict:
  """`live_temporaries` of forward+backward (gradients of all five inputs)
  at this shape, in MiB, and each kernel's `kernel_traffic`.

  By default of the benchmark's program: the gradient of a sum of the
  outputs (its cotangents built inside) with the gradients counted. With
  `op_level`, of the rule as an operation: the output and state
  cotangents are arguments, and the output, the final state and the
  gradients are results, none of them counted (nor anything written into
  them in place), as XLA counts temporaries; what is left is what the rule
  itself holds, the per-chunk states it stores included."""
  args = _abstract_args(batch, seq_len, key_heads, heads, dk, dv, dtype,
                        segments)
  if op_level:
    grad = as_operation(_forward(blocks))
    sds = jax.ShapeDtypeStruct
    args = (*args, sds((batch, seq_len, heads, dv), dtype),
            sds((batch, heads, dk, dv), jnp.float32))
  else:
    grad = jax.grad(_loss(blocks), argnums=tuple(range(5)))
  with abstract_target("cuda"):  # one trace for both counts
    eqns, results = _flat_eqns(jax.make_jaxpr(grad)(*args))
  peak, at_peak = _peak_of(eqns, results, count_results=not op_level)
  traffic = _traffic_of(eqns)
  return dict(peak_mib=round(peak / 2**20, 1),
              at_peak=[(round(n / 2**20, 1), t) for n, t in at_peak],
              traffic=[dict(kernel=r["kernel"],
                            read_mib=round(r["read"] / 2**20, 1),
                            written_mib=round(r["written"] / 2**20, 1),
                            floor_ms=round(r["floor_ms"], 3))
                       for r in traffic])


# XLA's pass that removes optimization barriers.
_BARRIER_PASS = "cse_barrier_expander"
_TEMP_RE = re.compile(r"allocation \d+: size (\d+),[^\n]*preallocated-temp")
_COPY_RE = re.compile(r"= (\w+\[[\d,]*\])\{[\d,]*\} copy\(")


def xla_temporaries(fn, *args) -> dict:
  """XLA's own count of the temporaries of `fn(*args)` as the GPU runs
  it, without a GPU: the program is lowered for an abstract H100 (its
  Pallas kernels become Triton custom calls) and handed to this host's
  XLA compiler, whose pipeline (HLO passes, copy insertion, scheduling,
  buffer assignment) runs to the end before it finds no Triton handler
  on the host and stops; the buffer assignment it wrote out gives the
  temporaries (the "preallocated-temp" allocation: what is neither an
  argument nor a result) and its copies (`copy` instructions, with the
  bytes each moves). The host's pipeline is not the GPU's (its fusion
  and scheduling differ), but the kernels are opaque calls to both: at
  the 32k benchmark shape it gave 980.0, 373.0 and 208.5 MiB for the
  three tilings XLA measured on the H100 (docs/measurements/
  2026-11-27-h100-ae2f428/gpu_checks.log, memory32k), the same to the
  tenth of a MiB. Returns dict(temp_mib, copies: [(MiB,
  type)] largest first, of 1 MiB or more).

  `lax.optimization_barrier`s (the blocked kernels' `_in_order`) order
  the GPU's schedule: its compiler removes them after scheduling. So
  does the host compiler of jax 0.11; that of jax 0.10 removes them
  before, and schedules as if they were not there. Its count of a
  program with barriers is not the GPU's, and this raises.

  Raises RuntimeError where this jax cannot lower for an abstract GPU,
  its host compiler drops the program's barriers before scheduling, or
  the compiler wrote no buffer assignment."""
  with abstract_target("cuda"):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  module = str(lowered.compiler_ir("stablehlo"))
  if ("stablehlo.optimization_barrier" in module
      and not host_schedules_barriers()):
    raise RuntimeError(
        f"jax {jax.__version__}'s host compiler removes optimization "
        "barriers before scheduling, the GPU's after: its count of this "
        "program would not be the GPU's")
  texts = _host_compile(module)
  if not any(name.endswith("buffer-assignment.txt") for name in texts):
    raise RuntimeError("XLA wrote no buffer assignment for the program "
                       "lowered for CUDA")
  text = lambda key: next((t for name, t in texts.items()
                           if name.endswith(key)), "")
  temp = _TEMP_RE.search(text("buffer-assignment.txt"))
  copies = []
  for m in _COPY_RE.finditer(text("after_optimizations.txt")):
    dtype, dims = m.group(1)[:-1].split("[")
    n = math.prod(int(x) for x in dims.split(",") if x) * _HLO_BYTES[dtype]
    if n >= 1 << 20:
      copies.append((round(n / 2**20, 1), m.group(1)))
  return dict(temp_mib=round(int(temp.group(1)) / 2**20, 1) if temp else 0.0,
              copies=sorted(copies, reverse=True))


# Bytes per element of the HLO element types a copy may have here.
_HLO_BYTES = dict(pred=1, s8=1, u8=1, bf16=2, f16=2, s32=4, u32=4, f32=4,
                  s64=8, f64=8)


def _host_compile(module: str, passes: str = _BARRIER_PASS) -> dict:
  """{dump file name: text} of the host compiler's dumps for a StableHLO
  `module` (after optimisations, the buffer assignment, and after each
  pass matching `passes`). A program with Triton calls ends there: the
  host has no Triton handler, which it finds after buffer assignment."""
  from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
  from jax.extend import backend as jbackend  # pylint: disable=g-import-not-at-top
  host = jbackend.get_backend("cpu")
  options = xla_client.CompileOptions()
  debug = options.executable_build_options.debug_options
  with tempfile.TemporaryDirectory() as dump:
    debug.xla_dump_to = dump
    debug.xla_dump_hlo_as_text = True
    debug.xla_dump_hlo_pass_re = passes
    try:
      host.compile_and_load(module, host.devices()[:1], options)
    except Exception as e:  # pylint: disable=broad-except
      if TRITON_CALL not in str(e):  # the expected end: no Triton on a host
        raise
    texts = {}
    for name in os.listdir(dump):
      if name.endswith(".txt"):
        with open(os.path.join(dump, name)) as f:
          texts[name] = f.read()
  return texts


@functools.lru_cache(maxsize=None)
def host_schedules_barriers() -> bool:
  """Whether this jax's host compiler removes optimization barriers only
  after scheduling (jax 0.11), as the GPU's does, so that its schedule
  keeps the order they impose; jax 0.10's removes them before."""
  lowered = jax.jit(lambda x: lax.optimization_barrier(x) + 1).trace(
      jax.ShapeDtypeStruct((8,), jnp.float32)).lower()
  names = [name for name in _host_compile(
      str(lowered.compiler_ir("stablehlo"))) if f"after_{_BARRIER_PASS}" in name]
  return bool(names) and all("after_scheduling" in name for name in names)


def xla_memory(blocks: BlockSizes, batch: int, seq_len: int, key_heads: int,
               heads: int, dk: int, dv: int, dtype,
               segments: bool = False) -> dict:
  """`xla_temporaries` of the rule's forward+backward as an operation
  (`as_operation`: what it holds beyond its inputs, outputs and
  cotangents, as `memory_estimate`'s op_level and the benchmark's
  --op_memory count it)."""
  sds = jax.ShapeDtypeStruct
  args = (*_abstract_args(batch, seq_len, key_heads, heads, dk, dv, dtype,
                          segments),
          sds((batch, seq_len, heads, dv), dtype),
          sds((batch, heads, dk, dv), jnp.float32))
  return xla_temporaries(as_operation(_forward(blocks)), *args)


def format_traffic(traffic: list[dict]) -> str:
  """The per-kernel traffic floor as a table."""
  lines = [f"  {'kernel (program order)':<34} {'read MiB':>9} "
           f"{'written MiB':>11} {'floor ms':>8}  (each array once, at "
           f"{HBM_BYTES_PER_S / 1e12:g} TB/s)"]
  for r in traffic:
    lines.append(f"  {r['kernel']:<34} {r['read_mib']:>9.1f} "
                 f"{r['written_mib']:>11.1f} {r['floor_ms']:>8.3f}")
  lines.append(f"  {'all kernels':<34} {'':>9} {'':>11} "
               f"{sum(r['floor_ms'] for r in traffic):>8.3f}")
  return "\n".join(lines)


def run(variants: tuple[str, ...], batch: int, seq_len: int, key_heads: int,
        heads: int, dk: int, dv: int, dtype: str, segments: bool = False,
        arch: int = 90, only: tuple[str, ...] = (),
        memory: bool = False) -> dict:
  """Every kernel of the defaults and each variant, with its resources
  (None where `triton` is not importable)."""
  try:
    import triton  # pylint: disable=g-import-not-at-top,unused-import
    have_triton = True
  except ImportError:
    have_triton = False
  rows, memories = [], {}
  with tempfile.TemporaryDirectory() as workdir:
    for spec in ("",) + tuple(variants):
      blocks = BlockSizes.from_spec(spec, "gpu")
      label = f"pallas[{spec}]" if spec else "pallas"
      if memory:
        memories[label] = memory_estimate(blocks, batch, seq_len, key_heads,
                                          heads, dk, dv, jnp.dtype(dtype),
                                          segments)
        op = memory_estimate(blocks, batch, seq_len, key_heads, heads, dk,
                             dv, jnp.dtype(dtype), segments, op_level=True)
        memories[label]["op_peak_mib"] = op["peak_mib"]
        try:
          xla = xla_memory(blocks, batch, seq_len, key_heads, heads, dk, dv,
                           jnp.dtype(dtype), segments)
        except RuntimeError as e:
          xla = dict(unavailable=str(e))
        memories[label]["op_xla"] = xla
        print(f"{label}: forward+backward temporaries, estimated: "
              f"{memories[label]['peak_mib']} MiB (the benchmark's program, "
              f"gradients counted); {op['peak_mib']} MiB beyond the rule's "
              f"inputs, outputs and cotangents", flush=True)
        print(f"  XLA's count of the latter (host compiler, program lowered "
              f"for CUDA): "
              + (f"{xla['temp_mib']} MiB, copies of 1 MiB or more: "
                 f"{xla['copies'] or 'none'}" if "temp_mib" in xla
                 else f"unavailable ({xla['unavailable']})"), flush=True)
        print(format_traffic(memories[label]["traffic"]), flush=True)
      for kernel in lowered_kernels(blocks, batch, seq_len, key_heads, heads,
                                    dk, dv, jnp.dtype(dtype), segments):
        if only and not any(part in kernel.name for part in only):
          continue
        row = dict(blocks=label, kernel=kernel.name,
                   num_warps=kernel.num_warps, num_stages=kernel.num_stages,
                   grid=list(kernel.grid), programs=kernel.programs)
        row["resources"] = (compile_kernel(kernel, arch, workdir)
                            if have_triton else None)
        rows.append(row)
        print(format_row(row), flush=True)
  versions = dict(jax=jax.__version__)
  if have_triton:
    versions["triton"] = triton.__version__
  return dict(config=dict(batch=batch, seq_len=seq_len, key_heads=key_heads,
                          heads=heads, dk=dk, dv=dv, dtype=dtype,
                          segments=segments, arch=arch),
              versions=versions, kernels=rows, memory=memories)


HEADER = (f"{'blocks':<34} {'kernel':<34} {'warps':>5} {'stg':>3} "
          f"{'programs':>8} {'regs':>4} {'spill st/ld':>11} {'smem KiB':>8} "
          f"{'blk/SM':>6} {'limit':>9} {'waves':>6}")


def format_row(row: dict) -> str:
  head = (f"{row['blocks']:<34} {row['kernel']:<34} {row['num_warps']:>5} "
          f"{row['num_stages']:>3} {row['programs']:>8}")
  r = row["resources"]
  if r is None:
    return head + "  (triton not importable: not compiled)"
  spill = f"{r['spill_stores']}/{r['spill_loads']}"
  return (f"{head} {r['registers']:>4} {spill:>11} "
          f"{r['shared'] / 1024:>8.1f} {r['blocks']:>6} "
          f"{r['limited_by']:>9} {r['waves']:>6}")


def _define_flags():
  """The command's flags, defined only when it runs as a command: tests
  import this module beside other experiments whose flags share names."""
  # pylint: disable-next=g-import-not-at-top
  from pallas_kernels.tools import gdr_shapes
  holders = dict(
      shape=gdr_shapes,
      variants=flags.DEFINE_list(
          "variants", [],
          "BlockSizes variants over the GPU defaults, e.g. 'wy_block=None' or "
          "'num_warps_intra=8/f32_dot=bf16'; the defaults are always "
          "included."),
      segments=flags.DEFINE_bool("segments", False,
                                 "Lower with segment_ids (packed sequences)."),
      only=flags.DEFINE_list(
          "only", [], "Compile only kernels whose name contains one of "
          "these (e.g. 'wy,prep'); default all."),
      arch=flags.DEFINE_integer("arch", 90, "CUDA compute capability."),
      memory=flags.DEFINE_bool(
          "memory", False, "Also estimate the peak temporaries of forward+"
          "backward per variant (jaxpr liveness; and XLA's count, the host "
          "compiler's buffer assignment of the program lowered for CUDA) "
          "and each kernel's HBM traffic floor."),
      json_out=flags.DEFINE_string("json_out", None, "Write results here."))
  return holders


def main(argv, f):
  del argv
  print(HEADER, flush=True)
  shape = f["shape"]
  result = run(tuple(f["variants"].value), shape.BATCH.value,
               shape.SEQ_LEN.value,
               shape.KEY_HEADS.value or shape.HEADS.value, shape.HEADS.value,
               shape.DK.value, shape.DV.value, shape.DTYPE.value,
               f["segments"].value, f["arch"].value, tuple(f["only"].value),
               f["memory"].value)
  if f["json_out"].value:
    with open(f["json_out"].value, "w") as out:
      json.dump(result, out, indent=1)


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
