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

Images and videos (`pixel_values` / `image_grid_thw`, `pixel_values_videos`
/ `video_grid_thw`, as transformers' processor gives them) go through the
tower once, before the prompt; each prefill block takes the features of
its own placeholders and its slice of the prompt's multimodal positions
(`qwen_jax.mrope`, padding skipped, as transformers' `get_rope_index`).
The cache then carries each row's rope delta (cache["rope_delta"]), and
every decoded token sits at (the row's tokens before it) + its delta:
transformers' generate, left padding included, for prompts that end in
text (as chat prompts do). A prompt whose last token is a placeholder is
the exception: transformers' generate then steps each of the three rows
on from its own last value, while here all three continue from the
position text after the image would take (`get_rope_index`'s rule).

Sampling (`Sampler`), in transformers' order: the penalties first (on the
raw logits, greedy decoding included), then, when sampling, logits /
temperature, the `top_k` largest, the smallest set whose probability
reaches `top_p`, and the tokens with probability >= `min_p` times the most
likely one's; temperature 0 is greedy (argmax).
  repetition_penalty  transformers' `RepetitionPenaltyLogitsProcessor`: the
                      logit of every token already in the prompt or the
                      generated text is divided by the penalty when positive
                      and multiplied by it when negative.
  presence_penalty    vLLM's and the OpenAI API's definition (transformers
                      has none; Qwen's model cards recommend it for vLLM and
                      SGLang): the penalty is subtracted once from the logit
                      of every token generated so far (the prompt does not
                      count), however often it occurred.
Both read a [b, vocab] uint8 mask carried in the loop state (0 unseen,
SEEN_PROMPT, SEEN_GENERATED), allocated only when a penalty is on. Each row
draws with its own key, `fold_in(PRNGKey(seed_r), step)` (seed_r = seed + r
for an int seed, or one seed per row), so a row's tokens depend neither on
how the loop is split into blocks nor on the other rows of its batch.

Stops: `stop_tokens` end a row inside the compiled loop; `stop_strings`
(with a tokenizer) and per-row `max_new_tokens` are checked on the host
after each block of `stream` (the row is then marked done in the loop
state, so it stops costing work from the next block on). A stop string
ends the row at the token that completes it, as transformers'
`StopStringCriteria` does.

`generation_config` (`qwen_jax.tokenizer.load_generation_config`) fills
every sampling argument left None, with transformers' meanings
(`Sampler.from_generation_config`), and adds its eos and pad ids.

Layer loop: on a CPU, `generate` and `stream` run float parameters in the
decode layout (`qwen_jax.decode_loop.prepare`: unscanned, output-major
kernels; converted once per parameter object and kept while it lives), the
fastest layout for reading the weights there. Every function here also
takes a decode-layout tree from `qwen_jax.quantize` (int8 or bfloat16
weights), with the unscanned config's cache.

Example:
  cfg, params = qwen_jax.load_hf_checkpoint(path)
  tok = qwen_jax.load_tokenizer(path)
  ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                add_generation_prompt=True)
  new = qwen_jax.generate(
      cfg, params, [ids], max_new_tokens=256,
      generation_config=qwen_jax.tokenizer.load_generation_config(path))
  print(tok.decode(new[0], skip_special_tokens=True))
  new = qwen_jax.generate(cfg, qwen_jax.quantize(cfg, params, "int8"),
                          [ids], max_new_tokens=256)

`qwen_jax.generate` is the function (the package's public API), which hides
this module's name on the package; import the other names with
`from qwen_jax.generate import prefill, decode_step, stream`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import cache as cache_lib
from qwen_jax import decode_loop
from qwen_jax import head
from qwen_jax import model as model_lib
from qwen_jax import tokenizer as tokenizer_lib
from qwen_jax import vision as vision_lib
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
# Levels of the seen mask ([b, vocab] uint8) the penalties read.
SEEN_PROMPT = 1  # in the prompt (or the context already in the cache)
SEEN_GENERATED = 2  # generated (whether or not in the prompt too)


def _finite(value: Any) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, bool) and bool(np.isfinite(value)))


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is picked from the logits (hashable: a jit key).

  Values that switch a rule off (min_p 0, repetition_penalty 1,
  presence_penalty 0) are stored as None, so equal rules are equal keys.

  Attributes:
    temperature: 0 for greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens (None: all).
    top_p: keep the smallest set of most likely tokens whose probability
      reaches top_p (None or 1.0: all).
    min_p: keep the tokens whose probability is >= min_p times the most
      likely one's (None or 0: all).
    repetition_penalty: > 0; divides the positive logits and multiplies
      the negative ones of the tokens in the prompt or generated (None or
      1: off). Applies to greedy decoding too.
    presence_penalty: subtracted from the logits of the tokens generated so
      far (None or 0: off; negative values favour them). Applies to greedy
      decoding too.
  """
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  min_p: float | None = None
  repetition_penalty: float | None = None
  presence_penalty: float | None = None

  def __post_init__(self):
    if not _finite(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature: expected a finite float >= 0, found "
                       f"{self.temperature!r}")
    if self.top_k is not None and (
        not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1):
      raise ValueError(f"top_k: expected None or an int >= 1, found "
                       f"{self.top_k!r}")
    if self.top_p is not None and not (_finite(self.top_p)
                                       and 0.0 < self.top_p <= 1.0):
      raise ValueError(f"top_p: expected None or a float in (0, 1], found "
                       f"{self.top_p!r}")
    if self.min_p is not None and not (_finite(self.min_p)
                                       and 0.0 <= self.min_p <= 1.0):
      raise ValueError(f"min_p: expected None or a float in [0, 1], found "
                       f"{self.min_p!r}")
    if self.repetition_penalty is not None and not (
        _finite(self.repetition_penalty) and self.repetition_penalty > 0):
      raise ValueError(f"repetition_penalty: expected None or a finite "
                       f"float > 0, found {self.repetition_penalty!r}")
    if self.presence_penalty is not None and not _finite(
        self.presence_penalty):
      raise ValueError(f"presence_penalty: expected None or a finite "
                       f"float, found {self.presence_penalty!r}")
    for name, off in (("min_p", 0.0), ("repetition_penalty", 1.0),
                      ("presence_penalty", 0.0)):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, None if value == off else float(value))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  @property
  def penalized(self) -> bool:
    """Whether a penalty is on (the loop then tracks the seen tokens)."""
    return (self.repetition_penalty is not None
            or self.presence_penalty is not None)

  @classmethod
  def from_generation_config(cls, generation_config: Any = None, *,
                             temperature: float | None = None,
                             top_k: int | None = None,
                             top_p: float | None = None,
                             min_p: float | None = None,
                             repetition_penalty: float | None = None,
                             presence_penalty: float | None = None
                             ) -> Sampler:
    """The sampler of explicit arguments over a checkpoint's defaults.

    Each argument left None is taken from `generation_config` (a
    `qwen_jax.tokenizer.GenerationConfig`, or None for none) with
    transformers' meaning: `do_sample` false or unset means greedy whatever
    its temperature; do_sample true samples at its temperature (1.0 when
    unset). Given or read, top_k 0, top_p 1, min_p 0, repetition_penalty 1
    and presence_penalty 0 mean off (so an argument can switch off what the
    config sets).

    Raises:
      ValueError: a value out of range (named).
    """
    gc = generation_config
    get = lambda name: None if gc is None else getattr(gc, name, None)
    if temperature is None:
      if get("do_sample"):
        temperature = 1.0 if get("temperature") is None else get(
            "temperature")
      else:
        temperature = 0.0
    if top_k is None:
      top_k = get("top_k")
    return cls(
        float(temperature), None if top_k == 0 else top_k,
        get("top_p") if top_p is None else top_p,
        get("min_p") if min_p is None else min_p,
        get("repetition_penalty") if repetition_penalty is None
        else repetition_penalty,
        get("presence_penalty") if presence_penalty is None
        else presence_penalty)


def apply_penalties(logits: Array, seen: Array, sampler: Sampler) -> Array:
  """The repetition and presence penalties (see `Sampler`).

  Args:
    logits: [b, V] float32 logits.
    seen: [b, V] mask: 0 unseen, SEEN_PROMPT, SEEN_GENERATED.
    sampler: the rule.

  Returns:
    [b, V] float32 penalized logits.
  """
  if sampler.repetition_penalty is not None:
    rp = sampler.repetition_penalty
    penalized = jnp.where(logits > 0, logits / rp, logits * rp)
    logits = jnp.where(seen > 0, penalized, logits)
  if sampler.presence_penalty is not None:
    logits = logits - jnp.where(seen >= SEEN_GENERATED,
                                jnp.float32(sampler.presence_penalty), 0.0)
  return logits


def process_logits(logits: Array, sampler: Sampler,
                   seen: Array | None = None) -> Array:
  """The logits the next token is drawn from.

  Penalties, then for sampling: / temperature, top_k, top_p, min_p (the
  tokens removed are -inf). Greedy decoding takes the argmax of the
  penalized logits.

  Args:
    logits: [b, V] next-token logits.
    sampler: the rule.
    seen: [b, V] seen mask (needed when `sampler.penalized`).

  Returns:
    [b, V] float32.

  Raises:
    ValueError: a penalized sampler without a seen mask.
  """
  logits = logits.astype(jnp.float32)
  if sampler.penalized:
    if seen is None:
      raise ValueError("seen: expected the [batch, vocab] mask of the tokens "
                       "seen (the sampler has a penalty), found None")
    logits = apply_penalties(logits, seen, sampler)
  if sampler.greedy:
    return logits
  logits = logits / sampler.temperature
  vocab = logits.shape[-1]
  top_k = sampler.top_k if sampler.top_k and sampler.top_k < vocab else None
  top_p = sampler.top_p if sampler.top_p and sampler.top_p < 1.0 else None
  if top_k is not None or top_p is not None:
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
    threshold = jnp.min(jnp.where(keep, cand, jnp.inf), axis=-1,
                        keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  if sampler.min_p is not None:
    # p >= min_p * p_max  <=>  logit - max logit >= log(min_p); the
    # filters above keep the most likely token, so its logit is the max.
    best = jnp.max(logits, axis=-1, keepdims=True)
    logits = jnp.where(logits - best >= np.log(sampler.min_p), logits,
                       -jnp.inf)
  return logits


def sample_logits(logits: Array, key: Array, sampler: Sampler,
                  seen: Array | None = None) -> Array:
  """Picks one token per row.

  Args:
    logits: [b, V] next-token logits.
    key: a PRNG key for the whole batch, or one per row ([b, 2] raw keys,
      or [b] typed keys); unused when greedy.
    sampler: the sampling rule.
    seen: [b, V] seen mask (SEEN_PROMPT / SEEN_GENERATED), needed when the
      sampler has a penalty.

  Returns:
    [b] int32 token ids.
  """
  logits = process_logits(logits, sampler, seen)
  if sampler.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if key.ndim == (1 if typed else 2):  # one key per row
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _step_keys(row_keys: Array, step: Array) -> Array:
  """Each row's key for `step` ([b, 2] from [b, 2])."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)


def _mark(seen: Array, ids: Array, level: int,
          valid: Array | None = None) -> Array:
  """`seen` with `ids` ([b, n]) raised to `level` where `valid`."""
  rows = jnp.arange(ids.shape[0])[:, None]
  value = jnp.full(ids.shape, level, jnp.uint8)
  if valid is not None:
    value = jnp.where(valid, value, jnp.uint8(0))
  return seen.at[rows, ids].max(value)


def _seen_init(vocab: int, ids: Array, valid: Array | None,
               context: Array | None) -> Array:
  """The seen mask of a prompt (its valid tokens) and of `context`."""
  seen = jnp.zeros((ids.shape[0], vocab), jnp.uint8)
  seen = _mark(seen, ids, SEEN_PROMPT, valid)
  if context is not None:
    seen = _mark(seen, context, SEEN_PROMPT)
  return seen


_seen_init_jit = jax.jit(_seen_init, static_argnums=0)


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
                   cache: PyTree, mask: Array | None,
                   positions: Array | None = None,
                   image_features: Array | None = None,
                   video_features: Array | None = None):
  # Only the last hidden state leaves the function, so XLA drops the
  # [b, t, V] logits the model would otherwise compute.
  _, cache, hidden = decode_loop.apply_model(
      cfg, params, ids, attention_mask=mask, cache=cache,
      positions=positions, image_features=image_features,
      video_features=video_features, return_hidden=True)
  return _head(cfg, params, hidden[:, -1]), cache


def _prefill_program(cfg, params, ids, cache, mask, positions=None,
                     image_features=None, video_features=None):
  # `_prefill_chunk` is looked up when traced, not bound when jitted, so a
  # wrapper of the module's function sees every trace of this program
  # (tests/test_retrace.py counts them with chex.assert_max_traces).
  return _prefill_chunk(cfg, params, ids, cache, mask, positions,
                        image_features, video_features)


_prefill_chunk_jit = jax.jit(_prefill_program, static_argnums=0,
                             donate_argnums=3)


def _decode(cfg: QwenConfig, params: PyTree, tokens: Array, cache: PyTree,
            mask: Array | None):
  logits, cache = decode_loop.apply_model(
      cfg, params, tokens[:, None], attention_mask=mask, cache=cache)
  return logits[:, 0].astype(jnp.float32), cache


def _decode_program(cfg, params, tokens, cache, mask):
  # `_decode` looked up when traced, as in `_loop` (see `_prefill_program`).
  return _decode(cfg, params, tokens, cache, mask)


_decode_jit = jax.jit(_decode_program, static_argnums=0, donate_argnums=3)


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
            prefill_block: int = DEFAULT_PREFILL_BLOCK,
            pixel_values: Array | None = None, image_grid_thw: Any = None,
            pixel_values_videos: Array | None = None,
            video_grid_thw: Any = None) -> tuple[Array, PyTree]:
  """Runs the prompt through the model, filling the cache.

  The prompt is cut into blocks of `prefill_block` tokens (the last one may
  be shorter); each block continues from the cache the previous one left.
  At most two programs are compiled per prompt length (a full block and the
  remainder). The cache passed in is donated: use the returned one.

  With images or videos, the tower runs once on all of them (one program
  per grid set), each block gets the features of its placeholders and its
  slice of the prompt's multimodal positions, and the returned cache holds
  "rope_delta" (each row's offset, added to those of earlier calls), which
  `decode_step` and `generate` continue from.

  Args:
    cfg: the model config.
    params: the parameters.
    prompt_ids: [b, t] int token ids (left padded when rows differ).
    cache: a cache from `qwen_jax.cache.init_cache` (index 0 for a new
      prompt; a non-zero index appends to what is cached).
    attention_mask: None, or [b, t] over the prompt, or [b, S] over every
      cache slot (1 = token, 0 = padding).
    prefill_block: prompt tokens per model call (>= 2).
    pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw: the
      prompt's images and videos, as `Qwen35.__call__` takes them (the
      grids as host data).

  Returns:
    (logits [b, V] float32 of the last prompt token, the filled cache).

  Raises:
    ValueError: bad shapes, ids outside [0, vocab_size), a concrete mask
      with values other than 0/1 or not left padded, a cache of another
      config or batch, a prompt that does not fit the cache, a block
      size < 2, or images or videos that the model or the prompt does not
      take (`qwen_jax.model.check_media`).
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
  media = model_lib.check_media(cfg, np.asarray(prompt_ids), pixel_values,
                                image_grid_thw, pixel_values_videos,
                                video_grid_thw)
  if media.any:
    return _prefill_media(cfg, params, prompt_ids, cache, mask, index,
                          prefill_block, media, pixel_values,
                          pixel_values_videos)
  logits = None
  for start in range(0, t, prefill_block):
    chunk = prompt_ids[:, start:start + prefill_block]
    logits, cache = _prefill_chunk_jit(cfg, params, chunk, cache, mask)
  return logits, cache


def _prefill_media(cfg, params, prompt_ids, cache, mask, index,
                   prefill_block, media, pixel_values, pixel_values_videos):
  """`prefill` of a prompt with images or videos (inputs checked)."""
  b, t = prompt_ids.shape
  ids = np.asarray(prompt_ids)
  delta = cache.get("rope_delta")
  if delta is None:
    delta = jnp.zeros((b,), jnp.int32)
  positions, delta = model_lib.media_positions(
      cfg, prompt_ids, None if mask is None else mask.astype(bool), media,
      jnp.int32(index), delta)
  feats = {}
  for kind, pixels, grid, token in (
      ("image", pixel_values, media.image_grid, cfg.image_token_id),
      ("video", pixel_values_videos, media.video_grid, cfg.video_token_id)):
    if pixels is None:
      continue
    x = vision_lib.encode(cfg.vision, params["visual"], pixels, grid)
    where = ids == token
    # Feature k goes to the k-th placeholder in reading order.
    order = (np.cumsum(where.reshape(-1)) - 1).reshape(b, t)
    feats[kind] = (x, where, order)
  cache = dict(cache, rope_delta=cache.get("rope_delta",
                                           jnp.zeros((b,), jnp.int32)))
  logits = None
  for start in range(0, t, prefill_block):
    end = min(start + prefill_block, t)
    chunk_feats = {}
    for kind, (x, where, order) in feats.items():
      rows = order[:, start:end][where[:, start:end]]
      chunk_feats[kind] = jnp.take(x, rows, axis=0) if rows.size else None
    logits, cache = _prefill_chunk_jit(
        cfg, params, prompt_ids[:, start:end], cache, mask,
        positions[:, :, start:end], chunk_feats.get("image"),
        chunk_feats.get("video"))
  cache["rope_delta"] = delta
  return logits, cache


def decode_step(cfg: QwenConfig, params: PyTree, tokens: Array,
                cache: PyTree, attention_mask: Array | None = None
                ) -> tuple[Array, PyTree]:
  """Feeds one token per sequence; returns its logits and the new cache.

  After a prompt with images or videos the cache holds each row's
  "rope_delta" (`prefill`), and the token sits at (the row's tokens before
  it) + that delta, as in transformers' generate.

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
def _start(sampler: Sampler, logits: Array, row_keys: Array, stops: Array,
           out: Array, seen: Array | None) -> dict[str, Array]:
  """Samples token 0 from the prefill logits; the loop state."""
  tok = sample_logits(logits, _step_keys(row_keys, 0), sampler, seen)
  done = jnp.any(tok[:, None] == stops[None, :], axis=-1)
  state = {"step": jnp.int32(1), "token": tok, "done": done,
           "out": out.at[:, 0].set(tok)}
  if seen is not None:
    state["seen"] = _mark(seen, tok[:, None], SEEN_GENERATED)
  return state


_start_jit = jax.jit(_start, static_argnums=0, donate_argnums=4)


def _loop(cfg: QwenConfig, sampler: Sampler, params: PyTree,
          state: dict[str, Any], mask: Array | None, row_keys: Array,
          stops: Array, pad_id: Array, end: Array) -> dict[str, Any]:
  """Decodes until `end` tokens are out or every row has stopped."""

  def cond(s):
    return (s["step"] < end) & ~jnp.all(s["done"])

  def body(s):
    logits, cache = _decode(cfg, params, s["token"], s["cache"], mask)
    tok = sample_logits(logits, _step_keys(row_keys, s["step"]), sampler,
                        s.get("seen"))
    tok = jnp.where(s["done"], pad_id, tok)
    out = jax.lax.dynamic_update_slice(s["out"], tok[:, None],
                                       (0, s["step"]))
    done = s["done"] | jnp.any(tok[:, None] == stops[None, :], axis=-1)
    new = {"step": s["step"] + 1, "token": tok, "done": done, "out": out,
           "cache": cache}
    if "seen" in s:
      new["seen"] = _mark(s["seen"], tok[:, None], SEEN_GENERATED)
    return new

  return jax.lax.while_loop(cond, body, state)


_loop_jit = jax.jit(_loop, static_argnums=(0, 1), donate_argnums=3)


# ------------------------------------------------------------------- public
def _media_args(pixel_values, image_grid_thw, pixel_values_videos,
                video_grid_thw) -> dict[str, Any]:
  """The media keyword arguments that were given."""
  args = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
              pixel_values_videos=pixel_values_videos,
              video_grid_thw=video_grid_thw)
  return {k: v for k, v in args.items() if v is not None}


STOP_TOKEN = "stop_token"
STOP_STRING = "stop_string"
LENGTH = "length"


def _id_list(value: Any) -> list[int]:
  if value is None:
    return []
  if isinstance(value, (int, np.integer)):
    return [int(value)]
  return [int(i) for i in value]


def _stop_ids(cfg: QwenConfig, stop_tokens, generation_config=None
              ) -> np.ndarray:
  if stop_tokens is None:
    # The model's eos ids and the generation config's, deduplicated.
    stop_tokens = []
    for i in _id_list(cfg.eos_token_id) + _id_list(
        getattr(generation_config, "eos_token_id", None)):
      if i not in stop_tokens:
        stop_tokens.append(i)
  elif isinstance(stop_tokens, (int, np.integer)):
    stop_tokens = (int(stop_tokens),)
  ids = np.asarray(list(stop_tokens), np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
    raise ValueError(f"stop_tokens: expected ids in [0, {cfg.vocab_size}), "
                     f"found {ids.tolist()}")
  return ids.astype(np.int32)


def _per_row(name: str, value: Any, b: int, low: int | None) -> np.ndarray:
  """An int, or one int per row, as [b] int64 (each >= low)."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    values = [int(value)] * b
    if low is None:  # seeds: row r gets seed + r
      values = [int(value) + r for r in range(b)]
  elif (isinstance(value, (list, tuple, np.ndarray)) and len(value) == b
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                for v in value)):
    values = [int(v) for v in value]
  else:
    raise ValueError(f"{name}: expected an int or {b} ints (one per row), "
                     f"found {value!r}")
  if low is not None and min(values) < low:
    raise ValueError(f"{name}: expected ints >= {low}, found {value!r}")
  return np.asarray(values, np.int64)


def _row_stop_strings(stop_strings: Any, b: int, tokenizer: Any
                      ) -> list[tuple[str, ...]] | None:
  """One tuple of stop strings per row, or None when there are none."""
  if stop_strings is None:
    return None
  bad = ValueError(f"stop_strings: expected a list of non-empty strings, "
                   f"or {b} such lists (one per row), found "
                   f"{stop_strings!r}")
  if isinstance(stop_strings, str) or not isinstance(stop_strings,
                                                     (list, tuple)):
    raise bad
  if all(isinstance(s, str) for s in stop_strings):
    rows = [tuple(stop_strings)] * b
  elif len(stop_strings) == b and all(
      isinstance(s, (list, tuple)) and not isinstance(s, str)
      for s in stop_strings):
    rows = [tuple(s) for s in stop_strings]
  else:
    raise bad
  if not all(isinstance(s, str) and s for row in rows for s in row):
    raise bad
  if not any(rows):
    return None
  if tokenizer is None:
    raise ValueError("tokenizer: expected a tokenizer (qwen_jax.tokenizer."
                     "load_tokenizer) to decode the tokens that stop_strings "
                     "are matched in, found None")
  return rows


@dataclasses.dataclass
class _Plan:
  """The checked inputs of a generation, on the host."""
  prompt: np.ndarray  # [b, t] int32
  prompt_mask: np.ndarray | None  # [b, t], None without padding
  slot_mask: np.ndarray | None  # [b, cache_len], None without padding
  cache_len: int
  stops: np.ndarray
  pad: int
  limits: np.ndarray  # [b] new tokens per row
  seeds: np.ndarray  # [b]
  context: np.ndarray | None  # [b, n] ids already in a cache passed in


def _prepare(cfg, prompt_ids, max_new_tokens, attention_mask, cache_len,
             prefill_block, stop_tokens, pad_token_id, seed,
             generation_config=None, cache=None, context_ids=None) -> _Plan:
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
  b, t = prompt.shape
  limits = _per_row("max_new_tokens", max_new_tokens, b, 1)
  max_new = int(limits.max())
  seeds = _per_row("seed", seed, b, None)
  index = 0
  context = None
  if cache is not None:
    slots = cache_lib.check_cache(cfg, cache, b)
    index = int(cache["index"])
    if attention_mask is not None:
      raise ValueError("attention_mask: expected None when a cache is "
                       "passed in (its rows continue unpadded), found a mask")
    if cache_len is not None:
      raise ValueError(f"cache_len: expected None when a cache is passed "
                       f"in (its own slots are used), found {cache_len!r}")
    if context_ids is not None:
      context = np.asarray(context_ids)
      if (context.ndim != 2 or context.shape[0] != b
          or not np.issubdtype(context.dtype, np.integer)):
        raise ValueError(f"context_ids: expected integer ids of shape "
                         f"[{b}, n], found {context.dtype} "
                         f"{tuple(context.shape)}")
      if context.size and (context.min() < 0
                           or context.max() >= cfg.vocab_size):
        raise ValueError(f"context_ids: expected ids in [0, "
                         f"{cfg.vocab_size}), found min {context.min()} max "
                         f"{context.max()}")
      context = context.astype(np.int32) if context.size else None
  elif context_ids is not None:
    raise ValueError("context_ids: expected None without a cache passed in "
                     "(they name what that cache holds), found ids")
  need = index + t + max_new
  if need > cfg.max_position_embeddings:
    held = f"{index} cached + " if index else ""
    raise ValueError(
        f"prompt_ids: {held}prompt length {t} + max_new_tokens {max_new} = "
        f"{need} exceeds max_position_embeddings="
        f"{cfg.max_position_embeddings}")
  if cache is not None:
    if slots is not None and slots < need:
      raise ValueError(f"cache: expected at least {need} slots ({index} "
                       f"held + prompt length {t} + max_new_tokens "
                       f"{max_new}), found {slots}")
    cache_len = need if slots is None else slots
  elif cache_len is None:
    cache_len = need
  elif cache_len < need:
    raise ValueError(f"cache_len: expected at least prompt length + "
                     f"max_new_tokens = {need}, found {cache_len}")
  prompt_mask = slot_mask = None
  if attention_mask is not None:
    mask = np.asarray(attention_mask)
    if mask.shape != (b, t):
      raise ValueError(f"attention_mask: expected shape {(b, t)}, found "
                       f"{tuple(mask.shape)}")
    mask = (mask != 0).astype(np.int32)  # left padding: checked by prefill
    if not mask.all():  # no padding: skip the masking work
      prompt_mask = mask
      slot_mask = np.concatenate(
          [mask, np.ones((b, cache_len - t), np.int32)], axis=1)
  stops = _stop_ids(cfg, stop_tokens, generation_config)
  if pad_token_id is None:
    pad_token_id = getattr(generation_config, "pad_token_id", None)
  if pad_token_id is None:
    pad_token_id = cfg.pad_token_id
  if pad_token_id is None:
    pad_token_id = int(stops[0]) if stops.size else 0
  if not 0 <= int(pad_token_id) < cfg.vocab_size:
    raise ValueError(f"pad_token_id: expected an id in [0, "
                     f"{cfg.vocab_size}), found {pad_token_id!r}")
  return _Plan(prompt.astype(np.int32), prompt_mask, slot_mask,
               int(cache_len), stops, int(pad_token_id), limits, seeds,
               context)


def _begin(cfg, params, sampler, plan: _Plan, prefill_block, cache=None,
           media=None):
  """Prefills (with the prompt's images and videos, if any) and samples
  token 0.

  Returns:
    (loop state, (mask, row keys, stops, pad) for `_loop`).
  """
  b, _ = plan.prompt.shape
  if cache is None:
    cache = cache_lib.init_cache(cfg, b, plan.cache_len)
  mask = None if plan.slot_mask is None else jnp.asarray(plan.slot_mask)
  logits, cache = prefill(cfg, params, plan.prompt, cache, mask,
                          prefill_block, **(media or {}))
  seen = None
  if sampler.penalized:
    valid = (None if plan.prompt_mask is None
             else jnp.asarray(plan.prompt_mask != 0))
    context = None if plan.context is None else jnp.asarray(plan.context)
    seen = _seen_init_jit(cfg.vocab_size, jnp.asarray(plan.prompt), valid,
                          context)
  if sampler.greedy:  # no draws: skip b key computations on the host
    row_keys = jnp.zeros((b, 2), jnp.uint32)
  else:
    row_keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in plan.seeds])
  stops = jnp.asarray(plan.stops)
  pad = jnp.int32(plan.pad)
  out = jnp.full((b, int(plan.limits.max())), pad, jnp.int32)
  state = _start_jit(sampler, logits, row_keys, stops, out, seen)
  state["cache"] = cache
  return state, (mask, row_keys, stops, pad)


def _setup(cfg, params, prompt_ids, max_new_tokens, temperature, top_k,
           top_p, attention_mask, seed, stop_tokens, pad_token_id,
           prefill_block, cache_len, min_p, repetition_penalty,
           presence_penalty, generation_config, stop_strings, tokenizer,
           cache, context_ids, media):
  """Everything `generate` and `stream` check, then the prefill.

  Returns the config and parameters the programs run
  (`decode_loop.prepare`'s) with the rest.
  """
  given_cfg = cfg
  cfg, params = decode_loop.prepare(cfg, params)
  if cache is not None:
    cache = cache_lib.to_layout(given_cfg, cfg, cache)
  sampler = Sampler.from_generation_config(
      generation_config, temperature=temperature, top_k=top_k, top_p=top_p,
      min_p=min_p, repetition_penalty=repetition_penalty,
      presence_penalty=presence_penalty)
  plan = _prepare(cfg, prompt_ids, max_new_tokens, attention_mask, cache_len,
                  prefill_block, stop_tokens, pad_token_id, seed,
                  generation_config, cache, context_ids)
  rows = _row_stop_strings(stop_strings, plan.prompt.shape[0], tokenizer)
  model_lib.check_media(cfg, plan.prompt, **media)  # before any work
  state, loop_args = _begin(cfg, params, sampler, plan, prefill_block, cache,
                            media)
  return cfg, params, sampler, plan, rows, state, loop_args


class TokenStream:
  """The new tokens of `stream`, block by block (an iterator).

  Each item is a [b, n] int32 NumPy array of the next n >= 1 tokens; rows
  that stopped are filled with the pad id. The attributes say how far it
  got, at any point of the iteration.

  Attributes:
    tokens: [b, n] every new token so far (the concatenated blocks).
    stop_reasons: per row, None while it goes on, else STOP_TOKEN ("stop_
      token": it produced a stop id, the last token counted), STOP_STRING
      ("stop_string": its text reached a stop string at its last token) or
      LENGTH ("length": its max_new_tokens are out).
    stop_strings_found: per row, the stop string that ended it, or None.
    num_tokens: per row, the new tokens it produced (its stop token
      included).
    cache: the cache, holding the prompt and the `fed` tokens.
    fed: [b, m] the new tokens written into the cache so far: every token
      but the newest, as the loop produced them (a row that stopped on a
      stop string or its length within a block has its tokens up to the
      block's end there; a row that stopped earlier, pad ids).
  """

  def __init__(self, cfg: QwenConfig, params: PyTree, sampler: Sampler,
               plan: _Plan, rows: list[tuple[str, ...]] | None,
               state: dict[str, Any], loop_args: tuple, block_steps: int,
               tokenizer: Any):
    self._cfg, self._params, self._sampler = cfg, params, sampler
    self._state, self._loop_args = state, loop_args
    self._block_steps = block_steps
    self._limits = plan.limits
    self._max_new = int(plan.limits.max())
    self._pad = plan.pad
    self._stops = frozenset(int(i) for i in plan.stops)
    b = plan.prompt.shape[0]
    self._watch = [None] * b
    if rows is not None:
      self._watch = [
          (tokenizer.stream_decoder(), tokenizer_lib.StopStrings(row))
          if row else None for row in rows]
    self._blocks: list[np.ndarray] = []
    self._raw: list[np.ndarray] = []
    self._written = 0
    self.stop_reasons: list[str | None] = [None] * b
    self.stop_strings_found: list[str | None] = [None] * b
    self.num_tokens = [0] * b

  def __iter__(self) -> TokenStream:
    return self

  def __next__(self) -> np.ndarray:
    if self._written == 0:
      return self._take(1)
    if (self._written >= self._max_new
        or all(r is not None for r in self.stop_reasons)):
      raise StopIteration
    end = min(self._written + self._block_steps, self._max_new)
    self._state = _loop_jit(self._cfg, self._sampler, self._params,
                            self._state, *self._loop_args, jnp.int32(end))
    step = int(self._state["step"])
    if step <= self._written:
      raise StopIteration
    return self._take(step)

  def _take(self, step: int) -> np.ndarray:
    """The block up to `step`, with the host's stops applied."""
    start = self._written
    raw = np.asarray(self._state["out"][:, start:step])
    block = raw.copy()
    stopped_here = np.zeros(block.shape[0], bool)
    for r in range(block.shape[0]):
      if self.stop_reasons[r] is not None:
        block[r] = self._pad
        continue
      watch = self._watch[r]
      for j in range(step - start):
        tok, reason = int(raw[r, j]), None
        if tok in self._stops:
          reason = STOP_TOKEN
        elif watch is not None:
          decoder, stopper = watch
          stopper.push(decoder.push(tok))
          if stopper.stop is not None:
            reason = STOP_STRING
            self.stop_strings_found[r] = stopper.stop
        if reason is None and start + j + 1 >= self._limits[r]:
          reason = LENGTH
        if reason is not None:
          self.stop_reasons[r] = reason
          self.num_tokens[r] = start + j + 1
          block[r, j + 1:] = self._pad
          stopped_here[r] = reason != STOP_TOKEN  # the loop knows those
          break
      else:
        self.num_tokens[r] = step
    if stopped_here.any() and step < self._max_new:
      # Rows the loop does not know have stopped: it feeds them the pad id
      # from the next block on (their tokens there are not used).
      self._state["done"] = self._state["done"] | jnp.asarray(stopped_here)
    self._blocks.append(block)
    self._raw.append(raw)
    self._written = step
    return block

  @property
  def tokens(self) -> np.ndarray:
    b = len(self.stop_reasons)
    if not self._blocks:
      return np.zeros((b, 0), np.int32)
    return np.concatenate(self._blocks, axis=1)

  @property
  def fed(self) -> np.ndarray:
    b = len(self.stop_reasons)
    if not self._raw:
      return np.zeros((b, 0), np.int32)
    return np.concatenate(self._raw, axis=1)[:, :max(self._written - 1, 0)]

  @property
  def cache(self) -> PyTree:
    return self._state["cache"]


def stream(cfg: QwenConfig, params: PyTree, prompt_ids: Array,
           max_new_tokens: int | Sequence[int] = 32,
           temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, attention_mask: Array | None = None,
           seed: int | Sequence[int] = 0,
           stop_tokens: int | Sequence[int] | None = None,
           pad_token_id: int | None = None, block_steps: int = 16,
           prefill_block: int = DEFAULT_PREFILL_BLOCK,
           cache_len: int | None = None, *, min_p: float | None = None,
           repetition_penalty: float | None = None,
           presence_penalty: float | None = None,
           generation_config: Any = None,
           stop_strings: Sequence[str] | Sequence[Sequence[str]] | None = None,
           tokenizer: Any = None, cache: PyTree | None = None,
           context_ids: Array | None = None,
           pixel_values: Array | None = None, image_grid_thw: Any = None,
           pixel_values_videos: Array | None = None,
           video_grid_thw: Any = None) -> TokenStream:
  """Like `generate`, yielding new tokens as they are decoded.

  The prompt is checked and prefilled here; the first block is the token
  sampled from the prompt, then each block is up to `block_steps` tokens
  decoded by one compiled loop call. The concatenated blocks (padded with
  the pad id to max_new_tokens) equal `generate`'s result for the same
  arguments.

  Args:
    cfg, params, prompt_ids, max_new_tokens, temperature, top_k, top_p,
    attention_mask, seed, stop_tokens, pad_token_id, prefill_block,
    cache_len, min_p, repetition_penalty, presence_penalty,
    generation_config, stop_strings, tokenizer, pixel_values,
    image_grid_thw, pixel_values_videos, video_grid_thw: as in `generate`.
    block_steps: decode steps per compiled call (>= 1); stop strings and
      per-row lengths are checked after each.
    cache: continue this cache (donated; the stream's `cache` attribute
      holds it afterwards) instead of a new one: `prompt_ids` ([b, t],
      unpadded) are prefilled after the tokens it holds. It needs
      index + t + max_new_tokens slots. cache_len and attention_mask must
      then be None.
    context_ids: [b, n] the ids already in `cache`, which the repetition
      penalty counts as prompt tokens (None: only prompt_ids count).

  Returns:
    A `TokenStream`: iterate it for the blocks; its attributes give the
    stop reasons, the token counts and the cache.
  """
  if not isinstance(block_steps, (int, np.integer)) or block_steps < 1:
    raise ValueError(f"block_steps: expected an int >= 1, found "
                     f"{block_steps!r}")
  cfg, params, sampler, plan, rows, state, loop_args = _setup(
      cfg, params, prompt_ids, max_new_tokens, temperature, top_k, top_p,
      attention_mask, seed, stop_tokens, pad_token_id, prefill_block,
      cache_len, min_p, repetition_penalty, presence_penalty,
      generation_config, stop_strings, tokenizer, cache, context_ids,
      _media_args(pixel_values, image_grid_thw, pixel_values_videos,
                  video_grid_thw))
  return TokenStream(cfg, params, sampler, plan, rows, state, loop_args,
                     int(block_steps), tokenizer)


def generate(cfg: QwenConfig, params: PyTree, prompt_ids: Array,
             max_new_tokens: int | Sequence[int] = 32,
             temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None,
             attention_mask: Array | None = None,
             seed: int | Sequence[int] = 0,
             stop_tokens: int | Sequence[int] | None = None,
             pad_token_id: int | None = None,
             prefill_block: int = DEFAULT_PREFILL_BLOCK,
             cache_len: int | None = None, *, min_p: float | None = None,
             repetition_penalty: float | None = None,
             presence_penalty: float | None = None,
             generation_config: Any = None,
             stop_strings: Sequence[str] | Sequence[Sequence[str]] | None
             = None, tokenizer: Any = None,
             pixel_values: Array | None = None, image_grid_thw: Any = None,
             pixel_values_videos: Array | None = None,
             video_grid_thw: Any = None) -> Array:
  """Generates up to `max_new_tokens` tokens after each prompt.

  Args:
    cfg: the model config.
    params: the parameters (`Qwen35(cfg)` tree).
    prompt_ids: [b, t] int token ids; rows of different lengths are left
      padded (see attention_mask).
    max_new_tokens: tokens to generate per row (an int, or one per row).
    temperature: 0 for greedy decoding; > 0 samples softmax(logits / T).
      None: from generation_config, else greedy.
    top_k: sample among the k most likely tokens only (0: all).
    top_p: sample among the smallest set of tokens with probability >= p.
    attention_mask: [b, t], 1 for prompt tokens and 0 for left padding;
      None means no padding.
    seed: the sampler's seed (ignored when greedy): row r draws with seed
      + r, or with seed[r] when one is given per row.
    stop_tokens: ids that end a row (the stop token is kept in the output;
      later positions get the pad id). None: cfg.eos_token_id and
      generation_config's eos ids; () for none.
    pad_token_id: id written after a row stops; default generation_config's
      pad id, else cfg.pad_token_id, else the first stop token, else 0.
    prefill_block: prompt tokens per prefill call (memory bound for long
      prompts).
    cache_len: KV slots to allocate (>= t + max_new_tokens; default exactly
      that). A fixed value avoids recompiling the decode loop when prompt
      lengths change.
    min_p: keep tokens with probability >= min_p times the largest.
    repetition_penalty: transformers' penalty of the prompt's and the
      generated tokens (see `Sampler`).
    presence_penalty: subtracted from the logits of generated tokens.
    generation_config: a `qwen_jax.tokenizer.GenerationConfig` whose values
      fill the sampling arguments left None (`Sampler.
      from_generation_config`) and whose eos / pad ids join the defaults.
    stop_strings: strings that end a row once its decoded text contains one
      (checked after each block of 16 tokens; the row's tokens end at the
      one completing it): a list for every row, or one list per row.
    tokenizer: decodes the tokens for stop_strings.
    pixel_values: [n_patches, C*T*P*P] float patches of the prompts'
      images, row after row (transformers' processor output, or
      `qwen_jax.load_image_processor(dir)(images=...)`); each image's
      placeholders must be expanded in prompt_ids (t*h*w / m^2
      image_token_id each). Needs a config with a tower.
    image_grid_thw: [n_images, 3] int patch grids (host data).
    pixel_values_videos, video_grid_thw: the same for videos.

  Returns:
    [b, max(max_new_tokens)] int32 new token ids.

  Raises:
    ValueError: bad shapes or ids, a right-padded mask, bad sampling
      parameters, a prompt plus new tokens longer than
      max_position_embeddings, or images or videos that the model or the
      prompt does not take (`qwen_jax.model.check_media`: no tower or
      placeholder id, a grid that does not match the pixel values,
      placeholders that do not match the features).
  """
  cfg, params, sampler, plan, rows, state, loop_args = _setup(
      cfg, params, prompt_ids, max_new_tokens, temperature, top_k, top_p,
      attention_mask, seed, stop_tokens, pad_token_id, prefill_block,
      cache_len, min_p, repetition_penalty, presence_penalty,
      generation_config, stop_strings, tokenizer, None, None,
      _media_args(pixel_values, image_grid_thw, pixel_values_videos,
                  video_grid_thw))
  max_new = int(plan.limits.max())
  if rows is None and (plan.limits == max_new).all():
    # Nothing to check on the host: the whole loop is one call.
    if max_new > 1:
      state = _loop_jit(cfg, sampler, params, state, *loop_args,
                        jnp.int32(max_new))
    return state["out"]
  tokens = TokenStream(cfg, params, sampler, plan, rows, state, loop_args,
                       16, tokenizer)
  for _ in tokens:
    pass
  out = np.full((plan.prompt.shape[0], max_new), plan.pad, np.int32)
  got = tokens.tokens
  out[:, :got.shape[1]] = got
  return jnp.asarray(out)
