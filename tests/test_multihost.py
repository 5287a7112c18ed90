"""Two processes x 4 CPU devices on localhost, against one process.

Each test starts two interpreters that join one JAX run
(`--distributed --coordinator_address 127.0.0.1:PORT --num_processes 2
--process_id i --num_devices 4`: jax_num_cpu_devices=4 and gloo CPU
collectives in each, `jax.distributed.initialize`, 8 devices in the mesh),
on a free port, each with a time limit:

  * experiments.long_context --verify: the sharded train step (loss and
    gradients) over data:2,seq:4 and over seq:8, and the forward logits
    over seq:8, against the unsharded model on one device, within the
    float32 tolerance of tests/tolerances.py; process 0 alone writes the
    report, which names 2 processes and 8 devices.
  * experiments.train (MQAR runlocal, 20 steps, a checkpoint every 5, the
    state ZeRO-3 over fsdp:8, so that each process holds half of every
    weight): process 1 dies (SIGKILL) when the step-15 checkpoint is due;
    process 0 must end too, in bounded time. The checkpoint of step 10
    then resumes in two processes and, copied, in one process on one
    device; both reproduce the losses of an uninterrupted one-device run
    of the same config (this pytest process), within the float32
    tolerance, and metrics.csv holds each step once. The two-process
    resume also evaluates and exports (--export_hf): each process built
    only its half of every batch (4 of 8 rows), process 0 alone wrote
    eval.json and the export, once each (the worker's trace lines), and
    both are complete: eval.json's held-out loss and the exported weights
    (`qwen_jax.load_hf_checkpoint`) equal the one-device run's within the
    float32 tolerance.
  * A bad --mesh in process 1 only ends both processes with its message
    (process 0's line names process 1); no hang.

The flag checks of experiments/multihost.py run in process. Sizes: the
tiny preset cut to two layers at 64 tokens (8 per sequence shard) for
--verify; the runlocal MQAR model (width 32, two layers, batch 8 of 32
tokens) for training. Measured on a 2-core machine shared with other work
(load average 11 to 12): the --verify runs 43 s (forward) and 99 to 103 s
(train) each, the training test 214 s (20 s of it the wait for the dead
process's heartbeat), the bad flag 8 s: 472 s in all, 3.4 CPU-minutes
(user + system), so about 2 minutes on two idle cores.
"""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import cli
from experiments import multihost
from experiments import train as train_script
from experiments.configs import mqar as mqar_config
from qwen_jax import checkpoint
from tests import tolerances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Seconds a two-process command may take (each interpreter imports jax,
# compiles and runs on two shared cores).
_LIMIT_S = 300
# --distributed_timeout of the runs: how long the survivors of a dead
# process wait before the runtime ends them.
_PEER_TIMEOUT_S = 60
# The same for the run whose process 1 dies: process 0 ends this long
# after (the runtime's heartbeat timeout).
_KILLED_PEER_TIMEOUT_S = 20
_F32_RTOL = tolerances.tol("float32")[0]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(extra=None):
  env = dict(os.environ)
  # The device count comes from --num_devices (jax_num_cpu_devices).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith(_COUNT_FLAG))
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  env.update(extra or {})
  return env


def _start(module, args_of, env=None, peer_timeout=_PEER_TIMEOUT_S):
  """Starts the two processes of `module`; args_of(i) are process i's
  flags. Returns the Popen objects."""
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", module, "--distributed",
           "--coordinator_address", f"127.0.0.1:{port}",
           "--num_processes", "2", "--process_id", str(i), "--num_devices",
           "4", "--distributed_timeout", str(peer_timeout), *args_of(i)]
    procs.append(subprocess.Popen(
        cmd, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  return procs


def _finish(procs, limit=_LIMIT_S):
  """[(returncode, stdout, stderr)] of each process; kills both and fails
  past `limit` seconds (a hang)."""
  deadline = time.time() + limit
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      texts = [q.communicate() for q in procs]
      pytest.fail(f"the processes did not end within {limit} s: "
                  f"{[t[1][-3000:] for t in texts]}")
    out.append((p.returncode, stdout, stderr))
  return out


def _show(results):
  return "\n".join(f"--- process {i}: exit {rc}\n{so[-3000:]}\n{se[-5000:]}"
                   for i, (rc, so, se) in enumerate(results))


# ------------------------------------------------------------- --verify
_VERIFY = ["--verify", "--preset", "tiny", "--ratio", "1:1", "--num_layers",
           "2", "--seq_len", "64", "--attention_block", "8", "--loss_chunk",
           "16", "--tolerance", str(_F32_RTOL)]


@pytest.mark.parametrize("mesh, mode, batch", [
    ("data:2,seq:4", "train", 2),
    ("seq:8", "train", 1),
    ("seq:8", "forward", 1),
])
def test_verify_in_two_processes_equals_one_device(tmp_path, mesh, mode,
                                                   batch):
  out = tmp_path / "verify.json"
  results = _finish(_start("experiments.long_context", lambda i: [
      *_VERIFY, "--mesh", mesh, "--mode", mode, "--batch", str(batch),
      "--json_out", str(out)]))
  assert all(rc == 0 for rc, _, _ in results), _show(results)
  report = json.loads(out.read_text())
  assert report["processes"] == 2 and report["num_devices"] == 8
  assert report["mesh"] == mesh and report["passed"], report
  dev = report["deviations"]
  assert set(dev) == ({"loss", "grads"} if mode == "train" else
                      {"logits"}), dev
  assert all(0 <= v <= _F32_RTOL for v in dev.values()), dev
  # The report is printed once, by process 0.
  assert "max |sharded - unsharded|" in results[0][1]
  assert "max |sharded" not in results[1][1], results[1][1]


def test_a_bad_flag_in_one_process_ends_both():
  t0 = time.time()
  results = _finish(_start("experiments.long_context", lambda i: [
      *_VERIFY, "--mode", "train",
      "--mesh", "seq:8" if i == 0 else "seq:16"]), limit=120)
  took = time.time() - t0
  (rc0, _, err0), (rc1, _, err1) = results
  assert rc0 == 1 and rc1 == 1, _show(results)
  line1 = err1.strip().splitlines()[-1]
  assert line1.startswith("experiments.long_context: error: --mesh "
                          "'seq:16'"), _show(results)
  assert "expected the device count 8" in line1
  line0 = err0.strip().splitlines()[-1]
  assert line0.startswith("experiments.long_context: error: process 1 of 2 "
                          "failed: --mesh 'seq:16'"), _show(results)
  assert took < 120


# -------------------------------------------------------------- training
def _config():
  config = mqar_config.get_config("runlocal")
  config.train.num_steps = 20
  config.train.checkpoint_every = 5
  config.train.log_every = 1
  config.train.keep_checkpoints = 5
  return config


_OVERRIDES = ["--config.train.num_steps=20", "--config.train.checkpoint_every=5",
              "--config.train.log_every=1", "--config.train.keep_checkpoints=5"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  steps = [int(r["step"]) for r in rows]
  assert steps == sorted(set(steps)), steps  # each step once
  return {int(r["step"]): float(r["loss"]) for r in rows}


def _assert_losses_match(got, want, steps):
  assert sorted(got) == list(steps), sorted(got)
  for s in steps:
    assert abs(got[s] - want[s]) <= _F32_RTOL * (1 + abs(want[s])), (
        s, got[s], want[s])


def _train_two(workdir, env=None, peer_timeout=_PEER_TIMEOUT_S, extra=()):
  return _start("tests.multihost_worker", lambda i: [
      "--config=experiments/configs/mqar.py:runlocal", *_OVERRIDES,
      f"--workdir={workdir}", "--mesh", "fsdp:8", *extra], env=env,
      peer_timeout=peer_timeout)


def _traced(stderr, what):
  """What a worker's trace lines say it did (`tests/multihost_worker.py`):
  the rows it built or the files it wrote, in order."""
  head = f" {what} "
  return [line.split(head, 1)[1] for line in stderr.splitlines()
          if line.startswith("trace: process ") and head in line]


def _weights(folder):
  cfg, params = checkpoint.load_hf_checkpoint(folder)
  return cfg, {jax.tree_util.keystr(k): np.asarray(v) for k, v in
               jax.tree_util.tree_leaves_with_path(params)}


def test_two_process_training_killed_resumes_like_one_device(tmp_path):
  # The uninterrupted reference: one process, one device, no mesh.
  ref = str(tmp_path / "ref")
  ref_export = str(tmp_path / "ref_hf")
  train_script.run(_config(), ref, progress=False, export_hf=ref_export)
  want = _losses(ref)
  assert sorted(want) == list(range(1, 21))

  # Two processes; process 1 dies when checkpoint 15 is due.
  workdir = str(tmp_path / "run")
  t0 = time.time()
  results = _finish(_train_two(workdir, {"QWEN_JAX_TEST_KILL_AT": "1:15"},
                               peer_timeout=_KILLED_PEER_TIMEOUT_S))
  took = time.time() - t0
  (rc0, _, _), (rc1, _, _) = results
  assert rc1 == -signal.SIGKILL, _show(results)
  assert rc0 not in (0, None), _show(results)  # ended, not hung
  # The runtime names the silent process.
  assert "stopped sending heartbeats" in results[0][2], _show(results)
  assert took < _LIMIT_S
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                         "checkpoints"))
                 if n.isdigit())
  assert steps and steps[-1] == 10, steps
  # One checkpoint written by both processes: each weight is split
  # between them (fsdp:8), and the restore below needs every shard.
  crashed = str(tmp_path / "crashed")
  shutil.copytree(workdir, crashed)

  # The same command resumes from step 10 in two processes, then
  # evaluates and exports...
  export = str(tmp_path / "hf")
  results = _finish(_train_two(workdir, {"QWEN_JAX_TEST_TRACE": "1"},
                               extra=[f"--export_hf={export}"]))
  assert all(rc == 0 for rc, _, _ in results), _show(results)
  # Each process built only its half of every batch (training and
  # evaluation: 8 rows over fsdp:8, 4 devices each)...
  built = [set(_traced(err, "builds rows")) for _, _, err in results]
  assert sorted(map(len, built)) == [1, 1] and built[0] | built[1] == {
      "0:4", "4:8"}, built
  # ... and process 0 alone wrote the run's files, eval.json and the
  # export once each.
  wrote = [_traced(err, "writes") for _, _, err in results]
  assert wrote[1] == [], wrote
  eval_path = os.path.join(workdir, train_script.EVAL_FILE)
  assert wrote[0].count(eval_path) == 1 and wrote[0].count(export) == 1, (
      wrote)
  with open(eval_path) as f:
    summary = json.load(f)
  with open(os.path.join(ref, train_script.EVAL_FILE)) as f:
    ref_summary = json.load(f)
  assert summary["step"] == 20 and summary["train"]["resumed_from"] == 10
  assert summary["export_hf"] == os.path.abspath(export)
  assert summary["eval"]["batches"] == ref_summary["eval"]["batches"] == 2
  assert summary["eval"]["tokens"] == ref_summary["eval"]["tokens"]
  got, ref_value = summary["eval"]["loss"], ref_summary["eval"]["loss"]
  assert abs(got - ref_value) <= _F32_RTOL * (1 + abs(ref_value)), (
      got, ref_value)
  # Accuracy counts argmax hits: at most one near-tie may fall the other
  # way under the sharded run's rounding.
  assert abs(summary["eval"]["accuracy"] - ref_summary["eval"]["accuracy"]
             ) <= 1.0 / summary["eval"]["tokens"], (summary, ref_summary)
  # The export is complete: it loads, with the one-device run's weights.
  got_cfg, got = _weights(export)
  want_cfg, want_weights = _weights(ref_export)
  assert got_cfg == want_cfg and set(got) == set(want_weights)
  for name, value in got.items():
    # The losses' criterion, per weight (measured: 9.4e-5 at most).
    diff = np.abs(value - want_weights[name])
    assert np.all(diff <= _F32_RTOL * (1 + np.abs(want_weights[name]))), (
        name, float(diff.max()))
  assert "resumed: from step 10" in results[0][1], _show(results)
  assert "resumed:" not in results[1][1], results[1][1]  # process 0's
  _assert_losses_match(_losses(workdir), want, range(1, 21))
  with open(os.path.join(workdir, "run_history.json")) as f:
    events = [e["event"] for e in json.load(f)["entries"]]
  assert events == ["start", "resume"], events  # written once each

  # ... and in one process on one device.
  train_script.run(_config(), crashed, progress=False)
  _assert_losses_match(_losses(crashed), want, range(1, 21))


# ------------------------------------------------------------ flag checks
@pytest.mark.parametrize("args, flag", [
    (dict(distributed=False, process_id=0), "--process_id"),
    (dict(distributed=False, coordinator_address="h:1"),
     "--coordinator_address"),
    (dict(coordinator_address="localhost"), "--coordinator_address"),
    (dict(coordinator_address="127.0.0.1:70000"), "--coordinator_address"),
    (dict(num_processes=0), "--num_processes"),
    (dict(num_processes=2, process_id=2), "--process_id"),
    (dict(process_id=-1), "--process_id"),
    (dict(timeout=0), "--distributed_timeout"),
    (dict(num_devices=0), "--num_devices"),
])
def test_distributed_flags_are_checked_before_joining(args, flag):
  full = dict(distributed=True, coordinator_address=None,
              num_processes=None, process_id=None, timeout=300,
              num_devices=None)
  full.update(args)
  with pytest.raises(cli.UserError, match=f"^{flag}: expected"):
    multihost.check_flags(**full)


def test_good_distributed_flags_pass():
  multihost.check_flags(True, "127.0.0.1:12355", 2, 1, 30, 4)
  multihost.check_flags(True, "[::1]:8476", None, None, 300, None)
  multihost.check_flags(False, None, None, None, 300, 8)
