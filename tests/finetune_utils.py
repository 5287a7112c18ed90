"""Tiny checkpoints, tokenizers and corpora for the fine-tuning tests.

A byte-level BPE tokenizer is trained here with the `tokenizers` trainer on
a few sentences (Qwen-style special tokens `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>` and added `<think>`, `</think>`), saved with a
tokenizer_config.json holding one of three chat templates written for these
tests:

  CHATML      each message `<|im_start|>role\\ncontent<|im_end|>\\n`: a later
              message never changes an earlier one's rendering;
  THINKING    as Qwen3's: assistant messages after the last user message
              open with a `<think>...</think>` block, earlier ones do not,
              so a conversation's rendering changes when a user message
              follows (the case that splits a conversation);
  GENERATION  CHATML with the assistant text inside `{% generation %}`.

`tiny_checkpoint` saves a random tiny Qwen3.5 (`save_hf_checkpoint`) with
such a tokenizer beside it.
"""

from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import decoders
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

from qwen_jax import train_step
from qwen_jax.checkpoint import save_hf_checkpoint
from qwen_jax.config import QwenConfig
from qwen_jax.config import layer_types_from_ratio
from qwen_jax.vision import VisionConfig

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<think>", "</think>"]
CORPUS = [
    "Hello world, the user asks the assistant about the weather today.",
    "You are a helpful assistant. Think step by step before answering.",
    "system user assistant the quick brown fox jumps over the lazy dog",
    "What is two plus two? Four. What is the capital of France? Paris.",
    "def add(a, b):\n    return a + b\n",
]

CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}")

THINKING = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}")

GENERATION = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- m.content + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}")


def build_tokenizer(folder: str, template: str = CHATML) -> str:
  """Trains and saves the tiny tokenizer (tokenizer.json and
  tokenizer_config.json with `template`) into `folder`."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=360, special_tokens=SPECIAL, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 10, trainer)
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t in ADDED])
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
    added = json.load(f)["added_tokens"]
  config = {
      "tokenizer_class": "Qwen2Tokenizer",
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "bos_token": None, "unk_token": None,
      "clean_up_tokenization_spaces": False,
      "added_tokens_decoder": {
          str(a["id"]): {k: v for k, v in a.items() if k != "id"}
          for a in added},
      "chat_template": template,
  }
  with open(os.path.join(folder, "tokenizer_config.json"), "w",
            encoding="utf-8") as f:
    json.dump(config, f, indent=1)
  return folder


def tiny_config(layers: int = 4, vocab_size: int = 384,
                ratio: str = "3:1") -> QwenConfig:
  """The tiny preset with `layers` layers (3:1 by default; 4 layers at 1:1
  are scanned as two periods) and room for the tokenizer's ids."""
  return QwenConfig.from_preset(
      "tiny", vocab_size=vocab_size, num_hidden_layers=layers,
      layer_types=layer_types_from_ratio(ratio, layers))


def tiny_checkpoint(folder: str, template: str = CHATML, layers: int = 4,
                    seed: int = 0, vision: bool = False, moe: bool = False
                    ) -> tuple[str, QwenConfig]:
  """A random tiny Qwen3.5 checkpoint folder with the tiny tokenizer
  (with `vision`, the tiny tower too: a multimodal checkpoint, as the
  released ones are, its placeholder ids the top four of the vocabulary;
  with `moe`, every MLP a mixture of experts: tiny-moe's experts)."""
  cfg = tiny_config(layers)
  if moe:
    m = QwenConfig.from_preset("tiny-moe")
    cfg = cfg.replace(**{f: getattr(m, f) for f in (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size",
        "shared_expert_intermediate_size")})
  if vision:
    top = cfg.vocab_size
    cfg = cfg.replace(
        vision=VisionConfig.from_preset("tiny"), mrope_section=(2, 1, 1),
        vision_start_token_id=top - 4, vision_end_token_id=top - 3,
        image_token_id=top - 2, video_token_id=top - 1)
  build_tokenizer(folder, template)
  tok = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  cfg = cfg.replace(eos_token_id=tok.token_to_id("<|im_end|>"),
                    pad_token_id=tok.token_to_id("<|endoftext|>"))
  params = train_step.init_params(cfg, seed)
  save_hf_checkpoint(folder, cfg, params, dtype="float32")
  return folder, cfg


CHATS = [
    [{"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Four."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Hello world"},
     {"role": "assistant", "content": "Hello! The weather is nice today."}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And two plus two?"},
     {"role": "assistant", "content": "Four."}],
    [{"role": "user", "content": "Say the quick brown fox."},
     {"role": "assistant", "content": "The quick brown fox jumps."}],
]


def write_chats(path: str, copies: int = 8) -> str:
  """A .jsonl of the CHATS repeated `copies` times."""
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(copies):
      for c in CHATS:
        f.write(json.dumps({"messages": c}) + "\n")
  return path
