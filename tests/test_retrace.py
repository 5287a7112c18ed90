"""The compiled programs are traced once across calls that must share them.

A program traced again at every call (a Python number, a weak type or a
shape that changes from call to call) still gives the right numbers; only
every step compiles again, which nothing else would show. Each test wraps
the Python function a jitted program traces in `chex.assert_max_traces`
and makes the calls that must share one program:

  * the train step (`train_step.make_train_step`) over several steps of
    fresh batches of one shape;
  * `prefill` over prompts of one shape (one program per block shape: a
    full block and the remainder);
  * `decode_step` over a run of tokens;
  * `generate` twice, and `stream` over several blocks (one decode loop).

Each program also gets a planted retrace (a batch of another length, the
step counter or the cache index rebuilt as a Python int, a prompt of
another length, a new temperature), and the check must raise: the checks
can fail. Each test starts from a cold cache of the program it counts, so
the count is exact (at least one trace is required too).

The model is the tiny preset with random weights.
"""

import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax import cache as cache_lib
from qwen_jax import train_step

# The module (the package's `generate` is the function of that name).
generate_lib = importlib.import_module("qwen_jax.generate")
B, T = 2, 8
_RETRACED = "traced > 1 times"


@functools.lru_cache(maxsize=None)
def _model():
  cfg = qwen_jax.QwenConfig.from_preset("tiny", gdr_chunk_size=8)
  return cfg, train_step.init_params(cfg, seed=3)


def _count_traces(monkeypatch, module, name, n):
  """Replaces module.name with a wrapper that raises past `n` traces.

  Returns the list the wrapper appends to at each call: the function runs
  inside a jitted program, so each call is one trace.
  """
  chex.clear_trace_counter()
  inner = getattr(module, name)
  calls = []

  def counted(*args, **kwargs):
    calls.append(name)
    return inner(*args, **kwargs)

  # chex keys its counts by the name (among others): one count per function.
  counted.__name__ = name
  monkeypatch.setattr(module, name, chex.assert_max_traces(counted, n=n))
  return calls


def _ids(rng, b=B, t=T):
  return jnp.asarray(rng.integers(0, 256, (b, t)), jnp.int32)


# --------------------------------------------------------------- train step
def _train_setup(monkeypatch):
  """(step function, state, the list of its traces), the step function
  made anew (the cached one may have been traced by another test)."""
  cfg, params = _model()
  tcfg = train_step.TrainConfig(batch_size=B, seq_len=T, num_steps=4,
                                warmup_steps=1, learning_rate=1e-3)
  train_step._make_train_step.cache_clear()  # pylint: disable=protected-access
  calls = _count_traces(monkeypatch, train_step, "loss_and_stats", n=1)
  step = train_step.make_train_step(cfg, tcfg)
  # A copy: the step donates its state, and `_model()` is shared.
  state = train_step.init_state(cfg, tcfg, jax.tree_util.tree_map(
      jnp.copy, params))
  return step, state, calls


def _batch(rng, t=T):
  seq = rng.integers(0, 256, (B, t + 1))
  return {"inputs": jnp.asarray(seq[:, :-1], jnp.int32),
          "targets": jnp.asarray(seq[:, 1:], jnp.int32)}


def test_train_step_traced_once_over_steps(monkeypatch):
  step, state, calls = _train_setup(monkeypatch)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(4):
    state, metrics = step(state, _batch(rng))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 4
  assert len(set(losses)) == 4  # fresh batches: four different losses
  assert calls == ["loss_and_stats"]


@pytest.mark.parametrize("plant", ["host_step_counter", "another_length"])
def test_train_step_retrace_is_caught(monkeypatch, plant):
  step, state, _ = _train_setup(monkeypatch)
  rng = np.random.default_rng(1)
  state, _ = step(state, _batch(rng))
  if plant == "host_step_counter":
    # A Python int becomes a weak-typed scalar: another input type.
    state, batch = state.replace(step=int(state.step)), _batch(rng)
  else:
    batch = _batch(rng, T - 2)
  with pytest.raises(AssertionError, match=_RETRACED):
    step(state, batch)


# ------------------------------------------------------------------ prefill
# generate's functions and the jitted programs that trace them.
_PROGRAMS = {"_prefill_chunk": ("_prefill_chunk_jit",),
             "_decode": ("_decode_jit", "_loop_jit")}


def _cold(monkeypatch, name, n):
  """Counts the traces of generate's `name`, its programs' caches emptied
  (an earlier test may have traced them at these shapes)."""
  for program in _PROGRAMS[name]:
    getattr(generate_lib, program).clear_cache()
  return _count_traces(monkeypatch, generate_lib, name, n)


def test_prefill_traced_once_per_block_shape(monkeypatch):
  """Prompts of 20 tokens in blocks of 8: two programs (8 and 4 tokens),
  shared by every later prompt of that shape."""
  cfg, params = _model()
  calls = _cold(monkeypatch, "_prefill_chunk", n=2)
  rng = np.random.default_rng(2)
  last = []
  for _ in range(3):
    cache = cache_lib.init_cache(cfg, B, 24)
    logits, cache = generate_lib.prefill(cfg, params, _ids(rng, t=20), cache,
                                         prefill_block=8)
    assert int(cache["index"]) == 20
    last.append(np.asarray(logits))
  assert not np.allclose(last[0], last[1])  # fresh prompts
  assert len(calls) == 2


def test_prefill_retrace_is_caught(monkeypatch):
  cfg, params = _model()
  _cold(monkeypatch, "_prefill_chunk", n=1)
  rng = np.random.default_rng(3)
  generate_lib.prefill(cfg, params, _ids(rng), cache_lib.init_cache(
      cfg, B, 16))
  with pytest.raises(AssertionError, match=_RETRACED):
    generate_lib.prefill(cfg, params, _ids(rng, t=T - 1),
                         cache_lib.init_cache(cfg, B, 16))


# ------------------------------------------------------------------- decode
def _decode_run(cfg, params, rng, steps, plant=False):
  cache = cache_lib.init_cache(cfg, B, T + steps)
  _, cache = generate_lib.prefill(cfg, params, _ids(rng), cache)
  for i in range(steps):
    if plant and i:  # the index rebuilt on the host: a weak-typed scalar
      cache = dict(cache, index=int(cache["index"]))
    logits, cache = generate_lib.decode_step(
        cfg, params, jnp.asarray(rng.integers(0, 256, (B,)), jnp.int32),
        cache)
  return logits, cache


def test_decode_step_traced_once_over_tokens(monkeypatch):
  cfg, params = _model()
  calls = _cold(monkeypatch, "_decode", n=1)
  _, cache = _decode_run(cfg, params, np.random.default_rng(4), steps=5)
  assert int(cache["index"]) == T + 5
  assert calls == ["_decode"]


def test_decode_step_retrace_is_caught(monkeypatch):
  cfg, params = _model()
  _cold(monkeypatch, "_decode", n=1)
  with pytest.raises(AssertionError, match=_RETRACED):
    _decode_run(cfg, params, np.random.default_rng(5), steps=3, plant=True)


# ----------------------------------------------------------------- generate
def test_generate_and_stream_share_one_decode_loop(monkeypatch):
  """Two sampled generations (new prompts, new seeds) and a stream of three
  blocks (the loop's end moves each call): one prefill program and one
  decode loop."""
  cfg, params = _model()
  prefills = _cold(monkeypatch, "_prefill_chunk", n=1)
  decodes = _cold(monkeypatch, "_decode", n=1)
  rng = np.random.default_rng(6)
  outs = [np.asarray(qwen_jax.generate(
      cfg, params, _ids(rng), max_new_tokens=7, temperature=1.0, seed=s,
      stop_tokens=(), cache_len=16)) for s in (0, 1)]
  assert outs[0].shape == (B, 7) and not np.array_equal(outs[0], outs[1])
  blocks = list(generate_lib.stream(
      cfg, params, _ids(rng), max_new_tokens=7, temperature=1.0, seed=2,
      stop_tokens=(), block_steps=2, cache_len=16))
  assert [b.shape[1] for b in blocks] == [1, 2, 2, 2]
  assert prefills == ["_prefill_chunk"] and decodes == ["_decode"]


def test_generate_retrace_is_caught(monkeypatch):
  """Sampling settings are static in the loop: a new temperature is a new
  program, which the check must see."""
  cfg, params = _model()
  _cold(monkeypatch, "_decode", n=1)
  rng = np.random.default_rng(7)
  qwen_jax.generate(cfg, params, _ids(rng), max_new_tokens=4,
                    temperature=0.7, stop_tokens=())
  with pytest.raises(AssertionError, match=_RETRACED):
    qwen_jax.generate(cfg, params, _ids(rng), max_new_tokens=4,
                      temperature=0.8, stop_tokens=())
