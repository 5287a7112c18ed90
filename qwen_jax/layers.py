"""Building blocks: norms, the causal depthwise conv, partial RoPE, Dense.

Numerics follow transformers' Qwen3.5 (models/qwen3_5/modeling_qwen3_5.py:
Qwen3_5RMSNorm, Qwen3_5RMSNormGated, causal_conv1d_forward,
apply_rotary_pos_emb): norms compute in float32 and cast back at the end.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.array_typing import Array

# Logical axis names used by parameters (qwen_jax/sharding.py maps them).
Names = Sequence[str | None]


def param_init(init, names: Names):
  """An initializer that carries logical axis names for sharding."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: Array, names: Names) -> Array:
  """Logical sharding constraint on an activation (no-op without rules)."""
  return nn.with_logical_constraint(x, tuple(names))


class Dense(nn.Module):
  """y = x W (+ b) with W stored [in, out] (the transpose of torch Linear).

  Attributes:
    features: output width.
    names: logical axis names of the kernel (in, out).
    use_bias: add a bias.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  features: int
  names: tuple[str | None, str | None]
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
        "kernel", param_init(nn.initializers.normal(0.02), self.names),
        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.einsum("...d,df->...f", x.astype(self.dtype),
                   kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", param_init(nn.initializers.zeros,
                                           self.names[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def rms_normalize(x: Array, eps: float) -> Array:
  """x / sqrt(mean(x^2) + eps) in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """Zero-centred RMSNorm: y = x / rms(x) * (1 + w), computed in float32.

  Used for the layer norms, the final norm and q/k norm. `w` starts at 0.

  Attributes:
    eps: added to the mean square.
    name_axis: logical axis name of the weight.
    param_dtype: parameter dtype.
  """
  eps: float = 1e-6
  name_axis: str = "norm"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param("weight", param_init(nn.initializers.zeros,
                                        (self.name_axis,)),
                   (x.shape[-1],), self.param_dtype)
    y = rms_normalize(x, self.eps) * (1.0 + w.astype(jnp.float32))
    return y.astype(x.dtype)


class GatedRMSNorm(nn.Module):
  """Gated DeltaNet output norm: y = (x / rms(x) * w) * silu(z).

  Not zero-centred (`w` starts at 1). Normalises first, then gates. The dtype
  path copies transformers: normalise in f32, cast, scale by w, gate in f32.

  Attributes:
    eps: added to the mean square.
    param_dtype: parameter dtype.
  """
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, z: Array) -> Array:
    w = self.param("weight", param_init(nn.initializers.ones, ("norm",)),
                   (x.shape[-1],), self.param_dtype)
    y = w.astype(x.dtype) * rms_normalize(x, self.eps).astype(x.dtype)
    y = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype)


def causal_conv(x: Array, kernel: Array, prefix: Array | None = None,
                segment_ids: Array | None = None) -> Array:
  """Causal depthwise conv over time: out[t] = sum_j w[j] x[t - (K-1) + j].

  Args:
    x: [b, t, c] inputs.
    kernel: [K, c] weights; kernel[K-1] multiplies the current token.
    prefix: [b, K-1, c] inputs that precede x (a decode cache, or the left
      neighbour's tail under sequence parallelism); zeros when None.
    segment_ids: [b, t] packed-document ids; taps never cross documents
      (only with prefix None).

  Returns:
    [b, t, c] in x.dtype (accumulated in float32).
  """
  k = kernel.shape[0]
  b, t, c = x.shape
  if prefix is None:
    prefix = jnp.zeros((b, k - 1, c), x.dtype)
  xp = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
  w = kernel.astype(jnp.float32)
  out = jnp.zeros((b, t, c), jnp.float32)
  for j in range(k):
    tap = xp[:, j:j + t].astype(jnp.float32)
    if segment_ids is not None and j < k - 1:
      back = k - 1 - j
      same = segment_ids[:, back:] == segment_ids[:, :-back]
      same = jnp.concatenate(
          [jnp.zeros((b, min(back, t)), bool), same], axis=1)[:, :t]
      tap = tap * same[..., None]
    out = out + tap * w[j]
  return out.astype(x.dtype)


class CausalConv(nn.Module):
  """Causal depthwise conv (no bias), parameter `kernel` of shape [K, c].

  Attributes:
    kernel_size: K.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  kernel_size: int = 4
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, prefix: Array | None = None,
               segment_ids: Array | None = None) -> Array:
    kernel = self.param(
        "kernel", param_init(nn.initializers.normal(0.02),
                             ("conv_width", "linear_qkv")),
        (self.kernel_size, x.shape[-1]), self.param_dtype)
    return causal_conv(x.astype(self.dtype), kernel.astype(self.dtype),
                       prefix, segment_ids)


def rope_cos_sin(positions: Array, rotary_dim: int, theta: float,
                 dtype) -> tuple[Array, Array]:
  """cos/sin tables [b, t, rotary_dim] (NeoX half-split layout).

  inv_freq_i = theta^(-2i / rotary_dim): the exponent's denominator is the
  rotary dim, not head_dim. Angles in float32, tables cast to `dtype` as
  transformers does.
  """
  inv_freq = 1.0 / (theta ** (
      jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  angle = positions.astype(jnp.float32)[..., None] * inv_freq
  angle = jnp.concatenate([angle, angle], axis=-1)
  return jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)


def apply_partial_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates the first rotary_dim dims of x [b, t, h, d]; the rest pass."""
  rd = cos.shape[-1]
  x_rot, x_pass = x[..., :rd], x[..., rd:]
  half = rd // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x_rot = x_rot * cos + rotated * sin
  return jnp.concatenate([x_rot.astype(x.dtype), x_pass], axis=-1)
