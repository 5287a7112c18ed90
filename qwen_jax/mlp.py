"""SwiGLU MLP: y = W_down (silu(W_gate x) * W_up x), no biases."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax import layers
from qwen_jax.array_typing import Array
from qwen_jax.config import QwenConfig


class MLP(nn.Module):
  """Dense SwiGLU feed-forward block.

  Attributes:
    cfg: the model config.
    intermediate_size: the hidden width; None for cfg.intermediate_size
      (the shared expert of a mixture-of-experts layer has its own).
  """
  cfg: QwenConfig
  intermediate_size: int | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    f = self.intermediate_size or cfg.intermediate_size
    gate = layers.Dense(f, ("embed", "mlp"), False, dtype, pdtype,
                        name="gate_proj")(x)
    up = layers.Dense(f, ("embed", "mlp"), False, dtype, pdtype,
                      name="up_proj")(x)
    h = layers.constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp_act"))
    return layers.Dense(cfg.hidden_size, ("mlp", "embed"), False, dtype,
                        pdtype, name="down_proj")(h)
