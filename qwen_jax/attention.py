"""Gated full attention of Qwen3.5 (GQA, q/k norm, partial RoPE, output gate).

  qg       = x W_q          reshaped [b, t, h, 2e]; q = qg[..., :e],
                            gate = qg[..., e:]   (interleaved per head)
  k, v     = x W_k, x W_v   [b, t, n, e]
  q, k     = RMSNorm_zc(q), RMSNorm_zc(k)        (over e, before RoPE)
  q, k     = RoPE on the first rotary_dim dims   (NeoX half split)
  o        = softmax(q k^T / sqrt(e) + mask) v   (query head i uses kv head
                                                  i // (h / n))
  y        = (o * sigmoid(gate)) W_o             (element-wise gate)

Decoding cache (`GatedAttention.init_cache`): the keys and values of every
slot written so far, {"k": [b, S, n, e], "v": [b, S, n, e]}, S fixed when
the cache is allocated.

Implementations (`QwenConfig.attention_implementation`):

  xla    the jnp attention of this module (`dot_product_attention`): the
         queries in blocks of `QUERY_BLOCK`, each block's float32 scores
         over every key.
  cudnn  cuDNN's fused (flash) attention through
         `jax.nn.dot_product_attention` for the causal attention of a
         block over its own keys without padding or packing masks: the
         training and forward passes, and a prefill call that starts from
         an empty cache (a `lax.cond` on the cache index picks it at run
         time). Everything else, and every input cuDNN does not take
         (`fused_fallback_reason`: not a CUDA GPU, not float16/bfloat16,
         head_dim over 256 on Hopper and later or 128 before), runs the
         jnp attention; the reason is logged once.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax import layers
from qwen_jax import mrope
from qwen_jax import sequence_parallel
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.config import QwenConfig

# Queries are processed in blocks of this many tokens when the sequence is
# longer, so the score matrix never holds more than block x s entries.
QUERY_BLOCK = 1024
_NEG = -1e30


def _attend_block(q, k, v, q_pos, k_pos, key_valid, q_seg, k_seg):
  """Softmax attention for one block of queries.

  q: [b, tq, n, g, e] (already scaled); k, v: [b, s, n, e]; q_pos [b, tq];
  k_pos [b, s]; key_valid [b, s] bool; q_seg [b, tq] / k_seg [b, s] or None.
  """
  scores = jnp.einsum("btnge,bsne->bngts", q, k,
                      preferred_element_type=jnp.float32)
  allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
  if q_seg is not None:
    allowed &= q_seg[:, :, None] == k_seg[:, None, :]
  scores = jnp.where(allowed[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bngts,bsne->btnge", probs, v,
                    preferred_element_type=jnp.float32).astype(v.dtype)


def dot_product_attention(q: Array, k: Array, v: Array, q_pos: Array,
                          k_pos: Array, key_valid: Array,
                          q_seg: Array | None = None,
                          k_seg: Array | None = None,
                          block: int = QUERY_BLOCK) -> Array:
  """Causal GQA attention with padding and packing masks, in jnp.

  Args:
    q: [b, t, h, e] queries; k, v: [b, s, n, e] with h a multiple of n.
    q_pos: [b, t] query positions; k_pos: [b, s] key positions (a key is
      visible when k_pos <= q_pos).
    key_valid: [b, s] bool, False for padding and unwritten cache slots.
    q_seg, k_seg: packed-document ids, or None.
    block: queries per block (memory O(block * s)).

  Returns:
    [b, t, h, e] in v.dtype.
  """
  b, t, h, e = q.shape
  n = k.shape[2]
  q = (q * (e ** -0.5)).reshape(b, t, n, h // n, e).astype(q.dtype)
  if t <= block:
    o = _attend_block(q, k, v, q_pos, k_pos, key_valid, q_seg, k_seg)
    return o.reshape(b, t, h, e)
  nb = -(-t // block)
  pad = nb * block - t
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  pp = jnp.pad(q_pos, ((0, 0), (0, pad)))
  blocks = [qp.reshape(b, nb, block, n, h // n, e).swapaxes(0, 1),
            pp.reshape(b, nb, block).swapaxes(0, 1)]
  if q_seg is not None:
    sp = jnp.pad(q_seg, ((0, 0), (0, pad)), constant_values=-1)
    blocks.append(sp.reshape(b, nb, block).swapaxes(0, 1))

  def one(args):
    qb, pb = args[0], args[1]
    sb = args[2] if q_seg is not None else None
    return _attend_block(qb, k, v, pb, k_pos, key_valid, sb, k_seg)

  # Under autodiff each block's scores and probabilities are recomputed in
  # the backward instead of being stored for every block at once (at 32k
  # tokens the stored float32 scores alone would be about 32 GiB a layer).
  # [nb, b, block, n, g, e]
  o = jax.lax.map(jax.checkpoint(one), tuple(blocks))
  o = o.swapaxes(0, 1).reshape(b, nb * block, h, e)
  return o[:, :t]


# The `implementation` the "cudnn" option passes to
# `jax.nn.dot_product_attention`; tests set "xla" to run the option's code
# path on a CPU (jax's own attention, a full [t, s] score matrix).
FUSED_IMPLEMENTATION = "cudnn"
_FALLBACKS_LOGGED = set()


def fused_fallback_reason(q: Array, implementation: str = "cudnn"
                          ) -> str | None:
  """Why `jax.nn.dot_product_attention(implementation=...)` cannot take q
  here, or None when it can.

  cuDNN's conditions as jax 0.10 checks them
  (`jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention`): a
  CUDA GPU, float16 or bfloat16 inputs, a head_dim that is a multiple of 8
  and at most 256 on compute capability 9.0 and later (128 before).
  Anything jax still refuses while tracing is caught by the caller.
  """
  if implementation != "cudnn":
    return None
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    return f"backend {dev.platform!r} is not a GPU"
  if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16),
                                jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(q.dtype).name} (cuDNN takes float16/bfloat16)"
  try:
    major, minor = (int(x) for x in str(dev.compute_capability).split("."))
  except (AttributeError, ValueError):
    return (f"device {dev.device_kind!r} reports no CUDA compute "
            f"capability")
  e = q.shape[-1]
  limit = 256 if (major, minor) >= (9, 0) else 128
  if e > limit or e % 8:
    return (f"head_dim {e} (cuDNN on compute capability {major}.{minor} "
            f"takes multiples of 8 up to {limit})")
  return None


def _log_fallback(reason: str) -> None:
  if reason not in _FALLBACKS_LOGGED:
    _FALLBACKS_LOGGED.add(reason)
    logging.warning("attention_implementation='cudnn': the jnp attention "
                    "runs instead: %s", reason)


def causal_attention(q: Array, k: Array, v: Array,
                     fused: str | None = None) -> Array:
  """Causal GQA attention of a block over its own keys (no masks).

  Args:
    q: [b, t, h, e]; k, v: [b, t, n, e].
    fused: None for the jnp attention; else the `implementation` of
      `jax.nn.dot_product_attention` to try first ("cudnn"; "xla" in
      tests), falling back to the jnp attention when it cannot run.

  Returns:
    [b, t, h, e] in v.dtype.
  """
  b, t, _, e = q.shape
  if fused is not None:
    reason = fused_fallback_reason(q, fused)
    if reason is None:
      try:
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, scale=e ** -0.5,
            implementation=fused).astype(v.dtype)
      except (NotImplementedError, RuntimeError, ValueError) as err:
        reason = f"{type(err).__name__}: {err}"
    _log_fallback(reason)
  ar = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return dot_product_attention(q, k, v, ar, ar, jnp.ones((b, t), bool))


class GatedAttention(nn.Module):
  """Qwen3.5 gated full-attention layer.

  Attributes:
    cfg: the model config.
  """
  cfg: QwenConfig

  @staticmethod
  def cache_shapes(cfg: QwenConfig, batch: int, max_len: int,
                   dtype: Any = None) -> PyTree:
    """This layer's cache as `jax.ShapeDtypeStruct`s (nothing allocated).

    Args:
      cfg: the model config.
      batch: sequences decoded together.
      max_len: KV slots (prompt + new tokens).
      dtype: dtype of K and V; default cfg.dtype.

    Returns:
      {"k": [batch, max_len, n, e], "v": the same}.
    """
    dt = jnp.dtype(cfg.dtype if dtype is None else dtype)
    kv = jax.ShapeDtypeStruct(
        (batch, max_len, cfg.num_key_value_heads, cfg.head_dim), dt)
    return {"k": kv, "v": kv}

  @staticmethod
  def init_cache(cfg: QwenConfig, batch: int, max_len: int,
                 dtype: Any = None) -> PyTree:
    """A zero cache of `cache_shapes(cfg, batch, max_len, dtype)`."""
    return jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        GatedAttention.cache_shapes(cfg, batch, max_len, dtype))

  @nn.compact
  def __call__(self, x: Array, positions: Array,
               attention_mask: Array | None = None,
               cache: PyTree | None = None,
               cache_index: Array | None = None,
               segment_ids: Array | None = None
               ) -> tuple[Array, PyTree | None]:
    """Applies the layer.

    Args:
      x: [b, t, d] normalised hidden states.
      positions: [b, t] int positions, or [3, b, t] multimodal (t, h, w)
        positions (`qwen_jax.mrope`); RoPE only (causality follows the
        token order and the cache slots).
      attention_mask: [b, s] 1 for real tokens, 0 for padding, over the keys:
        s = t without a cache, s = the cache length with one.
      cache: {"k": [b, S, n, e], "v": [b, S, n, e]} or None.
      cache_index: int32 scalar, tokens already in the cache.
      segment_ids: [b, t] packed-document ids (no cache), or None.

    Returns:
      ([b, t, d] output, updated cache or None).
    """
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t, _ = x.shape
    h, n, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dense = lambda f, names, name: layers.Dense(  # pylint: disable=g-long-lambda
        f, names, cfg.attention_bias, dtype, pdtype, name=name)

    qg = dense(2 * h * e, ("embed", "heads"), "q_proj")(x)
    qg = qg.reshape(b, t, h, 2 * e)
    q, gate = qg[..., :e], qg[..., e:]
    k = dense(n * e, ("embed", "kv_heads"), "k_proj")(x).reshape(b, t, n, e)
    v = dense(n * e, ("embed", "kv_heads"), "v_proj")(x).reshape(b, t, n, e)
    q = layers.RMSNorm(cfg.rms_norm_eps, "head_dim", pdtype, name="q_norm")(q)
    k = layers.RMSNorm(cfg.rms_norm_eps, "head_dim", pdtype, name="k_norm")(k)
    if positions.ndim == 3:  # (t, h, w) rows: multimodal RoPE
      cos, sin = mrope.mrope_cos_sin(positions, cfg.rotary_dim,
                                     cfg.rope_theta, dtype,
                                     cfg.mrope_section)
    else:
      cos, sin = layers.rope_cos_sin(positions, cfg.rotary_dim,
                                     cfg.rope_theta, dtype)
    q = layers.apply_partial_rope(q, cos, sin)
    k = layers.apply_partial_rope(k, cos, sin)
    q = layers.constrain(q, ("batch", "seq", "heads", "head_dim"))
    k = layers.constrain(k, ("batch", "seq", "kv_heads_act", "head_dim"))
    fused = (FUSED_IMPLEMENTATION
             if cfg.attention_implementation == "cudnn" else None)

    if cache is not None:
      # Write this step's keys/values at cache_index, attend over the cache.
      k_all = jax.lax.dynamic_update_slice(
          cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
      v_all = jax.lax.dynamic_update_slice(
          cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
      new_cache = {"k": k_all, "v": v_all}
      s = k_all.shape[1]
      k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
      q_pos = cache_index + jnp.broadcast_to(
          jnp.arange(t, dtype=jnp.int32), (b, t))
      key_valid = k_pos < cache_index + t
      if attention_mask is not None:
        key_valid &= attention_mask.astype(bool)
      sp = sequence_parallel.current() if t > 1 else None
      if sp is not None:
        # Sequence-parallel prefill: the cache holds nothing before this call
        # (qwen_jax.sharding starts prefill from an empty cache).
        mask = (None if attention_mask is None else
                jax.lax.dynamic_slice_in_dim(attention_mask, cache_index, t,
                                             1))
        o = sequence_parallel.attention(q, k, v, mask)
      else:
        def over_cache():
          return dot_product_attention(q, k_all.astype(dtype),
                                       v_all.astype(dtype), q_pos, k_pos,
                                       key_valid)

        if fused is not None and t > 1 and attention_mask is None:
          # A prompt's first block sees only its own keys: causal attention
          # over t keys instead of every cache slot.
          # (K and V rounded as the cache stores them, as over_cache reads
          # them.)
          k_own = k.astype(k_all.dtype).astype(dtype)
          v_own = v.astype(v_all.dtype).astype(dtype)
          o = jax.lax.cond(cache_index == 0,
                           lambda: causal_attention(q, k_own, v_own, fused),
                           over_cache)
        else:
          o = over_cache()
    else:
      new_cache = None
      ar = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      key_valid = (jnp.ones((b, t), bool) if attention_mask is None
                   else attention_mask.astype(bool))
      sp = sequence_parallel.current()
      if sp is not None:  # the token axis split over devices
        o = sequence_parallel.attention(q, k, v, attention_mask, segment_ids)
      elif (fused is not None and attention_mask is None
            and segment_ids is None):
        o = causal_attention(q, k, v, fused)
      else:
        o = dot_product_attention(q, k, v, ar, ar, key_valid,
                                  segment_ids, segment_ids)
    o = o.reshape(b, t, h * e) * jax.nn.sigmoid(
        gate.reshape(b, t, h * e).astype(jnp.float32)).astype(dtype)
    y = dense(cfg.hidden_size, ("heads", "embed"), "o_proj")(o)
    return y, new_cache
