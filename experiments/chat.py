"""A multi-turn chat with a checkpoint in the terminal.

  python -m experiments.chat --checkpoint /path/to/Qwen3.5-0.8B
  python -m experiments.chat --checkpoint DIR --enable_thinking \
      --system "You answer in one sentence." --max_new_tokens 2048

Type a message and press Enter; the reply streams as it is decoded. Lines
that are exactly one of these commands are not sent:

  /think      pass enable_thinking=True to the chat template from now on
  /no_think   pass enable_thinking=False (--enable_thinking sets the start;
              without either the template's default holds)
  /reset      start a new conversation (the cache is dropped; the
              thinking switch stays as it is)
  /exit       leave (so does the end of the input, Ctrl-D)

Ctrl-C while a reply is decoded drops that turn; Ctrl-C at the prompt
leaves. Sampling follows the checkpoint's generation_config.json unless a
flag says otherwise (the flags of experiments.generate: --temperature,
--top_k, --top_p, --min_p, --repetition_penalty, --presence_penalty,
--seed, --stop_tokens, --stop_strings); the stop ids default to its eos
ids. A reply's text up to "</think>" is kept as the message's
reasoning_content, the rest as its content, as transformers' chat
templates expect.

The conversation stays in the model's cache between turns. Each turn the
whole conversation is rendered with the chat template (with the generation
prompt), and compared, token by token, with what the cache holds (the
previous prompt and the reply tokens fed to the model):

  1. the render extends the cache: only the new tokens (the end of the
     last reply, the new user turn, the generation prompt) are prefilled;
  2. else, it agrees with the cache up to the snapshot point of the last
     turn: the cache goes back there and the rest is prefilled. The
     snapshot point is where the last prompt stops being a prefix of the
     same conversation rendered one turn later (found by rendering it with
     a placeholder reply and user turn), so it covers the templates that
     render a past reply differently from how it was generated: Qwen's
     drop the <think> block of earlier replies (and the empty one of the
     non-thinking generation prompt), and a reply whose text tokenizes
     differently from its generated tokens, or that ended on a stop
     string, is re-read as rendered. Only the last reply and the new turn
     are prefilled again, never the earlier turns. Going back needs no
     copy of the K/V cache (slots past the point are masked and then
     overwritten), only of the fixed-size Gated DeltaNet states, kept at
     that point;
  3. else (the template changed an earlier part of the conversation) the
     whole conversation is prefilled again, with a note on stderr.

The cache starts with --cache_len slots and grows (doubling, up to the
model's max_position_embeddings) when a turn needs more. New tokens are
prefilled in power-of-two pieces, so that few prefill programs are
compiled however long the turns are.

Every flag and the checkpoint folder (config.json, tokenizer files, chat
template, generation_config.json) are checked before the weights are read;
a misuse ends with one line on stderr and exit status 1 (2 for usage
errors); see experiments/cli.py.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Sequence, TextIO

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments import generate as gen_script
from qwen_jax import cache as cache_lib
from qwen_jax import decode_loop
from qwen_jax import tokenizer as tokenizer_lib
from qwen_jax.array_typing import PyTree
from qwen_jax.config import QwenConfig
from qwen_jax.generate import DEFAULT_PREFILL_BLOCK
from qwen_jax.generate import Sampler
from qwen_jax.generate import prefill
from qwen_jax.generate import stream

COMMANDS = ("/think", "/no_think", "/reset", "/exit")
# Modes of a turn's prefill (`Turn.mode`).
NEW = "new"  # an empty cache (first turn, after /reset)
APPEND = "append"  # rule 1
LAST_REPLY = "last_reply"  # rule 2
FULL = "full"  # rule 3
# The placeholder turns that find the snapshot point.
_PROBE = ({"role": "assistant", "content": "x"},
          {"role": "user", "content": "y"})


@dataclasses.dataclass
class Turn:
  """One exchange.

  Attributes:
    text: the reply as decoded (without the stop token or stop string).
    content, reasoning: `text` split at "</think>" (reasoning None without
      one).
    ids: the new tokens (the stop token included).
    stop_reason: "stop_token", "stop_string" or "length".
    prompt_ids: the rendered conversation the reply was generated from.
    reused: its first tokens that were in the cache already.
    prefilled: the tokens prefilled this turn (len(prompt_ids) - reused).
    mode: NEW, APPEND, LAST_REPLY or FULL (see the module docstring).
    seconds: prefill and decoding time (compilation included).
  """
  text: str
  content: str
  reasoning: str | None
  ids: list[int]
  stop_reason: str
  prompt_ids: list[int]
  reused: int
  prefilled: int
  mode: str
  seconds: float


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """The number of leading tokens `a` and `b` share."""
  n = min(len(a), len(b))
  diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(diff[0]) if diff.size else n


def split_thinking(text: str) -> tuple[str, str | None]:
  """(content, reasoning) of a reply: the text after "</think>" and the one
  before it (without "<think>" and surrounding newlines)."""
  if "</think>" not in text:
    return text, None
  reasoning, content = text.split("</think>", 1)
  reasoning = reasoning.split("<think>")[-1].strip("\n")
  return content.lstrip("\n"), reasoning


def _pieces(n: int) -> list[int]:
  """`n` as decreasing powers of two (the prefill call lengths)."""
  return [1 << k for k in range(n.bit_length() - 1, -1, -1) if n >> k & 1]


def _is_kv(path: Any) -> bool:
  return getattr(path[-1], "key", None) in ("k", "v")


def _snapshot(cache: PyTree) -> dict[str, Any]:
  """Copies of the cache's fixed-size entries (the Gated DeltaNet states)
  and its index: with the K/V slots before the index, which later tokens
  never overwrite, they restore the cache to this point."""
  leaves = {}
  for path, x in jax.tree_util.tree_flatten_with_path(cache["layers"])[0]:
    if not _is_kv(path):
      leaves[jax.tree_util.keystr(path)] = jnp.copy(x)
  return {"index": int(cache["index"]), "leaves": leaves}


def _restore(cache: PyTree, snap: dict[str, Any]) -> PyTree:
  """`cache` back at the snapshot's point."""
  def pick(path, x):
    return x if _is_kv(path) else snap["leaves"][jax.tree_util.keystr(path)]
  return {"layers": jax.tree_util.tree_map_with_path(pick, cache["layers"]),
          "index": jnp.asarray(snap["index"], cache_lib.INDEX_DTYPE)}


def _grow(cache: PyTree, slots: int) -> PyTree:
  """`cache` with its K/V buffers zero-padded to `slots` slots."""
  def pad(path, x):
    if not _is_kv(path):
      return x
    width = [(0, 0)] * x.ndim
    width[-3] = (0, slots - x.shape[-3])  # [..., b, S, n, e]
    return jnp.pad(x, width)
  return {"layers": jax.tree_util.tree_map_with_path(pad, cache["layers"]),
          "index": cache["index"]}


def _slots(cache: PyTree) -> int | None:
  for path, x in jax.tree_util.tree_flatten_with_path(cache["layers"])[0]:
    if _is_kv(path):
      return int(x.shape[-3])
  return None


class Chat:
  """A conversation with a model, kept in its cache between turns.

  `stop_tokens` default to cfg.eos_token_id and generation_config's eos
  ids; `sampling` holds explicit sampling arguments of `qwen_jax.generate`
  (None values: generation_config's); each turn draws with seed + its
  number.

  Attributes:
    messages: the conversation so far (a system message first when given).
    enable_thinking: passed to the chat template (None: not passed).
    cached: the token ids the cache holds.
  """

  def __init__(self, cfg: QwenConfig, params: PyTree, tokenizer: Any, *,
               generation_config: Any = None, system: str | None = None,
               enable_thinking: bool | None = None,
               max_new_tokens: int = 1024,
               sampling: dict[str, Any] | None = None, seed: int = 0,
               stop_tokens: Sequence[int] | None = None,
               stop_strings: Sequence[str] | None = None,
               block_steps: int = 8, cache_len: int = 4096,
               prefill_block: int = DEFAULT_PREFILL_BLOCK,
               chat_template: str | None = None):
    # The layout `stream` runs (on a CPU, the decode layout), so that its
    # prefills and the cache they fill are in the same one.
    cfg, params = decode_loop.prepare(cfg, params)
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.generation_config = generation_config
    self.system = system
    self.enable_thinking = enable_thinking
    self.max_new_tokens = int(max_new_tokens)
    self.sampling = dict(sampling or {})
    # Checked here: a bad value fails before the first turn.
    self.sampler = Sampler.from_generation_config(generation_config,
                                                  **self.sampling)
    self.seed = int(seed)
    if stop_tokens is None:  # the model's and the config's eos ids
      stop_tokens = []
      for ids in (cfg.eos_token_id,
                  getattr(generation_config, "eos_token_id", None)):
        for i in ([] if ids is None else [ids] if isinstance(ids, int)
                  else ids):
          if i not in stop_tokens:
            stop_tokens.append(int(i))
    self.stop_tokens = list(stop_tokens)
    self.stop_strings = list(stop_strings or [])
    self.block_steps = int(block_steps)
    self.cache_len = min(int(cache_len), cfg.max_position_embeddings)
    self.prefill_block = int(prefill_block)
    self.chat_template = chat_template
    self.turns = 0
    self.reset()

  def reset(self) -> None:
    """Starts a new conversation."""
    self.messages: list[dict[str, Any]] = []
    if self.system:
      self.messages.append({"role": "system", "content": self.system})
    self._drop_cache()

  def _drop_cache(self) -> None:
    self._cache = None
    self.cached: list[int] = []
    self._snap = None

  def render(self, messages: Sequence[dict[str, Any]],
             add_generation_prompt: bool = True) -> list[int]:
    """The chat template's ids of `messages`."""
    kwargs = ({} if self.enable_thinking is None
              else {"enable_thinking": self.enable_thinking})
    return list(self.tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt,
        chat_template=self.chat_template, **kwargs))

  def _reuse(self, prompt: list[int]) -> tuple[int, str]:
    """How much of the cache `prompt` keeps (the rules), and the mode."""
    if self._cache is None:
      return 0, NEW
    same = common_prefix(self.cached, prompt)
    if same == len(self.cached) and same < len(prompt):
      return same, APPEND
    snap = self._snap
    if snap is not None and 0 < snap["index"] <= same and snap["index"] < len(
        prompt):
      self._cache = _restore(self._cache, snap)
      self._snap = None  # its arrays are the cache's now
      return snap["index"], LAST_REPLY
    self._drop_cache()
    return 0, FULL

  def _snapshot_point(self, messages: list[dict[str, Any]],
                      prompt: list[int]) -> int:
    """Where `prompt` stops being a prefix of the next turn's render."""
    try:
      probe = self.render(list(messages) + list(_PROBE), False)
    except ValueError:
      return len(prompt) - 1
    return common_prefix(prompt, probe)

  def _prefill(self, ids: list[int]) -> None:
    """Prefills `ids` onto the cache in power-of-two pieces."""
    at = 0
    for n in _pieces(len(ids)):
      _, self._cache = prefill(self.cfg, self.params,
                               np.asarray([ids[at:at + n]], np.int32),
                               self._cache, prefill_block=self.prefill_block)
      at += n

  def send(self, text: str, out: TextIO | None = None,
           note: Callable[[str], None] | None = None) -> Turn:
    """Adds a user message, generates the reply, streams it to `out`.

    Args:
      text: the user's message.
      out: where the reply's text is written as it is decoded.
      note: called with a line when the whole conversation is prefilled
        again (rule 3).

    Returns:
      The turn.

    Raises:
      ValueError: the conversation no longer fits max_position_embeddings
        (the message is not added), or the template refuses it.
      KeyboardInterrupt: the turn is dropped and so is the cache (the next
        turn prefills the conversation again).
    """
    messages = self.messages + [{"role": "user", "content": text}]
    prompt = self.render(messages)
    need = len(prompt) + self.max_new_tokens
    if need > self.cfg.max_position_embeddings:
      raise ValueError(
          f"the conversation is {len(prompt)} tokens; with max_new_tokens "
          f"{self.max_new_tokens} it needs {need}, past the model's "
          f"max_position_embeddings {self.cfg.max_position_embeddings}: "
          f"/reset starts a new one")
    t0 = time.perf_counter()
    try:
      return self._send(messages, prompt, need, out, note, t0)
    except BaseException:
      self._drop_cache()  # the cache may be half written or donated
      raise

  def _send(self, messages, prompt, need, out, note, t0) -> Turn:
    start, mode = self._reuse(prompt)
    if mode == FULL and note is not None:
      note(f"[the chat template renders the earlier conversation "
           f"differently now: prefilling all {len(prompt)} tokens again]")
    if self._cache is None:
      slots = max(self.cache_len, need)
      self._cache = cache_lib.init_cache(self.cfg, 1, slots)
    else:
      slots = _slots(self._cache)
      if slots is not None and slots < need:
        grown = min(max(2 * slots, need), self.cfg.max_position_embeddings)
        self._cache = _grow(self._cache, grown)
    point = min(max(self._snapshot_point(messages, prompt), start),
                len(prompt) - 1)
    self._prefill(prompt[start:point])
    snap = _snapshot(self._cache)
    rest = prompt[point:]
    last = _pieces(len(rest))[-1]
    self._prefill(rest[:-last])
    tokens = stream(
        self.cfg, self.params, np.asarray([rest[-last:]], np.int32),
        self.max_new_tokens, seed=self.seed + self.turns,
        stop_tokens=self.stop_tokens, block_steps=self.block_steps,
        prefill_block=self.prefill_block,
        generation_config=self.generation_config,
        stop_strings=self.stop_strings or None, tokenizer=self.tokenizer,
        cache=self._cache,
        context_ids=np.asarray([prompt[:-last]], np.int32),
        **self.sampling)
    self._cache = None  # donated to the stream
    shown = gen_script.TextOut(self.tokenizer, self.stop_tokens,
                               self.stop_strings)
    count = 0
    for _ in tokens:
      row = tokens.tokens[0, :tokens.num_tokens[0]]
      if out is not None:
        out.write("".join(shown.push(int(t)) for t in row[count:]))
        out.flush()
      count = len(row)
    if out is not None and not shown.ended:
      out.write(shown.flush())
      out.flush()
    self._cache = tokens.cache
    self.cached = list(prompt) + tokens.fed[0].tolist()
    self._snap = snap
    ids = tokens.tokens[0, :tokens.num_tokens[0]].tolist()
    reason = tokens.stop_reasons[0] or "length"
    text = gen_script._result_text(  # pylint: disable=protected-access
        self.tokenizer, ids, reason, tokens.stop_strings_found[0])
    content, reasoning = split_thinking(text)
    reply = {"role": "assistant", "content": content}
    if reasoning is not None:
      reply["reasoning_content"] = reasoning
    self.messages = messages + [reply]
    self.turns += 1
    return Turn(text, content, reasoning, ids, reason, list(prompt), start,
                len(prompt) - start, mode, time.perf_counter() - t0)


def repl(chat: Chat, stdin: TextIO, out: TextIO, err: TextIO,
         interactive: bool = False, show_stats: bool = False) -> int:
  """Reads messages and commands until /exit or the end of the input.

  Returns:
    The number of replies.
  """
  replies = 0
  while True:
    if interactive:
      try:
        line = input(">>> ")
      except EOFError:
        out.write("\n")
        break
    else:
      line = stdin.readline()
      if not line:
        break
      line = line.rstrip("\n")
    command = line.strip()
    if not command:
      continue
    if command == "/exit":
      break
    if command == "/reset":
      chat.reset()
      err.write("[a new conversation]\n")
      continue
    if command in ("/think", "/no_think"):
      chat.enable_thinking = command == "/think"
      err.write(f"[thinking {'on' if chat.enable_thinking else 'off'}]\n")
      continue
    if command.startswith("/") and " " not in command:
      err.write(f"[{command}: not a command; the commands are "
                f"{', '.join(COMMANDS)}]\n")
      continue
    try:
      turn = chat.send(line, out=out, note=lambda s: err.write(s + "\n"))
    except KeyboardInterrupt:
      out.write("\n")
      err.write("[interrupted: the turn is dropped]\n")
      continue
    except ValueError as e:
      err.write(f"[{cli.one_line(e)}]\n")
      continue
    out.write("\n")
    out.flush()
    replies += 1
    if show_stats:
      err.write(f"[{turn.prefilled} tokens prefilled ({turn.reused} "
                f"reused, {turn.mode}), {len(turn.ids)} new, "
                f"{turn.stop_reason}; {turn.seconds:.2f} s]\n")
  return replies


def define_flags(flag_values: flags.FlagValues = flags.FLAGS
                 ) -> dict[str, flags.FlagHolder]:
  """Defines the script's flags on `flag_values`."""
  fv = flag_values
  holders = {
      "checkpoint": flags.DEFINE_string(
          "checkpoint", None, "A transformers Qwen3.5 checkpoint folder with "
          "its tokenizer and chat template.", flag_values=fv),
      "system": flags.DEFINE_string(
          "system", None, "A system message that starts the conversation.",
          flag_values=fv),
      "enable_thinking": flags.DEFINE_bool(
          "enable_thinking", None, "Passed to the chat template at the "
          "start (/think and /no_think switch it).", flag_values=fv),
      "max_new_tokens": flags.DEFINE_integer(
          "max_new_tokens", None, "Longest reply (default: "
          "generation_config.json's max_new_tokens, else 1024).",
          lower_bound=1, flag_values=fv),
      "cache_len": flags.DEFINE_integer(
          "cache_len", 4096, "Cache slots allocated at the start (grown "
          "when a turn needs more).", lower_bound=1, flag_values=fv),
      "show_stats": flags.DEFINE_bool(
          "show_stats", False, "After each reply, the tokens prefilled and "
          "decoded, on stderr.", flag_values=fv),
  }
  flags.mark_flag_as_required("checkpoint", flag_values=fv)
  holders.update(gen_script.define_sampling_flags(fv))
  return holders


def build(checkpoint: str, **options: Any) -> tuple[Chat, Any]:
  """Checks everything, then loads the weights: (chat, described).

  Raises:
    cli.UserError: before the weights are read, naming the flag or file.
  """
  o = options
  sampling = {k: o.get(k) for k in ("temperature", "top_k", "top_p",
                                    "min_p", "repetition_penalty",
                                    "presence_penalty")}
  gen_script.check_options(
      sampling["top_k"], sampling["top_p"], o.get("stop_tokens"),
      temperature=sampling["temperature"],
      max_new_tokens=o.get("max_new_tokens"),
      block_steps=o.get("block_steps", 8),
      prefill_block=o.get("prefill_block", DEFAULT_PREFILL_BLOCK),
      min_p=sampling["min_p"],
      repetition_penalty=sampling["repetition_penalty"],
      presence_penalty=sampling["presence_penalty"],
      stop_strings=o.get("stop_strings"))
  cli.positive_int("--cache_len", o.get("cache_len", 4096))
  gen_script.check_checkpoint(checkpoint)
  d = gen_script.describe(checkpoint, o.get("stop_tokens"))
  if not getattr(d.tokenizer, "chat_templates", None):
    raise cli.UserError(
        f"--checkpoint {checkpoint!r}: expected a chat template "
        f"({tokenizer_lib.CHAT_TEMPLATE_FILE}, or chat_template in "
        f"{tokenizer_lib.TOKENIZER_CONFIG_FILE}), found none")
  max_new = o.get("max_new_tokens") or d.generation_config.max_new_tokens or (
      1024)
  with cli.user_errors():
    Sampler.from_generation_config(d.generation_config, **sampling)
    messages = [{"role": "user", "content": "Hi"}]
    if o.get("system"):
      messages.insert(0, {"role": "system", "content": o["system"]})
    kwargs = ({} if o.get("enable_thinking") is None
              else {"enable_thinking": o["enable_thinking"]})
    d.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                    **kwargs)
  cfg, params = gen_script.load(checkpoint, o.get("dtype", "auto"),
                                o.get("seed", 0))
  chat = Chat(cfg, params, d.tokenizer, generation_config=d.generation_config,
              system=o.get("system"),
              enable_thinking=o.get("enable_thinking"),
              max_new_tokens=max_new, sampling=sampling,
              seed=o.get("seed", 0), stop_tokens=d.stops,
              stop_strings=o.get("stop_strings"),
              block_steps=o.get("block_steps", 8),
              cache_len=o.get("cache_len", 4096),
              prefill_block=o.get("prefill_block", DEFAULT_PREFILL_BLOCK))
  return chat, d


_HOLDERS: dict[str, flags.FlagHolder] = {}


def main(argv):
  del argv  # cli.run refuses positional arguments
  v = {name: h.value for name, h in _HOLDERS.items()}
  chat, _ = build(v.pop("checkpoint"), **v)
  interactive = sys.stdin.isatty()
  if interactive:
    print(f"[{', '.join(COMMANDS)}; Ctrl-D leaves; {jax.default_backend()}]",
          file=sys.stderr)
  repl(chat, sys.stdin, sys.stdout, sys.stderr, interactive,
       v["show_stats"])


if __name__ == "__main__":
  _HOLDERS = define_flags()
  cli.run(main)
