"""The whole model on every gated-delta-rule backend, and packed sequences.

The Pallas kernel runs in interpret mode here (CPU); the same test runs
compiled on a GPU/TPU when one is present.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from tests import tolerances

_ON_ACCELERATOR = jax.default_backend() in ("gpu", "tpu")


def _cfg(impl, block_sizes=""):
  return qwen_jax.QwenConfig.from_preset(
      "tiny", num_hidden_layers=8, gdr_implementation=impl,
      gdr_interpret=impl == "pallas" and not _ON_ACCELERATOR,
      gdr_block_sizes=block_sizes)


@pytest.fixture(scope="module")
def params():
  cfg = _cfg("chunked")
  p = qwen_jax.Qwen35(cfg).init(jax.random.PRNGKey(0),
                                jnp.zeros((1, 1), jnp.int32))
  p = flax.linen.meta.unbox(p)["params"]
  # Move norm weights, A_log and dt_bias (vectors) off their init values.
  leaves, tree = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [x + 0.2 * jax.random.normal(k, x.shape) if x.ndim <= 2 and
            x.shape[-1] <= 64 else x for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, leaves)


def _ids(seed, b, t):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, t)),
                     jnp.int32)


def _loss_and_grad(cfg, params, ids, segment_ids=None):
  model = qwen_jax.Qwen35(cfg)

  def loss(p):
    logits = model.apply({"params": p}, ids, segment_ids=segment_ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (val, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params)
  return val, logits, grads


# The backend's default tiling, and the "lean" preset (no per-chunk states
# stored: the backward recomputes them, paired, with the output inside the
# sequential pass) with the forward and the backward in blocks of 64 tokens
# (80 tokens: two blocks each).
@pytest.mark.parametrize(
    "block_sizes", ["", "lean/fwd_block=64/bwd_block=64"])
def test_pallas_model_matches_chunked(params, block_sizes):
  ids = _ids(0, 2, 80)
  _, ref_logits, ref_grads = _loss_and_grad(_cfg("chunked"), params, ids)
  _, logits, grads = _loss_and_grad(_cfg("pallas", block_sizes), params, ids)
  tolerances.assert_close(logits, ref_logits, jnp.float32, err_msg="logits")
  tolerances.assert_trees_scaled_close(grads, ref_grads, jnp.float32)


@pytest.mark.parametrize("impl", ["chunked", "pallas", "recurrent"])
def test_packed_documents_equal_separate_runs(params, impl):
  cfg = _cfg(impl)
  model = qwen_jax.Qwen35(cfg)
  lengths = [23, 50, 7]
  docs = [_ids(10 + i, 1, n) for i, n in enumerate(lengths)]
  packed = jnp.concatenate(docs, axis=1)
  seg = jnp.concatenate([jnp.full((1, n), i, jnp.int32)
                         for i, n in enumerate(lengths)], axis=1)
  out = model.apply({"params": params}, packed, segment_ids=seg)
  start = 0
  for doc, n in zip(docs, lengths):
    alone = model.apply({"params": params}, doc)
    tolerances.assert_close(out[:, start:start + n], alone, jnp.float32,
                            err_msg=f"document at {start}")
    start += n
