"""A checkpoint's tokenizer, chat template and generation defaults.

  load_tokenizer          a folder's tokenizer.json (encode/decode through the
                          `tokenizers` library), its special tokens and chat
                          template(s), as transformers reads them.
  Tokenizer.apply_chat_template
                          renders messages with the template in a sandboxed
                          Jinja environment built like transformers' (see
                          below), then encodes the text.
  StreamDecoder           token ids in, text pieces out, never splitting a
                          multi-byte character.
  find_stop, StopStrings  the earliest stop string in streamed text, and how
                          much text is safe to show before it.
  load_generation_config  generation_config.json's sampling defaults.

Where things are read from (transformers 5.25, `tokenization_utils_base.py`,
`processing_utils.py`):
  * tokenizer.json: the vocabulary, merges, normalizer, pre-tokenizer,
    decoder, post-processor and added tokens.
  * tokenizer_config.json: the named special tokens (`bos_token`, `eos_token`,
    `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`, any
    other `*_token` string, and `extra_special_tokens` when it is a dict),
    `split_special_tokens`, `clean_up_tokenization_spaces`, and
    `chat_template` (a string, or a list of {"name", "template"}).
  * special_tokens_map.json: read only when tokenizer_config.json has no
    `added_tokens_decoder` (transformers' legacy path); its entries then
    replace tokenizer_config.json's.
  * chat_template.jinja (the default template) and
    additional_chat_templates/<name>.jinja: when any exists, these replace
    every template in tokenizer_config.json.
  * chat_template.json ({"chat_template": ...}): the processor's legacy file,
    used only when neither source above holds a template (transformers'
    tokenizer never reads it; its processor prefers it to
    chat_template.jinja).
With several templates, `tool_use` is picked when tools are given and it
exists, else `default`, as transformers does.

The template environment follows transformers'
`utils/chat_template_utils.py`: `ImmutableSandboxedEnvironment` with
`trim_blocks` and `lstrip_blocks`, the loop-controls extension (`break`,
`continue`), a `{% generation %}` block (rendered as its body), a `tojson`
filter that does not escape HTML and takes `ensure_ascii`, `indent`,
`separators` and `sort_keys`, and the globals `raise_exception(message)`,
`strftime_now(format)`, `dict` and a `namespace` that refuses names starting
with "_". The template sees `messages`, `tools`, `documents`,
`add_generation_prompt`, the named special tokens and the caller's keyword
arguments (e.g. `enable_thinking`). Everything it sees is first rebuilt from
plain JSON types (a copy: the caller's messages are never changed), message
keys whose value is None are dropped, and a message's reasoning given as
`thinking` or `reasoning` is also passed as `reasoning_content` (and
`thinking`).

Example:
  tok = qwen_jax.tokenizer.load_tokenizer(path)
  ids = tok.apply_chat_template(
      [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
      enable_thinking=False)
  decoder, stops = tok.stream_decoder(), StopStrings(["\\nUser:"])
  for token in new_ids:
    print(stops.push(decoder.push(token)), end="")
    if stops.stop is not None:
      break
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import json
import math
import numbers
import operator
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import jinja2.utils
import numpy as np
import tokenizers
import tokenizers.models

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# The tokenizer files of a checkpoint folder, those read here and those
# transformers' other loaders read (vocab.json, merges.txt,
# added_tokens.json): with CHAT_TEMPLATE_DIR and GENERATION_CONFIG_FILE,
# what a re-saved checkpoint should carry along.
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                   SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE,
                   LEGACY_CHAT_TEMPLATE_FILE, "vocab.json", "merges.txt",
                   "added_tokens.json")

# transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token",
                        "pad_token", "cls_token", "mask_token")
# Names a message's reasoning comes under; templates read the first.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# Appended to the final message by `continue_final_message`, then cut off.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REPLACEMENT = "\ufffd"


# --------------------------------------------------------------------------
# Reading files.


def _read_json(path: str) -> dict[str, Any]:
  """A JSON object from `path`; ValueError naming the file otherwise."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: expected a JSON object, could not read it: "
                     f"{e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, found "
                     f"{type(value).__name__}")
  return value


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: could not read it as UTF-8 text: {e}") from e


def _token_string(value: Any, where: str) -> str | None:
  """A special token's text: a string, or an AddedToken dict's content."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{where}: expected a token string or an object with a "
                   f"string 'content', found {value!r}")


def _special_tokens(folder: str, config: dict[str, Any],
                    config_path: str) -> dict[str, str]:
  """The named special tokens, as transformers' `special_tokens_map`.

  Args:
    folder: the checkpoint folder.
    config: tokenizer_config.json's contents ({} when absent).
    config_path: its path, for messages.

  Returns:
    {name: token text} for the standard names that are set, then every other
    `*_token` string of the config and the entries of a dict
    `extra_special_tokens`.
  """
  entries = [(k, v, config_path) for k, v in config.items()]
  map_path = os.path.join(folder, SPECIAL_TOKENS_MAP_FILE)
  if "added_tokens_decoder" not in config and os.path.exists(map_path):
    # transformers' legacy path: these replace the config's values.
    entries += [(k, v, map_path) for k, v in _read_json(map_path).items()]
  named = {}
  extra = {}
  for key, value, path in entries:
    if key in NAMED_SPECIAL_TOKENS:
      named[key] = _token_string(value, f"{path}: {key}")
    elif key == "extra_special_tokens" or key == "additional_special_tokens":
      if isinstance(value, dict):
        for name, token in value.items():
          extra[name] = _token_string(token, f"{path}: {key}.{name}")
    elif key.endswith("_token") and isinstance(value, str):
      extra[key] = value
  tokens = {k: named[k] for k in NAMED_SPECIAL_TOKENS
            if named.get(k) is not None}
  tokens.update({k: v for k, v in extra.items() if v is not None})
  return tokens


def _chat_templates(folder: str, config: dict[str, Any], config_path: str
                    ) -> tuple[dict[str, str], dict[str, str]]:
  """({name: template source}, {name: file it came from})."""
  templates, files = {}, {}
  default_file = os.path.join(folder, CHAT_TEMPLATE_FILE)
  extra_dir = os.path.join(folder, CHAT_TEMPLATE_DIR)
  if os.path.isfile(default_file):
    templates["default"] = _read_text(default_file)
    files["default"] = default_file
  if os.path.isdir(extra_dir):
    for name in sorted(os.listdir(extra_dir)):
      if name.endswith(".jinja"):
        path = os.path.join(extra_dir, name)
        templates[name[:-len(".jinja")]] = _read_text(path)
        files[name[:-len(".jinja")]] = path
  if templates:
    return templates, files
  value = config.get("chat_template")
  if isinstance(value, str):
    return {"default": value}, {"default": config_path}
  if isinstance(value, list):
    for i, entry in enumerate(value):
      if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
              and isinstance(entry.get("template"), str)):
        raise ValueError(f"{config_path}: chat_template[{i}]: expected "
                         f"{{'name': str, 'template': str}}, found {entry!r}")
      templates[entry["name"]] = entry["template"]
      files[entry["name"]] = config_path
    return templates, files
  if value is not None:
    raise ValueError(f"{config_path}: chat_template: expected a string or a "
                     f"list of {{'name', 'template'}}, found "
                     f"{type(value).__name__}")
  legacy = os.path.join(folder, LEGACY_CHAT_TEMPLATE_FILE)
  if os.path.exists(legacy):
    value = _read_json(legacy).get("chat_template")
    if not isinstance(value, str):
      raise ValueError(f"{legacy}: chat_template: expected a string, found "
                       f"{type(value).__name__}")
    return {"default": value}, {"default": legacy}
  return {}, {}


# --------------------------------------------------------------------------
# The template environment.


# (opening, closing) strings put around each `{% generation %}` block's
# output while `generation_marks` is active; None renders the body alone.
_GENERATION_MARKS: contextvars.ContextVar[tuple[str, str] | None] = (
    contextvars.ContextVar("generation_marks", default=None))


@contextlib.contextmanager
def generation_marks(opening: str, closing: str) -> Iterator[None]:
  """While active, templates render `{% generation %}` blocks between
  `opening` and `closing` (to find the assistant text a template marks;
  `qwen_jax.finetune_data` uses it for training masks)."""
  token = _GENERATION_MARKS.set((opening, closing))
  try:
    yield
  finally:
    _GENERATION_MARKS.reset(token)


def has_generation_blocks(source: str) -> bool:
  """Whether a template source uses `{% generation %}` blocks."""
  return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`, rendered as its body.

  transformers uses the block to mark assistant tokens for training masks
  (`return_assistant_tokens_mask`); here it renders its body, between the
  marks of `generation_marks` when that is active.
  """
  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    call = self.call_method("_render_body")
    return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

  def _render_body(self, caller: Any) -> str:
    marks = _GENERATION_MARKS.get()
    if marks is None:
      return caller()
    return marks[0] + caller() + marks[1]


class _TemplateNamespace(jinja2.utils.Namespace):
  """`namespace()` that refuses attribute names starting with "_"."""

  def __init__(*args: Any, **kwargs: Any):  # pylint: disable=no-method-argument
    # Jinja's own signature: `self` may also be an attribute name.
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"a template may not set the attribute {name!r} on a namespace")


class _TemplateDict:
  """`dict(...)` and `dict.fromkeys(...)` without the type itself."""

  def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)

  def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict.fromkeys(*args, **kwargs)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None,
            separators: Any = None, sort_keys: bool = False) -> str:
  # Jinja's own filter escapes <, >, & and ' for HTML; chat text must not be.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  """A fresh sandboxed environment, configured as transformers' is."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  return env


def _plain(value: Any) -> Any:
  """`value` rebuilt from JSON types, tuples and placeholders.

  The sandbox does not know which methods of arbitrary objects are unsafe, so
  the template only ever sees fresh dicts, lists, tuples, strings, numbers,
  booleans and None; anything else becomes the string "<TypeName>".
  """
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, bool):
    return bool(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if isinstance(value, np.generic):
    return _plain(value.item())
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)}
  if callable(getattr(value, "model_dump", None)):  # pydantic models
    return _plain(value.model_dump())
  return f"<{type(value).__name__}>"


def _messages(messages: Any) -> list[dict[str, Any]]:
  """Plain message dicts: None-valued keys dropped, reasoning aliased."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"messages: expected a non-empty list of message dicts, "
                     f"found {messages!r}")
  out = []
  for i, message in enumerate(messages):
    plain = _plain(message)
    if not isinstance(plain, dict):
      raise ValueError(f"messages[{i}]: expected a dict (or a dataclass or "
                       f"pydantic message), found {type(message).__name__}")
    plain = {k: v for k, v in plain.items() if v is not None}
    reasoning = next((plain[k] for k in _REASONING_KEYS if k in plain), None)
    if reasoning is not None:
      plain = {"thinking": reasoning, **plain,
               "reasoning_content": reasoning}
    out.append(plain)
  return out


def _tool_schemas(tools: Any) -> list[Any] | None:
  if tools is None:
    return None
  if not isinstance(tools, (list, tuple)):
    raise ValueError(f"tools: expected a list of JSON-schema dicts, found "
                     f"{type(tools).__name__}")
  for i, tool in enumerate(tools):
    if not isinstance(tool, Mapping):
      raise ValueError(
          f"tools[{i}]: expected a JSON-schema dict, found "
          f"{type(tool).__name__} (transformers.utils.get_json_schema turns "
          f"a documented function into one)")
  return _plain(list(tools))


# --------------------------------------------------------------------------
# The tokenizer.


def _ids_list(ids: Any, name: str) -> list[int]:
  """Token ids as Python ints (NumPy and JAX arrays and scalars accepted)."""
  if not isinstance(ids, (list, tuple)) and hasattr(ids, "__array__"):
    array = np.asarray(ids)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{name}: expected a 1-D array of integer ids, found "
                       f"shape {array.shape} dtype {array.dtype}")
    ids = array.tolist()
  out = []
  for i in ids:
    try:
      value = operator.index(i)  # ints, NumPy ints, 0-d integer arrays
    except TypeError:
      value = None
    if isinstance(i, bool) or value is None or value < 0:
      raise ValueError(f"{name}: expected token ids (ints >= 0), found "
                       f"{i!r}")
    out.append(value)
  return out


def _clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization`: no space before punctuation."""
  for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","),
                        (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                        (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
    text = text.replace(before, after)
  return text


class Tokenizer:
  """A checkpoint's tokenizer; build it with `load_tokenizer(folder)`.

  Attributes:
    path: the folder it was read from.
    backend: the `tokenizers.Tokenizer` read from tokenizer.json.
    special_tokens: {name: token text} of the named special tokens
      (`eos_token`, `pad_token`, ...), which the chat template also sees.
    added_tokens: {id: text} of tokenizer.json's added tokens.
    special_ids: the ids of the added tokens marked special (the ones
      `decode(..., skip_special_tokens=True)` drops).
    vocab_size: one more than the largest token id, added tokens included
      (transformers' `len(tokenizer)`; its `vocab_size` leaves out added
      tokens). A model's embedding table may be larger.
    chat_templates: {name: Jinja source}; "default" is the usual one.
    chat_template: the default template's source, or None.
  """

  def __init__(self, path: str, backend: tokenizers.Tokenizer,
               special_tokens: dict[str, str], chat_templates: dict[str, str],
               template_files: dict[str, str], clean_up_spaces: bool):
    self.path = path
    self.backend = backend
    self.special_tokens = dict(special_tokens)
    added = backend.get_added_tokens_decoder()
    self.added_tokens = {i: t.content for i, t in sorted(added.items())}
    self.special_ids = frozenset(i for i, t in added.items() if t.special)
    vocab = backend.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values(), default=-1) + 1
    self.chat_templates = dict(chat_templates)
    self.chat_template = self.chat_templates.get("default")
    self._template_files = dict(template_files)
    self._clean_up_spaces = clean_up_spaces
    # One environment per tokenizer: templates are compiled once, here, so a
    # syntax error shows at load time.
    env = _environment()
    self._compiled = {}
    for name, source in self.chat_templates.items():
      try:
        self._compiled[name] = env.from_string(source)
      except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{template_files[name]}: chat template {name!r} is "
                         f"not valid Jinja (line {e.lineno}): {e.message}"
                         ) from e

  def __repr__(self) -> str:
    return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"special_tokens={self.special_tokens}, "
            f"chat_templates={sorted(self.chat_templates)})")

  # Special tokens and ids.

  def token_to_id(self, token: str) -> int | None:
    """The id of `token` (a vocabulary entry or added token), or None."""
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    """The vocabulary entry of `token_id`, or None."""
    return self.backend.id_to_token(int(token_id))

  def _named_id(self, name: str) -> int | None:
    token = self.special_tokens.get(name)
    return None if token is None else self.backend.token_to_id(token)

  @property
  def bos_token(self) -> str | None:
    return self.special_tokens.get("bos_token")

  @property
  def eos_token(self) -> str | None:
    return self.special_tokens.get("eos_token")

  @property
  def pad_token(self) -> str | None:
    return self.special_tokens.get("pad_token")

  @property
  def unk_token(self) -> str | None:
    return self.special_tokens.get("unk_token")

  @property
  def bos_token_id(self) -> int | None:
    return self._named_id("bos_token")

  @property
  def eos_token_id(self) -> int | None:
    return self._named_id("eos_token")

  @property
  def pad_token_id(self) -> int | None:
    return self._named_id("pad_token")

  @property
  def unk_token_id(self) -> int | None:
    return self._named_id("unk_token")

  # Text <-> ids.

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`.

    Added tokens written in the text (e.g. "<|im_end|>") become their ids,
    unless tokenizer_config.json sets `split_special_tokens`.

    Args:
      text: the text.
      add_special_tokens: run tokenizer.json's post-processor (a BOS or EOS
        it adds; Qwen's adds none), as transformers' `encode` does by
        default.

    Returns:
      The ids.
    """
    if not isinstance(text, str):
      raise ValueError(f"text: expected a str, found {type(text).__name__}")
    return self.backend.encode(text,
                               add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False
             ) -> str:
    """The text of `ids` (bytes that are not valid UTF-8 become U+FFFD).

    Args:
      ids: token ids (a list, or a 1-D integer array). Ids the tokenizer does
        not know decode to nothing, as in `tokenizers` and transformers.
      skip_special_tokens: leave out the added tokens marked special.

    Returns:
      The text.
    """
    ids = _ids_list(ids, "ids")
    text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
    if self._clean_up_spaces:
      text = _clean_up_tokenization(text)
    return text

  def stream_decoder(self, skip_special_tokens: bool = False
                     ) -> StreamDecoder:
    """A `StreamDecoder` over this tokenizer."""
    return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

  # Chat.

  def get_chat_template(self, chat_template: str | None = None,
                        tools: Any = None) -> str:
    """The template source `apply_chat_template` would use.

    Args:
      chat_template: None (the checkpoint's), a template name, or a template
        source.
      tools: with several templates, `tool_use` is picked when tools are
        given and it exists.

    Returns:
      The source.
    """
    return self._pick_template(chat_template, tools)[0]

  def _pick_template(self, chat_template: str | None, tools: Any
                     ) -> tuple[str, jinja2.Template, str]:
    """(source, compiled, where it came from)."""
    if chat_template is not None:
      if chat_template in self._compiled:
        name = chat_template
      else:
        try:
          compiled = _environment().from_string(chat_template)
        except jinja2.TemplateSyntaxError as e:
          raise ValueError(f"chat_template: not valid Jinja (line "
                           f"{e.lineno}): {e.message}") from e
        return chat_template, compiled, "the chat_template argument"
    elif tools is not None and "tool_use" in self._compiled:
      name = "tool_use"
    elif "default" in self._compiled:
      name = "default"
    elif not self._compiled:
      raise ValueError(
          f"{self.path}: no chat template: expected one in "
          f"{CHAT_TEMPLATE_FILE}, {TOKENIZER_CONFIG_FILE} (chat_template) "
          f"or {LEGACY_CHAT_TEMPLATE_FILE}; pass chat_template= to use one")
    else:
      raise ValueError(
          f"{self.path}: several chat templates and none named 'default': "
          f"pass chat_template= one of {sorted(self._compiled)}")
    where = f"{self._template_files[name]} (chat template {name!r})"
    return self.chat_templates[name], self._compiled[name], where

  def apply_chat_template(
      self, messages: Sequence[Mapping[str, Any]],
      add_generation_prompt: bool = False, tokenize: bool = True,
      tools: Sequence[Mapping[str, Any]] | None = None, *,
      documents: Sequence[Mapping[str, Any]] | None = None,
      chat_template: str | None = None,
      continue_final_message: bool | str = False,
      **template_kwargs: Any) -> list[int] | str:
    """Renders a conversation with the chat template; encodes it.

    The arguments mean what they mean in transformers' `apply_chat_template`
    (one conversation, not a batch; no padding or truncation).

    Args:
      messages: the conversation: dicts (or dataclasses, pydantic models)
        with "role" and usually "content"; assistant messages may carry
        "reasoning_content" and "tool_calls".
      add_generation_prompt: end with the opening of an assistant turn.
      tokenize: return ids (the rendered text encoded without the
        post-processor, as transformers does); False returns the text.
      tools: JSON-schema tool definitions the template lists.
      documents: retrieval documents, for templates that read them.
      chat_template: a template name or source instead of the checkpoint's.
      continue_final_message: leave the final message open so the model
        continues it (True: its "content"; a string: that field); not with
        add_generation_prompt.
      **template_kwargs: more template variables, e.g. enable_thinking=False;
        they override the special tokens of the same name.

    Returns:
      The ids, or the text when tokenize is False.

    Raises:
      ValueError: bad messages or tools, no template, or a template that
        fails (its file is named).
    """
    if continue_final_message and add_generation_prompt:
      raise ValueError("continue_final_message and add_generation_prompt: "
                       "expected at most one to be set, found both")
    source, compiled, where = self._pick_template(chat_template, tools)
    chat = _messages(messages)
    variables = _plain({**self.special_tokens, **template_kwargs})
    variables.update(messages=chat, tools=_tool_schemas(tools),
                     documents=_plain(documents),
                     add_generation_prompt=add_generation_prompt)
    final = None
    if continue_final_message:
      final = _tag_final_message(chat, continue_final_message, source)
    try:
      text = compiled.render(**variables)
    except Exception as e:  # pylint: disable=broad-except
      # A template's own errors (raise_exception), undefined names, sandbox
      # refusals and Python errors on unexpected message shapes all mean
      # input the template does not accept.
      raise ValueError(f"{where}: rendering failed: "
                       f"{type(e).__name__}: {e}") from e
    if final is not None:
      text = _cut_at_tag(text, final, where)
    if not tokenize:
      return text
    return self.backend.encode(text, add_special_tokens=False).ids


def _tag_final_message(chat: list[dict[str, Any]], field: bool | str,
                       source: str) -> str:
  """Appends the continue tag to the final message; returns its text."""
  field = field if isinstance(field, str) else "content"
  last = chat[-1]
  final = last.get(field)
  if final is None:
    raise ValueError(f"continue_final_message: the final message has no "
                     f"{field!r} to continue")
  fields = [field]
  if field in _REASONING_KEYS:
    # Reasoning was copied under several names; tag each copy.
    fields = [k for k in _REASONING_KEYS if last.get(k) == final]
  if not any(k in source for k in fields):
    raise ValueError(f"continue_final_message: the chat template never reads "
                     f"{field!r}")
  if isinstance(final, (list, tuple)):
    for block in reversed(final):
      if isinstance(block, dict) and "text" in block:
        final = block["text"]
        block["text"] = block["text"] + _CONTINUE_TAG
        return final
    raise ValueError("continue_final_message: the final message has no text "
                     "block to continue")
  for k in fields:
    last[k] = last[k] + _CONTINUE_TAG
  return final


def _cut_at_tag(text: str, final: str, where: str) -> str:
  """The rendered text up to where the final message's tag was."""
  tag = _CONTINUE_TAG.strip()
  if final.strip() not in text or tag not in text:
    raise ValueError(f"{where}: continue_final_message: the final message "
                     f"does not appear in the rendered chat")
  at = text.rindex(tag)
  if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
    return text[:at]
  # The template trimmed the message's trailing space; trim the cut too.
  return text[:at].rstrip()


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
  """Reads a checkpoint folder's tokenizer (see the module docstring).

  Args:
    path: a folder with tokenizer.json and, optionally, tokenizer_config.json,
      special_tokens_map.json, chat_template.jinja,
      additional_chat_templates/*.jinja or chat_template.json.

  Returns:
    The tokenizer.

  Raises:
    ValueError: a missing folder or tokenizer.json, a file that is not valid
      JSON (or Jinja), or a special token that is not in the vocabulary; the
      message names the file.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"path: expected a checkpoint folder, found {path!r}")
  tok_path = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(tok_path):
    raise ValueError(f"{path}: expected {TOKENIZER_FILE}, found "
                     f"{sorted(os.listdir(path))}")
  try:
    backend = tokenizers.Tokenizer.from_file(tok_path)
  except Exception as e:  # pylint: disable=broad-except
    # The Rust side raises plain Exceptions for JSON and schema errors.
    raise ValueError(f"{tok_path}: not a valid tokenizers file: {e}") from e
  config_path = os.path.join(path, TOKENIZER_CONFIG_FILE)
  config = _read_json(config_path) if os.path.exists(config_path) else {}
  special = _special_tokens(path, config, config_path)
  # The tokens generation relies on must exist (transformers would add them
  # as new tokens, which the model has no embeddings for).
  for name in ("bos_token", "eos_token", "pad_token"):
    token = special.get(name)
    if token is not None and backend.token_to_id(token) is None:
      raise ValueError(f"{config_path}: {name}: expected a token of "
                       f"{TOKENIZER_FILE}, found {token!r}, which it lacks")
  flags = {}
  for key in ("split_special_tokens", "clean_up_tokenization_spaces",
              "clean_up_tokenization_spaces_for_bpe_even_though_it_will_"
              "corrupt_output"):
    value = config.get(key, False)
    if not isinstance(value, bool):
      raise ValueError(f"{config_path}: {key}: expected true or false, "
                       f"found {value!r}")
    flags[key] = value
  backend.encode_special_tokens = flags["split_special_tokens"]
  # transformers skips the clean-up for BPE models unless forced: it eats
  # real spaces before punctuation.
  is_bpe = isinstance(backend.model, tokenizers.models.BPE)
  clean_up = flags["clean_up_tokenization_spaces"] and (
      not is_bpe or flags["clean_up_tokenization_spaces_for_bpe_even_though_"
                          "it_will_corrupt_output"])
  templates, files = _chat_templates(path, config, config_path)
  return Tokenizer(path, backend, special, templates, files, clean_up)


# --------------------------------------------------------------------------
# Streaming.


class StreamDecoder:
  """Turns token ids, fed one at a time, into text pieces.

  A piece never ends inside a multi-byte character: while the text decoded
  so far ends in U+FFFD (bytes of a character still incomplete), it is held
  back until a later token completes it (or `flush` gives it up as is). The
  pieces, followed by `flush()`, concatenate to `decode(all ids)`: always for
  byte-level BPE (Qwen's), where text decodes the same in parts split at
  character boundaries; for SentencePiece-style byte fallback whenever the
  bytes are valid UTF-8 (there an invalid run of byte tokens becomes one
  U+FFFD per byte, the valid ones included, which shows only once the run
  ends).

  Each step decodes only the ids since the last piece was emitted, plus the
  ids of that piece as context (so decoders that treat the first token
  specially, like SentencePiece's leading space, decode consistently), not
  the whole sequence.

  Attributes:
    ids: every id pushed so far.
    text: the text emitted so far.
  """

  def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
    self._tokenizer = tokenizer
    self._skip = skip_special_tokens
    self.ids: list[int] = []
    self._pieces: list[str] = []
    self._start = 0  # the context window starts here
    self._read = 0  # ids before this have been emitted

  @property
  def text(self) -> str:
    return "".join(self._pieces)

  def _decode(self, ids: list[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

  def push(self, token_id: int) -> str:
    """Adds one id; returns the new text that is complete ("" if none)."""
    self.ids.extend(_ids_list([token_id], "token_id"))
    before = self._decode(self.ids[self._start:self._read])
    after = self._decode(self.ids[self._start:])
    if (len(after) <= len(before) or after.endswith(_REPLACEMENT)
        or not after.startswith(before)):
      return ""
    piece = after[len(before):]
    self._start, self._read = self._read, len(self.ids)
    self._pieces.append(piece)
    return piece

  def extend(self, token_ids: Iterable[int]) -> str:
    """Adds several ids; returns the new complete text."""
    return "".join(self.push(i) for i in _ids_list(token_ids, "token_ids"))

  def flush(self) -> str:
    """The text still held back (it may end in U+FFFD); call at the end."""
    full = self._decode(self.ids)
    emitted = self.text
    if full.startswith(emitted):
      rest = full[len(emitted):]
    else:  # Not expected; keep the concatenation as close as possible.
      rest = self._decode(self.ids[self._read:])
    self._start = self._read = len(self.ids)
    if rest:
      self._pieces.append(rest)
    return rest


@dataclasses.dataclass(frozen=True)
class StopScan:
  """What `find_stop` found.

  Attributes:
    emit_end: `text[:emit_end]` can be shown: with a stop, where it starts;
      without, the start of the longest tail that could still grow into
      one (or len(text)).
    stop: the stop string found at emit_end, or None.
  """
  emit_end: int
  stop: str | None


def _check_stops(stop_strings: Any) -> tuple[str, ...]:
  if isinstance(stop_strings, str) or not isinstance(
      stop_strings, (list, tuple)):
    raise ValueError(f"stop_strings: expected a list of strings, found "
                     f"{stop_strings!r}")
  for s in stop_strings:
    if not isinstance(s, str) or not s:
      raise ValueError(f"stop_strings: expected non-empty strings, found "
                       f"{s!r}")
  return tuple(stop_strings)


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0
              ) -> StopScan:
  """The earliest stop string in `text[start:]`, and how much to show.

  Args:
    text: all the text generated so far.
    stop_strings: the stop strings.
    start: where to look from (the caller showed `text[:start]`, which held
      no stop string nor the start of one; see `StopStrings`).

  Returns:
    The earliest stop (ties: the longest, since it ends last) and the end of
    the safe text.
  """
  stops = _check_stops(stop_strings)
  best, best_stop = None, None
  for s in stops:
    at = text.find(s, start)
    if at >= 0 and (best is None or at < best
                    or (at == best and len(s) > len(best_stop))):
      best, best_stop = at, s
  if best is not None:
    return StopScan(best, best_stop)
  # Hold back the longest tail that is a proper prefix of some stop string.
  hold = 0
  for s in stops:
    for n in range(min(len(s) - 1, len(text) - start), hold, -1):
      if text.endswith(s[:n]):
        hold = n
        break
  return StopScan(len(text) - hold, None)


class StopStrings:
  """Cuts streamed text at the first stop string, across piece boundaries.

  Feed it the pieces a `StreamDecoder` returns; it returns the part that can
  be shown: text that might be the start of a stop string is held until the
  next pieces show whether it is. After a stop, `stop` names it and
  everything from it on is dropped.

  Attributes:
    stop: the stop string that ended the text, or None.
    text: all text pushed so far (up to and including the stop).
  """

  def __init__(self, stop_strings: Sequence[str]):
    self._stops = _check_stops(stop_strings)
    self.text = ""
    self._shown = 0
    self.stop: str | None = None

  def push(self, piece: str) -> str:
    """Adds a piece; returns the newly showable text."""
    if self.stop is not None:
      return ""
    self.text += piece
    scan = find_stop(self.text, self._stops, self._shown)
    out = self.text[self._shown:scan.emit_end]
    self._shown = scan.emit_end
    if scan.stop is not None:
      self.stop = scan.stop
      self.text = self.text[:scan.emit_end + len(scan.stop)]
    return out

  def flush(self) -> str:
    """At the end: the held text, when no stop came."""
    if self.stop is not None:
      return ""
    out = self.text[self._shown:]
    self._shown = len(self.text)
    return out


# --------------------------------------------------------------------------
# Generation defaults.


def _is_number(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# field: (check, expected) for the optional scalar fields.
_GENERATION_CHECKS = {
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0,
                           "a number > 0"),
    "presence_penalty": (_is_number, "a finite number"),
    "pad_token_id": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "bos_token_id": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """A checkpoint's generation defaults; None (or ()) means not set.

  Field meanings are transformers' `GenerationConfig`'s: `do_sample` False
  means greedy whatever the temperature; `top_k` 0 and `top_p` 1 keep every
  token; `min_p` drops tokens less likely than min_p times the most likely
  one; `repetition_penalty` divides the positive logits (multiplies the
  negative ones) of tokens already seen; `presence_penalty` is subtracted
  once from the logits of tokens already generated.

  Attributes:
    do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
    presence_penalty, pad_token_id, bos_token_id, max_new_tokens: as above.
    eos_token_id: the ids that end generation.
  """
  do_sample: bool | None = None
  temperature: float | None = None
  top_k: int | None = None
  top_p: float | None = None
  min_p: float | None = None
  repetition_penalty: float | None = None
  presence_penalty: float | None = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  max_new_tokens: int | None = None

  def __post_init__(self):
    for name, (check, expected) in _GENERATION_CHECKS.items():
      value = getattr(self, name)
      if value is not None and not check(value):
        raise ValueError(f"{name}: expected {expected}, found {value!r}")
    eos = self.eos_token_id
    if _is_int(eos):
      eos = (eos,)
    if not isinstance(eos, (list, tuple)) or not all(
        _is_int(i) and i >= 0 for i in eos):
      raise ValueError(f"eos_token_id: expected an integer >= 0 or a list "
                       f"of them, found {self.eos_token_id!r}")
    object.__setattr__(self, "eos_token_id", tuple(int(i) for i in eos))

  def replace(self, **overrides: Any) -> GenerationConfig:
    """A copy with the fields given (None leaves a field as it is)."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f"overrides: expected GenerationConfig fields, found "
                       f"{sorted(unknown)}")
    return dataclasses.replace(
        self, **{k: v for k, v in overrides.items() if v is not None})


def load_generation_config(path: str | os.PathLike[str]) -> GenerationConfig:
  """Reads generation_config.json from a checkpoint folder.

  Args:
    path: the folder (or the file itself).

  Returns:
    Its defaults; every field unset when the folder has no such file. Keys
    other than the dataclass's fields are ignored; null means unset.

  Raises:
    ValueError: a file that is not a JSON object or a field of the wrong
      type or range (the message names the file and the field).
  """
  path = os.fspath(path)
  file = (os.path.join(path, GENERATION_CONFIG_FILE) if os.path.isdir(path)
          else path)
  if not os.path.exists(file):
    if os.path.isdir(path):
      return GenerationConfig()
    raise ValueError(f"path: expected a checkpoint folder or "
                     f"{GENERATION_CONFIG_FILE}, found {path!r}")
  raw = _read_json(file)
  names = {f.name for f in dataclasses.fields(GenerationConfig)}
  values = {k: v for k, v in raw.items() if k in names and v is not None}
  try:
    return GenerationConfig(**values)
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from e
