"""Autoregressive generation: prefill, decode step, sampler, compiled loop.

  prefill      the prompt goes through the model in blocks of `prefill_block`
               tokens (chunked gated delta rule and full attention over the
               cache), filling the cache; only the last token's logits are
               kept, so a long prompt never materialises [t, vocab] logits.
  decode_step  one token per sequence: the recurrent update in the Gated
               DeltaNet layers, attention over the KV cache in the others.
  generate     prefill, then the whole decode loop in one `lax.while_loop`
               (no per-token Python dispatch), stopping early once every
               sequence has produced a stop token.
  stream       the same loop run `block_steps` tokens at a time, yielding
               each block to the host as it is done (for printing).

Batches of prompts of different lengths are left padded; `attention_mask`
([b, t], 1 = token, 0 = padding) marks the padding. Positions are
arange(t) for every row: RoPE only sees position differences, and padded
keys are masked out, so each row gives what it gives alone. The padded
inputs of the Gated DeltaNet layers are zeroed, so its state and conv
window start exactly as for the row alone.

Sampling (`Sampler`): greedy when temperature == 0, otherwise softmax
sampling of logits / temperature, restricted to the `top_k` largest and
then to the smallest set whose probability reaches `top_p` (the order
transformers applies them in). Draws are seeded: step i uses
`fold_in(PRNGKey(seed), i)`, so a result does not depend on how the loop is
split into blocks.

Layer loop: on a CPU, `generate` and `stream` run float parameters in the
decode layout (`qwen_jax.decode_loop.prepare`: unscanned, output-major
kernels; converted once per parameter object and kept while it lives), the
fastest layout for reading the weights there. Every function here also
takes a decode-layout tree from `qwen_jax.quantize` (int8 or bfloat16
weights), with the unscanned config's cache.

Example:
  cfg, params = qwen_jax.load_hf_checkpoint(path)
  new = qwen_jax.generate(cfg, params, prompt_ids, max_new_tokens=32)
  new = qwen_jax.generate(cfg, qwen_jax.quantize(cfg, params, "int8"),
                          prompt_ids, max_new_tokens=32)

`qwen_jax.generate` is the function (the package's public API), which hides
this module's name on the package; import the other names with
`from qwen_jax.generate import prefill, decode_step, stream`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import cache as cache_lib
from qwen_jax import decode_loop
from qwen_jax import head
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.config import QwenConfig
from qwen_jax.model import check_input_ids
from qwen_jax.model import check_mask_values
from qwen_jax.model import host_values
from qwen_jax.quantize import is_decode_layout

# Prompt tokens per prefill call. Bounds activation memory for long prompts
# (a 262,144-token prompt runs as 32 such blocks).
DEFAULT_PREFILL_BLOCK = 8192


# ------------------------------------------------------------------ sampler
@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is picked from the logits (hashable: a jit key).

  Attributes:
    temperature: 0 for greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens (None: all).
    top_p: keep the smallest set of most likely tokens whose probability
      reaches top_p (None or 1.0: all).
  """
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not np.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature: expected a finite float >= 0, found "
                       f"{self.temperature!r}")
    if self.top_k is not None and (
        not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1):
      raise ValueError(f"top_k: expected None or an int >= 1, found "
                       f"{self.top_k!r}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p: expected None or a float in (0, 1], found "
                       f"{self.top_p!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def sample_logits(logits: Array, key: Array, sampler: Sampler) -> Array:
  """Picks one token per row.

  Args:
    logits: [b, V] next-token logits.
    key: a PRNG key (unused when greedy).
    sampler: the sampling rule.

  Returns:
    [b] int32 token ids.
  """
  logits = logits.astype(jnp.float32)
  if sampler.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampler.temperature
  vocab = logits.shape[-1]
  top_k = sampler.top_k if sampler.top_k and sampler.top_k < vocab else None
  top_p = sampler.top_p if sampler.top_p and sampler.top_p < 1.0 else None
  if top_k is None and top_p is None:
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  # Sorted (descending) candidate logits: the top k, or the whole vocab.
  if top_k is not None:
    cand = jax.lax.top_k(logits, top_k)[0]
  else:
    cand = -jnp.sort(-logits, axis=-1)
  keep = jnp.ones(cand.shape, bool)
  if top_p is not None:
    probs = jax.nn.softmax(cand, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of better tokens
    keep = before < top_p  # the most likely token always stays
  threshold = jnp.min(jnp.where(keep, cand, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _step_key(seed_key: Array, step: Array) -> Array:
  return jax.random.fold_in(seed_key, step)


# -------------------------------------------------------- model entry points
def _head(cfg: QwenConfig, params: PyTree, hidden: Array) -> Array:
  """Logits [b, V] (float32) from final normalised hidden states [b, d],
  computed in cfg.dtype as the model's forward computes them."""
  if is_decode_layout(params):
    return decode_loop.head_logits(cfg, params, hidden)
  w, vocab_major = head.head_weights(cfg, params)
  return head.lm_logits(hidden, w, vocab_major, jnp.dtype(cfg.dtype),
                        accumulate=False).astype(jnp.float32)


def _prefill_chunk(cfg: QwenConfig, params: PyTree, ids: Array,
                   cache: PyTree, mask: Array | None):
  # Only the last hidden state leaves the function, so XLA drops the
  # [b, t, V] logits the model would otherwise compute.
  _, cache, hidden = decode_loop.apply_model(
      cfg, params, ids, attention_mask=mask, cache=cache, return_hidden=True)
  return _head(cfg, params, hidden[:, -1]), cache


_prefill_chunk_jit = jax.jit(_prefill_chunk, static_argnums=0,
                             donate_argnums=3)


def _decode(cfg: QwenConfig, params: PyTree, tokens: Array, cache: PyTree,
            mask: Array | None):
  logits, cache = decode_loop.apply_model(
      cfg, params, tokens[:, None], attention_mask=mask, cache=cache)
  return logits[:, 0].astype(jnp.float32), cache


_decode_jit = jax.jit(_decode, static_argnums=0, donate_argnums=3)


def _slot_mask(mask: Array | None, b: int, t: int, index: int,
               slots: int | None) -> Array | None:
  """The model's [b, S] cache-slot mask from a [b, t] or [b, S] mask.

  A [b, t] mask (over the prompt) is accepted for an empty cache and
  extended with ones over the slots still to be written.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask).astype(jnp.int32)
  if mask.ndim == 2 and mask.shape[0] == b:
    if slots is not None and mask.shape[1] == slots:
      return mask
    if slots is None and mask.shape[1] >= index + t:
      return mask  # no KV buffers: any mask covering the tokens written
    if index == 0 and mask.shape[1] == t:
      if slots is None:
        return mask
      return jnp.concatenate(
          [mask, jnp.ones((b, slots - t), jnp.int32)], axis=1)
  want = f"({b}, {slots})" if slots is not None else f"({b}, >= {index + t})"
  prompt = f"{(b, t)} (the prompt) or " if index == 0 else ""
  raise ValueError(f"attention_mask: expected shape {prompt}{want} (every "
                   f"cache slot), found {tuple(mask.shape)}")


def _check_mask(mask: Array | None, written: int) -> None:
  """Checks a concrete mask's values, read to the host once: 0/1 or bool
  (`check_mask_values`), and every row left padded over the slots written
  so far (`written`, this call's tokens included): 0s, then 1s, ending
  with a token.

  Right padding, or a row whose newest token is masked, would make the
  returned logits those of a padding position (the model reads the mask
  as given and cannot tell). Skipped for traced masks.
  """
  values = None if mask is None else host_values(mask)
  if values is None:
    return
  check_mask_values(values)
  if written == 0:
    return
  rows = values[:, :written] != 0
  bad = np.flatnonzero(~rows[:, -1] | (rows[:, 1:] < rows[:, :-1]).any(1))
  if bad.size:
    r = int(bad[0])
    raise ValueError(
        f"attention_mask: expected left padding (0s, then 1s, the last "
        f"token a 1) over the {written} slots written, found row {r}: "
        f"{rows[r].astype(int).tolist()[-16:]} (last 16 shown)")


def _token_ids(name: str, ids: Any, ndim: int, vocab_size: int) -> Array:
  """int32 ids after checking rank, dtype and range (on the host)."""
  if not isinstance(ids, (jax.Array, np.ndarray)):
    ids = np.asarray(ids)
  if ids.ndim != ndim:
    want = "[batch>=1, time>=1]" if ndim == 2 else "[batch]"
    raise ValueError(f"{name}: expected shape {want}, found "
                     f"{tuple(ids.shape)}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name}: expected integer token ids, found dtype "
                     f"{ids.dtype}")
  check_input_ids(ids, vocab_size, name)  # before the cast: 2**33 is seen
  return jnp.asarray(ids, jnp.int32)


def _check_block(prefill_block: Any) -> None:
  if not isinstance(prefill_block, (int, np.integer)) or prefill_block < 2:
    # A one-token block would skip the padding mask of the linear layers.
    raise ValueError(f"prefill_block: expected an int >= 2, found "
                     f"{prefill_block!r}")


def prefill(cfg: QwenConfig, params: PyTree, prompt_ids: Array,
            cache: PyTree, attention_mask: Array | None = None,
            prefill_block: int = DEFAULT_PREFILL_BLOCK
            ) -> tuple[Array, PyTree]:
  """Runs the prompt through the model, filling the cache.

  The prompt is cut into blocks of `prefill_block` tokens (the last one may
  be shorter); each block continues from the cache the previous one left.
  At most two programs are compiled per prompt length (a full block and the
  remainder). The cache passed in is donated: use the returned one.

  Args:
    cfg: the model config.
    params: the parameters.
    prompt_ids: [b, t] int token ids (left padded when rows differ).
    cache: a cache from `qwen_jax.cache.init_cache` (index 0 for a new
      prompt; a non-zero index appends to what is cached).
    attention_mask: None, or [b, t] over the prompt, or [b, S] over every
      cache slot (1 = token, 0 = padding).
    prefill_block: prompt tokens per model call (>= 2).

  Returns:
    (logits [b, V] float32 of the last prompt token, the filled cache).

  Raises:
    ValueError: bad shapes, ids outside [0, vocab_size), a concrete mask
      with values other than 0/1 or not left padded, a cache of another
      config or batch, a prompt that does not fit the cache, or a block
      size < 2.
  """
  _check_block(prefill_block)
  cfg = decode_loop.layout_cfg(cfg, params)
  prompt_ids = _token_ids("prompt_ids", prompt_ids, 2, cfg.vocab_size)
  if prompt_ids.shape[0] < 1 or prompt_ids.shape[1] < 1:
    raise ValueError(f"prompt_ids: expected shape [batch>=1, time>=1], found "
                     f"{tuple(prompt_ids.shape)}")
  b, t = prompt_ids.shape
  slots = cache_lib.check_cache(cfg, cache, b)
  index = int(cache["index"])
  if slots is not None and index + t > slots:
    raise ValueError(f"prompt_ids: {t} tokens do not fit a cache of {slots} "
                     f"slots holding {index}")
  mask = _slot_mask(attention_mask, b, t, index, slots)
  # The shape is checked: its first index + t columns are the slots written.
  _check_mask(attention_mask, index + t)
  logits = None
  for start in range(0, t, prefill_block):
    chunk = prompt_ids[:, start:start + prefill_block]
    logits, cache = _prefill_chunk_jit(cfg, params, chunk, cache, mask)
  return logits, cache


def decode_step(cfg: QwenConfig, params: PyTree, tokens: Array,
                cache: PyTree, attention_mask: Array | None = None
                ) -> tuple[Array, PyTree]:
  """Feeds one token per sequence; returns its logits and the new cache.

  The ids, the cache's shapes and its index are checked on the host first:
  reading the index waits for the previous step to finish (as reading its
  logits does).

  Args:
    cfg: the model config.
    params: the parameters.
    tokens: [b] int token ids in [0, vocab_size).
    cache: the cache (donated: use the returned one), with a free slot.
    attention_mask: None or [b, S] over every cache slot ([b, >= index + 1]
      when no layer keeps K/V), 0/1 or bool.

  Returns:
    (logits [b, V] float32, the cache with one more token).

  Raises:
    ValueError: tokens of another shape or outside [0, vocab_size), a cache
      of another config or batch, a full cache, or a bad mask.
  """
  cfg = decode_loop.layout_cfg(cfg, params)
  tokens = _token_ids("tokens", tokens, 1, cfg.vocab_size)
  b = tokens.shape[0]
  slots = cache_lib.check_cache(cfg, cache, b)
  index = int(cache["index"])
  if slots is not None and index + 1 > slots:
    raise ValueError(f"cache: expected a free slot, found all {slots} slots "
                     f"written (index {index}); allocate a longer cache")
  if attention_mask is not None:
    if not isinstance(attention_mask, (jax.Array, np.ndarray)):
      attention_mask = jnp.asarray(attention_mask)
    shape = tuple(attention_mask.shape)
    if slots is None and (len(shape) != 2 or shape[0] != b
                          or shape[1] < index + 1):
      raise ValueError(f"attention_mask: expected shape ({b}, >= "
                       f"{index + 1}) (every token written), found {shape}")
    if slots is not None and shape != (b, slots):
      raise ValueError(f"attention_mask: expected shape {(b, slots)} (every "
                       f"cache slot), found {shape}")
    _check_mask(attention_mask, index + 1)
  return _decode_jit(cfg, params, tokens, cache, attention_mask)


# ------------------------------------------------------------- decode loop
def _start(sampler: Sampler, logits: Array, seed_key: Array, stops: Array,
           out: Array) -> dict[str, Array]:
  """Samples token 0 from the prefill logits; the loop state."""
  tok = sample_logits(logits, _step_key(seed_key, 0), sampler)
  done = jnp.any(tok[:, None] == stops[None, :], axis=-1)
  return {"step": jnp.int32(1), "token": tok, "done": done,
          "out": out.at[:, 0].set(tok)}


_start_jit = jax.jit(_start, static_argnums=0, donate_argnums=4)


def _loop(cfg: QwenConfig, sampler: Sampler, params: PyTree,
          state: dict[str, Any], mask: Array | None, seed_key: Array,
          stops: Array, pad_id: Array, end: Array) -> dict[str, Any]:
  """Decodes until `end` tokens are out or every row has stopped."""

  def cond(s):
    return (s["step"] < end) & ~jnp.all(s["done"])

  def body(s):
    logits, cache = _decode(cfg, params, s["token"], s["cache"], mask)
    tok = sample_logits(logits, _step_key(seed_key, s["step"]), sampler)
    tok = jnp.where(s["done"], pad_id, tok)
    out = jax.lax.dynamic_update_slice(s["out"], tok[:, None],
                                       (0, s["step"]))
    done = s["done"] | jnp.any(tok[:, None] == stops[None, :], axis=-1)
    return {"step": s["step"] + 1, "token": tok, "done": done, "out": out,
            "cache": cache}

  return jax.lax.while_loop(cond, body, state)


_loop_jit = jax.jit(_loop, static_argnums=(0, 1), donate_argnums=3)


# ------------------------------------------------------------------- public
def _stop_ids(cfg: QwenConfig, stop_tokens) -> np.ndarray:
  if stop_tokens is None:
    stop_tokens = cfg.eos_token_id
  if stop_tokens is None:
    stop_tokens = ()
  elif isinstance(stop_tokens, (int, np.integer)):
    stop_tokens = (int(stop_tokens),)
  ids = np.asarray(list(stop_tokens), np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
    raise ValueError(f"stop_tokens: expected ids in [0, {cfg.vocab_size}), "
                     f"found {ids.tolist()}")
  return ids.astype(np.int32)


def _prepare(cfg, prompt_ids, max_new_tokens, attention_mask, cache_len,
             prefill_block, stop_tokens, pad_token_id):
  """Validates the inputs; returns what the loop needs, on the host."""
  _check_block(prefill_block)
  prompt = np.asarray(prompt_ids)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.shape[0] < 1:
    raise ValueError(f"prompt_ids: expected shape [batch>=1, time>=1], "
                     f"found {tuple(prompt.shape)}")
  if not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt_ids: expected integer token ids, found dtype "
                     f"{prompt.dtype}")
  if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
    raise ValueError(f"prompt_ids: expected ids in [0, {cfg.vocab_size}), "
                     f"found min {prompt.min()} max {prompt.max()}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected an int >= 1, found "
                     f"{max_new_tokens!r}")
  b, t = prompt.shape
  need = t + int(max_new_tokens)
  if need > cfg.max_position_embeddings:
    raise ValueError(
        f"prompt_ids: prompt length {t} + max_new_tokens {max_new_tokens} = "
        f"{need} exceeds max_position_embeddings="
        f"{cfg.max_position_embeddings}")
  if cache_len is None:
    cache_len = need
  elif cache_len < need:
    raise ValueError(f"cache_len: expected at least prompt length + "
                     f"max_new_tokens = {need}, found {cache_len}")
  mask = None
  if attention_mask is not None:
    mask = np.asarray(attention_mask)
    if mask.shape != (b, t):
      raise ValueError(f"attention_mask: expected shape {(b, t)}, found "
                       f"{tuple(mask.shape)}")
    mask = (mask != 0).astype(np.int32)  # left padding: checked by prefill
    if mask.all():
      mask = None  # no padding: skip the masking work
    else:
      mask = np.concatenate([mask, np.ones((b, cache_len - t), np.int32)],
                            axis=1)
  stops = _stop_ids(cfg, stop_tokens)
  if pad_token_id is None:
    pad_token_id = cfg.pad_token_id
  if pad_token_id is None:
    pad_token_id = int(stops[0]) if stops.size else 0
  return prompt.astype(np.int32), mask, int(cache_len), stops, pad_token_id


def _begin(cfg, params, prompt_ids, max_new_tokens, sampler, attention_mask,
           seed, stop_tokens, pad_token_id, prefill_block, cache_len):
  """Validates, prefills and samples token 0.

  Returns:
    (loop state, (mask, seed_key, stops, pad) for `_loop`, and the config
    and parameters the programs run: `decode_loop.prepare`'s).
  """
  prompt, mask, cache_len, stops, pad_id = _prepare(
      cfg, prompt_ids, max_new_tokens, attention_mask, cache_len,
      prefill_block, stop_tokens, pad_token_id)
  cfg, params = decode_loop.prepare(cfg, params)
  b, _ = prompt.shape
  cache = cache_lib.init_cache(cfg, b, cache_len)
  mask = None if mask is None else jnp.asarray(mask)
  logits, cache = prefill(cfg, params, prompt, cache, mask, prefill_block)
  seed_key = jax.random.PRNGKey(seed)
  stops = jnp.asarray(stops)
  pad = jnp.int32(pad_id)
  out = jnp.full((b, max_new_tokens), pad, jnp.int32)
  state = _start_jit(sampler, logits, seed_key, stops, out)
  state["cache"] = cache
  return state, (mask, seed_key, stops, pad), cfg, params


def stream(cfg: QwenConfig, params: PyTree, prompt_ids: Array,
           max_new_tokens: int = 32, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None,
           attention_mask: Array | None = None, seed: int = 0,
           stop_tokens: int | Sequence[int] | None = None,
           pad_token_id: int | None = None, block_steps: int = 16,
           prefill_block: int = DEFAULT_PREFILL_BLOCK,
           cache_len: int | None = None) -> Iterator[np.ndarray]:
  """Like `generate`, yielding new tokens as they are decoded.

  The first block is the token sampled from the prompt; then each block is
  up to `block_steps` tokens decoded by one compiled loop call. The
  concatenated blocks (padded with `pad_token_id` to max_new_tokens) equal
  `generate`'s result for the same arguments.

  Args:
    cfg, params, prompt_ids, max_new_tokens, temperature, top_k, top_p,
    attention_mask, seed, stop_tokens, pad_token_id, prefill_block,
    cache_len: as in `generate`.
    block_steps: decode steps per compiled call (>= 1).

  Yields:
    np.ndarray [b, n] int32 of the next n new tokens (n >= 1). Rows that
    stopped are filled with the pad id. Ends when max_new_tokens are out or
    every row has stopped.
  """
  if not isinstance(block_steps, (int, np.integer)) or block_steps < 1:
    raise ValueError(f"block_steps: expected an int >= 1, found "
                     f"{block_steps!r}")
  sampler = Sampler(float(temperature), top_k, top_p)
  state, loop_args, cfg, params = _begin(
      cfg, params, prompt_ids, max_new_tokens, sampler, attention_mask, seed,
      stop_tokens, pad_token_id, prefill_block, cache_len)
  yield np.asarray(state["out"][:, :1])
  done = 1
  while done < max_new_tokens and not bool(jnp.all(state["done"])):
    end = min(done + block_steps, max_new_tokens)
    state = _loop_jit(cfg, sampler, params, state, *loop_args,
                      jnp.int32(end))
    step = int(state["step"])
    if step > done:
      yield np.asarray(state["out"][:, done:step])
    done = step


def generate(cfg: QwenConfig, params: PyTree, prompt_ids: Array,
             max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             attention_mask: Array | None = None, seed: int = 0,
             stop_tokens: int | Sequence[int] | None = None,
             pad_token_id: int | None = None,
             prefill_block: int = DEFAULT_PREFILL_BLOCK,
             cache_len: int | None = None) -> Array:
  """Generates `max_new_tokens` tokens after each prompt.

  Args:
    cfg: the model config.
    params: the parameters (`Qwen35(cfg)` tree).
    prompt_ids: [b, t] int token ids; rows of different lengths are left
      padded (see attention_mask).
    max_new_tokens: tokens to generate per row.
    temperature: 0 for greedy decoding; > 0 samples softmax(logits / T).
    top_k: sample among the k most likely tokens only.
    top_p: sample among the smallest set of tokens with probability >= p.
    attention_mask: [b, t], 1 for prompt tokens and 0 for left padding;
      None means no padding.
    seed: seed of the sampler (ignored when greedy).
    stop_tokens: ids that end a row (the stop token is kept in the output;
      later positions get the pad id). None: cfg.eos_token_id; () for none.
    pad_token_id: id written after a row stops; default cfg.pad_token_id,
      else the first stop token, else 0.
    prefill_block: prompt tokens per prefill call (memory bound for long
      prompts).
    cache_len: KV slots to allocate (>= t + max_new_tokens; default exactly
      that). A fixed value avoids recompiling the decode loop when prompt
      lengths change.

  Returns:
    [b, max_new_tokens] int32 new token ids.

  Raises:
    ValueError: bad shapes or ids, a right-padded mask, bad sampling
      parameters, or a prompt plus new tokens longer than
      max_position_embeddings.
  """
  sampler = Sampler(float(temperature), top_k, top_p)
  state, loop_args, cfg, params = _begin(
      cfg, params, prompt_ids, max_new_tokens, sampler, attention_mask, seed,
      stop_tokens, pad_token_id, prefill_block, cache_len)
  if max_new_tokens > 1:
    state = _loop_jit(cfg, sampler, params, state, *loop_args,
                      jnp.int32(max_new_tokens))
  return state["out"]
