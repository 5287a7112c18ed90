"""The Qwen3.5 decoder stack and causal-LM head.

  h_0     = embed_tokens[input_ids]
  h_i     = h_{i-1} + Mixer_i(RMSNorm(h_{i-1}))      Mixer_i = GatedDeltaNet
  h_i     = h_i + MLP(RMSNorm(h_i))                    or GatedAttention by
                                                      cfg.layer_types[i]
  logits  = RMSNorm(h_N) W_lm     (W_lm = embed_tokens^T when tied)

Parameter tree (`params`):
  embed_tokens/embedding [vocab, d]
  layers/layer_{j}/...   one entry per layer of the repeating period
                         (j < cfg.period), each leaf with a leading
                         [num_periods] axis when the stack is scanned;
                         otherwise layer_{i} for every layer i, unstacked.
  norm/weight [d]
  lm_head/kernel [d, vocab]  (absent when tied)

`layer_location(cfg, i)` maps layer i to its place in that tree; the
checkpoint converter and the caches use it, so nothing else needs to know
whether the stack was scanned.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax import layers
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.attention import GatedAttention
from qwen_jax.config import FULL, LINEAR, QwenConfig
from qwen_jax.gated_deltanet import GatedDeltaNet
from qwen_jax.mlp import MLP

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def is_scanned(cfg: QwenConfig) -> bool:
  """Whether the stack is a scan over repeated periods."""
  return cfg.scan_layers and cfg.num_periods > 1


def layer_location(cfg: QwenConfig, i: int) -> tuple[str, int | None]:
  """(name under params['layers'], index on the leading axis or None)."""
  if not 0 <= i < cfg.num_hidden_layers:
    raise ValueError(f"layer index: expected 0 <= i < "
                     f"{cfg.num_hidden_layers}, found {i}")
  if is_scanned(cfg):
    return f"layer_{i % cfg.period}", i // cfg.period
  return f"layer_{i}", None


def stack_slots(cfg: QwenConfig) -> list[tuple[str, str]]:
  """(name, layer type) of each entry under params['layers']."""
  n = cfg.period if is_scanned(cfg) else cfg.num_hidden_layers
  return [(f"layer_{j}", cfg.layer_types[j]) for j in range(n)]


def segment_positions(segment_ids: Array) -> Array:
  """Positions that restart at 0 at the start of every packed document."""
  b, t = segment_ids.shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  start = jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - first


class DecoderLayer(nn.Module):
  """Pre-norm residual block: token mixer then SwiGLU MLP.

  Attributes:
    cfg: the model config.
    layer_type: LINEAR ("linear_attention") or FULL ("full_attention").
  """
  cfg: QwenConfig
  layer_type: str

  @nn.compact
  def __call__(self, x: Array, positions: Array,
               attention_mask: Array | None = None,
               cache: PyTree | None = None,
               cache_index: Array | None = None,
               segment_ids: Array | None = None,
               ) -> tuple[Array, PyTree | None]:
    """Applies the block.

    Args:
      x: [b, t, d] residual stream.
      positions: [b, t] token positions.
      attention_mask: [b, s] key mask, s = t without a cache and the cache
        length with one (padding = 0), or None.
      cache: this layer's cache (see qwen_jax/cache.py) or None.
      cache_index: int32 scalar, tokens already cached.
      segment_ids: [b, t] packed-document ids or None.

    Returns:
      ([b, t, d], updated cache or None).
    """
    cfg = self.cfg
    pdtype = jnp.dtype(cfg.param_dtype)
    x = layers.constrain(x, ("batch", "seq", "embed_act"))
    h = layers.RMSNorm(cfg.rms_norm_eps, "norm", pdtype,
                       name="input_layernorm")(x)
    if self.layer_type == LINEAR:
      mask = attention_mask
      if mask is not None and cache is not None:
        # The linear layer masks only this call's tokens.
        mask = jax.lax.dynamic_slice_in_dim(mask, cache_index, x.shape[1], 1)
      y, new_cache = GatedDeltaNet(cfg, name="linear_attn")(
          h, mask, cache, segment_ids)
    elif self.layer_type == FULL:
      y, new_cache = GatedAttention(cfg, name="self_attn")(
          h, positions, attention_mask, cache, cache_index, segment_ids)
    else:
      raise ValueError(f"layer_type: expected {LINEAR!r} or {FULL!r}, "
                       f"found {self.layer_type!r}")
    x = x + y.astype(x.dtype)
    h = layers.RMSNorm(cfg.rms_norm_eps, "norm", pdtype,
                       name="post_attention_layernorm")(x)
    x = x + MLP(cfg, name="mlp")(h).astype(x.dtype)
    return x, new_cache


def _maybe_remat(cfg: QwenConfig, module_cls, scanned: bool):
  if cfg.remat_policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                  prevent_cse=not scanned)


class Period(nn.Module):
  """The layers under params['layers'] (see `stack_slots`).

  Scanned: one repeating group, the scan body (carries x, maps over the
  per-period caches). Unscanned: every layer of the model.

  Attributes:
    cfg: the model config.
  """
  cfg: QwenConfig

  @nn.compact
  def __call__(self, x, cache, positions, attention_mask, cache_index,
               segment_ids):
    block = _maybe_remat(self.cfg, DecoderLayer, scanned=True)
    new_cache = {} if cache is not None else None
    for name, layer_type in stack_slots(self.cfg):
      c = None if cache is None else cache[name]
      x, c = block(self.cfg, layer_type, name=name)(
          x, positions, attention_mask, c, cache_index, segment_ids)
      if cache is not None:
        new_cache[name] = c
    return x, new_cache


class Qwen35(nn.Module):
  """Qwen3.5 causal language model (text part).

  Attributes:
    cfg: the model config (validated on construction).
  """
  cfg: QwenConfig

  def setup(self):
    self.cfg.validate()

  @nn.compact
  def __call__(self, input_ids: Array,
               attention_mask: Array | None = None,
               positions: Array | None = None,
               cache: PyTree | None = None,
               segment_ids: Array | None = None,
               return_hidden: bool = False):
    """Runs the model.

    Args:
      input_ids: [b, t] int token ids.
      attention_mask: padding mask, 1 = token, 0 = padding (left padding).
        [b, t] without a cache; [b, S] over every cache slot with one.
      positions: [b, t] positions; default arange(t) (+ the cache index), or
        restarting per document when `segment_ids` is given.
      cache: the model cache (`qwen_jax.cache.init_cache`) or None.
      segment_ids: [b, t] packed-document ids (training; not with a cache).
        Documents never attend to or pass state to each other.
      return_hidden: also return the final normalised hidden states.

    Returns:
      logits [b, t, vocab] in cfg.dtype; with a cache `(logits, cache)`;
      with return_hidden the hidden states [b, t, d] are appended.

    Raises:
      ValueError: a sequence longer than max_position_embeddings, bad
        shapes, or segment_ids together with a cache.
    """
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids: expected shape [batch, time], found "
                       f"{tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
      raise ValueError(
          f"sequence length: expected at most max_position_embeddings="
          f"{cfg.max_position_embeddings}, found {t}")
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids: packed sequences cannot use a cache")
    cache_index = None
    if cache is not None:
      cache_index = cache["index"]
      s = cache_length(cache)
      if (attention_mask is not None and s is not None
          and attention_mask.shape != (b, s)):
        raise ValueError(
            f"attention_mask: with a cache expected shape {(b, s)} (one "
            f"entry per cache slot), found {tuple(attention_mask.shape)}")
    elif attention_mask is not None and attention_mask.shape != (b, t):
      raise ValueError(f"attention_mask: expected shape {(b, t)}, found "
                       f"{tuple(attention_mask.shape)}")
    if positions is None:
      if segment_ids is not None:
        positions = segment_positions(segment_ids)
      else:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache_index is not None:
          positions = positions + cache_index

    embed = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
        embedding_init=layers.param_init(nn.initializers.normal(0.02),
                                         ("vocab", "embed")),
        name="embed_tokens")
    x = embed(input_ids)

    layer_cache = None if cache is None else cache["layers"]
    new_layers = None
    if is_scanned(cfg):
      scan = nn.scan(
          _maybe_remat(cfg, Period, scanned=True),
          variable_axes={"params": 0},
          split_rngs={"params": True},
          metadata_params={nn.PARTITION_NAME: "layers"},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast,
                   nn.broadcast),
          length=cfg.num_periods)
      x, new_layers = scan(cfg, name="layers")(
          x, layer_cache, positions, attention_mask, cache_index,
          segment_ids)
    else:
      x, new_layers = Period(cfg, name="layers")(
          x, layer_cache, positions, attention_mask, cache_index,
          segment_ids)

    hidden = layers.RMSNorm(cfg.rms_norm_eps, "norm", pdtype, name="norm")(x)
    if cfg.tie_word_embeddings:
      logits = embed.attend(hidden.astype(dtype))
    else:
      logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), False,
                            dtype, pdtype, name="lm_head")(hidden)
    logits = layers.constrain(logits, ("batch", "seq", "vocab_act"))
    out = [logits]
    if cache is not None:
      out.append({"layers": new_layers, "index": cache["index"] + t})
    if return_hidden:
      out.append(hidden)
    return out[0] if len(out) == 1 else tuple(out)


def cache_length(cache: PyTree) -> int | None:
  """Slots S of a cache's KV buffers; None when no layer keeps K/V."""
  for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(
      cache["layers"])[0]:
    if getattr(leaf_path[-1], "key", None) == "k":
      return leaf.shape[-3]
  return None
