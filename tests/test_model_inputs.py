"""Tests of how `Qwen35` treats bad input (qwen_jax/model.py, cache.py).

  * ids outside [0, vocab_size) raise a ValueError when the ids are concrete
    (under jit nothing is checked: no host sync in the program);
  * the attention mask is read as bool by both mixers; concrete values other
    than 0/1 (an additive mask, 2, 0.5) raise;
  * a cache too short for the call, a cache of another batch or config, and
    a too-short mask with an all-linear cache raise, naming `cache` /
    `input_ids` / `attention_mask` with what was expected and found;
  * positions and segment_ids of the wrong shape raise;
  * an empty batch gives empty results; python lists work as arrays;
    `Qwen35` refuses a config that is not a QwenConfig.

Every model here is the tiny preset with random weights, so each test takes
seconds.
"""

import functools
import re

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import api
import qwen_jax
from qwen_jax import cache as cache_lib
from qwen_jax import QwenConfig
from qwen_jax.config import layer_types_from_ratio
from qwen_jax.gated_deltanet import GatedDeltaNet
from tests import tolerances

B, T, VOCAB = 2, 10, 256


@functools.lru_cache(maxsize=None)
def _setup(pattern="3:1"):
  """(cfg, model, params) of the tiny preset (4 layers) with `pattern`."""
  cfg = QwenConfig.from_preset("tiny", gdr_chunk_size=8,
                               layer_types=layer_types_from_ratio(pattern, 4))
  model = qwen_jax.Qwen35(cfg)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = flax.linen.meta.unbox(
      jax.jit(model.init)(jax.random.PRNGKey(0), ids)["params"])
  return cfg, model, params


@functools.lru_cache(maxsize=None)
def _jitted(pattern="3:1"):
  """fn(params, ids, mask) -> logits, jitted (values are traced)."""
  _, model, _ = _setup(pattern)
  return jax.jit(lambda p, i, m: _apply(model, p, i, attention_mask=m))


def _ids(seed=0, b=B, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)),
                     jnp.int32)


def _apply(model, params, *args, **kw):
  return model.apply({"params": params}, *args, **kw)


# ------------------------------------------------------------ token ids
@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1])
def test_ids_outside_vocab_raise(bad):
  _, model, params = _setup()
  ids = _ids().at[1, 3].set(bad)
  with pytest.raises(ValueError,
                     match=rf"input_ids: expected values in \[0, vocab_size="
                           rf"{VOCAB}\), found {bad} at position \(1, 3\)"):
    _apply(model, params, ids)
  # numpy ids: checked before any cast (2**33 is not seen as 0).
  with pytest.raises(ValueError, match="input_ids.*found 8589934592"):
    _apply(model, params, np.full((1, 3), 2 ** 33, np.int64))


def test_ids_under_jit_are_not_checked():
  # Nothing can be read from traced ids without a host sync: the jitted call
  # runs (this documents the limit) and valid ids give the eager logits.
  _, _, params = _setup()
  out = _jitted()(params, _ids().at[0, 0].set(VOCAB), None)  # no error
  chex.assert_shape(out, (B, T, VOCAB))


def test_eager_model_does_not_read_g_to_the_host(monkeypatch):
  """The layer forms g <= 0 itself, so the rule's value check (a host read
  of g, waited for layer by layer in an un-jitted call) is skipped; the
  public rule still checks a concrete g by default."""
  _, model, params = _setup()
  want = np.asarray(_jitted()(params, _ids(), None))
  reads = []
  monkeypatch.setattr(api, "_check_log_decay", reads.append)
  got = _apply(model, params, _ids())  # eager: g is concrete in each layer
  assert reads == []
  tolerances.assert_close(got, want, jnp.float32, scale=0.01)
  x = jnp.ones((1, 8, 1, 4))
  api.gated_delta_rule(x, x, x, -jnp.ones((1, 8, 1)), jnp.ones((1, 8, 1)),
                       implementation="recurrent")
  assert len(reads) == 1


def test_float_ids_raise():
  _, model, params = _setup()
  with pytest.raises(ValueError, match="input_ids: expected integer"):
    _apply(model, params, _ids().astype(jnp.float32))


# ------------------------------------------------------- attention mask
@pytest.mark.parametrize("value", [2.0, 0.5, -np.inf])
def test_mask_values_other_than_0_1_raise(value):
  _, model, params = _setup()
  mask = np.ones((B, T), np.float32)
  mask[0, :2] = value
  with pytest.raises(ValueError,
                     match=r"attention_mask: expected 0/1 or bool values.*"
                           r"at position \(0, 0\)"):
    _apply(model, params, _ids(), attention_mask=jnp.asarray(mask))


def test_mask_read_as_bool_by_both_mixers():
  _, model, params = _setup()
  ids = _ids(1)
  mask = np.ones((B, T), np.int32)
  mask[1, :4] = 0  # row 1 left padded
  ref = np.asarray(_apply(model, params, ids, attention_mask=mask))
  fn = _jitted()
  qwen_jax.model.check_mask_values(mask.astype(np.float32))  # 0./1. pass
  for m in (mask, mask.astype(bool)):
    tolerances.assert_close(fn(params, ids, m), ref, "float32")
  # Under jit values are not checked; a 2 must still mean "token" in the
  # Gated DeltaNet layers too (it used to scale their inputs by 2).
  tolerances.assert_close(fn(params, ids, mask * 2), ref, "float32")


def test_gated_deltanet_reads_mask_as_bool():
  cfg, _, _ = _setup()
  layer = GatedDeltaNet(cfg)
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, cfg.hidden_size))
  mask = np.ones((B, T), np.int32)
  mask[0, :3] = 0
  variables = layer.init(jax.random.PRNGKey(0), x, mask)
  y1, _ = layer.apply(variables, x, mask)
  y2, _ = layer.apply(variables, x, mask * 3)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


# ----------------------------------------------------------------- cache
def test_cache_too_short_raises():
  cfg, model, params = _setup()
  ids = _ids()
  # Static: more tokens than slots (was a bare dynamic_update_slice error).
  with pytest.raises(ValueError,
                     match=r"input_ids: expected at most 8 tokens \(the "
                           r"cache's slots\), found 10"):
    _apply(model, params, ids, cache=cache_lib.init_cache(cfg, B, 8))
  # Concrete index: 6 cached + 4 new > 8 slots (was a clamped, silent write).
  cache = dict(cache_lib.init_cache(cfg, B, 8), index=jnp.int32(6))
  with pytest.raises(ValueError, match="input_ids: 4 tokens do not fit a "
                                       "cache of 8 slots holding 6"):
    _apply(model, params, ids[:, 6:], cache=cache)
  with pytest.raises(ValueError, match=r"cache: expected cache\['index'\] "
                                       r">= 0, found -1"):
    _apply(model, params, ids[:, :2], cache=dict(cache, index=jnp.int32(-1)))
  # Exactly full is fine.
  _, cache = _apply(model, params, ids[:, 6:8], cache=cache)
  assert int(cache["index"]) == 8


@pytest.mark.parametrize("case", ["batch", "layers", "head_dim", "kernel",
                                  "not_a_cache", "index"])
def test_cache_of_another_batch_or_config_raises(case):
  cfg, model, params = _setup()
  other = {
      "batch": lambda: cache_lib.init_cache(cfg, 1, 16),
      "layers": lambda: cache_lib.init_cache(
          cfg.replace(num_hidden_layers=8), B, 16),
      "head_dim": lambda: cache_lib.init_cache(cfg.replace(head_dim=16), B,
                                               16),
      "kernel": lambda: cache_lib.init_cache(
          cfg.replace(linear_conv_kernel_dim=2), B, 16),
      "not_a_cache": lambda: cache_lib.init_cache(cfg, B, 16)["layers"],
      "index": lambda: dict(cache_lib.init_cache(cfg, B, 16),
                            index=jnp.zeros((B,), jnp.int32)),
  }[case]()
  with pytest.raises(ValueError, match=r"cache: expected .*found"):
    _apply(model, params, _ids(), cache=other)


def test_cache_mismatch_message_names_entry_and_shapes():
  cfg, model, params = _setup()
  with pytest.raises(ValueError) as e:
    _apply(model, params, _ids(), cache=cache_lib.init_cache(cfg, 1, 16))
  msg = str(e.value)
  assert "cache['layers']['layer_0']['conv']" in msg
  assert "(2, 3, 160)" in msg and "found (1, 3, 160)" in msg
  ratio = QwenConfig.from_preset("tiny", layer_types=layer_types_from_ratio(
      "1:1", 4))
  with pytest.raises(ValueError, match=r"cache: expected the entries .*"
                                       r"missing .*layer_1.*"):
    _apply(model, params, _ids(), cache=cache_lib.init_cache(ratio, B, 16))


def test_all_linear_cache_with_a_short_mask_raises():
  cfg, model, params = _setup("all-linear")
  ids = _ids()
  cache = cache_lib.init_cache(cfg, B, 16)
  with pytest.raises(ValueError,
                     match=r"attention_mask: with a cache expected shape "
                           r"\(2, >= 10\).*found \(2, 3\)"):
    _apply(model, params, ids, cache=cache, attention_mask=jnp.ones((B, 3)))
  cache = dict(cache, index=jnp.int32(6))  # 6 tokens written
  with pytest.raises(ValueError, match=r"\(2, >= 10\).*found \(2, 8\)"):
    _apply(model, params, ids[:, 6:], cache=cache,
           attention_mask=jnp.ones((B, 8)))
  # A mask covering every token written so far is fine.
  _apply(model, params, ids[:, 6:], cache=cache,
         attention_mask=jnp.ones((B, 10)))


class ValidCacheTest(chex.TestCase):
  """A valid cache passes the checks eagerly and under jit (there shapes
  are checked at trace time and the traced index is not read), and the
  logits are those of the forward without a cache."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_valid_cache_checks_pass(self):
    cfg, model, params = _setup()
    fn = self.variant(lambda p, i, c: _apply(model, p, i, cache=c))
    ids = _ids()[:, :6]
    out, cache = fn(params, ids, cache_lib.init_cache(cfg, B, 16))
    tolerances.assert_close(out, _apply(model, params, ids), "float32")
    assert int(cache["index"]) == 6


# ---------------------------------------------- positions, segment_ids
@pytest.mark.parametrize("name,shape", [
    ("positions", (T,)), ("positions", (B, T - 1)), ("positions", (1, T)),
    ("segment_ids", (T,)), ("segment_ids", (B, T - 1)),
    ("segment_ids", (1, T))])
def test_positions_and_segment_ids_shapes(name, shape):
  _, model, params = _setup()
  x = jnp.zeros(shape, jnp.int32)
  with pytest.raises(ValueError,
                     match=rf"{name}: expected shape \(2, 10\).*found "
                           rf"{re.escape(str(shape))}"):
    _apply(model, params, _ids(), **{name: x})


# ------------------------------------------------------------ the rest
class EmptyBatchTest(chex.TestCase):
  """An empty batch gives empty results, eagerly and under jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_empty_batch_gives_empty_results(self):
    cfg, model, params = _setup()
    fn = self.variant(lambda p, i: _apply(model, p, i, return_hidden=True))
    out, hidden = fn(params, _ids()[:0])
    chex.assert_shape(out, (0, T, VOCAB))
    chex.assert_shape(hidden, (0, T, 64))
    chex.assert_type(out, jnp.dtype(cfg.dtype))


def test_init_needs_a_sequence():
  _, model, _ = _setup()
  with pytest.raises(ValueError, match="input_ids: init needs at least one"):
    model.init(jax.random.PRNGKey(0), _ids()[:0])


def test_python_lists_work_as_arrays():
  _, model, params = _setup()
  ids = _ids(2)
  mask = np.ones((B, T), np.int32)
  mask[0, :2] = 0
  ref = np.asarray(_jitted()(params, ids, mask))
  got = _apply(model, params, np.asarray(ids).tolist(),
               attention_mask=mask.tolist())
  tolerances.assert_close(got, ref, "float32")
  with pytest.raises(ValueError, match="input_ids: expected an array"):
    _apply(model, params, [[1, 2, 3], [4, 5]])


@pytest.mark.parametrize("bad", ["dict", "frozen", "none"])
def test_model_needs_a_qwen_config(bad):
  cfg, _, _ = _setup()
  arg = {"dict": cfg.to_hf_dict(), "frozen": flax.core.freeze(
      cfg.to_hf_dict()), "none": None}[bad]
  with pytest.raises(TypeError, match=r"cfg: expected a QwenConfig.*"
                                      r"QwenConfig\.from_hf_config"):
    qwen_jax.Qwen35(arg)
