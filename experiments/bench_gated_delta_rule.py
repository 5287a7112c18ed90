"""Times gated delta rule implementations side by side, in one process.

Forward and forward+backward of `pallas_kernels.gated_delta_rule` for each
implementation asked for ("pallas", "chunked", "recurrent") and, when torch
with CUDA and flash-linear-attention are importable, FLA's
`chunk_gated_delta_rule` ("fla") on the same shapes. Prints a table of
milliseconds, tokens/s and the speedup over each baseline measured in the
same run (baseline time / this time), and writes it as JSON. Each is timed
two ways (`MODES`): every call waited for (median; a call's latency) and
calls queued back to back (mean; the device's time when the host keeps
ahead, so launches and dispatch drop out). Every
JAX implementation's output, final state and gradients are compared with
`chunked`'s in the same run; `--profile_kernels` / `--profile_variants`
time each Pallas split kernel alone, beside its HBM traffic floor (the
bytes of its arrays at `triton_resources.HBM_BYTES_PER_S`, 2.5 TB/s) and
the ratio.

  # GPU, the shape of the runs under docs/measurements/:
  python -m experiments.bench_gated_delta_rule --batch 1 --seq_len 32768 \
      --heads 16 --dk 128 --dv 128 --implementations pallas,chunked,fla
  # CPU smoke run: Pallas in interpret mode, small shapes by default.
  python -m experiments.bench_gated_delta_rule --interpret

q, k, v use --dtype; g and beta are float32 (as the model passes them).

Every flag is checked before anything is compiled (shapes and counts out of
range, an unknown implementation, a BlockSizes variant that does not parse,
an unreadable --variants_from_profile file, a --json_out that cannot be
written); a misuse ends with one line on stderr and exit status 1 (2 for
usage errors); see experiments/cli.py.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import time
from typing import Callable

from absl import flags
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

from experiments import cli
from pallas_kernels.gated_delta_rule import available_implementations
from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.gated_delta_rule import pallas_gdr
from pallas_kernels.gated_delta_rule import seq_split
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
from pallas_kernels.tools import gdr_shapes
from pallas_kernels.tools import split_profile
from pallas_kernels.tools import triton_resources

_IMPLS = flags.DEFINE_list("implementations", ["pallas", "chunked", "fla"],
                           "pallas, chunked, recurrent, fla.")
_VARIANTS = flags.DEFINE_list(
    "pallas_variants", [],
    "Extra Pallas BlockSizes to time, each as '/'-separated field=value "
    "pairs over the backend's defaults, e.g. 'kernels=fused/block_dv=64' "
    "or 'num_warps_intra=8'; reported as pallas[...].")
_FLA_HOPPER_BYPASS = flags.DEFINE_bool(
    "fla_bypass_hopper_check", True,
    "FLA refuses its gated backward on Hopper with Triton < 3.7.1 (its issue "
    "#640: possibly wrong results). Bypass that check so the backward can be "
    "timed; the output says so. Timing only.")
_PROFILE = flags.DEFINE_bool(
    "profile_kernels", False,
    "Also time each kernel of the split Pallas pipeline on its own (the "
    "backend's default BlockSizes), to see where the time goes.")
_PROFILE_VARIANTS = flags.DEFINE_list(
    "profile_variants", [],
    "BlockSizes variants (as --pallas_variants) whose split kernels are "
    "also profiled one by one (the defaults too with --profile_kernels).")
_VARIANTS_FROM = flags.DEFINE_list(
    "variants_from_profile", [],
    "JSONs of earlier runs with --profile_variants: the profiled BlockSizes "
    "whose kernels summed to the least time, if not the defaults, is added "
    "to --pallas_variants (one GPU call can profile and then time the best "
    "tiling end to end). Files that do not exist (a run cut "
    "short) are skipped; the defaults count once.")
_SEQ_SPLITS = flags.DEFINE_list(
    "seq_splits", [],
    "Also time each JAX implementation with the sequence cut into this many "
    "parallel pieces (pallas_kernels.gated_delta_rule.seq_split); reported "
    "as IMPL/splitN.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed runs (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs after compiling.")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False,
    "Pallas interpret mode (CPU). Shrinks the shape flags not given on the "
    "command line to batch 1, seq_len 128, heads 2, dk 32, dv 32, iters 2.")
_ONCE = flags.DEFINE_bool(
    "once", False,
    "Only run the Pallas forward+backward once per tiling (the defaults, "
    "then --pallas_variants), untimed, for a profiler: `ncu --kernel-name "
    "regex:gated_delta_rule ...` then sees each kernel once.")
_OP_MEMORY = flags.DEFINE_bool(
    "op_memory", False,
    "Only compile each Pallas tiling's forward+backward as an operation "
    "(the output and state cotangents arguments; the output, final state "
    "and gradients results) and print XLA's temporaries for it, the bytes "
    "the rule holds beyond its inputs and outputs; untimed. The timed "
    "program's temporaries (fwd_bwd_temp_bytes) also hold the cotangent "
    "it builds and its output. In interpret mode (CPU) the count is the "
    "interpreter's, not the kernels'.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results here.")
_SEED = flags.DEFINE_integer("seed", 0, "Input seed.")

_SMALL = dict(batch=1, seq_len=128, heads=2, dk=32, dv=32, iters=2,
              warmup=1)
BASELINES = ("chunked", "fla")
# What each result row's mode times. Latency modes wait for every call
# (median of --iters); "_queued" modes issue --iters calls back to back and
# wait once (mean per call), which leaves out the host's per-call work as
# long as the device is the slower of the two (at short sequences the
# latency of a call can be mostly launches and synchronisation).
MODES = {
    "fwd": "forward, each call waited for (median)",
    "fwd_queued": "forward, calls queued back to back (mean)",
    "fwd_bwd": "forward+backward, each call waited for (median)",
    "fwd_bwd_queued": "forward+backward, calls queued back to back (mean)",
}


def make_inputs(b: int, t: int, hk: int, hv: int, dk: int, dv: int,
                dtype, seed: int) -> dict[str, np.ndarray]:
  """Random float32 NumPy inputs: unit-norm q, k; g <= 0; beta in (0, 1)."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, hk, dk)).astype(np.float32)
  k = rng.normal(size=(b, t, hk, dk)).astype(np.float32)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.normal(size=(b, t, hv, dv)).astype(np.float32)
  g = -np.log1p(np.exp(rng.normal(size=(b, t, hv)) - 2.0)).astype(np.float32)
  beta = (1.0 / (1.0 + np.exp(-rng.normal(size=(b, t, hv))))).astype(
      np.float32)
  del dtype
  return dict(q=q, k=k, v=v, g=g, beta=beta)


def _median_ms(fn: Callable[[], object], sync: Callable[[object], None],
               iters: int, warmup: int) -> float:
  """Median ms of `iters` calls, each waited for (`sync`) before the next:
  a call's latency, launches and host work included."""
  sync(fn())  # compile
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    sync(fn())
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _queued_ms(fn: Callable[[], object], sync: Callable[[object], None],
               iters: int) -> float:
  """Mean ms per call of `iters` calls issued back to back with one `sync`
  at the end (after one waited-for call). While the host issues calls
  faster than the device runs them, this is the device's time per call:
  the host's launch and dispatch work overlaps the device's. The GPU runs
  one program's calls in order on one stream (JAX and torch alike), so
  waiting for the last output waits for all; only it is kept alive."""
  sync(fn())
  t0 = time.perf_counter()
  out = None
  for _ in range(iters):
    out = fn()
  sync(out)
  return (time.perf_counter() - t0) * 1e3 / iters


def _timed(fn, sync, iters: int, warmup: int, mode: str) -> dict[str, float]:
  """{mode: median synced ms, mode_queued: queued ms} (see `MODES`)."""
  return {mode: _median_ms(fn, sync, iters, warmup),
          f"{mode}_queued": _queued_ms(fn, sync, iters)}


def best_profiled_variant(kernel_profile: list[dict]) -> str | None:
  """The spec of the profiled variant with the least summed kernel time
  (queued, when every row has it),
  or None when the defaults ("pallas") are fastest or nothing was profiled.
  Labels are "pallas" or "pallas[spec]" (see `parse_variant`)."""
  # Device times (queued) where every row has one, else latencies.
  key = ("ms_queued" if all("ms_queued" in r for r in kernel_profile)
         else "ms")
  totals = {}
  for row in kernel_profile:
    label = row.get("blocks", "pallas")
    totals[label] = totals.get(label, 0.0) + row[key]
  if not totals:
    return None
  best = min(totals, key=totals.get)
  return None if best == "pallas" else best[len("pallas["):-1]


def merge_profiles(paths) -> list[dict]:
  """The kernel_profile rows of the JSONs at `paths` that exist, each
  (tiling, kernel) once: every profiling run also times the defaults, and
  only the first file's count."""
  rows, seen = [], set()
  for path in paths:
    if not os.path.exists(path):
      continue
    with open(path) as f:
      for row in json.load(f).get("kernel_profile", []):
        key = (row.get("blocks", "pallas"), row["kernel"])
        if key not in seen:
          seen.add(key)
          rows.append(row)
  return rows


def parse_variant(spec: str) -> tuple[str, BlockSizes]:
  """'kernels=fused/block_dv=64' -> ("pallas[kernels=fused/block_dv=64]",
  this backend's default BlockSizes with those fields replaced)."""
  return f"pallas[{spec}]", BlockSizes.from_spec(spec, jax.default_backend())


def chunk_states_bytes(batch: int, heads: int, seq_len: int, dk: int,
                       dv: int, dtype) -> int:
  """The memory bound of a forward+backward beyond its inputs and outputs:
  the bytes of the state entering every chunk, [b, hv, n, dk, dv], in the
  inputs' dtype (bf16 or f32; chunk 64), which a rule that stores them
  for the backward holds anyway."""
  return (batch * heads * -(-seq_len // 64) * dk * dv
          * jnp.dtype(dtype).itemsize)


def _cotangents(q, v, fill):
  """Cotangents of o ([b, t, hv, dv], v's dtype) and of the final state
  ([b, hv, dk, dv] f32), every entry `fill`."""
  return (jnp.full(v.shape, fill, v.dtype),
          jnp.full((q.shape[0], v.shape[2], q.shape[3], v.shape[3]), fill,
                   jnp.float32))


def _jax_fns(impl: str, inputs: dict, dtype, interpret: bool,
             block_sizes: BlockSizes | None, seq_splits: int):
  """(args, forward, forward+backward) of one JAX implementation."""
  args = [jnp.asarray(inputs[n], dtype) for n in ("q", "k", "v")]
  args += [jnp.asarray(inputs[n]) for n in ("g", "beta")]

  def rule(q, k, v, g, beta, initial_state=None, segment_ids=None):
    if block_sizes is not None:
      return pallas_gdr.gated_delta_rule_pallas(
          q, k, v, g, beta, initial_state, segment_ids=segment_ids,
          block_sizes=block_sizes, interpret=interpret)
    return gated_delta_rule(q, k, v, g, beta, initial_state,
                            implementation=impl, interpret=interpret,
                            segment_ids=segment_ids)

  def fwd(q, k, v, g, beta):
    if seq_splits > 1:
      return seq_split.split_sequence(rule, seq_splits, 64, q, k, v, g, beta)
    return rule(q, k, v, g, beta)

  op = triton_resources.as_operation(fwd)

  def fwd_bwd(q, k, v, g, beta):
    """(o, gradients), cotangents of ones: o is a result, as in a training
    step whose loss reads it and in FLA's timed forward+backward, so XLA
    cannot drop the kernels that only form it (the three-kernel forward's
    output kernel, which it removes from a program that returns only the
    gradients)."""
    (o, _), grads = op(q, k, v, g, beta, *_cotangents(q, v, 1.0))
    return o, grads

  return args, fwd, fwd_bwd


MARKER = "gated_delta_rule_marker"


def _marker(interpret: bool) -> Callable[[jax.Array], jax.Array]:
  """A one-program Pallas kernel named MARKER that adds one to 16 floats:
  launched before each tiling in `run_once`, so that a profile of the
  kernels (`ncu --kernel-name regex:gated_delta_rule`) can be cut into
  tilings (`ncu_summary --by_tiling`) however many launches a tiling
  makes (one per block and kernel in the blocked forms)."""
  def body(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0
  # The Triton lowering, as the kernels use (without compiler params a
  # GPU lowers Pallas with Mosaic GPU, which refuses this small a copy).
  params = {} if interpret else dict(
      compiler_params=pallas_gdr.triton_compiler_params(1, 1))
  return jax.jit(pl.pallas_call(
      body, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
      interpret=interpret, name=MARKER, **params))


def run_once(labels_and_blocks, inputs: dict, dtype,
             interpret: bool) -> None:
  """Each Pallas tiling's forward+backward, compiled and called once, one
  after the other, each after one launch of the MARKER kernel, and nothing
  else: for a profiler (`ncu --kernel-name regex:gated_delta_rule`) to see
  every kernel of each tiling once, in order."""
  marker = _marker(interpret)
  tick = jnp.zeros((16,), jnp.float32)
  for label, bs in labels_and_blocks:
    args, _, fwd_bwd = _jax_fns("pallas", inputs, dtype, interpret, bs, 1)
    f = jax.jit(fwd_bwd).lower(*args).compile()  # before the marker's launch
    tick = jax.block_until_ready(marker(tick))
    _, grads = jax.block_until_ready(f(*args))
    finite = all(bool(jnp.isfinite(x).all()) for x in grads)
    print(f"ran {label} forward+backward once "
          f"({'finite' if finite else 'NOT FINITE'} gradients)", flush=True)


def op_temp_bytes(inputs: dict, dtype, interpret: bool,
                  block_sizes: BlockSizes | None) -> int:
  """XLA's temporaries of the Pallas rule's forward+backward as an
  operation: compiled (not run) with the cotangents as arguments and the
  output, final state and gradients as results, so that what XLA counts
  as temporaries is what the rule holds beyond its inputs and outputs
  (the per-chunk states it stores, and its intermediates)."""
  args, fwd, _ = _jax_fns("pallas", inputs, dtype, interpret, block_sizes, 1)
  op = triton_resources.as_operation(fwd)
  cotangents = _cotangents(args[0], args[2], 0.0)
  mem = jax.jit(op).lower(*args, *cotangents).compile().memory_analysis()
  return -1 if mem is None else int(mem.temp_size_in_bytes)


def time_jax(impl: str, inputs: dict, dtype, interpret: bool, iters: int,
             warmup: int, block_sizes: BlockSizes | None = None,
             seq_splits: int = 1) -> dict[str, float]:
  """Forward and forward+backward times (ms) of one JAX implementation."""
  args, fwd, fwd_bwd = _jax_fns(impl, inputs, dtype, interpret,
                                block_sizes, seq_splits)
  sync = jax.block_until_ready
  f = jax.jit(fwd)
  res = {}
  try:
    o, s = f(*args)
    # The output and final state, kept to check implementations agree.
    res["outputs"] = (np.asarray(o.astype(jnp.float32)), np.asarray(s))
    res.update(_timed(lambda: f(*args), sync, iters, warmup, "fwd"))
  except Exception as e:  # pylint: disable=broad-except
    res["fwd_error"] = f"{type(e).__name__}: {str(e)[:300]}"
  try:
    # Compiled once (minutes for the Pallas kernels on a GPU): timed, and
    # XLA's buffer assignment read from it, the peak of its intermediate
    # buffers (inputs and gradients not included).
    fb = jax.jit(fwd_bwd).lower(*args).compile()
    # The gradients, kept to check implementations agree.
    res["grads"] = [np.asarray(x.astype(jnp.float32))
                    for x in fb(*args)[1]]
    res.update(_timed(lambda: fb(*args), sync, iters, warmup, "fwd_bwd"))
    mem = fb.memory_analysis()
    if mem is not None:
      res["fwd_bwd_temp_bytes"] = int(mem.temp_size_in_bytes)
  except Exception as e:  # pylint: disable=broad-except
    res["fwd_bwd_error"] = f"{type(e).__name__}: {str(e)[:300]}"
  return res


def profile_kernels(inputs: dict, dtype, interpret: bool, iters: int,
                    warmup: int, block_sizes: BlockSizes | None = None
                    ) -> list[dict]:
  """Each kernel of the split pipeline run on its own: median ms with
  every call waited for ("ms"), mean ms of calls queued back to back
  ("ms_queued", its device time; see `MODES`), and its HBM traffic floor
  (`triton_resources.kernel_traffic`: the bytes of its arrays at
  `triton_resources.HBM_BYTES_PER_S`)."""
  backend = "cpu" if interpret else jax.default_backend()
  if backend == "tpu":
    raise ValueError("profile_kernels: times the split kernels, which run "
                     "on GPU and in interpret mode; the TPU runs the fused "
                     "ones")
  q, k, v = (jnp.asarray(inputs[n], dtype) for n in ("q", "k", "v"))
  stages = split_profile.split_pipeline_stages(
      q, k, v, jnp.asarray(inputs["g"]), jnp.asarray(inputs["beta"]),
      block_sizes=block_sizes, interpret=interpret, backend=backend, seed=1)
  return [dict(kernel=name, first_call_s=first,
               floor_ms=sum(r["floor_ms"] for r in
                            triton_resources.kernel_traffic(fn, *args)),
               **_timed(lambda: fn(*args), jax.block_until_ready, iters,
                        warmup, "ms"))
          for name, fn, args, first in stages]


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| / max |b| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def time_fla(inputs: dict, dtype, iters: int, warmup: int,
             bypass_hopper_check: bool = False):
  """FLA's chunk_gated_delta_rule times, or a reason string if unavailable."""
  try:
    torch = importlib.import_module("torch")
    fla_gdr = importlib.import_module("fla.ops.gated_delta_rule")
    chunk_gated_delta_rule = fla_gdr.chunk_gated_delta_rule
  except ImportError as e:
    return f"not importable ({e})"
  if not torch.cuda.is_available():
    return "torch has no CUDA device"
  if bypass_hopper_check:
    try:
      chunk_o = importlib.import_module("fla.ops.common.chunk_o")
      if not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
        chunk_o.TRITON_ABOVE_3_7_1 = True
        print("NOTE: FLA's Hopper check for Triton < 3.7.1 (gated backward, "
              "its issue #640) was bypassed to time the backward; its "
              "gradients are not checked here. Timing only.")
    except ImportError:
      pass
  tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
  dev = "cuda"
  hk, hv = inputs["q"].shape[2], inputs["v"].shape[2]

  def tensor(x, dt, grad=True):
    return torch.tensor(x, device=dev, dtype=dt).requires_grad_(grad)

  q, k, v = (tensor(inputs[n], tdtype) for n in ("q", "k", "v"))
  g, beta = (tensor(inputs[n], torch.float32) for n in ("g", "beta"))
  if hv != hk:  # older FLA versions have no grouped value heads
    q_in = q.repeat_interleave(hv // hk, dim=2)
    k_in = k.repeat_interleave(hv // hk, dim=2)
  else:
    q_in, k_in = q, k

  def fwd():
    with torch.no_grad():
      return chunk_gated_delta_rule(q_in, k_in, v, g, beta,
                                    output_final_state=True)

  def fwd_bwd():
    o, s = chunk_gated_delta_rule(q_in, k_in, v, g, beta,
                                  output_final_state=True)
    (o.float().sum() + s.sum()).backward(retain_graph=hv != hk)
    return o

  sync = lambda _: torch.cuda.synchronize()
  try:
    return {**_timed(fwd, sync, iters, warmup, "fwd"),
            **_timed(fwd_bwd, sync, iters, warmup, "fwd_bwd")}
  except Exception as e:  # pylint: disable=broad-except
    return f"failed ({type(e).__name__}: {e})"


def run(batch: int, seq_len: int, heads: int, key_heads: int, dk: int,
        dv: int, dtype: str, implementations: list[str], iters: int,
        warmup: int, interpret: bool, seed: int = 0,
        pallas_variants: tuple[str, ...] = (),
        fla_bypass_hopper_check: bool = False,
        profile: bool = False, seq_splits: tuple[int, ...] = (),
        profile_variants: tuple[str, ...] = (),
        progress_path: str | None = None) -> dict:
  """Times every implementation; returns the JSON-able results."""
  jdtype = jnp.dtype(dtype)
  inputs = make_inputs(batch, seq_len, key_heads, heads, dk, dv, jdtype,
                       seed)
  times, skipped = {}, {}
  # (label, implementation, BlockSizes or None, sequence pieces)
  jobs = [(impl, impl, None, 1) for impl in implementations]
  jobs += [(label, "pallas", bs, 1)
           for label, bs in map(parse_variant, pallas_variants)]
  jobs += [(f"{impl}/split{n}", impl, None, n) for n in seq_splits
           for impl in implementations if impl != "fla"]
  for impl, name, bs, pieces in jobs:
    if name == "fla":
      res = time_fla(inputs, jdtype, iters, warmup, fla_bypass_hopper_check)
    else:
      res = time_jax(name, inputs, jdtype, interpret, iters, warmup, bs,
                     pieces)
      for mode in ("fwd", "fwd_bwd"):
        if f"{mode}_error" in res:
          skipped[f"{impl} {mode}"] = f"failed ({res.pop(f'{mode}_error')})"
      if not any(m in res for m in ("fwd", "fwd_bwd")):
        res = "failed (see the per-mode lines)"
    if isinstance(res, str):
      skipped[impl] = res
    else:
      times[impl] = res
    # Progress as it is measured (a run cut short still leaves numbers).
    print(f"measured {impl}: " + (res if isinstance(res, str) else ", ".join(
        f"{m} {res[m]:.3f} ms" for m in MODES if m in res)),
          flush=True)
  # Agreement with the chunked jnp reference (same inputs, same process).
  errors = {}
  if "chunked" in times:
    ref_o, ref_s = times["chunked"]["outputs"]
    ref_grads = times["chunked"].get("grads")
    for impl, res in times.items():
      if "outputs" in res and impl != "chunked":
        errors[impl] = dict(output=_rel_err(res["outputs"][0], ref_o),
                            final_state=_rel_err(res["outputs"][1], ref_s))
      if res.get("grads") and ref_grads and impl != "chunked":
        # d q, k, v, g, beta: the worst of the five.
        errors.setdefault(impl, {})["grads"] = max(
            _rel_err(a, b) for a, b in zip(res["grads"], ref_grads))
  temp_bytes = {}
  for impl, res in times.items():
    res.pop("outputs", None)
    res.pop("grads", None)
    if "fwd_bwd_temp_bytes" in res:
      temp_bytes[impl] = res.pop("fwd_bwd_temp_bytes")
  kernel_profile = []
  profiles = ([("pallas", None)] if profile else []) + [
      parse_variant(spec) for spec in profile_variants]
  for label, bs in profiles:
    try:
      rows = profile_kernels(inputs, jdtype, interpret, iters, warmup, bs)
    except Exception as e:  # pylint: disable=broad-except
      skipped[f"profile {label}"] = (
          f"failed ({type(e).__name__}: {str(e)[:300]})")
      print(f"profile {label} failed: {e}", flush=True)
      continue
    for row in rows:
      row["blocks"] = label
      kernel_profile.append(row)
      print(f"measured kernel {label} {row['kernel']}: {row['ms']:.3f} ms "
            f"({row['ms_queued']:.3f} queued; first call, with "
            f"compilation: {row['first_call_s']:.1f} s)",
            flush=True)
    if progress_path:  # a run cut short keeps the tilings profiled so far
      with open(progress_path, "w") as f:
        json.dump(dict(kernel_profile=kernel_profile, partial=True), f)
  tokens = batch * seq_len
  rows = []
  for impl, modes in times.items():
    for mode, ms in modes.items():
      speedup = {base: times[base][mode] / ms for base in BASELINES
                 if base in times and base != impl and mode in times[base]}
      rows.append(dict(implementation=impl, mode=mode, ms=ms,
                       tokens_per_s=tokens / (ms * 1e-3),
                       speedup_vs=speedup))
  return dict(
      config=dict(batch=batch, seq_len=seq_len, heads=heads,
                  key_heads=key_heads, dk=dk, dv=dv, dtype=dtype,
                  iters=iters, interpret=interpret),
      device=str(jax.devices()[0].device_kind),
      backend=jax.default_backend(), jax_version=jax.__version__,
      date=time.strftime("%Y-%m-%d"), results=rows, skipped=skipped,
      rel_err_vs_chunked=errors, kernel_profile=kernel_profile,
      fwd_bwd_temp_bytes=temp_bytes,
      chunk_states_bytes=chunk_states_bytes(batch, heads, seq_len, dk, dv,
                                            dtype))


def format_table(result: dict) -> str:
  bases = [b for b in BASELINES
           if any(r["implementation"] == b for r in result["results"])]
  head = ["implementation", "mode", "ms", "tokens/s"]
  head += [f"speedup vs {b}" for b in bases]
  lines = [" | ".join(head), " | ".join("---" for _ in head)]
  for r in result["results"]:
    cells = [r["implementation"], r["mode"], f"{r['ms']:.3f}",
             f"{r['tokens_per_s']:.3g}"]
    cells += [f"{r['speedup_vs'][b]:.2f}x" if b in r["speedup_vs"] else "-"
              for b in bases]
    lines.append(" | ".join(cells))
  modes = dict.fromkeys(r["mode"] for r in result["results"])
  lines += [f"{m}: {MODES[m]}" for m in modes if m in MODES]
  for impl, why in result["skipped"].items():
    lines.append(f"skipped {impl}: {why}")
  profile = result.get("kernel_profile") or []
  for label in dict.fromkeys(r.get("blocks", "pallas") for r in profile):
    part = [r for r in profile if r.get("blocks", "pallas") == label]
    total = sum(r["ms"] for r in part)
    floor = sum(r["floor_ms"] for r in part)
    queued = sum(r.get("ms_queued", float("nan")) for r in part)
    lines += ["", f"{label}: split kernel (alone) | ms | queued ms | share | "
              f"HBM floor ms | x floor (queued) | first call s",
              "--- | --- | --- | --- | --- | --- | ---"]
    lines += [f"{r['kernel']} | {r['ms']:.3f} | "
              f"{r.get('ms_queued', float('nan')):.3f} | "
              f"{r['ms'] / total:.0%} | {r['floor_ms']:.3g} | "
              f"{r.get('ms_queued', float('nan')) / r['floor_ms']:.1f} | "
              f"{r['first_call_s']:.1f}" for r in part]
    lines.append(f"sum | {total:.3f} | {queued:.3f} | 100% | {floor:.3g} | "
                 f"{queued / floor:.1f} | "
                 f"{sum(r['first_call_s'] for r in part):.1f}")
  if result.get("fwd_bwd_temp_bytes"):
    mib = 2.0 ** 20
    lines.append(
        "fwd+bwd temporaries (XLA memory analysis), MiB: " + ", ".join(
            f"{impl} {b / mib:.1f}"
            for impl, b in result["fwd_bwd_temp_bytes"].items())
        + f"; per-chunk states: {result['chunk_states_bytes'] / mib:.1f}")
  for impl, err in result.get("rel_err_vs_chunked", {}).items():
    lines.append(f"{impl} vs chunked (max|diff|/max|ref|): " + ", ".join(
        f"{name.replace('_', ' ')} {err[name]:.2e}"
        for name in ("output", "final_state", "grads") if name in err))
  return "\n".join(lines)


def check_flags() -> tuple[dict[str, int], int, tuple[str, ...]]:
  """(shape and timing values, key heads, the kernel profile rows of
  --variants_from_profile and their fastest variant), every flag checked
  before anything is compiled.

  Raises:
    cli.UserError: naming the flag of a value out of range, an unknown
      implementation, a variant spec that does not parse, a profile JSON
      that cannot be read, or a --json_out that cannot be written.
  """
  values = dict(batch=gdr_shapes.BATCH.value,
                seq_len=gdr_shapes.SEQ_LEN.value,
                heads=gdr_shapes.HEADS.value, dk=gdr_shapes.DK.value,
                dv=gdr_shapes.DV.value,
                iters=_ITERS.value, warmup=_WARMUP.value)
  if _INTERPRET.value:
    for name, small in _SMALL.items():
      if not flags.FLAGS[name].present:
        values[name] = small
  for name, value in values.items():
    cli.positive_int(f"--{name}", value, 0 if name == "warmup" else 1)
  key_heads = gdr_shapes.KEY_HEADS.value
  if key_heads is None:
    key_heads = values["heads"]
  elif (not isinstance(key_heads, int) or key_heads < 1
        or values["heads"] % key_heads):
    raise cli.UserError(f"--key_heads: expected an int >= 1 that divides "
                        f"--heads {values['heads']}, found {key_heads!r}")
  known = ("auto",) + available_implementations() + ("fla",)
  unknown = [i for i in _IMPLS.value if i not in known]
  if unknown:
    raise cli.UserError(f"--implementations: expected names among {known}, "
                        f"found {unknown}")
  cli.int_list("--seq_splits", _SEQ_SPLITS.value)
  for flag, specs in (("--pallas_variants", _VARIANTS.value),
                      ("--profile_variants", _PROFILE_VARIANTS.value)):
    for spec in specs:
      with cli.user_errors(f"{flag} {spec!r}"):
        parse_variant(spec)
  for path in _VARIANTS_FROM.value:
    if os.path.lexists(path):  # absent files are skipped (a run cut short)
      cli.existing_file("--variants_from_profile", path, "a JSON file")
  try:
    profiled = merge_profiles(_VARIANTS_FROM.value)
    best = best_profiled_variant(profiled)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise cli.UserError(f"--variants_from_profile: expected JSONs written "
                        f"with --profile_variants, found one it cannot read "
                        f"({type(e).__name__}: {cli.one_line(e)})") from e
  if _JSON_OUT.value is not None:
    cli.writable_file("--json_out", _JSON_OUT.value)
  return values, key_heads, profiled, best


def main(argv):
  del argv  # cli.run refuses positional arguments
  values, key_heads, profiled, best = check_flags()
  if _ONCE.value or _OP_MEMORY.value:
    dtype = jnp.dtype(gdr_shapes.DTYPE.value)
    inputs = make_inputs(values["batch"], values["seq_len"], key_heads,
                         values["heads"], values["dk"], values["dv"], dtype,
                         _SEED.value)
    tilings = [("pallas", None)] + [parse_variant(spec)
                                    for spec in _VARIANTS.value]
    if _ONCE.value:
      run_once(tilings, inputs, dtype, _INTERPRET.value)
    if _OP_MEMORY.value:
      states = chunk_states_bytes(values["batch"], values["heads"],
                                  values["seq_len"], values["dk"],
                                  values["dv"], dtype)
      for label, bs in tilings:
        n = op_temp_bytes(inputs, dtype, _INTERPRET.value, bs)
        print(f"measured {label}: op-level temporaries {n / 2**20:.1f} MiB "
              f"(per-chunk states {states / 2**20:.1f} MiB)", flush=True)
    return
  variants = tuple(_VARIANTS.value)
  if _VARIANTS_FROM.value:
    print(f"fastest profiled tiling in {_VARIANTS_FROM.value}: "
          f"{best or 'the defaults'}"
          f"{'' if profiled else ' (no profile found)'}", flush=True)
    if best is not None and best not in variants:
      variants += (best,)
  result = run(key_heads=key_heads, dtype=gdr_shapes.DTYPE.value,
               implementations=_IMPLS.value, interpret=_INTERPRET.value,
               seed=_SEED.value, pallas_variants=variants,
               fla_bypass_hopper_check=_FLA_HOPPER_BYPASS.value,
               profile=_PROFILE.value,
               profile_variants=tuple(_PROFILE_VARIANTS.value),
               progress_path=_JSON_OUT.value,
               seq_splits=tuple(cli.int_list("--seq_splits",
                                             _SEQ_SPLITS.value)), **values)
  c = result["config"]
  print(f"gated delta rule on {result['device']} ({result['backend']}), "
        f"jax {result['jax_version']}: B={c['batch']} T={c['seq_len']} "
        f"hk={c['key_heads']} hv={c['heads']} dk={c['dk']} dv={c['dv']} "
        f"{c['dtype']}{' interpret' if c['interpret'] else ''}")
  print(format_table(result))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
