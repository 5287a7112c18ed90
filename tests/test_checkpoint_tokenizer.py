"""`save_hf_checkpoint(..., tokenizer_from=DIR)` and the exports that carry
a tokenizer.

  * every tokenizer file of the source folder (tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
    additional_chat_templates/*.jinja, generation_config.json) arrives
    byte for byte, nothing else does, and no staging folder is left; the
    saved folder's tokenizer renders chats as the source's;
  * saving again is fine when the files there are identical; a different
    file there, a source without a readable tokenizer, or a tokenizer with
    more ids than the model refuse the save before anything is written
    (every file of the destination keeps its bytes and mtime);
  * saving into the source folder itself copies nothing;
  * the byte-level tokenizer of the text data maps byte i to id i (checked
    against transformers' fast tokenizer reading the same file), and
    experiments.train's text export carries it, so experiments.generate
    reads the export (training and evaluation are stubbed: only the export
    is under test).
"""

import os
import shutil
import types

import numpy as np
import pytest
import transformers

from experiments import generate as generate_script
from experiments import train as train_script
from experiments.configs import text as text_config
import qwen_jax
from qwen_jax import data
from qwen_jax import tokenizer as tokenizer_lib
from tests import test_generate_sampling as sampling_tests
from tests import test_tokenizer as tokenizer_tests

VOCAB = 432  # the trained tokenizer has 426 ids


def _snapshot(root):
  out = {}
  for d, dirs, files in os.walk(root):
    out[d] = tuple(sorted(dirs + files))
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[p] = (os.stat(p).st_mtime_ns, fh.read())
  return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A checkpoint folder's tokenizer files, and a README not to copy."""
  path = str(tmp_path_factory.mktemp("tokenizer_source"))
  tokenizer_tests._build_backend().save(os.path.join(path, "tokenizer.json"))
  tokenizer_tests._tokenizer_config(path, chat_template=...)
  with open(os.path.join(path, "chat_template.jinja"), "w") as f:
    f.write(tokenizer_tests._TEMPLATE)
  os.makedirs(os.path.join(path, "additional_chat_templates"))
  with open(os.path.join(path, "additional_chat_templates",
                         "tool_use.jinja"), "w") as f:
    f.write("{{ messages[0].content }}|tools")
  for name, text in (("generation_config.json",
                      '{"do_sample": true, "temperature": 0.6, '
                      '"eos_token_id": [2, 0]}'),
                     ("special_tokens_map.json",
                      '{"eos_token": "<|im_end|>"}'),
                     ("README.md", "not a tokenizer file\n")):
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  return path


@pytest.fixture(scope="module")
def model():
  cfg = sampling_tests.small_config(vocab_size=VOCAB)
  return cfg, sampling_tests.random_params(cfg, 5)


_COPIED = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
           "generation_config.json", "special_tokens_map.json",
           os.path.join("additional_chat_templates", "tool_use.jinja")]


def test_save_copies_the_tokenizer_files(source, model, tmp_path):
  cfg, params = model
  dest = str(tmp_path / "export")
  qwen_jax.save_hf_checkpoint(dest, cfg, params, tokenizer_from=source)
  for name in _COPIED:
    with open(os.path.join(source, name), "rb") as a, open(
        os.path.join(dest, name), "rb") as b:
      assert a.read() == b.read(), name
  assert sorted(os.listdir(dest)) == sorted(
      ["config.json", "model.safetensors", "additional_chat_templates"]
      + [n for n in _COPIED if os.sep not in n])
  chat = [{"role": "user", "content": "Hello! 你好"}]
  ours = tokenizer_lib.load_tokenizer(dest)
  assert ours.apply_chat_template(chat, add_generation_prompt=True) == (
      tokenizer_lib.load_tokenizer(source).apply_chat_template(
          chat, add_generation_prompt=True))
  assert tokenizer_lib.load_generation_config(dest).temperature == 0.6
  loaded_cfg, _ = qwen_jax.load_hf_checkpoint(dest)
  assert loaded_cfg.vocab_size == VOCAB
  # Again into the same folder: identical files are fine.
  qwen_jax.save_hf_checkpoint(dest, cfg, params, tokenizer_from=source)
  # Into the tokenizer's own folder: nothing to copy, nothing changes.
  own = str(tmp_path / "own")
  shutil.copytree(source, own)
  before = _snapshot(own)
  qwen_jax.save_hf_checkpoint(own, cfg, params, tokenizer_from=own)
  after = _snapshot(own)
  assert {k: v for k, v in after.items() if k in before and k != own} == {
      k: v for k, v in before.items() if k != own}


def test_save_refuses_before_writing(source, model, tmp_path):
  cfg, params = model
  dest = str(tmp_path / "export")
  qwen_jax.save_hf_checkpoint(dest, cfg, params, tokenizer_from=source)
  with open(os.path.join(dest, "chat_template.jinja"), "a") as f:
    f.write("{# edited by hand #}")
  empty = tmp_path / "no_tokenizer"
  empty.mkdir()
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "tokenizer.json").write_text("{not json")
  small = cfg.replace(vocab_size=300)
  small_params = sampling_tests.random_params(small, 1)
  before = _snapshot(str(tmp_path))
  cases = [
      (dest, cfg, params, source, "chat_template.jinja"),
      (str(tmp_path / "new1"), cfg, params, str(empty), "tokenizer_from: "
       "expected a folder with tokenizer.json"),
      (str(tmp_path / "new2"), cfg, params, str(broken), "tokenizer_from: "),
      (str(tmp_path / "new3"), cfg, params, str(tmp_path / "nothing"),
       "tokenizer_from: expected a checkpoint folder"),
      (str(tmp_path / "new4"), small, small_params, source,
       "vocab_size 300"),
  ]
  for path, c, p, tok_from, message in cases:
    with pytest.raises(ValueError, match=message):
      qwen_jax.save_hf_checkpoint(path, c, p, tokenizer_from=tok_from)
  assert _snapshot(str(tmp_path)) == before


def test_byte_tokenizer_and_the_text_export(tmp_path, monkeypatch):
  folder = str(tmp_path / "bytes")
  os.makedirs(folder)
  path = data.save_byte_tokenizer(folder)
  ours = tokenizer_lib.load_tokenizer(folder)
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  text = "def f(x):\n\treturn x  # ünïcödé 你好 🦊 \x00\x7f"
  assert ours.encode(text) == list(text.encode("utf-8"))
  assert theirs.encode(text) == list(text.encode("utf-8"))
  assert ours.decode(list(range(256))) == bytes(range(256)).decode(
      "utf-8", errors="replace")
  assert ours.decode(list(text.encode("utf-8"))) == text

  # experiments.train exports a text run with it (training stubbed).
  def fake_train(cfg, tcfg, batch_fn, workdir, progress=True, **options):
    del batch_fn, workdir, progress, options  # the loop's other options
    state = types.SimpleNamespace(
        params=sampling_tests.random_params(cfg), step=tcfg.num_steps)
    return train_script.train_lib.TrainResult(
        state=state, cfg=cfg, losses={0: 1.0}, history=[], compile_s=0.0,
        train_s=0.0, tokens_per_s=0.0, resumed_from=None)

  monkeypatch.setattr(train_script.train_lib, "train", fake_train)
  # The stubbed loop writes no run history for the export to be noted in.
  monkeypatch.setattr(train_script.train_workdir, "record_export",
                      lambda *a: None)
  monkeypatch.setattr(train_script.train_lib, "evaluate",
                      lambda *a, **k: {"loss": 1.0, "tokens": 1.0})
  export = str(tmp_path / "hf")
  config = text_config.get_config("runlocal")
  config.train.save_checkpoints = False
  train_script.run(config, str(tmp_path / "run"), export_hf=export,
                   progress=False)
  assert sorted(os.listdir(export)) == ["config.json", "model.safetensors",
                                        "tokenizer.json"]
  d = generate_script.describe(export, None)
  assert d.tokenizer.encode("héllo") == list("héllo".encode("utf-8"))
  assert d.cfg.vocab_size >= 256
  np.testing.assert_array_equal(
      d.tokenizer.encode(text), np.frombuffer(text.encode(), np.uint8))
