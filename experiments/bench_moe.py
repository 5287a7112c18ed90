"""Times the routed experts: grouped matmul against all experts dense.

  ragged  `qwen_jax.moe.experts_ragged`: the tokens' (token, expert) pairs
          sorted by expert, one `jax.lax.ragged_dot` per projection
          (the work of the k chosen experts only).
  dense   `qwen_jax.moe.experts_dense`: every expert on every token, the
          results weighted by the routing (E / k times the multiplies).

Both run jitted, forward alone and forward + backward (the gradients of
x and both weight stacks), on --tokens tokens of width --hidden routed
to --top_k of --experts experts of width --expert_width (random router,
so the tokens spread unevenly). The table gives milliseconds per call and
dense / ragged, and the largest difference of the outputs relative to the
largest output (the two compute the same function).

  # CPU, the sizes of BENCHMARKS.md:
  python -m experiments.bench_moe --tokens 2048 --hidden 256 --experts 32 \\
      --top_k 4 --expert_width 128 --repeats 5

Timings are medians of --repeats calls after one untimed (compiling) call.
Every flag is checked first; a misuse ends with one line on stderr and exit
status 1 (2 for usage errors); see experiments/cli.py.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from qwen_jax import moe

_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens per call.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Model width d.")
_EXPERTS = flags.DEFINE_integer("experts", 32, "Routed experts E.")
_TOP_K = flags.DEFINE_integer("top_k", 4, "Experts per token k (<= E).")
_WIDTH = flags.DEFINE_integer("expert_width", 128, "Each expert's width I.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute and weight dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results here.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of inputs and weights.")


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of fn() after one untimed (compiling) call."""
  times = []
  for i in range(repeats + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    if i:
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def check_flags() -> dict[str, int]:
  """The sizes, every one checked (cli.UserError naming the flag)."""
  v = {name: cli.positive_int(flag, value) for name, flag, value in (
      ("tokens", "--tokens", _TOKENS.value),
      ("hidden", "--hidden", _HIDDEN.value),
      ("experts", "--experts", _EXPERTS.value),
      ("top_k", "--top_k", _TOP_K.value),
      ("width", "--expert_width", _WIDTH.value),
      ("repeats", "--repeats", _REPEATS.value))}
  if v["top_k"] > v["experts"]:
    raise cli.UserError(f"--top_k: expected at most --experts="
                        f"{v['experts']}, found {v['top_k']}")
  if _JSON_OUT.value is not None:
    cli.writable_file("--json_out", _JSON_OUT.value)
  return v


def inputs(v: dict[str, int], dtype: str, seed: int) -> tuple:
  """(x, weights, idx, gate_up, down) with a random router's choices."""
  rng = np.random.default_rng(seed)
  t, d, e, k, f = (v["tokens"], v["hidden"], v["experts"], v["top_k"],
                   v["width"])
  x = rng.standard_normal((t, d)).astype(np.float32)
  logits = x @ rng.standard_normal((d, e)).astype(np.float32) / np.sqrt(d)
  w, idx = moe.route(jnp.asarray(logits), k)
  dt = jnp.dtype(dtype)
  gate_up = (rng.standard_normal((e, d, 2 * f)) / np.sqrt(d))
  down = (rng.standard_normal((e, f, d)) / np.sqrt(f))
  return (jnp.asarray(x, dt), w.astype(dt), idx, jnp.asarray(gate_up, dt),
          jnp.asarray(down, dt))


def main(argv):
  del argv  # cli.run refuses positional arguments
  v = check_flags()
  args = inputs(v, _DTYPE.value, _SEED.value)
  idx = args[2]
  counts = np.bincount(np.asarray(idx).ravel(), minlength=v["experts"])
  dev = jax.devices()[0]
  print(f"{v['tokens']} tokens, d={v['hidden']}, top-{v['top_k']} of "
        f"{v['experts']} experts of width {v['width']}, {_DTYPE.value}; "
        f"tokens per expert min {counts.min()} max {counts.max()}; "
        f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  rows = []
  outs = {}
  for name, fn in (("ragged", moe.experts_ragged),
                   ("dense", moe.experts_dense)):
    fwd = jax.jit(fn)
    cot = jnp.ones((v["tokens"], v["hidden"]), args[0].dtype)

    def loss(x, w, i, gu, dn, fn=fn):
      return jnp.sum(fn(x, w, i, gu, dn).astype(jnp.float32) * cot)

    # Every input an argument: nothing for XLA to constant-fold.
    bwd = jax.jit(jax.grad(loss, argnums=(0, 3, 4)))
    outs[name] = np.asarray(fwd(*args), np.float64)
    rows.append(dict(
        implementation=name,
        forward_ms=1e3 * _median_s(lambda: fwd(*args), v["repeats"]),
        forward_backward_ms=1e3 * _median_s(lambda: bwd(*args),
                                            v["repeats"])))
  diff = float(np.abs(outs["ragged"] - outs["dense"]).max() /
               np.abs(outs["dense"]).max())
  ragged, dense = rows
  print("| implementation | forward ms | forward+backward ms |\n"
        "| --- | --- | --- |")
  for r in rows:
    print(f"| {r['implementation']} | {r['forward_ms']:.2f} | "
          f"{r['forward_backward_ms']:.2f} |")
  ratio = dict(forward=dense["forward_ms"] / ragged["forward_ms"],
               forward_backward=dense["forward_backward_ms"] /
               ragged["forward_backward_ms"])
  print(f"dense / ragged: forward {ratio['forward']:.2f}x, forward+backward "
        f"{ratio['forward_backward']:.2f}x; max rel diff {diff:.1e}")
  if _JSON_OUT.value:
    meta = dict(v, dtype=_DTYPE.value, device=dev.device_kind,
                backend=jax.default_backend(), jax=jax.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    with open(_JSON_OUT.value, "w") as f:
      json.dump(dict(meta=meta, rows=rows, dense_over_ragged=ratio,
                     max_rel_diff=diff), f, indent=2)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
