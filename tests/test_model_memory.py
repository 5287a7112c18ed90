"""experiments/model_memory.py: the one-device programs compiled, not run.

The tiny preset's train step, prefill block and decode step compile from
abstract parameters, and XLA's count of each program's arguments equals
the bytes of what it is given, computed here from the shapes: the train
state (float32 parameters and Adam's two moments, the step counters) and
the batch; the prefill's bf16 parameters, cache and block of ids.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from qwen_jax import cache as cache_lib
from qwen_jax import train_step
from qwen_jax.config import QwenConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def test_tiny_programs(tmp_path):
  out = tmp_path / "memory.json"
  t, block, batches, slots = 96, 64, (1, 3), 40
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.model_memory", "--preset=tiny",
       f"--seq_lens={t}", f"--prefill_block={block}",
       f"--decode_batches={','.join(map(str, batches))}",
       f"--decode_cache={slots}", f"--json_out={out}"],
      cwd=_ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["program"] for r in rows] == ["train", "prefill", "decode",
                                         "decode"], rows
  # Independent of the script: the shapes of what each program takes.
  master = QwenConfig.from_preset("tiny", vision=None, param_dtype="float32",
                                  dtype="bfloat16", remat_policy="full")
  tcfg = train_step.TrainConfig(batch_size=1, seq_len=t,
                                compute_dtype="bfloat16")
  state = jax.eval_shape(lambda: train_step.init_state(master, tcfg))
  assert rows[0]["arguments"] == _bytes(state) + 2 * t * 4, rows[0]
  cfg = master.replace(param_dtype="bfloat16", remat_policy="none")
  params = jax.eval_shape(lambda: train_step.init_params(cfg))
  cache = jax.eval_shape(lambda: cache_lib.init_cache(cfg, 1, t + 1))
  assert rows[1]["arguments"] == (_bytes(params) + _bytes(cache)
                                  + block * 4), rows[1]
  for r, b in zip(rows[2:], batches):
    cache = jax.eval_shape(lambda b=b: cache_lib.init_cache(cfg, b, slots))
    assert r["arguments"] == _bytes(params) + _bytes(cache) + b * 4, r
  for r in rows:
    assert r["temporaries"] > 0 and r["total"] >= r["arguments"], r
