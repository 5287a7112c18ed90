"""Expert parallelism on 8 fake CPU devices equals one device.

XLA reads `--xla_force_host_platform_device_count=8` once, when the backend
starts, so without the flag in this process the test re-runs this file in
a fresh interpreter with it set (as tests/test_sharding_8_devices.py does
for tests/test_sharding.py) and fails with its output if it fails.

The model: "tiny-moe" (8 experts, top-2, 4 layers = one scanned 3:1
period), b = 4, t = 32, float32, about 110 s of CPU time. Meshes compose
the expert axis with data, fsdp, tensor and seq, under both dispatches
(a gather of the group's tokens, an all-to-all of the routed pairs). The
sharded train step's loss (with the load-balancing term) and router
metrics are compared with the single-device `train_step.loss_and_stats`.
The all-to-all's capacity limit is checked on the experts alone against
the dense all-experts computation with the pairs past capacity removed
(which pairs: a NumPy count of the rule).
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
# The all-to-all dispatch (dropless) on the meshes that split the batch
# over the expert axis.
A2A_SPECS = ["expert:4,seq:2", "fsdp:2,tensor:2,expert:2"]


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
  assert passed and int(passed.group(1)) >= (
      len(SPECS) + len(A2A_SPECS) + 5), out


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
@pytest.mark.parametrize("spec,dispatch",
                         [(s, "gather") for s in SPECS] +
                         [(s, "all_to_all") for s in A2A_SPECS])
def test_logits_and_gradients_equal_one_device(spec, dispatch):
  cfg, params, ids = _model()
  cfg = cfg.replace(moe_dispatch=dispatch)
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


def _kept_pairs(idx: np.ndarray, n: int, e_local: int, cap: int
                ) -> np.ndarray:
  """[T, k] bool: the pairs the all-to-all keeps. idx's rows are split
  evenly over the n devices; each device visits its pairs token by token,
  slot by slot, and keeps a pair while its expert's device has had fewer
  than `cap` of this device's pairs."""
  kept = np.zeros(idx.shape, bool)
  rows = idx.shape[0] // n
  for dev in range(n):
    used = np.zeros(n, int)
    for tok in range(dev * rows, (dev + 1) * rows):
      for j, e in enumerate(idx[tok]):
        if used[e // e_local] < cap:
          used[e // e_local] += 1
          kept[tok, j] = True
  return kept


@pytest.mark.skipif(not IN_PROCESS, reason="run by the test above")
@pytest.mark.parametrize("factor", [0.5, 1.0, 0.0])
def test_all_to_all_capacity_drops_the_pairs_past_it(factor):
  """Experts alone, expert:4 x seq:2: routing skewed to experts 0 and 1
  (device 0) so that a capacity factor overflows; values and gradients
  against `experts_dense` with the dropped pairs' weights zeroed."""
  from qwen_jax import moe  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(int(factor * 10) + 7)
  b, t, d, e, f, k = 8, 6, 16, 8, 12, 2
  mesh = sharding.make_mesh("expert:4,seq:2")
  n, e_local = 4, e // 4
  x = rng.standard_normal((b, t, d)).astype(np.float32)
  # Half the tokens pick experts 0 and 1; the rest pick at random.
  idx = np.stack([rng.choice(e, k, replace=False) for _ in range(b * t)])
  idx[rng.random(b * t) < 0.5] = [0, 1]
  idx = idx.reshape(b, t, k).astype(np.int32)
  w = rng.random((b, t, k)).astype(np.float32)
  gate_up = rng.standard_normal((e, d, 2 * f)).astype(np.float32) * 0.3
  down = rng.standard_normal((e, f, d)).astype(np.float32) * 0.3

  # Each device's tokens: its batch rows (expert) and its tokens (seq),
  # batch-major. Reorder so that device-major rows feed _kept_pairs.
  per = idx.reshape(n, b // n, 2, t // 2, k).transpose(0, 2, 1, 3, 4)
  tokens = (b // n) * (t // 2)
  cap = moe.pair_capacity(tokens, k, e_local, n, factor)
  assert cap == (tokens * min(k, e_local) if factor == 0 else
                 int(np.ceil(factor * tokens * k / n)))
  kept = _kept_pairs(per.reshape(-1, k), 2 * n, e_local, cap)
  kept = kept.reshape(n, 2, b // n, t // 2, k).transpose(
      0, 2, 1, 3, 4).reshape(b, t, k)
  if factor == 0:
    assert kept.all()
  else:
    assert 0 < (~kept).sum() < kept.size  # the routing overflows

  ctx = sharding.sp_context(mesh)

  def ours(x, w, gate_up, down):
    return moe.experts_expert_parallel(
        ctx, x, w, jnp.asarray(idx), gate_up, down, "all_to_all", factor)

  def reference(x, w, gate_up, down):
    y = moe.experts_dense(x.reshape(b * t, d),
                          (w * kept).reshape(b * t, k),
                          jnp.asarray(idx).reshape(b * t, k), gate_up, down)
    return y.reshape(b, t, d)

  y, dropped = jax.jit(ours)(x, w, gate_up, down)
  tolerances.assert_close(y, reference(x, w, gate_up, down), jnp.float32)
  np.testing.assert_allclose(float(dropped), (~kept).mean(), rtol=1e-6)
  cot = rng.standard_normal((b, t, d)).astype(np.float32)
  grads = jax.grad(lambda *a: jnp.sum(ours(*a)[0] * cot),
                   argnums=(0, 1, 2, 3))(x, w, gate_up, down)
  want = jax.grad(lambda *a: jnp.sum(reference(*a) * cot),
                  argnums=(0, 1, 2, 3))(x, w, gate_up, down)
  tolerances.assert_trees_close(grads, want, jnp.float32)


@pytest.mark.skipif(not IN_PROCESS, reason="run by the test above")
def test_dropped_share_is_a_train_metric_only_with_a_capacity():
  cfg, params, ids = _model()
  batch = {"inputs": ids[:, :T], "targets": ids[:, 1:]}
  mesh = sharding.make_mesh("expert:4,seq:2")
  sparams = sharding.shard_params(params, cfg, mesh)
  placed = {k: sharding.put_batch(v, mesh) for k, v in batch.items()}
  shares = {}
  for factor in (0.0, 0.25):
    c = cfg.replace(moe_dispatch="all_to_all", moe_capacity_factor=factor)
    loss, _, metrics = sharding.make_train_step(
        c, mesh, loss_chunk=16, with_metrics=True)(sparams, placed)
    shares[factor] = (float(loss), metrics.get("expert_dropped_share"))
  assert shares[0.0][1] is None  # dropless: nothing to report
  # A quarter of an even share per destination drops most pairs.
  assert 0.5 < float(shares[0.25][1]) < 1.0
  assert shares[0.25][0] != shares[0.0][0]
