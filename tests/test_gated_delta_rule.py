"""Tests of the jnp gated delta rule references against float64 recurrences.

Outputs and final states are checked against a NumPy float64 per-token loop,
gradients against jax.grad of a float64 jnp per-token scan (x64 enabled), both
written here independently of the package.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import api
from pallas_kernels.gated_delta_rule import gated_delta_rule
from tests import tolerances

B, HK, HV, DK, DV = 2, 2, 4, 16, 24
IMPLS = ("recurrent", "chunked")
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dinitial_state")


def make_inputs(seed, t, dtype=jnp.float32, with_state=True,
                with_segments=False, b=B, hk=HK, hv=HV, dk=DK, dv=DV,
                g_scale=1.0):
  """Random inputs in `dtype`; k unit-norm per head so the rule is stable.

  The log decays g average about -0.4 (e^G over a 64-token chunk about
  e^-26), so a state hardly survives a whole chunk; `g_scale` = 0.02 makes
  them slow (e^G over a chunk about 0.6), so the state carried into each
  chunk, and its gradient, weigh in every later output.
  """
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, hk, dk))
  k = rng.normal(size=(b, t, hk, dk))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.normal(size=(b, t, hv, dv))
  g = -np.log1p(np.exp(rng.normal(size=(b, t, hv)) - 1.0))  # -softplus
  g = g * g_scale
  beta = 1.0 / (1.0 + np.exp(-rng.normal(size=(b, t, hv))))
  s0 = rng.normal(size=(b, hv, dk, dv)) if with_state else None
  seg = None
  if with_segments:
    # Sorted ids with several documents per row, resets at random places.
    seg = np.sort(rng.integers(0, max(2, t // 20), size=(b, t)), axis=1)
    seg = jnp.asarray(seg, jnp.int32)
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), g=cast(g), beta=cast(beta),
              initial_state=None if s0 is None else jnp.asarray(s0, jnp.float32),
              segment_ids=seg)


def np_recurrence(q, k, v, g, beta, initial_state=None, segment_ids=None):
  """Float64 per-token loop, vectorised over batch and heads."""
  f = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  q, k, v, g, beta = map(f, (q, k, v, g, beta))
  b, t, hk, dk = q.shape
  hv, dv = v.shape[2:]
  r = hv // hk
  q = np.repeat(q, r, axis=2) * dk ** -0.5
  k = np.repeat(k, r, axis=2)
  s = np.zeros((b, hv, dk, dv)) if initial_state is None else f(initial_state)
  seg = None if segment_ids is None else np.asarray(segment_ids)
  o = np.zeros((b, t, hv, dv))
  for i in range(t):
    if seg is not None and i > 0:
      keep = (seg[:, i] == seg[:, i - 1]).astype(np.float64)
      s = s * keep[:, None, None, None]
    s = s * np.exp(g[:, i])[..., None, None]
    pred = np.einsum("bhkv,bhk->bhv", s, k[:, i])
    delta = beta[:, i][..., None] * (v[:, i] - pred)
    s = s + np.einsum("bhk,bhv->bhkv", k[:, i], delta)
    o[:, i] = np.einsum("bhkv,bhk->bhv", s, q[:, i])
  return o, s


def jnp_recurrence64(q, k, v, g, beta, s0, keep):
  """Float64 per-token scan for reference gradients (call under x64)."""
  _, _, hk, dk = q.shape
  hv = v.shape[2]
  q = jnp.repeat(q, hv // hk, axis=2) * dk ** -0.5
  k = jnp.repeat(k, hv // hk, axis=2)

  def step(s, x):
    q_t, k_t, v_t, g_t, b_t, keep_t = x
    s = s * (keep_t[:, None, None, None] * jnp.exp(g_t)[..., None, None])
    delta = b_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", s, k_t))
    s = s + jnp.einsum("bhk,bhv->bhkv", k_t, delta)
    return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, keep))
  s, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1), s


def reference_grads(inputs, r_o, r_s):
  """Grads of sum(o*r_o) + sum(s*r_s) w.r.t. q, k, v, g, beta, s0 in f64."""
  names = ("q", "k", "v", "g", "beta")
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(jnp.asarray(x, jnp.float32),
                                           np.float64))
    args = [f64(inputs[n]) for n in names]
    b, t, _, dk = inputs["q"].shape
    hv, dv = inputs["v"].shape[2:]
    s0 = inputs["initial_state"]
    s0 = jnp.zeros((b, hv, dk, dv), jnp.float64) if s0 is None else f64(s0)
    seg = inputs["segment_ids"]
    keep = np.ones((b, t))
    if seg is not None:
      seg = np.asarray(seg)
      keep[:, 1:] = seg[:, 1:] == seg[:, :-1]
    keep = jnp.asarray(keep)
    r_o, r_s = f64(r_o), f64(r_s)

    def loss(q, k, v, g, beta, s0):
      o, s = jnp_recurrence64(q, k, v, g, beta, s0, keep)
      return jnp.sum(o * r_o) + jnp.sum(s * r_s)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args, s0)
    return [np.asarray(x) for x in grads]


def assert_scaled_close(actual, expected, dtype, err_msg=""):
  """Compares relative to max(1, max|expected|) with dtype's tolerance."""
  expected = np.asarray(expected, np.float64)
  m = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
  tolerances.assert_close(np.asarray(actual, np.float64) / m, expected / m,
                          dtype, err_msg=err_msg)


def _assert_grads_close(grads, expected, dtype):
  """The six gradients (q, k, v, g, beta, initial state) against the
  float64 ones, each relative to its own size as `assert_scaled_close`."""
  tolerances.assert_trees_scaled_close(dict(zip(GRAD_NAMES, grads)),
                                       dict(zip(GRAD_NAMES, expected)), dtype)


def run(impl, inputs, **kw):
  return gated_delta_rule(**inputs, implementation=impl, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [1, 5, 64, 70, 150])
@pytest.mark.parametrize("with_state", [True, False])
def test_forward_matches_float64(impl, t, with_state):
  inputs = make_inputs(t, t, with_state=with_state)
  o, s = run(impl, inputs)
  o_ref, s_ref = np_recurrence(**inputs)
  chex.assert_shape(o, (B, t, HV, DV))
  chex.assert_shape(s, (B, HV, DK, DV))
  chex.assert_type([o, s], jnp.float32)
  assert_scaled_close(o, o_ref, jnp.float32, "output")
  assert_scaled_close(s, s_ref, jnp.float32, "final state")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [5, 70, 150])
def test_segments_match_float64(impl, t):
  inputs = make_inputs(100 + t, t, with_segments=True)
  # Make sure there is at least one reset per row.
  assert np.all(np.asarray(inputs["segment_ids"])[:, -1] > 0) or t < 40
  o, s = run(impl, inputs)
  o_ref, s_ref = np_recurrence(**inputs)
  assert_scaled_close(o, o_ref, jnp.float32, "output")
  assert_scaled_close(s, s_ref, jnp.float32, "final state")


def test_segment_reset_forgets_previous_document():
  inputs = make_inputs(7, 40, with_segments=False)
  seg = jnp.asarray(np.repeat([[0] * 17 + [1] * 23], B, axis=0), jnp.int32)
  o, s = run("chunked", dict(inputs, segment_ids=seg), chunk_size=16)
  tail = {n: (x[:, 17:] if n not in ("initial_state", "segment_ids") else
              None) for n, x in inputs.items()}
  o_tail, s_tail = run("recurrent", tail)
  assert_scaled_close(o[:, 17:], o_tail, jnp.float32)
  assert_scaled_close(s, s_tail, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [5, 150])
def test_bfloat16_inputs(impl, t):
  inputs = make_inputs(200 + t, t, dtype=jnp.bfloat16, with_segments=t > 5)
  o, s = run(impl, inputs)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  o_ref, s_ref = np_recurrence(**inputs)
  assert_scaled_close(o, o_ref, jnp.bfloat16, "output")
  assert_scaled_close(s, s_ref, jnp.bfloat16, "final state")


GRAD_CASES = [
    # (t, dtype, with_state, with_segments)
    (1, jnp.float32, True, False),
    (5, jnp.float32, True, False),
    (70, jnp.float32, False, True),
    (150, jnp.float32, True, True),
    (70, jnp.bfloat16, True, True),
]


def _cotangents_and_state(inputs, seed):
  """Random output and final-state cotangents for `inputs`, and their
  initial state (zeros where there is none)."""
  t = inputs["q"].shape[1]
  rng = np.random.default_rng(seed)
  r_o = rng.normal(size=(B, t, HV, DV)).astype(np.float32)
  r_s = rng.normal(size=(B, HV, DK, DV)).astype(np.float32)
  s0 = inputs["initial_state"]
  if s0 is None:
    s0 = jnp.zeros((B, HV, DK, DV), jnp.float32)
  return r_o, r_s, s0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t,dtype,with_state,with_segments", GRAD_CASES)
def test_gradients_match_float64(impl, t, dtype, with_state, with_segments):
  inputs = make_inputs(300 + t, t, dtype=dtype, with_state=with_state,
                       with_segments=with_segments)
  r_o, r_s, s0 = _cotangents_and_state(inputs, seed=t)

  def loss(q, k, v, g, beta, s0):
    o, s = gated_delta_rule(q, k, v, g, beta, s0, implementation=impl,
                            segment_ids=inputs["segment_ids"])
    return jnp.sum(o.astype(jnp.float32) * r_o) + jnp.sum(s * r_s)

  names = ("q", "k", "v", "g", "beta")
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(
      *[inputs[n] for n in names], s0)
  _assert_grads_close(grads, reference_grads(inputs, r_o, r_s), dtype)


def _check_rule_against_float64(impl, inputs, seed, **kw):
  """Output, final state and all six gradients of `gated_delta_rule(impl,
  **kw)` against the float64 recurrence (Pallas in interpret mode on
  CPU)."""
  t = inputs["q"].shape[1]
  r_o, r_s, s0 = _cotangents_and_state(inputs, seed)
  interpret = impl == "pallas" and jax.default_backend() == "cpu"

  def fwd(q, k, v, g, beta, s0):
    return gated_delta_rule(q, k, v, g, beta, s0, implementation=impl,
                            segment_ids=inputs["segment_ids"],
                            interpret=interpret, **kw)

  def loss(*args):
    o, s = fwd(*args)
    return jnp.sum(o.astype(jnp.float32) * r_o) + jnp.sum(s * r_s)

  names = ("q", "k", "v", "g", "beta")
  args = [inputs[n] for n in names] + [s0]
  o, s = jax.jit(fwd)(*args)
  o_ref, s_ref = np_recurrence(**inputs)
  chex.assert_shape(o, (B, t, HV, DV))
  assert_scaled_close(o, o_ref, jnp.float32, "output")
  assert_scaled_close(s, s_ref, jnp.float32, "final state")
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)
  _assert_grads_close(grads, reference_grads(inputs, r_o, r_s), jnp.float32)


@pytest.mark.parametrize("impl", IMPLS + ("pallas",))
def test_slow_decay_matches_float64(impl):
  """Decays near 1: what a chunk hands the next (e^{G_last} S, and its
  gradient) is comparable to what it adds, and it must still be exact. With
  the other tests' decays it is about e^-26 of a chunk's own terms."""
  # No segments: make_inputs' documents (~20 tokens) would end every state
  # before the chunk does.
  _check_rule_against_float64(impl, make_inputs(600, 150, g_scale=0.02),
                              seed=600)


class ChunkSizeTest(chex.TestCase):
  """A chunk size other than the default, eager and under jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_chunk_size(self):
    inputs = make_inputs(11, 37)
    fn = self.variant(functools.partial(
        gated_delta_rule, implementation="chunked", chunk_size=16))
    o, s = fn(**inputs)
    o_ref, s_ref = np_recurrence(**inputs)
    assert_scaled_close(o, o_ref, jnp.float32)
    assert_scaled_close(s, s_ref, jnp.float32)


def test_auto_names_registered_implementations():
  for backend, name in api.AUTO.items():
    assert name in api.available_implementations(), (backend, name)


def test_auto_keeps_float64_off_the_kernels(monkeypatch):
  """Where "auto" means the Pallas kernels, float64 inputs (which they would
  compute in f32) take the chunked rule; f32 inputs do reach the kernels
  (here, on CPU without interpret mode, their ValueError proves it)."""
  monkeypatch.setitem(api.AUTO, jax.default_backend(), "pallas")
  inputs = make_inputs(13, 20)
  with pytest.raises(ValueError, match="interpret"):
    gated_delta_rule(**inputs, implementation="auto")
  with jax.enable_x64(True):
    inputs64 = {n: None if x is None else jnp.asarray(
        x, jnp.float64 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)
                for n, x in inputs.items()}
    o, s = gated_delta_rule(**inputs64, implementation="auto")
    assert o.dtype == jnp.float64
  o_ref, s_ref = np_recurrence(**inputs)
  assert_scaled_close(o, o_ref, jnp.float32)
  assert_scaled_close(s, s_ref, jnp.float32)


def test_auto_and_custom_scale():
  inputs = make_inputs(12, 9, hk=1, hv=3)
  o_auto, _ = run("auto", inputs, scale=0.5)
  o_rec, _ = run("recurrent", inputs, scale=0.5)
  o_def, _ = run("recurrent", inputs)
  assert_scaled_close(o_auto, o_rec, jnp.float32)
  # scale is linear in the output: 0.5 vs dk ** -0.5 = 0.25.
  assert_scaled_close(o_rec, o_def * 2.0, jnp.float32)


@pytest.mark.parametrize("change,argname", [
    (dict(implementation="fast"), "implementation"),
    (dict(v=jnp.zeros((B, 4, 3, DV))), "v"),
    (dict(k=jnp.zeros((B, 5, HK, DK))), "k"),
    (dict(g=jnp.zeros((B, 4, HV + 1))), "g"),
    (dict(beta=jnp.zeros((B + 1, 4, HV))), "beta"),
    (dict(initial_state=jnp.zeros((B, HV, DV, DK))), "initial_state"),
    (dict(segment_ids=jnp.zeros((B, 5), jnp.int32)), "segment_ids"),
])
def test_bad_arguments_raise(change, argname):
  inputs = make_inputs(0, 4)
  kwargs = dict(inputs, implementation="chunked")
  kwargs.update(change)
  with pytest.raises(ValueError, match=argname):
    gated_delta_rule(**kwargs)


# In-device sequence splits: pieces joined through their affine state maps.
SPLIT_CASES = [
    # (impl, t, seq_splits, chunk_size, with_state, with_segments, g_scale)
    ("recurrent", 37, 3, 64, True, True, 1.0),
    ("chunked", 150, 4, 16, True, True, 1.0),  # pieces of 48, last padded
    ("chunked", 70, 2, 64, False, True, 1.0),
    ("chunked", 9, 5, 16, True, False, 1.0),   # more pieces than needed
    ("pallas", 100, 3, 16, True, True, 1.0),   # interpret mode on CPU
    # Slow decays: each piece's state map A S + B keeps much of S.
    ("chunked", 150, 3, 32, True, False, 0.02),
    ("pallas", 100, 3, 16, True, False, 0.02),
]


@pytest.mark.parametrize(
    "impl,t,splits,chunk,with_state,with_segments,g_scale", SPLIT_CASES)
def test_seq_splits_match_float64(impl, t, splits, chunk, with_state,
                                  with_segments, g_scale):
  inputs = make_inputs(400 + t, t, with_state=with_state,
                       with_segments=with_segments, g_scale=g_scale)
  _check_rule_against_float64(impl, inputs, seed=t + splits,
                              chunk_size=chunk, seq_splits=splits)


def test_seq_splits_must_be_positive():
  with pytest.raises(ValueError, match="seq_splits"):
    run("chunked", make_inputs(0, 8), seq_splits=0)
