"""`python -m experiments.generate --prompts_file IN --output OUT`.

On a chat checkpoint (`build_chat_checkpoint`: two layers, random weights,
the trained BPE tokenizer and Qwen-style chat template of
tests/test_tokenizer.py, generation_config.json), a
prompts file mixes plain prompts and chat messages, per-line
max_new_tokens, sampling settings and seeds, a stop string and
enable_thinking; the script runs it in batches of 2. Each result line
equals `qwen_jax.generate.stream` on that prompt alone (ids rendered by the
test itself): the text (without the stop token, cut before the stop
string), the token count and the stop reason. Then a rerun after the file
lost its last results and got a line cut in the middle (as a kill would
leave it) drops the cut line and writes exactly the missing results; a
rerun with nothing left to do loads nothing. The refusals of bad prompts
files and of an --output that is not ours are in
tests/test_script_misuse.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qwen_jax
from qwen_jax import tokenizer as tokenizer_lib
from qwen_jax.generate import stream
from tests import test_generate_sampling as sampling_tests
from tests import test_tokenizer as tokenizer_tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 432  # the trained tokenizer has 426 ids
IM_END = 2  # <|im_end|> in the trained tokenizer
GENERATION_CONFIG = {"do_sample": False, "eos_token_id": [IM_END, 0],
                     "pad_token_id": 0}
MAX_NEW = 6
BLOCK = 2
SLOTS = 128  # the script's cache length for short prompts: shared programs
STOPS = [IM_END, 0]  # config.json's and generation_config.json's
SAMPLED = {"temperature": 1.2, "top_k": 30}


def build_chat_checkpoint(path: str, seed: int = 0) -> str:
  """A tiny random checkpoint folder with a trained tokenizer, a chat
  template and generation_config.json."""
  os.makedirs(path, exist_ok=True)
  tokenizer_tests._build_backend().save(os.path.join(path, "tokenizer.json"))
  tokenizer_tests._tokenizer_config(path)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(GENERATION_CONFIG, f)
  cfg = sampling_tests.small_config(vocab_size=VOCAB, eos_token_id=IM_END)
  qwen_jax.save_hf_checkpoint(path, cfg,
                              sampling_tests.random_params(cfg, seed))
  return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return build_chat_checkpoint(str(tmp_path_factory.mktemp("batch_base")),
                               seed=1)


def _alone(cfg, params, tok, gc, ids, entry, index):
  """What the prompt gives alone: (text, num_tokens, stop_reason, stop)."""
  sampling = {k: entry[k] for k in ("temperature", "top_k") if k in entry}
  tokens = stream(
      cfg, params, [ids], entry.get("max_new_tokens", MAX_NEW),
      seed=entry.get("seed", index), stop_tokens=STOPS,
      generation_config=gc, stop_strings=entry.get("stop"), tokenizer=tok,
      prefill_block=BLOCK, block_steps=3, cache_len=SLOTS, **sampling)
  list(tokens)
  n, reason = tokens.num_tokens[0], tokens.stop_reasons[0]
  row = tokens.tokens[0, :n].tolist()
  text = tok.decode(row[:-1] if reason == "stop_token" else row)
  stop = tokens.stop_strings_found[0]
  if stop is not None:
    text = text[:text.index(stop)]
  return text, n, reason, stop


def _ids(tok, entry):
  if "messages" in entry:
    kw = ({} if "enable_thinking" not in entry
          else {"enable_thinking": entry["enable_thinking"]})
    return tok.apply_chat_template(entry["messages"],
                                   add_generation_prompt=True, **kw)
  return tok.encode(entry["prompt"])


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [ROOT, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run(
      [sys.executable, "-m", "experiments.generate", *args],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
      check=False)


def _results(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_batches_equal_one_by_one_and_resume(base, tmp_path):
  cfg, params = qwen_jax.load_hf_checkpoint(base)
  tok = tokenizer_lib.load_tokenizer(base)
  gc = tokenizer_lib.load_generation_config(base)
  ask = [{"role": "user", "content": "What is the weather?"}]
  entries = [
      {"prompt": "Hello world, the weather", "id": "a"},
      {"messages": ask, "max_new_tokens": 3},
      dict(SAMPLED, prompt="The quick brown fox", seed=5),
      {"prompt": "Hi"},
      {"prompt": "Think step by step"},
      dict(SAMPLED, messages=ask, enable_thinking=False),
  ]
  # A stop string that the fifth prompt's text reaches (streamed text,
  # so never half a character).
  decoder = tok.stream_decoder()
  tokens = stream(cfg, params, [_ids(tok, entries[4])], MAX_NEW,
                  stop_tokens=STOPS, generation_config=gc,
                  prefill_block=BLOCK, cache_len=SLOTS)
  shown = decoder.extend(np.concatenate(list(tokens), axis=1)[0])
  entries[4]["stop"] = [shown[len(shown) // 2:len(shown) // 2 + 2]]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps(e) + "\n" for e in entries[:3])
                     + "\n" + "".join(json.dumps(e) + "\n"
                                      for e in entries[3:]))
  want = {}
  for i, e in enumerate(entries):
    index = i if i < 3 else i + 1  # the blank line keeps its number
    text, n, reason, stop = _alone(cfg, params, tok, gc, _ids(tok, e), e,
                                   index)
    want[e.get("id", index)] = {
        "id": e.get("id", index), "index": index, "text": text,
        "num_tokens": n, "stop_reason": reason, "stop": stop,
        "prompt_tokens": len(_ids(tok, e))}
  assert want[5]["stop_reason"] == "stop_string"  # entries[4], line 5
  assert want[1]["num_tokens"] <= 3

  out = tmp_path / "out.jsonl"
  args = ["--checkpoint", base, "--prompts_file", str(prompts), "--output",
          str(out), f"--max_new_tokens={MAX_NEW}", "--batch_size=2",
          f"--prefill_block={BLOCK}", "--block_steps=3"]
  r = _run(*args)
  assert r.returncode == 0, r.stderr
  got = _results(out)
  assert sorted(map(str, (g["id"] for g in got))) == sorted(
      map(str, want))
  for g in got:
    sha = g.pop("input_sha256")
    assert len(sha) == 64
    assert g == want[g["id"]], g["id"]

  # Lose the last two results and leave a line cut in the middle.
  lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
  out.write_text("".join(lines[:-2]) + lines[-2][:15], encoding="utf-8")
  r = _run(*args)
  assert r.returncode == 0, r.stderr
  assert "cut off" in r.stderr and "2 results appended" in r.stderr
  again = _results(out)
  assert again[:-2] == [json.loads(s) for s in lines[:-2]]
  assert sorted(json.dumps(g, sort_keys=True) for g in again) == sorted(
      json.dumps(json.loads(s), sort_keys=True) for s in lines)
  r = _run(*args)
  assert r.returncode == 0 and "every one of the 6 prompts is done" in (
      r.stderr), r.stderr
  assert _results(out) == again
