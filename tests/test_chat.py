"""experiments/chat.py: multi-turn chat that keeps the conversation cached,
and a fine-tune exported with its tokenizer that chats at once.

The checkpoint is a two-layer model with random weights (wide, so no
ties) and the tiny byte-level BPE tokenizer and Qwen-style chat template of
tests/test_tokenizer.py. For every turn the test renders the conversation
itself with the tokenizer and checks that:

  * the reply equals `qwen_jax.generate` on those rendered ids (greedy),
    whatever the cache did, so the cache holds exactly that conversation;
  * the prefill follows the rule of experiments/chat.py: a render that
    extends the cache prefills only its new tokens (a reply whose tokens
    re-render as generated); one that re-renders the last reply (the
    template drops the empty <think> block of the non-thinking prompt)
    goes back to the snapshot point and prefills from there; one that
    changes an earlier turn (a template that numbers the messages on its
    first line) prefills everything again, with a note;
  * the cache grows when a turn needs more slots.

Then a one-step fine-tune of the checkpoint is exported with
`tokenizer_from`, and `python -m experiments.chat` on the export, driven
through stdin (/no_think, /reset, /bogus, /exit), prints the replies that
`qwen_jax.generate` gives for the rendered conversation.
"""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import chat as chat_lib
import qwen_jax
from qwen_jax import tokenizer as tokenizer_lib
from qwen_jax import train as train_lib
from qwen_jax import train_checkpoint
from qwen_jax.train_step import TrainConfig
from tests import test_generate_batch as batch_tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = batch_tests.VOCAB
IM_END = batch_tests.IM_END
build_chat_checkpoint = batch_tests.build_chat_checkpoint
MAX_NEW = 6
# The reference generation's cache and prefill block match the chat's, so
# they share compiled programs.
SLOTS = 64
BLOCK = 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return build_chat_checkpoint(str(tmp_path_factory.mktemp("chat_base")))


@pytest.fixture(scope="module")
def loaded(base):
  cfg, params = qwen_jax.load_hf_checkpoint(base)
  return cfg, params, tokenizer_lib.load_tokenizer(base)


def _reference(cfg, params, tok, prompt, stops):
  """(new ids up to the stop, text) from `qwen_jax.generate` alone."""
  slots = max(SLOTS, -(-(len(prompt) + MAX_NEW) // SLOTS) * SLOTS)
  row = np.asarray(qwen_jax.generate(
      cfg, params, [prompt], MAX_NEW, stop_tokens=stops, cache_len=slots,
      prefill_block=BLOCK))[0].tolist()
  for i, t in enumerate(row):
    if t in stops:
      return row[:i + 1], tok.decode(row[:i])
  return row, tok.decode(row)


def _chat(loaded, **kw):
  cfg, params, tok = loaded
  kw = dict(dict(max_new_tokens=MAX_NEW, stop_tokens=[IM_END],
                 cache_len=SLOTS, prefill_block=BLOCK, block_steps=4), **kw)
  return chat_lib.Chat(cfg, params, tok, **kw)


def _turn(chat, loaded, text, notes=None):
  """Sends `text`; checks the prompt, the reply and the printed text."""
  cfg, params, tok = loaded
  kwargs = ({} if chat.enable_thinking is None
            else {"enable_thinking": chat.enable_thinking})
  want_prompt = tok.apply_chat_template(
      chat.messages + [{"role": "user", "content": text}],
      add_generation_prompt=True, chat_template=chat.chat_template, **kwargs)
  cached = list(chat.cached)
  out = io.StringIO()
  turn = chat.send(text, out=out,
                   note=None if notes is None else notes.append)
  assert turn.prompt_ids == want_prompt
  ids, reply = _reference(cfg, params, tok, want_prompt, chat.stop_tokens)
  assert turn.ids == ids and turn.text == reply
  assert out.getvalue() == reply
  assert turn.reused + turn.prefilled == len(want_prompt)
  assert chat.cached[:len(want_prompt)] == want_prompt
  return turn, cached


def _extending_reply(loaded):
  """(first message, its prompt, free tokens, k): a stop id ending the
  first reply after k tokens that render back as they were generated, so
  that the next turn extends the cache."""
  cfg, params, tok = loaded
  for text in ("Hi", "Hello! What is the weather?", "Tell me about Paris."):
    first = [{"role": "user", "content": text}]
    p1 = tok.apply_chat_template(first, add_generation_prompt=True)
    free = np.asarray(qwen_jax.generate(
        cfg, params, [p1], MAX_NEW, stop_tokens=(), cache_len=SLOTS,
        prefill_block=BLOCK))[0].tolist()
    for k in range(1, MAX_NEW):
      again = tok.apply_chat_template(first + [
          {"role": "assistant", "content": tok.decode(free[:k])},
          {"role": "user", "content": "x"}])
      if free[k] not in free[:k] and again[:len(p1) + k] == p1 + free[:k]:
        return text, p1, free, k
  raise AssertionError("no reply of the random model renders back as "
                       "generated; try other first messages")


def test_turns_equal_generate_and_prefill_only_what_changed(loaded):
  text, p1, free, k = _extending_reply(loaded)
  chat = _chat(loaded, stop_tokens=[free[k], IM_END], cache_len=32)
  turn, _ = _turn(chat, loaded, text)
  assert (turn.mode, turn.reused, turn.ids) == (chat_lib.NEW, 0,
                                                free[:k + 1])
  assert chat.cached == p1 + free[:k]  # the stop token is not fed
  turn, before = _turn(chat, loaded, "And tomorrow?")
  assert turn.mode == chat_lib.APPEND
  assert turn.reused == len(before) == len(p1) + k
  assert chat_lib._slots(chat._cache) == 64  # grown from 32
  # A later turn follows the rule, whichever case its reply falls in.
  for text in ("Thanks",):
    # The last turn's snapshot point (the documented rule).
    stable = chat_lib.common_prefix(turn.prompt_ids, chat.render(
        chat.messages[:-1] + list(chat_lib._PROBE), False))
    point = min(max(stable, turn.reused), len(turn.prompt_ids) - 1)
    turn, before = _turn(chat, loaded, text)
    same = chat_lib.common_prefix(before, turn.prompt_ids)
    if same == len(before):
      assert (turn.mode, turn.reused) == (chat_lib.APPEND, len(before))
    else:
      assert same >= point
      assert (turn.mode, turn.reused) == (chat_lib.LAST_REPLY, point)
  chat.reset()
  turn, _ = _turn(chat, loaded, text)
  assert turn.mode == chat_lib.NEW


def test_thinking_off_re_reads_the_last_reply_only(loaded):
  _, _, tok = loaded
  chat = _chat(loaded, enable_thinking=False, system="Be brief.")
  assert chat.messages == [{"role": "system", "content": "Be brief."}]
  first, _ = _turn(chat, loaded, "Hello!")
  assert tok.decode(first.prompt_ids).endswith("<think>\n\n</think>\n\n")
  second, _ = _turn(chat, loaded, "And now?")
  # The history renders without the empty think block: back to where the
  # first prompt's generation prompt begins.
  assert second.mode == chat_lib.LAST_REPLY
  assert tok.decode(first.prompt_ids[second.reused:]) == (
      "<think>\n\n</think>\n\n")
  assert second.prefilled == len(second.prompt_ids) - second.reused
  chat.enable_thinking = True  # /think
  third, _ = _turn(chat, loaded, "Why?")
  assert third.mode in (chat_lib.APPEND, chat_lib.LAST_REPLY)
  assert third.reused >= len(second.prompt_ids) - 8


def test_changed_history_prefills_everything_with_a_note(loaded):
  counting = ("{{ messages | length }} messages\n{% for m in messages %}"
              "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>"
              "assistant\n{% endif %}")
  chat = _chat(loaded, chat_template=counting)
  notes = []
  _turn(chat, loaded, "Hello!", notes)
  turn, _ = _turn(chat, loaded, "Again?", notes)
  assert (turn.mode, turn.reused) == (chat_lib.FULL, 0)
  assert len(notes) == 1 and f"all {len(turn.prompt_ids)} tokens" in notes[0]


def test_split_thinking():
  assert chat_lib.split_thinking("<think>\nhm\n</think>\n\nHi") == ("Hi",
                                                                     "hm")
  assert chat_lib.split_thinking("just text") == ("just text", None)


# ---------------------------------------------- an exported fine-tune chats
def test_exported_fine_tune_chats(base, tmp_path):
  cfg, params = qwen_jax.load_hf_checkpoint(base)
  tok = tokenizer_lib.load_tokenizer(base)
  text = tok.encode("Hello world, the user asks the assistant. " * 4)
  rows = np.asarray([text[:17], text[5:22]], np.int32)
  batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
  tcfg = TrainConfig(batch_size=2, seq_len=16, num_steps=1, warmup_steps=0,
                     learning_rate=1e-2, save_checkpoints=False)
  tuned = train_lib.train(cfg, tcfg, lambda step: batch, None,
                          params=params, progress=False).state.params
  export = str(tmp_path / "export")
  train_checkpoint.export_hf(export, cfg, tuned, tokenizer_from=base)
  for name in ("tokenizer.json", "tokenizer_config.json",
               "generation_config.json"):
    with open(os.path.join(base, name), "rb") as a, open(
        os.path.join(export, name), "rb") as b:
      assert a.read() == b.read(), name

  messages = "".join(f"{line}\n" for line in (
      "Hello there", "/no_think", "/bogus", "How are you?", "/reset",
      "Hello there", "/exit", "ignored"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [ROOT, os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run(
      [sys.executable, "-m", "experiments.chat", "--checkpoint", export,
       f"--max_new_tokens={MAX_NEW}", f"--cache_len={SLOTS}",
       f"--prefill_block={BLOCK}"], input=messages, capture_output=True,
      text=True, cwd=ROOT, env=env, timeout=300, check=False)
  assert r.returncode == 0, r.stderr
  cfg, tuned = qwen_jax.load_hf_checkpoint(export)
  stops = [IM_END, 0]  # config.json's and generation_config.json's eos
  conversation = [{"role": "user", "content": "Hello there"}]
  _, one = _reference(cfg, tuned, tok, tok.apply_chat_template(
      conversation, add_generation_prompt=True), stops)
  content, reasoning = chat_lib.split_thinking(one)
  conversation += [{"role": "assistant", "content": content,
                    "reasoning_content": reasoning},
                   {"role": "user", "content": "How are you?"}]
  _, two = _reference(cfg, tuned, tok, tok.apply_chat_template(
      conversation, add_generation_prompt=True, enable_thinking=False),
                      stops)
  # After /reset, /no_think still holds.
  _, three = _reference(cfg, tuned, tok, tok.apply_chat_template(
      conversation[:1], add_generation_prompt=True, enable_thinking=False),
                        stops)
  assert r.stdout == f"{one}\n{two}\n{three}\n"
  assert "[thinking off]" in r.stderr and "[a new conversation]" in r.stderr
  assert "/bogus: not a command" in r.stderr
  # The fine-tune changed the weights (else this would prove little).
  _, base_params = qwen_jax.load_hf_checkpoint(base)
  assert not np.array_equal(
      np.asarray(base_params["embed_tokens"]["embedding"]),
      np.asarray(tuned["embed_tokens"]["embedding"]))
