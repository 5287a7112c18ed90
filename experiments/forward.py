"""A forward pass of a Qwen3.5 model on a batch of token ids.

Builds a preset with random weights (default `tiny`, a few MB) or loads a
transformers checkpoint folder, runs one jit-compiled forward and prints the
parameter count, the logits' shape and the time. Runs on any CPU, offline.

  python -m experiments.forward                        # tiny, random weights
  python -m experiments.forward --preset qwen3.5-0.8b --seq_len 512
  python -m experiments.forward --checkpoint /path/to/Qwen3.5-0.8B

A misuse (a bad flag, a --checkpoint that is not a checkpoint folder) ends
with one line on stderr and exit status 1 (2 for usage errors); see
experiments/cli.py.
"""

from __future__ import annotations

import os
import time

from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
import qwen_jax
from qwen_jax.config import PRESETS
from qwen_jax.config import check_int


def define_flags(flag_values: flags.FlagValues = flags.FLAGS
                 ) -> dict[str, flags.FlagHolder]:
  """Defines the script's flags on `flag_values`, with validators.

  Called when the script runs, not on import, so that this module can be
  imported next to other experiment scripts that define --checkpoint,
  --seed or --seq_len too. A value out of range is a flag error, reported
  before anything is built.
  """
  fv = flag_values
  return {
      "preset": flags.DEFINE_enum(
          "preset", "tiny", sorted(PRESETS),
          "Preset with random weights (ignored with --checkpoint).",
          flag_values=fv),
      "checkpoint": flags.DEFINE_string(
          "checkpoint", None, "A transformers Qwen3.5 checkpoint folder.",
          flag_values=fv),
      "batch": flags.DEFINE_integer("batch", 2, "Sequences per batch.",
                                    lower_bound=1, flag_values=fv),
      "seq_len": flags.DEFINE_integer("seq_len", 128,
                                      "Tokens per sequence.", lower_bound=1,
                                      flag_values=fv),
      "dtype": flags.DEFINE_enum("dtype", "float32",
                                 ["float32", "bfloat16"],
                                 "Compute and parameter dtype.",
                                 flag_values=fv),
      "seed": flags.DEFINE_integer("seed", 0,
                                   "Seed of weights and token ids.",
                                   flag_values=fv),
      "repeats": flags.DEFINE_integer("repeats", 3,
                                      "Timed runs after compiling.",
                                      lower_bound=1, flag_values=fv),
  }


_HOLDERS: dict[str, flags.FlagHolder] = {}


def check_checkpoint(checkpoint: str) -> None:
  """Raises cli.UserError unless `checkpoint` is a folder with config.json
  (before anything is loaded)."""
  cli.existing_folder("--checkpoint", checkpoint)
  cli.existing_file(f"--checkpoint {checkpoint!r}",
                    os.path.join(checkpoint, "config.json"),
                    "a config.json in the folder")


def build(preset: str, checkpoint: str | None, dtype: str, seed: int):
  """(cfg, params): loaded from `checkpoint`, else a random `preset`.

  Raises:
    cli.UserError (a ValueError): a checkpoint folder that is missing or
      broken (the loader's message, after the flag).
  """
  if checkpoint:
    check_checkpoint(checkpoint)
    with cli.user_errors(f"--checkpoint {checkpoint!r}"):
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
  """Compiles and times a forward; returns shapes and timings.

  Raises:
    ValueError: batch, seq_len or repeats < 1 (named as their flags).
  """
  for name, value in (("batch", batch), ("seq_len", seq_len),
                      ("repeats", repeats)):
    check_int(f"--{name}", value, 1)
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
  del argv  # cli.run refuses positional arguments
  v = {name: h.value for name, h in _HOLDERS.items()}
  if v["checkpoint"] is not None:
    check_checkpoint(v["checkpoint"])
  cfg, params = build(v["preset"], v["checkpoint"], v["dtype"], v["seed"])
  src = v["checkpoint"] or f"preset {v['preset']} (random weights)"
  print(f"model:       {src}")
  print(f"layers:      {cfg.num_hidden_layers} "
        f"({cfg.layer_types.count('linear_attention')} Gated DeltaNet, "
        f"{cfg.layer_types.count('full_attention')} full attention)")
  r = run_forward(cfg, params, v["batch"], v["seq_len"], v["seed"],
                  v["repeats"])
  print(f"parameters:  {r['params']:,}")
  print(f"logits:      {r['logits_shape']} {r['logits_dtype']} "
        f"(finite: {r['finite']})")
  print(f"device:      {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})")
  print(f"compile:     {r['compile_s']:.2f} s")
  print(f"forward:     {r['forward_s'] * 1e3:.2f} ms "
        f"({r['tokens_per_s']:,.0f} tokens/s, best of {v['repeats']})")
  if not r["finite"]:
    raise SystemExit("non-finite logits")


if __name__ == "__main__":
  _HOLDERS = define_flags()
  cli.run(main)
