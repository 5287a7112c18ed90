"""Generates text from a prompt, printing tokens as they are decoded.

With `--checkpoint` it loads a transformers Qwen3.5 folder (config.json,
*.safetensors and tokenizer.json, read with the `tokenizers` library);
without one it runs the `tiny` preset with random weights and a byte-level
tokenizer, so it works on any machine, offline (the text is noise).

  python -m experiments.generate --prompt "Hello"
  python -m experiments.generate --checkpoint /path/to/Qwen3.5-0.8B \
      --prompt "The capital of France is" --max_new_tokens 64
  python -m experiments.generate --checkpoint DIR --temperature 0.7 \
      --top_p 0.9 --top_k 50 --seed 1
  python -m experiments.generate --checkpoint DIR --quantize int8

Decoding runs `--block_steps` tokens per compiled call and prints after each
call (`qwen_jax.generate.stream`). Stop tokens default to the checkpoint's
eos ids (config.json and generation_config.json).

Every flag, the checkpoint folder, its config.json and tokenizer.json, the
prompt's length and the stop ids are checked before the weights are read;
a misuse ends with one line on stderr and exit status 1 (2 for usage
errors); see experiments/cli.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
import qwen_jax
from qwen_jax.config import is_int
from qwen_jax.generate import DEFAULT_PREFILL_BLOCK
from qwen_jax.generate import stream
from qwen_jax.quantize import MODES as QUANTIZE_MODES


def define_flags(flag_values: flags.FlagValues = flags.FLAGS
                 ) -> dict[str, flags.FlagHolder]:
  """Defines the script's flags on `flag_values`, with validators.

  Called when the script runs, not on import, so that this module can be
  imported next to other experiment scripts that define --checkpoint,
  --seed or --dtype too. A value out of range is a flag error, reported
  before anything is loaded.
  """
  fv = flag_values
  holders = {
      "checkpoint": flags.DEFINE_string(
          "checkpoint", None, "A transformers Qwen3.5 checkpoint folder (with "
          "tokenizer.json). Default: a tiny random model, byte tokenizer.",
          flag_values=fv),
      "prompt": flags.DEFINE_string("prompt", "Hello, my name is",
                                    "The prompt text.", flag_values=fv),
      "max_new_tokens": flags.DEFINE_integer(
          "max_new_tokens", 64, "Tokens to generate.", lower_bound=1,
          flag_values=fv),
      "temperature": flags.DEFINE_float(
          "temperature", 0.0, "0 = greedy; > 0 samples logits / T.",
          flag_values=fv),
      "top_k": flags.DEFINE_integer(
          "top_k", 0, "Sample among the k most likely tokens (0 = off).",
          lower_bound=0, flag_values=fv),
      "top_p": flags.DEFINE_float(
          "top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).",
          flag_values=fv),
      "seed": flags.DEFINE_integer(
          "seed", 0, "Sampler seed (and the random weights without "
          "--checkpoint).", flag_values=fv),
      "stop_tokens": flags.DEFINE_list(
          "stop_tokens", None, "Stop token ids (default: the checkpoint's "
          "eos ids; none for the random model).", flag_values=fv),
      "dtype": flags.DEFINE_enum(
          "dtype", "auto", ["auto", "float32", "bfloat16"],
          "Compute and parameter dtype (auto: bfloat16 on GPU/TPU, float32 "
          "on CPU).", flag_values=fv),
      "max_len": flags.DEFINE_integer(
          "max_len", None, "Longest prompt + new tokens accepted (default: "
          "the model's max_position_embeddings).", lower_bound=1,
          flag_values=fv),
      "block_steps": flags.DEFINE_integer(
          "block_steps", 8, "Decode steps per compiled call (printing "
          "granularity).", lower_bound=1, flag_values=fv),
      "prefill_block": flags.DEFINE_integer(
          "prefill_block", DEFAULT_PREFILL_BLOCK,
          "Prompt tokens per prefill call (>= 2).", lower_bound=2,
          flag_values=fv),
      "quantize": flags.DEFINE_enum(
          "quantize", "none", ["none", *QUANTIZE_MODES],
          "Weight-only quantization of the loaded weights "
          "(qwen_jax.quantize): int8 reads a quarter of float32's bytes a "
          "token.", flag_values=fv),
  }
  flags.register_validator(
      "temperature", lambda v: _temperature_error(v) is None,
      "expected a finite value >= 0 (0 = greedy)", flag_values=fv)
  flags.register_validator(
      "prompt", lambda v: _prompt_error(v) is None,
      "expected some text", flag_values=fv)
  flags.register_validator(
      "top_p", lambda v: _top_p_error(v) is None,
      "expected a value in (0, 1] (1 = off)", flag_values=fv)
  flags.register_validator(
      "stop_tokens", lambda v: _stop_tokens_error(v) is None,
      "expected comma-separated token ids (ints >= 0)", flag_values=fv)
  return holders


def _temperature_error(temperature: float) -> str | None:
  if not 0.0 <= temperature < float("inf"):  # NaN fails too
    return (f"--temperature: expected a finite value >= 0 (0 = greedy), "
            f"found {temperature}")
  return None


def _prompt_error(prompt: str | None) -> str | None:
  if not prompt:
    return f"--prompt: expected some text, found {prompt!r}"
  return None


def _top_p_error(top_p: float) -> str | None:
  if not 0.0 < top_p <= 1.0:  # NaN fails too
    return f"--top_p: expected a value in (0, 1] (1 = off), found {top_p}"
  return None


def _stop_tokens_error(stop_tokens: Sequence[Any] | None) -> str | None:
  for s in stop_tokens or ():
    try:
      ok = int(s) >= 0
    except (TypeError, ValueError):
      ok = False
    if not ok:
      return (f"--stop_tokens: expected comma-separated integer token ids, "
              f"found {s!r}")
  return None


def check_options(top_k: int = 0, top_p: float = 1.0,
                  stop_tokens: Sequence[Any] | None = None, *,
                  temperature: float = 0.0, max_new_tokens: int = 1,
                  max_len: int | None = None, block_steps: int = 1,
                  prefill_block: int = DEFAULT_PREFILL_BLOCK,
                  prompt: str = "x") -> None:
  """Raises cli.UserError (a ValueError) naming the flag of a bad option.

  The flags' validators refuse the same values at parse time; this covers
  `run` called from Python.
  """
  if not is_int(top_k) or top_k < 0:
    raise cli.UserError(f"--top_k: expected an int >= 0 (0 = off), found "
                        f"{top_k!r}")
  for error in (_top_p_error(top_p), _stop_tokens_error(stop_tokens),
                _temperature_error(temperature), _prompt_error(prompt)):
    if error:
      raise cli.UserError(error)
  for flag, value, low in (("--max_new_tokens", max_new_tokens, 1),
                           ("--block_steps", block_steps, 1),
                           ("--prefill_block", prefill_block, 2)):
    if not is_int(value) or value < low:
      raise cli.UserError(f"{flag}: expected an int >= {low}, found "
                          f"{value!r}")
  if max_len is not None and (not is_int(max_len) or max_len < 1):
    raise cli.UserError(f"--max_len: expected an int >= 1, found "
                        f"{max_len!r}")


TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255 (for the random demo model)."""

  vocab_size = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    text = bytes(int(i) for i in ids).decode("utf-8", errors="replace")
    # Random weights emit control bytes; keep the terminal sane.
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd"
                   for c in text)


class HFTokenizer:
  """A `tokenizers.Tokenizer` read from tokenizer.json.

  Raises:
    cli.UserError: a file the `tokenizers` library cannot read.
  """

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      # tokenizers raises a bare Exception for a file it cannot parse.
      raise cli.UserError(
          f"{path}: expected a tokenizer.json of the tokenizers library, "
          f"found a file it cannot read ({cli.one_line(e)})") from e

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _checkpoint_eos(path: str, vocab_size: int | None = None) -> list[int]:
  """eos ids from config.json and generation_config.json (deduplicated).

  Raises:
    cli.UserError: a file that is not JSON, or an eos id that is not an int
      in [0, vocab_size) (named with its file, not as --stop_tokens).
  """
  ids = []
  for name in ("config.json", "generation_config.json"):
    f = os.path.join(path, name)
    if not os.path.exists(f):
      continue
    where = f"--checkpoint {path!r}: {name}"
    try:
      with open(f) as fh:
        d = json.load(fh)
    except ValueError as e:
      raise cli.UserError(f"{where}: expected JSON, found a file it cannot "
                          f"parse ({e})") from e
    if not isinstance(d, dict):
      raise cli.UserError(f"{where}: expected a JSON object, found "
                          f"{type(d).__name__}")
    for src in (d, d.get("text_config") or {}):
      eos = src.get("eos_token_id") if isinstance(src, dict) else None
      if eos is None:
        continue
      for i in (eos if isinstance(eos, list) else [eos]):
        if not is_int(i) or i < 0 or (vocab_size is not None
                                      and i >= vocab_size):
          span = f"[0, {vocab_size})" if vocab_size else ">= 0"
          raise cli.UserError(
              f"{where} eos_token_id: expected ints in {span} (the model's "
              f"vocabulary), found {eos!r}; --stop_tokens sets the stop "
              f"ids instead")
        if int(i) not in ids:
          ids.append(int(i))
  return ids


def check_checkpoint(checkpoint: str) -> None:
  """Raises cli.UserError unless `checkpoint` is a folder holding
  config.json and tokenizer.json (nothing is read)."""
  cli.existing_folder("--checkpoint", checkpoint)
  for name in ("config.json", TOKENIZER_FILE):
    cli.existing_file(f"--checkpoint {checkpoint!r}",
                      os.path.join(checkpoint, name), f"a {name} in it")


def describe(checkpoint: str | None, stop_tokens: Sequence[Any] | None
             ) -> tuple[qwen_jax.QwenConfig, Any, list[int]]:
  """(config, tokenizer, stop ids) without reading the weights.

  The config is the checkpoint's config.json (or the `tiny` preset); the
  stop ids are `stop_tokens`, else the checkpoint's eos ids.

  Raises:
    cli.UserError: a folder without config.json or tokenizer.json, a
      config.json or tokenizer.json that cannot be read, or a stop id
      outside the vocabulary (named as the flag or the file it came from).
  """
  if not checkpoint:
    cfg = qwen_jax.QwenConfig.from_preset("tiny")
    tokenizer, eos = ByteTokenizer(), []
  else:
    check_checkpoint(checkpoint)
    with cli.user_errors(f"--checkpoint {checkpoint!r}"):
      cfg = qwen_jax.QwenConfig.from_hf_config(checkpoint)
    tokenizer = HFTokenizer(os.path.join(checkpoint, TOKENIZER_FILE))
    eos = ([] if stop_tokens is not None
           else _checkpoint_eos(checkpoint, cfg.vocab_size))
  if stop_tokens is None:
    return cfg, tokenizer, eos
  stops = [int(s) for s in stop_tokens]
  bad = [s for s in stops if not 0 <= s < cfg.vocab_size]
  if bad:
    raise cli.UserError(f"--stop_tokens: expected ids in [0, "
                        f"{cfg.vocab_size}) (the model's vocabulary), found "
                        f"{bad}")
  return cfg, tokenizer, stops


def load(checkpoint: str | None, dtype: str, seed: int):
  """(cfg, params): the checkpoint's weights, or the random `tiny` model.

  Raises:
    cli.UserError: a bad checkpoint (the loader's message says which).
  """
  if dtype == "auto":
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if not checkpoint:
    cfg = qwen_jax.QwenConfig.from_preset("tiny", dtype=dtype,
                                          param_dtype=dtype)
    model = qwen_jax.Qwen35(cfg)
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)))
    params = flax.linen.meta.unbox(init(jax.random.PRNGKey(seed)))["params"]
    # Scale the init up so the random model's choices are not all ties.
    params = jax.tree_util.tree_map(lambda x: x * 30 if x.ndim > 1 else x,
                                    params)
    return cfg, params
  with cli.user_errors(f"--checkpoint {checkpoint!r}"):
    return qwen_jax.load_hf_checkpoint(checkpoint, dtype=dtype)


def run(checkpoint: str | None, prompt: str, max_new_tokens: int = 64,
        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int = 0, stop_tokens: Sequence[int] | None = None,
        dtype: str = "auto", max_len: int | None = None,
        block_steps: int = 8, prefill_block: int = DEFAULT_PREFILL_BLOCK,
        out=sys.stdout, quantize: str = "none") -> dict[str, Any]:
  """Loads, generates and streams the prompt and new text to `out`.

  Returns:
    {"text", "ids" (new token ids), "prompt_tokens", "prefill_s",
     "decode_s", "tokens_per_s"}; times include compilation on first use.

  Raises:
    cli.UserError (a ValueError), all before the weights are read: a bad
      option, a bad checkpoint folder, config.json, tokenizer.json or eos
      id, an empty prompt, or a prompt plus max_new_tokens longer than
      max_len / max_position_embeddings; then a checkpoint whose weights
      cannot be loaded.
  """
  check_options(top_k, top_p, stop_tokens, temperature=temperature,
                max_new_tokens=max_new_tokens, max_len=max_len,
                block_steps=block_steps, prefill_block=prefill_block,
                prompt=prompt)
  if quantize != "none" and quantize not in QUANTIZE_MODES:
    raise cli.UserError(f"--quantize: expected one of "
                        f"{['none', *QUANTIZE_MODES]}, found {quantize!r}")
  cfg, tokenizer, stops = describe(checkpoint, stop_tokens)
  ids = tokenizer.encode(prompt)
  if not ids:
    raise cli.UserError(f"--prompt: expected at least one token, found "
                        f"none in {prompt!r}")
  limit = cfg.max_position_embeddings if max_len is None else min(
      max_len, cfg.max_position_embeddings)
  if len(ids) + max_new_tokens > limit:
    raise cli.UserError(
        f"--prompt: {len(ids)} tokens + --max_new_tokens {max_new_tokens} = "
        f"{len(ids) + max_new_tokens} exceeds the maximum of {limit} tokens "
        f"(max_len / max_position_embeddings)")
  cfg, params = load(checkpoint, dtype, seed)
  if quantize != "none":
    params = qwen_jax.quantize(cfg, params, quantize)
  gen = stream(cfg, params, np.asarray([ids], np.int32), max_new_tokens,
               temperature=temperature, top_k=top_k or None,
               top_p=top_p if top_p < 1.0 else None, seed=seed,
               stop_tokens=stops, block_steps=block_steps,
               prefill_block=prefill_block)
  out.write(prompt)
  out.flush()
  new: list[int] = []
  shown = ""
  t0 = time.perf_counter()
  prefill_s = None
  try:
    for block in gen:
      if prefill_s is None:
        prefill_s = time.perf_counter() - t0
      new.extend(int(i) for i in block[0])
      kept = [i for i in new if i not in stops]
      text = tokenizer.decode(kept)
      if text.endswith("\ufffd") and len(kept) == len(new):
        continue  # maybe half a character: wait for the next block
      out.write(text[len(shown):] if text.startswith(shown)
                else "\n" + text)
      out.flush()
      shown = text
  except Exception:
    out.write("\n")  # an error message then starts on its own line
    out.flush()
    raise
  total = time.perf_counter() - t0
  text = tokenizer.decode([i for i in new if i not in stops])
  if text != shown:
    out.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
  out.write("\n")
  decode_s = total - prefill_s
  return dict(text=text, ids=new, prompt_tokens=len(ids), prefill_s=prefill_s,
              decode_s=decode_s,
              tokens_per_s=(len(new) - 1) / decode_s if decode_s > 0 else 0.0)


_HOLDERS: dict[str, flags.FlagHolder] = {}


def main(argv):
  del argv  # cli.run refuses positional arguments
  v = {name: h.value for name, h in _HOLDERS.items()}
  if v["checkpoint"] is not None:
    check_checkpoint(v["checkpoint"])  # "" is not the random model
  r = run(v["checkpoint"], v["prompt"], v["max_new_tokens"],
          v["temperature"], v["top_k"], v["top_p"], v["seed"],
          v["stop_tokens"], v["dtype"], v["max_len"], v["block_steps"],
          v["prefill_block"], quantize=v["quantize"])
  print(f"[{r['prompt_tokens']} prompt tokens, {len(r['ids'])} new; "
        f"prefill {r['prefill_s']:.2f} s, decode "
        f"{r['tokens_per_s']:.1f} tokens/s, compilation included; "
        f"{jax.default_backend()}]", file=sys.stderr)


if __name__ == "__main__":
  _HOLDERS = define_flags()
  cli.run(main)
