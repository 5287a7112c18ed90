"""Penalties, min_p, per-row settings, stop strings and cache continuation
of qwen_jax/generate.py.

  * `process_logits` equals a float64 NumPy reference of each rule's
    definition (repetition penalty: transformers' `RepetitionPenalty
    LogitsProcessor`; presence penalty: vLLM's, subtracted once for every
    generated token; then temperature, top_k, top_p, min_p), and that
    reference equals transformers' processors where transformers has them;
  * in the compiled loop: greedy decoding with penalties equals decoding
    token by token with `decode_step` and the NumPy penalties, for a left
    padded batch (the padding never counts as seen); sampling with
    min_p = 1 keeps only the best token (so equals greedy);
  * a row's tokens do not depend on its batch (one seed per row), nor on
    how the loop is split into blocks; per-row max_new_tokens;
  * stop strings end a row at the token that completes them, for every
    row or per row, whatever the block size;
  * continuing a cache with more prompt tokens (and `context_ids` for the
    penalty) gives what one prompt gives;
  * `Sampler.from_generation_config` follows transformers' meanings, and
    `generate(generation_config=...)` uses them.

The model has two layers (Gated DeltaNet, full attention) with random
weights drawn by NumPy (`random_params`), a vocabulary of 128 and a character-level
tokenizer.json.
"""

import functools
import os

import jax
import numpy as np
import pytest
import tokenizers
import torch
from transformers.generation import logits_process

import qwen_jax
from qwen_jax import cache as cache_lib
from qwen_jax import tokenizer as tokenizer_lib
from qwen_jax.checkpoint import param_shapes
from qwen_jax.generate import decode_step
from qwen_jax.generate import prefill
from qwen_jax.generate import process_logits
from qwen_jax.generate import Sampler
from qwen_jax.generate import SEEN_GENERATED
from qwen_jax.generate import SEEN_PROMPT
from qwen_jax.generate import stream
from tests import tolerances

VOCAB = 128
# One cache length everywhere: calls of the same batch size and rule share
# their compiled decode loop.
_KW = dict(stop_tokens=(), prefill_block=4, cache_len=48)


def small_config(**overrides) -> qwen_jax.QwenConfig:
  """Two layers, a Gated DeltaNet and a full attention one: the `tiny`
  preset's widths at half its compile time."""
  return qwen_jax.QwenConfig.from_preset(
      "tiny", num_hidden_layers=2,
      layer_types=qwen_jax.layer_types_from_ratio("1:1", 2), **overrides)


def random_params(cfg: qwen_jax.QwenConfig, seed: int = 0) -> dict:
  """Random float32 parameters drawn with NumPy (nothing compiled): wide
  kernels and embeddings (logits far from ties), scales near 1, slow
  Gated DeltaNet decays (its state matters over many tokens)."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = getattr(path[-1], "key", None)
    if name in ("kernel", "embedding"):
      std = 3.0 / np.sqrt(s.shape[-2])
      return (std * rng.standard_normal(s.shape)).astype(np.float32)
    if name == "A_log":  # slow decays: the state remembers many tokens
      return np.log(rng.uniform(0.02, 0.2, s.shape)).astype(np.float32)
    return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


@functools.lru_cache(maxsize=None)
def _model():
  cfg = small_config(vocab_size=VOCAB)
  return cfg, random_params(cfg, 3)


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
  """A character-level tokenizer: ids 32..126 are those characters."""
  path = str(tmp_path_factory.mktemp("char_tokenizer"))
  vocab = {chr(i): i for i in range(32, 127)}
  vocab.update({f"<c{i}>": i for i in list(range(32)) + [127]})
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[],
                                                   unk_token="<c0>"))
  tok.decoder = tokenizers.decoders.Fuse()
  tok.save(os.path.join(path, "tokenizer.json"))
  return tokenizer_lib.load_tokenizer(path)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _reference(logits, seen, sampler):
  """float64 NumPy: each rule as defined (see the module docstring)."""
  x = np.asarray(logits, np.float64).copy()
  rp, pp = sampler.repetition_penalty, sampler.presence_penalty
  if rp is not None:
    x = np.where(seen > 0, np.where(x > 0, x / rp, x * rp), x)
  if pp is not None:
    x = x - pp * (seen >= SEEN_GENERATED)
  if sampler.greedy:
    return x
  x = x / sampler.temperature
  out = np.full_like(x, -np.inf)
  for r in range(x.shape[0]):
    kept = np.argsort(-x[r], kind="stable")[:sampler.top_k or x.shape[1]]
    if sampler.top_p is not None:
      p = _softmax(x[r, kept])
      kept = kept[np.cumsum(p) - p < sampler.top_p]
    if sampler.min_p is not None:
      p = _softmax(x[r, kept])
      kept = kept[p >= sampler.min_p * p.max()]
    out[r, kept] = x[r, kept]
  return out


def _random_seen(rng, shape):
  return rng.choice([0, SEEN_PROMPT, SEEN_GENERATED], size=shape,
                    p=[0.5, 0.3, 0.2]).astype(np.uint8)


@pytest.mark.parametrize("sampler", [
    Sampler(repetition_penalty=1.7),
    Sampler(presence_penalty=2.5),
    Sampler(repetition_penalty=0.8, presence_penalty=-1.0),
    Sampler(1.0, min_p=0.05),
    Sampler(0.7, top_k=12, min_p=0.2, repetition_penalty=1.3),
    Sampler(1.3, top_p=0.8, min_p=0.1, presence_penalty=0.5),
    Sampler(0.9, top_k=20, top_p=0.9, min_p=1.0),
])
def test_process_logits_matches_numpy(sampler):
  rng = np.random.default_rng(int(1000 * sampler.temperature) + int(
      100 * (sampler.min_p or 0)))
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
  seen = _random_seen(rng, logits.shape)
  got = np.asarray(jax.jit(functools.partial(process_logits,
                                             sampler=sampler))(
                                                 logits, seen=seen))
  want = _reference(logits, seen, sampler)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  finite = np.isfinite(want)
  tolerances.assert_close(got[finite], want[finite], "float32")


def test_reference_matches_transformers():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 40)).astype(np.float32) * 3
  ids = rng.integers(0, 40, size=(3, 12))
  seen = np.zeros(logits.shape, np.uint8)
  np.put_along_axis(seen, ids, SEEN_PROMPT, axis=1)
  scores = torch.tensor(logits)
  rep = logits_process.RepetitionPenaltyLogitsProcessor(1.6)(
      torch.tensor(ids), scores.clone())
  np.testing.assert_allclose(
      _reference(logits, seen, Sampler(repetition_penalty=1.6)),
      rep.numpy(), rtol=1e-6)
  for min_p in (0.05, 0.3):
    warped = logits_process.MinPLogitsWarper(min_p)(None, scores.clone())
    ours = _reference(logits, seen, Sampler(1.0, min_p=min_p))
    np.testing.assert_array_equal(np.isfinite(ours),
                                  np.isfinite(warped.numpy()))


def _padded(rows):
  width = max(len(r) for r in rows)
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    ids[i, width - len(r):] = r
    mask[i, width - len(r):] = 1
  return ids, mask


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  # Repeated ids, so that the penalties meet prompt tokens again.
  return [rng.integers(0, 24, 11).tolist(), rng.integers(0, 24, 6).tolist()]


def test_greedy_penalties_in_the_loop_equal_step_by_step():
  cfg, params = _model()
  sampler = Sampler(repetition_penalty=1.8, presence_penalty=3.0)
  rows, n = _prompts(), 10
  ids, mask = _padded(rows)
  got = np.asarray(qwen_jax.generate(
      cfg, params, ids, n, attention_mask=mask, repetition_penalty=1.8,
      presence_penalty=3.0, **_KW))
  changed = 0  # steps where the penalties change the argmax
  for r, row in enumerate(rows):
    cache = cache_lib.init_cache(cfg, 1, _KW["cache_len"])
    logits, cache = prefill(cfg, params, np.asarray([row]), cache,
                            prefill_block=4)
    seen = np.zeros((1, VOCAB), np.uint8)
    seen[0, row] = SEEN_PROMPT
    out = []
    for _ in range(n):
      tok = int(np.argmax(_reference(np.asarray(logits), seen, sampler)))
      changed += tok != int(np.argmax(logits))
      out.append(tok)
      seen[0, tok] = SEEN_GENERATED
      logits, cache = decode_step(cfg, params, np.asarray([tok]), cache)
    np.testing.assert_array_equal(got[r], out, err_msg=f"row {r}")
  assert changed >= 2, changed


def test_sampling_rows_blocks_and_min_p():
  cfg, params = _model()
  rows = _prompts(1)
  ids, mask = _padded(rows)
  kw = dict(_KW, temperature=1.5, top_k=40, repetition_penalty=1.3)
  batch = np.asarray(qwen_jax.generate(cfg, params, ids, 12,
                                       attention_mask=mask, seed=[7, 11],
                                       **kw))
  for r, seed in enumerate((7, 11)):
    alone = np.asarray(qwen_jax.generate(cfg, params, [rows[r]], 12,
                                         seed=seed, **kw))
    np.testing.assert_array_equal(batch[r], alone[0], err_msg=f"row {r}")
  # Blocks change nothing; an int seed s means the seeds s, s + 1, ...
  blocks = stream(cfg, params, ids, 12, attention_mask=mask, seed=[7, 11],
                  block_steps=5, **kw)
  np.testing.assert_array_equal(np.concatenate(list(blocks), axis=1), batch)
  other = np.asarray(qwen_jax.generate(cfg, params, ids, 12,
                                       attention_mask=mask, seed=10, **kw))
  np.testing.assert_array_equal(other[1], batch[1])
  assert (other[0] != batch[0]).any()
  # min_p = 1 keeps the most likely token only: sampling is greedy.
  greedy = np.asarray(qwen_jax.generate(
      cfg, params, ids, 12, attention_mask=mask, repetition_penalty=1.3,
      **_KW))
  sampled = np.asarray(qwen_jax.generate(cfg, params, ids, 12,
                                         attention_mask=mask, min_p=1.0,
                                         **kw))
  np.testing.assert_array_equal(sampled, greedy)
  # The same rule from a generation config (the arguments left unset).
  gc = tokenizer_lib.GenerationConfig(
      do_sample=True, temperature=1.5, top_k=40, min_p=1.0,
      repetition_penalty=1.3)
  from_config = np.asarray(qwen_jax.generate(
      cfg, params, ids, 12, attention_mask=mask, generation_config=gc,
      **_KW))
  np.testing.assert_array_equal(from_config, greedy)


def test_per_row_lengths_and_stop_strings(char_tok):
  cfg, params = _model()
  ids, mask = _padded(_prompts(2))
  kw = dict(_KW, attention_mask=mask, pad_token_id=0)
  free = np.asarray(qwen_jax.generate(cfg, params, ids, 24, **kw))
  # Per-row lengths.
  tokens = stream(cfg, params, ids, [4, 24], block_steps=3, **kw)
  list(tokens)
  assert tokens.stop_reasons == ["length", "length"]
  assert tokens.num_tokens == [4, 24]
  np.testing.assert_array_equal(tokens.tokens[0, :4], free[0, :4])
  assert (tokens.tokens[0, 4:] == 0).all()
  np.testing.assert_array_equal(tokens.tokens[1], free[1])
  # A stop string from row 0's text: each row ends at the first token whose
  # text completes it.
  text0 = char_tok.decode(free[0])
  stop = text0[6:9]

  def cut(row, strings):
    for j in range(len(row)):
      if any(s in char_tok.decode(row[:j + 1]) for s in strings):
        return j + 1
    return None

  for strings, block_steps in (([stop], 1), ([stop], 4),
                               ([[stop], ["\x00never"]], 16)):
    per_row = strings if isinstance(strings[0], list) else [strings] * 2
    tokens = stream(cfg, params, ids, 24, block_steps=block_steps,
                    stop_strings=strings, tokenizer=char_tok, **kw)
    list(tokens)
    for r in range(2):
      end = cut(free[r], per_row[r])
      want = free[r].copy()
      if end is not None:
        want[end:] = 0
      np.testing.assert_array_equal(tokens.tokens[r], want,
                                    err_msg=f"{strings} row {r}")
      assert tokens.stop_reasons[r] == ("length" if end is None
                                        else "stop_string")
      assert tokens.num_tokens[r] == (end or 24)
    assert tokens.stop_strings_found[0] == stop
    got = np.asarray(qwen_jax.generate(cfg, params, ids, 24,
                                       stop_strings=strings,
                                       tokenizer=char_tok, **kw))
    np.testing.assert_array_equal(got, tokens.tokens)


def test_continue_a_cache():
  cfg, params = _model()
  prompt = _prompts(3)[0]
  kw = dict(stop_tokens=(), prefill_block=4, repetition_penalty=1.8)
  whole = np.asarray(qwen_jax.generate(cfg, params, [prompt], 10,
                                       cache_len=48, **kw))
  k = 7
  cache = cache_lib.init_cache(cfg, 1, 48)
  _, cache = prefill(cfg, params, np.asarray([prompt[:k]]), cache)
  tokens = stream(cfg, params, [prompt[k:]], 10, cache=cache,
                  context_ids=[prompt[:k]], **kw)
  blocks = np.concatenate(list(tokens), axis=1)
  np.testing.assert_array_equal(blocks, whole)
  # The cache holds the prompt and every new token but the last.
  np.testing.assert_array_equal(tokens.fed, whole[:, :-1])
  assert int(tokens.cache["index"]) == len(prompt) + 9
  with pytest.raises(ValueError, match="cache: expected at least 21 slots"):
    stream(cfg, params, [prompt], 10, cache=cache_lib.init_cache(cfg, 1, 20),
           **kw)
  with pytest.raises(ValueError, match="context_ids: expected None"):
    stream(cfg, params, [prompt], 4, context_ids=[prompt])


@pytest.mark.parametrize("config, args, want", [
    (None, {}, Sampler()),
    (dict(do_sample=True, temperature=0.6, top_k=20, top_p=0.95), {},
     Sampler(0.6, 20, 0.95)),
    # transformers: without do_sample, greedy whatever the temperature.
    (dict(temperature=0.7, top_k=20), {}, Sampler(0.0, 20)),
    (dict(do_sample=False, temperature=0.7), {}, Sampler()),
    (dict(do_sample=True), {}, Sampler(1.0)),
    (dict(do_sample=True, temperature=0.6, top_k=20, min_p=0.0,
          repetition_penalty=1.0, presence_penalty=1.5), {},
     Sampler(0.6, 20, presence_penalty=1.5)),
    # Arguments win; their "off" values switch the config's rules off.
    (dict(do_sample=True, temperature=0.6, top_k=20, min_p=0.1,
          presence_penalty=1.5),
     dict(temperature=0.0, top_k=0, min_p=0.0, presence_penalty=0.0,
          repetition_penalty=1.2),
     Sampler(0.0, repetition_penalty=1.2)),
])
def test_sampler_from_generation_config(config, args, want):
  gc = None if config is None else tokenizer_lib.GenerationConfig(**config)
  assert Sampler.from_generation_config(gc, **args) == want
