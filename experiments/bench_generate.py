"""Times prefill and decoding, optionally against transformers in one run.

  prefill  tokens/s of `qwen_jax.generate.prefill` on one long prompt (the
           cache filled, only the last token's logits computed), per length
           in --prefill_lengths, with the device's peak memory when it
           reports one.
  decode   `qwen_jax.generate` (greedy, no stop tokens) at each batch size in
           --decode_batches with a --decode_prompt-token prompt and
           --decode_new new tokens: new tokens/s end to end (prefill
           included, as transformers' `generate` throughput is timed)
           and for the decode loop alone (the same call's time less that
           of the call for one new token, over the tokens after the first).

Each workload runs for every variant of the weights in --variants:

  scan      the float parameters (scanned stack) through the layer loop
            they were built with: `qwen_jax.decode_loop.auto_convert(False)`
  unscan    the same model built unscanned (other random values), likewise
  layout    the decode layout in the parameters' dtype, what `generate`
            runs on a CPU (`qwen_jax.decode_loop.prepare`)
  bfloat16, int8
            `qwen_jax.quantize(cfg, params, mode)`

(prefill only for the variants in --prefill_variants). Each decode row
gives the bandwidth floor beside it: batch x memory bandwidth / bytes read
per step, the bytes being every parameter array (the head's included; of
an untied embedding only the rows looked up) plus the whole cache; the
bandwidth is measured in the same process, the best of 5 row sums over a
1 GiB float32 array (XLA, every core). The quality table compares each
variant with the float parameters on one prompt of --decode_prompt tokens
and the float model's --decode_new greedy tokens: the largest logit error
relative to the largest logit (teacher forced, every position), how often
the teacher-forced argmax agrees, and how many of the variant's own greedy
tokens equal the float model's (and where they first differ).

With --hf the same workloads run through transformers (torch, same config,
random weights, `model.model(...)` without logits for prefill, greedy
`generate` for decoding, its decode loop timed as ours; prefill at
--hf_prefill_lengths when given) and the table gives ours / theirs. On a
GPU transformers runs first and gives its cached memory back before ours
starts; on a CPU it runs last. Each measured row is also logged as it is
taken, so a run cut short keeps what it measured. With --attention cudnn,
a failure of cuDNN's attention that jax cannot foresee (in XLA's compile)
reruns the variant with the jnp attention, noted in its rows.

  # H100, the 0.8B preset against transformers (bf16, random weights):
  python -m experiments.bench_generate --hf --json_out bench_generate.json
  # 262,144-token prompt:
  python -m experiments.bench_generate --prefill_lengths 262144 \
      --decode_batches ""
  # GPU: each prompt in one block, its attention through cuDNN's fused
  # attention (the jnp attention reads every cache slot per query block):
  python -m experiments.bench_generate --attention cudnn \
      --prefill_block 262144 --prefill_lengths 32768,131072,262144 \
      --decode_batches "" --variants scan --prefill_variants scan \
      --noquality
  # CPU smoke run (tiny preset, short prompts):
  python -m experiments.bench_generate --small --hf
  # CPU, 0.8B, float32: every variant against transformers' float32
  python -m experiments.bench_generate --dtype float32 \
      --prefill_lengths 256 --decode_batches 1,4 --decode_prompt 64 \
      --decode_new 24 --repeats 3 --hf --json_out cpu.json

Timings are medians of --repeats runs after one compiling run.

Every flag is checked before the model is built (a length or batch out of
range, an unknown preset, a --json_out that cannot be written, --hf without
torch and transformers installed); a misuse ends with one line on stderr
and exit status 1 (2 for usage errors); see experiments/cli.py.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
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
from qwen_jax import decode_loop
from qwen_jax.generate import DEFAULT_PREFILL_BLOCK
from qwen_jax.generate import prefill
from qwen_jax.quantize import MODES
from qwen_jax.quantize import weight_bytes

VARIANTS = ("scan", "unscan", "layout") + tuple(
    m for m in MODES if m != "float32")

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
_VARIANTS = flags.DEFINE_list(
    "variants", ["scan", "layout", "bfloat16", "int8"],
    f"Weight variants to time, of {list(VARIANTS)} (module docstring).")
_PREFILL_VARIANTS = flags.DEFINE_list(
    "prefill_variants", ["scan", "layout"],
    "Variants (of --variants) whose prefill is timed.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "xla", ["xla", "cudnn"],
    "QwenConfig.attention_implementation (ours): cudnn runs a prompt's "
    "first block through cuDNN's fused attention where it can; with "
    "--prefill_block at least the prompt, the whole prompt.")
_QUALITY = flags.DEFINE_bool(
    "quality", True, "Compare each variant with the float model (the "
    "quality table; compiles a forward and a generate of its own).")
_HF = flags.DEFINE_bool("hf", False, "Also run transformers (torch).")
_HF_PREFILL_LENGTHS = flags.DEFINE_list(
    "hf_prefill_lengths", None,
    "Prompt lengths transformers' prefill runs (default --prefill_lengths).")
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
# Bytes of the array the bandwidth is measured on.
BANDWIDTH_BYTES = 1 << 30


def _flag(name: str) -> Any:
  f = flags.FLAGS[name]
  if _SMALL.value and not f.present and name in _SMALL_VALUES:
    return _SMALL_VALUES[name]
  return f.value


def random_model(preset: str, dtype: str, seed: int, scan: bool = True,
                 attention: str = "xla"):
  """(cfg, params) of a preset's language model (no vision tower) with
  random weights, built on the device."""
  cfg = qwen_jax.QwenConfig.from_preset(preset, dtype=dtype,
                                        param_dtype=dtype, vision=None,
                                        scan_layers=scan,
                                        attention_implementation=attention)
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


def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5
                      ) -> float:
  """Bytes/s of reading an array: the best of `repeats` row sums over a
  [n, 1024] float32 array of `nbytes` (one pass over memory, every core)."""
  x = jnp.ones((nbytes // 4096, 1024), jnp.float32)
  f = jax.jit(lambda a: jnp.sum(a, axis=1))
  jax.block_until_ready(f(x))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    best = min(best, time.perf_counter() - t0)
  del x
  return nbytes / best


def step_bytes(cfg, tree, batch: int, cache_len: int) -> int:
  """Bytes one decode step reads at most: every parameter array (of an
  untied embedding only the rows looked up) and the whole cache."""
  total = weight_bytes(tree)
  if not cfg.tie_word_embeddings:
    emb = tree["embed_tokens"]
    table = weight_bytes(emb)
    rows = emb.get("embedding", emb.get("embedding_q"))
    total -= table - table * batch // rows.shape[0]
  return total + cache_lib.cache_bytes(cfg, batch, cache_len)


def prefill_slots(cfg, t: int) -> int:
  """Cache slots of the prefill bench: the prompt and one more token, within
  max_position_embeddings (a 262,144-token prompt fills the cache)."""
  return min(t + 1, cfg.max_position_embeddings)


def _row_text(r: dict[str, Any]) -> str:
  """One measured row as a log line (kept if the run is cut short)."""
  text = f"{r['variant']} {r['workload']}: {_fmt(r['value'])} {r['unit']}"
  if r.get("floor"):
    text += f" (floor {_fmt(r['floor'])})"
  if r.get("peak_bytes"):
    text += f" (peak {r['peak_bytes'] / 2**30:.2f} GiB)"
  return text


@contextlib.contextmanager
def _variant_context(name: str):
  """The old layer loops run with the conversion off."""
  with decode_loop.auto_convert(name not in ("scan", "unscan")):
    yield


def bench_ours(cfg, params, prefill_lengths, prefill_block, batches,
               prompt_len, new_tokens, repeats, seed, variant="layout",
               bandwidth=None) -> list[dict]:
  """Rows {"workload", "value", "unit", ...} for our implementation, on
  `params` (a float or decode-layout tree) run as `variant` runs."""
  rng = np.random.default_rng(seed)
  rows = []
  with _variant_context(variant):
    for t in prefill_lengths:
      ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t), np.int32))
      run_cfg, run_params = decode_loop.prepare(cfg, params)
      sec = _median_s(
          lambda c, ids=ids: prefill(run_cfg, run_params, ids, c,
                                     prefill_block=prefill_block)[0],
          repeats, setup=lambda t=t: cache_lib.init_cache(
              run_cfg, 1, prefill_slots(cfg, t)))
      rows.append(dict(variant=variant, workload=f"prefill 1 x {t}",
                       value=t / sec, unit="tokens/s", seconds=sec,
                       peak_bytes=_peak_bytes(),
                       cache_bytes=cache_lib.cache_bytes(
                           cfg, 1, prefill_slots(cfg, t))))
      print(f"  measured {_row_text(rows[-1])}", flush=True)
    for b in batches:
      ids = rng.integers(0, cfg.vocab_size, (b, prompt_len), np.int32)
      gen = lambda n, ids=ids: qwen_jax.generate(
          cfg, params, ids, n, stop_tokens=(), prefill_block=prefill_block,
          cache_len=prompt_len + new_tokens)
      total = _median_s(lambda: gen(new_tokens), repeats)
      # The same call for one new token: prefill, first token, no loop.
      first = _median_s(lambda: gen(1), repeats)
      loop = total - first
      run_cfg, run_params = decode_loop.prepare(cfg, params)
      nbytes = step_bytes(run_cfg, run_params, b, prompt_len + new_tokens)
      floor = None if bandwidth is None else b * bandwidth / nbytes
      rows.append(dict(variant=variant,
                       workload=f"generate b={b}, {prompt_len}+{new_tokens}",
                       value=b * new_tokens / total, unit="new tokens/s",
                       seconds=total))
      rows.append(dict(variant=variant, workload=f"decode loop only b={b}",
                       value=b * (new_tokens - 1) / loop if loop > 0 else None,
                       unit="new tokens/s", seconds=loop, floor=floor,
                       step_bytes=nbytes))
      print(f"  measured {_row_text(rows[-2])}; {_row_text(rows[-1])}",
            flush=True)
  return rows


def quality_reference(cfg, params, prompt_len: int, new_tokens: int,
                      seed: int) -> dict[str, Any]:
  """The float model's greedy tokens after one prompt, and its logits over
  prompt + tokens (the scanned layer loop, no conversion)."""
  rng = np.random.default_rng(seed + 1)
  ids = rng.integers(0, cfg.vocab_size, (1, prompt_len), np.int32)
  with decode_loop.auto_convert(False):
    new = np.asarray(qwen_jax.generate(cfg, params, ids, new_tokens,
                                       stop_tokens=()))
  seq = np.concatenate([ids, new], axis=1)
  return dict(ids=ids, new=new, seq=seq,
              logits=np.asarray(_forward(cfg, params, seq)))


_forward = jax.jit(decode_loop.apply_model, static_argnums=0)


def quality(cfg, tree, name: str, ref: dict[str, Any]) -> dict[str, Any]:
  """One variant against the float model (module docstring)."""
  ids, seq, want = ref["ids"], ref["seq"], ref["logits"]
  logits = np.asarray(_forward(cfg, tree, seq))
  err = float(np.abs(logits - want).max() / np.abs(want).max())
  span = slice(ids.shape[1] - 1, seq.shape[1] - 1)
  top1 = float(np.mean(logits[0, span].argmax(-1)
                       == want[0, span].argmax(-1)))
  n = ref["new"].shape[1]
  new = np.asarray(qwen_jax.generate(cfg, tree, ids, n, stop_tokens=()))
  same = new[0] == ref["new"][0]
  first = None if same.all() else int(np.argmin(same))
  return dict(variant=name, weight_bytes=weight_bytes(tree),
              max_logit_err_rel=err, teacher_forced_top1=top1,
              greedy_equal=int(same.sum()), greedy_tokens=n,
              first_difference=first)


def bench_hf(cfg, prefill_lengths, batches, prompt_len, new_tokens, repeats,
             seed) -> tuple[dict[str, float], int]:
  """({workload: value}, the model's parameter count) through
  transformers, same shapes and dtype (`Qwen3_5MoeForCausalLM` for a
  mixture-of-experts config)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
  torch.manual_seed(seed)
  cls = (transformers.Qwen3_5MoeForCausalLM if cfg.is_moe
         else transformers.Qwen3_5ForCausalLM)
  with torch.device(dev):  # initialised where it runs
    model = cls(cfg.to_hf_config()).to(tdt)
  model.eval()
  n_params = sum(p.numel() for p in model.parameters())
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
      print(f"  measured transformers prefill 1 x {t}: {t / sec:,.0f} "
            f"tokens/s", flush=True)
    for b in batches:
      ids = torch.as_tensor(rng.integers(0, cfg.vocab_size,
                                         (b, prompt_len)), device=dev)
      gen = lambda n, ids=ids: model.generate(
          input_ids=ids, attention_mask=torch.ones_like(ids),
          max_new_tokens=n, min_new_tokens=n, do_sample=False,
          eos_token_id=None, pad_token_id=0)
      sec = median(lambda: gen(new_tokens))
      first = median(lambda: gen(1))
      out[f"generate b={b}, {prompt_len}+{new_tokens}"] = (
          b * new_tokens / sec)
      if sec > first:  # timed as ours: the same call less one new token's
        out[f"decode loop only b={b}"] = b * (new_tokens - 1) / (sec - first)
      print(f"  measured transformers b={b}: {out}", flush=True)
  del model
  if dev == "cuda":
    torch.cuda.empty_cache()
  return out, n_params


def _fmt(x: float | None) -> str:
  return "—" if x is None else f"{x:,.1f}"


def check_flags() -> dict[str, Any]:
  """The settings of the run (with --small's), every one checked.

  Raises:
    cli.UserError: a flag out of range (named), an unknown preset or
      variant, lengths past the preset's max_position_embeddings, an
      unwritable --json_out, or --hf without torch and transformers.
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
           hf_lengths=cli.int_list(
               "--hf_prefill_lengths",
               _flag("prefill_lengths") if _HF_PREFILL_LENGTHS.value is None
               else _HF_PREFILL_LENGTHS.value),
           batches=cli.int_list("--decode_batches", _flag("decode_batches")),
           variants=list(_flag("variants")),
           prefill_variants=list(_flag("prefill_variants")))
  for name in ("variants", "prefill_variants"):
    for x in v[name]:
      if x not in VARIANTS:
        raise cli.UserError(f"--{name}: expected names of {list(VARIANTS)}, "
                            f"found {x!r}")
  if not v["variants"]:
    raise cli.UserError(f"--variants: expected at least one of "
                        f"{list(VARIANTS)}, found none")
  for x in v["prefill_variants"]:
    if x not in v["variants"]:
      raise cli.UserError(f"--prefill_variants: expected names among "
                          f"--variants {v['variants']}, found {x!r}")
  with cli.user_errors("--preset"):
    cfg = qwen_jax.QwenConfig.from_preset(v["preset"])
  limit = cfg.max_position_embeddings
  for n in v["lengths"] + v["hf_lengths"]:
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
  cli.benchmark_outputs(_JSON_OUT.value, _HF.value)
  return v


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _variant_tree(name, preset, cfg, params, dtype, seed):
  """(cfg, tree) of one variant (module docstring)."""
  if name == "scan":
    return cfg, params
  if name == "unscan":
    return random_model(preset, dtype, seed, scan=False,
                        attention=cfg.attention_implementation)
  if name == "layout":
    return cfg, decode_loop.prepare(cfg, params)[1]
  return cfg, qwen_jax.quantize(cfg, params, name)


def with_attention_fallback(fn: Callable[[Any], list[dict]], cfg
                            ) -> list[dict]:
  """fn(cfg)'s rows, or those of the jnp attention after cuDNN's failed,
  each then noting the error ("attention_error"; `cli.attention_fallback`)."""
  rows, error = cli.attention_fallback(fn, cfg)
  return rows if error is None else [dict(r, attention_error=error)
                                     for r in rows]


def _bench_hf(v: dict[str, Any]) -> tuple[dict[str, float], int]:
  cfg = qwen_jax.QwenConfig.from_preset(v["preset"], dtype=v["dtype"],
                                        param_dtype=v["dtype"], vision=None)
  return bench_hf(cfg, v["hf_lengths"], v["batches"], v["prompt_len"],
                  v["new_tokens"], v["repeats"], _SEED.value)


def main(argv):
  del argv  # cli.run refuses positional arguments
  v = check_flags()
  preset, dtype, lengths, batches = (v["preset"], v["dtype"], v["lengths"],
                                     v["batches"])
  block, prompt_len = v["block"], v["prompt_len"]
  new_tokens, repeats = v["new_tokens"], v["repeats"]
  load_start = os.getloadavg()
  hf, hf_params = {}, None
  # On a GPU transformers runs first: torch gives its cached memory back
  # before JAX takes what it needs (JAX's allocator keeps what it took).
  # On a CPU it runs last, as measured so far (the order changes its
  # threads' speed there).
  hf_first = jax.default_backend() == "gpu"
  if _HF.value and hf_first:
    hf, hf_params = _bench_hf(v)
  cfg, params = random_model(preset, dtype, _SEED.value,
                             attention=_ATTENTION.value)
  dev = jax.devices()[0]
  print(f"preset {preset} ({cfg.num_params():,} parameters), {dtype}, "
        f"attention {cfg.attention_implementation}, {dev.device_kind} "
        f"({jax.default_backend()}; {_cpu_name()}), jax {jax.__version__}; "
        f"load average {load_start[0]:.2f}")
  bandwidth = measure_bandwidth()
  print(f"memory bandwidth (row sums over 1 GiB, best of 5): "
        f"{bandwidth / 1e9:.1f} GB/s")
  ref = (quality_reference(cfg, params, prompt_len, new_tokens, _SEED.value)
         if _QUALITY.value else None)
  rows, qual = [], []
  for name in v["variants"]:
    vcfg, tree = _variant_tree(name, preset, cfg, params, dtype,
                               _SEED.value)
    rows += with_attention_fallback(lambda c, vcfg=vcfg, tree=tree, name=name:
        bench_ours(c, tree, lengths if name in v["prefill_variants"] else [],
                   block, batches, prompt_len, new_tokens, repeats,
                   _SEED.value, variant=name, bandwidth=bandwidth), vcfg)
    if ref is not None and name not in ("scan", "unscan"):
      # (scan is the reference; unscan has other weights)
      qual.append(quality(cfg, tree, name, ref))
    print(f"  {name} done ({weight_bytes(tree) / 2**20:,.1f} MiB of "
          f"weights)", flush=True)
    del tree
    decode_loop.clear_cache()
  del ref
  if _HF.value and not hf_first:
    del params
    hf, hf_params = _bench_hf(v)
  load_end = os.getloadavg()
  print("| variant | workload | qwen_jax | floor | of floor | transformers "
        "| ratio | unit |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    theirs = hf.get(r["workload"])
    r["hf"] = theirs
    r["ratio"] = r["value"] / theirs if theirs and r["value"] else None
    extra = ""
    if r.get("peak_bytes"):
      extra = f" (peak {r['peak_bytes'] / 2**30:.2f} GiB)"
    ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    floor = r.get("floor")
    share = ("—" if floor is None or r["value"] is None
             else f"{r['value'] / floor:.0%}")
    print(f"| {r['variant']} | {r['workload']} | {_fmt(r['value'])}{extra} "
          f"| {_fmt(floor)} | {share} | {_fmt(theirs)} | {ratio} "
          f"| {r['unit']} |")
  print("\n| variant | weights (MiB) | max logit err / max logit | "
        "teacher-forced argmax agreement | greedy tokens equal | "
        "first difference |\n| --- | --- | --- | --- | --- | --- |")
  for q in qual:
    first = "—" if q["first_difference"] is None else q["first_difference"]
    print(f"| {q['variant']} | {q['weight_bytes'] / 2**20:,.1f} | "
          f"{q['max_logit_err_rel']:.2e} | {q['teacher_forced_top1']:.2f} | "
          f"{q['greedy_equal']}/{q['greedy_tokens']} | {first} |")
  print(f"load average: {load_start[0]:.2f} at the start, "
        f"{load_end[0]:.2f} at the end")
  if _JSON_OUT.value:
    meta = dict(preset=preset, dtype=dtype, device=dev.device_kind,
                attention=cfg.attention_implementation,
                cpu=_cpu_name(), backend=jax.default_backend(),
                jax=jax.__version__, flax=flax.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                prefill_block=block, repeats=repeats,
                bandwidth_bytes_per_s=bandwidth,
                loadavg_start=load_start, loadavg_end=load_end)
    if _HF.value:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
      meta.update(torch=torch.__version__,
                  transformers=transformers.__version__,
                  parameters=cfg.num_params(), hf_parameters=hf_params)
    with open(_JSON_OUT.value, "w") as f:
      json.dump(dict(meta=meta, rows=rows, quality=qual), f, indent=2)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
