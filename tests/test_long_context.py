"""experiments/long_context.py: --verify, --aot reports and bad meshes.

The script runs in fresh interpreters: XLA reads the fake device count
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) once, when its
backend starts, and this pytest process may already have started it with
one device (see tests/test_sharding_8_devices.py). The HLO parser and the
pass/fail rule are tested in process on hand-written inputs.

Sizes: the tiny preset cut to two layers (one Gated DeltaNet, one attention
layer: `--ratio 1:1 --num_layers 2`) to keep compile times short; --verify
of a train step at 256 tokens on seq:8 (32 tokens per shard, attention
blocks of 16, remat "full"); --aot of the forward pass at 512 and 2048
tokens on seq:8.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import long_context
from pallas_kernels.gated_delta_rule import gated_delta_rule
from qwen_jax import sequence_parallel
from qwen_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _run(args, devices=None, timeout=600):
  """Runs the script; `devices`: fake CPU devices through XLA_FLAGS."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith(_COUNT_FLAG)]
  if devices:
    flags.append(f"{_COUNT_FLAG}={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
      [sys.executable, "-m", "experiments.long_context", *args], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _output(proc):
  return (proc.stdout[-6000:] + "\n" + proc.stderr[-6000:]).strip()


# ------------------------------------------------------------- --verify
def test_verify_train_sharded_equals_unsharded(tmp_path):
  """seq:8 train step: loss and gradients within float32 tolerance."""
  out = tmp_path / "verify.json"
  # --gdr_block 16: two blocks per 32-token shard, so the blocked state
  # passing runs too (tests/test_sharding.py covers one call per shard).
  proc = _run(["--verify", "--preset", "tiny", "--ratio", "1:1",
               "--num_layers", "2", "--mode", "train", "--seq_len", "256",
               "--mesh", "seq:8", "--attention_block", "16",
               "--loss_chunk", "16", "--gdr_block", "16", "--json_out",
               str(out)], devices=8)
  assert proc.returncode == 0, _output(proc)
  report = json.loads(out.read_text())
  assert report["num_devices"] == 8 and report["mesh"] == "seq:8"
  assert report["remat"] == "full" and report["dtype"] == "float32"
  dev = report["deviations"]
  assert set(dev) == {"loss", "grads"}, dev
  assert report["passed"] and report["tolerance"] == 2e-4
  assert all(0 <= v <= 2e-4 for v in dev.values()), dev
  for name in dev:
    assert re.search(rf"{name}\s+\S+\s+ok", proc.stdout), proc.stdout


@pytest.mark.parametrize("devs, tol, bad", [
    ({"logits": 1e-6, "grads": 3e-4}, 2e-4, ["grads"]),
    ({"logits": float("nan")}, 2e-4, ["logits"]),
    ({"logits": 1e-6, "loss": 0.0}, 2e-4, []),
])
def test_verify_pass_rule(devs, tol, bad):
  got = long_context.failures(devs, tol)
  assert [m.split(":")[0] for m in got] == bad


def test_max_rel_dev():
  want = {"a": np.array([1.0, -4.0]), "b": np.array([2.0])}
  got = {"a": np.array([1.0, -4.0]), "b": np.array([2.2])}
  assert long_context.max_rel_dev(got, want) == pytest.approx(0.05)
  assert long_context.max_leaf_rel_dev(got, want) == pytest.approx(0.1)


def test_blocked_gated_delta_rule_one_shard():
  """SPContext.gdr_block: blocks carry the state; documents reset it."""
  b, t, hk, hv, dk, dv = 2, 96, 2, 4, 16, 8
  impl = "recurrent"  # compiles fastest; the blocking is what is tested
  rng = np.random.default_rng(0)  # NumPy inputs: no eager jax ops to compile

  def normal(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  q, k = unit(normal(b, t, hk, dk)), unit(normal(b, t, hk, dk))
  v, s0, w = normal(b, t, hv, dv), normal(b, hv, dk, dv), normal(b, t, hv, dv)
  # Slow decays (e^G over a 32-token block about 0.6): the state a block
  # hands the next keeps most of what came before it.
  g = -np.log1p(np.exp(normal(b, t, hv))) * 0.02
  beta = 1 / (1 + np.exp(-normal(b, t, hv)))
  # Row 0: a document starts on a block edge (64); row 1: mid-block (50).
  seg = (np.arange(t)[None] >= np.array([[64], [50]])).astype(np.int32)
  mesh = sharding.make_mesh("seq:1", jax.devices()[:1])

  def loss(blocked, *args):
    if blocked:
      with sharding.activate(mesh, {"gdr_block": 32}):
        o, s = sequence_parallel.gated_delta_rule(
            *args, segment_ids=seg, chunk_size=16, implementation=impl)
    else:
      o, s = gated_delta_rule(*args, segment_ids=seg, chunk_size=16,
                              implementation=impl)
    return jnp.sum(o * w) + jnp.sum(s), (o, s)

  def grad(blocked):
    return jax.jit(jax.grad(lambda *a: loss(blocked, *a),
                            argnums=range(6), has_aux=True))

  args = (q, k, v, g, beta, s0)
  want_g, (want_o, want_s) = grad(False)(*args)
  got_g, (got_o, got_s) = grad(True)(*args)
  jaxpr = str(jax.make_jaxpr(lambda *a: loss(True, *a))(*args))
  assert "scan" in jaxpr and "remat" in jaxpr  # the blocks really ran
  np.testing.assert_allclose(got_o, want_o, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
  for a, b_ in zip(got_g, want_g):
    b_ = np.asarray(b_)
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-4 * np.abs(b_).max())


# ---------------------------------------------------------------- --aot
def _aot(tmp_path, seq_len):
  out = tmp_path / f"aot_{seq_len}.json"
  proc = _run(["--aot", "--preset", "tiny", "--ratio", "1:1",
               "--num_layers", "2", "--mode", "forward", "--logits",
               "hidden", "--mesh", "seq:8", "--seq_len", str(seq_len),
               "--attention_block", "64", "--json_out", str(out)],
              devices=8)
  assert proc.returncode == 0, _output(proc)
  return json.loads(out.read_text()), proc.stdout


def test_aot_memory_and_collectives(tmp_path):
  """Positive memory; GDN state passing bytes independent of seq_len."""
  short, text = _aot(tmp_path, 512)
  long, _ = _aot(tmp_path, 2048)
  assert "per-device memory" in text and "collectives" in text
  for r in (short, long):
    assert r["num_devices"] == 8 and r["layers"] == "1 GDN + 1 attention"
    mem = r["memory"]
    for k in ("arguments", "outputs", "temporaries", "total"):
      assert mem[k] > 0, (k, mem)
    assert mem["total"] >= mem["arguments"] + mem["temporaries"]
    # Parameters are sharded (ZeRO-3 over seq), not replicated.
    assert r["params_bytes_per_device"] < r["params_bytes"] / 4
    assert r["cost"]["flops"] > 0
    assert r["collectives"]["unknown_trip_counts"] == 0
  # Activations grow with the sequence.
  assert long["memory"]["temporaries"] > 2 * short["memory"]["temporaries"]

  gdn = [r["collectives"]["sources"]["gdn"] for r in (short, long)]
  att = [r["collectives"]["sources"]["attention"] for r in (short, long)]
  for kind in ("all-gather", "collective-permute"):
    # The (A, B) state transfers and the conv halo: fixed size.
    assert gdn[0][kind]["result_bytes"] > 0, gdn[0]
    assert gdn[0][kind]["result_bytes"] == gdn[1][kind]["result_bytes"]
    assert gdn[0][kind]["executions"] == gdn[1][kind]["executions"]
  # The parser does see traffic that grows: attention gathers all K/V.
  assert (att[1]["all-gather"]["result_bytes"]
          == 4 * att[0]["all-gather"]["result_bytes"] > 0)


@pytest.mark.parametrize("dispatch", ["gather", "all_to_all"])
def test_aot_mixture_of_experts_on_an_expert_axis(tmp_path, dispatch):
  """tiny-moe's train step over fsdp x expert x seq: the experts are
  split over the expert axis and their collectives counted apart: token
  gathers and reduce-scatters, or all-to-alls of the routed pairs."""
  out = tmp_path / "aot_moe.json"
  proc = _run(["--aot", "--preset", "tiny-moe", "--mesh",
               "fsdp:2,expert:2,seq:2", "--seq_len", "256", "--batch", "4",
               "--attention_block", "64", "--moe_dispatch", dispatch,
               "--json_out", str(out)], devices=8)
  assert proc.returncode == 0, _output(proc)
  r = json.loads(out.read_text())
  assert r["layers"] == ("3 GDN + 1 attention, MoE 8 experts top-2, "
                         f"{dispatch} dispatch"), r
  assert r["mesh"] == "fsdp:2,expert:2,seq:2"
  assert r["params_bytes_per_device"] < r["params_bytes"] / 4
  experts = r["collectives"]["sources"]["experts"]
  # Forward and backward.
  used = (("all-gather", "reduce-scatter") if dispatch == "gather"
          else ("all-to-all",))
  for kind in used:
    assert experts[kind]["ops"] > 0 and experts[kind]["result_bytes"] > 0
  unused = ({"all-to-all"} if dispatch == "gather"
            else {"all-gather", "reduce-scatter"})
  assert not unused & {k for k, v in experts.items()
                       if isinstance(v, dict) and v.get("ops")}, experts


def test_capacity_factor_without_the_all_to_all_is_one_line(tmp_path):
  proc = _run(["--aot", "--preset", "tiny-moe", "--mesh", "expert:2",
               "--seq_len", "64", "--moe_capacity_factor", "1.5"], devices=2)
  assert proc.returncode == 1, _output(proc)
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "moe_capacity_factor" in err[0], err


@pytest.mark.parametrize("args,names", [
    (["--preset", "tiny", "--mesh", "expert:2", "--moe_dispatch",
      "all_to_all"], "dense 'tiny'"),
    (["--preset", "tiny-moe", "--mesh", "seq:2", "--moe_dispatch",
      "all_to_all"], "expert axis"),
    (["--preset", "tiny-moe", "--mesh", "fsdp:1,expert:1,seq:2",
      "--moe_dispatch", "all_to_all", "--moe_capacity_factor", "2"],
     "expert axis"),
])
def test_moe_flags_that_would_be_ignored_are_one_line(args, names):
  """The dispatch flags on a dense model, or the all-to-all without an
  expert axis to exchange over, are refused before any compilation."""
  proc = _run(["--verify", "--seq_len", "64", *args], devices=2)
  assert proc.returncode == 1, _output(proc)
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "--moe_dispatch" in err[0], err
  assert names in err[0], err


# A compiled-HLO excerpt: one line per instruction, as XLA prints it.
_HLO = """HloModule m, entry_computation_layout={()->f32[]}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %a = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ag = f32[32,8]{1,0} all-gather(%a), dimensions={0}, metadata={op_name="jit(f)/layer_0/linear_attn/shard_map/all_gather"}
  %sl = f32[4,8]{1,0} slice(%ag), slice={[0:4], [0:8]}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %sl)
}

%cond (p.1: (s32[], f32[4,8])) -> pred[] {
  %p.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x.1: f32[4,8], y.1: bf16[16]) -> f32[] {
  %x.1 = f32[4,8]{1,0} parameter(0)
  %y.1 = bf16[16]{0} parameter(1)
  %z = s32[] constant(0)
  %tup = (s32[], f32[4,8]{1,0}) tuple(%z, %x.1)
  %w = (s32[], f32[4,8]{1,0}) while(%tup), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %cp = (bf16[16]{0}, bf16[16]{0}, u32[], u32[]) collective-permute-start(%y.1), source_target_pairs={{0,1}}, metadata={op_name="jit(f)/layer_3/self_attn/shard_map/ppermute"}
  %cpd = bf16[16]{0} collective-permute-done(%cp)
  %rs = f32[1,8]{1,0} reduce-scatter(%x.1), dimensions={0}, to_apply=%add, metadata={op_name="jit(f)/layer_1/mlp/shard_map/reduce_scatter"}
  %ar = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce(%x.1, %cpd), to_apply=%add, metadata={op_name="jit(f)/layer_0/linear_attn/shard_map/psum:jit(f)/layer_0/mlp/dot_general"}
  ROOT %r = f32[] constant(0)
}
"""  # pylint: disable=line-too-long


def test_collective_parser():
  """Trip counts, tuples, async pairs and sources on a hand-written module."""
  stats = long_context.collective_stats(_HLO)
  kinds, src = stats["kinds"], stats["sources"]
  ag = kinds["all-gather"]
  assert (ag["ops"], ag["executions"]) == (1, 3)
  assert ag["operand_bytes"] == 3 * 4 * 8 * 4
  assert ag["result_bytes"] == 3 * 32 * 8 * 4
  assert src["gdn"]["all-gather"] == ag
  cp = kinds["collective-permute"]  # -start counted once, -done skipped
  assert (cp["ops"], cp["operand_bytes"], cp["result_bytes"]) == (1, 32, 32)
  assert src["attention"]["collective-permute"]["ops"] == 1
  ar = kinds["all-reduce"]
  assert ar["result_bytes"] == ar["operand_bytes"] == 4 * 8 * 4 + 16 * 2
  assert src["other"]["all-reduce"]["ops"] == 1  # combined: not all GDN
  rs = kinds["reduce-scatter"]  # inside a MoE layer's expert shard_map
  assert (rs["ops"], rs["operand_bytes"], rs["result_bytes"]) == (
      1, 4 * 8 * 4, 8 * 4)
  assert src["experts"]["reduce-scatter"] == rs
  assert kinds["all-to-all"]["ops"] == 0
  assert stats["unknown_trip_counts"] == 0


# ------------------------------------------------------------ bad flags
@pytest.mark.parametrize("args, message", [
    (["--num_devices", "4", "--mesh", "seq:8"],
     "--mesh 'seq:8': mesh spec: axis sizes 'seq:8' multiply to 8, "
     "expected the device count 4"),
    (["--num_devices", "4", "--mesh", "data:2,pipe:2"],
     "unknown axis 'pipe'"),
    (["--num_devices", "4", "--mesh", "seq:4", "--seq_len", "66"],
     "--seq_len: expected a multiple of the mesh's seq axis (4), found 66"),
    (["--attention_block", "0"],
     "--attention_block: expected a positive integer, found 0"),
    (["--tpu_topology", "v5p:3x5x7"],
     "--tpu_topology: libtpu cannot describe 'v5p:3x5x7'"),
])
def test_bad_mesh_or_length_exits_cleanly(args, message):
  proc = _run(["--aot", "--preset", "tiny", "--seq_len", "64", *args])
  assert proc.returncode == 1, _output(proc)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines and lines[-1].startswith(
      "experiments.long_context: error: "), lines
  assert message in lines[-1], lines[-1]
