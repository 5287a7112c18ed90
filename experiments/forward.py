"""A forward pass of a Qwen3.5 model on a batch of token ids.

Builds a preset with random weights (default `tiny`, a few MB) or loads a
transformers checkpoint folder, runs one jit-compiled forward and prints the
parameter count, the logits' shape and the time. Runs on any CPU, offline.

  python -m experiments.forward                        # tiny, random weights
  python -m experiments.forward --preset qwen3.5-0.8b --seq_len 512
  python -m experiments.forward --checkpoint /path/to/Qwen3.5-0.8B
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

import qwen_jax

_PRESET = flags.DEFINE_string("preset", "tiny",
                              "Preset with random weights (ignored with "
                              "--checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "A transformers Qwen3.5 checkpoint folder.")
_BATCH = flags.DEFINE_integer("batch", 2, "Sequences per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute and parameter dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and token ids.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs after compiling.")


def build(preset: str, checkpoint: str | None, dtype: str, seed: int):
  """(cfg, params): loaded from `checkpoint`, else a random `preset`."""
  if checkpoint:
    return qwen_jax.load_hf_checkpoint(checkpoint, dtype=dtype)
  cfg = qwen_jax.QwenConfig.from_preset(preset, dtype=dtype,
                                        param_dtype=dtype)
  model = qwen_jax.Qwen35(cfg)
  ids = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda key: model.init(key, ids))
  params = flax.linen.meta.unbox(init(jax.random.PRNGKey(seed)))["params"]
  return cfg, params


def run_forward(cfg, params, batch: int, seq_len: int, seed: int,
                repeats: int) -> dict:
  """Compiles and times a forward; returns shapes and timings."""
  model = qwen_jax.Qwen35(cfg)
  ids = np.random.default_rng(seed).integers(
      0, cfg.vocab_size, size=(batch, seq_len), dtype=np.int32)
  ids = jnp.asarray(ids)
  fwd = jax.jit(lambda p, i: model.apply({"params": p}, i))
  t0 = time.perf_counter()
  logits = fwd(params, ids).block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    logits = fwd(params, ids).block_until_ready()
    times.append(time.perf_counter() - t0)
  best = min(times) if times else float("nan")
  return dict(
      params=sum(x.size for x in jax.tree_util.tree_leaves(params)),
      logits_shape=tuple(logits.shape), logits_dtype=str(logits.dtype),
      finite=bool(jnp.all(jnp.isfinite(logits))),
      compile_s=compile_s, forward_s=best,
      tokens_per_s=batch * seq_len / best if times else float("nan"))


def main(argv):
  del argv
  cfg, params = build(_PRESET.value, _CHECKPOINT.value, _DTYPE.value,
                      _SEED.value)
  src = _CHECKPOINT.value or f"preset {_PRESET.value} (random weights)"
  print(f"model:       {src}")
  print(f"layers:      {cfg.num_hidden_layers} "
        f"({cfg.layer_types.count('linear_attention')} Gated DeltaNet, "
        f"{cfg.layer_types.count('full_attention')} full attention)")
  r = run_forward(cfg, params, _BATCH.value, _SEQ_LEN.value, _SEED.value,
                  _REPEATS.value)
  print(f"parameters:  {r['params']:,}")
  print(f"logits:      {r['logits_shape']} {r['logits_dtype']} "
        f"(finite: {r['finite']})")
  print(f"device:      {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})")
  print(f"compile:     {r['compile_s']:.2f} s")
  print(f"forward:     {r['forward_s'] * 1e3:.2f} ms "
        f"({r['tokens_per_s']:,.0f} tokens/s, best of {_REPEATS.value})")
  if not r["finite"]:
    raise SystemExit("non-finite logits")


if __name__ == "__main__":
  app.run(main)
