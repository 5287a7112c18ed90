"""Nucleus (top-p) sampling keeps exactly the right tokens; the optimizer's
gradient clipping bounds the update.

Top-p: the kept set of `qwen_jax.generate.sample_logits` (read off 4096
draws of one row: every kept token has probability >= 3% there, and a
dropped one is -inf, never drawn) equals a float64 NumPy reference of the
rule transformers' `TopPLogitsWarper` applies: sort ascending, drop the
tokens whose cumulative probability is <= 1 - top_p, keep the most likely
one always. The reference itself is checked against transformers. top_p
is put just below and just above every cumulative boundary, so a sampler
keeping one token too few or too many fails; the first token alone above
top_p, top_k before top_p (renormalised) and temperature are covered.
Ties at the cut: transformers keeps whichever tied token its sort puts
last; `sample_logits` keeps every token tied with the last kept one (a
permutation-independent set), and the reference says so.

Clipping: `make_optimizer`'s updates over several steps equal a float64
NumPy AdamW fed the gradients clipped by hand (global norm), for gradients
far above the clip and below it; without clipping they would differ.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process

from qwen_jax.generate import Sampler
from qwen_jax.generate import sample_logits
from qwen_jax.train_step import TrainConfig
from qwen_jax.train_step import learning_rate_schedule
from qwen_jax.train_step import make_optimizer
from tests import tolerances

_DRAWS = 4096


# ------------------------------------------------------------------ top-p
def _softmax64(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x[np.isfinite(x)].max())
  return e / e.sum()


def _reference_kept(logits, temperature=1.0, top_k=None, top_p=None):
  """Indices kept: top_k by logit (ties at the k-th kept), then top-p over
  the renormalised rest: a token stays when the probability of the tokens
  strictly more likely than it is < top_p (transformers' rule by rank,
  with ties at the cut kept together)."""
  x = np.asarray(logits, np.float64) / temperature
  if top_k is not None and top_k < x.size:
    kth = np.sort(x)[::-1][top_k - 1]
    x = np.where(x >= kth, x, -np.inf)
  if top_p is not None and top_p < 1.0:
    p = _softmax64(x)
    above = np.array([p[p > pi].sum() for pi in p])
    x = np.where(above < top_p, x, -np.inf)
  return set(np.flatnonzero(np.isfinite(x)).tolist())


def _transformers_kept(logits, temperature=1.0, top_k=None, top_p=None):
  """The same through transformers' warpers (float64, no ties here)."""
  scores = torch.tensor(np.asarray(logits, np.float64)[None])
  scores = logits_process.TemperatureLogitsWarper(temperature)(None, scores)
  if top_k is not None:
    scores = logits_process.TopKLogitsWarper(top_k)(None, scores)
  if top_p is not None:
    scores = logits_process.TopPLogitsWarper(top_p)(None, scores)
  return set(np.flatnonzero(np.isfinite(scores[0].numpy())).tolist())


@functools.lru_cache(maxsize=None)
def _sampler_fn(sampler):
  return jax.jit(lambda l, k: sample_logits(l, k, sampler))


def _sampled_set(logits, sampler, seed=0):
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32),
                          (_DRAWS, len(logits)))
  out = _sampler_fn(sampler)(rows, jax.random.PRNGKey(seed))
  return set(np.unique(np.asarray(out)).tolist())


# Distinct probabilities, every one >= 0.03 (so 4096 draws see each kept
# token), in a shuffled order (the vocabulary order must not matter).
_PROBS = np.array([0.06, 0.30, 0.04, 0.22, 0.15, 0.03, 0.11, 0.09])


def _boundaries(probs):
  """Cumulative probabilities in descending order, but the last (1.0)."""
  return np.cumsum(np.sort(probs)[::-1])[:-1]


def _cases():
  cases = []
  for c in _boundaries(_PROBS):
    for top_p in (c - 2e-3, c + 2e-3):
      cases.append((np.log(_PROBS), 1.0, None, round(float(top_p), 6)))
  return cases


@pytest.mark.parametrize("logits,temperature,top_k,top_p", _cases())
def test_top_p_keeps_exactly_the_reference_set(logits, temperature, top_k,
                                               top_p):
  want = _reference_kept(logits, temperature, top_k, top_p)
  assert want == _transformers_kept(logits, temperature, top_k, top_p)
  got = _sampled_set(logits, Sampler(temperature, top_k, top_p))
  assert got == want, (top_p, sorted(got), sorted(want))


def test_the_boundary_cases_tell_one_token_apart():
  # Each boundary c_k: top_p just below keeps k + 1 tokens, just above k + 2.
  x = np.log(_PROBS)
  for k, c in enumerate(_boundaries(_PROBS)):
    assert len(_reference_kept(x, top_p=c - 2e-3)) == k + 1
    assert len(_reference_kept(x, top_p=c + 2e-3)) == k + 2


@pytest.mark.parametrize("top_p", [0.2, 0.5, 0.69])
def test_first_token_alone_above_top_p(top_p):
  probs = np.array([0.03, 0.70, 0.09, 0.18])
  x = np.log(probs)
  assert _reference_kept(x, top_p=top_p) == {1}
  assert _transformers_kept(x, top_p=top_p) == {1}
  assert _sampled_set(x, Sampler(1.0, None, top_p)) == {1}
  # Just past the first token's mass the second one joins.
  assert _sampled_set(x, Sampler(1.0, None, 0.71)) == {1, 3}


@pytest.mark.parametrize("top_p,want", [
    (0.79, {0, 3}),        # 0.5 + 0.3125 reaches it: two
    (0.82, {0, 2, 3}),     # needs the third (renormalised to top 3)
])
def test_top_k_then_top_p_renormalised(top_p, want):
  probs = np.array([0.40, 0.06, 0.15, 0.25, 0.10, 0.04])
  x = np.log(probs)
  # Over all six tokens 0.40 + 0.25 + 0.15 = 0.80 would be the boundary;
  # after top_k=3 it is (0.40 + 0.25) / 0.80 = 0.8125.
  assert _reference_kept(x, top_k=3, top_p=top_p) == want
  assert _transformers_kept(x, top_k=3, top_p=top_p) == want
  assert _sampled_set(x, Sampler(1.0, 3, top_p)) == want


def test_temperature_applies_before_top_p():
  x = np.log(_PROBS)
  t = 0.5  # sharper: the boundaries move
  for top_p in (0.75, 0.9):
    want = _reference_kept(x, t, None, top_p)
    assert want == _transformers_kept(x, t, None, top_p)
    assert len(want) < len(_reference_kept(x, 1.0, None, top_p))
    assert _sampled_set(x, Sampler(t, None, top_p)) == want


@pytest.mark.parametrize("logits,top_p,want", [
    # Two tokens tied right at the cut: both stay.
    ([2.0, 1.0, 1.0, 0.0, -0.5], 0.55, {0, 1, 2}),
    # Tied first tokens, top_p below either one's mass: both stay.
    ([1.0, 1.0, 0.0, -0.3], 0.2, {0, 1}),
    # A tie just after the cut: neither joins.
    ([2.0, 1.5, 0.0, 0.0, -0.5], 0.55, {0, 1}),
])
def test_ties_at_the_cut_are_kept_together(logits, top_p, want):
  assert _reference_kept(logits, top_p=top_p) == want
  # transformers keeps a subset of that set, by its sort order.
  assert _transformers_kept(logits, top_p=top_p) <= want
  assert _sampled_set(np.asarray(logits), Sampler(1.0, None, top_p)) == want


# ---------------------------------------------------------- grad clipping
def _grads(rng, norm):
  g = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=(3,))}
  total = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
  return {k: v * (norm / total) for k, v in g.items()}


def _adamw_reference(tcfg, params, grads_seq, clip):
  """Updates of AdamW (decay on >= 2-dim leaves) in float64, the gradients
  clipped by global norm to `clip` first (None: not clipped)."""
  lr = learning_rate_schedule(tcfg)
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v2 = {k: np.zeros_like(v) for k, v in params.items()}
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  updates = []
  for step, g in enumerate(grads_seq, start=1):
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    scale = 1.0 if clip is None or norm <= clip else clip / norm
    u = {}
    for k in p:
      gk = g[k] * scale
      m[k] = tcfg.b1 * m[k] + (1 - tcfg.b1) * gk
      v2[k] = tcfg.b2 * v2[k] + (1 - tcfg.b2) * gk ** 2
      mh = m[k] / (1 - tcfg.b1 ** step)
      vh = v2[k] / (1 - tcfg.b2 ** step)
      d = mh / (np.sqrt(vh) + tcfg.eps)
      if p[k].ndim >= 2:
        d = d + tcfg.weight_decay * p[k]
      u[k] = -float(lr(step - 1)) * d
      p[k] = p[k] + u[k]
    updates.append(u)
  return updates


def _optimizer_updates(tcfg, params, grads_seq):
  opt = make_optimizer(tcfg)
  p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = opt.init(p)
  out = []
  for g in grads_seq:
    g = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), g)
    u, state = opt.update(g, state, p)
    p = jax.tree_util.tree_map(lambda a, b: a + b, p, u)
    out.append(jax.tree_util.tree_map(np.asarray, u))
  return out


def _assert_updates_close(got, want):
  for step, (a, b) in enumerate(zip(got, want)):
    for k in b:
      tolerances.assert_close(a[k], b[k], "float32", scale=0.05,
                              err_msg=f"step {step} {k}")


def _far(got, want):
  """Whether some update is far outside the float32 tolerance of want."""
  return any(tolerances.max_rel_err(a[k], b[k]) > 0.05
             for a, b in zip(got, want) for k in b)


@pytest.mark.parametrize("clip", [1.0, 0.25])
def test_clipping_bounds_the_update(clip):
  rng = np.random.default_rng(0)
  tcfg = TrainConfig(grad_clip=clip, learning_rate=1e-2, warmup_steps=2,
                     num_steps=10, weight_decay=0.1, eps=1e-6)
  params = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=(3,))}
  # Norms far above the clip, then below it, then above again.
  grads = [_grads(rng, n) for n in (100 * clip, 0.3 * clip, 40 * clip,
                                    0.5 * clip)]
  got = _optimizer_updates(tcfg, params, grads)
  want = _adamw_reference(tcfg, params, grads, clip)
  _assert_updates_close(got, want)
  # The test can tell: unclipped gradients give other updates.
  assert _far(want, _adamw_reference(tcfg, params, grads, None))


def test_gradients_below_the_clip_are_unchanged():
  rng = np.random.default_rng(1)
  tcfg = TrainConfig(grad_clip=1.0, learning_rate=1e-2, warmup_steps=0,
                     num_steps=10, eps=1e-6)
  params = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=(3,))}
  grads = [_grads(rng, n) for n in (0.9, 0.05, 0.5)]
  want = _adamw_reference(tcfg, params, grads, None)
  _assert_updates_close(_optimizer_updates(tcfg, params, grads), want)
  _assert_updates_close(
      _optimizer_updates(tcfg.replace(grad_clip=0), params, grads), want)
