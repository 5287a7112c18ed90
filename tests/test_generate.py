"""Tests of caches, prefill, decode and generation (qwen_jax/generate.py).

  * prefill in blocks, then decode token by token, gives the logits of one
    full forward over the whole sequence (float32), for the 3:1, all-linear
    and all-full patterns, scanned and not, with a left-padded row;
  * greedy `generate` equals transformers' greedy `generate` token for token
    (unpadded, and a left-padded batch);
  * a left-padded batch gives what each prompt gives alone;
  * `cache_bytes` equals the bytes `init_cache` allocates;
  * each mixer alone, fed one token at a time from its own `init_cache`,
    gives its output over the whole sequence;
  * sampling rules, seeds, stop tokens, streaming, and input errors
    (`generate`, and `prefill` / `decode_step`: ids outside the vocabulary,
    a cache of another config or batch, decoding past the cache's end);
  * prefill + decode equal the forward with a conv kernel of 1 and 2 (tiny
    preset, random weights);
  * `python -m experiments.generate` on a saved folder with a tokenizer.json.

Models are tiny random transformers checkpoints saved by the test
(tests/hf_utils.py), so the weights are far from the init and every
mismatch shows.
"""

import functools
import os
import subprocess
import sys
import tempfile

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen_jax
from qwen_jax import cache as cache_lib
from qwen_jax import stack
from qwen_jax.attention import GatedAttention
from qwen_jax.gated_deltanet import GatedDeltaNet
from qwen_jax.generate import decode_step
from qwen_jax.generate import prefill
from qwen_jax.generate import sample_logits
from qwen_jax.generate import Sampler
from qwen_jax.generate import stream
from qwen_jax.config import FULL, LINEAR, layer_types_from_ratio
from tests import hf_utils
from tests import tolerances

L, F = LINEAR, FULL
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128
_CASES = {
    "hybrid": (dict(layer_types=[L, L, L, F] * 2), 11),
    "all_linear": (dict(layer_types=layer_types_from_ratio("all-linear", 3)),
                   12),
    "all_full": (dict(layer_types=layer_types_from_ratio("all-full", 3)), 13),
}


@functools.lru_cache(maxsize=None)
def _saved(key):
  """(path, torch model) of a tiny random checkpoint, built once."""
  overrides, seed = _CASES[key]
  cfg = hf_utils.make_text_config(**overrides)
  return hf_utils.save_causal_lm(
      tempfile.mkdtemp(prefix=f"qwen_jax_gen_{key}_"), cfg, seed)


@functools.lru_cache(maxsize=None)
def _loaded(key, scan=True):
  path, _ = _saved(key)
  return qwen_jax.load_hf_checkpoint(path, scan_layers=scan)


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  model = qwen_jax.Qwen35(cfg)
  return jax.jit(lambda p, i, m: model.apply({"params": p}, i,
                                             attention_mask=m))


def _hf_generate(model, ids, max_new, mask=None):
  ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
  mask_t = (torch.ones_like(ids_t) if mask is None
            else torch.as_tensor(np.asarray(mask), dtype=torch.long))
  with torch.no_grad():
    out = model.generate(input_ids=ids_t, attention_mask=mask_t,
                         max_new_tokens=max_new, min_new_tokens=max_new,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[:, ids_t.shape[1]:].numpy()


def _left_padded(prompts, pad=0):
  t = max(len(p) for p in prompts)
  ids = np.full((len(prompts), t), pad, np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for r, p in enumerate(prompts):
    ids[r, t - len(p):] = p
    mask[r, t - len(p):] = 1
  return ids, mask


# ------------------------------------------------- prefill + decode == forward
@pytest.mark.parametrize("key,scan", [("hybrid", True), ("hybrid", False),
                                      ("all_linear", True),
                                      ("all_full", True)])
def test_prefill_then_decode_equals_forward(key, scan):
  cfg, params = _loaded(key, scan)
  assert stack.is_scanned(cfg) == (scan and cfg.num_periods > 1)
  b, t_prompt, t_total, block = 2, 70, 140, 64  # blocks of 64 + 6
  ids = hf_utils.random_ids(np.random.default_rng(0), b, t_total, VOCAB)
  mask = np.ones((b, t_total), np.int32)
  mask[1, :9] = 0  # row 1 is left padded
  full = np.asarray(_forward(cfg)(params, jnp.asarray(ids),
                                  jnp.asarray(mask)))

  cache = cache_lib.init_cache(cfg, b, t_total)
  mask_j = jnp.asarray(mask)
  logits, cache = prefill(cfg, params, ids[:, :t_prompt], cache, mask_j,
                              prefill_block=block)
  got = [np.asarray(logits)]
  for i in range(t_prompt, t_total - 1):
    logits, cache = decode_step(cfg, params, ids[:, i], cache, mask_j)
    got.append(np.asarray(logits))
  assert int(cache["index"]) == t_total - 1
  got = np.stack(got, axis=1)  # logits at positions t_prompt-1 .. t_total-2
  tolerances.assert_close(got, full[:, t_prompt - 1:t_total - 1], "float32",
                          err_msg=f"{key} scan={scan}")


@functools.lru_cache(maxsize=None)
def _tiny(**overrides):
  """(cfg, params) of the tiny preset with random weights."""
  cfg = qwen_jax.QwenConfig.from_preset("tiny", **overrides)
  variables = qwen_jax.Qwen35(cfg).init(jax.random.PRNGKey(7),
                                         jnp.zeros((1, 8), jnp.int32))
  return cfg, flax.linen.meta.unbox(variables["params"])


@pytest.mark.parametrize("kernel", [1, 2])
def test_prefill_then_decode_equals_forward_conv_kernel(kernel):
  # K = 1: the conv cache is empty ([b, 0, c]); `[:, -0:]` used to keep the
  # whole window, so the cache grew and decoding went wrong.
  cfg, params = _tiny(linear_conv_kernel_dim=kernel)
  b, t_prompt, t_total = 2, 9, 16
  ids = hf_utils.random_ids(np.random.default_rng(40 + kernel), b, t_total,
                            cfg.vocab_size)
  mask = np.ones((b, t_total), np.int32)
  mask[1, :3] = 0  # row 1 is left padded
  full = np.asarray(_forward(cfg)(params, jnp.asarray(ids),
                                  jnp.asarray(mask)))
  cache = cache_lib.init_cache(cfg, b, t_total)
  mask_j = jnp.asarray(mask)
  logits, cache = prefill(cfg, params, ids[:, :t_prompt], cache, mask_j,
                          prefill_block=4)
  got = [np.asarray(logits)]
  for i in range(t_prompt, t_total - 1):
    logits, cache = decode_step(cfg, params, ids[:, i], cache, mask_j)
    got.append(np.asarray(logits))
  conv = [x for p, x in jax.tree_util.tree_flatten_with_path(cache)[0]
          if p[-1].key == "conv"]
  assert all(x.shape[-2] == kernel - 1 for x in conv)
  tolerances.assert_close(np.stack(got, axis=1),
                          full[:, t_prompt - 1:t_total - 1], "float32",
                          err_msg=f"linear_conv_kernel_dim={kernel}")


# ------------------------------------------------------ greedy == transformers
def test_greedy_equals_transformers():
  path, model = _saved("hybrid")
  cfg, params = _loaded("hybrid")
  ids = hf_utils.random_ids(np.random.default_rng(1), 2, 11, VOCAB)
  ours = np.asarray(qwen_jax.generate(cfg, params, ids, max_new_tokens=24,
                                 prefill_block=4, stop_tokens=()))
  ref = _hf_generate(model, ids, 24)
  np.testing.assert_array_equal(ours, ref)
  del path


def test_left_padded_batch_equals_each_alone_and_transformers():
  _, model = _saved("hybrid")
  cfg, params = _loaded("hybrid")
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, VOCAB, n) for n in (5, 12, 17)]
  ids, mask = _left_padded(prompts)
  n_new = 12
  batch = np.asarray(qwen_jax.generate(
      cfg, params, ids, max_new_tokens=n_new, attention_mask=mask,
      prefill_block=4, stop_tokens=()))
  for r, p in enumerate(prompts):
    alone = np.asarray(qwen_jax.generate(cfg, params, p[None], n_new,
                                    prefill_block=4, stop_tokens=(),
                                    cache_len=32))
    np.testing.assert_array_equal(batch[r], alone[0], err_msg=f"row {r}")
  np.testing.assert_array_equal(batch, _hf_generate(model, ids, n_new, mask))


# --------------------------------------------------- stops, stream, sampling
def test_stop_tokens_and_stream():
  cfg, params = _loaded("hybrid")
  ids = hf_utils.random_ids(np.random.default_rng(1), 2, 11, VOCAB)
  free = np.asarray(qwen_jax.generate(cfg, params, ids, max_new_tokens=24,
                                 prefill_block=4, stop_tokens=()))
  stop = int(free[0, 5])
  pad = VOCAB - 1
  out = np.asarray(qwen_jax.generate(cfg, params, ids, max_new_tokens=24,
                                prefill_block=4, stop_tokens=[stop],
                                pad_token_id=pad))
  for r in range(2):
    hits = np.nonzero(free[r] == stop)[0]
    end = hits[0] + 1 if hits.size else 24
    np.testing.assert_array_equal(out[r, :end], free[r, :end])
    assert (out[r, end:] == pad).all()
  # Streaming in blocks gives the same tokens.
  blocks = list(stream(cfg, params, ids, max_new_tokens=24,
                           prefill_block=4, stop_tokens=(), block_steps=5))
  assert [x.shape[1] for x in blocks] == [1, 5, 5, 5, 5, 3]
  np.testing.assert_array_equal(np.concatenate(blocks, axis=1), free)


def test_seeded_sampling():
  cfg, params = _loaded("hybrid")
  ids = hf_utils.random_ids(np.random.default_rng(3), 2, 7, VOCAB)
  kw = dict(max_new_tokens=16, temperature=1.3, top_k=40, top_p=0.95,
            prefill_block=4, stop_tokens=())
  a = np.asarray(qwen_jax.generate(cfg, params, ids, seed=5, **kw))
  b = np.asarray(qwen_jax.generate(cfg, params, ids, seed=5, **kw))
  c = np.asarray(qwen_jax.generate(cfg, params, ids, seed=6, **kw))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.min() >= 0 and a.max() < VOCAB


def test_sample_logits_rules():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 50)) * 3, jnp.float32)
  order = np.argsort(-np.asarray(logits), axis=-1)
  keys = jax.random.split(jax.random.PRNGKey(0), 200)

  def draws(sampler):
    fn = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, sampler)))
    return np.asarray(fn(keys))  # [200, 4]

  greedy = np.asarray(sample_logits(logits, keys[0], Sampler()))
  np.testing.assert_array_equal(greedy, order[:, 0])
  np.testing.assert_array_equal(draws(Sampler(1.0, top_k=1))[0], greedy)
  np.testing.assert_array_equal(draws(Sampler(1.0, top_p=1e-6))[0],
                                greedy)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))

  def assert_kept(drawn, kept, p):
    # Both ways: nothing outside the kept set is drawn, and each kept token
    # with >= 5% of the kept mass is (missed in 200 draws: < 4e-5).
    assert set(drawn) <= set(kept), (sorted(drawn), sorted(kept))
    mass = p[list(kept)].sum()
    likely = {t for t in kept if p[t] / mass >= 0.05}
    assert likely <= set(drawn), (sorted(drawn), sorted(likely))

  top3 = draws(Sampler(2.0, top_k=3))
  for r in range(4):
    assert_kept(top3[:, r], order[r, :3],
                np.asarray(jax.nn.softmax(logits[r] / 2.0)))
  # top_p: only the smallest prefix of the sorted probabilities reaching p.
  p = 0.7
  nucleus = draws(Sampler(1.0, top_p=p))
  for r in range(4):
    sorted_p = probs[r, order[r]]
    n_keep = int(np.searchsorted(np.cumsum(sorted_p), p) + 1)
    assert_kept(nucleus[:, r], order[r, :n_keep], probs[r])
  # Plain sampling follows the softmax: each row's top token is drawn at its
  # probability, within 5 binomial standard deviations (200 draws).
  full = draws(Sampler(1.0))
  for r in range(4):
    q = probs[r, order[r, 0]]
    freq = (full[:, r] == order[r, 0]).mean()
    assert abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / len(keys)), (r, freq, q)


# ------------------------------------------------------------------- caches
@pytest.mark.parametrize("mixer", [GatedAttention, GatedDeltaNet])
def test_each_mixer_decodes_from_its_own_cache(mixer):
  cfg = qwen_jax.QwenConfig.from_preset("tiny")
  b, t = 2, 6
  kx, kp = jax.random.split(jax.random.PRNGKey(5))
  x = jax.random.normal(kx, (b, t, cfg.hidden_size), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  layer = mixer(cfg)
  if mixer is GatedAttention:
    params = layer.init(kp, x, pos)
    full, _ = layer.apply(params, x, pos)
    cache = GatedAttention.init_cache(cfg, b, t)
    shapes = GatedAttention.cache_shapes(cfg, b, t)
    step = lambda i, c: layer.apply(  # pylint: disable=g-long-lambda
        params, x[:, i:i + 1], pos[:, i:i + 1], None, c, jnp.int32(i))
  else:
    params = layer.init(kp, x)
    full, _ = layer.apply(params, x)
    cache = GatedDeltaNet.init_cache(cfg, b)
    shapes = GatedDeltaNet.cache_shapes(cfg, b)
    step = lambda i, c: layer.apply(params, x[:, i:i + 1], None, c)
  chex.assert_trees_all_equal_shapes_and_dtypes(cache, shapes)
  outs = []
  for i in range(t):  # one token at a time, from the zero cache
    y, cache = step(i, cache)
    outs.append(y)
  tolerances.assert_close(jnp.concatenate(outs, axis=1), full, jnp.float32)


@pytest.mark.parametrize("pattern,layers,scan,dtype", [
    ("3:1", 8, True, None), ("3:1", 8, False, "bfloat16"),
    ("all-linear", 3, True, None), ("all-full", 2, True, "bfloat16"),
    ("1:1", 6, True, None)])
def test_cache_bytes_equals_allocation(pattern, layers, scan, dtype):
  cfg = qwen_jax.QwenConfig.from_preset(
      "tiny", num_hidden_layers=layers, scan_layers=scan,
      layer_types=layer_types_from_ratio(pattern, layers))
  cache = cache_lib.init_cache(cfg, 3, 40, dtype)
  allocated = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
  assert cache_lib.cache_bytes(cfg, 3, 40, dtype) == allocated
  parts = cache_lib.cache_bytes_by_kind(cfg, 3, 40, dtype)
  assert sum(parts.values()) + 4 == allocated  # + the int32 index
  n_full = cfg.layer_types.count(FULL)
  itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
  assert parts["kv"] == n_full * 2 * 3 * 40 * 2 * 32 * itemsize
  for leaf in jax.tree_util.tree_leaves(cache["layers"]):
    lead = (cfg.num_periods,) if stack.is_scanned(cfg) else ()
    assert leaf.shape[:len(lead) + 1] == lead + (3,)
  states = [x for p, x in jax.tree_util.tree_flatten_with_path(cache)[0]
            if p[-1].key == "state"]
  assert all(x.dtype == jnp.float32 for x in states)


def test_cache_bytes_grow_only_with_full_layers():
  cfg = qwen_jax.QwenConfig.from_preset("qwen3.5-0.8b", dtype="bfloat16")
  short = cache_lib.cache_bytes(cfg, 1, 1024)
  long = cache_lib.cache_bytes(cfg, 1, 262144)
  n_full = cfg.layer_types.count(FULL)  # 6 of 24
  per_token = 2 * n_full * cfg.num_key_value_heads * cfg.head_dim * 2
  assert long - short == (262144 - 1024) * per_token
  all_full = cfg.replace(layer_types=layer_types_from_ratio("all-full", 24))
  assert cache_lib.cache_bytes(all_full, 1, 262144) > 3.5 * long


# ------------------------------------------------------------------- errors
def test_errors():
  cfg = qwen_jax.QwenConfig.from_preset("tiny", max_position_embeddings=64)
  with pytest.raises(ValueError, match="max_len"):
    cache_lib.init_cache(cfg, 1, 65)
  with pytest.raises(ValueError, match="batch"):
    cache_lib.cache_bytes(cfg, 0, 8)
  params = {}  # never reached: inputs are checked first
  ok = np.zeros((2, 10), np.int32)
  cases = [
      (dict(prompt_ids=np.zeros((2, 60), np.int32), max_new_tokens=5),
       "max_position_embeddings=64"),
      (dict(prompt_ids=np.zeros((10,), np.int32)), "prompt_ids"),
      (dict(prompt_ids=ok + 300), "prompt_ids"),
      (dict(prompt_ids=ok, max_new_tokens=0), "max_new_tokens"),
      (dict(prompt_ids=ok, attention_mask=np.ones((2, 9))), "attention_mask"),
      (dict(prompt_ids=ok, attention_mask=np.r_[np.ones((1, 10)),
                                                 [[1] * 9 + [0]]]),
       "left padding"),
      (dict(prompt_ids=ok, attention_mask=np.r_[np.ones((1, 10)),
                                                 [[0, 1, 0] + [1] * 7]]),
       "left padding"),
      (dict(prompt_ids=ok, temperature=-1.0), "temperature"),
      (dict(prompt_ids=ok, temperature=1.0, top_k=-1), "top_k"),
      (dict(prompt_ids=ok, min_p=1.5), "min_p"),
      (dict(prompt_ids=ok, repetition_penalty=0.0), "repetition_penalty"),
      (dict(prompt_ids=ok, seed=[1, 2, 3]), "seed"),
      (dict(prompt_ids=ok, stop_strings=["x"]), "tokenizer"),
      (dict(prompt_ids=ok, temperature=1.0, top_p=1.5), "top_p"),
      (dict(prompt_ids=ok, stop_tokens=[999]), "stop_tokens"),
      (dict(prompt_ids=ok, prefill_block=1), "prefill_block"),
      (dict(prompt_ids=ok, max_new_tokens=4, cache_len=12), "cache_len"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      qwen_jax.generate(cfg, params, **kw)


def test_prefill_and_decode_step_errors():
  cfg, params = _tiny()
  b, slots = 2, 6
  ids = hf_utils.random_ids(np.random.default_rng(5), b, 5, cfg.vocab_size)
  cache = cache_lib.init_cache(cfg, b, slots)
  bad_prefill = [
      (dict(prompt_ids=np.where(np.arange(5) == 2, 300, ids)),
       r"prompt_ids: expected values in \[0, vocab_size=256\), found 300 at "
       r"position \(0, 2\)"),
      (dict(prompt_ids=np.where(np.arange(5) == 4, -1, ids)),
       r"prompt_ids: .*found -1 at position \(0, 4\)"),
      (dict(prompt_ids=np.full((b, 5), 2 ** 33, np.int64)),
       "prompt_ids: .*found 8589934592"),
      (dict(prompt_ids=ids.astype(np.float32)), "prompt_ids: expected integer"),
      (dict(prompt_ids=ids[:0]), "prompt_ids: expected shape"),
      (dict(prompt_ids=ids, attention_mask=np.full((b, 5), 2)),
       "attention_mask: expected 0/1"),
      # Right padding, and a row whose last prompt token is masked: the
      # returned logits would be a padding position's.
      (dict(prompt_ids=ids, attention_mask=np.array([[1, 1, 1, 1, 1],
                                                     [1, 1, 1, 0, 0]])),
       r"attention_mask: expected left padding .* found row 1: "
       r"\[1, 1, 1, 0, 0\]"),
      (dict(prompt_ids=ids, attention_mask=np.array([[0, 1, 1, 1, 0]] * 2,
                                                    bool)),
       r"attention_mask: expected left padding .* found row 0"),
      (dict(prompt_ids=ids, cache=cache_lib.init_cache(cfg, 1, slots)),
       r"cache: expected .* and batch 2, found \(1, "),
      (dict(prompt_ids=ids, cache=cache_lib.init_cache(
          cfg.replace(head_dim=16), b, slots)),
       r"cache: expected cache\['layers'\]\['layer_3'\]\['k'\] of shape "
       r"\(2, 6, 2, 32\)"),
  ]
  for kw, match in bad_prefill:
    kw = dict(dict(cache=cache), **kw)
    with pytest.raises(ValueError, match=match):
      prefill(cfg, params, kw.pop("prompt_ids"), kw.pop("cache"), **kw)
  _, cache = prefill(cfg, params, ids, cache)
  tok = ids[:, 0]
  bad_decode = [
      (dict(tokens=np.array([1, 999])),
       r"tokens: expected values in \[0, vocab_size=256\), found 999 at "
       r"position \(1,\)"),
      (dict(tokens=np.array([-1, 1])), r"tokens: .*found -1"),
      (dict(tokens=3), r"tokens: expected shape \[batch\], found \(\)"),
      (dict(tokens=np.array([1, 2, 3])), "cache: expected .* batch 3"),
      (dict(tokens=tok, attention_mask=np.ones((b, 5))),
       r"attention_mask: expected shape \(2, 6\)"),
      (dict(tokens=tok, attention_mask=np.full((b, slots), 0.5)),
       "attention_mask: expected 0/1"),
      # The new token's slot (index 5) masked out.
      (dict(tokens=tok, attention_mask=np.array([[1] * 6, [1] * 5 + [0]])),
       r"attention_mask: expected left padding .* over the 6 slots written, "
       r"found row 1"),
  ]
  for kw, match in bad_decode:
    with pytest.raises(ValueError, match=match):
      decode_step(cfg, params, kw.pop("tokens"), cache, **kw)
  _, cache = decode_step(cfg, params, tok, cache)  # fills the last slot
  assert int(cache["index"]) == slots
  # Past the end: the write used to be clamped onto the last slot.
  with pytest.raises(ValueError, match="cache: expected a free slot, found "
                                       "all 6 slots written"):
    decode_step(cfg, params, tok, cache)


def test_decode_step_all_linear_mask_must_cover_the_tokens():
  cfg, params = _tiny(layer_types=layer_types_from_ratio("all-linear", 4))
  ids = hf_utils.random_ids(np.random.default_rng(6), 2, 5, cfg.vocab_size)
  _, cache = prefill(cfg, params, ids, cache_lib.init_cache(cfg, 2, 8))
  with pytest.raises(ValueError, match=r"attention_mask: expected shape "
                                       r"\(2, >= 6\).*found \(2, 5\)"):
    decode_step(cfg, params, ids[:, 0], cache, np.ones((2, 5), np.int32))
  _, cache = decode_step(cfg, params, ids[:, 0], cache,
                         np.ones((2, 6), np.int32))
  assert int(cache["index"]) == 6


# --------------------------------------------------- experiments/generate.py
def _char_tokenizer(path):
  """A 128-token character-level tokenizer.json (ids = ASCII codes)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {chr(i): i for i in range(32, 127)}
  vocab.update({f"<c{i}>": i for i in list(range(32)) + [127]})
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[],
                                                   unk_token="<c0>"))
  tok.decoder = tokenizers.decoders.Fuse()
  tok.save(os.path.join(path, "tokenizer.json"))
  return tok


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([_ROOT, os.environ.get(
                 "PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "experiments.generate", *args],
                        capture_output=True, text=True, cwd=_ROOT, env=env,
                        timeout=300, check=False)


def test_generate_command(tmp_path):
  path, _ = _saved("hybrid")
  tok = _char_tokenizer(path)
  prompt = "Hi there"
  r = _cli("--checkpoint", path, "--prompt", prompt, "--max_new_tokens",
           "12", "--block_steps", "5")
  assert r.returncode == 0, r.stderr
  cfg, params = _loaded("hybrid")
  ids = np.asarray([tok.encode(prompt, add_special_tokens=False).ids])
  new = np.asarray(qwen_jax.generate(cfg, params, ids, 12, stop_tokens=()))
  assert r.stdout == prompt + tok.decode(new[0].tolist()) + "\n"

  no_tok = tmp_path / "no_tokenizer"
  no_tok.mkdir()
  (no_tok / "config.json").write_text("{}")
  r = _cli("--checkpoint", str(no_tok))
  assert r.returncode == 1 and "tokenizer.json" in r.stderr, r.stderr
  r = _cli("--checkpoint", path, "--prompt", "x" * 600)
  assert r.returncode == 1, r.stderr
  assert "exceeds the maximum of 512 tokens" in r.stderr, r.stderr
