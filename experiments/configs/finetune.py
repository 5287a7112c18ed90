"""Fine-tuning a published Qwen3.5 checkpoint on your own text or chats.

Continued pre-training on plain text, or supervised fine-tuning on chat
conversations (the loss on the assistant turns), from a transformers
checkpoint folder whose config, weights and tokenizer are used as they are.
Full fine-tuning (float32 master weights, optionally sharded over a mesh
with FSDP and sequence parallelism) or LoRA (`lora_rank > 0`: adapters
only, base weights frozen in bfloat16):

  python -m experiments.train --config=experiments/configs/finetune.py \
      --config.init_checkpoint=/ckpt/Qwen3.5-4B \
      --config.data.path=chats.jsonl --config.lora_rank=16 \
      --workdir=/tmp/ft --export_hf=/tmp/ft_hf
  python -m experiments.train --config=experiments/configs/finetune.py \
      --config.init_checkpoint=/ckpt/Qwen3.5-0.8B \
      --config.data.path=corpus/ --config.mesh=fsdp:2,seq:4 \
      --config.train.seq_len=65536 --workdir=/tmp/ft_long

The data (`config.data.path`: .jsonl with "text" or "messages", or .txt
files; see `qwen_jax.finetune_data`) is checked line by line before any
weight is loaded. `experiments/finetune.py` describes the workdir (held-out
loss and samples every `eval_every` steps, TensorBoard events, loss.png,
the adapter).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from experiments import configs
from experiments.finetune import MODEL_FIELDS
from qwen_jax.lora import DEFAULT_TARGETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The fine-tuning config (no `arg` options)."""
  configs.parse_arg(arg)
  config = ml_collections.ConfigDict()
  # A transformers checkpoint folder (config.json, safetensors, tokenizer).
  config.init_checkpoint = config_dict.placeholder(str)
  # 0: full fine-tuning; N > 0: LoRA adapters of rank N.
  config.lora_rank = 0
  # The adapters' update is scaled by lora_alpha / lora_rank (None: 2 x
  # rank, so the scale is 2).
  config.lora_alpha = config_dict.placeholder(float)
  # Regular expression over parameter paths (qwen_jax.lora).
  config.lora_targets = DEFAULT_TARGETS
  # dtype of the weights: "auto" is bfloat16 for LoRA's frozen base, and
  # float32 (master weights) for full fine-tuning.
  config.base_dtype = "auto"
  # A device mesh such as "fsdp:4,seq:2" ("" = one device).
  config.mesh = ""
  # Steps between held-out evaluations (loss, perplexity, samples); the
  # last step is always evaluated. 0: only the last.
  config.eval_every = 100
  # dtype of an --export_hf checkpoint: "auto" is the init checkpoint's.
  config.export_dtype = "auto"

  config.model = ml_collections.ConfigDict()
  for name, kind in MODEL_FIELDS.items():
    config.model[name] = config_dict.placeholder(kind)
  config.model.remat_policy = "full"

  config.train = configs.train_config(
      batch_size=4, seq_len=2048, num_steps=1000, warmup_steps=50,
      weight_decay=0.0, min_lr_ratio=0.1, log_every=10,
      checkpoint_every=200, keep_checkpoints=2)
  # None: 2e-4 with LoRA, 1e-5 for full fine-tuning.
  config.train.learning_rate = config_dict.placeholder(float)

  config.data = ml_collections.ConfigDict()
  config.data.path = config_dict.placeholder(str)
  config.data.eval_fraction = 0.05
  config.data.append_eos = True
  config.data.seed = 0

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = config_dict.placeholder(int)  # None: train's
  config.eval.num_batches = 16  # at most; None: every held-out row
  config.eval.samples = 3
  config.eval.max_new_tokens = 64
  config.eval.prompt_tokens = 64
  return config
