"""Tests of weight-only quantization (qwen_jax/quantize.py).

  * every int8 matrix is the float one rounded to its row's step: each
    entry within half a step (float64 NumPy), the row's largest entry at
    +-127;
  * `matmul` of an int8 matrix equals float64 NumPy's product with
    q * scale, for one row (the fused vector-matrix loop), a few rows (one
    loop per row) and many (the converted matrix);
  * int8 (tied and untied head) and bfloat16 logits stay within
    tests/tolerances.py's QUANT_LOGITS_REL of float32's;
  * every greedy token int8 picks is one float32 ranks (nearly) best at
    that step, and most are float32's own picks;
  * a mixture of experts: the stacked experts are stored output-major,
    int8 per expert and output channel; `moe.experts_stored` equals a
    float64 NumPy sum over the routed experts on both of its paths (pairs
    gathered; every expert converted), and a tiny mixture-of-experts
    model's float32 / bfloat16 / int8 logits stay within the float tree's
    tolerance / QUANT_LOGITS_REL, for a decoded token and a prefill;
  * bad input is refused, naming the argument or entry.

The models are tiny random transformers checkpoints with weights N(0, 0.05)
and an N(0, 1) embedding: at N(0, 0.1) and N(0, 0.3) (tests/hf_utils.py's
default) the tiny stack amplifies a 0.4% change of the embedding into a
30% change of the logits, which would hide any quantization error.
"""

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax import decode_loop
from qwen_jax import moe
from qwen_jax import stack
from qwen_jax import train_step
from qwen_jax.config import FULL, LINEAR
from qwen_jax.quantize import is_decode_layout
from qwen_jax.quantize import KERNEL_T
from qwen_jax.quantize import matmul
from qwen_jax.quantize import SCALE
from qwen_jax.quantize import weight_mode
from tests import hf_utils
from tests import tolerances

L, F = LINEAR, FULL
# Logits of a float or decode-layout tree (decode_loop.apply_model), jitted.
_forward = jax.jit(decode_loop.apply_model, static_argnums=0)


@functools.lru_cache(maxsize=None)
def _saved(tied: bool) -> str:
  cfg = hf_utils.make_text_config(layer_types=[L, L, L, F] * 2,
                                  tie_word_embeddings=tied)
  return hf_utils.save_causal_lm(
      tempfile.mkdtemp(prefix="qwen_jax_quantize_"), cfg, 41 + tied,
      std=0.05, embed_std=1.0)[0]


@functools.lru_cache(maxsize=None)
def _loaded(tied: bool, scan: bool = True):
  return qwen_jax.load_hf_checkpoint(_saved(tied), scan_layers=scan)


def _dense_pairs(float_tree, q_tree, path=()):
  """(path, float kernel [in, out], quantized node) of every Dense."""
  if isinstance(q_tree, dict) and KERNEL_T in q_tree:
    yield path, float_tree["kernel"], q_tree
    return
  if isinstance(q_tree, dict):
    for key, node in q_tree.items():
      if key in float_tree:
        yield from _dense_pairs(float_tree[key], node, path + (key,))


def test_int8_matrices_round_each_row_to_its_step():
  cfg, params = _loaded(True)  # scanned: unstacked by quantize
  q = qwen_jax.quantize(cfg, params, "int8")
  pairs = list(_dense_pairs(_loaded(True, False)[1], q))
  assert len(pairs) == 6 * 8 + 2 * 7  # linear layers: 8 Dense, full: 7
  for path, w, node in pairs:
    w_t = np.asarray(w, np.float64).T
    qv = np.asarray(node[KERNEL_T])
    s = np.asarray(node[SCALE], np.float64)
    assert qv.dtype == np.int8 and qv.shape == w_t.shape, path
    np.testing.assert_allclose(s, np.abs(w_t).max(1) / 127, rtol=1e-6)
    assert np.all(np.abs(qv * s[:, None] - w_t) <= s[:, None] * 0.5001), path
    assert np.all(np.abs(qv).max(1) == 127), path
  emb = q["embed_tokens"]
  table = np.asarray(params["embed_tokens"]["embedding"], np.float64)
  s = np.asarray(emb["embedding_scale"], np.float64)
  assert np.all(np.abs(np.asarray(emb["embedding_q"]) * s[:, None] - table)
                <= s[:, None] * 0.5001)


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_int8_matmul_equals_numpy(rows):
  rng = np.random.default_rng(rows)
  q = rng.integers(-127, 128, (40, 24)).astype(np.int8)
  s = rng.uniform(0.001, 0.01, 40).astype(np.float32)
  x = rng.standard_normal((rows, 24)).astype(np.float32)
  got = jax.jit(matmul, static_argnums=3)(x, q, s, jnp.float32)
  want = x.astype(np.float64) @ (q * s.astype(np.float64)[:, None]).T
  tolerances.assert_close(got, want, np.float32)


@pytest.mark.parametrize("mode,tied", [("int8", True), ("int8", False),
                                       ("bfloat16", True)])
def test_quantized_logits_within_tolerance(mode, tied):
  cfg, params = _loaded(tied)
  q = qwen_jax.quantize(cfg, params, mode)
  assert weight_mode(q) == mode
  ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 12))
  want = np.asarray(_forward(cfg, params, ids))
  got = np.asarray(_forward(cfg, q, ids))
  assert tolerances.max_rel_err(got, want) < tolerances.QUANT_LOGITS_REL[mode]


def test_int8_greedy_tokens_are_float32_choices():
  # Greedy decoding with int8 weights, scored by float32 with the same
  # tokens fed: each pick within 2 tol of float32's best logit there (a
  # near tie may go either way), and most picks float32's own.
  cfg, params = _loaded(True)
  q = qwen_jax.quantize(cfg, params, "int8")
  ids = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 10))
  new = np.asarray(qwen_jax.generate(cfg, q, ids, 16, stop_tokens=()))
  seq = np.concatenate([ids, new], axis=1)
  ref = np.asarray(_forward(cfg, params, seq))
  ref = ref[:, ids.shape[1] - 1:-1]
  picked = np.take_along_axis(ref, new[..., None], -1)[..., 0]
  gap = (ref.max(-1) - picked) / np.abs(ref).max()
  assert gap.max() <= 2 * tolerances.QUANT_LOGITS_REL["int8"], gap
  assert (gap == 0).mean() >= 0.75, gap


def test_quantize_refuses_bad_input():
  cfg, params = _loaded(True)
  with pytest.raises(ValueError, match=r"mode: expected one of .*'int8'.*"
                     r"found 'int3'"):
    qwen_jax.quantize(cfg, params, "int3")
  with pytest.raises(ValueError, match="cfg: expected a QwenConfig"):
    qwen_jax.quantize({"hidden_size": 64}, params)
  q = qwen_jax.quantize(cfg, params)
  assert is_decode_layout(q)
  with pytest.raises(ValueError, match="params: expected float parameters, "
                     "found a tree already in the decode layout"):
    qwen_jax.quantize(cfg, q)
  other = cfg.replace(layer_types=[L] * 8)
  with pytest.raises(ValueError, match=r"params: expected the entries of "
                     r"Qwen35\(cfg\).init for this config \(8 layers, "
                     r"scanned\), found .* missing"):
    qwen_jax.quantize(other, params)
  wide = cfg.replace(intermediate_size=cfg.intermediate_size + 1)
  with pytest.raises(ValueError, match=r"params\['layers'\]\['layer_0'\]"
                     r"\['mlp'\]\['down_proj'\]\['kernel'\]: expected shape"):
    qwen_jax.quantize(wide, params)
  bad = jax.tree_util.tree_map(lambda a: a, params)
  up = np.array(bad["layers"]["layer_1"]["mlp"]["up_proj"]["kernel"])
  up[0, 2, 3] = np.nan
  bad["layers"]["layer_1"]["mlp"]["up_proj"]["kernel"] = up
  with pytest.raises(ValueError, match=r"params\['layers'\]\['layer_1'\]"
                     r"\['mlp'\]\['up_proj'\]\['kernel'\]: expected finite"):
    qwen_jax.quantize(cfg, bad)
  ints = jax.tree_util.tree_map(lambda a: a, params)
  ints["norm"] = {"weight": np.zeros(cfg.hidden_size, np.int32)}
  with pytest.raises(ValueError, match=r"params\['norm'\]\['weight'\]: "
                     r"expected a float array, found dtype int32"):
    qwen_jax.quantize(cfg, ints)


# ------------------------------------------------------- mixture of experts
def _numpy_experts(x, weights, idx, gate_up_t, gu_scale, down_t, d_scale):
  """float64 sum over each token's routed experts of SwiGLU with the
  stored matrices (q * scale when int8)."""
  f64 = lambda a: np.asarray(a, np.float64)
  gu = f64(gate_up_t) * (1.0 if gu_scale is None else f64(gu_scale)[..., None])
  dn = f64(down_t) * (1.0 if d_scale is None else f64(d_scale)[..., None])
  out = np.zeros((x.shape[0], dn.shape[1]))
  for t in range(x.shape[0]):
    for j in range(idx.shape[1]):
      e = idx[t, j]
      g, u = np.split(gu[e] @ f64(x[t]), 2)
      a = g / (1.0 + np.exp(-g)) * u
      out[t] += weights[t, j] * (dn[e] @ a)
  return out


@pytest.mark.parametrize("tokens", [1, 3, moe.GATHER_PAIRS_MAX])
@pytest.mark.parametrize("int8", [True, False])
def test_stored_experts_equal_numpy(tokens, int8):
  """Both paths: k * tokens pairs up to GATHER_PAIRS_MAX read pair by pair,
  more convert every expert (k = 2: 16 tokens give 32 pairs)."""
  rng = np.random.default_rng(tokens + 10 * int8)
  e, d, f, k = 6, 24, 10, 2
  x = rng.standard_normal((tokens, d)).astype(np.float32)
  idx = np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)])
  weights = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)
  if int8:
    gate_up_t = rng.integers(-127, 128, (e, 2 * f, d)).astype(np.int8)
    down_t = rng.integers(-127, 128, (e, d, f)).astype(np.int8)
    gu_scale = rng.uniform(0.001, 0.01, (e, 2 * f)).astype(np.float32)
    d_scale = rng.uniform(0.001, 0.01, (e, d)).astype(np.float32)
  else:
    gate_up_t = (0.2 * rng.standard_normal((e, 2 * f, d))).astype(np.float32)
    down_t = (0.2 * rng.standard_normal((e, d, f))).astype(np.float32)
    gu_scale = d_scale = None
  args = (x, weights, idx, gate_up_t, gu_scale, down_t, d_scale)
  got = jax.jit(moe.experts_stored)(*args)
  tolerances.assert_close(got, _numpy_experts(*args), np.float32)


def _moe_model():
  """A tiny mixture-of-experts model in float32, weights N(0, 0.05) and an
  N(0, 1) embedding (see the module docstring)."""
  cfg = qwen_jax.QwenConfig.from_preset(
      "tiny-moe", vocab_size=128, dtype="float32", param_dtype="float32")
  rng = np.random.default_rng(5)

  def draw(path, a):
    std = 1.0 if "embed_tokens" in jax.tree_util.keystr(path) else 0.05
    return jnp.asarray(rng.normal(0.0, std, a.shape), a.dtype)

  return cfg, jax.tree_util.tree_map_with_path(
      draw, train_step.init_params(cfg, 0))


def test_int8_experts_round_each_row_to_its_step():
  cfg, params = _moe_model()
  q = qwen_jax.quantize(cfg, params, "int8")
  for i in range(cfg.num_hidden_layers):
    slot, at = stack.layer_location(cfg, i)
    mlp = params["layers"][slot]["mlp"]
    got = q["layers"][f"layer_{i}"]["mlp"]
    assert "gate_up_proj" not in got and "down_proj" not in got
    for name, (q_name, s_name) in (
        ("gate_up_proj", (moe.GATE_UP_T, moe.GATE_UP_SCALE)),
        ("down_proj", (moe.DOWN_T, moe.DOWN_SCALE))):
      w = np.asarray(mlp[name], np.float64)
      w = w if at is None else w[at]
      w_t = np.swapaxes(w, -1, -2)  # [E, out, in]
      qv, sv = np.asarray(got[q_name]), np.asarray(got[s_name], np.float64)
      assert qv.dtype == np.int8 and qv.shape == w_t.shape, (i, name)
      np.testing.assert_allclose(sv, np.abs(w_t).max(-1) / 127, rtol=1e-6)
      assert np.all(np.abs(qv * sv[..., None] - w_t)
                    <= sv[..., None] * 0.5001), (i, name)
  assert weight_mode(q) == "int8"


@pytest.mark.parametrize("shape", [(1, 4), (2, 12)])  # decode-sized, prefill
@pytest.mark.parametrize("mode", ["float32", "bfloat16", "int8"])
def test_mixture_of_experts_logits_in_the_decode_layout(shape, mode):
  cfg, params = _moe_model()
  q = qwen_jax.quantize(cfg, params, mode)
  ids = np.random.default_rng(shape[1]).integers(0, cfg.vocab_size, shape)
  want = np.asarray(_forward(cfg, params, ids))
  got = np.asarray(_forward(cfg, q, ids))
  if mode == "float32":
    tolerances.assert_close(got, want, np.float32)
  else:
    err = tolerances.max_rel_err(got, want)
    assert 0 < err < tolerances.QUANT_LOGITS_REL[mode], err
