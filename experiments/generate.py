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

Decoding runs `--block_steps` tokens per compiled call and prints after each
call (`qwen_jax.generate.stream`). Stop tokens default to the checkpoint's
eos ids (config.json and generation_config.json).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

import qwen_jax
from qwen_jax.config import is_int
from qwen_jax.generate import DEFAULT_PREFILL_BLOCK
from qwen_jax.generate import stream


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
          "max_new_tokens", 64, "Tokens to generate.", flag_values=fv),
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
          "the model's max_position_embeddings).", flag_values=fv),
      "block_steps": flags.DEFINE_integer(
          "block_steps", 8, "Decode steps per compiled call (printing "
          "granularity).", flag_values=fv),
      "prefill_block": flags.DEFINE_integer(
          "prefill_block", DEFAULT_PREFILL_BLOCK,
          "Prompt tokens per prefill call.", flag_values=fv),
  }
  flags.register_validator(
      "top_p", lambda v: _top_p_error(v) is None,
      "expected a value in (0, 1] (1 = off)", flag_values=fv)
  flags.register_validator(
      "stop_tokens", lambda v: _stop_tokens_error(v) is None,
      "expected comma-separated integer token ids", flag_values=fv)
  return holders


def _top_p_error(top_p: float) -> str | None:
  if not 0.0 < top_p <= 1.0:  # NaN fails too
    return f"--top_p: expected a value in (0, 1] (1 = off), found {top_p}"
  return None


def _stop_tokens_error(stop_tokens: Sequence[Any] | None) -> str | None:
  for s in stop_tokens or ():
    try:
      int(s)
    except (TypeError, ValueError):
      return (f"--stop_tokens: expected comma-separated integer token ids, "
              f"found {s!r}")
  return None


def check_options(top_k: int = 0, top_p: float = 1.0,
                  stop_tokens: Sequence[Any] | None = None) -> None:
  """Raises ValueError naming the flag of a bad sampling option."""
  if not is_int(top_k) or top_k < 0:
    raise ValueError(f"--top_k: expected an int >= 0 (0 = off), found "
                     f"{top_k!r}")
  for error in (_top_p_error(top_p), _stop_tokens_error(stop_tokens)):
    if error:
      raise ValueError(error)


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
  """A `tokenizers.Tokenizer` read from tokenizer.json."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self._tok = tokenizers.Tokenizer.from_file(path)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _checkpoint_eos(path: str) -> list[int]:
  """eos ids from config.json and generation_config.json (deduplicated)."""
  ids = []
  for name in ("config.json", "generation_config.json"):
    f = os.path.join(path, name)
    if not os.path.exists(f):
      continue
    with open(f) as fh:
      d = json.load(fh)
    for src in (d, d.get("text_config") or {}):
      eos = src.get("eos_token_id")
      if eos is None:
        continue
      for i in (eos if isinstance(eos, list) else [eos]):
        if int(i) not in ids:
          ids.append(int(i))
  return ids


def load(checkpoint: str | None, dtype: str, seed: int):
  """(cfg, params, tokenizer, default stop ids).

  Raises:
    ValueError: a folder that is missing, lacks tokenizer.json or holds a
      bad checkpoint (the loader's message says which).
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
    return cfg, params, ByteTokenizer(), []
  if not os.path.isdir(checkpoint):
    raise ValueError(f"--checkpoint: expected a folder, found {checkpoint!r}")
  tok_path = os.path.join(checkpoint, TOKENIZER_FILE)
  if not os.path.exists(tok_path):
    raise ValueError(f"--checkpoint {checkpoint!r}: expected "
                     f"{TOKENIZER_FILE}, found "
                     f"{sorted(os.listdir(checkpoint))}")
  tokenizer = HFTokenizer(tok_path)
  cfg, params = qwen_jax.load_hf_checkpoint(checkpoint, dtype=dtype)
  return cfg, params, tokenizer, _checkpoint_eos(checkpoint)


def run(checkpoint: str | None, prompt: str, max_new_tokens: int = 64,
        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int = 0, stop_tokens: Sequence[int] | None = None,
        dtype: str = "auto", max_len: int | None = None,
        block_steps: int = 8, prefill_block: int = DEFAULT_PREFILL_BLOCK,
        out=sys.stdout) -> dict[str, Any]:
  """Loads, generates and streams the prompt and new text to `out`.

  Returns:
    {"text", "ids" (new token ids), "prompt_tokens", "prefill_s",
     "decode_s", "tokens_per_s"}; times include compilation on first use.

  Raises:
    ValueError: a bad top_k, top_p or stop token (before anything is
      loaded), a bad checkpoint folder, an empty prompt, or a prompt plus
      max_new_tokens longer than max_len / max_position_embeddings.
  """
  check_options(top_k, top_p, stop_tokens)
  cfg, params, tokenizer, eos = load(checkpoint, dtype, seed)
  ids = tokenizer.encode(prompt)
  if not ids:
    raise ValueError("--prompt: expected at least one token, found none")
  limit = cfg.max_position_embeddings if max_len is None else min(
      max_len, cfg.max_position_embeddings)
  if len(ids) + max_new_tokens > limit:
    raise ValueError(
        f"--prompt: {len(ids)} tokens + --max_new_tokens {max_new_tokens} = "
        f"{len(ids) + max_new_tokens} exceeds the maximum of {limit} tokens "
        f"(max_len / max_position_embeddings)")
  stops = eos if stop_tokens is None else [int(s) for s in stop_tokens]
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
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  v = {name: h.value for name, h in _HOLDERS.items()}
  try:
    r = run(v["checkpoint"], v["prompt"], v["max_new_tokens"],
            v["temperature"], v["top_k"], v["top_p"], v["seed"],
            v["stop_tokens"], v["dtype"], v["max_len"], v["block_steps"],
            v["prefill_block"])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"[{r['prompt_tokens']} prompt tokens, {len(r['ids'])} new; "
        f"prefill {r['prefill_s']:.2f} s, decode "
        f"{r['tokens_per_s']:.1f} tokens/s, compilation included; "
        f"{jax.default_backend()}]", file=sys.stderr)


if __name__ == "__main__":
  _HOLDERS = define_flags()
  app.run(main)
