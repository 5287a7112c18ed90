"""A small hybrid Qwen3.5 byte-level language model on Python source text.

The corpus is the source of a fixed list of standard-library modules
(`qwen_jax.data.TEXT_TRAIN_MODULES`, about 2 MB; nothing is downloaded),
packed into rows with segment ids; evaluation reads the held-out modules
(`TEXT_EVAL_MODULES`). Vocabulary 256 (bytes).

  python -m experiments.train --config=experiments/configs/text.py \
      --workdir=/tmp/qwen_text
  python -m experiments.train --config=experiments/configs/text.py:runlocal \
      --workdir=/tmp/qwen_text_local --export_hf=/tmp/qwen_text_local/hf

`runlocal` cuts the corpus to 64 kB and the model to width 32.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from experiments import configs
from qwen_jax.data import BYTE_VOCAB


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The byte-level text config; `arg`: runlocal, ratio=L:F, layers=N."""
  arg = configs.parse_arg(arg, runlocal=False, ratio=None, layers=0)
  local = arg.runlocal
  config = ml_collections.ConfigDict()

  if local:
    config.model = configs.model_config(
        "tiny", ratio=arg.ratio or "1:1", num_hidden_layers=arg.layers or 2,
        vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8)
  else:
    config.model = configs.model_config(
        "tiny", ratio=arg.ratio or "3:1", num_hidden_layers=arg.layers or 8,
        vocab_size=BYTE_VOCAB, hidden_size=256, intermediate_size=768,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=64, linear_value_head_dim=64)

  config.data = ml_collections.ConfigDict()
  config.data.kind = "text"
  # Bytes of the training corpus read (None = all of it).
  config.data.max_bytes = 64_000 if local else config_dict.placeholder(int)
  config.data.seed = 0

  if local:
    config.train = configs.train_config(
        batch_size=4, seq_len=64, num_steps=10, learning_rate=1e-2,
        warmup_steps=2, log_every=2, checkpoint_every=5)
  else:
    config.train = configs.train_config(
        batch_size=16, seq_len=512, num_steps=4000, learning_rate=2e-3,
        warmup_steps=200, log_every=20, checkpoint_every=1000)

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 4 if local else 16
  # Held-out rows in order; None = the whole eval split.
  config.eval.num_batches = 2 if local else config_dict.placeholder(int)
  config.eval.max_bytes = 16_000 if local else config_dict.placeholder(int)
  return config
