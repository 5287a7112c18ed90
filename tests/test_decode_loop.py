"""Tests of the decode layout's layer loop (qwen_jax/decode_loop.py).

  * `generate` through the decode layout (what it runs on a CPU) equals
    the scanned layer loop (`auto_convert(False)` on a scanned checkpoint)
    token for token, from a scanned and an unscanned checkpoint, with a
    left-padded batch, and streamed;
  * the decode layout's forward gives the float model's logits (float32
    tolerance), and `prefill` + `decode_step` on it give the full
    forward's logits at every position;
  * a parameter object is converted once and the conversion reused.

Models are tiny random transformers checkpoints (tests/hf_utils.py).
"""

import functools
import tempfile

import jax
import numpy as np
import pytest

import qwen_jax
from qwen_jax import cache as cache_lib
from qwen_jax import decode_loop
from qwen_jax.config import FULL, LINEAR
from qwen_jax.generate import decode_step
from qwen_jax.generate import prefill
from qwen_jax.generate import stream
from qwen_jax.quantize import is_decode_layout
from tests import hf_utils
from tests import tolerances

L, F = LINEAR, FULL
# Logits of a float or decode-layout tree (decode_loop.apply_model), jitted.
_forward = jax.jit(decode_loop.apply_model, static_argnums=0)


@functools.lru_cache(maxsize=None)
def _path():
  cfg = hf_utils.make_text_config(layer_types=[L, L, L, F] * 2)
  return hf_utils.save_causal_lm(
      tempfile.mkdtemp(prefix="qwen_jax_decode_loop_"), cfg, 31)[0]


@functools.lru_cache(maxsize=None)
def _loaded(scan: bool):
  return qwen_jax.load_hf_checkpoint(_path(), scan_layers=scan)


def _prompts(cfg, rng):
  ids = rng.integers(0, cfg.vocab_size, (3, 9))
  mask = np.ones_like(ids)
  mask[1, :4] = 0  # left padded
  mask[2, :1] = 0
  return ids, mask


@pytest.mark.parametrize("scan", [True, False])
def test_decode_layout_equals_scanned_loop(scan):
  cfg_s, params_s = _loaded(True)
  cfg, params = _loaded(scan)
  ids, mask = _prompts(cfg, np.random.default_rng(5))
  kw = dict(max_new_tokens=14, attention_mask=mask, stop_tokens=())
  with decode_loop.auto_convert(False):
    want = np.asarray(qwen_jax.generate(cfg_s, params_s, ids, **kw))
  # The programs really run the decode layout here.
  assert jax.default_backend() in decode_loop.CONVERT_BACKENDS
  run_cfg, run_params = decode_loop.prepare(cfg, params)
  assert is_decode_layout(run_params) and not run_cfg.scan_layers
  got = np.asarray(qwen_jax.generate(cfg, params, ids, **kw))
  np.testing.assert_array_equal(got, want)
  blocks = list(stream(cfg, params, ids, block_steps=5, **kw))
  np.testing.assert_array_equal(np.concatenate(blocks, axis=1), want)


def test_decode_layout_logits_equal_float_forward():
  cfg, params = _loaded(True)
  dparams = decode_loop.prepare(cfg, params)[1]
  ids = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 11))
  want = np.asarray(_forward(cfg, params, ids))
  got = np.asarray(_forward(cfg, dparams, ids))
  assert tolerances.max_rel_err(got, want) < tolerances.HF_LOGITS_REL
  # prefill, then one token at a time (batch 1: the vector-matrix loops).
  one = ids[:1]
  cache = cache_lib.init_cache(cfg.replace(scan_layers=False), 1, 11)
  logits, cache = prefill(cfg, dparams, one[:, :4], cache, prefill_block=2)
  rows = [np.asarray(logits)]
  for t in range(4, 11):
    logits, cache = decode_step(cfg, dparams, one[:, t], cache)
    rows.append(np.asarray(logits))
  got = np.stack(rows, axis=1)
  assert tolerances.max_rel_err(got, want[:1, 3:]) < tolerances.HF_LOGITS_REL


def test_conversion_is_kept_per_parameter_object():
  cfg, params = _loaded(True)
  decode_loop.clear_cache()
  first = decode_loop.prepare(cfg, params)[1]
  assert decode_loop.prepare(cfg, params)[1] is first
  other = jax.tree_util.tree_map(lambda a: a + 0, params)
  second = decode_loop.prepare(cfg, other)[1]
  assert second is not first
  np.testing.assert_array_equal(
      np.asarray(second["layers"]["layer_3"]["mlp"]["up_proj"]["kernel_t"]),
      np.asarray(first["layers"]["layer_3"]["mlp"]["up_proj"]["kernel_t"]))
  with decode_loop.auto_convert(False):
    assert decode_loop.prepare(cfg, params)[1] is params
  decode_loop.clear_cache()


@pytest.mark.parametrize("from_scan", [True, False])
def test_cache_to_layout_round_trip(from_scan):
  cfg, _ = _loaded(True)
  cfg_from = cfg.replace(scan_layers=from_scan)
  cfg_to = cfg.replace(scan_layers=not from_scan)
  rng = np.random.default_rng(11)
  cache = jax.tree_util.tree_map(
      lambda a: rng.standard_normal(a.shape).astype(a.dtype),
      cache_lib.init_cache(cfg_from, 2, 7))
  moved = cache_lib.to_layout(cfg_from, cfg_to, cache)
  assert cache_lib.check_cache(cfg_to, moved, 2) == 7
  for i in range(cfg.num_hidden_layers):  # every layer's entries, moved
    slot_a, idx_a = cache_lib.stack.layer_location(cfg_from, i)
    slot_b, idx_b = cache_lib.stack.layer_location(cfg_to, i)
    for key, a in cache["layers"][slot_a].items():
      b = moved["layers"][slot_b][key]
      np.testing.assert_array_equal(a if idx_a is None else a[idx_a],
                                    b if idx_b is None else b[idx_b])
  back = cache_lib.to_layout(cfg_to, cfg_from, moved)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, cache)
  # A cache already in the target layout is passed through.
  assert cache_lib.to_layout(cfg_from, cfg_to, moved) is moved


def test_stream_continues_a_cache_of_the_scanned_config():
  """A cache made (and filled) with the scanned config continues in
  `stream`, which runs the unscanned decode layout on a CPU."""
  cfg, params = _loaded(True)
  ids = np.random.default_rng(12).integers(0, cfg.vocab_size, (1, 10))
  kw = dict(max_new_tokens=6, stop_tokens=())
  want = np.asarray(qwen_jax.generate(cfg, params, ids, **kw))
  with decode_loop.auto_convert(False):  # the scanned layer loop
    cache = cache_lib.init_cache(cfg, 1, 16)
    _, cache = prefill(cfg, params, ids[:, :7], cache, prefill_block=4)
  got = stream(cfg, params, ids[:, 7:], cache=cache, **kw)
  np.testing.assert_array_equal(np.concatenate(list(got), axis=1), want)
