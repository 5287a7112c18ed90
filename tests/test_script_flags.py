"""Bad flags of the experiment scripts fail before any work, naming the flag.

Each script defines its flags in a function called when it runs, so the
tests define them on a fresh `FlagValues` and parse a command line in this
process (absl validators raise `IllegalFlagValueError` at parse time), or
call the script's functions with the bad value (ValueError / ConfigError
naming the flag). That the modules import side by side here is itself
checked: experiments/forward.py and experiments/generate.py both have
--checkpoint, --seed and --dtype.

Covered: generate (--top_p, --top_k, --stop_tokens, --temperature,
--max_new_tokens, --max_len, --block_steps, --prefill_block, --prompt,
--min_p, --repetition_penalty, --presence_penalty, --stop_strings, --chat
without a chat template; an error raised while streaming starts on its
own line), forward (--batch,
--seq_len, --repeats, --preset), compare_ratios (every study flag checked
before training, including --eval_lengths 0 and a clamped --num_pairs),
long_context (--attention_block, --gdr_block). The command lines
themselves (one line on stderr, the exit status) are in
tests/test_script_misuse.py.
"""

import io
import os
import re

from absl import flags
import numpy as np
import pytest

from experiments import cli
from experiments import compare_ratios as cr
from experiments import forward
from experiments import generate
from experiments import long_context


def _parse(define, *args):
  """Defines a script's flags on a fresh FlagValues and parses `args`."""
  fv = flags.FlagValues()
  holders = define(fv)
  fv(["prog", *args])
  return holders


# --------------------------------------------------------------- generate
@pytest.mark.parametrize("args, flag", [
    (["--top_p=1.5"], "top_p"),
    (["--top_p=0"], "top_p"),
    (["--top_p=nan"], "top_p"),
    (["--top_k=-1"], "top_k"),
    (["--stop_tokens=1,abc"], "stop_tokens"),
    (["--stop_tokens=-1"], "stop_tokens"),
    (["--temperature=-1"], "temperature"),
    (["--temperature=nan"], "temperature"),
    (["--max_new_tokens=0"], "max_new_tokens"),
    (["--max_len=0"], "max_len"),
    (["--block_steps=0"], "block_steps"),
    (["--prefill_block=1"], "prefill_block"),
    (["--prompt="], "prompt"),
    (["--min_p=1.5"], "min_p"),
    (["--repetition_penalty=0"], "repetition_penalty"),
    (["--presence_penalty=inf"], "presence_penalty"),
    (["--stop_strings="], "stop_strings"),
])
def test_generate_bad_flags_fail_at_parse_time(args, flag):
  with pytest.raises(flags.IllegalFlagValueError, match=f"--{flag}"):
    _parse(generate.define_flags, *args)


def test_generate_good_flags_parse():
  holders = _parse(generate.define_flags, "--top_p=1", "--top_k=0",
                   "--stop_tokens=1,2")
  assert holders["top_p"].value == 1.0 and holders["top_k"].value == 0
  assert holders["stop_tokens"].value == ["1", "2"]
  holders = _parse(generate.define_flags)
  # Unset: the checkpoint's generation_config.json decides.
  assert holders["top_p"].value is None and holders["stop_tokens"].value is None
  assert holders["temperature"].value is None


@pytest.mark.parametrize("kw, message", [
    (dict(top_p=1.5), "--top_p: expected a value in (0, 1] (1 = off), "
     "found 1.5"),
    (dict(top_p=0.0), "--top_p: expected a value in (0, 1]"),
    (dict(top_p=float("nan")), "--top_p: expected a value in (0, 1]"),
    (dict(top_k=-1), "--top_k: expected an int >= 0 (0 = off), found -1"),
    (dict(stop_tokens=["abc"]), "--stop_tokens: expected comma-separated "
     "integer token ids, found 'abc'"),
    # The random model's vocabulary has 256 ids.
    (dict(stop_tokens=["256"]), "--stop_tokens: expected ids in [0, 256)"),
    (dict(temperature=-1.0), "--temperature: expected a finite value >= 0"),
    (dict(temperature=float("inf")), "--temperature: expected a finite"),
    (dict(max_new_tokens=0), "--max_new_tokens: expected an int >= 1, "
     "found 0"),
    (dict(block_steps=0), "--block_steps: expected an int >= 1, found 0"),
    (dict(prefill_block=1), "--prefill_block: expected an int >= 2, "
     "found 1"),
    (dict(max_len=0), "--max_len: expected an int >= 1, found 0"),
    (dict(prompt=""), "--prompt: expected some text, found ''"),
    (dict(min_p=-0.1), "--min_p: expected a value in [0, 1] (0 = off), "
     "found -0.1"),
    (dict(repetition_penalty=0.0), "--repetition_penalty: expected a "
     "finite value > 0 (1 = off), found 0.0"),
    (dict(stop_strings=[""]), "--stop_strings: expected non-empty strings"),
    (dict(chat=True), "--chat: the random model's byte tokenizer has no "
     "chat template"),
    (dict(max_new_tokens=5000), "--prompt: 2 tokens + --max_new_tokens "
     "5000 = 5002 exceeds the maximum of 4096 tokens"),
    (dict(max_len=3), "exceeds the maximum of 3 tokens"),
])
def test_generate_run_refuses_bad_options_before_loading(kw, message,
                                                         monkeypatch):
  def no_load(*args):
    raise AssertionError("loaded a model before checking the options")

  monkeypatch.setattr(generate, "load", no_load)
  out = io.StringIO()
  args = dict(prompt="Hi", max_new_tokens=2, temperature=1.0)
  args.update(kw)
  with pytest.raises(cli.UserError, match=re.escape(message)):
    generate.run(None, out=out, **args)
  assert out.getvalue() == ""  # nothing printed


def test_generate_error_while_streaming_starts_a_new_line(monkeypatch):
  """An error raised by the stream after some text was printed."""
  def stream(*args, **kwargs):
    yield np.asarray([[ord("!")]])
    raise ValueError("the stream failed")

  monkeypatch.setattr(generate, "load", lambda *a: (None, None))
  monkeypatch.setattr(generate, "stream", stream)
  out = io.StringIO()
  with pytest.raises(ValueError, match="the stream failed"):
    generate.run(None, "Hi", 3, out=out)
  assert out.getvalue() == "Hi!\n"


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("args, flag", [
    (["--batch=0"], "batch"),
    (["--seq_len=0"], "seq_len"),
    (["--seq_len=-3"], "seq_len"),
    (["--repeats=0"], "repeats"),
    (["--preset=nope"], "preset"),
])
def test_forward_bad_flags_fail_at_parse_time(args, flag):
  with pytest.raises(flags.IllegalFlagValueError, match=f"--{flag}"):
    _parse(forward.define_flags, *args)


def test_forward_good_flags_parse():
  holders = _parse(forward.define_flags, "--batch=1", "--seq_len=1",
                   "--repeats=1", "--preset=tiny")
  assert [holders[k].value for k in ("batch", "seq_len", "repeats")] == [
      1, 1, 1]


@pytest.mark.parametrize("kw, flag", [
    (dict(batch=0), "batch"), (dict(seq_len=0), "seq_len"),
    (dict(repeats=0), "repeats"), (dict(batch=-1), "batch"),
])
def test_forward_run_forward_names_the_flag(kw, flag):
  args = dict(batch=2, seq_len=8, seed=0, repeats=1)
  args.update(kw)
  # Checked before the model is touched: no config or parameters needed.
  with pytest.raises(ValueError, match=f"--{flag}: expected an int >= 1, "
                     f"found {kw[flag]}"):
    forward.run_forward(None, None, **args)


# --------------------------------------------------------- compare_ratios
@pytest.mark.parametrize("args, message", [
    (["--steps=0"], "steps: expected an int >= 1, found 0"),
    (["--steps=-1"], "steps: expected an int >= 1, found -1"),
    (["--eval_lengths=0"], "eval_lengths: expected one or more ints >= 1, "
     "found '0'"),
    (["--eval_lengths=64,-64"], "eval_lengths: expected one or more ints "
     ">= 1, found '64,-64'"),
    (["--eval_lengths=64,abc"], "--eval_lengths: expected a comma-separated "
     "list of integers, found '64,abc'"),
    (["--memory_lengths=0"], "memory_lengths: expected one or more ints "
     ">= 1, found '0'"),
    (["--num_pairs=100"], "num_pairs: expected <= key_vocab=16"),
    # 8 pairs at 64 tokens: 512 tokens would need 64 pairs of 16 keys.
    (["--num_pairs=8", "--eval_lengths=64,512"],
     "length 512 needs 64 pairs"),
    (["--seed=-1"], "seed: expected an int >= 0, found -1"),
    (["--learning_rate=-1"], "learning_rate: expected a finite number > 0"),
    (["--ratios=3:1,3:1"], "ratios: expected distinct ratios"),
    (["--batch_size=1"], "batch_size: expected an int >= 2, found 1"),
    (["--seeds=0"], "--seeds: expected an int >= 1, found 0"),
    (["--placements=sideways"], "--placements: 'sideways' of "
     "placement_ratio='3:1' over num_layers=8: placement: expected one of "
     "periodic, bottom, top, middle, ends, found 'sideways'"),
    (["--patterns=LLXFLLLF"], "--patterns: expected letters L (linear) and "
     "F (full), one per layer, found 'LLXFLLLF'"),
    (["--patterns=LLF"], "--patterns: expected num_layers=8 letters L/F"),
    (["--retrieval_lengths=64,2"], "--retrieval_lengths: expected lengths "
     ">= 3"),
])
def test_compare_ratios_bad_flags_fail_before_training(args, message,
                                                       tmp_path,
                                                       monkeypatch):
  holders = _parse(cr.define_flags, f"--workdir={tmp_path}",
                   "--preset=smoke", *args)
  with pytest.raises(ValueError, match=re.escape(message)):
    cr.study_from_flags(holders)

  # The script's main refuses it (one line, exit 1) before any training.
  def no_training(*args, **kwargs):
    raise AssertionError("trained before checking the flags")

  monkeypatch.setattr(cr, "_HOLDERS", holders, raising=False)
  monkeypatch.setattr(cr.train_lib, "train", no_training)
  with pytest.raises(cli.UserError, match=re.escape(message)):
    cr.main(["prog"])
  assert not os.path.exists(tmp_path / "runs")


def test_compare_ratios_eval_length_is_not_replaced():
  study = cr.PRESETS["smoke"]
  # Length 0 used to fall back to the training length (labelled recall@0).
  with pytest.raises(ValueError, match="seq_len: expected an int >= 1"):
    study.mqar(0)
  assert study.mqar(128).seq_len == 128
  assert study.mqar().seq_len == study.seq_len


def test_compare_ratios_presets_are_valid():
  for name, study in cr.PRESETS.items():
    assert study.replace() == study, name
  holders = _parse(cr.define_flags, "--workdir=/tmp/x", "--preset=smoke",
                   "--steps=1", "--eval_lengths=16,64")
  study = cr.study_from_flags(holders)
  assert study.steps == 1 and study.eval_lengths == (16, 64)


# ----------------------------------------------------------- long_context
@pytest.mark.parametrize("attention_block, gdr_block, message", [
    (0, None, "--attention_block: expected a positive integer, found 0"),
    (-4, None, "--attention_block: expected a positive integer, found -4"),
    (512, 0, "--gdr_block: expected a positive integer, found 0"),
    (512, -16, "--gdr_block: expected a positive integer, found -16"),
])
def test_long_context_bad_blocks(attention_block, gdr_block, message):
  with pytest.raises(long_context.ConfigError, match=re.escape(message)):
    long_context.check_blocks(attention_block, gdr_block)


def test_long_context_good_blocks():
  long_context.check_blocks(512, None)
  long_context.check_blocks(1, 16)


@pytest.mark.parametrize("mode", ["train", "forward"])
def test_long_context_max_len_only_with_prefill(mode):
  """--max_len sets the prefill cache; with another mode it used to be
  ignored without a word."""
  cfg = long_context.build_config("tiny", 256, mode=mode)
  mesh = long_context.build_mesh("seq:1")
  long_context.check_lengths(cfg, mesh, 256, 1, mode)
  with pytest.raises(long_context.ConfigError, match=re.escape(
      f"--max_len: sets the cache slots of --mode prefill only, found "
      f"--max_len 512 with --mode {mode}")):
    long_context.check_lengths(cfg, mesh, 256, 1, mode, max_len=512)
  prefill = long_context.build_config("tiny", 256, mode="prefill")
  long_context.check_lengths(prefill, mesh, 256, 1, "prefill", max_len=512)
