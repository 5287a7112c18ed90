"""A user's corpus for fine-tuning: read, check, tokenize, pack, batch.

Input (`config.data.path`): one file or a folder of files (searched
recursively, in sorted order; hidden entries skipped):

  *.jsonl   one JSON object per line (blank lines skipped), either
            {"text": "..."} (a document) or {"messages": [{"role": ...,
            "content": ...}, ...]} (a conversation; optional "tools": the
            tool schemas the template lists). Content is text (a string,
            or a list of text parts as chat APIs write it); a conversation
            with an image or video part is refused.
  *.txt, *.md, *.text  plain UTF-8 text, one document per file. A single
            file given by path is read as text whatever its name, unless
            it ends in .jsonl.

Every line is checked as it is read; a bad one stops the read with one
ValueError naming `file:line` (invalid JSON, neither "text" nor
"messages", a message without a "role" string, a conversation without an
assistant message, a template that fails on it), and an empty corpus or a
missing path is refused before anything else happens. `prepare_corpus`
does all of this before any model weight is loaded.

Tokens come from the checkpoint's own tokenizer (`qwen_jax.tokenizer`):
text documents are encoded as they are (no special tokens added) followed
by the tokenizer's EOS token (`append_eos`), and every token of them is
trained on. Conversations are rendered with the checkpoint's chat template
and trained on their assistant tokens only, found by rendering, never by
guessing token ids:

  * When the template marks assistant text with `{% generation %}` blocks
    (transformers' `return_assistant_tokens_mask` convention), the
    conversation is rendered once and the marked text is trained.
  * Otherwise, for each assistant message i, with
    P = render(messages[:i], add_generation_prompt=True) and
    Q = render(messages[:i + 1]), the message's text is Q[len(P):], which
    requires P to be a prefix of Q: what the model has to produce after
    the generation prompt, through the template's end-of-turn text (for
    Qwen's template: the content, `<|im_end|>` and the newline after it).
    A conversation is one document, rendered through its last assistant
    message, when every earlier assistant message's P and Q are prefixes of
    that rendering. Templates that render a message differently once later
    messages follow (Qwen3's drops the reasoning block of turns before the
    last user message) break that for some messages: each such message
    starts a document of its own, rendered through it, so every assistant
    message is trained exactly as the model generates it. Messages after
    the last assistant message carry no loss and are left out.

A token is trained when any of its characters lies in such text (the
tokenizer's offsets); the loss mask then holds at the positions whose
*target* is a trained token.

The token cache: the corpus is read once, file by file and line by line
(the text is never held whole), tokenized in batches and appended to flat
memory-mapped files under `<workdir>/data/<key>/` (tokens uint32, the
trained flag uint8, document offsets), with the SHA-256 of the input bytes.
The key hashes the files' paths, sizes and modification times, the
tokenizer's files and the options, so a rerun or resume reuses the cache
and a changed input builds a new one. The cache is written in a hidden
folder and renamed when complete.

Batches (`PackedData.batch`) are a pure function of (corpus, seed, step),
which is what the training loop's bit-exact resume needs: epoch e visits
the training documents in the permutation drawn from (seed, e), packed
next-fit into rows of seq_len + 1 tokens (a document that does not fit the
rest of a row starts the next; one longer than a row is cut into rows of
its own), rows laid out epoch after epoch; step s takes rows s * b ...
(s + 1) * b - 1. Each epoch's packing is computed from the document lengths
alone (no tokens read), so a resume at any step costs one pass over the
lengths per epoch before it, and reads only its rows. Documents never
attend to each other (`segment_ids`) and no loss crosses a boundary.

Why not grain: its packing (`FirstFitPackIterDataset`) is an iterator
whose state must be checkpointed beside the model to resume mid-epoch,
while the loop's contract is a batch that is a pure function of the step
(checkpoints hold only the train state); packing from the lengths gives
random access to any step with no extra state.

Held-out data (`eval_fraction`): whole source records (a conversation
stays on one side even when it became several documents), drawn from
(seed), never trained on; evaluated in order, packed the same way, and the
first few give the prompts of the sampled completions (a conversation's
tokens before its first trained token: system, user and generation prompt;
a text's first half, at most `prompt_tokens`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from qwen_jax import data as data_lib
from qwen_jax import tokenizer as tokenizer_lib

JSONL_EXTENSIONS = (".jsonl",)
TEXT_EXTENSIONS = (".txt", ".md", ".text")
CACHE_FORMAT = "qwen_jax.finetune_cache/1"
# Text documents are read in blocks of about this many characters, cut at
# line ends, and tokenized block by block.
_TEXT_BLOCK = 1 << 20
_ENCODE_BATCH = 256
# Content parts of images and videos (the chat-API and transformers
# spellings), refused in the data.
_MEDIA_PARTS = ("image", "video", "image_url", "video_url")
# Private-use characters that bracket `{% generation %}` output.
_OPEN, _CLOSE = "\ue000", "\ue001"


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """How a corpus is tokenized and split (part of the cache key).

  Attributes:
    append_eos: end each text document with the tokenizer's EOS token.
    eval_fraction: share of the source records held out (0 = none).
    seed: draws the held-out records and the epochs' orders.
  """
  append_eos: bool = True
  eval_fraction: float = 0.05
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.append_eos, (bool, np.bool_)):
      raise ValueError(f"config.data.append_eos: expected a bool, found "
                       f"{self.append_eos!r}")
    f = self.eval_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not (
        0 <= f <= 0.5):
      raise ValueError(f"config.data.eval_fraction: expected a number in "
                       f"[0, 0.5], found {f!r}")
    if (isinstance(self.seed, bool) or not isinstance(self.seed, int)
        or self.seed < 0):
      raise ValueError(f"config.data.seed: expected an int >= 0, found "
                       f"{self.seed!r}")


# ------------------------------------------------------------------ files
def find_files(path: str) -> list[tuple[str, str]]:
  """[(file, "jsonl" | "text")] of a file or folder, in a fixed order.

  Raises:
    ValueError: no such path, a folder without data files, or a file in
      the folder of another kind.
  """
  if not path or not os.path.exists(path):
    raise ValueError(f"config.data.path: expected a file or folder of "
                     f"training data, found no such path {path!r}")
  if os.path.isfile(path):
    kind = "jsonl" if path.endswith(JSONL_EXTENSIONS) else "text"
    return [(path, kind)]
  out = []
  for root, dirs, names in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(names):
      if name.startswith("."):
        continue
      full = os.path.join(root, name)
      if name.endswith(JSONL_EXTENSIONS):
        out.append((full, "jsonl"))
      elif name.endswith(TEXT_EXTENSIONS):
        out.append((full, "text"))
      else:
        kinds = ", ".join(JSONL_EXTENSIONS + TEXT_EXTENSIONS)
        raise ValueError(
            f"config.data.path: expected only {kinds} files in {path!r}, "
            f"found {full!r}; move it away or point config.data.path at "
            f"the files")
  out.sort()
  if not out:
    raise ValueError(f"config.data.path: expected .jsonl or .txt files in "
                     f"the folder {path!r}, found none")
  return out


@dataclasses.dataclass
class Record:
  """One source record: a text or a conversation, and where it was read."""
  where: str
  text: str | None = None
  messages: list[dict[str, Any]] | None = None
  tools: list[Any] | None = None


def _check_messages(where: str, messages: Any) -> None:
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: expected \"messages\" to be a non-empty "
                     f"list of {{\"role\", \"content\"}} objects, found "
                     f"{json.dumps(messages)[:80]}")
  roles = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ValueError(f"{where}: messages[{i}]: expected an object with "
                       f"\"role\", found {json.dumps(m)[:80]}")
    role = m.get("role")
    if not isinstance(role, str) or not role:
      raise ValueError(f"{where}: messages[{i}]: expected a \"role\" "
                       f"string, found {json.dumps(role)}")
    roles.append(role)
    content = m.get("content")
    for part in content if isinstance(content, list) else ():
      kind = part.get("type") if isinstance(part, dict) else None
      if kind in _MEDIA_PARTS or (isinstance(part, dict) and any(
          k in part for k in _MEDIA_PARTS)):
        raise ValueError(
            f"{where}: messages[{i}]: expected text content (fine-tuning "
            f"reads no images or videos), found a content part "
            f"{json.dumps(part)[:80]}")
  if "assistant" not in roles:
    raise ValueError(f"{where}: expected at least one assistant message "
                     f"(the loss is on assistant turns), found the roles "
                     f"{roles}")


def _jsonl_records(path: str) -> Iterator[Record]:
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      where = f"{path}:{n}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: expected UTF-8 text, found bytes that "
                         f"are not ({e.reason} at column {e.start + 1})"
                         ) from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{where}: expected a JSON object, found invalid "
                         f"JSON ({e})") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with \"text\" "
                         f"or \"messages\", found a JSON "
                         f"{type(obj).__name__}")
      if "messages" in obj:
        _check_messages(where, obj["messages"])
        tools = obj.get("tools")
        if tools is not None and not isinstance(tools, list):
          raise ValueError(f"{where}: expected \"tools\" to be a list, "
                           f"found {json.dumps(tools)[:80]}")
        yield Record(where, messages=obj["messages"], tools=tools)
      elif "text" in obj:
        if not isinstance(obj["text"], str):
          raise ValueError(f"{where}: expected \"text\" to be a string, "
                           f"found {json.dumps(obj['text'])[:80]}")
        yield Record(where, text=obj["text"])
      else:
        raise ValueError(f"{where}: expected a \"text\" string or a "
                         f"\"messages\" list, found the keys "
                         f"{sorted(obj)}")


def _text_blocks(path: str) -> Iterator[str]:
  """A text file in blocks of about _TEXT_BLOCK characters, cut at lines."""
  try:
    with open(path, encoding="utf-8", newline="") as f:
      block = []
      size = 0
      for line in f:
        block.append(line)
        size += len(line)
        if size >= _TEXT_BLOCK:
          yield "".join(block)
          block, size = [], 0
      if block:
        yield "".join(block)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: expected UTF-8 text, found bytes that are "
                     f"not ({e.reason})") from None


def iter_records(files: Sequence[tuple[str, str]]) -> Iterator[Record]:
  """Every record of the files, checked (text files: one record per file,
  whose `text` is None: read it with `_text_blocks`)."""
  for path, kind in files:
    if kind == "jsonl":
      yield from _jsonl_records(path)
    else:
      yield Record(path)


# ------------------------------------------------------------------ chat
def _render(tok: tokenizer_lib.Tokenizer, where: str,
            messages: Sequence[Mapping[str, Any]], tools: Any,
            add_generation_prompt: bool) -> str:
  try:
    return tok.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt,
        tokenize=False, tools=tools)
  except ValueError as e:
    raise ValueError(f"{where}: the chat template failed on this "
                     f"conversation: {e}") from None


def chat_documents(tok: tokenizer_lib.Tokenizer, messages: Sequence[Any],
                   tools: Any = None, where: str = "messages"
                   ) -> list[tuple[str, list[tuple[int, int]]]]:
  """The documents of a conversation: [(rendered text, trained character
  spans)], by the rule of the module docstring.

  Raises:
    ValueError: naming `where`, for a template that fails, or one whose
      generation prompt does not start the assistant message's rendering.
  """
  source = tok.get_chat_template(tools=tools)
  if tokenizer_lib.has_generation_blocks(source):
    text = json.dumps(list(messages), ensure_ascii=False)
    if _OPEN in text or _CLOSE in text:
      raise ValueError(f"{where}: found the private-use characters U+E000 "
                       f"or U+E001, which mark the template's generation "
                       f"blocks")
    with tokenizer_lib.generation_marks(_OPEN, _CLOSE):
      marked = _render(tok, where, messages, tools, False)
    spans, out, pos, start = [], [], 0, None
    for ch in marked:
      if ch == _OPEN:
        start = pos
      elif ch == _CLOSE:
        if start is not None and pos > start:
          spans.append((start, pos))
        start = None
      else:
        out.append(ch)
        pos += 1
    return [("".join(out), spans)]
  turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
  pieces = []  # (i, P, Q) per assistant message
  for i in turns:
    p = _render(tok, where, messages[:i], tools, True)
    q = _render(tok, where, messages[:i + 1], tools, False)
    if not q.startswith(p):
      raise ValueError(
          f"{where}: messages[{i}]: the chat template's generation prompt "
          f"{p[-40:]!r} does not start its rendering of the assistant "
          f"message ({q[len(p) - 40 if len(p) > 40 else 0:][:80]!r}), so "
          f"the assistant's tokens cannot be found by rendering")
    pieces.append((i, p, q))
  docs = []
  end = len(pieces)
  while end > 0:
    _, _, full = pieces[end - 1]
    members = [end - 1]
    k = end - 2
    while k >= 0:
      _, p, q = pieces[k]
      if not full.startswith(q):
        break
      members.append(k)
      k -= 1
    spans = sorted((len(pieces[j][1]), len(pieces[j][2])) for j in members)
    docs.append((full, [(a, b) for a, b in spans if b > a]))
    end = k + 1
  docs.reverse()
  return docs


def trained_flags(offsets: Sequence[tuple[int, int]],
                  spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """uint8 flag per token: 1 when any of its characters lies in a span."""
  n = len(offsets)
  flags = np.zeros(n, np.uint8)
  if not n or not spans:
    return flags
  off = np.asarray(offsets, np.int64).reshape(n, 2)
  starts, ends = off[:, 0], np.maximum(off[:, 1], off[:, 0] + 1)
  for a, b in spans:
    flags |= ((starts < b) & (ends > a)).astype(np.uint8)
  return flags


# ----------------------------------------------------------------- cache
def _file_stamp(path: str) -> list[Any]:
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def tokenizer_digest(folder: str) -> str:
  """SHA-256 of a checkpoint folder's tokenizer files (in a fixed order)."""
  h = hashlib.sha256()
  names = list(tokenizer_lib.TOKENIZER_FILES)
  tdir = os.path.join(folder, tokenizer_lib.CHAT_TEMPLATE_DIR)
  if os.path.isdir(tdir):
    names += [os.path.join(tokenizer_lib.CHAT_TEMPLATE_DIR, n)
              for n in sorted(os.listdir(tdir))]
  for name in names:
    p = os.path.join(folder, name)
    if os.path.isfile(p):
      h.update(name.encode() + b"\0")
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@dataclasses.dataclass
class Corpus:
  """A tokenized corpus (memory-mapped from its cache folder).

  Attributes:
    folder: the cache folder.
    tokens: uint32 [total] every document's tokens, end to end.
    flags: uint8 [total] 1 where the token is trained.
    offsets: int64 [n + 1] document d is tokens[offsets[d]:offsets[d+1]].
    sources: int64 [n] the source record of each document.
    eval_docs: int64 documents held out (sorted).
    train_docs: int64 documents trained on (sorted).
    meta: the cache's meta.json (counts, sha256 of the input).
  """
  folder: str
  tokens: np.ndarray
  flags: np.ndarray
  offsets: np.ndarray
  sources: np.ndarray
  eval_docs: np.ndarray
  train_docs: np.ndarray
  meta: dict[str, Any]

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1

  def lengths(self, docs: np.ndarray) -> np.ndarray:
    return self.offsets[docs + 1] - self.offsets[docs]

  def document(self, d: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = self.offsets[d], self.offsets[d + 1]
    return np.asarray(self.tokens[a:b]), np.asarray(self.flags[a:b])

  def summary(self) -> dict[str, Any]:
    """What a resume compares (recorded in run_history.json)."""
    keys = ("sha256", "files", "records", "documents", "tokens",
            "trained_tokens", "eval_records", "vocab_size")
    return {k: self.meta[k] for k in keys}


class _Writer:
  """Appends documents to the cache's flat files."""

  def __init__(self, folder: str):
    # pylint: disable=consider-using-with
    self.tok_f = open(os.path.join(folder, "tokens.bin"), "wb")
    self.flag_f = open(os.path.join(folder, "flags.bin"), "wb")
    # pylint: enable=consider-using-with
    self.offsets = [0]
    self.sources: list[int] = []
    self.trained = 0
    self.max_id = -1

  def add(self, ids: np.ndarray, flags: np.ndarray, source: int) -> None:
    ids = np.asarray(ids, np.uint32)
    self.tok_f.write(ids.tobytes())
    self.flag_f.write(np.asarray(flags, np.uint8).tobytes())
    self.offsets.append(self.offsets[-1] + len(ids))
    self.sources.append(source)
    self.trained += int(np.count_nonzero(flags))
    if len(ids):
      self.max_id = max(self.max_id, int(ids.max()))

  def close(self) -> None:
    self.tok_f.close()
    self.flag_f.close()


def _encode(tok: tokenizer_lib.Tokenizer, texts: list[str]):
  return tok.backend.encode_batch(texts, add_special_tokens=False)


def _build(folder: str, files: list[tuple[str, str]],
           tok: tokenizer_lib.Tokenizer, options: DataOptions,
           meta: dict[str, Any]) -> None:
  """Reads, checks and tokenizes the corpus into `folder`."""
  writer = _Writer(folder)
  digest = hashlib.sha256()
  for path, _ in files:
    digest.update(os.path.abspath(path).encode() + b"\0")
  eos = tok.eos_token_id if options.append_eos else None
  if options.append_eos and eos is None:
    raise ValueError(f"config.data.append_eos: the tokenizer of "
                     f"{tok.path!r} has no eos_token; set "
                     f"config.data.append_eos=False")
  pending: list[tuple[str, list[tuple[int, int]], int, bool]] = []

  def flush() -> None:
    if not pending:
      return
    encs = _encode(tok, [t for t, _, _, _ in pending])
    for (_, spans, source, add_eos), enc in zip(pending, encs):
      ids = np.asarray(enc.ids, np.uint32)
      flags = trained_flags(enc.offsets, spans)
      if add_eos and len(ids):
        ids = np.append(ids, np.uint32(eos))
        flags = np.append(flags, np.uint8(1))
      writer.add(ids, flags, source)
    pending.clear()

  records = 0
  try:
    for rec in iter_records(files):
      source = records
      records += 1
      if rec.messages is not None:
        for text, spans in chat_documents(tok, rec.messages, rec.tools,
                                          rec.where):
          pending.append((text, spans, source, False))
        digest.update(json.dumps(
            {"messages": rec.messages, "tools": rec.tools},
            sort_keys=True, ensure_ascii=False).encode() + b"\n")
      elif rec.text is not None:
        pending.append((rec.text, [(0, len(rec.text))], source,
                        eos is not None))
        digest.update(json.dumps(rec.text, ensure_ascii=False).encode()
                      + b"\n")
      else:  # a text file, read block by block
        flush()
        ids: list[int] = []
        for block in _text_blocks(rec.where):
          digest.update(block.encode())
          ids.extend(_encode(tok, [block])[0].ids)
        if eos is not None and ids:
          ids.append(eos)
        writer.add(np.asarray(ids, np.uint32), np.ones(len(ids), np.uint8),
                   source)
      if len(pending) >= _ENCODE_BATCH:
        flush()
    flush()
  finally:
    writer.close()
  if writer.offsets[-1] == 0:
    raise ValueError(f"config.data.path: expected some text to train on, "
                     f"found an empty corpus ({len(files)} files, "
                     f"{records} records, no tokens)")
  if writer.trained == 0:
    raise ValueError(f"config.data.path: expected some tokens to train on, "
                     f"found none in {records} records")
  meta.update(records=records, documents=len(writer.sources),
              tokens=int(writer.offsets[-1]), trained_tokens=writer.trained,
              sha256=digest.hexdigest(), max_token_id=writer.max_id)
  np.save(os.path.join(folder, "offsets.npy"),
          np.asarray(writer.offsets, np.int64))
  np.save(os.path.join(folder, "sources.npy"),
          np.asarray(writer.sources, np.int64))


def _split(sources: np.ndarray, records: int, options: DataOptions
           ) -> tuple[np.ndarray, np.ndarray]:
  """(train documents, eval documents): whole records held out."""
  docs = np.arange(len(sources))
  if options.eval_fraction <= 0:
    return docs, docs[:0]
  if records < 2:
    raise ValueError(f"config.data.eval_fraction: holding out records "
                     f"needs at least 2, found {records}; set "
                     f"config.data.eval_fraction=0 or add data")
  k = min(records - 1, max(1, int(round(options.eval_fraction * records))))
  rng = np.random.default_rng([options.seed, 0xE7A1])
  held = np.zeros(records, bool)
  held[rng.permutation(records)[:k]] = True
  is_eval = held[sources]
  return docs[~is_eval], docs[is_eval]


def prepare_corpus(path: str, tok: tokenizer_lib.Tokenizer, cache_root: str,
                   options: DataOptions = DataOptions(),
                   vocab_size: int | None = None) -> Corpus:
  """Reads, checks and tokenizes `path` (or reuses its cache).

  Args:
    path: a file or folder (see the module docstring).
    tok: the checkpoint's tokenizer.
    cache_root: folder under which the cache goes (`<workdir>/data`).
    options: tokenization and split options.
    vocab_size: the model's vocabulary; token ids must lie below it.

  Returns:
    The Corpus.

  Raises:
    ValueError: one line naming the file (and line) for bad data, an empty
      corpus, ids outside the vocabulary, or too few records to hold some
      out.
  """
  files = find_files(path)
  key_src = {"format": CACHE_FORMAT, "files": [_file_stamp(p) + [k]
                                                for p, k in files],
             "tokenizer": tokenizer_digest(tok.path),
             "options": dataclasses.asdict(options)}
  key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()
                       ).hexdigest()[:20]
  folder = os.path.join(cache_root, key)
  if not os.path.isfile(os.path.join(folder, "meta.json")):
    os.makedirs(cache_root, exist_ok=True)
    tmp = os.path.join(cache_root, f".tmp-{key}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
      meta = {"format": CACHE_FORMAT, "key": key_src,
              "files": len(files), "vocab_size": tok.vocab_size}
      _build(tmp, files, tok, options, meta)
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
      if os.path.exists(folder):  # a cache without meta: an old failure
        shutil.rmtree(folder)
      os.replace(tmp, folder)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return load_corpus(folder, options, vocab_size)


def load_corpus(folder: str, options: DataOptions,
                vocab_size: int | None = None) -> Corpus:
  """The Corpus of a cache folder written by `prepare_corpus`."""
  with open(os.path.join(folder, "meta.json")) as f:
    meta = json.load(f)
  n_tok = meta["tokens"]

  def mm(name, dtype):
    p = os.path.join(folder, name)
    if n_tok == 0:
      return np.zeros(0, dtype)
    return np.memmap(p, dtype=dtype, mode="r", shape=(n_tok,))

  tokens, flags = mm("tokens.bin", np.uint32), mm("flags.bin", np.uint8)
  offsets = np.load(os.path.join(folder, "offsets.npy"))
  sources = np.load(os.path.join(folder, "sources.npy"))
  if vocab_size is not None and meta["max_token_id"] >= vocab_size:
    raise ValueError(
        f"config.data.path: the tokenizer gives ids up to "
        f"{meta['max_token_id']}, expected ids below the model's vocab_size "
        f"{vocab_size}")
  train_docs, eval_docs = _split(sources, meta["records"], options)
  meta = dict(meta, eval_records=int(len(np.unique(sources[eval_docs]))))
  return Corpus(folder, tokens, flags, offsets, sources, eval_docs,
                train_docs, meta)


# ---------------------------------------------------------------- packing
def pack_next_fit(lengths: np.ndarray, row_len: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Next-fit packing of documents (in the given order) into rows.

  Returns:
    (row, index into `lengths`, start token in the document, tokens) of
    every piece, and the number of rows. A document that does not fit the
    rest of the current row starts a new one; one longer than a row is
    cut into pieces of `row_len` (each starting a row), its last piece
    packed as a document.
  """
  rows, docs, starts, sizes = [], [], [], []
  row, used = 0, 0
  for i, n in enumerate(lengths.tolist()):
    s = 0
    while n - s > 0:
      take = min(n - s, row_len)
      if used + take > row_len:
        row, used = row + 1, 0
      rows.append(row)
      docs.append(i)
      starts.append(s)
      sizes.append(take)
      used += take
      s += take
  num_rows = row + 1 if used else row
  return (np.asarray(rows, np.int64), np.asarray(docs, np.int64),
          np.asarray(starts, np.int64), np.asarray(sizes, np.int64),
          max(num_rows, 0))


@dataclasses.dataclass
class _Packing:
  docs: np.ndarray      # corpus document ids in packing order
  rows: np.ndarray      # per piece
  pieces: np.ndarray    # per piece: index into docs
  starts: np.ndarray
  sizes: np.ndarray
  num_rows: int
  first_piece: np.ndarray  # per row: its first piece


def _packing(corpus: Corpus, docs: np.ndarray, row_len: int) -> _Packing:
  rows, idx, starts, sizes, n = pack_next_fit(corpus.lengths(docs), row_len)
  first = np.searchsorted(rows, np.arange(n + 1))
  return _Packing(docs, rows, idx, starts, sizes, n, first)


def _rows(corpus: Corpus, packing: _Packing, which: Sequence[int],
          row_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, segment ids, flags) [len(which), row_len] of packed rows."""
  k = len(which)
  tokens = np.zeros((k, row_len), np.int32)
  seg = np.zeros((k, row_len), np.int32)
  flags = np.zeros((k, row_len), np.uint8)
  for out_row, r in enumerate(which):
    pos = 0
    for j, p in enumerate(range(packing.first_piece[r],
                                packing.first_piece[r + 1])):
      d = packing.docs[packing.pieces[p]]
      a = corpus.offsets[d] + packing.starts[p]
      n = packing.sizes[p]
      tokens[out_row, pos:pos + n] = corpus.tokens[a:a + n]
      flags[out_row, pos:pos + n] = corpus.flags[a:a + n]
      seg[out_row, pos:pos + n] = j + 1
      pos += n
  return tokens, seg, flags


def batch_from_rows(tokens: np.ndarray, seg: np.ndarray,
                    flags: np.ndarray) -> data_lib.Batch:
  """The training batch of packed rows of seq_len + 1 tokens: the loss at
  position t when token t + 1 is trained and in t's document."""
  batch = data_lib.lm_batch_from_rows(tokens, seg)
  batch["loss_mask"] = batch["loss_mask"] * flags[:, 1:].astype(np.float32)
  return batch


class PackedData:
  """Training batches of a Corpus: `batch(step)`, a pure function of
  (corpus, seed, step); see the module docstring.

  Attributes:
    corpus: the Corpus.
    seq_len: tokens per row of inputs.
    batch_size: rows per batch.
    seed: the epochs' orders.
  """

  def __init__(self, corpus: Corpus, seq_len: int, batch_size: int,
               seed: int = 0):
    if len(corpus.train_docs) == 0:
      raise ValueError("config.data: expected documents to train on, found "
                       "every document held out")
    self.corpus, self.seq_len = corpus, seq_len
    self.batch_size, self.seed = batch_size, seed
    self._row_counts: list[int] = []
    self._cache: tuple[int, _Packing] | None = None

  def _epoch(self, e: int) -> _Packing:
    if self._cache is not None and self._cache[0] == e:
      return self._cache[1]
    order = np.random.default_rng([self.seed, 0x5046, e]).permutation(
        self.corpus.train_docs)
    packing = _packing(self.corpus, order, self.seq_len + 1)
    self._cache = (e, packing)
    return packing

  def _rows_in(self, e: int) -> int:
    while len(self._row_counts) <= e:
      self._row_counts.append(self._epoch(len(self._row_counts)).num_rows)
    return self._row_counts[e]

  def rows_per_epoch(self, epoch: int = 0) -> int:
    return self._rows_in(epoch)

  def locate(self, row: int) -> tuple[int, int]:
    """(epoch, row in the epoch) of a global row index."""
    e = 0
    while row >= self._rows_in(e):
      row -= self._rows_in(e)
      e += 1
    return e, row

  def batch(self, step: int) -> data_lib.Batch:
    """The batch of `step`: global rows step * b ... step * b + b - 1."""
    parts = []
    for g in range(step * self.batch_size, (step + 1) * self.batch_size):
      e, r = self.locate(g)
      parts.append(_rows(self.corpus, self._epoch(e), [r], self.seq_len + 1))
    tokens, seg, flags = (np.concatenate(x) for x in zip(*parts))
    return batch_from_rows(tokens, seg, flags)


def eval_batches(corpus: Corpus, seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> list[data_lib.Batch]:
  """The held-out documents in order, packed, in batches (the last padded
  with empty rows, which carry no loss)."""
  if len(corpus.eval_docs) == 0:
    return []
  packing = _packing(corpus, corpus.eval_docs, seq_len + 1)
  out = []
  for s in range(0, packing.num_rows, batch_size):
    which = list(range(s, min(s + batch_size, packing.num_rows)))
    tokens, seg, flags = _rows(corpus, packing, which, seq_len + 1)
    pad = batch_size - len(which)
    if pad:
      tokens = np.pad(tokens, ((0, pad), (0, 0)))
      seg = np.pad(seg, ((0, pad), (0, 0)))
      flags = np.pad(flags, ((0, pad), (0, 0)))
    out.append(batch_from_rows(tokens, seg, flags))
    if max_batches is not None and len(out) >= max_batches:
      break
  return out


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A held-out prompt for sampled completions.

  Attributes:
    document: the corpus document.
    prompt: its token ids before the completion.
    reference: the document's own continuation (token ids).
  """
  document: int
  prompt: tuple[int, ...]
  reference: tuple[int, ...]


def sample_prompts(corpus: Corpus, count: int, prompt_tokens: int = 64,
                   reference_tokens: int = 64) -> list[Prompt]:
  """Prompts of the first `count` held-out documents: a conversation's
  tokens before its first trained token (reference: the trained tokens
  that follow), a text's first half up to `prompt_tokens`."""
  out = []
  for d in corpus.eval_docs[:max(count, 0)]:
    ids, flags = corpus.document(int(d))
    trained = np.flatnonzero(flags)
    if len(trained) and trained[0] > 0 and not flags[0]:
      p = int(trained[0])
      end = p
      while end < len(flags) and flags[end]:
        end += 1
      ref = ids[p:min(end, p + reference_tokens)]
    else:
      p = min(len(ids) // 2, prompt_tokens)
      ref = ids[p:p + reference_tokens]
    if p < 1:
      continue
    out.append(Prompt(int(d), tuple(int(i) for i in ids[:p]),
                      tuple(int(i) for i in ref)))
  return out


__all__ = ["Corpus", "DataOptions", "PackedData", "Prompt", "chat_documents",
           "eval_batches", "find_files", "iter_records", "pack_next_fit",
           "prepare_corpus", "sample_prompts", "trained_flags"]
