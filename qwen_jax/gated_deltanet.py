"""The Gated DeltaNet layer of Qwen3.5 (linear attention with a delta rule).

  x          <- x * mask                       (padding zeroed, T > 1)
  [q|k|v]    = silu(causal_conv(x W_qkv))      channels [hk*dk | hk*dk | hv*dv]
  z          = x W_z       [b, t, hv, dv]
  beta       = sigmoid(x W_b)                  [b, t, hv]
  g          = -exp(A_log) * softplus(x W_a + dt_bias)   (float32, g <= 0)
  q, k       = q / ||q||, k / ||k||            (L2, eps 1e-6 inside the sqrt)
  S_t        = e^{g_t} S_{t-1} + beta_t k_t (v_t - e^{g_t} S_{t-1}^T k_t)^T
  o_t        = S_t^T q_t / sqrt(dk)            (value head j reads key head
                                                j // (hv / hk))
  y          = (GatedRMSNorm(o, z)) W_out

Decoding cache (`GatedDeltaNet.init_cache`), of a fixed size whatever the
context length: the last K-1 inputs of the conv, {"conv": [b, K-1,
conv_dim]}, and the recurrent state {"state": [b, hv, dk, dv]}, always
float32 (it integrates over the whole context; bf16 would drift).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import gated_delta_rule
from qwen_jax import layers
from qwen_jax import sequence_parallel
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.config import QwenConfig

L2_EPS = 1e-6  # hard-coded in transformers and flash-linear-attention
# dtype of the cached recurrent state, whatever the compute dtype.
STATE_DTYPE = jnp.float32


def l2_normalize(x: Array, eps: float = L2_EPS) -> Array:
  """x / sqrt(sum(x^2) + eps) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nn.Module):
  """Qwen3.5 Gated DeltaNet layer.

  Attributes:
    cfg: the model config.
  """
  cfg: QwenConfig

  @staticmethod
  def cache_shapes(cfg: QwenConfig, batch: int, dtype: Any = None
                   ) -> PyTree:
    """This layer's cache as `jax.ShapeDtypeStruct`s (nothing allocated).

    Args:
      cfg: the model config.
      batch: sequences decoded together.
      dtype: dtype of the conv inputs; default cfg.dtype (the state is
        STATE_DTYPE whatever this says).

    Returns:
      {"conv": [batch, K-1, conv_dim], "state": [batch, hv, dk, dv]}.
    """
    dt = jnp.dtype(cfg.dtype if dtype is None else dtype)
    sds = jax.ShapeDtypeStruct
    conv = (batch, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim)
    state = (batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
             cfg.linear_value_head_dim)
    return {"conv": sds(conv, dt), "state": sds(state, STATE_DTYPE)}

  @staticmethod
  def init_cache(cfg: QwenConfig, batch: int, dtype: Any = None) -> PyTree:
    """A zero cache of `cache_shapes(cfg, batch, dtype)`."""
    return jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        GatedDeltaNet.cache_shapes(cfg, batch, dtype))

  @nn.compact
  def __call__(self, x: Array, attention_mask: Array | None = None,
               cache: PyTree | None = None,
               segment_ids: Array | None = None,
               conv_prefix: Array | None = None,
               ) -> tuple[Array, PyTree | None]:
    """Applies the layer.

    Args:
      x: [b, t, d] normalised hidden states.
      attention_mask: [b, t] True (or 1) for real tokens, False (0) for
        (left) padding, read as bool; padded inputs are zeroed so they never
        reach the state.
      cache: {"conv": [b, K-1, conv_dim], "state": [b, hv, dk, dv] f32} or
        None. With a cache the conv continues from the cached inputs and the
        rule from the cached state.
      segment_ids: [b, t] packed-document ids (no cache), or None.
      conv_prefix: [b, K-1, conv_dim] inputs preceding x when no cache is
        given (sequence parallelism); zeros when None.

    Returns:
      ([b, t, d] output, updated cache or None).
    """
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t, _ = x.shape
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    kd = cfg.linear_key_dim

    if attention_mask is not None and t > 1:
      # Read as bool, as attention reads it (Qwen35 passes a bool mask).
      x = x * attention_mask[:, :, None].astype(bool).astype(x.dtype)
    dense = lambda f, names, name: layers.Dense(  # pylint: disable=g-long-lambda
        f, names, False, dtype, pdtype, name=name)
    mixed = dense(cfg.linear_conv_dim, ("embed", "linear_qkv"),
                  "in_proj_qkv")(x)
    z = dense(cfg.linear_value_dim, ("embed", "linear_v"), "in_proj_z")(x)
    b_logits = dense(hv, ("embed", "linear_heads"), "in_proj_b")(x)
    a = dense(hv, ("embed", "linear_heads"), "in_proj_a")(x)

    prefix = cache["conv"] if cache is not None else conv_prefix
    conv = layers.CausalConv(cfg.linear_conv_kernel_dim, dtype, pdtype,
                             name="conv1d")
    # Under qwen_jax.sharding the token axis may be split over devices.
    sp = sequence_parallel.current() if t > 1 else None
    if sp is not None:
      mixed_act = jax.nn.silu(sequence_parallel.causal_conv(
          lambda xb, sb: conv(xb, None, sb), mixed,
          cfg.linear_conv_kernel_dim, segment_ids, prefix))
    else:
      mixed_act = jax.nn.silu(conv(mixed, prefix, segment_ids))
    q = mixed_act[..., :kd].reshape(b, t, hk, dk)
    k = mixed_act[..., kd:2 * kd].reshape(b, t, hk, dk)
    v = mixed_act[..., 2 * kd:].reshape(b, t, hv, dv)

    a_log = self.param("A_log", layers.param_init(
        lambda key, s, d: jnp.log(jax.random.uniform(key, s, d, 0.01, 16.0)),
        ("linear_heads",)), (hv,), pdtype)
    dt_bias = self.param("dt_bias", layers.param_init(
        nn.initializers.ones, ("linear_heads",)), (hv,), pdtype)
    beta = jax.nn.sigmoid(b_logits)
    g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
        a.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    q, k = l2_normalize(q), l2_normalize(k)

    initial_state = cache["state"] if cache is not None else None
    impl = cfg.gdr_implementation
    if cache is not None and t == 1:
      impl = "recurrent"  # one token: the plain update, no chunk padding
    # g <= 0 by construction, so the rule need not read it to the host
    # (which an un-jitted call would wait for, layer by layer); under jit,
    # and in the sequence-parallel op, g is traced and never read.
    rule = (functools.partial(gated_delta_rule, check_values=False)
            if sp is None else sequence_parallel.gated_delta_rule)
    o, state = rule(
        q, k, v, g, beta, initial_state=initial_state,
        implementation=impl, interpret=cfg.gdr_interpret,
        chunk_size=cfg.gdr_chunk_size, block_sizes=cfg.gdr_block_sizes,
        segment_ids=segment_ids)
    o = layers.constrain(o, ("batch", "seq", "linear_heads_act", None))

    o = layers.GatedRMSNorm(cfg.rms_norm_eps, pdtype, name="norm")(
        o.astype(dtype), z.reshape(b, t, hv, dv))
    y = dense(cfg.hidden_size, ("linear_v", "embed"), "out_proj")(
        o.reshape(b, t, hv * dv))

    new_cache = None
    if cache is not None:
      k1 = cfg.linear_conv_kernel_dim - 1
      window = jnp.concatenate([cache["conv"].astype(mixed.dtype), mixed],
                               axis=1)
      # The last K-1 inputs; `[:, -k1:]` would keep them all when K = 1.
      tail = window[:, window.shape[1] - k1:]
      new_cache = {"conv": tail.astype(cache["conv"].dtype), "state": state}
    return y, new_cache
