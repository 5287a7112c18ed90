"""The qwen3.5-0.8b preset, random init, 1 x 8192 tokens: a GPU benchmark.

The released 0.8B architecture (24 layers, 3:1, width 1024, tied 248,320-token
embedding) from random weights on packed byte-level text at one sequence of
8192 tokens per step, bf16 compute (`compute_dtype="auto"` on GPU/TPU) and
full rematerialisation per layer. It measures the training step (tokens/s,
MFU in metrics.csv); the loss is only a sanity check. No orbax checkpoints
by default (the state is about 10 GB): set
`--config.train.save_checkpoints=True` to keep them.

  python -m experiments.train --config=experiments/configs/qwen3_5_0_8b.py \
      --workdir=/tmp/qwen08b_bench
  python -m experiments.train \
      --config=experiments/configs/qwen3_5_0_8b.py:runlocal \
      --workdir=/tmp/qwen08b_local

`runlocal` keeps the layer shapes but cuts the depth to 4 layers, the
vocabulary to 4096 and the sequence to 128 tokens (a CPU smoke test).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from experiments import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The 0.8B benchmark config; `arg`: runlocal, seq_len=N, steps=N."""
  arg = configs.parse_arg(arg, runlocal=False, seq_len=0, steps=0)
  local = arg.runlocal
  config = ml_collections.ConfigDict()

  if local:
    config.model = configs.model_config(
        "qwen3.5-0.8b", remat_policy="full", num_hidden_layers=4,
        vocab_size=4096)
  else:
    config.model = configs.model_config("qwen3.5-0.8b", remat_policy="full")

  config.data = ml_collections.ConfigDict()
  config.data.kind = "text"
  config.data.max_bytes = (200_000 if local
                           else config_dict.placeholder(int))
  config.data.seed = 0

  config.train = configs.train_config(
      batch_size=1, seq_len=arg.seq_len or (128 if local else 8192),
      num_steps=arg.steps or (3 if local else 50), learning_rate=3e-4,
      warmup_steps=1 if local else 10, log_every=1 if local else 5,
      checkpoint_every=0, save_checkpoints=False)

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 1
  config.eval.num_batches = 2
  config.eval.max_bytes = (50_000 if local
                           else config_dict.placeholder(int))
  return config
