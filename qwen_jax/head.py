"""The LM head and its chunked cross-entropy.

One implementation of the output projection, shared by training
(`qwen_jax.train_step`), the sharded programs (`qwen_jax.sharding`) and
generation (`qwen_jax.generate`):

  logits = h W_lm      W_lm = embed_tokens^T when tied, else lm_head/kernel

`head_weights` returns the matrix in its stored layout ([vocab, d] when
tied, [d, vocab] otherwise), so no caller transposes a vocabulary-sized
array. `lm_logits` computes with float32 accumulation for the loss, or in
the compute dtype as the model's own forward does (`accumulate=False`).

`chunked_cross_entropy` computes the loss from the final hidden states in
chunks of tokens under `jax.checkpoint`: only one chunk's float32 logits
[chunk, vocab] exist at a time, forward or backward (for the 248,320-token
vocabulary a whole 8k sequence would need 8 GB).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.array_typing import Array, PyTree
from qwen_jax.config import QwenConfig

# Auto chunk of the cross-entropy: about this many logits per chunk.
CE_CHUNK_ELEMENTS = 2 ** 27


def head_weights(cfg: QwenConfig, params: PyTree) -> tuple[Array, bool]:
  """(LM-head matrix, vocab_major): [vocab, d] when tied, else [d, vocab].

  `params` may be boxed (partitioning metadata) or plain.
  """
  if cfg.tie_word_embeddings:
    return nn.meta.unbox(params["embed_tokens"]["embedding"]), True
  return nn.meta.unbox(params["lm_head"]["kernel"]), False


def lm_logits(hidden: Array, w: Array, vocab_major: bool, dtype: Any,
           accumulate: bool = True) -> Array:
  """Logits [..., vocab] of hidden states [..., d].

  Args:
    hidden: final normalised hidden states.
    w: the head matrix in the layout `head_weights` gives.
    vocab_major: that layout.
    dtype: matmul input dtype.
    accumulate: return the products accumulated in at least float32 (the
      loss); False returns them in `dtype`, as the model's forward does.
  """
  spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
  acc = jnp.promote_types(dtype, jnp.float32) if accumulate else None
  return jnp.einsum(spec, hidden.astype(dtype), w.astype(dtype),
                    preferred_element_type=acc)


def chunked_cross_entropy(hidden: Array, w: Array, targets: Array,
                          loss_mask: Array, *, vocab_major: bool,
                          chunk_size: int = 0, dtype=None,
                          vocab_axis: Any = None, vocab_offset: Any = 0,
                          ) -> tuple[Array, Array, Array]:
  """Sum of token cross-entropies without materialising all the logits.

  Tokens are split into chunks; a `lax.scan` computes each chunk's logits
  (float32 accumulation), log-sum-exp and target logit under
  `jax.checkpoint`, so the backward recomputes one chunk's logits at a time
  and the head gradient accumulates in the scan carry. Training calls it on
  the whole batch, `qwen_jax.sharding.chunked_lm_loss` on each device's
  tokens inside a `shard_map`.

  Args:
    hidden: [b, t, d] final normalised hidden states.
    w: LM head, [vocab, d] if vocab_major (tied embedding) else [d, vocab].
    targets: [b, t] int token ids.
    loss_mask: [b, t] weights (0 = ignored).
    vocab_major: layout of `w`.
    chunk_size: tokens per chunk; 0 picks about 2^27 logits per chunk.
    dtype: matmul input dtype (default hidden.dtype).
    vocab_axis: inside a `shard_map` whose mesh splits the vocabulary: the
      mesh axis (or axes) of the split; `w` then holds the slice of the
      vocabulary that starts at `vocab_offset`, and the log-sum-exp and the
      target logit are combined over the axis.
    vocab_offset: first vocabulary id of this device's slice of `w`.

  Returns:
    (sum of mask * loss, sum of mask, sum of mask * [argmax == target]),
    float32 scalars (float64 under x64 with float64 inputs). With
    `vocab_axis`, a hit is a target logit equal to the largest logit.
  """
  b, t, d = hidden.shape
  vocab = w.shape[0] if vocab_major else w.shape[1]
  dtype = jnp.dtype(dtype or hidden.dtype)
  n = b * t
  if chunk_size <= 0:
    chunk_size = max(1, min(n, CE_CHUNK_ELEMENTS // vocab))
  chunk_size = min(chunk_size, n)
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n
  acc = jnp.promote_types(dtype, jnp.float32)
  h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))
  y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad))
  m = jnp.pad(loss_mask.reshape(n).astype(acc), (0, pad))
  h = h.reshape(num_chunks, chunk_size, d)
  y = y.reshape(num_chunks, chunk_size)
  m = m.reshape(num_chunks, chunk_size)

  @jax.checkpoint
  def one_chunk(w, h_c, y_c, m_c):
    z = lm_logits(h_c, w, vocab_major, dtype)  # [c, vocab] f32
    if vocab_axis is None:
      lse = jax.nn.logsumexp(z, axis=-1)
      tgt = jnp.take_along_axis(z, y_c[:, None], axis=-1)[:, 0]
      hit = jnp.argmax(z, axis=-1) == y_c
    else:
      # Each device holds a slice of the vocabulary. The shift only steadies
      # exp and cancels, so no gradient flows through it.
      top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(z, -1)), vocab_axis)
      lse = top + jnp.log(jax.lax.psum(
          jnp.sum(jnp.exp(z - top[:, None]), -1), vocab_axis))
      iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
      tgt = jax.lax.psum(jnp.sum(jnp.where(
          iota == (y_c - vocab_offset)[:, None], z, 0.0), -1), vocab_axis)
      hit = tgt >= top
    loss = jnp.sum((lse - tgt) * m_c)
    correct = jax.lax.stop_gradient(jnp.sum(hit.astype(acc) * m_c))
    return loss, correct

  def body(carry, xs):
    loss, correct = one_chunk(w, *xs)
    return (carry[0] + loss, carry[1] + correct), None

  zero = jnp.zeros((), acc)
  (loss, correct), _ = jax.lax.scan(body, (zero, zero), (h, y, m))
  return loss, jnp.sum(m), correct


def cross_entropy(logits: Array, targets: Array,
                  loss_mask: Array) -> tuple[Array, Array]:
  """Plain (sum of mask * loss, sum of mask) from full logits [b, t, vocab]
  (the reference `chunked_cross_entropy` is tested against)."""
  z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  lse = jax.nn.logsumexp(z, axis=-1)
  tgt = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(lse.dtype)
  return jnp.sum((lse - tgt) * mask), jnp.sum(mask)
