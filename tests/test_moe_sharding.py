"""Expert parallelism on 8 fake CPU devices equals one device.

XLA reads `--xla_force_host_platform_device_count=8` once, when the backend
starts, so without the flag in this process the test re-runs this file in
a fresh interpreter with it set (as tests/test_sharding_8_devices.py does
for tests/test_sharding.py) and fails with its output if it fails.

The model: "tiny-moe" (8 experts, top-2, 4 layers = one scanned 3:1
period), b = 4, t = 32, float32, about 80 s of CPU time. Meshes compose
the expert axis with data, fsdp, tensor and seq. The sharded train step's
loss (with the load-balancing term) and router metrics are compared with
the single-device `train_step.loss_and_stats`.
"""

import functools
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
IN_PROCESS = _FLAG in os.environ.get("XLA_FLAGS", "")

if IN_PROCESS:
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  import qwen_jax
  from qwen_jax import sharding
  from qwen_jax import train_step
  from tests import tolerances
  # pylint: enable=g-import-not-at-top

B, T = 4, 32
# The batch of 4 splits over expert:4 and fsdp:2 x expert:2 (tokens
# gathered within the expert group, results reduce-scattered); over
# data:2 x expert:4 it does not, and is replicated over the expert axis
# (results summed).
SPECS = ["expert:4,seq:2", "fsdp:2,tensor:2,expert:2", "data:2,expert:4"]


def test_expert_parallel_on_8_fake_devices():
  if IN_PROCESS:
    pytest.skip("runs the in-process tests below instead")
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + _FLAG).strip()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       os.path.abspath(__file__)], cwd=root, env=env, capture_output=True,
      text=True, timeout=1200, check=False)
  out = proc.stdout[-20000:] + proc.stderr[-5000:]
  assert proc.returncode == 0, out
  passed = re.search(r"(\d+) passed", proc.stdout)
  assert passed and int(passed.group(1)) >= len(SPECS) + 2, out


@functools.lru_cache(maxsize=None)
def _model():
  cfg = qwen_jax.QwenConfig.from_preset("tiny-moe", gdr_chunk_size=16)
  params = train_step.init_params(cfg, seed=3)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
  return cfg, params, ids


@functools.lru_cache(maxsize=None)
def _reference():
  """(logits, loss, grads) on one device."""
  cfg, params, ids = _model()
  batch = {"inputs": ids[:, :T], "targets": ids[:, 1:]}
  logits = np.asarray(jax.jit(qwen_jax.Qwen35(cfg).apply)(
      {"params": params}, batch["inputs"]))
  one = sharding.make_train_step(cfg, sharding.make_mesh(
      "seq:1", jax.devices()[:1]), loss_chunk=16)
  return (logits,) + tuple(one(params, batch))


@pytest.mark.skipif(not IN_PROCESS, reason="run by the test above")
@pytest.mark.parametrize("spec", SPECS)
def test_logits_and_gradients_equal_one_device(spec):
  cfg, params, ids = _model()
  batch = {"inputs": ids[:, :T], "targets": ids[:, 1:]}
  want, want_loss, want_grads = _reference()

  mesh = sharding.make_mesh(spec)
  sparams = sharding.shard_params(params, cfg, mesh)
  stacked = sparams["layers"]["layer_0"]["mlp"]["gate_up_proj"]
  assert "expert" in str(stacked.sharding.spec)  # [P, E, d, 2I]: E split
  with warnings.catch_warnings():  # the replicated batches warn: expected
    warnings.simplefilter("ignore", UserWarning)
    placed = {k: sharding.put_batch(v, mesh) for k, v in batch.items()}
  logits = sharding.make_forward(cfg, mesh)(sparams, placed["inputs"])
  tolerances.assert_close(logits, want, jnp.float32)
  loss, grads = sharding.make_train_step(cfg, mesh, loss_chunk=16)(
      sparams, placed)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree_util.tree_leaves(want_grads)):
    tolerances.assert_close(g, w, jnp.float32,
                            err_msg=jax.tree_util.keystr(path))


@pytest.mark.skipif(not IN_PROCESS, reason="run by the test above")
def test_experts_not_dividing_the_axis_are_named():
  cfg, params, ids = _model()
  cfg = cfg.replace(num_experts=6)
  params = train_step.init_params(cfg, seed=3)
  mesh = sharding.make_mesh("expert:4,seq:2")
  with pytest.raises(ValueError, match=r"num_experts: expected a multiple "
                     r"of the mesh's expert axis \(4\), found 6"):
    sharding.make_forward(cfg, mesh)(sharding.shard_params(params, cfg, mesh),
                                     sharding.put_batch(ids[:, :T], mesh))


@pytest.mark.skipif(not IN_PROCESS, reason="run by the test above")
def test_sharded_step_loss_and_router_metrics_equal_one_device():
  cfg, params, ids = _model()
  # A weight large enough that a missing load-balancing term shows.
  cfg = cfg.replace(router_aux_loss_coef=0.5)
  rng = np.random.default_rng(1)
  batch = {"inputs": ids[:, :T], "targets": ids[:, 1:],
           "loss_mask": (rng.random((B, T)) < 0.8).astype(np.float32)}
  (want_loss, want_stats), want_grads = jax.jit(jax.value_and_grad(
      lambda p: train_step.loss_and_stats(p, cfg, batch, 16),
      has_aux=True))(params)

  mesh = sharding.make_mesh("expert:4,seq:2")
  sparams = sharding.shard_params(params, cfg, mesh)
  placed = {k: sharding.put_batch(v, mesh) for k, v in batch.items()}
  loss, grads, metrics = sharding.make_train_step(
      cfg, mesh, loss_chunk=16, with_metrics=True)(sparams, placed)
  assert set(metrics) == {"tokens", "router_aux_loss", "expert_load_max",
                          "expert_load_min"}
  for key in metrics:
    np.testing.assert_allclose(float(metrics[key]), float(want_stats[key]),
                               rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  # The load-balancing term is in both losses (about 0.5 of ~7).
  ce = float(want_stats["loss_sum"]) / float(want_stats["tokens"])
  np.testing.assert_allclose(
      float(loss) - ce, 0.5 * float(want_stats["router_aux_loss"]),
      rtol=1e-4)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree_util.tree_leaves(want_grads)):
    tolerances.assert_close(g, w, jnp.float32,
                            err_msg=jax.tree_util.keystr(path))
