"""Tests of qwen_jax/tokenizer.py against transformers' tokenizers.

A tiny byte-level BPE tokenizer is trained here with the `tokenizers`
trainer, with Qwen3.5's normalizer, pre-tokenizer and decoder and Qwen-style
added tokens, and saved with a tokenizer_config.json holding a Qwen-style
chat template written for these tests (system prompt, tools listed with
`tojson`, assistant reasoning and tool calls, grouped tool responses,
`enable_thinking`, `namespace`, `break`, `raise_exception`,
`strftime_now`). The references are transformers' `AutoTokenizer` on the
same folder (which picks `Qwen3_5Tokenizer` for a `qwen3_5` config.json, as
for a released checkpoint) and `PreTrainedTokenizerFast`:

  * apply_chat_template, as text and as ids, over a table of conversations
    (with and without a system prompt, thinking on and off, tools, tool
    calls and responses, generation prompt on and off, unicode, content
    blocks, continue_final_message), and the template precedence of
    chat_template.jinja, named templates and special_tokens_map.json;
  * encode and decode of random unicode text (emoji, CJK, combining marks,
    added tokens) and of random ids;
  * the streaming decoder: its pieces join to decode(all ids) and hold no
    U+FFFD when the text has none, with characters split across tokens;
  * stop strings spanning pieces, against a search of the whole text;
  * generation_config.json against transformers' GenerationConfig;
  * bad input: one ValueError naming the file or argument.
"""

import copy
import json
import os
import shutil
import unicodedata

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors
import transformers

from qwen_jax import tokenizer as tokenizer_lib

# Qwen3.5's pre-tokenizer split (transformers' models/qwen3_5/
# tokenization_qwen3_5.py builds the same pipeline).
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|"
          r"\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added but not special, as in Qwen's tokenizers.
_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>",
          "<tool_response>", "</tool_response>"]
# Few CJK characters and one emoji, so most multi-byte characters stay split
# into byte tokens and some into partial merges.
_CORPUS = [
    "Hello world, the user asks the assistant about the weather today.",
    "You are a helpful assistant. Think step by step before answering.",
    "system user assistant tool call response think function arguments",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "你好世界，今天天气很好。天气",
    "The quick brown fox 🦊 jumps over the lazy dog.",
]

_TEMPLATE = r"""
{%- macro text_of(content) %}
  {%- if content is string %}
    {{- content }}
  {%- else %}
    {%- for part in content %}
      {%- if part.type == 'text' %}
        {{- part.text }}
      {%- elif part.type == 'image' %}
        {{- '[image]' }}
      {%- endif %}
    {%- endfor %}
  {%- endif %}
{%- endmacro %}
{%- if bos_token is defined %}
  {{- bos_token }}
{%- endif %}
{%- if messages[0].role == 'system' %}
  {%- set system_text = text_of(messages[0].content) %}
  {%- set turns = messages[1:] %}
{%- else %}
  {%- set system_text = none %}
  {%- set turns = messages %}
{%- endif %}
{%- if show_year is defined and show_year %}
  {%- set system_text = (system_text or '') + '\nYear: ' + strftime_now('%Y') %}
{%- endif %}
{%- if tools %}
  {{- '<|im_start|>system\n' }}
  {%- if system_text %}
    {{- system_text + '\n\n' }}
  {%- endif %}
  {{- '# Tools\n\nFunctions you may call, one JSON schema per line:\n<tools>' }}
  {%- for tool in tools %}
    {{- '\n' + tool | tojson }}
  {%- endfor %}
  {{- '\n</tools>\n\nTo call one, reply with <tool_call>\n{"name": <name>, '
      '"arguments": <object>}\n</tool_call><|im_end|>\n' }}
{%- elif system_text is not none %}
  {{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query=turns | length - 1) %}
{%- for m in turns[::-1] %}
  {%- if m.role == 'user' and not (m.content is string
        and m.content.startswith('<tool_response>')) %}
    {%- set ns.last_query = turns | length - 1 - loop.index0 %}
    {%- break %}
  {%- endif %}
{%- endfor %}
{%- for m in turns %}
  {%- if m.role == 'user' %}
    {{- '<|im_start|>user\n' + text_of(m.content) + '<|im_end|>\n' }}
  {%- elif m.role == 'assistant' %}
    {%- set content = m.content if m.content is string else '' %}
    {%- set reasoning = '' %}
    {%- if m.reasoning_content is string %}
      {%- set reasoning = m.reasoning_content %}
    {%- elif '</think>' in content %}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
      {%- set content = content.split('</think>')[-1] %}
    {%- endif %}
    {%- set reasoning = reasoning.strip('\n') %}
    {%- set content = content.lstrip('\n') %}
    {{- '<|im_start|>assistant\n' }}
    {%- if loop.index0 > ns.last_query and reasoning %}
      {{- '<think>\n' + reasoning + '\n</think>\n\n' }}
    {%- endif %}
    {{- content }}
    {%- for call in m.tool_calls | default([]) %}
      {%- if call.function is defined %}
        {%- set f = call.function %}
      {%- else %}
        {%- set f = dict(name=call.name, arguments=call.arguments) %}
      {%- endif %}
      {%- if content or not loop.first %}
        {{- '\n' }}
      {%- endif %}
      {{- '<tool_call>\n{"name": "' + f.name + '", "arguments": ' }}
      {%- if f.arguments is string %}
        {{- f.arguments }}
      {%- else %}
        {{- f.arguments | tojson(sort_keys=true) }}
      {%- endif %}
      {{- '}\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\n' }}
  {%- elif m.role == 'tool' %}
    {%- if loop.first or turns[loop.index0 - 1].role != 'tool' %}
      {{- '<|im_start|>user' }}
    {%- endif %}
    {{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}
    {%- if loop.last or turns[loop.index0 + 1].role != 'tool' %}
      {{- '<|im_end|>\n' }}
    {%- endif %}
  {%- elif m.role == 'system' %}
    {{- raise_exception('a system message may only come first') }}
  {%- else %}
    {{- raise_exception('unknown role: ' + m.role) }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}
    {{- '<think>\n\n</think>\n\n' }}
  {%- endif %}
{%- endif %}
"""

_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather <now> & \"soon\" in a city, e.g. 北京",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"},
                           "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
_CLOCK = {"type": "function",
          "function": {"name": "clock", "description": "The time.",
                       "parameters": {"type": "object", "properties": {}}}}

_SYS = {"role": "system", "content": "You are a helpful assistant."}
_HI = {"role": "user", "content": "Hello! What is the weather?"}
_CASES = {
    "user_prompt": ([_HI], dict(add_generation_prompt=True)),
    "user_no_prompt": ([_HI], dict(add_generation_prompt=False)),
    "system_thinking_off": (
        [_SYS, _HI], dict(add_generation_prompt=True, enable_thinking=False)),
    "system_thinking_on": (
        [_SYS, _HI], dict(add_generation_prompt=True, enable_thinking=True)),
    "multi_turn_reasoning": (
        [_SYS, _HI,
         {"role": "assistant", "content": "Sunny.", "tool_calls": None,
          "reasoning_content": "\nThe user wants weather.\n"},
         {"role": "user", "content": "And tomorrow?"},
         {"role": "assistant", "content": "<think>\nCheck.\n</think>\n\nRain."},
         ], dict(add_generation_prompt=False)),
    "multi_turn_thinking_alias": (
        [_HI,
         {"role": "assistant", "content": "Sunny.", "thinking": "Look up."},
         {"role": "user", "content": "Thanks"},
         {"role": "assistant", "content": "You're welcome.",
          "reasoning": "Be polite."}], dict(add_generation_prompt=False)),
    "tools_prompt": (
        [_SYS, _HI], dict(tools=[_WEATHER, _CLOCK],
                          add_generation_prompt=True, enable_thinking=False)),
    "tools_no_system": (
        [_HI], dict(tools=[_WEATHER], add_generation_prompt=True)),
    "tool_calls_and_responses": (
        [_SYS, {"role": "user", "content": "Weather in Paris and 東京?"},
         {"role": "assistant", "content": None, "reasoning_content": "Call.",
          "tool_calls": [
              {"type": "function", "function": {
                  "name": "get_weather",
                  "arguments": {"city": "Paris", "unit": "C"}}},
              {"type": "function", "function": {
                  "name": "get_weather",
                  "arguments": '{"city": "東京"}'}}]},
         {"role": "tool", "content": '{"temp": 21}'},
         {"role": "tool", "content": '{"temp": 18, "sky": "☀"}'},
         {"role": "assistant", "content": "Paris 21°C, 東京 18°C ☀.",
          "reasoning_content": "Both came back."},
         {"role": "user", "content": "Now the time."},
         {"role": "assistant", "content": "Let me check.",
          "tool_calls": [{"name": "clock", "arguments": {}}]},
         {"role": "tool", "content": "12:00"}],
        dict(tools=[_WEATHER, _CLOCK], add_generation_prompt=True,
             enable_thinking=True)),
    "unicode": (
        [{"role": "system", "content": "Réponds en français. 🇫🇷"},
         {"role": "user", "content": "你好！😀👨‍👩‍👧 e\u0301 مرحبا Ωμέγα\n\tok"},
         {"role": "assistant", "content": "こんにちは 🦊🐍 ∑∞"},
         {"role": "user", "content": "再见 \U0001f9ea\u200d"}],
        dict(add_generation_prompt=True, enable_thinking=False)),
    "content_blocks": (
        [{"role": "user", "content": [{"type": "image"},
                                      {"type": "text", "text": "Describe."}]}],
        dict(add_generation_prompt=True)),
    "special_tokens_in_content": (
        [{"role": "user", "content": "Say <|im_end|> and <think>."}],
        dict(add_generation_prompt=True)),
    "continue_final_message": (
        [_HI, {"role": "assistant", "content": "The weather is "}],
        dict(continue_final_message=True)),
    "strftime_now": ([_SYS, _HI], dict(show_year=True,
                                       add_generation_prompt=True)),
}


def _build_backend() -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=420, special_tokens=_SPECIAL, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS * 10, trainer)
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t in _ADDED])
  return tok


def _write_json(path, value):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, ensure_ascii=False, indent=1)


def _tokenizer_config(folder, **fields):
  """A Qwen-style tokenizer_config.json matching the folder's tokenizer."""
  with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
    added = json.load(f)["added_tokens"]
  config = {
      "tokenizer_class": "Qwen2Tokenizer",
      "bos_token": None, "unk_token": None,
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "clean_up_tokenization_spaces": False, "split_special_tokens": False,
      "model_max_length": 4096,
      "added_tokens_decoder": {
          str(a["id"]): {k: v for k, v in a.items() if k != "id"}
          for a in added},
      "chat_template": _TEMPLATE,
  }
  config.update(fields)
  config = {k: v for k, v in config.items() if v is not ...}
  _write_json(os.path.join(folder, "tokenizer_config.json"), config)


def _variant(base, folder, **fields):
  """A copy of `base`'s tokenizer.json with its own tokenizer_config.json."""
  os.makedirs(folder)
  shutil.copy(os.path.join(base, "tokenizer.json"), folder)
  _tokenizer_config(folder, **fields)
  return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("qwen_tokenizer"))
  _build_backend().save(os.path.join(path, "tokenizer.json"))
  _tokenizer_config(path)
  # As a released Qwen3.5 checkpoint: transformers then picks its
  # Qwen3_5Tokenizer class.
  _write_json(os.path.join(path, "config.json"), {"model_type": "qwen3_5"})
  return path


@pytest.fixture(scope="module")
def tok(folder):
  return tokenizer_lib.load_tokenizer(folder)


@pytest.fixture(scope="module")
def hf(folder):
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
  assert type(hf_tok).__name__ == "Qwen3_5Tokenizer"
  return hf_tok


@pytest.fixture(scope="module")
def hf_fast(folder):
  return transformers.PreTrainedTokenizerFast.from_pretrained(folder)


def _hf_chat(hf_tok, messages, **kwargs):
  """transformers' (text, ids) of a conversation."""
  text = hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)
  ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                   **kwargs)
  return text, list(ids)


def _random_text(rng, n):
  """Random text mixing scripts, emoji, combining marks and added tokens."""
  pools = [
      lambda: rng.choice(["the", " weather", " Hello", "assistant", " ",
                          "\n", "\n\n", "\t", "  ", "'s", "123", "!?"]),
      lambda: chr(rng.integers(0x4E00, 0x9FFF)),  # CJK
      lambda: chr(rng.integers(0x1F300, 0x1FAFF)),  # emoji
      lambda: chr(rng.integers(0x0400, 0x04FF)),  # Cyrillic
      lambda: chr(rng.integers(0x0600, 0x06FF)),  # Arabic
      lambda: "e" + chr(rng.integers(0x0300, 0x036F)),  # combining marks
      lambda: chr(rng.integers(0x10000, 0x10FFFF)),  # astral planes
      lambda: rng.choice(["\u200d", "\ufe0f", "ß", "Ω", "é", "ﬁ"]),
      lambda: rng.choice(_SPECIAL + _ADDED),
  ]
  weights = np.array([8, 3, 3, 1, 1, 1, 1, 1, 1], np.float64)
  picks = rng.choice(len(pools), size=n, p=weights / weights.sum())
  text = "".join(str(pools[i]()) for i in picks)
  # No lone surrogates (not encodable, for either library).
  return "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)


# --------------------------------------------------------------------------
# Loading, attributes, encode and decode.


def test_attributes_match_transformers(tok, hf):
  assert tok.vocab_size == len(hf)
  assert tok.eos_token == hf.eos_token == "<|im_end|>"
  assert tok.eos_token_id == hf.eos_token_id
  assert tok.pad_token_id == hf.pad_token_id
  assert tok.bos_token_id is None and hf.bos_token_id is None
  assert tok.special_tokens == hf.special_tokens_map
  assert tok.special_ids == {i for i, t in hf.added_tokens_decoder.items()
                             if t.special}
  assert tok.added_tokens == {i: t.content
                              for i, t in hf.added_tokens_decoder.items()}
  assert tok.chat_template == hf.chat_template == _TEMPLATE


@pytest.mark.parametrize("seed", range(3))
def test_encode_decode_match_transformers(tok, hf, hf_fast, seed):
  rng = np.random.default_rng(seed)
  for _ in range(20):
    text = _random_text(rng, int(rng.integers(1, 60)))
    ids = tok.encode(text)
    assert ids == hf.encode(text) == hf_fast.encode(text), repr(text)
    for skip in (False, True):
      assert (tok.decode(ids, skip_special_tokens=skip)
              == hf.decode(ids, skip_special_tokens=skip)), repr(text)
  # Random ids: invalid byte sequences, special tokens anywhere.
  for _ in range(20):
    ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 30)))
    for skip in (False, True):
      assert (tok.decode(ids, skip_special_tokens=skip)
              == hf.decode(ids.tolist(), skip_special_tokens=skip))


def test_encode_options(folder, tmp_path):
  tok = tokenizer_lib.load_tokenizer(folder)
  text = "hi<|im_end|>"
  assert tok.encode(text, add_special_tokens=False) == tok.encode(text)
  assert tok.token_to_id("<|im_end|>") in tok.encode(text)
  split = _variant(folder, str(tmp_path / "split"), split_special_tokens=True)
  tok_split = tokenizer_lib.load_tokenizer(split)
  hf_split = transformers.PreTrainedTokenizerFast.from_pretrained(split)
  assert tok_split.encode(text) == hf_split.encode(text)
  assert tok.token_to_id("<|im_end|>") not in tok_split.encode(text)


# --------------------------------------------------------------------------
# Chat templates.


@pytest.mark.parametrize("case", sorted(_CASES))
def test_chat_template_matches_transformers(tok, hf, case):
  messages, kwargs = _CASES[case]
  before = copy.deepcopy(messages)
  text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
  ids = tok.apply_chat_template(messages, **kwargs)
  assert (text, ids) == _hf_chat(hf, messages, **kwargs)
  assert messages == before  # the caller's messages are left alone
  # Byte-level BPE is lossless up to the NFC normalizer.
  assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_enable_thinking_reaches_template(tok):
  messages = [_SYS, _HI]
  off = tok.apply_chat_template(messages, add_generation_prompt=True,
                                tokenize=False, enable_thinking=False)
  on = tok.apply_chat_template(messages, add_generation_prompt=True,
                               tokenize=False, enable_thinking=True)
  assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert on.endswith("<|im_start|>assistant\n")
  ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                enable_thinking=False)
  suffix = tok.encode("<think>\n\n</think>\n\n")
  assert ids[-len(suffix):] == suffix
  assert tok.token_to_id("<think>") in suffix


def test_template_precedence_and_variables(folder, tmp_path):
  base = str(tmp_path)
  messages = [_SYS, _HI]
  probe = ("{{ eos_token }}|{{ pad_token }}|{{ bos_token }}|"
           "{{ image_token | default('-') }}|{{ messages | length }}"
           "{{ tools | tojson }}|{{ add_generation_prompt }}")
  # chat_template.jinja replaces the config's template.
  jinja_dir = _variant(folder, os.path.join(base, "jinja"))
  with open(os.path.join(jinja_dir, "chat_template.jinja"), "w") as f:
    f.write("JINJA " + probe)
  # Named templates: tool_use is picked when tools are given.
  named_dir = _variant(folder, os.path.join(base, "named"), chat_template=[
      {"name": "default", "template": "DEFAULT " + probe},
      {"name": "tool_use", "template": "TOOLS " + probe}])
  # Legacy special_tokens_map.json (no added_tokens_decoder): its tokens
  # replace the config's; a model-specific *_token reaches the template.
  legacy_dir = _variant(folder, os.path.join(base, "legacy"),
                        added_tokens_decoder=..., image_token="<think>",
                        chat_template="LEGACY " + probe)
  _write_json(os.path.join(legacy_dir, "special_tokens_map.json"),
              {"eos_token": {"content": "<|endoftext|>", "lstrip": False},
               "bos_token": "<|im_start|>"})
  for path, tools in [(jinja_dir, None), (named_dir, None),
                      (named_dir, [_CLOCK]), (legacy_dir, [_WEATHER])]:
    ours = tokenizer_lib.load_tokenizer(path)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    for agp in (False, True):
      got = ours.apply_chat_template(messages, add_generation_prompt=agp,
                                     tokenize=False, tools=tools)
      want = ref.apply_chat_template(messages, add_generation_prompt=agp,
                                     tokenize=False, tools=tools)
      assert got == want
    assert got.split(" ")[0] == {jinja_dir: "JINJA", named_dir: (
        "TOOLS" if tools else "DEFAULT"), legacy_dir: "LEGACY"}[path]
  assert ours.eos_token == "<|endoftext|>" and ours.bos_token == "<|im_start|>"
  # The processor's chat_template.json, when nothing else has a template.
  json_dir = _variant(folder, os.path.join(base, "json"), chat_template=...)
  _write_json(os.path.join(json_dir, "chat_template.json"),
              {"chat_template": "JSON " + probe})
  ours = tokenizer_lib.load_tokenizer(json_dir)
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(json_dir)
  assert ref.chat_template is None
  assert (ours.apply_chat_template(messages, tokenize=False)
          == ref.apply_chat_template(messages, tokenize=False,
                                     chat_template="JSON " + probe))
  # A template passed in by the caller wins.
  assert ours.apply_chat_template(
      messages, tokenize=False, chat_template="{{ messages[1].content }}"
  ) == _HI["content"]


def test_sandbox_matches_transformers(tok, hf):
  """Whitespace control, tojson arguments, globals, loop controls."""
  template = (
      "{% for m in messages %}\n  {% if m.role %}\n    {{ m.role }}:\n"
      "  {% endif %}\n{% endfor %}\n"
      "{% set ns = namespace(n=0) %}{% for i in range(9) %}"
      "{% if i == 5 %}{% break %}{% endif %}{% if i % 2 %}{% continue %}"
      "{% endif %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}|"
      "{{ messages[0] | tojson(indent=2, sort_keys=true) }}|"
      "{{ messages[0].content | tojson(ensure_ascii=true) }}|"
      "{{ dict(a=1) | tojson(separators=(',', ':')) }}|"
      "{% generation %}{{ messages[0].role }}{% endgeneration %}")
  messages = [{"role": "user", "content": "<b>&'\"é😀"}]
  got = tok.apply_chat_template(messages, tokenize=False,
                                chat_template=template)
  assert got == hf.apply_chat_template(messages, tokenize=False,
                                       chat_template=template)
  assert got.startswith("    user:\n6|")
  with pytest.raises(ValueError, match="namespace"):
    tok.apply_chat_template(
        messages, chat_template="{% set ns = namespace(_x=1) %}")
  with pytest.raises(ValueError, match="unsafe|access"):
    tok.apply_chat_template(
        messages, chat_template="{{ messages.__class__.__mro__ }}")


# --------------------------------------------------------------------------
# Streaming.


def _stream(tok, ids, skip=False):
  decoder = tok.stream_decoder(skip_special_tokens=skip)
  pieces = [decoder.push(i) for i in ids]
  return pieces, decoder.flush()


def test_stream_decoder_split_characters(tok, hf):
  # Characters not in the training text stay split into byte tokens.
  for text in ["🐍", "🦊🐍", "é", "鬱", "a👨‍👩‍👧b", "天气很好鬱😀 ok"]:
    ids = tok.encode(text)
    alone = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in a for a in alone), (text, alone)  # really split
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) == text == hf.decode(ids)
    assert rest == ""
    for piece in pieces:
      assert "\ufffd" not in piece
      piece.encode("utf-8")  # no lone surrogates
  # An emoji in several tokens: nothing until the last.
  ids = tok.encode("🐍")
  assert len(ids) >= 3
  assert _stream(tok, ids)[0] == [""] * (len(ids) - 1) + ["🐍"]


@pytest.mark.parametrize("seed", range(3))
def test_stream_decoder_random_text(tok, hf, seed):
  rng = np.random.default_rng(100 + seed)
  split_chars = 0
  for _ in range(20):
    text = _random_text(rng, int(rng.integers(1, 80)))
    ids = tok.encode(text)
    split_chars += sum("\ufffd" in tok.decode([i]) for i in ids)
    for skip in (False, True):
      full = hf.decode(ids, skip_special_tokens=skip)
      pieces, rest = _stream(tok, ids, skip)
      assert "".join(pieces) + rest == full
      assert rest == ""
      assert all("\ufffd" not in p for p in pieces)
  assert split_chars > 20


@pytest.mark.parametrize("seed", range(3))
def test_stream_decoder_random_ids(tok, hf, seed):
  """Any ids (bytes that never form a character included)."""
  rng = np.random.default_rng(200 + seed)
  byte_ids = [tok.encode(chr(c))[0] for c in range(0x21, 0x7F)]
  byte_ids += tok.encode("é🐍鬱")  # lead and continuation bytes
  for _ in range(30):
    n = int(rng.integers(1, 40))
    ids = np.where(rng.random(n) < 0.7, rng.choice(byte_ids, n),
                   rng.integers(0, tok.vocab_size, n)).tolist()
    for skip in (False, True):
      full = hf.decode(ids, skip_special_tokens=skip)
      pieces, rest = _stream(tok, ids, skip)
      assert "".join(pieces) + rest == full
      assert all(not p.endswith("\ufffd") for p in pieces)
      if "\ufffd" not in full:
        assert rest == "" and all("\ufffd" not in p for p in pieces)


def test_stream_decoder_sentencepiece_style(tmp_path):
  """SentencePiece-style: byte fallback, the first leading space dropped."""
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=True))
  backend.pre_tokenizer = pre_tokenizers.Metaspace()
  backend.decoder = decoders.Sequence([
      decoders.Replace("\u2581", " "), decoders.ByteFallback(),
      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, show_progress=False,
      initial_alphabet=["\u2581"] + [chr(c) for c in range(0x61, 0x7B)],
      special_tokens=[f"<0x{b:02X}>" for b in range(256)])
  backend.train_from_iterator(["the cat sat on the mat"] * 5, trainer)
  backend.save(str(tmp_path / "tokenizer.json"))
  tok = tokenizer_lib.load_tokenizer(tmp_path)
  rng = np.random.default_rng(400)
  words = ["the", "cat", "sat", "mat", "é", "猫", "🐍", "on", "a"]
  for _ in range(20):
    text = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) == text and rest == ""
    assert all("\ufffd" not in p for p in pieces)
  ids = [tok.token_to_id(t) for t in ["\u2581the", "\u2581cat", "\u2581sat"]]
  assert _stream(tok, ids) == (["the", " cat", " sat"], "")


def test_stream_decoder_extend_and_numpy(tok):
  ids = np.asarray(tok.encode("Hello 世界 🐍"), np.int32)
  decoder = tok.stream_decoder()
  assert decoder.extend(ids) + decoder.flush() == "Hello 世界 🐍"
  assert decoder.ids == ids.tolist() and decoder.text == "Hello 世界 🐍"
  decoder = tok.stream_decoder()
  pieces = [decoder.push(i) for i in jnp.asarray(ids)]
  assert "".join(pieces) == tok.decode(jnp.asarray(ids)) == "Hello 世界 🐍"
  with pytest.raises(ValueError, match="ids: expected a 1-D array"):
    tok.decode(np.zeros((1, 2), np.int32))


# --------------------------------------------------------------------------
# Stop strings.


def _pieces(rng, text):
  cuts = np.sort(rng.choice(len(text) + 1, size=rng.integers(0, 6)))
  bounds = [0, *cuts.tolist(), len(text)]
  return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("seed", range(3))
def test_stop_strings_match_whole_text_search(seed):
  rng = np.random.default_rng(300 + seed)
  for _ in range(300):
    stops = ["".join(rng.choice(list("ab\n"), size=rng.integers(1, 5)))
             for _ in range(rng.integers(1, 4))]
    text = "".join(rng.choice(list("ab\nc"), size=rng.integers(0, 25)))
    pieces = _pieces(rng, text)
    # The reference: after the first piece that completes a stop string,
    # the earliest start of one in the text so far.
    at, end = None, 0
    for piece in pieces:
      end += len(piece)
      starts = [text[:end].find(s) for s in stops if s in text[:end]]
      if starts:
        at = min(starts)
        break
    matcher = tokenizer_lib.StopStrings(stops)
    shown = "".join(matcher.push(p) for p in pieces) + matcher.flush()
    if at is not None:
      assert shown == text[:at], (stops, pieces)
      assert text[:end].find(matcher.stop) == at, (stops, pieces)
    else:
      assert shown == text and matcher.stop is None, (stops, pieces)


def test_stop_strings_hold_back_and_span_pieces(tok):
  matcher = tokenizer_lib.StopStrings(["\nUser:", "<|im_end|>"])
  assert matcher.push("Sure.\nUs") == "Sure."
  assert matcher.push("ed it") == "\nUsed it"  # not a stop after all
  assert matcher.push("\nUse") == ""
  assert matcher.push("r: more") == ""
  assert matcher.stop == "\nUser:" and matcher.push("x") == ""
  assert matcher.flush() == ""
  scan = tokenizer_lib.find_stop("abc<|im", ["<|im_end|>"])
  assert scan == tokenizer_lib.StopScan(3, None)
  # With a stream decoder: a stop string made of several tokens.
  ids = tok.encode("你好 ok<|im_end|>tail")
  decoder, matcher = tok.stream_decoder(), tokenizer_lib.StopStrings(
      ["<|im_end|>", "k<|im"])
  shown = "".join(matcher.push(decoder.push(i)) for i in ids)
  assert shown == "你好 o" and matcher.stop == "k<|im"
  with pytest.raises(ValueError, match="stop_strings"):
    tokenizer_lib.StopStrings(["ok", ""])
  with pytest.raises(ValueError, match="stop_strings"):
    tokenizer_lib.StopStrings("ok")


# --------------------------------------------------------------------------
# Generation defaults.


def test_generation_config_matches_transformers(tmp_path):
  fields = [
      {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
       "eos_token_id": [248046, 248044], "pad_token_id": 248044,
       "bos_token_id": 248044, "transformers_version": "4.57.0"},
      {"temperature": 1.0, "top_p": 0.8, "min_p": 0.05,
       "repetition_penalty": 1.05, "presence_penalty": 1.5,
       "eos_token_id": 7, "max_new_tokens": 64, "do_sample": False},
  ]
  for i, raw in enumerate(fields):
    folder = tmp_path / str(i)
    folder.mkdir()
    _write_json(folder / "generation_config.json", raw)
    ours = tokenizer_lib.load_generation_config(folder)
    ref = transformers.GenerationConfig.from_pretrained(folder)
    for name in ("do_sample", "temperature", "top_k", "top_p", "min_p",
                 "repetition_penalty", "pad_token_id", "bos_token_id",
                 "max_new_tokens"):
      if name in raw:
        assert getattr(ours, name) == getattr(ref, name), name
      else:
        assert getattr(ours, name) is None, name
    eos = ref.eos_token_id
    assert ours.eos_token_id == tuple(eos if isinstance(eos, list) else [eos])
    assert ours.presence_penalty == raw.get("presence_penalty")
  assert ours.replace(temperature=0.0, top_k=None).temperature == 0.0
  assert ours.replace(top_k=None).top_p == 0.8
  with pytest.raises(ValueError, match="overrides"):
    ours.replace(temprature=1.0)
  with pytest.raises(ValueError, match="top_k: expected"):
    ours.replace(top_k=-1)
  assert tokenizer_lib.load_generation_config(
      folder / "generation_config.json") == ours
  empty = tmp_path / "none"
  empty.mkdir()
  assert (tokenizer_lib.load_generation_config(empty)
          == tokenizer_lib.GenerationConfig())


@pytest.mark.parametrize("raw, field", [
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"top_k": 2.5}, "top_k"),
    ({"do_sample": "yes"}, "do_sample"),
    ({"eos_token_id": ["x"]}, "eos_token_id"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_generation_config_bad_fields(tmp_path, raw, field):
  _write_json(tmp_path / "generation_config.json", raw)
  with pytest.raises(ValueError, match=f"generation_config.json: {field}: "
                     f"expected .*found"):
    tokenizer_lib.load_generation_config(tmp_path)


# --------------------------------------------------------------------------
# Bad input.


def test_bad_folders(folder, tmp_path):
  with pytest.raises(ValueError, match="expected a checkpoint folder"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="expected tokenizer.json"):
    tokenizer_lib.load_tokenizer(empty)
  bad = _variant(folder, str(tmp_path / "bad_tok"))
  with open(os.path.join(bad, "tokenizer.json"), "w") as f:
    f.write('{"model": ')
  with pytest.raises(ValueError, match="tokenizer.json: not a valid"):
    tokenizer_lib.load_tokenizer(bad)
  bad = _variant(folder, str(tmp_path / "bad_config"))
  with open(os.path.join(bad, "tokenizer_config.json"), "w") as f:
    f.write('{"eos_token": "<|im_end|>",')
  with pytest.raises(ValueError, match="tokenizer_config.json: expected a "
                     "JSON object"):
    tokenizer_lib.load_tokenizer(bad)
  bad = _variant(folder, str(tmp_path / "bad_jinja"))
  with open(os.path.join(bad, "chat_template.jinja"), "w") as f:
    f.write("{% for m in messages %}{{ m.content }}")
  with pytest.raises(ValueError, match="chat_template.jinja: chat template "
                     "'default' is not valid Jinja"):
    tokenizer_lib.load_tokenizer(bad)
  bad = _variant(folder, str(tmp_path / "bad_eos"), eos_token="<|nope|>")
  with pytest.raises(ValueError, match="tokenizer_config.json: eos_token: "
                     "expected a token of tokenizer.json, found '<\\|nope"):
    tokenizer_lib.load_tokenizer(bad)
  bad = _variant(folder, str(tmp_path / "bad_templates"), chat_template=3)
  with pytest.raises(ValueError, match="tokenizer_config.json: chat_template: "
                     "expected"):
    tokenizer_lib.load_tokenizer(bad)
  no_template = _variant(folder, str(tmp_path / "no_template"),
                         chat_template=...)
  with pytest.raises(ValueError, match="no chat template"):
    tokenizer_lib.load_tokenizer(no_template).apply_chat_template([_HI])


def test_bad_chat_input(tok, hf, folder):
  late_system = [_HI, _SYS]
  with pytest.raises(ValueError, match="tokenizer_config.json .chat template "
                     "'default'.: rendering failed: TemplateError: a system "
                     "message may only come first"):
    tok.apply_chat_template(late_system)
  with pytest.raises(Exception, match="a system message may only come first"):
    hf.apply_chat_template(late_system)
  with pytest.raises(ValueError, match="unknown role: robot"):
    tok.apply_chat_template([{"role": "robot", "content": "beep"}])
  with pytest.raises(ValueError, match="messages: expected a non-empty"):
    tok.apply_chat_template([])
  with pytest.raises(ValueError, match=r"messages\[1\]: expected a dict"):
    tok.apply_chat_template([_HI, "hello"])
  with pytest.raises(ValueError, match=r"tools\[0\]: expected a JSON-schema"):
    tok.apply_chat_template([_HI], tools=[len])
  with pytest.raises(ValueError, match="continue_final_message and "
                     "add_generation_prompt"):
    tok.apply_chat_template([_HI], add_generation_prompt=True,
                            continue_final_message=True)
  with pytest.raises(ValueError, match="text: expected a str"):
    tok.encode(b"bytes")
  with pytest.raises(ValueError, match="ids: expected token ids"):
    tok.decode([1, -2])
  with pytest.raises(ValueError, match="token_id: expected token ids"):
    tok.stream_decoder().push(1.5)
