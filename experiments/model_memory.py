"""Compiles the one-device training step, prefill and decode step; no run.

Each program is lowered with abstract parameters and inputs
(`jax.ShapeDtypeStruct`s: nothing is allocated) and compiled for the local
backend, and XLA's memory analysis of the compiled program is printed
(arguments, outputs, temporaries, generated code; see
`experiments.long_context.MEMORY_NOTE`) beside the device's memory:

  train    `qwen_jax.train_step.make_train_step` (AdamW, float32 master
           weights, --train_dtype compute, the config's remat policy) on a
           [batch, seq_len] batch; the state is donated.
  prefill  one call of `qwen_jax.generate.prefill`'s block program: a
           block of min(--prefill_block, seq_len) tokens into a cache of
           seq_len + 1 slots (seq_len at the preset's
           max_position_embeddings; the cache donated), last logits only.
  decode   one `qwen_jax.generate.decode_step` program at each batch of
           --decode_batches over a cache of --decode_cache slots.

On a GPU the numbers are the device's own; on a CPU they are XLA's CPU
program (the gated delta rule runs its chunked jnp form there, the Pallas
kernels on a GPU), a check of what the program holds, not of the GPU's
allocator:

  python -m experiments.model_memory --programs train --seq_lens 8192,32768
  python -m experiments.model_memory --programs prefill \
      --seq_lens 32768,131072,262144 --prefill_block 262144 \
      --attention cudnn --json_out prefill_memory.json
  python -m experiments.model_memory --programs decode \
      --decode_batches 1,16,64

Flags are checked before anything is built; a misuse ends with one line on
stderr and exit status 1 (2 for usage errors); see experiments/cli.py.
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any, Sequence

from absl import flags
import jax
import jax.numpy as jnp

from experiments import cli
from experiments.long_context import MEMORY_NOTE
from experiments.long_context import memory_stats
from qwen_jax import cache as cache_lib
# pylint: disable-next=protected-access
from qwen_jax.generate import _decode_jit
# pylint: disable-next=protected-access
from qwen_jax.generate import _prefill_chunk_jit
from qwen_jax.generate import DEFAULT_PREFILL_BLOCK
from qwen_jax import train_step
from qwen_jax.config import QwenConfig

PROGRAMS = ("train", "prefill", "decode")
# Bytes of an 80 GB H100's memory (what `memory_stats()["bytes_limit"]`
# reports is a little less: the driver keeps some).
H100_BYTES = 80 * 10**9

_PRESET = flags.DEFINE_string("preset", "qwen3.5-0.8b", "Model preset.")
_PROGRAMS = flags.DEFINE_list("programs", list(PROGRAMS),
                              f"Programs to compile, of {list(PROGRAMS)}.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192"],
                              "Tokens per sequence (train and prefill).")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences (train and prefill).")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots"],
                           "Per-layer rematerialisation of the train step.")
_TRAIN_DTYPE = flags.DEFINE_enum("train_dtype", "bfloat16",
                                 ["bfloat16", "float32"],
                                 "Compute dtype of the train step.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Compute and parameter dtype of prefill and "
                           "decode.")
_PREFILL_BLOCK = flags.DEFINE_integer(
    "prefill_block", DEFAULT_PREFILL_BLOCK,
    "Prompt tokens per prefill call.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "16", "64"],
                                    "Batch sizes of the decode step.")
_DECODE_CACHE = flags.DEFINE_integer("decode_cache", 1152,
                                     "Cache slots of the decode step.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "xla", ["xla", "cudnn"],
    "QwenConfig.attention_implementation.")
_CE_CHUNK = flags.DEFINE_integer("ce_chunk", 0, "Tokens per cross-entropy "
                                 "chunk (0: about 2^27 logits per chunk).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the rows here.")


def model_config(preset: str, dtype: str, param_dtype: str,
                 remat: str = "none", attention: str = "xla") -> QwenConfig:
  """The preset's language model (no tower) with these implementation
  fields."""
  return QwenConfig.from_preset(preset, vision=None, dtype=dtype,
                                param_dtype=param_dtype, remat_policy=remat,
                                attention_implementation=attention)


def _sds(shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def lower_train(cfg: QwenConfig, batch: int, seq_len: int,
                ce_chunk: int = 0) -> Any:
  """The lowered train step (cfg.dtype computes, float32 master weights)."""
  tcfg = train_step.TrainConfig(batch_size=batch, seq_len=seq_len,
                                compute_dtype=cfg.dtype,
                                ce_chunk_size=ce_chunk)
  master = cfg.replace(param_dtype="float32")
  state = jax.eval_shape(lambda: train_step.init_state(master, tcfg))
  ids = _sds((batch, seq_len), jnp.int32)
  step = train_step.make_train_step(master, tcfg)
  return step.lower(state, {"inputs": ids, "targets": ids})


def abstract_params(cfg: QwenConfig) -> Any:
  """The parameters' shapes and dtypes (nothing allocated)."""
  return jax.eval_shape(lambda: train_step.init_params(cfg))


def lower_prefill(cfg: QwenConfig, batch: int, seq_len: int,
                  block: int) -> Any:
  """The program of one prefill block into a cache of seq_len + 1 slots
  (seq_len at max_position_embeddings)."""
  params = abstract_params(cfg)
  slots = min(seq_len + 1, cfg.max_position_embeddings)
  cache = jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, slots))
  ids = _sds((batch, min(block, seq_len)), jnp.int32)
  return _prefill_chunk_jit.lower(cfg, params, ids, cache, None)


def lower_decode(cfg: QwenConfig, batch: int, cache_len: int) -> Any:
  """One decode step's program over a cache of cache_len slots."""
  params = abstract_params(cfg)
  cache = jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, cache_len))
  tokens = _sds((batch,), jnp.int32)
  return _decode_jit.lower(cfg, params, tokens, cache, None)


def compile_row(name: str, lowered_fn, **info: Any) -> dict[str, Any]:
  """Compiles one program and returns its row (memory, compile time)."""
  t0 = time.perf_counter()
  compiled = lowered_fn().compile()
  row = dict(program=name, **info, compile_s=time.perf_counter() - t0)
  row.update(memory_stats(compiled))
  return row


def device_bytes() -> int | None:
  """The device's allocatable bytes, when it reports them."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def check_flags() -> dict[str, Any]:
  """The checked settings.

  Raises:
    cli.UserError: an unknown program or preset, a length past the preset's
      max_position_embeddings, a number out of range, an unwritable
      --json_out.
  """
  programs = list(_PROGRAMS.value)
  for p in programs:
    if p not in PROGRAMS:
      raise cli.UserError(f"--programs: expected names of {list(PROGRAMS)}, "
                          f"found {p!r}")
  if not programs:
    raise cli.UserError(f"--programs: expected at least one of "
                        f"{list(PROGRAMS)}, found none")
  v = dict(programs=programs,
           seq_lens=cli.int_list("--seq_lens", _SEQ_LENS.value),
           batch=cli.positive_int("--batch", _BATCH.value),
           block=cli.positive_int("--prefill_block", _PREFILL_BLOCK.value, 2),
           batches=cli.int_list("--decode_batches", _DECODE_BATCHES.value),
           cache=cli.positive_int("--decode_cache", _DECODE_CACHE.value),
           ce_chunk=cli.positive_int("--ce_chunk", _CE_CHUNK.value, 0))
  with cli.user_errors("--preset"):
    cfg = QwenConfig.from_preset(_PRESET.value)
  limit = cfg.max_position_embeddings
  for flag, lengths in (("--seq_lens", v["seq_lens"]),
                        ("--decode_cache", [v["cache"]])):
    for n in lengths:
      if n > limit:
        raise cli.UserError(f"{flag}: expected lengths <= {limit} "
                            f"(max_position_embeddings of {_PRESET.value}), "
                            f"found {n}")
  if _JSON_OUT.value is not None:
    cli.writable_file("--json_out", _JSON_OUT.value)
  return v


def _gib(n: int) -> str:
  return f"{n / 2**30:,.2f}"


def main(argv: Sequence[str]) -> None:
  del argv
  v = check_flags()
  preset = _PRESET.value
  rows = []
  print(f"{preset} on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}, compile only")
  print("| program | shape | arguments | outputs | temporaries | total | "
        "compile s |\n| --- | --- | --- | --- | --- | --- | --- |", flush=True)

  def add(row):
    rows.append(row)
    print(f"| {row['program']} | {row['shape']} | {_gib(row['arguments'])} "
          f"| {_gib(row['outputs'])} | {_gib(row['temporaries'])} | "
          f"{_gib(row['total'])} | {row['compile_s']:.0f} |", flush=True)

  if "train" in v["programs"]:
    cfg = model_config(preset, _TRAIN_DTYPE.value, "float32", _REMAT.value,
                       _ATTENTION.value)
    for t in v["seq_lens"]:
      add(compile_row("train", lambda t=t: lower_train(
          cfg, v["batch"], t, v["ce_chunk"]),
                      shape=f"{v['batch']} x {t}", remat=_REMAT.value))
  cfg = model_config(preset, _DTYPE.value, _DTYPE.value,
                     attention=_ATTENTION.value)
  if "prefill" in v["programs"]:
    for t in v["seq_lens"]:
      block = min(v["block"], t)
      add(compile_row("prefill", lambda t=t: lower_prefill(
          cfg, v["batch"], t, v["block"]),
                      shape=f"{v['batch']} x {t} (block {block})"))
  if "decode" in v["programs"]:
    for b in v["batches"]:
      add(compile_row("decode", lambda b=b: lower_decode(cfg, b, v["cache"]),
                      shape=f"{b} x 1 (cache {v['cache']})"))
  limit = device_bytes()
  print(f"GiB; {MEMORY_NOTE}. Device memory: "
        f"{'not reported' if limit is None else _gib(limit) + ' GiB'}; an "
        f"80 GB H100: {_gib(H100_BYTES)} GiB.")
  if _JSON_OUT.value:
    meta = dict(preset=preset, device=jax.devices()[0].device_kind,
                backend=jax.default_backend(), jax=jax.__version__,
                attention=_ATTENTION.value, device_bytes=limit,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                note=MEMORY_NOTE)
    with open(_JSON_OUT.value, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=2)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
