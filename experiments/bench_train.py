"""Times the training step, optionally against transformers in one run.

Ours: `qwen_jax.train_step.make_train_step` (AdamW, global-norm clipping,
float32 master weights, --dtype compute, the per-layer remat of --remat,
the chunked cross-entropy) on random tokens, for each length of
--seq_lens at --batch sequences. Each row gives the step's median time
over --steps steps after the compiling one, tokens/s, the model FLOPs
utilisation (`train_step.flops_per_token` x tokens/s / the device's dense
bf16 peak, `train_step.PEAK_FLOPS`) and the device's peak memory when it
reports one (`memory_stats()["peak_bytes_in_use"]`: the highest of the
process so far, so lengths run shortest first).

With --hf, transformers' `Qwen3_5ForCausalLM` of the same config (random
weights, float32 parameters under bf16 autocast on a GPU as ours keeps
float32 master weights, torch's fused AdamW, the same clipping,
`model(input_ids, labels=...)` for the loss) runs first, at the lengths of
--hf_seq_lens, and its cached memory is freed before ours starts (JAX's
allocator keeps what it took, torch's gives it back); the table gives ours
/ theirs. flash-linear-attention, when installed, is what transformers
runs for the Gated DeltaNet layers on a GPU. A length that runs out of
memory is reported as such and the run goes on. With --attention cudnn, a
failure of cuDNN's attention that jax cannot foresee (in XLA's compile)
reruns the length with the jnp attention; the row says which ran.

  # H100, the 0.8B preset at 8k tokens against transformers:
  python -m experiments.bench_train --hf --json_out bench_train.json
  # 32k tokens, ours only:
  python -m experiments.bench_train --seq_lens 32768
  # CPU smoke run (tiny preset, float32, 64 tokens, 2 steps):
  python -m experiments.bench_train --small --hf

Every flag is checked before the model is built (a length or count out of
range, an unknown preset, lengths past the preset's
max_position_embeddings, a --json_out that cannot be written, --hf without
torch and transformers installed); a misuse ends with one line on stderr
and exit status 1 (2 for usage errors); see experiments/cli.py.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import platform
import statistics
import time
from typing import Any, Callable

from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from qwen_jax import train_step
from qwen_jax.config import QwenConfig

_PRESET = flags.DEFINE_string("preset", "qwen3.5-0.8b", "Model preset "
                              "(random weights).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Compute dtype (parameters stay float32).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192"], "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (median).")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots"],
                           "Per-layer rematerialisation (ours).")
_ATTENTION = flags.DEFINE_enum(
    "attention", "xla", ["xla", "cudnn"],
    "QwenConfig.attention_implementation (ours).")
_GDR_BLOCK_SIZES = flags.DEFINE_string(
    "gdr_block_sizes", "", "QwenConfig.gdr_block_sizes (ours), e.g. lean.")
_CE_CHUNK = flags.DEFINE_integer("ce_chunk", 0, "Tokens per cross-entropy "
                                 "chunk (0: about 2^27 logits per chunk).")
_HF = flags.DEFINE_bool("hf", False, "Also run transformers (torch).")
_HF_SEQ_LENS = flags.DEFINE_list(
    "hf_seq_lens", None, "Lengths transformers runs (default --seq_lens).")
_HF_CHECKPOINTING = flags.DEFINE_bool(
    "hf_checkpointing", False, "transformers' gradient checkpointing on.")
_FLA_BYPASS = flags.DEFINE_bool(
    "fla_bypass_hopper_check", True,
    "flash-linear-attention refuses its gated backward on Hopper with "
    "Triton < 3.7.1 (its issue #640: possibly wrong gradients); bypass that "
    "check so that transformers' step can be timed (timing only).")
_SMALL = flags.DEFINE_bool(
    "small", False, "CPU smoke run: the flags not given on the command line "
    "become preset tiny, dtype float32, seq_lens 64, steps 2.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results here.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and tokens.")

_SMALL_VALUES = dict(preset="tiny", dtype="float32", seq_lens=["64"],
                     steps=2)
# Optimizer settings both sides use.
LEARNING_RATE, BETAS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0


def _flag(name: str) -> Any:
  f = flags.FLAGS[name]
  if _SMALL.value and not f.present and name in _SMALL_VALUES:
    return _SMALL_VALUES[name]
  return f.value


def model_config(preset: str, remat: str = "full", attention: str = "xla",
                 gdr_block_sizes: str = "") -> QwenConfig:
  """The preset's language model (no tower), float32 parameters."""
  return QwenConfig.from_preset(
      preset, vision=None, param_dtype="float32", remat_policy=remat,
      attention_implementation=attention, gdr_block_sizes=gdr_block_sizes)


def _is_oom(e: BaseException) -> bool:
  text = f"{type(e).__name__}: {e}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemory",
                                 "out of memory", "Out of memory"))


def _timed(step: Callable[[], Any], sync: Callable[[Any], Any],
           steps: int) -> tuple[float, list[float], Any]:
  """(first call's seconds, the next `steps` calls' seconds, last out)."""
  t0 = time.perf_counter()
  out = sync(step())
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = sync(step())
    times.append(time.perf_counter() - t0)
  return first, times, out


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def bench_ours(cfg: QwenConfig, dtype: str, batch: int, seq_len: int,
               steps: int, ce_chunk: int = 0, seed: int = 0
               ) -> dict[str, Any]:
  """One row: our train step at [batch, seq_len] (module docstring)."""
  tcfg = train_step.TrainConfig(
      batch_size=batch, seq_len=seq_len, num_steps=1000, warmup_steps=10,
      learning_rate=LEARNING_RATE, b1=BETAS[0], b2=BETAS[1],
      weight_decay=WEIGHT_DECAY, grad_clip=CLIP, compute_dtype=dtype,
      ce_chunk_size=ce_chunk, seed=seed)
  mcfg = train_step.model_config_for_training(cfg, tcfg)
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len + 1),
                                 np.int32))
  data = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
  step_fn = train_step.make_train_step(mcfg, tcfg)
  holder = {"state": train_step.init_state(mcfg, tcfg)}

  def step():
    holder["state"], metrics = step_fn(holder["state"], data)
    return metrics

  first, times, metrics = _timed(step, jax.block_until_ready, steps)
  loss = float(metrics["loss"])
  del holder
  sec = statistics.median(times)
  tokens = batch * seq_len
  fpt = train_step.flops_per_token(mcfg, seq_len, cfg.gdr_chunk_size)
  peak = train_step.device_peak_flops()
  return dict(impl="qwen_jax", workload=f"train {batch} x {seq_len}",
              seconds=sec, tokens_per_s=tokens / sec,
              first_step_s=first, flops_per_token=fpt,
              mfu=fpt * tokens / sec / peak if peak else None,
              peak_bytes=_peak_bytes(), loss=loss)


def bypass_fla_hopper_check() -> bool:
  """Lets flash-linear-attention run its gated backward on Hopper with
  Triton < 3.7.1; True when the check was there to bypass."""
  try:
    chunk_o = importlib.import_module("fla.ops.common.chunk_o")
  except ImportError:
    return False
  if getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
    return False
  chunk_o.TRITON_ABOVE_3_7_1 = True
  return True


def bench_hf(cfg: QwenConfig, dtype: str, batch: int, seq_len: int,
             steps: int, checkpointing: bool = False, seed: int = 0
             ) -> dict[str, Any]:
  """One row: transformers' train step at [batch, seq_len]."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(seed)
  model = transformers.Qwen3_5ForCausalLM(cfg.to_hf_config()).to(dev)
  model.train()
  if checkpointing:
    model.gradient_checkpointing_enable()
  opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=BETAS,
                          weight_decay=WEIGHT_DECAY,
                          fused=dev == "cuda")
  rng = np.random.default_rng(seed)
  ids = torch.as_tensor(rng.integers(0, cfg.vocab_size, (batch, seq_len)),
                        device=dev)
  autocast = dtype == "bfloat16"
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def sync(loss):
    if dev == "cuda":
      torch.cuda.synchronize()
    return loss

  try:
    first, times, loss = _timed(step, sync, steps)
    sec = statistics.median(times)
    row = dict(impl="transformers", workload=f"train {batch} x {seq_len}",
               seconds=sec, tokens_per_s=batch * seq_len / sec,
               first_step_s=first, loss=float(loss.detach()),
               peak_bytes=(torch.cuda.max_memory_allocated()
                           if dev == "cuda" else None))
  finally:
    del model, opt
    if dev == "cuda":
      torch.cuda.empty_cache()
  return row


def check_flags() -> dict[str, Any]:
  """The settings of the run (with --small's), every one checked.

  Raises:
    cli.UserError: a flag out of range (named), an unknown preset, lengths
      past the preset's max_position_embeddings, a --gdr_block_sizes that
      is no tiling, an unwritable --json_out, or --hf without torch and
      transformers.
  """
  v = dict(preset=_flag("preset"), dtype=_flag("dtype"),
           seq_lens=cli.int_list("--seq_lens", _flag("seq_lens")),
           batch=cli.positive_int("--batch", _BATCH.value),
           steps=cli.positive_int("--steps", _flag("steps")),
           ce_chunk=cli.positive_int("--ce_chunk", _CE_CHUNK.value, 0))
  if not v["seq_lens"]:
    raise cli.UserError("--seq_lens: expected at least one length, found "
                        "none")
  hf_lens = _HF_SEQ_LENS.value
  v["hf_seq_lens"] = (v["seq_lens"] if hf_lens is None
                      else cli.int_list("--hf_seq_lens", hf_lens))
  with cli.user_errors("--preset"):
    QwenConfig.from_preset(v["preset"])
  with cli.user_errors("--gdr_block_sizes"):
    v["cfg"] = model_config(v["preset"], _REMAT.value, _ATTENTION.value,
                            _GDR_BLOCK_SIZES.value)
  limit = v["cfg"].max_position_embeddings
  for n in v["seq_lens"] + v["hf_seq_lens"]:
    if n > limit:
      raise cli.UserError(f"--seq_lens: expected lengths <= {limit} "
                          f"(max_position_embeddings of {v['preset']}), "
                          f"found {n}")
  cli.benchmark_outputs(_JSON_OUT.value, _HF.value)
  return v


def with_attention_fallback(fn: Callable[[QwenConfig], dict[str, Any]],
                            cfg: QwenConfig) -> dict[str, Any]:
  """fn(cfg)'s row with the attention it ran ("attention"); when cuDNN's
  attention fails (not out of memory), the jnp attention's row, the error
  in "attention_error" (`cli.attention_fallback`)."""
  row, error = cli.attention_fallback(fn, cfg, fatal=_is_oom)
  if error is None:
    return dict(row, attention=cfg.attention_implementation)
  return dict(row, attention="xla", attention_error=error)


def _guarded(name: str, workload: str, fn: Callable[[], dict[str, Any]]
             ) -> dict[str, Any]:
  """fn()'s row, or a row saying that it ran out of memory."""
  try:
    row = fn()
  except Exception as e:  # pylint: disable=broad-except
    if not _is_oom(e):
      raise
    print(f"  measured {name} {workload}: out of memory", flush=True)
    return dict(impl=name, workload=workload, error="out of memory",
                tokens_per_s=None)
  # Logged as measured: a run cut short keeps it.
  peak = row.get("peak_bytes")
  print(f"  measured {name} {workload}: {_fmt(row['tokens_per_s'])} "
        f"tokens/s, MFU {_fmt(row.get('mfu'), '.1%')}, peak "
        f"{_fmt(None if peak is None else peak / 2**30, '.1f')} GiB, step "
        f"{row['seconds']:.3f} s, first step {row['first_step_s']:.1f} s",
        flush=True)
  return row


def _fmt(x: float | None, spec: str = ",.0f") -> str:
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) \
      else format(x, spec)


def main(argv):
  del argv  # cli.run refuses positional arguments
  v = check_flags()
  cfg, dtype, batch, steps = v["cfg"], v["dtype"], v["batch"], v["steps"]
  dev = jax.devices()[0]
  print(f"preset {v['preset']} ({cfg.num_params():,} parameters), {dtype} "
        f"compute, remat {cfg.remat_policy}, attention "
        f"{cfg.attention_implementation}, {dev.device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}", flush=True)
  rows = []
  bypassed = False
  if _HF.value and _FLA_BYPASS.value:
    bypassed = bypass_fla_hopper_check()
    if bypassed:
      print("NOTE: flash-linear-attention's Hopper check for Triton < 3.7.1 "
            "(gated backward, its issue #640) was bypassed to time "
            "transformers' step; its gradients are not checked here.")
  if _HF.value:
    for t in sorted(v["hf_seq_lens"]):
      w = f"train {batch} x {t}"
      rows.append(_guarded("transformers", w, lambda t=t: bench_hf(
          cfg, dtype, batch, t, steps, _HF_CHECKPOINTING.value,
          _SEED.value)))
  for t in sorted(v["seq_lens"]):
    w = f"train {batch} x {t}"
    rows.append(_guarded("qwen_jax", w, lambda t=t: with_attention_fallback(
        lambda c: bench_ours(c, dtype, batch, t, steps, v["ce_chunk"],
                             _SEED.value), cfg)))
  theirs = {r["workload"]: r.get("tokens_per_s") for r in rows
            if r["impl"] == "transformers"}
  print("| workload | impl | tokens/s | MFU | peak memory (GiB) | step (s) "
        "| first step (s) | loss | ours / transformers |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    ratio = None
    if r["impl"] == "qwen_jax" and r.get("tokens_per_s") and theirs.get(
        r["workload"]):
      ratio = r["tokens_per_s"] / theirs[r["workload"]]
    r["ratio"] = ratio
    peak = r.get("peak_bytes")
    error = f" ({r['error']})" if r.get("error") else ""
    print(f"| {r['workload']} | {r['impl']} | "
          f"{_fmt(r.get('tokens_per_s'))}{error} "
          f"| {_fmt(r.get('mfu'), '.1%')} | "
          f"{_fmt(None if peak is None else peak / 2**30, '.1f')} | "
          f"{_fmt(r.get('seconds'), '.3f')} | "
          f"{_fmt(r.get('first_step_s'), '.1f')} | "
          f"{_fmt(r.get('loss'), '.3f')} | "
          f"{'—' if ratio is None else f'{ratio:.2f}x'} |")
  if _JSON_OUT.value:
    meta = dict(preset=v["preset"], dtype=dtype, batch=batch, steps=steps,
                remat=cfg.remat_policy,
                attention=cfg.attention_implementation,
                gdr_block_sizes=cfg.gdr_block_sizes,
                device=dev.device_kind, backend=jax.default_backend(),
                peak_flops=train_step.device_peak_flops(),
                jax=jax.__version__, flax=flax.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    if _HF.value:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
      meta.update(torch=torch.__version__,
                  transformers=transformers.__version__,
                  hf_checkpointing=_HF_CHECKPOINTING.value,
                  fla=importlib.util.find_spec("fla") is not None,
                  fla_hopper_check_bypassed=bypassed)
    with open(_JSON_OUT.value, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=2)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
