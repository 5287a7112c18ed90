"""experiments/bench_gated_delta_rule.py end to end (Pallas in interpret mode).

Runs the script as a command (its absl flags would clash with other
experiment modules imported in the same process) at a tiny shape and checks
what it reports: every implementation and variant timed, each agreeing with
the chunked jnp rule, FLA reported as skipped without a CUDA device, and the
per-kernel profile of the split pipeline.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests import tolerances

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_KERNELS = ["prep", "state_fwd", "output", "prep (with T)", "bwd_local",
            "state_bwd", "bwd_out", "wy"]
# BlockSizes.output_in_state: one sequential forward kernel.
_KERNELS_OUTPUT_IN_STATE = ["prep", "state_out", "prep (with T)",
                            "bwd_local", "state_bwd", "bwd_out", "wy"]
# BlockSizes.recompute_states "paired": the backward forms the states
# again (profiled unblocked: its state_fwd and state_bwd timed as the one
# launch that runs them, bwd_pdo in place of bwd_local).
_PAIRED = "recompute_states=paired/fwd_block=64/bwd_block=64"
_KERNELS_PAIRED = ["prep", "state_fwd", "output", "prep (with T)", "bwd_pdo",
                   "state_pair (state_bwd beside state_fwd)", "bwd_out", "wy"]


def _run_python(code: str, *args: str) -> str:
  """Runs `code` in a fresh CPU process (the benchmark module defines absl
  flags); returns its stripped stdout."""
  out = subprocess.run([sys.executable, "-c", code, *args], check=True,
                       cwd=_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return out.stdout.strip()


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="interpret-mode smoke run for CPU machines")
def test_bench_reports_every_implementation(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run(
      [sys.executable, "-m", "experiments.bench_gated_delta_rule",
       "--interpret", "--dtype", "float32", "--seq_len", "100",
       "--implementations", "pallas,chunked,fla",
       "--pallas_variants",
       "solve_block=16,kernels=fused,output_in_state=True",
       "--profile_kernels", "--profile_variants",
       f"output_in_state=True,{_PAIRED}",
       "--seq_splits", "2", "--iters", "1",
       "--warmup", "0",
       "--seed", "3", "--json_out", str(out)],
      check=True, cwd=_ROOT, env=env, timeout=900)
  result = json.loads(out.read_text())
  timed = {(r["implementation"], r["mode"]) for r in result["results"]}
  impls = ["pallas", "chunked", "pallas[solve_block=16]",
           "pallas[kernels=fused]", "pallas[output_in_state=True]",
           "pallas/split2", "chunked/split2"]
  assert timed == {(i, m) for i in impls
                   for m in ("fwd", "fwd_queued", "fwd_bwd", "fwd_bwd_queued")}
  assert all(r["ms"] > 0 for r in result["results"])
  rtol, _ = tolerances.tol(jnp.float32)
  assert set(result["rel_err_vs_chunked"]) == set(impls) - {"chunked"}
  for impl, err in result["rel_err_vs_chunked"].items():
    assert err["output"] < rtol and err["final_state"] < rtol, (impl, err)
    assert err["grads"] < rtol, (impl, err)
  assert "fla" in result["skipped"]
  assert set(result["fwd_bwd_temp_bytes"]) == set(impls)
  assert all(b > 0 for b in result["fwd_bwd_temp_bytes"].values())
  # 2 value heads, 2 chunks, 32 x 32 states in float32.
  assert result["chunk_states_bytes"] == 1 * 2 * 2 * 32 * 32 * 4
  profile = result["kernel_profile"]
  assert [r["kernel"] for r in profile if r["blocks"] == "pallas"] == _KERNELS
  assert [r["kernel"] for r in profile
          if r["blocks"] == "pallas[output_in_state=True]"] == (
              _KERNELS_OUTPUT_IN_STATE)
  assert [r["kernel"] for r in profile
          if r["blocks"] == f"pallas[{_PAIRED}]"] == _KERNELS_PAIRED
  assert all(r["ms"] > 0 and r["ms_queued"] > 0 and r["first_call_s"] > 0
             for r in profile)
  # The traffic floor: the backward's prep also writes T; with
  # output_in_state the forward's prep reads q and writes P.
  floor = {(r["blocks"], r["kernel"]): r["floor_ms"] for r in profile}
  assert all(f > 0 for f in floor.values())
  assert floor["pallas", "prep (with T)"] > floor["pallas", "prep"]
  assert (floor["pallas[output_in_state=True]", "prep"]
          > floor["pallas", "prep"])


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="interpret-mode smoke run for CPU machines")
def test_once_runs_each_tiling_once_untimed():
  """--once (for ncu): each tiling's forward+backward once, no timing."""
  out = subprocess.run(
      [sys.executable, "-m", "experiments.bench_gated_delta_rule",
       "--interpret", "--dtype", "float32", "--seq_len", "70", "--once",
       "--pallas_variants", "output_in_state=True"],
      check=True, cwd=_ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.splitlines()
  assert out == [
      "ran pallas forward+backward once (finite gradients)",
      "ran pallas[output_in_state=True] forward+backward once "
      "(finite gradients)"], out


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="interpret-mode smoke run for CPU machines")
def test_op_memory_compiles_each_tiling_as_an_operation():
  """--op_memory: XLA's temporaries of each tiling's forward+backward with
  the cotangents as arguments, compiled and not run (meaningful on a GPU;
  here a smoke run: one line per tiling, a positive count)."""
  out = subprocess.run(
      [sys.executable, "-m", "experiments.bench_gated_delta_rule",
       "--interpret", "--dtype", "float32", "--seq_len", "70",
       "--op_memory", "--pallas_variants", "output_in_state=True"],
      check=True, cwd=_ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.splitlines()
  labels = ["pallas", "pallas[output_in_state=True]"]
  assert [line.split(":")[0] for line in out] == [
      f"measured {label}" for label in labels], out
  for line in out:
    mib = float(line.split("op-level temporaries ")[1].split(" MiB")[0])
    assert mib > 0, line


def test_timed_forward_backward_returns_the_output():
  """The timed forward+backward returns o beside the gradients, as a
  training step reads it (and FLA's timed forward+backward forms it):
  otherwise XLA drops the kernels that only form o (the three-kernel
  forward's output kernel; seen on the H100, 2026-11-27) and the time
  leaves them out."""
  code = (
      "import jax, jax.numpy as jnp\n"
      "from experiments.bench_gated_delta_rule import _jax_fns, make_inputs\n"
      "inputs = make_inputs(1, 70, 1, 2, 16, 16, jnp.float32, seed=5)\n"
      "args, fwd, fwd_bwd = _jax_fns('chunked', inputs, jnp.float32, True,\n"
      "                              None, 1)\n"
      "o, grads = jax.jit(fwd_bwd)(*args)\n"
      "want = jax.jit(fwd)(*args)[0]\n"
      "print(float(jnp.max(jnp.abs(o - want)) / jnp.max(jnp.abs(want))),\n"
      "      len(grads), o.shape == want.shape)\n")
  err, n_grads, same_shape = _run_python(code).split()
  assert float(err) < tolerances.tol(jnp.float32)[0]
  assert (int(n_grads), same_shape) == (5, "True")


def test_best_profiled_variant():
  """The tiling picked for end-to-end timing is the one whose kernels sum
  to the least time: the queued (device) times when every row has one,
  else the latencies (run in a subprocess: the module defines absl
  flags)."""
  code = (
      "import random\n"
      "from experiments.bench_gated_delta_rule import best_profiled_variant\n"
      "rng = random.Random(0)\n"
      "labels = ['pallas', 'pallas[num_stages=3]', 'pallas[block_dv=16]']\n"
      "for key in ('ms', 'ms_queued'):\n"
      "  for _ in range(20):\n"
      "    rows = [dict(blocks=l, kernel=k, ms=rng.uniform(0.1, 5.0))\n"
      "            for l in labels for k in ('prep', 'state_fwd', 'output')]\n"
      "    for r in rows:\n"
      "      if key == 'ms_queued':\n"
      "        r['ms_queued'] = rng.uniform(0.1, 5.0)\n"
      "    sums = {l: sum(r[key] for r in rows if r['blocks'] == l)\n"
      "            for l in labels}\n"
      "    best = min(sums, key=sums.get)\n"
      "    want = None if best == 'pallas' else best[7:-1]\n"
      "    assert best_profiled_variant(rows) == want, (rows, want)\n"
      "assert best_profiled_variant([]) is None\n"
      "print('ok')\n")
  assert _run_python(code) == "ok"


def test_merged_profiles_count_the_defaults_once(tmp_path):
  """Two profiling runs (each also timing the defaults) and a run that
  never wrote its file: the rows of both files are merged, the defaults'
  kernels taken once, from the first file."""
  runs = {
      "a.json": {"pallas": 1.0, "pallas[solve_block=16]": 1.2},
      # The second run's defaults were slower (noise): counted twice, or
      # from the second file, they would lose to its variant.
      "b.json": {"pallas": 3.0, "pallas[sub_chunk=32]": 1.1},
  }
  for name, per_kernel in runs.items():
    rows = [dict(blocks=label, kernel=k, ms=ms)
            for label, ms in per_kernel.items() for k in ("prep", "wy")]
    (tmp_path / name).write_text(json.dumps(dict(kernel_profile=rows)))
  paths = [str(tmp_path / n) for n in ("a.json", "missing.json", "b.json")]
  code = (
      "import sys\n"
      "from experiments.bench_gated_delta_rule import (\n"
      "    best_profiled_variant, merge_profiles)\n"
      "rows = merge_profiles(sys.argv[1:])\n"
      "assert len(rows) == 6, rows\n"
      "assert {r['ms'] for r in rows if r['blocks'] == 'pallas'} == {1.0}\n"
      "print(best_profiled_variant(rows))\n")
  assert _run_python(code, *paths) == "None"


def test_queued_timing_waits_once_for_calls_issued_back_to_back():
  """The queued mode issues its calls without waiting and waits once, so it
  times a simulated device (each call queues 20 ms of work that only the
  wait runs out; the host takes no time) at 20 ms per call; the latency
  mode, which waits after every call, times the same."""
  code = (
      "import time\n"
      "from experiments import bench_gated_delta_rule as b\n"
      "pending, waits = [0], [0]\n"
      "def fn():\n"
      "  pending[0] += 1\n"
      "  return pending[0]\n"
      "def sync(out):\n"
      "  waits[0] += 1\n"
      "  time.sleep(0.02 * pending[0])\n"
      "  pending[0] = 0\n"
      "ms = b._queued_ms(fn, sync, 5)\n"
      "assert waits[0] == 2, waits\n"  # the warm call and the end
      "assert 19.0 < ms < 30.0, ms\n"
      "waits[0] = 0\n"
      "ms = b._median_ms(fn, sync, 5, 1)\n"
      "assert waits[0] == 1 + 1 + 5, waits\n"
      "assert 19.0 < ms < 30.0, ms\n"
      "print('ok')\n")
  assert _run_python(code) == "ok"


def test_profile_marker_lowers_through_triton():
  """`--once` launches a marker kernel before each tiling for
  `ncu_summary --by_tiling`. Lowered for an (abstract) H100 it must take
  the Triton lowering as the kernels do: without Triton compiler params
  Pallas picks Mosaic GPU there, which refuses the marker's 64-byte
  copy."""
  code = (
      "import jax, jax.numpy as jnp\n"
      "from pallas_kernels.tools import triton_resources as tr\n"
      "from experiments import bench_gated_delta_rule as b\n"
      "try:\n"
      "  target = tr.abstract_target('cuda')\n"
      "except RuntimeError as e:\n"
      "  print('no-target', e); raise SystemExit\n"
      "with target:\n"
      "  x = jax.ShapeDtypeStruct((16,), jnp.float32)\n"
      "  low = b._marker(False).trace(x).lower(\n"
      "      lowering_platforms=('cuda',))\n"
      "text = low.as_text()\n"
      "print('triton' if tr.TRITON_CALL in text else 'other',\n"
      "      f'name = \"{b.MARKER}\"' in text)\n")
  out = _run_python(code)
  if out.startswith("no-target"):
    pytest.skip(f"this jax cannot lower for a GPU without one: {out}")
  assert out == "triton True", out
