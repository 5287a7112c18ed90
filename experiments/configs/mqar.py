"""A small hybrid Qwen3.5 trained on multi-query associative recall (MQAR).

Three Gated DeltaNet layers and one full-attention layer (the Qwen3.5 3:1
schedule) at width 128; `ratio` and `layers` change the schedule for the
attention-ratio study. The model's vocabulary is the task's (pad, keys,
values) unless `model.vocab_size` is set.

  python -m experiments.train --config=experiments/configs/mqar.py \
      --workdir=/tmp/qwen_mqar
  python -m experiments.train \
      --config=experiments/configs/mqar.py:ratio=1:1,layers=8 \
      --workdir=/tmp/qwen_mqar_1to1
  python -m experiments.train --config=experiments/configs/mqar.py:runlocal \
      --workdir=/tmp/qwen_mqar_local --config.train.num_steps=20

`runlocal` shrinks the model (width 32, one linear and one full layer), the
task and the run to a few seconds on a CPU.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from experiments import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The MQAR config; `arg`: runlocal, ratio=L:F, layers=N."""
  arg = configs.parse_arg(arg, runlocal=False, ratio=None, layers=0)
  local = arg.runlocal
  config = ml_collections.ConfigDict()

  if local:
    config.model = configs.model_config(
        "tiny", ratio=arg.ratio or "1:1", num_hidden_layers=arg.layers or 2,
        hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_num_key_heads=1,
        linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, max_position_embeddings=1024)
  else:
    config.model = configs.model_config(
        "tiny", ratio=arg.ratio or "3:1", num_hidden_layers=arg.layers or 4,
        hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32)

  config.data = ml_collections.ConfigDict()
  config.data.kind = "mqar"
  config.data.num_pairs = 4 if local else 16
  # None queries every pair once.
  config.data.num_queries = config_dict.placeholder(int)
  config.data.key_vocab = 16 if local else 256
  config.data.value_vocab = 16 if local else 256
  config.data.seed = 0

  if local:
    config.train = configs.train_config(
        batch_size=8, seq_len=32, num_steps=12, learning_rate=1e-2,
        warmup_steps=2, log_every=2, checkpoint_every=4)
  else:
    config.train = configs.train_config(
        batch_size=64, seq_len=128, num_steps=3000, learning_rate=3e-3,
        warmup_steps=200, log_every=20, checkpoint_every=500)

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8 if local else 64
  config.eval.num_batches = 2 if local else 16
  config.eval.seed = 1  # differs from data.seed: unseen examples
  return config
