"""Tolerances keyed by dtype: the one place tests take them from."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

# (rtol, atol) for comparisons against an independent reference.
_TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-4, 2e-4),
    "bfloat16": (3e-2, 3e-2),
    "float16": (1e-2, 1e-2),
}

# Parity with Hugging Face logits: largest |diff| relative to largest |logit|.
HF_LOGITS_REL = 1e-4
# Gradients against torch's autograd (float32, CPU): largest |diff| of a
# parameter's gradient relative to its largest |entry|. On the tiny tower
# of tests/test_vision_model.py the largest seen is 1.3e-5 with images and
# 9.3e-5 with a 3-frame video (torch 2.13, jax 0.10.2).
HF_GRAD_REL = 1e-3

# The same in bfloat16 (ours bf16 vs transformers bf16). Rounding compounds
# over layers: on the tiny random model of test_bfloat16_load, transformers'
# own bf16 logits sit 0.33 of the largest logit from its float32 ones (CPU,
# torch 2.13), so only gross errors show here.
HF_BF16_LOGITS_REL = 0.2

# Weight-only quantization (qwen_jax.quantize): largest |logit error|
# relative to the largest float32 logit, on the tiny random model of
# tests/test_quantize.py (weights N(0, 0.05), embedding N(0, 1)), where
# int8 gives 0.012 and bfloat16 weights 0.003 (CPU, jax 0.10.2). Per-channel
# int8 rounds each weight by at most half of its row's largest |w| / 127.
QUANT_LOGITS_REL = {"int8": 0.04, "bfloat16": 0.01}

# Split f32 products of the Pallas split kernels (`kernel_split.Dots.fm`):
# an f32 matrix times a bf16-exact one, the f32 operand cut into this many
# bf16 parts; largest error relative to the largest float64 entry.
MIXED_DOT_REL = {"bf16": 4e-3, "bf16x3": 2e-5, "bf16x6": 1e-6}


def tol(dtype) -> tuple[float, float]:
  """Returns (rtol, atol) for arrays of `dtype`."""
  return _TOLERANCES[np.dtype(jnp.dtype(dtype)).name]


def assert_close(actual, expected, dtype, *, scale: float = 1.0,
                 err_msg: str = ""):
  """Asserts `actual` ~ `expected` with the tolerance of `dtype` (x scale)."""
  rtol, atol = tol(dtype)
  np.testing.assert_allclose(
      np.asarray(actual, np.float64), np.asarray(expected, np.float64),
      rtol=rtol * scale, atol=atol * scale, err_msg=err_msg)


def assert_trees_close(actual, expected, dtype, *, scale: float = 1.0):
  """Asserts two pytrees have one structure and every leaf of `actual` ~
  the same leaf of `expected` with the tolerance of `dtype` (x scale),
  compared in float64 (chex names the leaves that differ)."""
  rtol, atol = tol(dtype)
  chex.assert_trees_all_close(_float64(actual), _float64(expected),
                              rtol=rtol * scale, atol=atol * scale)


def assert_trees_scaled_close(actual, expected, dtype, *,
                              scale: float = 1.0):
  """`assert_trees_close` with each pair of leaves divided by max(1, the
  largest |entry| of the expected leaf): leaves of very different sizes
  (the gradients of different parameters) each get the tolerance relative
  to their own size."""
  chex.assert_trees_all_equal_shapes(actual, expected)
  expected = _float64(expected)
  sizes = jax.tree_util.tree_map(_leaf_size, expected)
  divide = functools.partial(jax.tree_util.tree_map, np.divide)
  assert_trees_close(divide(_float64(actual), sizes),
                     divide(expected, sizes), dtype, scale=scale)


def _float64(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def _leaf_size(x: np.ndarray) -> float:
  return max(1.0, float(np.max(np.abs(x)))) if x.size else 1.0


def max_rel_err(actual, expected) -> float:
  """Largest |actual - expected| relative to the largest |expected|."""
  a = np.asarray(actual, np.float64)
  e = np.asarray(expected, np.float64)
  return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30))


# Training FLOPs per token (`train_step.flops_per_token`, a model of the
# chunked gated delta rule: intra-chunk products and state reads/writes)
# against the matrix products counted in the chunked jnp program, which
# also has the triangular solve and the decay weights' products: the tiny
# preset, all-linear, 64 and 256 tokens, has 3.7% more in the program
# (jax 0.10.2).
FLOPS_MODEL_REL = 0.05

