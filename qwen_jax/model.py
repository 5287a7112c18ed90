"""The Qwen3.5 decoder stack and causal-LM head.

  h_0     = embed_tokens[input_ids]
  h_i     = h_{i-1} + Mixer_i(RMSNorm(h_{i-1}))      Mixer_i = GatedDeltaNet
  h_i     = h_i + MLP(RMSNorm(h_i))                    or GatedAttention by
                                                      cfg.layer_types[i]
  logits  = RMSNorm(h_N) W_lm     (W_lm = embed_tokens^T when tied)

With a vision tower (`cfg.vision`, transformers'
`Qwen3_5ForConditionalGeneration`), images and videos enter as the image
processor's patches: the tower (`qwen_jax.vision.VisionTower`) turns them
into [n, d] features, which replace the embeddings of the placeholder
tokens (`cfg.image_token_id` / `video_token_id`) in reading order (row by
row, as transformers' `masked_scatter`), and the positions become the
three-row multimodal positions of `qwen_jax.mrope`.

Parameter tree (`params`):
  embed_tokens/embedding [vocab, d]
  layers/layer_{j}/...   one entry per layer of the repeating period
                         (j < cfg.period), each leaf with a leading
                         [num_periods] axis when the stack is scanned;
                         otherwise layer_{i} for every layer i, unstacked.
  norm/weight [d]
  lm_head/kernel [d, vocab]  (absent when tied)
  visual/...             the vision tower (`qwen_jax.vision`; present
                         when cfg.vision is set, created at init)

`qwen_jax.stack` holds that layout (`layer_location(cfg, i)` maps layer i to
its place in the tree); the checkpoint converter and the cache read it there,
so nothing else needs to know whether the stack was scanned.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import cache as cache_lib
from qwen_jax import layers
from qwen_jax import mrope
from qwen_jax import stack
from qwen_jax import vision as vision_lib
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.attention import GatedAttention
from qwen_jax.config import FULL, LINEAR, MOE, QwenConfig
from qwen_jax.config import VISION_TOKEN_FIELDS
from qwen_jax.gated_deltanet import GatedDeltaNet
from qwen_jax.mlp import MLP
from qwen_jax.moe import SparseMoeBlock

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _to_array(name: str, x: Any) -> Any:
  """x itself when it is an array (jax, numpy or traced), else np.asarray(x).

  Python lists and scalars become numpy arrays (int64 ids stay int64, so the
  range check sees the values as given).
  """
  if x is None or isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
    return x
  try:
    return np.asarray(x)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name}: expected an array, found a "
                     f"{type(x).__name__} that is not one ({e})") from None


def host_values(x: Any) -> np.ndarray | None:
  """x's values on the host when they are known here, else None.

  None for a Tracer (under jit, grad, vmap, scan...: reading the values
  would need a host sync inside the compiled program, so value checks are
  skipped there) and for an array spread over several hosts.
  """
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return np.asarray(x)


def _first(bad: np.ndarray) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argwhere(bad)[0])


def check_input_ids(input_ids: Any, vocab_size: int,
                    name: str = "input_ids") -> None:
  """Raises ValueError when concrete ids fall outside [0, vocab_size).

  Out-of-range ids would otherwise give NaN rows (ids >= vocab) or silently
  read another token's embedding (negative ids wrap). Skipped for traced
  ids (see `host_values`).
  """
  ids = host_values(input_ids)
  if ids is None or ids.size == 0:
    return
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    pos = _first(bad)
    raise ValueError(
        f"{name}: expected values in [0, vocab_size={vocab_size}), found "
        f"{ids[pos]} at position {pos} ({int(bad.sum())} out of range)")


def check_mask_values(attention_mask: Any) -> None:
  """Raises ValueError when a concrete mask holds values other than 0 and 1.

  The model reads the mask as bool (1 = token, 0 = padding); a value like 2,
  0.5 or -inf (an additive mask) means something else and is refused.
  Skipped for traced masks (see `host_values`).
  """
  if getattr(attention_mask, "dtype", None) == bool:
    return  # nothing to check, nothing to copy
  mask = host_values(attention_mask)
  if mask is None or mask.size == 0:
    return
  bad = (mask != 0) & (mask != 1)
  if bad.any():
    pos = _first(bad)
    raise ValueError(
        f"attention_mask: expected 0/1 or bool values (1 = token, 0 = "
        f"padding), found {mask[pos]} at position {pos} (an additive 0/-inf "
        f"mask is not accepted)")


def segment_positions(segment_ids: Array) -> Array:
  """Positions that restart at 0 at the start of every packed document."""
  b, t = segment_ids.shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  start = jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - first


class Media(NamedTuple):
  """The images and videos of a call, checked (`check_media`).

  Attributes:
    image_grid, video_grid: int64 [k, 3] host grids, or None.
    any: whether the call carries images or videos.
  """
  image_grid: np.ndarray | None
  video_grid: np.ndarray | None
  any: bool


def check_media(cfg: QwenConfig, input_ids: Any, pixel_values: Any = None,
                image_grid_thw: Any = None, pixel_values_videos: Any = None,
                video_grid_thw: Any = None, image_features: Any = None,
                video_features: Any = None, need_grids: bool = True
                ) -> Media:
  """Checks a call's images and videos against the config and the ids.

  Everything is checked before any work: that the model has a tower and
  the placeholder, that grids are host data of the right form, that the
  pixel values have the tower's width and as many rows as the grids have
  patches, and, when the ids are concrete, that the prompt holds one
  placeholder per feature (and that each run of them fits the grids).

  Args:
    cfg: the model config.
    input_ids: [b, t] ids (concrete or traced).
    pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
    image_features, video_features: as `Qwen35.__call__` takes them.
    need_grids: whether the positions will be computed from the grids (no
      explicit positions), so features need their grids too.

  Returns:
    A `Media`: the grids as int64 NumPy arrays (None where not given).

  Raises:
    ValueError: naming the argument, the expected and the found value.
  """
  given = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
           "pixel_values_videos": pixel_values_videos,
           "video_grid_thw": video_grid_thw,
           "image_features": image_features,
           "video_features": video_features}
  given = {k: v for k, v in given.items() if v is not None}
  if not given:
    return Media(None, None, False)
  first = next(iter(given))
  if cfg.vision is None:
    raise ValueError(
        f"{first}: expected no images or videos for a text-only model "
        f"(QwenConfig.vision is None), found {_describe(given[first])}; "
        f"load a multimodal checkpoint or give the config a vision tower")
  m = cfg.vision.spatial_merge_size
  ids = host_values(input_ids)
  grids = {}
  for kind, pixels, grid_name, pixel_name, feats, feats_name, token in (
      ("image", pixel_values, "image_grid_thw", "pixel_values",
       image_features, "image_features", "image_token_id"),
      ("video", pixel_values_videos, "video_grid_thw", "pixel_values_videos",
       video_features, "video_features", "video_token_id")):
    grid = given.get(grid_name)
    if pixels is None and feats is None and grid is None:
      continue
    token_id = getattr(cfg, token)
    if token_id is None:
      name = pixel_name if pixels is not None else (
          feats_name if feats is not None else grid_name)
      raise ValueError(
          f"{name}: expected no {kind}s: the model has no {kind} "
          f"placeholder ({token} is None in its config), found "
          f"{_describe(given[name])}")
    if pixels is not None and feats is not None:
      raise ValueError(f"{feats_name}: expected either {pixel_name} or "
                       f"{feats_name}, found both")
    if pixels is not None and grid is None:
      raise ValueError(f"{grid_name}: expected the (t, h, w) patch grid of "
                       f"each {kind} of {pixel_name}, found None")
    if grid is None and feats is not None and need_grids:
      raise ValueError(f"{grid_name}: expected the (t, h, w) patch grid of "
                       f"each {kind} for the positions (or pass positions),"
                       f" found None")
    if grid is not None and pixels is None and feats is None:
      raise ValueError(f"{pixel_name}: expected the patches of the {kind}s "
                       f"of {grid_name}, found None")
    if grid is not None:
      grid = vision_lib.check_grid_thw(grid, m, grid_name)
    if pixels is not None:
      shape = tuple(np.shape(pixels))
      width = cfg.vision.patch_dim
      if len(shape) != 2 or shape[1] != width:
        raise ValueError(
            f"{pixel_name}: expected shape [n_patches, {width}] (in_channels "
            f"* temporal_patch_size * patch_size^2 = {cfg.vision.in_channels}"
            f" * {cfg.vision.temporal_patch_size} * "
            f"{cfg.vision.patch_size}^2), found {shape}")
      patches = int(grid.prod(axis=1).sum())
      if shape[0] != patches:
        raise ValueError(
            f"{grid_name}: expected its patches (sum of t * h * w = "
            f"{patches}) to equal {pixel_name}' rows, found {shape[0]} rows "
            f"for {grid_name} {grid.tolist()}")
      count = patches // (m * m)
    else:
      shape = tuple(np.shape(feats))
      if len(shape) != 2 or shape[1] != cfg.hidden_size:
        raise ValueError(f"{feats_name}: expected shape [n, hidden_size="
                         f"{cfg.hidden_size}], found {shape}")
      count = shape[0]
      if grid is not None and int(grid.prod(axis=1).sum()) // (m * m) != (
          count):
        raise ValueError(
            f"{feats_name}: expected one row per merged token of "
            f"{grid_name} ({int(grid.prod(axis=1).sum()) // (m * m)}), "
            f"found {count}")
    if ids is not None:
      found = int(np.sum(ids == token_id))
      if found != count:
        source = (f"{grid_name} {grid.tolist()}" if grid is not None
                  else feats_name)
        raise ValueError(
            f"input_ids: expected {count} {token} ({token_id}) placeholders,"
            f" one per {kind} feature of {source} ({count} features), found "
            f"{found} placeholders")
    grids[kind] = grid
  return Media(grids.get("image"), grids.get("video"), True)


def _describe(x: Any) -> str:
  shape = getattr(x, "shape", None)
  if shape is None:
    try:
      shape = np.shape(x)
    except (TypeError, ValueError):
      return type(x).__name__
  return f"an array of shape {tuple(shape)}"


def check_placeholder_runs(cfg: QwenConfig, input_ids: Any,
                           attention_mask: Any, media: Media) -> None:
  """When ids and mask are concrete: every run of placeholders fits the
  grids, in order (`mrope.multimodal_positions` names what does not).
  Needs all four placeholder ids; skipped otherwise."""
  ids = host_values(input_ids)
  mask = None if attention_mask is None else host_values(attention_mask)
  if ids is None or (attention_mask is not None and mask is None):
    return
  values = {f: getattr(cfg, f) for f in VISION_TOKEN_FIELDS}
  if None in values.values() or len(set(values.values())) != 4:
    return
  mrope.multimodal_positions(
      ids, media.image_grid, media.video_grid, mask,
      spatial_merge_size=cfg.vision.spatial_merge_size,
      tokens=vision_lib.VisionTokens(**values))


def media_positions(cfg: QwenConfig, input_ids: Array,
                     attention_mask: Array | None, media: Media,
                     cache_index: Array | None, rope_delta: Array | None
                     ) -> tuple[Array, Array]:
  """(positions [3, b, t], rope_delta [b]) of a call with images/videos.

  Without a cache: transformers' `get_rope_index` of the tokens. With one,
  this call's tokens continue the cached ones: their positions are offset
  by the real tokens already cached plus the cached rope_delta, and the
  returned rope_delta adds this call's.
  """
  b, t = input_ids.shape
  mask = attention_mask
  if mask is not None and cache_index is not None:
    mask = jax.lax.dynamic_slice_in_dim(attention_mask, cache_index, t, 1)
  check_placeholder_runs(cfg, input_ids, mask, media)
  positions, delta = mrope.mrope_positions(
      input_ids, mask, media.image_grid, media.video_grid,
      spatial_merge_size=cfg.vision.spatial_merge_size,
      image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
  if cache_index is None:
    return positions, delta
  before = _tokens_before(b, attention_mask, cache_index)
  if rope_delta is not None:
    before = before + rope_delta
    delta = delta + rope_delta
  return positions + before[None, :, None], delta


def _tokens_before(b: int, attention_mask: Array | None,
                   cache_index: Array) -> Array:
  """[b] real (unmasked) tokens in the cache slots before cache_index."""
  if attention_mask is None:
    return jnp.full((b,), cache_index, jnp.int32)
  slots = jnp.arange(attention_mask.shape[1])
  return jnp.sum(attention_mask & (slots < cache_index)[None], axis=1,
                 dtype=jnp.int32)


def _text_positions(shape: tuple[int, int], attention_mask: Array | None,
                    cache_index: Array, rope_delta: Array) -> Array:
  """[b, t] positions of text that follows cached multimodal tokens: the
  real tokens before each plus the row's rope_delta (transformers'
  cumsum(mask) - 1 + rope_deltas)."""
  b, t = shape
  if attention_mask is None:
    before = jnp.full((b, t), cache_index, jnp.int32) + jnp.arange(
        t, dtype=jnp.int32)
  else:
    seen = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1)
    before = jax.lax.dynamic_slice_in_dim(seen, cache_index, t, 1) - 1
  return before + rope_delta[:, None].astype(jnp.int32)


def _scatter(x: Array, placeholders: Array, features: Array) -> Array:
  """x with the placeholders' rows replaced by the features, in reading
  order (row by row; transformers' `masked_scatter`)."""
  n = features.shape[0]
  if n == 0:
    return x
  b, t = placeholders.shape
  k = jnp.cumsum(placeholders.reshape(-1).astype(jnp.int32)) - 1
  k = jnp.clip(k, 0, n - 1).reshape(b, t)
  return jnp.where(placeholders[..., None],
                   features.astype(x.dtype)[k], x)


class DecoderLayer(nn.Module):
  """Pre-norm residual block: token mixer then SwiGLU MLP.

  Attributes:
    cfg: the model config.
    layer_type: LINEAR ("linear_attention") or FULL ("full_attention").
    mlp_type: "dense" (SwiGLU) or "moe" (`qwen_jax.moe.SparseMoeBlock`).
  """
  cfg: QwenConfig
  layer_type: str
  mlp_type: str = "dense"

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
      attention_mask: [b, s] bool key mask, s = t without a cache and the
        cache length with one (padding = False), or None.
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
    mask = attention_mask
    if mask is not None and cache is not None:
      # The linear layer (and the router's statistics) see only this
      # call's tokens.
      mask = jax.lax.dynamic_slice_in_dim(mask, cache_index, x.shape[1], 1)
    if self.layer_type == LINEAR:
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
    if self.mlp_type == MOE:
      y = SparseMoeBlock(cfg, name="mlp")(h, mask)
    else:
      y = MLP(cfg, name="mlp")(h)
    x = x + y.astype(x.dtype)
    return x, new_cache


def _maybe_remat(cfg: QwenConfig, module_cls, scanned: bool):
  if cfg.remat_policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                  prevent_cse=not scanned)


class Period(nn.Module):
  """The layers under params['layers'] (see `stack.stack_slots`).

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
    for j, (name, layer_type) in enumerate(stack.stack_slots(self.cfg)):
      c = None if cache is None else cache[name]
      # Slot j holds layer j (scanned: of the period, which covers the MLP
      # kinds too).
      mlp_type = self.cfg.mlp_types[j]
      x, c = block(self.cfg, layer_type, mlp_type, name=name)(
          x, positions, attention_mask, c, cache_index, segment_ids)
      if cache is not None:
        new_cache[name] = c
    return x, new_cache


class Qwen35(nn.Module):
  """Qwen3.5: the causal language model, and its vision tower when
  cfg.vision is set.

  Attributes:
    cfg: the model config (validated on construction).
  """
  cfg: QwenConfig

  def __post_init__(self):
    if not isinstance(self.cfg, QwenConfig):
      raise TypeError(
          f"cfg: expected a QwenConfig, found {type(self.cfg).__name__}; "
          f"build one with QwenConfig.from_hf_config (a transformers config, "
          f"a config.json dict or its path) or QwenConfig.from_preset")
    super().__post_init__()

  def setup(self):
    self.cfg.validate()

  @nn.compact
  def __call__(self, input_ids: Array,
               attention_mask: Array | None = None,
               positions: Array | None = None,
               cache: PyTree | None = None,
               segment_ids: Array | None = None,
               return_hidden: bool = False,
               pixel_values: Array | None = None,
               image_grid_thw: Any = None,
               pixel_values_videos: Array | None = None,
               video_grid_thw: Any = None,
               image_features: Array | None = None,
               video_features: Array | None = None):
    """Runs the model.

    Shapes are always checked. Values (ids in the vocabulary, a 0/1 mask,
    the cache index against the cache's slots) are checked only when they
    are concrete: under jit (or any other transform) they are Tracers and
    nothing is checked, since that would need a host sync inside the
    program. There, ids outside [0, vocab_size) give NaN logits (negative
    ids wrap around), a mask is read as `mask != 0`, and a write past the
    end of the cache is clamped to its last slots: check such inputs
    before the jitted call (`generate.prefill` and `decode_step` do).

    Args:
      input_ids: [b, t] int token ids in [0, vocab_size).
      attention_mask: padding mask, 1 (or True) = token, 0 = padding (left
        padding); [b, t] without a cache; [b, S] over every cache slot with
        one ([b, >= index + t] when no layer keeps K/V). Read as bool.
      positions: [b, t] integer positions, or [3, b, t] multimodal (t, h,
        w) positions (`qwen_jax.mrope`); default arange(t) (+ the cache
        index), restarting per document when `segment_ids` is given, or,
        with images or videos, their multimodal positions (padding
        skipped, as transformers' `get_rope_index`). A cache that holds a
        multimodal prompt carries each row's offset (cache["rope_delta"],
        see Returns): text after it continues from the prompt's positions.
      cache: the model cache (`qwen_jax.cache.init_cache` for this config
        and batch) or None.
      segment_ids: [b, t] integer packed-document ids (training; not with a
        cache).
        Documents never attend to or pass state to each other.
      return_hidden: also return the final normalised hidden states.
      pixel_values: [n_patches, C*T*P*P] image patches as transformers'
        image processor returns them (`qwen_jax.load_image_processor`),
        the images of every row one after another; needs cfg.vision.
      image_grid_thw: [n_images, 3] (t, h, w) patch grid of each image:
        host data (a NumPy array, nested lists or tuples), since it fixes
        shapes. Under jit close over it, make it a static argument (a
        tuple of tuples, `qwen_jax.vision.grid_key`) or pass a
        `qwen_jax.vision.StaticGrid` (static inside a pytree); a traced
        grid is refused. One program is compiled per distinct grid set.
      pixel_values_videos, video_grid_thw: the same for videos.
      image_features, video_features: [n, d] tower outputs to use instead
        of pixel values (e.g. computed once and reused; in reading order
        of this call's placeholders). The grids are still needed for the
        positions unless `positions` is given.

    Returns:
      logits [b, t, vocab] in cfg.dtype; with a cache `(logits, cache)`;
      with return_hidden the hidden states [b, t, d] are appended. An empty
      batch (b = 0) gives empty results (not at init). After a call with
      images or videos (positions not given), the returned cache holds
      "rope_delta" [b] int32: what each row's multimodal positions are
      ahead of (or behind) its token count, so later text tokens get
      (tokens before them) + rope_delta.

    Raises:
      ValueError: a sequence longer than max_position_embeddings, bad
        shapes, positions or segment_ids that are not integer arrays (a
        float array could hold NaN), a cache of another config or batch,
        more tokens than the cache has slots left, segment_ids together
        with a cache, and (when concrete) ids outside the vocabulary or mask
        values other than 0/1. Images and videos: given to a model without
        a tower or without that placeholder id, a grid that is traced,
        malformed or whose patches differ from the pixel rows given, pixel
        values of the wrong width, and (when the ids are concrete) a
        placeholder count that differs from the features' count, each
        naming the argument, the expected and the found value.
    """
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    input_ids = _to_array("input_ids", input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids: expected shape [batch, time], found "
                       f"{tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids: expected integer token ids, found dtype "
                       f"{input_ids.dtype}")
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
      raise ValueError(
          f"sequence length: expected at most max_position_embeddings="
          f"{cfg.max_position_embeddings}, found {t}")
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids: packed sequences cannot use a cache")
    attention_mask = _to_array("attention_mask", attention_mask)
    positions = _to_array("positions", positions)
    segment_ids = _to_array("segment_ids", segment_ids)
    cache_index = None
    if cache is not None:
      s = cache_lib.check_cache(cfg, cache, b)
      cache_index = cache["index"]
      index_dtype = getattr(cache_index, "dtype", None)
      if index_dtype is None:
        index_dtype = np.asarray(cache_index).dtype
      if not jnp.issubdtype(index_dtype, jnp.integer):
        raise ValueError(f"cache: expected an integer cache['index'] (tokens "
                         f"written), found dtype {index_dtype}")
      if s is not None and t > s:
        raise ValueError(f"input_ids: expected at most {s} tokens (the "
                         f"cache's slots), found {t}")
      index = host_values(cache_index)
      if index is not None:
        index = int(index)
        if index < 0:
          raise ValueError(f"cache: expected cache['index'] >= 0, found "
                           f"{index}")
        if s is not None and index + t > s:
          raise ValueError(
              f"input_ids: {t} tokens do not fit a cache of {s} slots "
              f"holding {index} (cache['index'] = {index})")
      if attention_mask is not None:
        shape = tuple(attention_mask.shape)
        if s is not None and shape != (b, s):
          raise ValueError(
              f"attention_mask: with a cache expected shape {(b, s)} (one "
              f"entry per cache slot), found {shape}")
        need = t if index is None else index + t
        if s is None and (len(shape) != 2 or shape[0] != b
                          or shape[1] < need):
          raise ValueError(
              f"attention_mask: with a cache expected shape ({b}, >= {need}) "
              f"(an entry per token written so far), found {shape}")
    elif attention_mask is not None and attention_mask.shape != (b, t):
      raise ValueError(f"attention_mask: expected shape {(b, t)}, found "
                       f"{tuple(attention_mask.shape)}")
    for name, x in (("positions", positions), ("segment_ids", segment_ids)):
      if (x is not None and tuple(x.shape) != (b, t) and
          not (name == "positions" and tuple(x.shape) == (3, b, t))):
        also = f" or {(3, b, t)} (multimodal)" if name == "positions" else ""
        raise ValueError(f"{name}: expected shape {(b, t)} (as input_ids)"
                         f"{also}, found {tuple(x.shape)}")
      # The dtype is known under jit too. A float array could hold NaN or
      # 2.5: NaN positions give NaN logits, and float document ids compare
      # NaN != NaN (a token that attends to nothing).
      if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
        what = "positions" if name == "positions" else "document ids"
        raise ValueError(f"{name}: expected an integer array of {what}, "
                         f"found dtype {x.dtype}")
    check_input_ids(input_ids, cfg.vocab_size)
    media = check_media(cfg, input_ids, pixel_values, image_grid_thw,
                        pixel_values_videos, video_grid_thw, image_features,
                        video_features, need_grids=positions is None)
    if media.any and segment_ids is not None and positions is None:
      raise ValueError("segment_ids: packed documents with images or videos "
                       "need their positions: pass positions ([3, b, t], "
                       "qwen_jax.mrope)")
    if attention_mask is not None:
      check_mask_values(attention_mask)
      # One meaning for both mixers: attention keeps the keys where True,
      # Gated DeltaNet zeroes the inputs where False.
      attention_mask = attention_mask.astype(bool)
    if b == 0 and not self.is_initializing():
      # Nothing to compute (the chunked delta rule cannot take 0 rows).
      out = [jnp.zeros((0, t, cfg.vocab_size), dtype)]
      if cache is not None:
        out.append(dict(cache, index=cache["index"] + t))
      if return_hidden:
        out.append(jnp.zeros((0, t, cfg.hidden_size), dtype))
      return out[0] if len(out) == 1 else tuple(out)
    if b == 0:
      raise ValueError(f"input_ids: init needs at least one row, found shape "
                       f"{(b, t)}")
    rope_delta = None if cache is None else cache.get("rope_delta")
    if positions is None:
      if media.any:
        positions, rope_delta = media_positions(
            cfg, input_ids, attention_mask, media, cache_index, rope_delta)
      elif segment_ids is not None:
        positions = segment_positions(segment_ids)
      elif rope_delta is not None:  # text after a multimodal prompt
        positions = _text_positions(input_ids.shape, attention_mask,
                                    cache_index, rope_delta)
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
    if cfg.vision is not None:
      tower = vision_lib.VisionTower(cfg.vision, name="visual")
      feats = {}
      for kind, pixels, grid, given in (
          ("image", pixel_values, media.image_grid, image_features),
          ("video", pixel_values_videos, media.video_grid, video_features)):
        if pixels is not None:
          feats[kind] = tower(pixels, vision_lib.grid_key(grid))
        elif given is not None:
          feats[kind] = jnp.asarray(given)
      if self.is_initializing() and not feats:
        # Create the tower's parameters from a one-token image.
        m = cfg.vision.spatial_merge_size
        tower(jnp.zeros((m * m, cfg.vision.patch_dim), dtype),
              ((1, m, m),))
      if "image" in feats:
        x = _scatter(x, input_ids == cfg.image_token_id, feats["image"])
      if "video" in feats:
        x = _scatter(x, input_ids == cfg.video_token_id, feats["video"])

    layer_cache = None if cache is None else cache["layers"]
    new_layers = None
    if stack.is_scanned(cfg):
      scan = nn.scan(
          _maybe_remat(cfg, Period, scanned=True),
          # "intermediates": the router statistics MoE layers sow.
          variable_axes={"params": 0, "intermediates": 0},
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
      new_cache = {"layers": new_layers, "index": cache["index"] + t}
      if rope_delta is not None:
        new_cache["rope_delta"] = rope_delta
      out.append(new_cache)
    if return_hidden:
      out.append(hidden)
    return out[0] if len(out) == 1 else tuple(out)
