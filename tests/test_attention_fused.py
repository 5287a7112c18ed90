"""The "cudnn" attention option (qwen_jax/attention.py), on a CPU.

cuDNN runs only on a GPU, so the option's code path is run here through
jax's own `jax.nn.dot_product_attention(implementation="xla")`
(`attention.FUSED_IMPLEMENTATION` set to "xla"), and compared with the jnp
attention the default runs:

  * `causal_attention`: outputs and the gradients of q, k and v;
  * the model: logits and every parameter's gradient of the loss;
  * prefill in two blocks, the first from an empty cache (the option's
    branch), the second over the cache, against the default's last logits
    and cache;
  * on a CPU, "cudnn" itself falls back to the jnp attention and says why.

And the jnp attention in query blocks (each block under `jax.checkpoint`,
so that the backward recomputes its scores), with padding and packing
masks: outputs against a float64 NumPy softmax, gradients against the same
attention in one block.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import attention
from qwen_jax import cache as cache_lib
from qwen_jax import train_step
from qwen_jax.config import QwenConfig
from qwen_jax.generate import prefill
from qwen_jax.model import Qwen35
from tests import tolerances


@pytest.fixture
def xla_fused(monkeypatch):
  """The option's path through jax's "xla" attention; fresh traces."""
  monkeypatch.setattr(attention, "FUSED_IMPLEMENTATION", "xla")
  jax.clear_caches()
  yield
  jax.clear_caches()


def _qkv(seed, b=2, t=37, h=4, n=2, e=16, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, e), dtype),
          jax.random.normal(ks[1], (b, t, n, e), dtype),
          jax.random.normal(ks[2], (b, t, n, e), dtype))


def test_causal_attention_outputs_and_gradients():
  q, k, v = _qkv(np.random.SeedSequence().entropy % 2**31)
  w = jax.random.normal(jax.random.PRNGKey(7), q.shape)

  def loss(fused, q, k, v):
    return jnp.sum(attention.causal_attention(q, k, v, fused) * w)

  got, got_g = jax.value_and_grad(loss, argnums=(1, 2, 3))("xla", q, k, v)
  want, want_g = jax.value_and_grad(loss, argnums=(1, 2, 3))(None, q, k, v)
  tolerances.assert_close(got, want, jnp.float32)
  o_got = attention.causal_attention(q, k, v, "xla")
  o_want = attention.causal_attention(q, k, v, None)
  tolerances.assert_close(o_got, o_want, jnp.float32)
  for name, a, b in zip("qkv", got_g, want_g):
    tolerances.assert_close(a, b, jnp.float32, err_msg=f"d{name}")


def test_fallback_reason_on_cpu():
  q = jnp.zeros((1, 8, 2, 256), jnp.bfloat16)
  reason = attention.fused_fallback_reason(q, "cudnn")
  assert reason is not None and "cpu" in reason, reason
  assert attention.fused_fallback_reason(q, "xla") is None


def _cfg(implementation):
  return QwenConfig.from_preset("tiny", attention_implementation=implementation,
                                gdr_chunk_size=16)


def _params(cfg, seed):
  model = Qwen35(cfg)
  v = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
  return flax.linen.meta.unbox(v)["params"]


def _logits(cfg, params, ids):
  return jax.jit(lambda p, i: Qwen35(cfg).apply({"params": p}, i))(params,
                                                                   ids)


def _loss_and_grads(cfg, params, ids):
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
  fn = jax.value_and_grad(
      lambda p: train_step.loss_and_stats(p, cfg, batch)[0])
  return jax.jit(fn)(params)


def test_model_loss_logits_and_gradients(xla_fused):
  seed = int(np.random.SeedSequence().entropy % 2**31)
  ref_cfg, cfg = _cfg("xla"), _cfg("cudnn")
  params = _params(ref_cfg, seed)
  ids = jnp.asarray(np.random.default_rng(seed).integers(
      0, ref_cfg.vocab_size, (2, 49)), jnp.int32)
  tolerances.assert_close(_logits(cfg, params, ids),
                          _logits(ref_cfg, params, ids), jnp.float32,
                          err_msg="logits")
  loss, grads = _loss_and_grads(cfg, params, ids)
  ref_loss, ref_grads = _loss_and_grads(ref_cfg, params, ids)
  tolerances.assert_close(loss, ref_loss, jnp.float32)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  ref_flat = jax.tree_util.tree_leaves(ref_grads)
  for (path, g), r in zip(flat, ref_flat):
    tolerances.assert_close(g, r, jnp.float32,
                            err_msg=jax.tree_util.keystr(path))


def _prefill(cfg, params, ids, block):
  cache = cache_lib.init_cache(cfg, ids.shape[0], ids.shape[1] + 3)
  return prefill(cfg, params, ids, cache, prefill_block=block)


def test_prefill_from_empty_cache(xla_fused):
  # Two blocks: the first from the empty cache (the option's branch), the
  # second over the cache.
  seed = int(np.random.SeedSequence().entropy % 2**31)
  ref_cfg, cfg = _cfg("xla"), _cfg("cudnn")
  params = _params(ref_cfg, seed)
  ids = jnp.asarray(np.random.default_rng(seed).integers(
      0, ref_cfg.vocab_size, (2, 40)), jnp.int32)
  logits, cache = _prefill(cfg, params, ids, 24)
  ref_logits, ref_cache = _prefill(ref_cfg, params, ids, 24)
  tolerances.assert_close(logits, ref_logits, jnp.float32)
  for (path, c), r in zip(jax.tree_util.tree_flatten_with_path(cache)[0],
                          jax.tree_util.tree_leaves(ref_cache)):
    tolerances.assert_close(c, r, jnp.float32,
                            err_msg=jax.tree_util.keystr(path))


def test_cudnn_falls_back_on_cpu():
  q, k, v = _qkv(np.random.SeedSequence().entropy % 2**31,
                 dtype=jnp.bfloat16)
  # The jnp attention either way: the same program, the same numbers.
  np.testing.assert_array_equal(
      np.asarray(attention.causal_attention(q, k, v, "cudnn"), np.float32),
      np.asarray(attention.causal_attention(q, k, v, None), np.float32))


def _numpy_attention(q, k, v, valid, seg):
  """float64 causal GQA attention with key padding and packing masks."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, e = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for j in range(h):
      s = q[i, :, j] @ k[i, :, j // g].T / np.sqrt(e)
      ok = (np.tril(np.ones((t, t), bool)) & valid[i][None, :]
            & (seg[i][:, None] == seg[i][None, :]))
      s = np.where(ok, s, -1e300)  # a row with no key stays finite
      p = np.exp(s - s.max(-1, keepdims=True))
      out[i, :, j] = (p / p.sum(-1, keepdims=True)) @ v[i, :, j // g]
  return out


def test_blocked_attention_outputs_and_gradients():
  seed = int(np.random.SeedSequence().entropy % 2**31)
  q, k, v = _qkv(seed)
  b, t = q.shape[:2]
  rng = np.random.default_rng(seed)
  valid = np.ones((b, t), bool)
  valid[1, :5] = False  # left padding
  seg = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  w = jax.random.normal(jax.random.PRNGKey(seed + 1), q.shape)
  # Rows of padding queries attend to nothing useful; leave them out.
  keep = jnp.asarray(valid)[:, :, None, None]

  def loss(block, q, k, v):
    o = attention.dot_product_attention(q, k, v, pos, pos,
                                        jnp.asarray(valid), jnp.asarray(seg),
                                        jnp.asarray(seg), block=block)
    return jnp.sum(jnp.where(keep, o, 0.0) * w)

  o = attention.dot_product_attention(q, k, v, pos, pos, jnp.asarray(valid),
                                      jnp.asarray(seg), jnp.asarray(seg),
                                      block=8)
  want = _numpy_attention(q, k, v, valid, seg)
  tolerances.assert_close(np.where(valid[:, :, None, None], o, 0.0),
                          np.where(valid[:, :, None, None], want, 0.0),
                          jnp.float32)
  got = jax.grad(loss, argnums=(1, 2, 3))(8, q, k, v)
  ref = jax.grad(loss, argnums=(1, 2, 3))(1024, q, k, v)
  for name, a, r in zip("qkv", got, ref):
    tolerances.assert_close(a, r, jnp.float32, err_msg=f"d{name}")
