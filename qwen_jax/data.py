"""Training data: multi-query associative recall (MQAR) and byte-level text.

MQAR (Arora et al., "Zoology", 2023) tests the recall that separates
attention from fixed-size recurrent states. A sequence holds P key-value
pairs, then queries: a key seen earlier, after which the model must emit its
value. Layout of one example of `seq_len + 1` tokens (inputs are the first
`seq_len`, targets the last `seq_len`):

  k1 v1 k2 v2 ... kP vP | . . kq vq . . . kr vr . ...
  `------ context ------' `------ queries at random slots, pad elsewhere

Token ids: 0 = pad, keys 1..K, values K+1..K+V (`MQARConfig.vocab_size`
= 1 + K + V). The loss mask is 1 exactly at the query keys, whose target is
the value; everything else is free context.

Text: the source files of a fixed list of Python standard-library modules
(installed with every Python, so nothing is downloaded), read as bytes
(vocabulary 256). Documents are packed into rows with segment ids, the
format the model (`Qwen35(..., segment_ids=...)`) and the gated-delta-rule
kernel take: tokens of different documents never attend to or pass state to
each other, and the loss never predicts across a boundary.

Every batch is a pure function of (seed, step): a run restarted from a
checkpoint sees exactly the batches it would have seen. Each row is one
too (of seed, step and its row number), so that every process of a
multi-process run builds only its own rows (`rows=`, `RowBatches`).
`check_batch` is the one check of the batch format, used by training and
the sharded programs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from qwen_jax.config import check_int as _check_int

Batch = dict[str, np.ndarray]

PAD = 0
BYTE_VOCAB = 256


# ------------------------------------------------------------ batch format
BATCH_KEYS = ("inputs", "targets")
# Images and videos of a batch (a model with a vision tower): patches and
# their grids, as `Qwen35` takes them; not [b, t].
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw")
GRID_KEYS = ("image_grid_thw", "video_grid_thw")
OPTIONAL_BATCH_KEYS = ("loss_mask", "segment_ids", "attention_mask"
                      ) + MEDIA_KEYS


def _is_host_array(x: Any) -> bool:
  """A concrete host value (NumPy): checking its values costs no device
  sync (tracers and device arrays are not read)."""
  return isinstance(x, (np.ndarray, np.generic))


def check_batch(batch: Mapping[str, Any],
                vocab_size: int | None = None) -> None:
  """Raises a ValueError naming what is wrong with a batch.

  Every batch in the project (data generators, training, the sharded
  programs) is a dict with "inputs" and "targets" [b, t] (integer token
  ids) and optionally "loss_mask", "segment_ids", "attention_mask" [b, t],
  with b >= 1 and t >= 1, and, for a model with a vision tower, the
  images and videos of its rows ("pixel_values" [n, C*T*P*P] with
  "image_grid_thw" [k, 3], "pixel_values_videos" with "video_grid_thw":
  checked against the model by `Qwen35`; `with_static_grids` makes the
  grids static for jit). Keys, shapes and dtypes are checked always (they
  are static, so this also works on tracers inside jit, at no cost). With
  `vocab_size`, the ids of "inputs" and "targets" are checked to lie in
  [0, vocab_size) when they are NumPy arrays (values on the host): device
  arrays and tracers are not read, so the check never syncs (`train` and
  `evaluate` call it on the host batches before the compiled step).
  """
  missing = [k for k in BATCH_KEYS if k not in batch]
  unknown = sorted(set(batch) - set(BATCH_KEYS) - set(OPTIONAL_BATCH_KEYS))
  if missing or unknown:
    raise ValueError(
        f"batch: expected keys {BATCH_KEYS} and optionally "
        f"{OPTIONAL_BATCH_KEYS}; missing {missing}, unknown {unknown}")
  shape = tuple(np.shape(batch["inputs"]))
  if len(shape) != 2:
    raise ValueError(f"batch: expected inputs of shape [b, t], found shape "
                     f"{shape}")
  if shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"batch: expected at least one row and one token "
                     f"(inputs [b, t] with b, t >= 1), found shape {shape}")
  for key, value in batch.items():
    if (value is None and key in OPTIONAL_BATCH_KEYS) or key in MEDIA_KEYS:
      continue
    found = tuple(np.shape(value))
    if found != shape:
      raise ValueError(f"batch: expected {key} of the inputs' shape "
                       f"{shape}, found {found}")
  for key in BATCH_KEYS:
    value = batch[key]
    dtype = getattr(value, "dtype", None)
    if dtype is None:
      dtype = np.asarray(value).dtype
    if not (jnp.issubdtype(dtype, jnp.integer)
            and not jnp.issubdtype(dtype, jnp.bool_)):
      raise ValueError(f"batch: expected integer token ids in {key}, found "
                       f"dtype {dtype}")
    if vocab_size is not None and _is_host_array(value) and value.size:
      lo, hi = int(value.min()), int(value.max())
      if lo < 0 or hi >= vocab_size:
        raise ValueError(f"batch: expected {key} ids in [0, {vocab_size}) "
                         f"(the model's vocab_size), found ids from {lo} "
                         f"to {hi}")


def with_static_grids(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The batch with its image/video grids as `vision.StaticGrid`s.

  A grid fixes shapes, so a jitted step must see its values: as a
  StaticGrid it is part of the batch's tree structure (one compilation per
  distinct grid), not a traced array. Other entries are unchanged.
  """
  from qwen_jax.vision import StaticGrid  # pylint: disable=g-import-not-at-top
  out = dict(batch)
  for key in GRID_KEYS:
    if out.get(key) is not None:
      out[key] = StaticGrid(out[key])
  return out


def media_args(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The images and videos of a batch, as `Qwen35` keyword arguments."""
  return {k: batch[k] for k in MEDIA_KEYS if batch.get(k) is not None}


def placeholder_loss_mask(cfg: Any, targets: Any, mask: Any) -> Any:
  """The loss mask without the targets that are image or video
  placeholders (their inputs are the tower's features, not tokens to
  predict), for a config with a tower; otherwise `mask` itself."""
  if cfg.vision is None:
    return mask
  for token in (cfg.image_token_id, cfg.video_token_id):
    if token is not None:
      mask = jnp.where(targets == token, jnp.zeros_like(mask), mask)
  return mask


def _rng(seed: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed)] + [int(s) for s in stream])


# --------------------------------------------------------------------- MQAR
@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Shape of a multi-query associative-recall task.

  Attributes:
    seq_len: tokens per example (inputs and targets both have this length).
    num_pairs: key-value pairs in the context (distinct keys).
    num_queries: queries per example (distinct keys drawn from the pairs);
      None queries every pair once.
    key_vocab: number of distinct key tokens K (>= num_pairs).
    value_vocab: number of distinct value tokens V.
  """
  seq_len: int = 64
  num_pairs: int = 8
  num_queries: int | None = None
  key_vocab: int = 64
  value_vocab: int = 64

  def __post_init__(self):
    q = self.queries
    if self.num_pairs < 1:
      raise ValueError(f"num_pairs: expected >= 1, found {self.num_pairs}")
    if self.key_vocab < self.num_pairs:
      raise ValueError(f"key_vocab: expected >= num_pairs={self.num_pairs} "
                       f"(keys are distinct), found {self.key_vocab}")
    if self.value_vocab < 1:
      raise ValueError(f"value_vocab: expected >= 1, found "
                       f"{self.value_vocab}")
    if not 1 <= q <= self.num_pairs:
      raise ValueError(f"num_queries: expected 1..num_pairs="
                       f"{self.num_pairs}, found {q}")
    need = 2 * self.num_pairs + 2 * q
    if self.seq_len + 1 < need:
      raise ValueError(f"seq_len: expected >= {need - 1} for {self.num_pairs}"
                       f" pairs and {q} queries, found {self.seq_len}")

  @property
  def queries(self) -> int:
    return self.num_pairs if self.num_queries is None else self.num_queries

  @property
  def vocab_size(self) -> int:
    """Token ids used: pad, keys, values."""
    return 1 + self.key_vocab + self.value_vocab

  @property
  def chance_accuracy(self) -> float:
    """Accuracy of guessing a value uniformly."""
    return 1.0 / self.value_vocab

  def key_token(self, k):
    return 1 + k

  def value_token(self, v):
    return 1 + self.key_vocab + v

  def replace(self, **changes) -> "MQARConfig":
    return dataclasses.replace(self, **changes)


def _row_range(rows: slice | None, batch_size: int) -> tuple[int, int]:
  """(start, stop) of `rows`, a contiguous part of [0, batch_size)."""
  if rows is None:
    return 0, batch_size
  if isinstance(rows, slice) and rows.step in (None, 1):
    start = 0 if rows.start is None else rows.start
    stop = batch_size if rows.stop is None else rows.stop
    if (isinstance(start, (int, np.integer))
        and isinstance(stop, (int, np.integer))
        and 0 <= start < stop <= batch_size):
      return int(start), int(stop)
  raise ValueError(f"rows: expected a slice of consecutive rows within "
                   f"[0, batch_size={batch_size}), found {rows!r}")


def mqar_batch(task: MQARConfig, batch_size: int, seed: int = 0,
               step: int = 0, rows: slice | None = None) -> Batch:
  """A batch of MQAR examples, a pure function of (task, seed, step).

  Row r is a function of (task, seed, step, r) alone (its own random
  stream), so a process of a multi-process run builds only the rows its
  devices hold (`rows`) and the parts put together are the whole batch.

  Args:
    task: the task shape.
    batch_size: examples.
    seed: data seed.
    step: batch index (train step, or an eval batch number).
    rows: build only these rows of the batch (a slice of consecutive
      rows of [0, batch_size)); None: all.

  Returns:
    dict with "inputs", "targets" int32 [rows, seq_len], "loss_mask"
    float32 [rows, seq_len] (1 at query keys), and "segment_ids" int32
    ones (one document per row).

  Raises:
    ValueError: batch_size < 1, a negative seed or step, or rows outside
      the batch.
  """
  _check_int("batch_size", batch_size, 1)
  _check_int("seed", seed, 0)
  _check_int("step", step, 0)
  start, stop = _row_range(rows, batch_size)
  n, p, q = stop - start, task.num_pairs, task.queries
  length = task.seq_len + 1
  num_slots = (length - 2 * p) // 2
  keys = np.empty((n, p), np.int64)
  values = np.empty((n, p), np.int64)
  which = np.empty((n, q), np.int64)
  slots = np.empty((n, q), np.int64)
  for i in range(n):
    rng = _rng(seed, 0x4D51, step, start + i)
    keys[i] = rng.permutation(task.key_vocab)[:p]  # distinct keys
    values[i] = rng.integers(0, task.value_vocab, p)
    # Queries: q distinct pairs, each at a random 2-token slot after the
    # context, slots in increasing order.
    which[i] = rng.permutation(p)[:q]
    slots[i] = np.sort(rng.permutation(num_slots)[:q])
  seq = np.full((n, length), PAD, np.int64)
  seq[:, 0:2 * p:2] = task.key_token(keys)
  seq[:, 1:2 * p:2] = task.value_token(values)
  pos = 2 * p + 2 * slots  # [n, q] positions of the query keys
  index = np.arange(n)[:, None]
  seq[index, pos] = task.key_token(np.take_along_axis(keys, which, 1))
  seq[index, pos + 1] = task.value_token(np.take_along_axis(values, which,
                                                            1))
  mask = np.zeros((n, length), np.float32)
  mask[index, pos] = 1.0
  return {
      "inputs": seq[:, :-1].astype(np.int32),
      "targets": seq[:, 1:].astype(np.int32),
      "loss_mask": mask[:, :-1],
      "segment_ids": np.ones((n, task.seq_len), np.int32),
  }


def mqar_answer_from_context(inputs: np.ndarray, pos: int,
                             task: MQARConfig) -> int | None:
  """The value that follows the key at `inputs[pos]` in the context.

  Reads only the context part (the first 2 * num_pairs tokens) of one row;
  None when the key does not occur there exactly once.
  """
  ctx = inputs[:2 * task.num_pairs]
  hits = np.nonzero(ctx[0::2] == inputs[pos])[0]
  if len(hits) != 1:
    return None
  return int(ctx[2 * hits[0] + 1])


def pad_batch(batch: Batch, seq_len: int) -> Batch:
  """Right-pads every [b, t] array to `seq_len` (loss mask 0 in the pad).

  Causal models give the same outputs on the unpadded positions, so batches
  of several lengths can share one compiled program.
  """
  out = {}
  for name, x in batch.items():
    t = x.shape[1]
    if t > seq_len:
      raise ValueError(f"{name}: expected length <= {seq_len}, found {t}")
    fill = 1 if name == "segment_ids" else 0
    out[name] = np.pad(x, ((0, 0), (0, seq_len - t)), constant_values=fill)
  return out


# ---------------------------------------------------------------- packing
def pack_documents(docs: Sequence[np.ndarray], row_len: int,
                   pad_id: int = PAD) -> tuple[np.ndarray, np.ndarray]:
  """Greedily packs documents into rows of `row_len` tokens.

  Documents are laid end to end; one that crosses a row boundary continues
  at the start of the next row as a new segment. Segment ids count from 1
  within each row; 0 marks padding at the end of the last row.

  Args:
    docs: 1-D integer arrays.
    row_len: tokens per row.
    pad_id: token of the padding.

  Returns:
    (tokens [rows, row_len] int32, segment_ids [rows, row_len] int32).
  """
  if row_len < 1:
    raise ValueError(f"row_len: expected >= 1, found {row_len}")
  docs = [np.asarray(d).reshape(-1) for d in docs if np.size(d)]
  total = sum(len(d) for d in docs)
  rows = max(1, -(-total // row_len))
  tokens = np.full(rows * row_len, pad_id, np.int32)
  doc_ids = np.zeros(rows * row_len, np.int64)
  off = 0
  for i, d in enumerate(docs):
    tokens[off:off + len(d)] = d
    doc_ids[off:off + len(d)] = i + 1
    off += len(d)
  tokens = tokens.reshape(rows, row_len)
  doc_ids = doc_ids.reshape(rows, row_len)
  # Renumber per row: 1, 2, ... at each change of document; padding 0.
  change = np.ones_like(doc_ids, bool)
  change[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
  seg = np.cumsum(change, axis=1).astype(np.int32)
  seg[doc_ids == 0] = 0
  return tokens, seg


def lm_batch_from_rows(tokens: np.ndarray, segment_ids: np.ndarray) -> Batch:
  """Next-token batch from packed rows of `seq_len + 1` tokens.

  The loss is on position t when tokens t and t+1 are in the same document
  (never across a boundary, never on padding).
  """
  seg_in, seg_out = segment_ids[:, :-1], segment_ids[:, 1:]
  mask = (seg_in == seg_out) & (seg_in > 0)
  # Padding is its own segment so it never joins the last document; one
  # past the row's own last document, so that a row does not depend on
  # the other rows built with it.
  seg = np.where(seg_in > 0, seg_in,
                 seg_in.max(axis=1, keepdims=True, initial=0) + 1)
  return {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "loss_mask": mask.astype(np.float32),
      "segment_ids": seg.astype(np.int32),
  }


# -------------------------------------------------------------------- text
# Pure-Python standard-library modules: installed everywhere, fixed for a
# given Python version. The last few are held out for evaluation.
TEXT_TRAIN_MODULES = (
    "argparse", "bisect", "calendar", "colorsys", "configparser", "csv",
    "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools",
    "getopt", "gettext", "glob", "heapq", "hmac", "imaplib", "ipaddress",
    "locale", "mailbox", "netrc", "numbers", "optparse", "pprint",
    "queue", "quopri", "random", "sched", "shlex", "shutil", "smtplib",
    "statistics", "string", "tabnanny", "tempfile", "textwrap", "timeit",
    "tokenize", "trace", "uuid", "wave", "weakref", "zipapp",
)
TEXT_EVAL_MODULES = ("base64", "contextlib", "decimal", "inspect", "operator",
                     "secrets", "selectors", "ftplib", "types", "warnings")


def module_source_bytes(name: str) -> bytes:
  """Source file of an installed pure-Python module, as bytes."""
  spec = importlib.util.find_spec(name)
  origin = getattr(spec, "origin", None) if spec else None
  if not origin or not origin.endswith(".py") or not os.path.exists(origin):
    raise ValueError(f"module: expected a pure-Python stdlib module, found "
                     f"{name!r} at {origin!r}")
  with open(origin, "rb") as f:
    return f.read()


def _byte_chars() -> list[str]:
  """The character standing for each byte in byte-level BPE vocabularies.

  The printable Latin-1 bytes stand for themselves; the others (controls,
  space, soft hyphen, ...) take the characters from U+0100 on, in byte
  order, as in GPT-2's byte-level BPE (what `tokenizers`' ByteLevel
  pre-tokenizer and decoder use).
  """
  shown = set(range(ord("!"), ord("~") + 1)) | set(
      range(ord("\u00a1"), ord("\u00ac") + 1)) | set(
          range(ord("\u00ae"), ord("\u00ff") + 1))
  chars, extra = [], 0
  for b in range(BYTE_VOCAB):
    if b in shown:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def save_byte_tokenizer(folder: str) -> str:
  """Writes the tokenizer.json of the byte-level text data into `folder`.

  Token i is byte i (the ids `text_documents` uses), so a model trained on
  this data reads and writes UTF-8 text through `qwen_jax.tokenizer.
  load_tokenizer(folder)`, `transformers.AutoTokenizer` or
  experiments.generate: a byte-level BPE model without merges.

  Returns:
    The file's path.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {c: i for i, c in enumerate(_byte_chars())}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False, use_regex=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  path = os.path.join(folder, "tokenizer.json")
  tok.save(path)
  return path


def text_documents(split: str = "train",
                   max_bytes: int | None = None) -> list[np.ndarray]:
  """Byte-level documents (one per module) of the text corpus.

  Args:
    split: "train" or "eval" (disjoint modules).
    max_bytes: cut the corpus at this many bytes (None = all).

  Returns:
    A list of uint8 arrays (token ids 0..255).

  Raises:
    ValueError: a bad split, max_bytes < 1, or no module readable.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split: expected 'train' or 'eval', found {split!r}")
  if max_bytes is not None:
    _check_int("max_bytes", max_bytes, 1)
  names = TEXT_TRAIN_MODULES if split == "train" else TEXT_EVAL_MODULES
  docs, total = [], 0
  for name in names:
    try:
      data = module_source_bytes(name)
    except ValueError:
      continue  # a trimmed Python install: the corpus shrinks, no crash
    if max_bytes is not None:
      data = data[:max(0, max_bytes - total)]
    if data:
      docs.append(np.frombuffer(data, np.uint8).copy())
      total += len(data)
    if max_bytes is not None and total >= max_bytes:
      break
  if not docs:
    raise ValueError(f"text corpus: no module of {names} could be read")
  return docs


class TextData:
  """Packed byte-level text; batches are pure functions of (seed, step).

  Rows of `seq_len + 1` tokens are cut from the packed corpus once; each
  epoch visits them in a permutation drawn from (seed, epoch).

  Attributes:
    seq_len: tokens per row of inputs.
    tokens: [rows, seq_len + 1] packed tokens.
    segment_ids: [rows, seq_len + 1] per-row document ids (0 = padding).
  """

  def __init__(self, seq_len: int, split: str = "train",
               max_bytes: int | None = None,
               docs: Sequence[np.ndarray] | None = None):
    _check_int("seq_len", seq_len, 1)
    self.seq_len = seq_len
    if docs is None:
      docs = text_documents(split, max_bytes)
    self.tokens, self.segment_ids = pack_documents(docs, seq_len + 1)

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]

  @property
  def num_tokens(self) -> int:
    return int((self.segment_ids > 0).sum())

  def batch(self, batch_size: int, seed: int = 0, step: int = 0,
            rows: slice | None = None) -> Batch:
    """Rows number step * batch_size ... of the (seed, epoch) order.

    Row r of the batch is row (step * batch_size + r) of that order, so a
    process of a multi-process run builds only the rows its devices hold
    (`rows`, a slice of consecutive rows of [0, batch_size); None: all).

    Raises:
      ValueError: batch_size < 1, a negative seed or step, or rows outside
        the batch.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("step", step, 0)
    lo, hi = _row_range(rows, batch_size)
    n = self.num_rows
    perms = {}
    idx = []
    start = step * batch_size
    for i in range(start + lo, start + hi):
      epoch, j = divmod(i, n)
      if epoch not in perms:
        perms[epoch] = _rng(seed, 0x5445, epoch).permutation(n)
      idx.append(perms[epoch][j])
    idx = np.asarray(idx)
    return lm_batch_from_rows(self.tokens[idx], self.segment_ids[idx])

  def eval_batches(self, batch_size: int, max_batches: int | None = None,
                   rows: slice | None = None) -> list[Batch]:
    """The rows in order, in batches (the last one padded with empty rows).

    Args:
      batch_size: rows per batch (>= 1).
      max_batches: at most this many batches (>= 1; None = all).
      rows: only these rows of each batch (a slice of consecutive rows of
        [0, batch_size); None: all), as in `batch`.

    Raises:
      ValueError: batch_size or max_batches < 1, or rows outside the batch.
    """
    _check_int("batch_size", batch_size, 1)
    if max_batches is not None:
      _check_int("max_batches", max_batches, 1)
    lo, hi = _row_range(rows, batch_size)
    out = []
    for s in range(0, self.num_rows, batch_size):
      tok = self.tokens[s:s + batch_size]
      seg = self.segment_ids[s:s + batch_size]
      if tok.shape[0] < batch_size:
        extra = batch_size - tok.shape[0]
        tok = np.pad(tok, ((0, extra), (0, 0)))
        seg = np.pad(seg, ((0, extra), (0, 0)))
      out.append(lm_batch_from_rows(tok[lo:hi], seg[lo:hi]))
      if max_batches is not None and len(out) >= max_batches:
        break
    return out


@dataclasses.dataclass(frozen=True)
class RowBatches:
  """A batch function whose rows can be built alone.

  `train(..., batch_fn=RowBatches(...), mesh=...)` then has each process
  build only the rows of each step's batch that its devices hold, and
  assembles the global batch from those parts; called as `batch_fn(step)`
  it builds the whole batch, as any batch function does.

  Attributes:
    rows_fn: (step, rows) -> the rows `rows` (a slice of consecutive rows
      of [0, batch_size)) of the step's batch; the parts of a partition of
      the rows, put together, must be the whole batch.
    batch_size: rows of a whole batch.
  """
  rows_fn: Callable[[int, slice], Batch]
  batch_size: int

  def __call__(self, step: int) -> Batch:
    return self.rows_fn(step, slice(0, self.batch_size))

  def rows(self, step: int, rows: slice) -> Batch:
    """The rows `rows` of the step's batch."""
    return self.rows_fn(step, rows)
