"""Times prefill and decoding, optionally against transformers in one run.

  prefill  tokens/s of `qwen_jax.generate.prefill` on one long prompt (the
           cache filled, only the last token's logits computed), per length
           in --prefill_lengths, with the device's peak memory when it
           reports one.
  decode   `qwen_jax.generate` (greedy, no stop tokens) at each batch size in
           --decode_batches with a --decode_prompt-token prompt and
           --decode_new new tokens: new tokens/s end to end (prefill
           included, as transformers' `generate` throughput is timed)
           and for the decode loop alone.
With --hf the same workloads run through transformers (torch, same config,
random weights, `model.model(...)` without logits for prefill, greedy
`generate` for decoding) and the table gives ours / theirs.

  # H100, the 0.8B preset against transformers (bf16, random weights):
  python -m experiments.bench_generate --hf --json_out bench_generate.json
  # 262,144-token prompt:
  python -m experiments.bench_generate --prefill_lengths 262144 \
      --decode_batches ""
  # CPU smoke run (tiny preset, short prompts):
  python -m experiments.bench_generate --small --hf

Timings are medians of --repeats runs after one compiling run.

Every flag is checked before the model is built (a length or batch out of
range, an unknown preset, a --json_out that cannot be written, --hf without
torch and transformers installed); a misuse ends with one line on stderr
and exit status 1 (2 for usage errors); see experiments/cli.py.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
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
import qwen_jax
from qwen_jax import cache as cache_lib
from qwen_jax.generate import DEFAULT_PREFILL_BLOCK
from qwen_jax.generate import prefill

_PRESET = flags.DEFINE_string("preset", "qwen3.5-0.8b", "Model preset "
                              "(random weights).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Compute and parameter dtype.")
_PREFILL_LENGTHS = flags.DEFINE_list("prefill_lengths", ["32768", "131072"],
                                     "Prompt lengths of the prefill bench.")
_PREFILL_BLOCK = flags.DEFINE_integer("prefill_block", DEFAULT_PREFILL_BLOCK,
                                      "Prompt tokens per prefill call.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "16"],
                                    "Batch sizes of the decode bench.")
_DECODE_PROMPT = flags.DEFINE_integer("decode_prompt", 1024,
                                      "Prompt tokens of the decode bench.")
_DECODE_NEW = flags.DEFINE_integer("decode_new", 128, "New tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median).")
_HF = flags.DEFINE_bool("hf", False, "Also run transformers (torch).")
_SMALL = flags.DEFINE_bool(
    "small", False, "CPU smoke run: the flags not given on the command line "
    "become preset tiny, float32, prefill_lengths 256,1024, prefill_block "
    "512, decode_batches 1,4, decode_prompt 64, decode_new 16, repeats 2.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results here.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and prompts.")

_SMALL_VALUES = dict(preset="tiny", dtype="float32",
                     prefill_lengths=["256", "1024"], prefill_block=512,
                     decode_batches=["1", "4"], decode_prompt=64,
                     decode_new=16, repeats=2)


def _flag(name: str) -> Any:
  f = flags.FLAGS[name]
  if _SMALL.value and not f.present and name in _SMALL_VALUES:
    return _SMALL_VALUES[name]
  return f.value


def random_model(preset: str, dtype: str, seed: int):
  """(cfg, params) of a preset's language model (no vision tower) with
  random weights, built on the device."""
  cfg = qwen_jax.QwenConfig.from_preset(preset, dtype=dtype,
                                        param_dtype=dtype, vision=None)
  model = qwen_jax.Qwen35(cfg)
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)))
  params = flax.linen.meta.unbox(init(jax.random.PRNGKey(seed)))["params"]
  return cfg, params


def _median_s(fn: Callable[[], Any], repeats: int,
              setup: Callable[[], Any] | None = None) -> float:
  """Median wall time of fn(setup()) after one untimed (compiling) run."""
  times = []
  for i in range(repeats + 1):
    arg = setup() if setup else None
    jax.block_until_ready(arg)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(arg) if setup else fn())
    if i:
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def bench_ours(cfg, params, prefill_lengths, prefill_block, batches,
               prompt_len, new_tokens, repeats, seed) -> list[dict]:
  """Rows {"workload", "value", "unit", ...} for our implementation."""
  rng = np.random.default_rng(seed)
  rows = []
  for t in prefill_lengths:
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t), np.int32))
    sec = _median_s(
        lambda c, ids=ids: prefill(cfg, params, ids, c,
                                   prefill_block=prefill_block)[0],
        repeats, setup=lambda t=t: cache_lib.init_cache(cfg, 1, t + 1))
    rows.append(dict(workload=f"prefill 1 x {t}", value=t / sec,
                     unit="tokens/s", seconds=sec,
                     peak_bytes=_peak_bytes(),
                     cache_bytes=cache_lib.cache_bytes(cfg, 1, t + 1)))
  for b in batches:
    ids = rng.integers(0, cfg.vocab_size, (b, prompt_len), np.int32)
    total = _median_s(lambda ids=ids: qwen_jax.generate(
        cfg, params, ids, new_tokens, stop_tokens=(),
        prefill_block=prefill_block), repeats)
    pre = _median_s(
        lambda c, ids=ids: prefill(cfg, params, ids, c,
                                   prefill_block=prefill_block)[0],
        repeats, setup=lambda b=b: cache_lib.init_cache(
            cfg, b, prompt_len + new_tokens))
    loop = max(total - pre, 1e-9)
    rows.append(dict(workload=f"generate b={b}, {prompt_len}+{new_tokens}",
                     value=b * new_tokens / total, unit="new tokens/s",
                     seconds=total))
    rows.append(dict(workload=f"decode loop only b={b}",
                     value=b * (new_tokens - 1) / loop, unit="new tokens/s",
                     seconds=loop))
  return rows


def bench_hf(cfg, prefill_lengths, batches, prompt_len, new_tokens, repeats,
             seed) -> dict[str, float]:
  """{workload: value} through transformers, same shapes and dtype."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
  torch.manual_seed(seed)
  model = transformers.Qwen3_5ForCausalLM(cfg.to_hf_config()).to(dev, tdt)
  model.eval()
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  rng = np.random.default_rng(seed)

  def median(fn):
    times = []
    for i in range(repeats + 1):
      sync()
      t0 = time.perf_counter()
      fn()
      sync()
      if i:
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

  out = {}
  with torch.no_grad():
    for t in prefill_lengths:
      ids = torch.as_tensor(rng.integers(0, cfg.vocab_size, (1, t)),
                            device=dev)
      sec = median(lambda ids=ids: model.model(input_ids=ids,
                                               use_cache=False))
      out[f"prefill 1 x {t}"] = t / sec
    for b in batches:
      ids = torch.as_tensor(rng.integers(0, cfg.vocab_size,
                                         (b, prompt_len)), device=dev)
      sec = median(lambda ids=ids: model.generate(
          input_ids=ids, attention_mask=torch.ones_like(ids),
          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
          do_sample=False, eos_token_id=None, pad_token_id=0))
      out[f"generate b={b}, {prompt_len}+{new_tokens}"] = (
          b * new_tokens / sec)
  return out


def _fmt(x: float | None) -> str:
  return "—" if x is None else f"{x:,.1f}"


def check_flags() -> dict[str, Any]:
  """The settings of the run (with --small's), every one checked.

  Raises:
    cli.UserError: a flag out of range (named), an unknown preset, lengths
      past the preset's max_position_embeddings, an unwritable --json_out,
      or --hf without torch and transformers.
  """
  v = dict(preset=_flag("preset"), dtype=_flag("dtype"),
           block=cli.positive_int("--prefill_block", _flag("prefill_block"),
                                  2),
           prompt_len=cli.positive_int("--decode_prompt",
                                       _flag("decode_prompt")),
           # The decode loop runs after the first new token.
           new_tokens=cli.positive_int("--decode_new", _flag("decode_new"),
                                       2),
           repeats=cli.positive_int("--repeats", _flag("repeats")),
           lengths=cli.int_list("--prefill_lengths",
                                _flag("prefill_lengths")),
           batches=cli.int_list("--decode_batches", _flag("decode_batches")))
  with cli.user_errors("--preset"):
    cfg = qwen_jax.QwenConfig.from_preset(v["preset"])
  limit = cfg.max_position_embeddings
  for n in v["lengths"]:
    if n > limit:
      raise cli.UserError(f"--prefill_lengths: expected lengths <= "
                          f"{limit} (max_position_embeddings of "
                          f"{v['preset']}), found {n}")
  if v["batches"] and v["prompt_len"] + v["new_tokens"] > limit:
    raise cli.UserError(
        f"--decode_prompt {v['prompt_len']} + --decode_new "
        f"{v['new_tokens']}: expected at most {limit} tokens "
        f"(max_position_embeddings of {v['preset']}), found "
        f"{v['prompt_len'] + v['new_tokens']}")
  if _JSON_OUT.value is not None:
    cli.writable_file("--json_out", _JSON_OUT.value)
  if _HF.value:
    missing = [m for m in ("torch", "transformers")
               if importlib.util.find_spec(m) is None]
    if missing:
      raise cli.UserError(f"--hf: expected torch and transformers "
                          f"installed, found {' and '.join(missing)} "
                          f"missing")
  return v


def main(argv):
  del argv  # cli.run refuses positional arguments
  v = check_flags()
  preset, dtype, lengths, batches = (v["preset"], v["dtype"], v["lengths"],
                                     v["batches"])
  block, prompt_len = v["block"], v["prompt_len"]
  new_tokens, repeats = v["new_tokens"], v["repeats"]
  cfg, params = random_model(preset, dtype, _SEED.value)
  dev = jax.devices()[0]
  print(f"preset {preset} ({cfg.num_params():,} parameters), {dtype}, "
        f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  rows = bench_ours(cfg, params, lengths, block, batches, prompt_len,
                    new_tokens, repeats, _SEED.value)
  hf = {}
  if _HF.value:
    del params
    hf = bench_hf(cfg, lengths, batches, prompt_len, new_tokens, repeats,
                  _SEED.value)
  print("| workload | qwen_jax | transformers | ratio | unit |\n"
        "| --- | --- | --- | --- | --- |")
  for r in rows:
    theirs = hf.get(r["workload"])
    r["hf"] = theirs
    r["ratio"] = r["value"] / theirs if theirs else None
    extra = ""
    if r.get("peak_bytes"):
      extra = f" (peak {r['peak_bytes'] / 2**30:.2f} GiB)"
    ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    print(f"| {r['workload']} | {_fmt(r['value'])}{extra} | {_fmt(theirs)} "
          f"| {ratio} | {r['unit']} |")
  if _JSON_OUT.value:
    meta = dict(preset=preset, dtype=dtype, device=dev.device_kind,
                backend=jax.default_backend(), jax=jax.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                prefill_block=block, repeats=repeats)
    if _HF.value:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
      meta.update(torch=torch.__version__,
                  transformers=transformers.__version__)
    with open(_JSON_OUT.value, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=2)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
