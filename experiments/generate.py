"""Generates text from a prompt, or from a file of prompts in batches.

With `--checkpoint` it loads a transformers Qwen3.5 folder: config.json,
*.safetensors, the tokenizer (tokenizer.json, tokenizer_config.json and its
chat template, read by `qwen_jax.tokenizer.load_tokenizer`) and
generation_config.json, whose sampling defaults (do_sample, temperature,
top_k, top_p, min_p, repetition_penalty, presence_penalty, eos and pad ids)
apply to every flag left unset. Without one it runs the `tiny` preset with
random weights and a byte-level tokenizer, so it works on any machine,
offline (the text is noise).

  python -m experiments.generate --prompt "Hello"
  python -m experiments.generate --checkpoint /path/to/Qwen3.5-0.8B \
      --prompt "The capital of France is" --max_new_tokens 64
  python -m experiments.generate --checkpoint DIR --chat \
      --prompt "Name three rivers." --noenable_thinking
  python -m experiments.generate --checkpoint DIR --temperature 0.7 \
      --top_p 0.9 --top_k 50 --min_p 0.05 --presence_penalty 1.5 --seed 1
  python -m experiments.generate --checkpoint DIR \
      --prompts_file in.jsonl --output out.jsonl --batch_size 16
  python -m experiments.generate --checkpoint DIR --image a.png \
      --image b.png --prompt "Describe these pictures."
  python -m experiments.generate --checkpoint DIR --video frames_dir \
      --prompt "What happens here?"
  python -m experiments.generate --checkpoint DIR --quantize int8

One prompt: decoding runs `--block_steps` tokens per compiled call and the
text is printed after each call (`qwen_jax.generate.stream`), never
splitting a character, up to a stop id (--stop_tokens, default the
checkpoint's eos ids from config.json and generation_config.json) or a
stop string (--stop_strings, not printed). --chat renders the prompt as a
user message with the checkpoint's chat template (--enable_thinking passes
enable_thinking to it).

Images and videos (a checkpoint with a vision tower and its
preprocessor_config.json; without --checkpoint, the `tiny-vl` preset with
random weights): each --image is a picture file, each --video a folder of
frames (image files, in name order, already sampled). They come before the
prompt text, each as <|vision_start|> placeholder <|vision_end|> (the
placeholders expanded per image and per frame as transformers' Qwen3-VL
processor does, without frame times), in the order given, images first
They are for one plain prompt: --chat and --prompts_file take text only.

A prompts file (--prompts_file, JSON lines) holds one prompt per line:
`{"prompt": "text"}` (plain text; a user message with --chat) or
`{"messages": [{"role": ..., "content": ...}, ...]}` (rendered with the
chat template and its generation prompt), with optional per-line fields:
"id" (a string or an int; default the line's 0-based number), and
max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
presence_penalty, seed (default --seed + the line number), stop (a list
of stop strings) and enable_thinking, which override the flags. Prompts
with the same sampling rule are decoded together, up to --batch_size at a
time, sorted by length and left padded; each row's tokens are those it
would get alone. Each result is appended to --output as soon as its row
stops, as one JSON line:

  {"id": ..., "index": line number, "text": new text (without the stop
   token or stop string), "num_tokens": new tokens (the stop token
   included), "stop_reason": "stop_token" | "stop_string" | "length",
   "stop": the stop string or null, "prompt_tokens": ..., "input_sha256":
   hash of the prompt's line}

A rerun with the same --output skips the ids already there (a line cut off
by a kill is dropped first); an --output that holds other lines, or
results of other prompts (another input_sha256 for an id), is refused
before anything is loaded, and never changed.

Every flag, the checkpoint folder, its config.json, tokenizer files and
generation_config.json, the image and video paths (and that the model
takes them), every prompt (its length included) and the stop ids are
checked before the weights are read; a misuse ends with one line
on stderr and exit status 1 (2 for usage errors); see experiments/cli.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Sequence, TextIO

from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from experiments import cli
import qwen_jax
from qwen_jax import image_processing
from qwen_jax import vision
from qwen_jax import tokenizer as tokenizer_lib
from qwen_jax.config import is_int
from qwen_jax.generate import DEFAULT_PREFILL_BLOCK
from qwen_jax.generate import Sampler
from qwen_jax.generate import stream
from qwen_jax.quantize import MODES as QUANTIZE_MODES

# Flags whose values mean "off" when given (a generation config's value is
# then not used).
_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p",
                   "repetition_penalty", "presence_penalty")


def _sampling_flag_errors(temperature=None, top_k=None, top_p=None,
                          min_p=None, repetition_penalty=None,
                          presence_penalty=None) -> str | None:
  """The first bad sampling value, as a message naming its flag."""
  def finite(v):
    return v == v and abs(v) != float("inf")  # NaN != NaN
  checks = (
      ("temperature", temperature,
       lambda v: finite(v) and v >= 0, "a finite value >= 0 (0 = greedy)"),
      ("top_k", top_k, lambda v: is_int(v) and v >= 0,
       "an int >= 0 (0 = off)"),
      ("top_p", top_p, lambda v: 0.0 < v <= 1.0,
       "a value in (0, 1] (1 = off)"),
      ("min_p", min_p, lambda v: 0.0 <= v <= 1.0,
       "a value in [0, 1] (0 = off)"),
      ("repetition_penalty", repetition_penalty,
       lambda v: finite(v) and v > 0, "a finite value > 0 (1 = off)"),
      ("presence_penalty", presence_penalty, finite,
       "a finite value (0 = off)"),
  )
  for name, value, ok, expected in checks:
    if value is None:
      continue
    try:
      good = bool(ok(value))
    except TypeError:
      good = False
    if not good:
      return f"--{name}: expected {expected}, found {value}"
  return None


def define_sampling_flags(fv: flags.FlagValues
                          ) -> dict[str, flags.FlagHolder]:
  """The sampling, stop, dtype and decoding flags generate and chat share.

  The sampling flags default to None: the checkpoint's
  generation_config.json, else greedy with nothing filtered.
  """
  holders = {
      "temperature": flags.DEFINE_float(
          "temperature", None, "0 = greedy; > 0 samples logits / T "
          "(default: generation_config.json's, else greedy).",
          flag_values=fv),
      "top_k": flags.DEFINE_integer(
          "top_k", None, "Sample among the k most likely tokens (0 = off; "
          "default: generation_config.json's).", flag_values=fv),
      "top_p": flags.DEFINE_float(
          "top_p", None, "Nucleus sampling mass in (0, 1] (1 = off; default: "
          "generation_config.json's).", flag_values=fv),
      "min_p": flags.DEFINE_float(
          "min_p", None, "Keep tokens with probability >= min_p times the "
          "largest (0 = off; default: generation_config.json's).",
          flag_values=fv),
      "repetition_penalty": flags.DEFINE_float(
          "repetition_penalty", None, "transformers' repetition penalty of "
          "the prompt's and generated tokens (1 = off; default: "
          "generation_config.json's).", flag_values=fv),
      "presence_penalty": flags.DEFINE_float(
          "presence_penalty", None, "Subtracted from the logits of generated "
          "tokens, as in vLLM (0 = off; default: generation_config.json's).",
          flag_values=fv),
      "seed": flags.DEFINE_integer(
          "seed", 0, "Sampler seed (and the random weights without "
          "--checkpoint).", flag_values=fv),
      "stop_tokens": flags.DEFINE_list(
          "stop_tokens", None, "Stop token ids (default: the checkpoint's "
          "eos ids; none for the random model).", flag_values=fv),
      "stop_strings": flags.DEFINE_multi_string(
          "stop_strings", None, "A string that ends the text (not shown); "
          "repeat the flag for several.", flag_values=fv),
      "dtype": flags.DEFINE_enum(
          "dtype", "auto", ["auto", "float32", "bfloat16"],
          "Compute and parameter dtype (auto: bfloat16 on GPU/TPU, float32 "
          "on CPU).", flag_values=fv),
      "block_steps": flags.DEFINE_integer(
          "block_steps", 8, "Decode steps per compiled call (printing "
          "granularity).", lower_bound=1, flag_values=fv),
      "prefill_block": flags.DEFINE_integer(
          "prefill_block", DEFAULT_PREFILL_BLOCK,
          "Prompt tokens per prefill call (>= 2).", lower_bound=2,
          flag_values=fv),
  }
  for name in _SAMPLING_FLAGS:
    _validate(fv, name, lambda v, name=name: _sampling_flag_errors(
        **{name: v}))
  _validate(fv, "stop_tokens", _stop_tokens_error)
  _validate(fv, "stop_strings", _stop_strings_error)
  return holders


def _validate(fv: flags.FlagValues, name: str,
              error: Callable[[Any], str | None]) -> None:
  """Registers `error` (a message or None) as --name's validator."""
  def check(value: Any) -> bool:
    message = error(value)
    if message:
      raise flags.ValidationError(message)
    return True
  flags.register_validator(name, check, flag_values=fv)


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
      "chat": flags.DEFINE_bool(
          "chat", False, "Render the prompt as a user message with the "
          "checkpoint's chat template.", flag_values=fv),
      "enable_thinking": flags.DEFINE_bool(
          "enable_thinking", None, "Passed to the chat template (default: "
          "the template's own default).", flag_values=fv),
      "max_new_tokens": flags.DEFINE_integer(
          "max_new_tokens", None, "Tokens to generate (default: "
          "generation_config.json's max_new_tokens, else 64).",
          lower_bound=1, flag_values=fv),
      "max_len": flags.DEFINE_integer(
          "max_len", None, "Longest prompt + new tokens accepted (default: "
          "the model's max_position_embeddings).", lower_bound=1,
          flag_values=fv),
      "prompts_file": flags.DEFINE_string(
          "prompts_file", None, "JSON lines of prompts to run in batches "
          "(see the module docstring); needs --output.", flag_values=fv),
      "output": flags.DEFINE_string(
          "output", None, "JSON lines of results, appended as rows finish; "
          "a rerun skips the ids already there.", flag_values=fv),
      "batch_size": flags.DEFINE_integer(
          "batch_size", 8, "Prompts decoded together with --prompts_file.",
          lower_bound=1, flag_values=fv),
      "image": flags.DEFINE_multi_string(
          "image", [], "An image file to put before the prompt (repeat "
          "for several). Needs a checkpoint with a vision tower.",
          flag_values=fv),
      "video": flags.DEFINE_multi_string(
          "video", [], "A folder of video frames (image files, in name "
          "order) to put before the prompt (repeat for several).",
          flag_values=fv),
      "quantize": flags.DEFINE_enum(
          "quantize", "none", ["none", *QUANTIZE_MODES],
          "Weight-only quantization of the loaded weights "
          "(qwen_jax.quantize): int8 reads a quarter of float32's bytes a "
          "token.", flag_values=fv),
  }
  holders.update(define_sampling_flags(fv))
  _validate(fv, "prompt", _prompt_error)
  return holders


def _prompt_error(prompt: str | None) -> str | None:
  if not prompt:
    return f"--prompt: expected some text, found {prompt!r}"
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


def _stop_strings_error(stop_strings: Sequence[Any] | None) -> str | None:
  for s in stop_strings or ():
    if not isinstance(s, str) or not s:
      return f"--stop_strings: expected non-empty strings, found {s!r}"
  return None


def check_options(top_k: int | None = None, top_p: float | None = None,
                  stop_tokens: Sequence[Any] | None = None, *,
                  temperature: float | None = None,
                  max_new_tokens: int | None = 1,
                  max_len: int | None = None, block_steps: int = 1,
                  prefill_block: int = DEFAULT_PREFILL_BLOCK,
                  prompt: str = "x", min_p: float | None = None,
                  repetition_penalty: float | None = None,
                  presence_penalty: float | None = None,
                  stop_strings: Sequence[str] | None = None) -> None:
  """Raises cli.UserError (a ValueError) naming the flag of a bad option.

  The flags' validators refuse the same values at parse time; this covers
  `run` called from Python.
  """
  for error in (
      _sampling_flag_errors(temperature, top_k, top_p, min_p,
                            repetition_penalty, presence_penalty),
      _stop_tokens_error(stop_tokens), _prompt_error(prompt),
      _stop_strings_error(stop_strings)):
    if error:
      raise cli.UserError(error)
  if max_new_tokens is not None:
    cli.positive_int("--max_new_tokens", max_new_tokens)
  cli.positive_int("--block_steps", block_steps)
  cli.positive_int("--prefill_block", prefill_block, 2)
  if max_len is not None:
    cli.positive_int("--max_len", max_len)


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255 (for the random demo model)."""

  vocab_size = 256
  chat_template = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False
             ) -> str:
    del skip_special_tokens  # no special tokens
    text = bytes(int(i) for i in ids).decode("utf-8", errors="replace")
    # Random weights emit control bytes; keep the terminal sane.
    return "".join(c if c.isprintable() or c in "\n\t\ufffd" else "\u00b7"
                   for c in text)

  def stream_decoder(self) -> tokenizer_lib.StreamDecoder:
    return tokenizer_lib.StreamDecoder(self)

  def apply_chat_template(self, *args, **kwargs):
    raise ValueError("the random model's byte tokenizer has no chat "
                     "template: give --checkpoint")


def _checkpoint_eos(path: str, vocab_size: int | None = None) -> list[int]:
  """eos ids from config.json and generation_config.json (deduplicated).

  Raises:
    cli.UserError: a file that is not JSON, or an eos id that is not an int
      in [0, vocab_size) (named with its file, not as --stop_tokens).
  """
  ids = []
  for name in ("config.json", tokenizer_lib.GENERATION_CONFIG_FILE):
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
  for name in ("config.json", tokenizer_lib.TOKENIZER_FILE):
    cli.existing_file(f"--checkpoint {checkpoint!r}",
                      os.path.join(checkpoint, name), f"a {name} in it")


@dataclasses.dataclass
class Described:
  """What a checkpoint folder says, without its weights.

  Attributes:
    cfg: the model config.
    tokenizer: its tokenizer (`ByteTokenizer` for the random model).
    stops: the stop ids (--stop_tokens, else the eos ids).
    generation_config: generation_config.json's defaults.
  """
  cfg: qwen_jax.QwenConfig
  tokenizer: Any
  stops: list[int]
  generation_config: tokenizer_lib.GenerationConfig

  def __iter__(self):  # (cfg, tokenizer, stops), as before
    return iter((self.cfg, self.tokenizer, self.stops))


def describe(checkpoint: str | None, stop_tokens: Sequence[Any] | None,
             vision_model: bool = False) -> Described:
  """Reads a checkpoint's config, tokenizer and generation defaults.

  The config is the checkpoint's config.json (or the `tiny` preset,
  `tiny-vl` with vision_model); the stop ids are `stop_tokens`, else the
  checkpoint's eos ids.

  Raises:
    cli.UserError: a folder without config.json or tokenizer.json, a
      config.json, tokenizer file or generation_config.json that cannot be
      read, or a stop id outside the vocabulary (named as the flag or the
      file it came from).
  """
  gc = tokenizer_lib.GenerationConfig()
  if not checkpoint:
    cfg = qwen_jax.QwenConfig.from_preset("tiny-vl" if vision_model
                                          else "tiny")
    tokenizer, eos = ByteTokenizer(), []
  else:
    check_checkpoint(checkpoint)
    where = f"--checkpoint {checkpoint!r}"
    with cli.user_errors(where):
      cfg = qwen_jax.QwenConfig.from_hf_config(checkpoint)
    eos = ([] if stop_tokens is not None
           else _checkpoint_eos(checkpoint, cfg.vocab_size))
    with cli.user_errors(where):
      tokenizer = tokenizer_lib.load_tokenizer(checkpoint)
      gc = tokenizer_lib.load_generation_config(checkpoint)
    if gc.pad_token_id is not None and gc.pad_token_id >= cfg.vocab_size:
      raise cli.UserError(
          f"{where}: {tokenizer_lib.GENERATION_CONFIG_FILE} pad_token_id: "
          f"expected an id in [0, {cfg.vocab_size}), found "
          f"{gc.pad_token_id}")
  if stop_tokens is None:
    return Described(cfg, tokenizer, eos, gc)
  stops = [int(s) for s in stop_tokens]
  bad = [s for s in stops if not 0 <= s < cfg.vocab_size]
  if bad:
    raise cli.UserError(f"--stop_tokens: expected ids in [0, "
                        f"{cfg.vocab_size}) (the model's vocabulary), found "
                        f"{bad}")
  return Described(cfg, tokenizer, stops, gc)


# Frame files a --video folder may hold.
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp",
                    ".tif", ".tiff")
PREPROCESSOR_FILE = image_processing.IMAGE_CONFIG_NAME
# The random `tiny-vl` model's preprocessing: 4-pixel patches, as its tower.
TINY_PROCESSOR = image_processing.ProcessorConfig(
    min_pixels=8 * 8, max_pixels=64 * 64, patch_size=4, temporal_patch_size=2,
    merge_size=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def check_media_paths(images: Sequence[str], videos: Sequence[str]
                      ) -> list[list[str]]:
  """The frame files of each --video; cli.UserError for a bad path.

  Every --image must be a file, every --video a folder holding at least one
  frame file (FRAME_EXTENSIONS); nothing is opened.
  """
  for path in images:
    cli.existing_file("--image", path)
  frames = []
  for path in videos:
    cli.existing_folder("--video", path)
    names = sorted(f for f in os.listdir(path)
                   if f.lower().endswith(FRAME_EXTENSIONS)
                   and os.path.isfile(os.path.join(path, f)))
    if not names:
      raise cli.UserError(f"--video {path!r}: expected a folder of frame "
                          f"images ({', '.join(FRAME_EXTENSIONS)}), found "
                          f"none")
    frames.append([os.path.join(path, f) for f in names])
  return frames


def prepare_media(cfg: qwen_jax.QwenConfig, checkpoint: str | None,
                  images: Sequence[str], videos: Sequence[str]
                  ) -> tuple[list[int], dict[str, np.ndarray]]:
  """(prompt ids of the images and videos, the model's media arguments).

  Checks that the model takes them (a tower, the placeholder ids, the
  checkpoint's preprocessor_config.json) and reads and preprocesses every
  file, all before any weight is read.

  Raises:
    cli.UserError: naming the flag and the file or field at fault.
  """
  if not images and not videos:
    return [], {}
  flag = "--image" if images else "--video"
  where = (f"the checkpoint {checkpoint!r}" if checkpoint
           else "the random model")
  if cfg.vision is None:
    raise cli.UserError(f"{flag}: expected a checkpoint with a vision tower "
                        f"(a vision_config in config.json), found "
                        f"{where} without one")
  for paths, name, token in ((images, "--image", "image_token_id"),
                             (videos, "--video", "video_token_id"),
                             (True, flag, "vision_start_token_id"),
                             (True, flag, "vision_end_token_id")):
    if paths and getattr(cfg, token) is None:
      raise cli.UserError(f"{name}: expected a model with a {token}, found "
                          f"{where} without one")
  if checkpoint:
    cli.existing_file(f"{flag}: --checkpoint {checkpoint!r}",
                      os.path.join(checkpoint, PREPROCESSOR_FILE),
                      f"a {PREPROCESSOR_FILE} in it")
    with cli.user_errors(f"--checkpoint {checkpoint!r}"):
      processor = qwen_jax.load_image_processor(checkpoint)
  else:
    processor = image_processing.VisionProcessor(TINY_PROCESSOR,
                                                 TINY_PROCESSOR)
  frames = check_media_paths(images, videos)

  def read(flag, path):
    try:
      with PIL.Image.open(path) as im:
        im.load()
        return im.copy()
    except (OSError, ValueError) as e:
      raise cli.UserError(f"{flag} {path!r}: expected an image file, found "
                          f"one Pillow cannot read ({cli.one_line(e)})"
                          ) from e

  with cli.user_errors(flag):
    out = processor(
        images=[read("--image", p) for p in images] or None,
        videos=[[read("--video", f) for f in v] for v in frames] or None)
  start, end = cfg.vision_start_token_id, cfg.vision_end_token_id
  image, video = cfg.image_token_id, cfg.video_token_id
  # A model may lack one placeholder (its inputs were refused above); the
  # expansion still wants four distinct ids.
  spare = iter(sorted(set(range(5)) - {start, end, image, video}))
  tokens = vision.VisionTokens(
      image_token_id=image if image is not None else next(spare),
      video_token_id=video if video is not None else next(spare),
      vision_start_token_id=start, vision_end_token_id=end)
  ids = ([start, tokens.image_token_id, end] * len(images) +
         [start, tokens.video_token_id, end] * len(videos))
  ids = image_processing.expand_placeholder_ids(
      ids, out.get("image_grid_thw"), out.get("video_grid_thw"),
      merge_size=cfg.vision.spatial_merge_size, tokens=tokens)
  return ids, out


def check_quantize(quantize: str) -> None:
  """Raises cli.UserError unless `quantize` is "none" or a mode of
  `qwen_jax.quantize`."""
  if quantize != "none" and quantize not in QUANTIZE_MODES:
    raise cli.UserError(f"--quantize: expected one of "
                        f"{['none', *QUANTIZE_MODES]}, found {quantize!r}")


def load(checkpoint: str | None, dtype: str, seed: int,
         vision_model: bool = False, quantize: str = "none"):
  """(cfg, params): the checkpoint's weights, or the random `tiny` model
  (`tiny-vl` with vision_model), in the `quantize` mode of
  `qwen_jax.quantize` unless "none".

  Raises:
    cli.UserError: a bad checkpoint (the loader's message says which).
  """
  if dtype == "auto":
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if not checkpoint:
    cfg = qwen_jax.QwenConfig.from_preset(
        "tiny-vl" if vision_model else "tiny", dtype=dtype,
        param_dtype=dtype)
    model = qwen_jax.Qwen35(cfg)
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)))
    params = flax.linen.meta.unbox(init(jax.random.PRNGKey(seed)))["params"]
    # Scale the init up so the random model's choices are not all ties.
    params = jax.tree_util.tree_map(lambda x: x * 30 if x.ndim > 1 else x,
                                    params)
  else:
    with cli.user_errors(f"--checkpoint {checkpoint!r}"):
      cfg, params = qwen_jax.load_hf_checkpoint(checkpoint, dtype=dtype)
  if quantize != "none":
    params = qwen_jax.quantize(cfg, params, quantize)
  return cfg, params


def _max_tokens(cfg: qwen_jax.QwenConfig, max_len: int | None) -> int:
  if max_len is None:
    return cfg.max_position_embeddings
  return min(max_len, cfg.max_position_embeddings)


def _chat_ids(tokenizer: Any, messages: Any, enable_thinking: bool | None,
              where: str) -> list[int]:
  """The chat template's ids of `messages` with the generation prompt."""
  kwargs = {} if enable_thinking is None else {
      "enable_thinking": enable_thinking}
  with cli.user_errors(where):
    return list(tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, **kwargs))


class TextOut:
  """Decodes one row's new tokens for display: never half a character,
  nothing from a stop string on, stop ids left out."""

  def __init__(self, tokenizer: Any, stops: Sequence[int],
               stop_strings: Sequence[str] | None):
    self._decoder = tokenizer.stream_decoder()
    self._stops = frozenset(int(i) for i in stops)
    self._strings = (tokenizer_lib.StopStrings(list(stop_strings))
                     if stop_strings else None)
    self.ended = False  # a stop id or stop string came

  def push(self, token: int) -> str:
    """The text that can be shown after `token` ("" once ended)."""
    if self.ended:
      return ""
    if int(token) in self._stops:
      self.ended = True
      return self.flush()
    piece = self._decoder.push(int(token))
    if self._strings is None:
      return piece
    shown = self._strings.push(piece)
    self.ended = self._strings.stop is not None
    return shown

  def flush(self) -> str:
    """The text held back, at the end."""
    piece = self._decoder.flush()
    if self._strings is None:
      return piece
    return self._strings.push(piece) + self._strings.flush()

  @property
  def stop_string(self) -> str | None:
    return None if self._strings is None else self._strings.stop


def _sampling_args(temperature, top_k, top_p, min_p, repetition_penalty,
                   presence_penalty) -> dict[str, Any]:
  return dict(temperature=temperature, top_k=top_k, top_p=top_p,
              min_p=min_p, repetition_penalty=repetition_penalty,
              presence_penalty=presence_penalty)


def run(checkpoint: str | None, prompt: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None, top_k: int | None = None,
        top_p: float | None = None, seed: int = 0,
        stop_tokens: Sequence[int] | None = None, dtype: str = "auto",
        max_len: int | None = None, block_steps: int = 8,
        prefill_block: int = DEFAULT_PREFILL_BLOCK, out: TextIO = sys.stdout,
        *, min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop_strings: Sequence[str] | None = None, chat: bool = False,
        enable_thinking: bool | None = None, images: Sequence[str] = (),
        videos: Sequence[str] = (), quantize: str = "none"
        ) -> dict[str, Any]:
  """Loads, generates and streams the prompt and new text to `out`.

  Sampling values left None come from the checkpoint's
  generation_config.json (greedy without one). With `chat`, the prompt is
  a user message of the chat template and only the reply is written.
  `images` (files) and `videos` (folders of frames) go before the prompt
  text; without a checkpoint they use the random `tiny-vl` model.

  Returns:
    {"text", "ids" (new token ids), "prompt_tokens", "prefill_s",
     "decode_s", "tokens_per_s", "sampler"}; times include compilation on
    first use.

  Raises:
    cli.UserError (a ValueError), all before the weights are read: a bad
      option, a bad checkpoint folder, config.json, tokenizer file,
      generation_config.json or eos id, an image or video path that is
      missing or unreadable (or a model that takes none), an empty prompt,
      or a prompt plus
      max_new_tokens longer than max_len / max_position_embeddings; then a
      checkpoint whose weights cannot be loaded.
  """
  check_options(top_k, top_p, stop_tokens, temperature=temperature,
                max_new_tokens=max_new_tokens, max_len=max_len,
                block_steps=block_steps, prefill_block=prefill_block,
                prompt=prompt, min_p=min_p,
                repetition_penalty=repetition_penalty,
                presence_penalty=presence_penalty, stop_strings=stop_strings)
  check_quantize(quantize)
  check_media_paths(images, videos)
  media = bool(images or videos)
  if media and chat:
    raise cli.UserError(
        f"--{'image' if images else 'video'}: expected no images or videos "
        f"with --chat (the chat template's image entries are not rendered "
        f"here), found {len(images) + len(videos)}; drop --chat")
  d = describe(checkpoint, stop_tokens, media)
  cfg, tokenizer, stops, gc = d.cfg, d.tokenizer, d.stops, d.generation_config
  if max_new_tokens is None:
    max_new_tokens = gc.max_new_tokens or 64
  if chat:
    ids = _chat_ids(tokenizer, [{"role": "user", "content": prompt}],
                    enable_thinking, "--chat")
  else:
    ids = tokenizer.encode(prompt)
  if not ids:
    raise cli.UserError(f"--prompt: expected at least one token, found "
                        f"none in {prompt!r}")
  media_ids, media_args = prepare_media(cfg, checkpoint, images, videos)
  ids = media_ids + ids
  limit = _max_tokens(cfg, max_len)
  if len(ids) + max_new_tokens > limit:
    raise cli.UserError(
        f"--prompt: {len(ids)} tokens + --max_new_tokens {max_new_tokens} = "
        f"{len(ids) + max_new_tokens} exceeds the maximum of {limit} tokens "
        f"(max_len / max_position_embeddings)")
  sampling = _sampling_args(temperature, top_k, top_p, min_p,
                            repetition_penalty, presence_penalty)
  with cli.user_errors():  # a bad generation_config.json value, named
    sampler = Sampler.from_generation_config(gc, **sampling)
  cfg, params = load(checkpoint, dtype, seed, media, quantize)
  t0 = time.perf_counter()
  gen = stream(cfg, params, np.asarray([ids], np.int32), max_new_tokens,
               seed=seed, stop_tokens=stops, block_steps=block_steps,
               prefill_block=prefill_block, generation_config=gc,
               **sampling, **media_args)
  if not chat:
    out.write(prompt)
    out.flush()
  shown = TextOut(tokenizer, stops, stop_strings)
  new: list[int] = []
  prefill_s = None
  try:
    for block in gen:
      if prefill_s is None:
        prefill_s = time.perf_counter() - t0
      for token in block[0]:
        if shown.ended:
          break
        new.append(int(token))
        out.write(shown.push(int(token)))
      out.flush()
      if shown.ended:
        break  # a stop string: the other rows' work is not needed
  except Exception:
    out.write("\n")  # an error message then starts on its own line
    out.flush()
    raise
  if not shown.ended:
    out.write(shown.flush())
  out.write("\n")
  total = time.perf_counter() - t0
  kept = [i for i in new if i not in stops]
  text = tokenizer.decode(kept)
  if stop_strings:
    text = text[:tokenizer_lib.find_stop(text, list(stop_strings)).emit_end]
  decode_s = total - prefill_s
  return dict(text=text, ids=new, prompt_tokens=len(ids),
              prefill_s=prefill_s, decode_s=decode_s, sampler=sampler,
              tokens_per_s=(len(new) - 1) / decode_s if decode_s > 0 else 0.0)


# ------------------------------------------------------------- batch mode
# Per-line fields of a prompts file, with their checks.
_LINE_FIELDS = {
    "max_new_tokens": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "seed": (is_int, "an int"),
    "enable_thinking": (lambda v: isinstance(v, bool), "true or false"),
    "stop": (lambda v: isinstance(v, list) and all(
        isinstance(s, str) and s for s in v),
             "a list of non-empty strings"),
    "id": (lambda v: isinstance(v, str) or is_int(v), "a string or an int"),
}
_RESULT_KEYS = ("id", "index", "text", "num_tokens", "stop_reason", "stop",
                "prompt_tokens", "input_sha256")


@dataclasses.dataclass
class Job:
  """One line of a prompts file, checked and tokenized.

  Attributes:
    index: the line's 0-based number.
    id: its id ("id", else the index).
    ids: the prompt's token ids.
    max_new_tokens: new tokens at most.
    sampling: explicit sampling values (None: the flags', then the
      checkpoint's).
    sampler: the resolved rule (rows with equal rules are batched).
    seed: the row's seed.
    stop_strings: the row's stop strings.
    sha: sha256 of the line's JSON (canonical form).
  """
  index: int
  id: Any
  ids: list[int]
  max_new_tokens: int
  sampling: dict[str, Any]
  sampler: Sampler
  seed: int
  stop_strings: tuple[str, ...]
  sha: str


def _line_sha(entry: dict[str, Any]) -> str:
  text = json.dumps(entry, sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_jobs(path: str, tokenizer: Any, cfg: qwen_jax.QwenConfig,
              generation_config: tokenizer_lib.GenerationConfig, *,
              flag_sampling: dict[str, Any], max_new_tokens: int | None,
              seed: int, stop_strings: Sequence[str] | None, chat: bool,
              enable_thinking: bool | None, max_len: int | None
              ) -> list[Job]:
  """Every line of a prompts file, checked and tokenized (see the module
  docstring for the format).

  Raises:
    cli.UserError: naming the file, the line and the field.
  """
  jobs: list[Job] = []
  seen_ids: dict[Any, int] = {}
  limit = _max_tokens(cfg, max_len)
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  for n, line in enumerate(lines):
    where = f"--prompts_file {path!r} line {n + 1}"
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
    except ValueError as e:
      raise cli.UserError(f"{where}: expected a JSON object, found text it "
                          f"cannot parse ({e})") from e
    if not isinstance(entry, dict):
      raise cli.UserError(f"{where}: expected a JSON object, found "
                          f"{type(entry).__name__}")
    known = {"prompt", "messages", *_LINE_FIELDS, *_SAMPLING_FLAGS}
    unknown = sorted(set(entry) - known)
    if unknown:
      raise cli.UserError(f"{where}: expected the fields {sorted(known)}, "
                          f"found unknown {unknown}")
    if ("prompt" in entry) == ("messages" in entry):
      both = [k for k in ("prompt", "messages") if k in entry]
      raise cli.UserError(f"{where}: expected exactly one of 'prompt' and "
                          f"'messages', found {both}")
    for key, (ok, expected) in _LINE_FIELDS.items():
      if key in entry and not ok(entry[key]):
        raise cli.UserError(f"{where}: {key}: expected {expected}, found "
                            f"{entry[key]!r}")
    sampling = dict(flag_sampling)
    for key in _SAMPLING_FLAGS:
      if key in entry:
        error = _sampling_flag_errors(**{key: entry[key]})
        if isinstance(entry[key], bool):
          error = f"--{key}: expected a number, found {entry[key]}"
        if error:  # named as the line's field, not the flag
          raise cli.UserError(f"{where}: {error[2:]}")
        sampling[key] = entry[key]
    with cli.user_errors(where):
      sampler = Sampler.from_generation_config(generation_config, **sampling)
    thinking = entry.get("enable_thinking", enable_thinking)
    if "messages" in entry:
      ids = _chat_ids(tokenizer, entry["messages"], thinking,
                      f"{where}: messages")
    elif not isinstance(entry["prompt"], str) or not entry["prompt"]:
      raise cli.UserError(f"{where}: prompt: expected some text, found "
                          f"{entry['prompt']!r}")
    elif chat:
      ids = _chat_ids(tokenizer, [{"role": "user",
                                   "content": entry["prompt"]}],
                      thinking, f"{where}: prompt")
    else:
      ids = tokenizer.encode(entry["prompt"])
    if not ids:
      raise cli.UserError(f"{where}: expected at least one prompt token, "
                          f"found none")
    new = entry.get("max_new_tokens", max_new_tokens)
    if len(ids) + new > limit:
      raise cli.UserError(
          f"{where}: {len(ids)} prompt tokens + max_new_tokens {new} = "
          f"{len(ids) + new} exceeds the maximum of {limit} tokens "
          f"(max_len / max_position_embeddings)")
    job_id = entry.get("id", n)
    if job_id in seen_ids:
      raise cli.UserError(f"{where}: id: expected ids that differ, found "
                          f"{job_id!r} on line {seen_ids[job_id] + 1} too")
    seen_ids[job_id] = n
    strings = tuple(entry.get("stop", stop_strings or ()))
    jobs.append(Job(n, job_id, list(ids), int(new),
                    {k: entry[k] for k in _SAMPLING_FLAGS if k in entry},
                    sampler, int(entry.get("seed", seed + n)), strings,
                    _line_sha(entry)))
  if not jobs:
    raise cli.UserError(f"--prompts_file {path!r}: expected at least one "
                        f"prompt line, found none")
  return jobs


def read_done(path: str, jobs: Sequence[Job]) -> set[Any]:
  """The ids already in an --output file, after checking it is ours.

  A last line without its newline that is not JSON (a write cut off by a
  kill) is removed from the file; any other line that is not a result of
  these prompts refuses the file, which is then left as it is.

  Raises:
    cli.UserError: naming the file and the line.
  """
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    data = f.read()
  by_id = {job.id: job for job in jobs}
  done = set()
  lines = data.split(b"\n")
  cut = None
  for n, raw in enumerate(lines):
    if not raw.strip():
      continue
    where = f"--output {path!r} line {n + 1}"
    try:
      result = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
      if n == len(lines) - 1:  # no newline after it: cut off while written
        cut = len(data) - len(raw)
        break
      raise cli.UserError(
          f"{where}: expected a result line of experiments.generate (JSON), "
          f"found text it cannot parse ({e}); not appending to a file that "
          f"is not ours: give another --output") from e
    if not isinstance(result, dict) or set(result) != set(_RESULT_KEYS):
      found = sorted(result) if isinstance(result, dict) else type(
          result).__name__
      raise cli.UserError(
          f"{where}: expected a result line of experiments.generate (the "
          f"keys {sorted(_RESULT_KEYS)}), found {found}; not appending to a "
          f"file that is not ours: give another --output")
    job = by_id.get(result["id"])
    if job is None or job.sha != result["input_sha256"]:
      what = ("no prompt line has this id" if job is None else
              f"line {job.index + 1} there holds another prompt")
      raise cli.UserError(
          f"{where}: a result for id {result['id']!r} of another prompts "
          f"file ({what} in --prompts_file); not appending: give another "
          f"--output")
    done.add(result["id"])
  if cut is not None:
    print(f"[{path}: removing its last line, cut off while it was written]",
          file=sys.stderr)
    with open(path, "r+b") as f:
      f.truncate(cut)
  return done


def batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
  """Jobs grouped by sampling rule, sorted by length, cut into batches."""
  groups: dict[Sampler, list[Job]] = {}
  for job in jobs:
    groups.setdefault(job.sampler, []).append(job)
  out = []
  for group in groups.values():
    group = sorted(group, key=lambda j: (len(j.ids), j.index))
    out += [group[i:i + batch_size]
            for i in range(0, len(group), batch_size)]
  return out


def _result_text(tokenizer: Any, ids: Sequence[int], reason: str,
                 stop: str | None) -> str:
  """The text of a row's new tokens: no stop token, cut before a stop
  string."""
  if reason == "stop_token":
    ids = ids[:-1]
  text = tokenizer.decode(list(ids))
  if stop is not None:
    text = text[:tokenizer_lib.find_stop(text, [stop]).emit_end]
  return text


def run_batch(checkpoint: str | None, prompts_file: str, output: str, *,
              batch_size: int = 8, max_new_tokens: int | None = None,
              temperature: float | None = None, top_k: int | None = None,
              top_p: float | None = None, min_p: float | None = None,
              repetition_penalty: float | None = None,
              presence_penalty: float | None = None, seed: int = 0,
              stop_tokens: Sequence[int] | None = None,
              stop_strings: Sequence[str] | None = None, chat: bool = False,
              enable_thinking: bool | None = None, dtype: str = "auto",
              max_len: int | None = None, block_steps: int = 8,
              prefill_block: int = DEFAULT_PREFILL_BLOCK,
              log: Callable[[str], None] | None = None,
              quantize: str = "none") -> dict[str, Any]:
  """Runs every prompt of `prompts_file` not yet in `output`.

  Returns:
    {"written": results appended, "skipped": ids already there,
     "tokens": new tokens, "seconds": decoding time}.

  Raises:
    cli.UserError, all before the weights are read: a bad option, a bad
      checkpoint, a bad prompts line, or an --output that is not ours.
  """
  log = log or (lambda s: print(s, file=sys.stderr))
  check_options(top_k, top_p, stop_tokens, temperature=temperature,
                max_new_tokens=max_new_tokens, max_len=max_len,
                block_steps=block_steps, prefill_block=prefill_block,
                min_p=min_p, repetition_penalty=repetition_penalty,
                presence_penalty=presence_penalty, stop_strings=stop_strings)
  cli.positive_int("--batch_size", batch_size)
  cli.existing_file("--prompts_file", prompts_file, "a JSON lines file")
  cli.writable_file("--output", output)
  if os.path.abspath(output) == os.path.abspath(prompts_file):
    raise cli.UserError(f"--output: expected another file than "
                        f"--prompts_file, found {output!r} for both")
  check_quantize(quantize)
  d = describe(checkpoint, stop_tokens)
  if max_new_tokens is None:
    max_new_tokens = d.generation_config.max_new_tokens or 64
  jobs = read_jobs(
      prompts_file, d.tokenizer, d.cfg, d.generation_config,
      flag_sampling=_sampling_args(temperature, top_k, top_p, min_p,
                                   repetition_penalty, presence_penalty),
      max_new_tokens=max_new_tokens, seed=seed, stop_strings=stop_strings,
      chat=chat, enable_thinking=enable_thinking, max_len=max_len)
  done = read_done(output, jobs)
  todo = [job for job in jobs if job.id not in done]
  stats = {"written": 0, "skipped": len(jobs) - len(todo), "tokens": 0,
           "seconds": 0.0}
  if not todo:
    log(f"[{output}: every one of the {len(jobs)} prompts is done]")
    return stats
  cfg, params = load(checkpoint, dtype, seed, quantize=quantize)
  t0 = time.perf_counter()
  with open(output, "a", encoding="utf-8") as out:
    for batch in batches(todo, batch_size):
      stats["tokens"] += _run_one_batch(
          cfg, params, d, batch, out, block_steps, prefill_block, max_len)
      stats["written"] += len(batch)
  stats["seconds"] = time.perf_counter() - t0
  log(f"[{stats['written']} results appended to {output}, "
      f"{stats['skipped']} already there; {stats['tokens']} new tokens in "
      f"{stats['seconds']:.1f} s, compilation included]")
  return stats


def _explicit(sampler: Sampler) -> dict[str, Any]:
  """A resolved rule as explicit arguments (offs included), so that the
  generation config fills nothing more in."""
  return dict(temperature=sampler.temperature, top_k=sampler.top_k or 0,
              top_p=sampler.top_p or 1.0, min_p=sampler.min_p or 0.0,
              repetition_penalty=sampler.repetition_penalty or 1.0,
              presence_penalty=sampler.presence_penalty or 0.0)


def _run_one_batch(cfg, params, d: Described, batch: Sequence[Job], out,
                   block_steps: int, prefill_block: int,
                   max_len: int | None) -> int:
  """Decodes one batch, appending each row's result as it stops."""
  width = max(len(job.ids) for job in batch)
  ids = np.zeros((len(batch), width), np.int32)
  mask = np.zeros((len(batch), width), np.int32)
  for r, job in enumerate(batch):
    ids[r, width - len(job.ids):] = job.ids
    mask[r, width - len(job.ids):] = 1
  limits = [job.max_new_tokens for job in batch]
  # Cache slots rounded up, so that batches of similar lengths share one
  # compiled decode loop.
  need = width + max(limits)
  cache_len = min(-(-need // 128) * 128, _max_tokens(cfg, max_len),
                  cfg.max_position_embeddings)
  strings = [list(job.stop_strings) for job in batch]
  tokens = stream(
      cfg, params, ids, limits, attention_mask=mask,
      seed=[job.seed for job in batch], stop_tokens=d.stops,
      block_steps=block_steps, prefill_block=prefill_block,
      cache_len=max(cache_len, need), generation_config=d.generation_config,
      stop_strings=strings if any(strings) else None,
      tokenizer=d.tokenizer, **_explicit(batch[0].sampler))
  written = [False] * len(batch)

  def flush_finished(final: bool) -> None:
    for r, job in enumerate(batch):
      reason = tokens.stop_reasons[r] or ("length" if final else None)
      if written[r] or reason is None:
        continue
      n = tokens.num_tokens[r]
      row = tokens.tokens[r, :n].tolist()
      stop = tokens.stop_strings_found[r]
      result = {"id": job.id, "index": job.index,
                "text": _result_text(d.tokenizer, row, reason, stop),
                "num_tokens": n, "stop_reason": reason, "stop": stop,
                "prompt_tokens": len(job.ids), "input_sha256": job.sha}
      out.write(json.dumps(result, ensure_ascii=False) + "\n")
      out.flush()
      written[r] = True

  for _ in tokens:
    flush_finished(False)
  flush_finished(True)
  return int(sum(tokens.num_tokens))


_HOLDERS: dict[str, flags.FlagHolder] = {}


def main(argv):
  del argv  # cli.run refuses positional arguments
  v = {name: h.value for name, h in _HOLDERS.items()}
  if v["checkpoint"] is not None:
    check_checkpoint(v["checkpoint"])  # "" is not the random model
  sampling = {k: v[k] for k in _SAMPLING_FLAGS}
  common = dict(seed=v["seed"], stop_tokens=v["stop_tokens"],
                dtype=v["dtype"], max_len=v["max_len"],
                block_steps=v["block_steps"],
                prefill_block=v["prefill_block"],
                stop_strings=v["stop_strings"], chat=v["chat"],
                enable_thinking=v["enable_thinking"],
                quantize=v["quantize"], **sampling)
  if (v["prompts_file"] is None) != (v["output"] is None):
    given, missing = (("--prompts_file", "--output")
                      if v["output"] is None else
                      ("--output", "--prompts_file"))
    raise cli.UserError(f"{missing}: required with {given}, not given")
  if v["prompts_file"] is not None:
    if v["image"] or v["video"]:
      raise cli.UserError(
          f"--{'image' if v['image'] else 'video'}: expected no images or "
          f"videos with --prompts_file (a prompts file holds text), found "
          f"{len(v['image']) + len(v['video'])}")
    run_batch(v["checkpoint"], v["prompts_file"], v["output"],
              batch_size=v["batch_size"],
              max_new_tokens=v["max_new_tokens"], **common)
    return
  r = run(v["checkpoint"], v["prompt"], v["max_new_tokens"], out=sys.stdout,
          images=v["image"], videos=v["video"], **common)
  print(f"[{r['prompt_tokens']} prompt tokens, {len(r['ids'])} new; "
        f"prefill {r['prefill_s']:.2f} s, decode "
        f"{r['tokens_per_s']:.1f} tokens/s, compilation included; "
        f"{jax.default_backend()}]", file=sys.stderr)


if __name__ == "__main__":
  _HOLDERS = define_flags()
  cli.run(main)
