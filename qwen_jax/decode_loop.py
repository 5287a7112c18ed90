"""The layer loop of decoding: which parameter layout the decode program reads.

Batch-1 decoding reads every weight once per token, so its speed is the
memory bandwidth over the weight bytes. On XLA's CPU backend the scanned
stack (`cfg.scan_layers`) costs a decode step more than half its time: the
slice of each stacked kernel a layer reads is copied out of the stacked
array before the product, so the weights cross memory three times. The
decode layout (`qwen_jax.quantize`) has one slot per layer and output-major
kernels, whose vector-matrix products XLA's CPU backend fuses into single
loops that read each kernel once (docs/measurements/2026-12-06-cpu-*: the
0.8B preset's decode steps per second, scanned, unscanned and in this
layout).

`generate` and `stream` call `prepare`: on a backend in `CONVERT_BACKENDS`
(the CPU) float parameters are converted to the decode layout in their own
dtype, once per parameter object (kept while the arrays it was made from
live; it holds one more copy of the layer matrices, the float embedding is
shared), and prefill and decoding run on it. A tree that already is in the
decode layout (`qwen_jax.quantize`) is used as it is on any backend. Other
backends keep the parameters and layer loop they are given.

`apply_model` runs `Qwen35` on either kind of tree: on a decode-layout tree
through a Flax method interceptor that computes each `Dense` and the
embedding from the stored matrices (`qwen_jax.quantize.matmul`), so the
model's modules stay as they are.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax import layers
from qwen_jax import stack
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.config import QwenConfig
from qwen_jax.model import Qwen35
from qwen_jax.quantize import check_params
from qwen_jax.quantize import EMBED_Q
from qwen_jax.quantize import EMBED_SCALE
from qwen_jax.quantize import embed_lookup
from qwen_jax.quantize import is_decode_layout
from qwen_jax.quantize import KERNEL_T
from qwen_jax.quantize import matmul
from qwen_jax.quantize import SCALE
from qwen_jax.quantize import to_decode_layout

# Backends on which `prepare` converts float parameters to the decode
# layout (measured faster there; see the module docstring).
CONVERT_BACKENDS = ("cpu",)

_state = threading.local()
_lock = threading.Lock()
# The last conversion: (cfg, ids of the source leaves, weak references to
# them, the converted tree). One entry, so at most one extra copy is held.
_last: list[Any] = []


@contextlib.contextmanager
def auto_convert(enabled: bool) -> Iterator[None]:
  """Within the block, `prepare` converts float parameters (True, the
  default on CONVERT_BACKENDS) or never does (False: the given layout and
  layer loop, e.g. to compare against)."""
  old = getattr(_state, "enabled", True)
  _state.enabled = bool(enabled)
  try:
    yield
  finally:
    _state.enabled = old


def layout_cfg(cfg: QwenConfig, params: Any) -> QwenConfig:
  """The config that goes with `params`: unscanned for a decode-layout
  tree, else `cfg` itself."""
  if is_decode_layout(params) and stack.is_scanned(cfg):
    return cfg.replace(scan_layers=False)
  return cfg


def _platform(leaves: list[Any]) -> str:
  for leaf in leaves:
    if isinstance(leaf, jax.core.Tracer):
      return ""  # under a transform: leave the tree alone
    if isinstance(leaf, jax.Array):
      return next(iter(leaf.devices())).platform
  return jax.default_backend()


def clear_cache() -> None:
  """Drops the kept conversion (its memory is freed with it)."""
  with _lock:
    _last.clear()


def prepare(cfg: QwenConfig, params: PyTree) -> tuple[QwenConfig, PyTree]:
  """(config, parameters) the generation programs should run.

  A decode-layout tree: itself, with the unscanned config. Float
  parameters on a backend in CONVERT_BACKENDS (unless `auto_convert(False)`
  is active): their decode layout in their own dtype, converted on the
  first call and reused while the same arrays are passed. Otherwise the
  inputs unchanged, as for a tree that is not the float parameters of
  `Qwen35(cfg)` (left to the model's own checks).

  Raises:
    ValueError: float parameters of cfg holding NaN or Inf (named entry).
  """
  if is_decode_layout(params):
    return layout_cfg(cfg, params), params
  if not getattr(_state, "enabled", True):
    return cfg, params
  params = nn.meta.unbox(params)
  leaves = jax.tree_util.tree_leaves(params)
  if _platform(leaves) not in CONVERT_BACKENDS:
    return cfg, params
  ids = tuple(id(a) for a in leaves)
  with _lock:
    if _last and _last[0] == cfg and _last[1] == ids and all(
        r() is a for r, a in zip(_last[2], leaves)):
      return layout_cfg(cfg, _last[3]), _last[3]
    _last.clear()  # free the previous copy before making the next
  try:
    check_params(cfg, params)
  except ValueError:
    return cfg, params  # not Qwen35(cfg)'s float tree: the model's checks
  try:
    refs = [weakref.ref(a) for a in leaves]
  except TypeError:
    refs = None  # leaves that cannot be watched: convert, keep nothing
  converted = to_decode_layout(cfg, params, None)
  if refs is not None:
    with _lock:
      _last[:] = [cfg, ids, refs, converted]
  return layout_cfg(cfg, converted), converted


# ------------------------------------------------------------ interceptor
def _dense(module: layers.Dense, x: Array) -> Array:
  w_t = module.get_variable("params", KERNEL_T)
  scale = (module.get_variable("params", SCALE)
           if module.has_variable("params", SCALE) else None)
  y = matmul(x, w_t, scale, module.dtype)
  if module.use_bias:
    y = y + module.get_variable("params", "bias").astype(module.dtype)
  return y


def _interceptor(next_fun, args, kwargs, context):
  module, method = context.module, context.method_name
  if isinstance(module, layers.Dense):
    if method == "__call__" and module.has_variable("params", KERNEL_T):
      return _dense(module, *args, **kwargs)
  elif isinstance(module, nn.Embed):
    if module.has_variable("params", EMBED_Q):
      if method == "setup":
        return None  # its float table is not there: read below
      table = module.get_variable("params", EMBED_Q)
      scale = module.get_variable("params", EMBED_SCALE)
      if method == "__call__":
        return embed_lookup(table, scale, args[0], module.dtype)
      if method == "attend":
        return matmul(args[0], table, scale, module.dtype)
    elif method == "attend":
      table = module.get_variable("params", "embedding")
      return matmul(args[0], table, None, module.dtype)
  return next_fun(*args, **kwargs)


def apply_model(cfg: QwenConfig, params: PyTree, *args, **kwargs) -> Any:
  """`Qwen35(cfg).apply({"params": params}, *args, **kwargs)` for float
  trees and decode-layout trees alike (the latter with the unscanned
  config)."""
  model = Qwen35(layout_cfg(cfg, params))
  if not is_decode_layout(params):
    return model.apply({"params": params}, *args, **kwargs)
  with nn.intercept_methods(_interceptor):
    return model.apply({"params": params}, *args, **kwargs)


def head_logits(cfg: QwenConfig, params: PyTree, hidden: Array) -> Array:
  """Logits [..., V] (float32) of final normalised hidden states [..., d]
  from a decode-layout tree, computed in cfg.dtype."""
  if cfg.tie_word_embeddings:
    emb = params["embed_tokens"]
    if EMBED_Q in emb:
      w_t, scale = emb[EMBED_Q], emb[EMBED_SCALE]
    else:
      w_t, scale = emb["embedding"], None
  else:
    w_t = params["lm_head"][KERNEL_T]
    scale = params["lm_head"].get(SCALE)
  return matmul(hidden, w_t, scale, cfg.dtype).astype(jnp.float32)
