"""The decoding cache of the hybrid stack, as a plain pytree.

Each token mixer owns its cache (`GatedAttention.cache_shapes` /
`init_cache`, `GatedDeltaNet.cache_shapes` / `init_cache`); this module
assembles them into the model's cache and checks caches passed in. Only
the full-attention layers keep a cache that grows with the context; the
Gated DeltaNet layers keep a fixed-size state whatever the length:

  full-attention layer:  {"k": [b, S, n, e], "v": [b, S, n, e]}   cfg.dtype
  Gated DeltaNet layer:  {"conv": [b, K-1, conv_dim]}             cfg.dtype
                         {"state": [b, hv, dk, dv]}               float32

The model cache is `{"layers": {slot: layer_cache}, "index": int32 scalar}`,
`slot` running over `qwen_jax.stack.stack_slots(cfg)`; when the stack is
scanned (`qwen_jax.stack.is_scanned`) every leaf of a slot carries a leading
[num_periods] axis, matching the parameter tree. `index` counts the tokens
already written (the next token goes to slot `index`). A cache that holds
images or videos also carries "rope_delta" [b] int32, each row's offset of
multimodal positions (`Qwen35` adds it, `qwen_jax.generate.prefill` sets
it): text after them continues at (tokens before it) + rope_delta.

`cache_bytes` gives the exact size of what `init_cache` allocates, so memory
can be compared across attention ratios without allocating anything.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import stack
from qwen_jax.array_typing import PyTree
from qwen_jax.attention import GatedAttention
from qwen_jax.config import FULL, LINEAR, QwenConfig
from qwen_jax.gated_deltanet import GatedDeltaNet

INDEX_DTYPE = jnp.int32


def _validate(cfg: QwenConfig, batch: int, max_len: int) -> None:
  if not isinstance(batch, (int, np.integer)) or batch < 1:
    raise ValueError(f"batch: expected a positive int, found {batch!r}")
  if not isinstance(max_len, (int, np.integer)) or max_len < 1:
    raise ValueError(f"max_len: expected a positive int, found {max_len!r}")
  if max_len > cfg.max_position_embeddings:
    raise ValueError(
        f"max_len: expected at most max_position_embeddings="
        f"{cfg.max_position_embeddings}, found {max_len}")


def cache_shapes(cfg: QwenConfig, batch: int, max_len: int,
                 dtype: Any = None) -> PyTree:
  """The cache as a pytree of `jax.ShapeDtypeStruct` (nothing allocated).

  Args:
    cfg: the model config.
    batch: sequences decoded together.
    max_len: KV slots per full-attention layer (prompt + new tokens).
    dtype: dtype of K/V and of the conv state; default cfg.dtype.

  Returns:
    {"layers": {slot: {...}}, "index": ShapeDtypeStruct((), int32)}.

  Raises:
    ValueError: batch or max_len not positive, or max_len past
      cfg.max_position_embeddings.
  """
  _validate(cfg, batch, max_len)
  return _shapes(cfg, batch, max_len, dtype)


def _shapes(cfg: QwenConfig, batch: int, max_len: int,
            dtype: Any = None) -> PyTree:
  """`cache_shapes` without the argument checks."""
  lead = stack.leading_axes(cfg)
  layers = {}
  for name, layer_type in stack.stack_slots(cfg):
    if layer_type == FULL:
      layer = GatedAttention.cache_shapes(cfg, batch, max_len, dtype)
    elif layer_type == LINEAR:
      layer = GatedDeltaNet.cache_shapes(cfg, batch, dtype)
    else:
      raise ValueError(f"layer_types: expected {LINEAR!r} or {FULL!r}, "
                       f"found {layer_type!r}")
    layers[name] = {k: jax.ShapeDtypeStruct(lead + s.shape, s.dtype)
                    for k, s in layer.items()}
  return {"layers": layers, "index": jax.ShapeDtypeStruct((), INDEX_DTYPE)}


def init_cache(cfg: QwenConfig, batch: int, max_len: int,
               dtype: Any = None) -> PyTree:
  """A zero cache for `batch` sequences of up to `max_len` tokens.

  Args:
    cfg: the model config.
    batch: sequences decoded together.
    max_len: KV slots per full-attention layer (prompt + new tokens); at most
      cfg.max_position_embeddings.
    dtype: dtype of K/V and of the conv state; default cfg.dtype. The
      recurrent state is float32 whatever this says.

  Returns:
    The cache pytree (see the module docstring), index 0.

  Raises:
    ValueError: batch or max_len not positive, or max_len past
      cfg.max_position_embeddings.
  """
  shapes = cache_shapes(cfg, batch, max_len, dtype)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def to_layout(cfg_from: QwenConfig, cfg_to: QwenConfig, cache: Any) -> Any:
  """`cache`, laid out for `cfg_to` when it is a cache of `cfg_from` in the
  other stack layout (scanned <-> unscanned), else `cache` as it is.

  Generation on a CPU runs the unscanned decode layout
  (`qwen_jax.decode_loop.prepare`); this lets a cache made for the
  scanned config continue there. The tree is told by its slot names only;
  the caller's checks (`check_cache`) come after.
  """
  if (not isinstance(cache, Mapping) or not isinstance(cache.get("layers"),
                                                       Mapping)
      or stack.is_scanned(cfg_from) == stack.is_scanned(cfg_to)):
    return cache
  slots_from = {name for name, _ in stack.stack_slots(cfg_from)}
  if set(cache["layers"]) != slots_from:
    return cache
  layers = {}
  if stack.is_scanned(cfg_from):  # split the [num_periods] axis
    for i in range(cfg_from.num_hidden_layers):
      slot, idx = stack.layer_location(cfg_from, i)
      layers[stack.layer_location(cfg_to, i)[0]] = jax.tree_util.tree_map(
          lambda a, idx=idx: a[idx], cache["layers"][slot])
  else:  # stack each period position over the periods
    for slot, _ in stack.stack_slots(cfg_to):
      j = int(slot.split("_")[1])
      members = [cache["layers"][f"layer_{i}"]
                 for i in range(j, cfg_to.num_hidden_layers, cfg_to.period)]
      layers[slot] = jax.tree_util.tree_map(
          lambda *a: jnp.stack(a), *members)
  return dict(cache, layers=layers)


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.lru_cache(maxsize=64)
def _expected_leaf_shapes(cfg: QwenConfig, batch: int, slots: int
                          ) -> dict[str, tuple[int, ...]]:
  """`_leaf_shapes` of the layers of `cache_shapes(cfg, batch, slots)`,
  kept per config and size (decode_step checks its cache every token).
  Callers read the dict, never change it."""
  return _leaf_shapes(_shapes(cfg, batch, slots)["layers"])


def check_cache(cfg: QwenConfig, cache: Any, batch: int) -> int | None:
  """Checks that `cache` is a cache of `cfg` for `batch` sequences.

  Compares the tree (slots and entries) and the shape of every leaf with
  `cache_shapes(cfg, batch, S)`, S being the cache's own number of KV slots
  (anything for a model without full-attention layers). Only shapes are
  read, never values, so it runs under jit as well; dtypes are not compared
  (`init_cache` takes a dtype).

  Args:
    cfg: the model config.
    cache: what was passed as the cache.
    batch: sequences in the call (the rows of input_ids).

  Returns:
    S, or None when no layer keeps K/V.

  Raises:
    ValueError: naming the first entry that differs, with the expected and
      found shape.
  """
  if not isinstance(cache, Mapping) or not (
      {"layers", "index"} <= set(cache) <= {"layers", "index",
                                            "rope_delta"}):
    found = (f"a {type(cache).__name__} with keys {sorted(map(str, cache))}"
             if isinstance(cache, Mapping) else type(cache).__name__)
    raise ValueError(f"cache: expected a dict with keys 'index' and 'layers' "
                     f"(qwen_jax.cache.init_cache), and 'rope_delta' after "
                     f"images or videos, found {found}")
  if "rope_delta" in cache and np.shape(cache["rope_delta"]) != (batch,):
    raise ValueError(f"cache: expected cache['rope_delta'] of shape "
                     f"{(batch,)} (one offset per row), found "
                     f"{np.shape(cache['rope_delta'])}")
  found = _leaf_shapes(cache["layers"])
  slots = None
  for key, shape in found.items():
    if key.endswith("['k']") and len(shape) >= 3:
      slots = shape[-3]
      break
  expected = _expected_leaf_shapes(cfg, batch,
                                  1 if slots is None else slots)
  where = (f"for this config ({cfg.num_hidden_layers} layers "
           f"{'scanned' if stack.is_scanned(cfg) else 'unscanned'}, "
           f"{cfg.layer_types.count(FULL)} with K/V) and batch {batch}")
  missing = [k for k in expected if k not in found]
  extra = [k for k in found if k not in expected]
  if missing or extra:
    raise ValueError(
        f"cache: expected the entries {sorted(expected)} {where}, found "
        f"{sorted(found)} (missing {missing[:3]}, unexpected {extra[:3]}); "
        f"build it with qwen_jax.cache.init_cache(cfg, batch, max_len)")
  for key, shape in expected.items():
    if found[key] != shape:
      raise ValueError(f"cache: expected cache['layers']{key} of shape "
                       f"{shape} {where}, found {found[key]}")
  if np.shape(cache["index"]) != ():
    raise ValueError(f"cache: expected a scalar cache['index'], found shape "
                     f"{np.shape(cache['index'])}")
  return slots


def cache_bytes(cfg: QwenConfig, batch: int, max_len: int,
                dtype: Any = None) -> int:
  """Bytes that `init_cache(cfg, batch, max_len, dtype)` allocates (exact).

  Args:
    cfg: the model config.
    batch: sequences decoded together.
    max_len: KV slots per full-attention layer.
    dtype: dtype of K/V and of the conv state; default cfg.dtype.

  Returns:
    The total size of every leaf, the int32 index included.
  """
  shapes = cache_shapes(cfg, batch, max_len, dtype)
  return int(sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize
                 for s in jax.tree_util.tree_leaves(shapes)))


def cache_bytes_by_kind(cfg: QwenConfig, batch: int, max_len: int,
                        dtype: Any = None) -> dict[str, int]:
  """Bytes per kind of cache: "kv" (full attention), "conv", "state"."""
  shapes = cache_shapes(cfg, batch, max_len, dtype)
  out = {"kv": 0, "conv": 0, "state": 0}
  for path, s in jax.tree_util.tree_flatten_with_path(shapes["layers"])[0]:
    key = path[-1].key
    n = int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize
    out["kv" if key in ("k", "v") else key] += n
  return out
