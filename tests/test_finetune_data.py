"""Tests of qwen_jax/finetune_data.py: chat masks, packing, bad data.

The chat masks are checked against the assistant text each test template
renders (written out by hand below), and for the `{% generation %}`
template against transformers' `return_assistant_tokens_mask`. Packing is
checked to be a pure function of the step that covers every training
document once per epoch and never a held-out one; packed rows give each
document the logits it gets alone. Bad data is refused with one line
naming the file (and line) before any weight is loaded.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from experiments import finetune
from experiments import train as train_script
from experiments.configs import finetune as finetune_config
from qwen_jax import finetune_data as fd
from qwen_jax import tokenizer as tokenizer_lib
from qwen_jax import train_step
from qwen_jax.model import Qwen35
from tests import finetune_utils as fu
from tests.tolerances import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris, the capital."},
]
# What each template renders for _CHAT's assistant messages, by the rule of
# qwen_jax/finetune_data.py: (documents, [assistant text per document]).
_EXPECTED = {
    "chatml": [["Four.<|im_end|>\n", "Paris, the capital.<|im_end|>\n"]],
    # The first answer is rendered with its think block only while it is
    # the last turn: it becomes a document of its own.
    "thinking": [["<think>\n\n</think>\n\nFour.<|im_end|>\n"],
                 ["<think>\n\n</think>\n\nParis, the capital.<|im_end|>\n"]],
    "generation": [["Four.<|im_end|>", "Paris, the capital.<|im_end|>"]],
}
_TEMPLATES = {"chatml": fu.CHATML, "thinking": fu.THINKING,
              "generation": fu.GENERATION}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  base = tmp_path_factory.mktemp("ft_data")
  return {name: fu.build_tokenizer(str(base / name), t)
          for name, t in _TEMPLATES.items()}


def _trained_groups(ids, flags, tok):
  """Decoded runs of consecutive trained tokens."""
  groups, cur = [], []
  for i, f in zip(ids, flags):
    if f:
      cur.append(int(i))
    elif cur:
      groups.append(cur)
      cur = []
  if cur:
    groups.append(cur)
  return [tok.decode(g) for g in groups]


@pytest.mark.parametrize("name", sorted(_TEMPLATES))
def test_chat_mask_is_the_rendered_assistant_text(folders, name):
  tok = tokenizer_lib.load_tokenizer(folders[name])
  docs = fd.chat_documents(tok, _CHAT)
  assert len(docs) == len(_EXPECTED[name])
  full = tok.apply_chat_template(_CHAT, tokenize=False)
  for (text, spans), expected in zip(docs, _EXPECTED[name]):
    assert [text[a:b] for a, b in spans] == expected
    enc = tok.backend.encode(text, add_special_tokens=False)
    flags = fd.trained_flags(enc.offsets, spans)
    # The token ids are the rendered text's, the trained ones exactly the
    # assistant text.
    assert tok.decode(enc.ids) == text
    assert _trained_groups(enc.ids, flags, tok) == expected
    assert text.rstrip("\n").endswith(expected[-1].rstrip("\n"))
  if name != "thinking":  # one document: the whole conversation
    assert docs[0][0] == full


def test_generation_mask_matches_transformers(folders):
  transformers = pytest.importorskip("transformers")
  folder = folders["generation"]
  hf = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
  out = hf.apply_chat_template(_CHAT, tokenize=True, return_dict=True,
                               return_assistant_tokens_mask=True)
  tok = tokenizer_lib.load_tokenizer(folder)
  (text, spans), = fd.chat_documents(tok, _CHAT)
  enc = tok.backend.encode(text, add_special_tokens=False)
  assert enc.ids == list(out["input_ids"])
  np.testing.assert_array_equal(fd.trained_flags(enc.offsets, spans),
                                np.asarray(out["assistant_masks"]))


def _corpus(tmp_path, folder, n=24, eval_fraction=0.2, seed=0):
  path = str(tmp_path / "data.jsonl")
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(n):
      if i % 3 == 0:
        words = rng.choice(["the", "quick", "fox", "hello", "world"],
                           int(rng.integers(3, 40)))
        f.write(json.dumps({"text": " ".join(words)}) + "\n")
      else:
        f.write(json.dumps({"messages": fu.CHATS[i % len(fu.CHATS)]}) + "\n")
  tok = tokenizer_lib.load_tokenizer(folder)
  return fd.prepare_corpus(path, tok, str(tmp_path / "cache"),
                           fd.DataOptions(eval_fraction=eval_fraction,
                                          seed=seed))


def test_loss_mask_covers_each_trained_target_once_per_epoch(folders,
                                                            tmp_path):
  corpus = _corpus(tmp_path, folders["thinking"])
  data = fd.PackedData(corpus, seq_len=96, batch_size=3, seed=0)
  rows = data.rows_per_epoch(0)
  assert corpus.lengths(corpus.train_docs).max() <= 97  # none was cut
  # The targets under the mask over one epoch's rows are exactly the
  # trained tokens of the training documents, less each one's first token
  # (which nothing predicts).
  got, expected = [], []
  for g in range(rows):
    s, k = divmod(g, 3)
    b = data.batch(s)
    got += b["targets"][k][b["loss_mask"][k] > 0].tolist()
  for d in corpus.train_docs:
    ids, flags = corpus.document(int(d))
    expected += ids[1:][flags[1:] > 0].tolist()
  assert sorted(got) == sorted(expected)
  assert len(got) > 50


def test_packing_is_a_pure_function_of_the_step(folders, tmp_path):
  corpus = _corpus(tmp_path, folders["chatml"])
  a = fd.PackedData(corpus, seq_len=64, batch_size=2, seed=3)
  b = fd.PackedData(corpus, seq_len=64, batch_size=2, seed=3)
  order = [7, 0, 3, 12, 1, 7]
  for s in order:  # any order, a fresh instance: the same batch
    x, y = a.batch(s), b.batch(s)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # Each epoch holds every training document once and no held-out one.
  assert len(corpus.eval_docs) > 0
  for e in range(2):
    packing = a._epoch(e)  # pylint: disable=protected-access
    seen = sorted(packing.docs[packing.pieces].tolist())
    assert sorted(set(seen)) == sorted(corpus.train_docs.tolist())
    assert not set(seen) & set(corpus.eval_docs.tolist())
  held = set(corpus.sources[corpus.eval_docs].tolist())
  assert not held & set(corpus.sources[corpus.train_docs].tolist())
  other = fd.PackedData(corpus, seq_len=64, batch_size=2, seed=4)
  assert not np.array_equal(other.batch(0)["inputs"], a.batch(0)["inputs"])


def test_next_fit_packing_against_a_reference():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 30, 50)
  lengths[[3, 9]] = [45, 70]  # longer than a row
  rows, docs, starts, sizes, n = fd.pack_next_fit(lengths, 32)
  # Reference: fill rows one document at a time.
  ref, cur = [], []
  for i, m in enumerate(lengths):
    s = 0
    while s < m:
      take = min(m - s, 32)
      if sum(t for _, _, t in cur) + take > 32:
        ref.append(cur)
        cur = []
      cur.append((i, s, take))
      s += take
  ref.append(cur)
  assert n == len(ref)
  got = [[] for _ in range(n)]
  for r, d, s, t in zip(rows, docs, starts, sizes):
    got[r].append((d, s, t))
  assert got == ref


def test_packed_rows_equal_separate_documents(tmp_path, folders):
  corpus = _corpus(tmp_path, folders["chatml"])
  cfg = fu.tiny_config(layers=4)
  params = train_step.init_params(cfg, 1)
  t = 128
  data = fd.PackedData(corpus, seq_len=t, batch_size=2, seed=0)
  b = data.batch(0)
  model = Qwen35(cfg)
  apply = jax.jit(lambda ids, seg: model.apply({"params": params}, ids,
                                               segment_ids=seg))
  packed = apply(jnp.asarray(b["inputs"]), jnp.asarray(b["segment_ids"]))
  checked = 0
  for r in range(b["inputs"].shape[0]):
    seg = b["segment_ids"][r]
    for s in np.unique(seg):
      pos = np.flatnonzero(seg == s)
      if b["loss_mask"][r, pos].sum() == 0:
        continue  # padding
      # The document alone, right padded (a causal model's outputs on the
      # document's own positions do not see the padding after them).
      ids = np.zeros((1, t), np.int32)
      ids[0, :len(pos)] = b["inputs"][r, pos]
      alone = apply(jnp.asarray(ids), jnp.ones((1, t), jnp.int32))
      assert_close(packed[r, pos], alone[0, :len(pos)], "float32")
      checked += 1
  assert checked >= 4


# ------------------------------------------------------------ bad data
def _config(init, data_path, **kw):
  config = finetune_config.get_config()
  config.init_checkpoint = init
  config.data.path = data_path
  config.train.seq_len = 128
  for k, v in kw.items():
    config[k] = v
  return config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("ft_ckpt") / "ckpt")
  return fu.tiny_checkpoint(folder)[0]


def _write(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


_GOOD = json.dumps({"messages": fu.CHATS[0]}) + "\n"


@pytest.mark.parametrize("case", [
    "missing", "bad_json", "no_role", "no_assistant", "empty", "not_object",
    "text_not_string", "image_part", "other_file_in_folder"])
def test_bad_data_is_one_error_before_the_weights(case, tmp_path,
                                                  checkpoint, monkeypatch):
  def no_weights(*args, **kwargs):
    raise AssertionError("weights were loaded")
  monkeypatch.setattr(finetune.checkpoint_lib, "load_hf_checkpoint",
                      no_weights)
  p = tmp_path / "d.jsonl"
  if case == "missing":
    path, want = str(tmp_path / "nope.jsonl"), "no such path"
  elif case == "bad_json":
    path = _write(p, _GOOD + _GOOD + '{"messages": [}\n')
    want = f"{p}:3: expected a JSON object, found invalid JSON"
  elif case == "no_role":
    path = _write(p, _GOOD + json.dumps(
        {"messages": [{"content": "hi"}]}) + "\n")
    want = f"{p}:2: messages[0]: expected a \"role\" string"
  elif case == "no_assistant":
    path = _write(p, json.dumps(
        {"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    want = f"{p}:1: expected at least one assistant message"
  elif case == "empty":
    path, want = _write(p, "\n\n"), "empty corpus"
  elif case == "not_object":
    path = _write(p, _GOOD + "[1, 2]\n")
    want = f"{p}:2: expected a JSON object with \"text\" or \"messages\""
  elif case == "text_not_string":
    path = _write(p, json.dumps({"text": 3}) + "\n")
    want = f"{p}:1: expected \"text\" to be a string"
  elif case == "image_part":
    path = _write(p, _GOOD + json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.png"},
                                     {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."}]}) + "\n")
    want = f"{p}:2: messages[0]: expected text content"
  else:
    os.makedirs(tmp_path / "folder")
    _write(tmp_path / "folder" / "a.jsonl", _GOOD)
    _write(tmp_path / "folder" / "b.csv", "x")
    path = str(tmp_path / "folder")
    want = "b.csv"
  workdir = str(tmp_path / "w")
  with pytest.raises(cli.UserError) as e:
    train_script.run(_config(checkpoint, path), workdir, progress=False)
  assert want in str(e.value)
  assert "\n" not in str(e.value)
  # Nothing was written: the workdir made for the data is gone again.
  assert not os.path.exists(workdir)


def test_bad_data_on_the_command_line(tmp_path, checkpoint):
  bad = _write(tmp_path / "d.jsonl", _GOOD + '{"text": "a"\n')
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train",
       "--config=experiments/configs/finetune.py",
       f"--config.init_checkpoint={checkpoint}",
       f"--config.data.path={bad}", "--config.train.seq_len=128",
       f"--workdir={tmp_path / 'w'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 1, out.stderr
  lines = [l for l in out.stderr.splitlines() if "experiments.train" in l]
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith(f"experiments.train: error: {bad}:2: expected a "
                             f"JSON object, found invalid JSON"), lines
