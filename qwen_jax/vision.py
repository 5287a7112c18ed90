"""The Qwen3.5 vision tower: `VisionConfig`, `VisionTower` and its weight map.

The tower of transformers' `Qwen3_5VisionModel` (Qwen3-VL's tower without
DeepStack), for flattened patches as the image processor hands them over:

  x       = patches [n, C*T*P*P] . W_patch + b   (a Conv3d with kernel =
                                                  stride = (T, P, P))
  x       = x + bilerp(pos_table, grid)          learned square table of
                                                  num_position_embeddings
                                                  entries, resampled to each
                                                  image's (h, w) patch grid
                                                  (align_corners=True)
  repeat depth times (pre-norm, LayerNorm with bias, eps 1e-6):
    x     = x + Attn(LN(x))    fused qkv; 2D rotary over (row, col); every
                               image or video frame attends only to itself
    x     = x + MLP(LN(x))     fc1 -> GELU (tanh approximation) -> fc2
  merged  = fc2(GELU(fc1(LN(x) viewed [n / m^2, m^2 * D])))   exact GELU

Patches arrive in merge-block order (for each m x m block of the patch grid,
its m^2 patches are consecutive), so the 2x2 merge is a reshape.

Grids are static. `grid_thw` ([n_images, 3]: frames, patch rows, patch
columns) fixes every shape (patches in, merged tokens out) and the attention
segments, so it must be concrete host data (a NumPy array, a list or a
tuple), never a traced array: the position-table taps and weights, the
rotary angles, the segment ids and the attention plan are computed from it
with NumPy and enter the program as constants. Under `jax.jit` pass it as a
static argument (a tuple of (t, h, w) tuples is hashable; `grid_key` makes
one); `encode` does this and keeps one compiled program per distinct grid
set. To bound recompilation, resize inputs to a few fixed sizes.

Attention is packed: the patches of all images stay in one sequence with a
segment id per image or frame, queries go in blocks of `attention_block`,
and each block attends to the window of keys that its segments span
(`attention_plan`), masked by segment id. Cost is about n x (window) per
head instead of n^2, and no [n, n] mask is built.

Parameters (float32 unless `param_dtype` says otherwise) mirror transformers'
names: patch_embed/proj, pos_embed, blocks_{i}/{norm1, attn/{qkv, proj},
norm2, mlp/{linear_fc1, linear_fc2}}, merger/{norm, linear_fc1,
linear_fc2}. `vision_weight_map` lists each against its name under
`model.visual.` in a transformers checkpoint.

Placeholder token ids live in `VisionTokens`, not in `VisionConfig`: in a
transformers checkpoint they sit in the top-level config, beside
`vision_config`, and the tower never reads them (the prompt positions and
placeholder expansion do), so `VisionConfig` round-trips `vision_config`
exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.array_typing import Array

# transformers' model_type of `vision_config` (old checkpoints wrote the
# top-level "qwen3_5", which transformers also accepts).
VISION_MODEL_TYPE = "qwen3_5_vision"
_ACCEPTED_MODEL_TYPES = (VISION_MODEL_TYPE, "qwen3_5", "qwen3_5_moe_vision",
                         "qwen3_5_moe")
# Epsilon of every LayerNorm of the tower (fixed in transformers, not a
# config field).
LAYER_NORM_EPS = 1e-6
# hidden_act values and whether GELU uses the tanh approximation.
_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu": False}
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# VisionConfig fields that change how, not what, is computed.
VISION_IMPLEMENTATION_FIELDS = ("dtype", "param_dtype", "attention_block")
_INT_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads",
               "in_channels", "patch_size", "temporal_patch_size",
               "spatial_merge_size", "out_hidden_size",
               "num_position_embeddings", "attention_block")
_NEG = -1e30


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(
      x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Hyperparameters of the vision tower (transformers' Qwen3_5VisionConfig).

  Attributes:
    depth: number of blocks.
    hidden_size: tower width D.
    intermediate_size: MLP width.
    num_heads: attention heads (head dim = hidden_size / num_heads, a
      multiple of 4 for the 2D rotary).
    in_channels: image channels C.
    patch_size: spatial patch side P.
    temporal_patch_size: frames per patch T (an image is repeated T times).
    spatial_merge_size: m; m x m patches merge into one language token.
    out_hidden_size: merger output width (the language model's width).
    num_position_embeddings: entries of the learned position table, a
      square number (side x side).
    hidden_act: block MLP activation, "gelu_pytorch_tanh" or "gelu".
    rope_theta: base of the 2D rotary embedding.
    dtype: compute dtype name.
    param_dtype: parameter dtype name.
    attention_block: queries per block of the packed attention (memory
      per head ~ attention_block x the key window).
  """

  depth: int = 27
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  out_hidden_size: int = 3584
  num_position_embeddings: int = 2304
  hidden_act: str = "gelu_pytorch_tanh"
  rope_theta: float = 10000.0
  # Implementation choices (no effect on the math).
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_block: int = 512

  def __post_init__(self):
    def bad(field, expected, found):
      raise ValueError(f"{field}: expected {expected}, found {found!r}")

    for f in _INT_FIELDS:
      x = getattr(self, f)
      if not _is_int(x) or x < 1:
        bad(f, "a positive integer", x)
      object.__setattr__(self, f, int(x))
    x = self.rope_theta
    if (isinstance(x, (bool, np.bool_)) or not isinstance(
        x, (int, float, np.integer, np.floating)) or not math.isfinite(x)
        or x <= 0):
      bad("rope_theta", "a finite number > 0", x)
    object.__setattr__(self, "rope_theta", float(x))
    if self.hidden_act not in _ACTIVATIONS:
      bad("hidden_act", f"one of {tuple(_ACTIVATIONS)}", self.hidden_act)
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in _FLOAT_DTYPES:
        bad(f, f"one of {_FLOAT_DTYPES}", getattr(self, f))
    if self.hidden_size % self.num_heads:
      bad("hidden_size", f"a multiple of num_heads={self.num_heads}",
          self.hidden_size)
    if self.head_dim % 4:
      raise ValueError(
          f"num_heads: expected a head dim (hidden_size / num_heads) "
          f"divisible by 4 for the 2D rotary, hidden_size="
          f"{self.hidden_size}, found {self.num_heads} (head dim "
          f"{self.head_dim})")
    side = math.isqrt(self.num_position_embeddings)
    if side * side != self.num_position_embeddings:
      bad("num_position_embeddings", "a square number (side x side table)",
          self.num_position_embeddings)

  # ---------------------------------------------------------------- derived
  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Width of one flattened patch: C * T * P * P."""
    return (self.in_channels * self.temporal_patch_size *
            self.patch_size * self.patch_size)

  @property
  def position_side(self) -> int:
    return math.isqrt(self.num_position_embeddings)

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  def replace(self, **changes: Any) -> "VisionConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count from the shapes alone."""
    d, i, m = self.hidden_size, self.intermediate_size, self.merge_unit
    block = (4 * d + 3 * d * d + 3 * d + d * d + d + d * i + i + i * d + d)
    merged = m * d
    return (self.patch_dim * d + d + self.num_position_embeddings * d +
            self.depth * block + 2 * d + merged * merged + merged +
            merged * self.out_hidden_size + self.out_hidden_size)

  # ---------------------------------------------------------------- presets
  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> "VisionConfig":
    """A named preset (see `VISION_PRESETS`), with fields overridden."""
    if name not in VISION_PRESETS:
      raise ValueError(f"preset: expected one of {sorted(VISION_PRESETS)}, "
                       f"found {name!r}")
    return VISION_PRESETS[name].replace(**overrides)

  # ---------------------------------------------------- Hugging Face config
  @classmethod
  def from_hf_dict(cls, vision_config: Any, **overrides: Any
                   ) -> "VisionConfig":
    """From a checkpoint's `vision_config` (a dict or a transformers config).

    Fields absent from the dict take transformers' defaults (the dataclass
    defaults). Keys that do not shape the tower (initializer_range, dtype,
    ...) are ignored.

    Raises:
      ValueError: another model_type, a rope type other than "axial",
        DeepStack layers (`deepstack_visual_indexes` non-empty; Qwen3.5 has
        none), a non-square patch, or a bad field value (named).
    """
    if not isinstance(vision_config, Mapping):
      if not hasattr(vision_config, "to_dict"):
        raise ValueError(f"vision_config: expected a dict or a transformers "
                         f"config, found {type(vision_config).__name__}")
      vision_config = vision_config.to_dict()
    d = dict(vision_config)
    mt = d.get("model_type", VISION_MODEL_TYPE)
    if mt not in _ACCEPTED_MODEL_TYPES:
      raise ValueError(f"vision_config.model_type: expected one of "
                       f"{_ACCEPTED_MODEL_TYPES}, found {mt!r}")
    deepstack = d.get("deepstack_visual_indexes") or []
    if deepstack:
      raise ValueError(f"vision_config.deepstack_visual_indexes: expected "
                       f"none (Qwen3.5 has no DeepStack), found {deepstack!r}")
    rope = d.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
      raise ValueError(f"vision_config.rope_parameters: expected an object, "
                       f"found {rope!r}")
    rope_type = rope.get("rope_type", "axial")
    if rope_type != "axial":
      raise ValueError(f"vision_config.rope_parameters.rope_type: expected "
                       f"'axial', found {rope_type!r}")
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name in d and f.name not in VISION_IMPLEMENTATION_FIELDS + (
          "rope_theta",):
        kw[f.name] = d[f.name]
    for key in ("patch_size", "temporal_patch_size"):
      x = kw.get(key)
      if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
          raise ValueError(f"vision_config.{key}: expected one size (square "
                           f"patches), found {x!r}")
        kw[key] = x[0]
    if "rope_theta" in rope:
      kw["rope_theta"] = rope["rope_theta"]
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """The `vision_config` object of a transformers Qwen3.5 config.json."""
    return {
        "model_type": VISION_MODEL_TYPE,
        "depth": self.depth,
        "hidden_size": self.hidden_size,
        "hidden_act": self.hidden_act,
        "intermediate_size": self.intermediate_size,
        "num_heads": self.num_heads,
        "in_channels": self.in_channels,
        "patch_size": self.patch_size,
        "spatial_merge_size": self.spatial_merge_size,
        "temporal_patch_size": self.temporal_patch_size,
        "out_hidden_size": self.out_hidden_size,
        "num_position_embeddings": self.num_position_embeddings,
        "rope_parameters": {"rope_type": "axial",
                            "rope_theta": self.rope_theta},
    }


def _tower(depth, hidden, inter, heads, out):
  return VisionConfig(
      depth=depth, hidden_size=hidden, intermediate_size=inter,
      num_heads=heads, in_channels=3, patch_size=16, temporal_patch_size=2,
      spatial_merge_size=2, out_hidden_size=out,
      num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
      rope_theta=10000.0)


# Towers of the released checkpoints (their config.json `vision_config`;
# out_hidden_size is the language model's width). The 2B tower is taken to
# be the 4B's (depth 24, width 1024) with a 2048-wide output: check it
# against the checkpoint's config.json (`VisionConfig.from_hf_dict` reads
# the real one).
VISION_PRESETS: dict[str, VisionConfig] = {
    "qwen3.5-0.8b": _tower(12, 768, 3072, 12, 1024),
    "qwen3.5-2b": _tower(24, 1024, 4096, 16, 2048),
    "qwen3.5-4b": _tower(24, 1024, 4096, 16, 2560),
    "qwen3.5-9b": _tower(27, 1152, 4304, 16, 4096),
    # Tests and CPU demos: the same structure at a few kilobytes (4 x 4
    # position table, 4-pixel patches; the output matches the text "tiny").
    "tiny": VisionConfig(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
        in_channels=3, patch_size=4, temporal_patch_size=2,
        spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16),
}


@dataclasses.dataclass(frozen=True)
class VisionTokens:
  """Placeholder tokens of images and videos in a prompt.

  Defaults are transformers' `Qwen3_5Config` ids and the Qwen3-VL
  processor's token strings.

  Attributes:
    image_token_id: one per merged image token (`<|image_pad|>`).
    video_token_id: one per merged video token (`<|video_pad|>`).
    vision_start_token_id: opens an image or a video frame.
    vision_end_token_id: closes it.
    image_token, video_token, vision_start_token, vision_end_token: the
      same as text.
  """

  image_token_id: int = 248056
  video_token_id: int = 248057
  vision_start_token_id: int = 248053
  vision_end_token_id: int = 248054
  image_token: str = "<|image_pad|>"
  video_token: str = "<|video_pad|>"
  vision_start_token: str = "<|vision_start|>"
  vision_end_token: str = "<|vision_end|>"

  def __post_init__(self):
    ids = ("image_token_id", "video_token_id", "vision_start_token_id",
           "vision_end_token_id")
    for f in ids:
      x = getattr(self, f)
      if not _is_int(x) or x < 0:
        raise ValueError(f"{f}: expected an integer >= 0, found {x!r}")
      object.__setattr__(self, f, int(x))
    values = [getattr(self, f) for f in ids]
    if len(set(values)) != len(values):
      raise ValueError(f"token ids: expected four different ids, found "
                       f"{dict(zip(ids, values))}")
    for f in ("image_token", "video_token", "vision_start_token",
              "vision_end_token"):
      if not isinstance(getattr(self, f), str) or not getattr(self, f):
        raise ValueError(f"{f}: expected a non-empty string, found "
                         f"{getattr(self, f)!r}")

  @classmethod
  def from_hf_dict(cls, config: Any) -> "VisionTokens":
    """From a top-level Qwen3.5 config (dict or transformers config)."""
    if not isinstance(config, Mapping):
      config = config.to_dict()
    kw = {f: config[f] for f in ("image_token_id", "video_token_id",
                                 "vision_start_token_id",
                                 "vision_end_token_id") if f in config}
    return cls(**kw)


# ------------------------------------------------------------------ grids
def check_grid_thw(grid_thw: Any, spatial_merge_size: int,
                   name: str = "grid_thw") -> np.ndarray:
  """grid_thw as an int64 NumPy array [k, 3], or ValueError naming `name`.

  Args:
    grid_thw: (frames, patch rows, patch columns) per image or video, as
      concrete host data (NumPy, a list, a tuple, a concrete jax array).
    spatial_merge_size: m; rows and columns must be multiples of m.
    name: the argument's name for errors.

  Raises:
    ValueError: a traced array (shapes depend on it), a shape other than
      [k, 3], non-integers, entries < 1 or rows/columns not multiples of m.
  """
  if isinstance(grid_thw, jax.core.Tracer):
    raise ValueError(
        f"{name}: expected concrete host values (a NumPy array or a tuple; "
        f"it fixes the shapes), found a traced array; pass it as a static "
        f"argument of jit (see vision.grid_key)")
  try:
    g = np.asarray(grid_thw)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name}: expected an integer array [k, 3], found "
                     f"{type(grid_thw).__name__} ({e})") from None
  if g.ndim != 2 or g.shape[1] != 3:
    raise ValueError(f"{name}: expected shape [num_images, 3] (t, h, w), "
                     f"found {g.shape}")
  if g.size and not np.issubdtype(g.dtype, np.integer):
    if not (np.issubdtype(g.dtype, np.floating) and
            np.all(g == np.round(g))):
      raise ValueError(f"{name}: expected integers, found dtype {g.dtype}")
  g = g.astype(np.int64)
  if (g < 1).any():
    i = tuple(int(x) for x in np.argwhere(g < 1)[0])
    raise ValueError(f"{name}: expected entries >= 1, found {int(g[i])} at "
                     f"{i}")
  m = spatial_merge_size
  bad = (g[:, 1:] % m) != 0
  if bad.any():
    i = int(np.argwhere(bad)[0][0])
    raise ValueError(f"{name}: expected h and w multiples of "
                     f"spatial_merge_size={m}, found "
                     f"{tuple(int(x) for x in g[i])} at row {i}")
  return g


def grid_key(grid_thw: Any) -> tuple[tuple[int, int, int], ...]:
  """A hashable form of grid_thw for jit's static arguments."""
  return tuple((int(t), int(h), int(w)) for t, h, w in np.asarray(grid_thw))


class StaticGrid:
  """A grid_thw that rides through jit as static data inside a pytree.

  A pytree node with no leaves: the grid is part of the tree's structure,
  so a jitted function that takes it (say in a training batch dict) is
  traced once per distinct grid and sees the values, not a Tracer.
  `np.asarray` gives the [k, 3] int64 grid back.

  Attributes:
    value: the grid as a tuple of (t, h, w) tuples (`grid_key`).
  """

  __slots__ = ("value",)

  def __init__(self, grid_thw: Any):
    self.value = grid_key(grid_thw.value if isinstance(grid_thw, StaticGrid)
                          else np.asarray(grid_thw).reshape(-1, 3))

  def __array__(self, dtype=None, copy=None):
    del copy
    return np.asarray(self.value, dtype or np.int64).reshape(-1, 3)

  def __eq__(self, other):
    return isinstance(other, StaticGrid) and other.value == self.value

  def __hash__(self):
    return hash(self.value)

  def __repr__(self):
    return f"StaticGrid({list(map(list, self.value))})"


jax.tree_util.register_pytree_node(
    StaticGrid, lambda g: ((), g.value), lambda value, _: StaticGrid(value))


def num_merged_tokens(grid_thw: Any, spatial_merge_size: int) -> np.ndarray:
  """Language-model tokens per image or video: t * h * w / m^2."""
  g = check_grid_thw(grid_thw, spatial_merge_size)
  return g.prod(axis=1) // spatial_merge_size ** 2


def split_features(features: Array, grid_thw: Any,
                   spatial_merge_size: int) -> list[Array]:
  """The tower's output [n_merged, d] split per image or video."""
  counts = num_merged_tokens(grid_thw, spatial_merge_size)
  return list(jnp.split(features, np.cumsum(counts)[:-1], axis=0))


def _patch_rows_cols(t: int, h: int, w: int, m: int):
  """(row, col) of each patch of one grid, in merge-block order, t times."""
  br, bc, ir, ic = np.meshgrid(np.arange(h // m), np.arange(w // m),
                               np.arange(m), np.arange(m), indexing="ij")
  rows = (br * m + ir).reshape(-1)
  cols = (bc * m + ic).reshape(-1)
  return np.tile(rows, t), np.tile(cols, t)


def _axis_taps(index: np.ndarray, size: int, side: int):
  """Bilinear taps (2) and weights into a `side` table, align_corners=True."""
  src = index.astype(np.float64) * (side - 1) / max(size - 1, 1)
  lo = np.floor(src)
  frac = src - lo
  lo = lo.astype(np.int64)
  taps = np.stack([lo, lo + 1], axis=-1).clip(0, side - 1)
  weights = np.stack([1.0 - frac, frac], axis=-1)
  return taps, weights


class VisionPlan(NamedTuple):
  """Host-side (NumPy) data derived from a static grid.

  Attributes:
    pos_index: [n, 4] rows of the position table per patch.
    pos_weight: [n, 4] bilinear weights.
    rows, cols: [n] patch row and column (2D rotary positions).
    cu_seqlens: [segments + 1] segment bounds (one segment per frame).
  """
  pos_index: np.ndarray
  pos_weight: np.ndarray
  rows: np.ndarray
  cols: np.ndarray
  cu_seqlens: np.ndarray


def vision_plan(vcfg: VisionConfig, grid_thw: Any) -> VisionPlan:
  """Position-table taps, rotary positions and segments for a grid."""
  g = check_grid_thw(grid_thw, vcfg.spatial_merge_size)
  side, m = vcfg.position_side, vcfg.spatial_merge_size
  idx, wts, rows, cols, lens = [], [], [], [], []
  for t, h, w in g:
    r, c = _patch_rows_cols(int(t), int(h), int(w), m)
    ht, hw = _axis_taps(r, int(h), side)
    wt, ww = _axis_taps(c, int(w), side)
    idx.append((ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4))
    wts.append((hw[:, :, None] * ww[:, None, :]).reshape(-1, 4))
    rows.append(r)
    cols.append(c)
    lens += [int(h * w)] * int(t)
  return VisionPlan(
      pos_index=np.concatenate(idx).astype(np.int32),
      pos_weight=np.concatenate(wts).astype(np.float32),
      rows=np.concatenate(rows).astype(np.int32),
      cols=np.concatenate(cols).astype(np.int32),
      cu_seqlens=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))


# -------------------------------------------------------------- attention
class AttentionPlan(NamedTuple):
  """Static tiling of a packed attention (see `attention_plan`).

  Attributes:
    block: queries per block.
    window: keys each block reads.
    key_starts: [num_blocks] first key of each block's window.
    segment_ids: [n] segment of each token.
  """
  block: int
  window: int
  key_starts: np.ndarray
  segment_ids: np.ndarray


def attention_plan(cu_seqlens: Sequence[int], block: int) -> AttentionPlan:
  """Key windows of query blocks over packed segments.

  The segments are contiguous: segment s holds tokens [cu[s], cu[s + 1]).
  Block j holds queries [j B, (j + 1) B); its keys lie between the start of
  its first query's segment and the end of its last query's segment. Every
  block reads the same number of keys (the widest such span) from its own
  start, so the blocks run as one `lax.map`.

  Args:
    cu_seqlens: segment bounds, starting at 0, increasing.
    block: queries per block (clipped to the sequence).

  Returns:
    The plan.
  """
  cu = np.asarray(cu_seqlens, np.int64)
  n = int(cu[-1])
  lens = np.diff(cu)
  if n < 1 or (lens < 1).any():
    raise ValueError(f"cu_seqlens: expected increasing bounds from 0, found "
                     f"{cu.tolist()}")
  seg = np.repeat(np.arange(len(lens)), lens)
  b = min(block, n)
  nb = -(-n // b)
  first = np.arange(nb) * b
  last = np.minimum(first + b, n) - 1
  lo = cu[seg[first]]
  hi = cu[seg[last] + 1]
  window = int((hi - lo).max())
  starts = np.minimum(lo, n - window)
  return AttentionPlan(b, window, starts.astype(np.int32),
                       seg.astype(np.int32))


def packed_attention(q: Array, k: Array, v: Array,
                     plan: AttentionPlan) -> Array:
  """Softmax attention within segments of a packed sequence.

  Args:
    q: [n, h, e] queries, already scaled; k, v: [n, h, e].
    plan: from `attention_plan` for these n tokens.

  Returns:
    [n, h, e] in v.dtype; token i attends to the tokens of its segment.
  """
  n, h, e = q.shape
  b, w = plan.block, plan.window
  nb = len(plan.key_starts)
  seg = jnp.asarray(plan.segment_ids)
  pad = nb * b - n
  qs = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(nb, b, h, e)
  q_seg = jnp.pad(seg, (0, pad), constant_values=-1).reshape(nb, b)

  def one(args):
    qb, sb, start = args
    kb = jax.lax.dynamic_slice_in_dim(k, start, w, 0)
    vb = jax.lax.dynamic_slice_in_dim(v, start, w, 0)
    kseg = jax.lax.dynamic_slice_in_dim(seg, start, w, 0)
    s = jnp.einsum("qhe,khe->hqk", qb, kb,
                   preferred_element_type=jnp.float32)
    s = jnp.where((sb[:, None] == kseg[None, :])[None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(vb.dtype)
    return jnp.einsum("hqk,khe->qhe", p, vb,
                      preferred_element_type=jnp.float32).astype(v.dtype)

  starts = jnp.asarray(plan.key_starts)
  if nb == 1:
    o = one((qs[0], q_seg[0], starts[0]))[None]
  else:
    o = jax.lax.map(one, (qs, q_seg, starts))
  return o.reshape(nb * b, h, e)[:n]


# ---------------------------------------------------------------- rotary
def vision_rope_cos_sin(rows: np.ndarray, cols: np.ndarray, head_dim: int,
                        theta: float) -> tuple[Array, Array]:
  """2D rotary tables [n, head_dim]: [rows f, cols f, rows f, cols f].

  f has head_dim / 4 frequencies theta^(-2i / (head_dim / 2)); the result
  rotates the whole head with the half-split (NeoX) pairing.
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) /
                              half))
  fr = jnp.asarray(rows, jnp.float32)[:, None] * inv_freq
  fc = jnp.asarray(cols, jnp.float32)[:, None] * inv_freq
  ang = jnp.concatenate([fr, fc, fr, fc], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
  """x [n, h, e] rotated in float32 (cos/sin [n, e]), cast back."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  y = xf * cos[:, None, :] + rot * sin[:, None, :]
  return y.astype(x.dtype)


# ---------------------------------------------------------------- modules
def _init(init, names):
  return nn.with_logical_partitioning(init, tuple(names))


def _dense(features: int, names: tuple[str, str], vcfg: VisionConfig,
           name: str) -> nn.Dense:
  """Dense with bias, kernel [in, out] (a torch Linear transposed)."""
  return nn.Dense(
      features, use_bias=True, dtype=jnp.dtype(vcfg.dtype),
      param_dtype=jnp.dtype(vcfg.param_dtype),
      kernel_init=_init(nn.initializers.normal(0.02), names),
      bias_init=_init(nn.initializers.zeros, names[1:]), name=name)


def _layer_norm(vcfg: VisionConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=LAYER_NORM_EPS, dtype=jnp.dtype(vcfg.dtype),
      param_dtype=jnp.dtype(vcfg.param_dtype),
      scale_init=_init(nn.initializers.ones, ("norm",)),
      bias_init=_init(nn.initializers.zeros, ("norm",)), name=name)


class _Conv3dPatch(nn.Module):
  """The Conv3d of kernel = stride = (T, P, P) as one product per patch.

  Attributes:
    vcfg: the tower config.
  """
  vcfg: VisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    vcfg = self.vcfg
    dtype, pdtype = jnp.dtype(vcfg.dtype), jnp.dtype(vcfg.param_dtype)
    c, t, p = vcfg.in_channels, vcfg.temporal_patch_size, vcfg.patch_size
    # [C, T, P, P, D]: torch's [D, C, T, P, P] with the output axis last.
    kernel = self.param(
        "kernel", _init(nn.initializers.normal(0.02),
                        (None, None, None, None, "vision_embed")),
        (c, t, p, p, vcfg.hidden_size), pdtype)
    bias = self.param("bias", _init(nn.initializers.zeros, ("vision_embed",)),
                      (vcfg.hidden_size,), pdtype)
    x = x.astype(dtype).reshape(-1, c, t, p, p)
    y = jnp.einsum("nctpq,ctpqd->nd", x, kernel.astype(dtype))
    return y + bias.astype(dtype)


class PatchEmbed(nn.Module):
  """Flattened patches [n, C*T*P*P] -> [n, D] (params under `proj`).

  Attributes:
    vcfg: the tower config.
  """
  vcfg: VisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _Conv3dPatch(self.vcfg, name="proj")(x)


class VisionAttention(nn.Module):
  """Fused-qkv self-attention with 2D rotary, within segments.

  Attributes:
    vcfg: the tower config.
  """
  vcfg: VisionConfig

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array,
               plan: AttentionPlan) -> Array:
    vcfg = self.vcfg
    n, d = x.shape
    h, e = vcfg.num_heads, vcfg.head_dim
    qkv = _dense(3 * d, ("vision_embed", "vision_qkv"), vcfg, "qkv")(x)
    qkv = qkv.reshape(n, 3, h, e)  # [q | k | v], each head-major
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q = _rotate(q, cos, sin)
    k = _rotate(k, cos, sin)
    q = (q * (e ** -0.5)).astype(q.dtype)
    o = packed_attention(q, k, v, plan).reshape(n, d)
    return _dense(d, ("vision_heads", "vision_embed"), vcfg, "proj")(o)


class VisionMLP(nn.Module):
  """fc1 -> GELU -> fc2, both with bias.

  Attributes:
    vcfg: the tower config.
  """
  vcfg: VisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    vcfg = self.vcfg
    y = _dense(vcfg.intermediate_size, ("vision_embed", "vision_mlp"), vcfg,
               "linear_fc1")(x)
    y = jax.nn.gelu(y, approximate=_ACTIVATIONS[vcfg.hidden_act])
    return _dense(vcfg.hidden_size, ("vision_mlp", "vision_embed"), vcfg,
                  "linear_fc2")(y)


class VisionBlock(nn.Module):
  """Pre-norm block: packed 2D-rotary attention, then the GELU MLP.

  Attributes:
    vcfg: the tower config.
  """
  vcfg: VisionConfig

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array,
               plan: AttentionPlan) -> Array:
    vcfg = self.vcfg
    y = VisionAttention(vcfg, name="attn")(
        _layer_norm(vcfg, "norm1")(x), cos, sin, plan)
    x = x + y.astype(x.dtype)
    y = VisionMLP(vcfg, name="mlp")(_layer_norm(vcfg, "norm2")(x))
    return x + y.astype(x.dtype)


class PatchMerger(nn.Module):
  """LayerNorm, m x m patches concatenated, fc1 -> exact GELU -> fc2.

  Attributes:
    vcfg: the tower config.
  """
  vcfg: VisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    vcfg = self.vcfg
    x = _layer_norm(vcfg, "norm")(x)
    width = vcfg.merge_unit * vcfg.hidden_size
    x = x.reshape(-1, width)  # merge-block order: m^2 consecutive patches
    x = _dense(width, ("vision_merged", "vision_merged_mlp"), vcfg,
               "linear_fc1")(x)
    x = jax.nn.gelu(x, approximate=False)
    return _dense(vcfg.out_hidden_size, ("vision_merged_mlp", "embed"), vcfg,
                  "linear_fc2")(x)


class VisionTower(nn.Module):
  """Qwen3.5's vision tower: flattened patches -> language-model tokens.

  Attributes:
    vcfg: the tower config.
  """
  vcfg: VisionConfig

  def __post_init__(self):
    if not isinstance(self.vcfg, VisionConfig):
      raise TypeError(f"vcfg: expected a VisionConfig, found "
                      f"{type(self.vcfg).__name__}")
    super().__post_init__()

  @nn.compact
  def __call__(self, pixel_values: Array, grid_thw: Any) -> Array:
    """Encodes images and video frames.

    Args:
      pixel_values: [n_patches, C*T*P*P] patches as the image processor
        returns them (`pixel_values` or `pixel_values_videos`), in
        merge-block order, images one after another.
      grid_thw: [n_images, 3] (t, h, w) per image or video, in patches:
        concrete host data, static under jit (see the module docstring).

    Returns:
      [sum(t * h * w) / m^2, out_hidden_size] in vcfg.dtype: each image's
      merged tokens in order (`split_features` splits them).

    Raises:
      ValueError: a traced or malformed grid_thw, pixel_values that are
        not 2-D, of another width than C*T*P*P, or with another number of
        rows than the grid's patches.
    """
    vcfg = self.vcfg
    dtype, pdtype = jnp.dtype(vcfg.dtype), jnp.dtype(vcfg.param_dtype)
    grid = check_grid_thw(grid_thw, vcfg.spatial_merge_size)
    shape = tuple(getattr(pixel_values, "shape", ()))
    if len(shape) != 2:
      raise ValueError(f"pixel_values: expected shape [n_patches, "
                       f"{vcfg.patch_dim}], found {shape}")
    if shape[1] != vcfg.patch_dim:
      raise ValueError(
          f"pixel_values: expected width in_channels * temporal_patch_size "
          f"* patch_size^2 = {vcfg.in_channels} * "
          f"{vcfg.temporal_patch_size} * {vcfg.patch_size}^2 = "
          f"{vcfg.patch_dim}, found {shape[1]}")
    n = int(grid.prod(axis=1).sum())
    if shape[0] != n:
      raise ValueError(
          f"grid_thw: expected its patches (sum of t * h * w = {n}) to equal "
          f"pixel_values' rows, found {shape[0]} rows for grid_thw "
          f"{grid.tolist()}")
    plan = vision_plan(vcfg, grid)
    attn = attention_plan(plan.cu_seqlens, vcfg.attention_block)

    x = PatchEmbed(vcfg, name="patch_embed")(jnp.asarray(pixel_values))
    table = nn.Embed(
        vcfg.num_position_embeddings, vcfg.hidden_size, dtype=dtype,
        param_dtype=pdtype,
        embedding_init=_init(nn.initializers.normal(0.02),
                             ("vision_positions", "vision_embed")),
        name="pos_embed")
    # Bilinear resampling of the table: 4 weighted rows per patch (one
    # gather per tap, so no [n, 4, D] intermediate).
    for j in range(4):
      x = x + (jnp.asarray(plan.pos_weight[:, j:j + 1], dtype) *
               table(jnp.asarray(plan.pos_index[:, j])))

    cos, sin = vision_rope_cos_sin(plan.rows, plan.cols, vcfg.head_dim,
                                   vcfg.rope_theta)
    for i in range(vcfg.depth):
      x = VisionBlock(vcfg, name=f"blocks_{i}")(x, cos, sin, attn)
    return PatchMerger(vcfg, name="merger")(x)


# ------------------------------------------------------------- programs
@functools.partial(jax.jit, static_argnames=("vcfg",))
def _init_program(vcfg, key):
  m = vcfg.spatial_merge_size
  pixels = jnp.zeros((m * m, vcfg.patch_dim), jnp.float32)
  return VisionTower(vcfg).init(key, pixels, ((1, m, m),))


def init_params(vcfg: VisionConfig, key: Array) -> dict:
  """Random parameters (unboxed) of the tower, from a one-image grid."""
  return nn.meta.unbox(_init_program(vcfg, key))["params"]


def param_shapes(vcfg: VisionConfig) -> dict:
  """The tower's parameter tree as ShapeDtypeStructs (nothing allocated)."""
  m = vcfg.spatial_merge_size
  pixels = jax.ShapeDtypeStruct((m * m, vcfg.patch_dim), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: VisionTower(vcfg).init(jax.random.PRNGKey(0), x,
                                       ((1, m, m),)), pixels)
  return nn.meta.unbox(shapes)["params"]


@functools.partial(jax.jit, static_argnames=("vcfg", "grid"))
def _encode(params, pixel_values, vcfg, grid):
  return VisionTower(vcfg).apply({"params": params}, pixel_values, grid)


def encode(vcfg: VisionConfig, params: dict, pixel_values: Array,
           grid_thw: Any) -> Array:
  """The tower under jit, compiled once per (config, grid) pair.

  Args:
    vcfg: the tower config.
    params: the tower's parameters.
    pixel_values: [n_patches, C*T*P*P].
    grid_thw: [n_images, 3] host data (made a static argument here).

  Returns:
    [n_merged, out_hidden_size] merged features.
  """
  grid = check_grid_thw(grid_thw, vcfg.spatial_merge_size)
  shape = tuple(getattr(pixel_values, "shape", ()))
  if len(shape) == 2 and shape[1] == vcfg.patch_dim:
    n = int(grid.prod(axis=1).sum())
    if shape[0] != n:  # checked again inside; this names it before tracing
      raise ValueError(
          f"grid_thw: expected its patches (sum of t * h * w = {n}) to equal "
          f"pixel_values' rows, found {shape[0]} rows for grid_thw "
          f"{grid.tolist()}")
  return _encode(params, jnp.asarray(pixel_values), vcfg, grid_key(grid))


# ------------------------------------------------------- checkpoint layout
# Layout tags, as in qwen_jax.checkpoint: "linear" (torch [out, in] <-> our
# [in, out]), "vector" and "embed" (unchanged), and "conv3d" (torch's Conv3d
# weight [D, C, T, P, P] <-> our [C, T, P, P, D]).
VISION_PREFIX = "model.visual."


def vision_weight_map(vcfg: VisionConfig) -> list[tuple[str, tuple, str]]:
  """Every tensor of the tower and where it lives in our params.

  Returns:
    (name under `model.visual.` in a transformers checkpoint, our path in
    the tower's params, layout tag).
  """
  def dense(hf, ours):
    return [(f"{hf}.weight", ours + ("kernel",), "linear"),
            (f"{hf}.bias", ours + ("bias",), "vector")]

  def norm(hf, ours):
    return [(f"{hf}.weight", ours + ("scale",), "vector"),
            (f"{hf}.bias", ours + ("bias",), "vector")]

  rows = [("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"),
           "conv3d"),
          ("patch_embed.proj.bias", ("patch_embed", "proj", "bias"),
           "vector"),
          ("pos_embed.weight", ("pos_embed", "embedding"), "embed")]
  for i in range(vcfg.depth):
    hf, ours = f"blocks.{i}", (f"blocks_{i}",)
    rows += norm(f"{hf}.norm1", ours + ("norm1",))
    rows += dense(f"{hf}.attn.qkv", ours + ("attn", "qkv"))
    rows += dense(f"{hf}.attn.proj", ours + ("attn", "proj"))
    rows += norm(f"{hf}.norm2", ours + ("norm2",))
    rows += dense(f"{hf}.mlp.linear_fc1", ours + ("mlp", "linear_fc1"))
    rows += dense(f"{hf}.mlp.linear_fc2", ours + ("mlp", "linear_fc2"))
  rows += norm("merger.norm", ("merger", "norm"))
  rows += dense("merger.linear_fc1", ("merger", "linear_fc1"))
  rows += dense("merger.linear_fc2", ("merger", "linear_fc2"))
  return rows


def vision_to_ours(x: np.ndarray, layout: str) -> np.ndarray:
  """A transformers tensor in our layout."""
  if layout == "linear":
    return x.T
  if layout == "conv3d":
    return np.moveaxis(x, 0, -1)
  if layout in ("vector", "embed"):
    return x
  raise ValueError(f"layout: expected 'linear', 'conv3d', 'vector' or "
                   f"'embed', found {layout!r}")


def vision_to_hf(x: np.ndarray, layout: str) -> np.ndarray:
  """Our tensor in transformers' layout."""
  if layout == "linear":
    return x.T
  if layout == "conv3d":
    return np.moveaxis(x, -1, 0)
  if layout in ("vector", "embed"):
    return x
  raise ValueError(f"layout: expected 'linear', 'conv3d', 'vector' or "
                   f"'embed', found {layout!r}")


def vision_hf_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
  """transformers' shape of a tensor whose shape in our params is `shape`."""
  shape = tuple(shape)
  if layout == "linear":
    return tuple(reversed(shape))
  if layout == "conv3d":
    return (shape[-1],) + shape[:-1]
  return shape


def params_from_hf(vcfg: VisionConfig, tensors: Mapping[str, Any],
                   prefix: str = VISION_PREFIX) -> dict:
  """Our tower params from transformers tensors (NumPy-convertible).

  Args:
    vcfg: the tower config (param_dtype is the returned dtype).
    tensors: name -> array, names as in a checkpoint (with `prefix`).
    prefix: prepended to each name of `vision_weight_map`.

  Raises:
    ValueError: a missing tensor or one of the wrong shape (named).
  """
  shapes = param_shapes(vcfg)
  pdt = np.dtype(jnp.dtype(vcfg.param_dtype))
  out: dict = {}
  for hf, ours, layout in vision_weight_map(vcfg):
    key = prefix + hf
    if key not in tensors:
      raise ValueError(f"tensors: expected {key}, found it missing")
    x = np.asarray(tensors[key])
    target = shapes
    for p in ours:
      target = target[p]
    want = vision_hf_shape(target.shape, layout)
    if tuple(x.shape) != want:
      raise ValueError(f"weight {key}: expected shape {want}, found "
                       f"{tuple(x.shape)}")
    tree = out
    for p in ours[:-1]:
      tree = tree.setdefault(p, {})
    tree[ours[-1]] = jnp.asarray(vision_to_ours(x, layout).astype(pdt))
  return out


def params_to_hf(vcfg: VisionConfig, params: Mapping[str, Any],
                 prefix: str = VISION_PREFIX) -> dict[str, np.ndarray]:
  """transformers tensors (NumPy, prefixed names) from our tower params."""
  out = {}
  for hf, ours, layout in vision_weight_map(vcfg):
    x = params
    for p in ours:
      x = x[p]
    out[prefix + hf] = np.ascontiguousarray(vision_to_hf(np.asarray(x),
                                                         layout))
  return out
