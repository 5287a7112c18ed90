"""Multimodal RoPE (M-RoPE) of Qwen3.5: prompt positions and rotary tables.

Positions are three rows (t, h, w) per token ([3, b, t] arrays, transformers'
layout). Text tokens get equal rows: p, p, p. An image (or one video frame)
of g_h x g_w merged tokens that starts at position s gets
(s, s + row, s + col) on the merged grid, in row-major order, and the text
after it resumes at s + max(g_h, g_w). A video is split into its frames
(the processor puts a timestamp and vision start/end tokens between them),
each placed like an image. Padding (attention mask 0) is skipped and keeps
position 0; each row's `rope_delta` = (its largest position + 1) - (its
token count), so the next generated token sits at count + delta.

The rotary tables interleave the three rows over the frequencies: of the
rotary_dim / 2 frequencies, index i takes h when i % 3 == 1 and
i < 3 * mrope_section[1], w when i % 3 == 2 and i < 3 * mrope_section[2],
and t otherwise ([11, 11, 10] for the released models: 64 rotary dims of a
256-wide head). Counts that do not add up to rotary_dim / 2 are read the
same way (transformers' `Qwen3_5TextRotaryEmbedding` slices them so). When
the three rows are equal (text) this is ordinary 1-D RoPE, bit for bit the
tables of `qwen_jax.layers.rope_cos_sin`.

The positions are computed two ways, equal wherever the placeholders fit
the grids: `multimodal_positions` on the host with NumPy (it checks every
run of placeholders against the grids, naming what does not fit), and
`mrope_positions` in jnp, for ids that are traced (under jit, in training
and the sharded programs). Both need the grids as host data: they fix the
tables the positions are read from.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from qwen_jax.array_typing import Array
from qwen_jax.vision import VisionTokens
from qwen_jax.vision import check_grid_thw

# Released Qwen3.5 models: 32 frequencies split t / h / w.
MROPE_SECTION = (11, 11, 10)


def check_mrope_section(mrope_section: Sequence[int],
                        rotary_dim: int) -> tuple[int, int, int]:
  """mrope_section as a tuple, or ValueError naming it.

  Counts need not add up to rotary_dim / 2: as in transformers, h takes
  the frequencies i % 3 == 1 below 3 * section[1], w those i % 3 == 2
  below 3 * section[2], t the rest (released models: [11, 11, 10] of 32).
  """
  del rotary_dim  # any count is read the same way (see above)
  sec = tuple(mrope_section) if isinstance(mrope_section,
                                           (list, tuple)) else None
  if (sec is None or len(sec) != 3 or
      not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
              and s >= 0 for s in sec)):
    raise ValueError(f"mrope_section: expected three counts (t, h, w) >= 0, "
                     f"found {mrope_section!r}")
  return tuple(int(s) for s in sec)


def mrope_axes(rotary_dim: int,
               mrope_section: Sequence[int] = MROPE_SECTION) -> np.ndarray:
  """Which row (0 = t, 1 = h, 2 = w) drives each of the rotary_dim / 2
  frequencies, interleaved."""
  sec = check_mrope_section(mrope_section, rotary_dim)
  i = np.arange(rotary_dim // 2)
  axes = np.zeros_like(i)
  axes[(i % 3 == 1) & (i < 3 * sec[1])] = 1
  axes[(i % 3 == 2) & (i < 3 * sec[2])] = 2
  return axes


def mrope_cos_sin(positions: Array, rotary_dim: int, theta: float, dtype,
                  mrope_section: Sequence[int] = MROPE_SECTION
                  ) -> tuple[Array, Array]:
  """cos/sin tables [b, t, rotary_dim] from (t, h, w) positions.

  Same call convention and layout as `qwen_jax.layers.rope_cos_sin` (NeoX
  half split, angles in float32, tables cast to `dtype`), so the result
  feeds `layers.apply_partial_rope` unchanged.

  Args:
    positions: [3, b, t] (t, h, w) positions, or [b, t] (all rows equal).
    rotary_dim: rotated dims of a head (head_dim * partial_rotary_factor).
    theta: RoPE base.
    dtype: dtype of the tables.
    mrope_section: frequencies per row (t, h, w), interleaved.

  Returns:
    (cos, sin), each [b, t, rotary_dim].
  """
  if positions.ndim == 2:
    positions = jnp.broadcast_to(positions, (3,) + positions.shape)
  if positions.ndim != 3 or positions.shape[0] != 3:
    raise ValueError(f"positions: expected shape [3, batch, time] or "
                     f"[batch, time], found {tuple(positions.shape)}")
  axes = mrope_axes(rotary_dim, mrope_section)
  inv_freq = 1.0 / (theta ** (
      jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [3,b,t,f]
  angle = jnp.where(axes == 0, angle[0],
                    jnp.where(axes == 1, angle[1], angle[2]))
  angle = jnp.concatenate([angle, angle], axis=-1)
  return jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)


def _runs(types: np.ndarray) -> list[tuple[int, int, int]]:
  """(type, start, end) of each run of equal values."""
  if types.size == 0:
    return []
  cut = np.flatnonzero(np.diff(types)) + 1
  starts = np.concatenate([[0], cut])
  ends = np.concatenate([cut, [types.size]])
  return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def multimodal_positions(input_ids: Any, image_grid_thw: Any = None,
                         video_grid_thw: Any = None,
                         attention_mask: Any = None, *,
                         spatial_merge_size: int = 2,
                         tokens: VisionTokens = VisionTokens(),
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(t, h, w) positions of a prompt batch and each row's rope delta.

  transformers' `Qwen3_5Model.get_rope_index`, with the token types read
  from the ids (image_token_id -> image, video_token_id -> video). Images
  are taken in order across the whole batch, then videos frame by frame.
  A run of placeholders may hold several images or frames back to back.

  Args:
    input_ids: [b, t] token ids (host values).
    image_grid_thw: [n_images, 3] patch grids, or None.
    video_grid_thw: [n_videos, 3] patch grids, or None.
    attention_mask: [b, t] 1 = token, 0 = padding (left or right), or None.
    spatial_merge_size: m of the vision tower.
    tokens: the placeholder ids.

  Returns:
    (positions int32 [3, b, t], rope_deltas int32 [b, 1]).

  Raises:
    ValueError: bad shapes, a run of placeholders that the next grids do
      not fill exactly, too few or too many grids.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids: expected integer ids [batch, time], found "
                     f"shape {ids.shape} of {ids.dtype}")
  b, t = ids.shape
  m = spatial_merge_size
  mask = np.ones((b, t), bool)
  if attention_mask is not None:
    mask = np.asarray(attention_mask)
    if mask.shape != (b, t):
      raise ValueError(f"attention_mask: expected shape {(b, t)}, found "
                       f"{mask.shape}")
    if not np.isin(mask, (0, 1)).all():
      raise ValueError("attention_mask: expected 0/1 values")
    mask = mask.astype(bool)
  grids = {1: [], 2: []}
  if image_grid_thw is not None:
    grids[1] = [tuple(g) for g in check_grid_thw(image_grid_thw, m,
                                                 "image_grid_thw")]
  if video_grid_thw is not None:
    for gt, gh, gw in check_grid_thw(video_grid_thw, m, "video_grid_thw"):
      grids[2] += [(1, gh, gw)] * int(gt)  # one grid per frame
  names = {1: "image_grid_thw", 2: "video_grid_thw"}
  placeholder = {1: "image_token_id", 2: "video_token_id"}
  used = {1: 0, 2: 0}

  positions = np.zeros((3, b, t), np.int64)
  deltas = np.zeros((b, 1), np.int64)
  for r in range(b):
    row = ids[r][mask[r]]
    types = np.where(row == tokens.image_token_id, 1,
                     np.where(row == tokens.video_token_id, 2, 0))
    pieces, pos = [], 0
    for kind, start, end in _runs(types):
      if kind == 0:
        pieces.append(np.broadcast_to(np.arange(end - start) + pos,
                                      (3, end - start)))
        pos += end - start
        continue
      left = end - start
      while left > 0:
        if used[kind] == len(grids[kind]):
          raise ValueError(
              f"{names[kind]}: expected a grid for every image or video "
              f"frame of {placeholder[kind]} placeholders, found "
              f"{len(grids[kind])} grids and more placeholders (row {r})")
        gt, gh, gw = (int(x) for x in grids[kind][used[kind]])
        used[kind] += 1
        lh, lw = gh // m, gw // m
        count = gt * lh * lw
        if count > left:
          raise ValueError(
              f"input_ids: expected {count} {placeholder[kind]} tokens for "
              f"grid {(gt, gh, gw)} of {names[kind]} (t*h*w/m^2), found a "
              f"run of {left} left (row {r})")
        tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(lh), np.arange(lw),
                                 indexing="ij")
        pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos)
        pos += max(gh, gw) // m
        left -= count
    if pieces:
      row_pos = np.concatenate(pieces, axis=1)
      positions[:, r, mask[r]] = row_pos
      deltas[r, 0] = row_pos.max() + 1 - row.size
  for kind in (1, 2):
    if used[kind] != len(grids[kind]):
      raise ValueError(
          f"{names[kind]}: expected one grid per image or video frame in "
          f"input_ids, found {len(grids[kind])} grids for "
          f"{used[kind]} placeholder groups ({placeholder[kind]}"
          f"={getattr(tokens, placeholder[kind])})")
  return positions.astype(np.int32), deltas.astype(np.int32)


def text_positions(rope_deltas: Any, start: Any, length: int) -> Array:
  """Positions [3, b, length] of text that follows a multimodal prompt.

  Args:
    rope_deltas: [b, 1] from `multimodal_positions`.
    start: tokens of each row already seen, not counting padding (scalar or
      [b]); the first new token sits at start + delta.
    length: new tokens.

  Returns:
    int32 [3, b, length], all three rows equal.
  """
  d = jnp.asarray(rope_deltas, jnp.int32).reshape(-1, 1)
  s = jnp.asarray(start, jnp.int32).reshape(-1, 1)
  p = s + d + jnp.arange(length, dtype=jnp.int32)
  return jnp.broadcast_to(p, (3,) + p.shape)


def _block_tables(grids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
  """Per placeholder of a list of blocks, in order: its (t, h, w) offset
  from the block's start position [3, n], and how far the position moves
  on after it [n] (max(h, w) / m after a block's last token, else 0)."""
  offsets, advance = [np.zeros((3, 0), np.int32)], [np.zeros(0, np.int32)]
  for gt, gh, gw in grids:
    lh, lw = int(gh) // m, int(gw) // m
    tt, hh, ww = np.meshgrid(np.arange(int(gt)), np.arange(lh),
                             np.arange(lw), indexing="ij")
    offsets.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]))
    adv = np.zeros(int(gt) * lh * lw, np.int32)
    adv[-1] = max(lh, lw)
    advance.append(adv)
  return (np.concatenate(offsets, axis=1).astype(np.int32),
          np.concatenate(advance).astype(np.int32))


def _placeholder_tables(kind_mask: Array, offsets: np.ndarray,
                        advance: np.ndarray):
  """(offset [3, b, t], advance [b, t]) of each placeholder of one kind.

  The k-th placeholder of the batch (row-major, the order the features come
  in) reads entry k of the tables; k is clipped to the tables, so extra
  placeholders under jit read the last entry (only concrete ids can be
  counted: `Qwen35` refuses a mismatch there).
  """
  n = advance.shape[0]
  b, t = kind_mask.shape
  if n == 0:
    return (jnp.zeros((3, b, t), jnp.int32), jnp.zeros((b, t), jnp.int32))
  flat = kind_mask.reshape(-1).astype(jnp.int32)
  k = jnp.clip(jnp.cumsum(flat) - 1, 0, n - 1).reshape(b, t)
  return jnp.asarray(offsets)[:, k], jnp.asarray(advance)[k]


def mrope_positions(input_ids: Array, attention_mask: Array | None = None,
                    image_grid_thw: Any = None, video_grid_thw: Any = None,
                    *, spatial_merge_size: int = 2,
                    image_token_id: int | None = None,
                    video_token_id: int | None = None
                    ) -> tuple[Array, Array]:
  """`multimodal_positions` in jnp: the ids and mask may be traced.

  Each token's position is where the text before it leaves off: text and
  the last token of an image (or video frame) move it on by 1 and by
  max(h, w) / m, other placeholders by 0, padding by nothing (a running
  sum); a placeholder adds its (t, h, w) offset inside its block, read
  from tables built from the grids. For placeholders that fit the grids
  this equals `multimodal_positions` (and transformers' `get_rope_index`);
  it checks nothing (see `multimodal_positions` for that).

  Args:
    input_ids: [b, t] int ids.
    attention_mask: [b, t] (1 = token, 0 = padding) or None.
    image_grid_thw: [n_images, 3] host data, or None.
    video_grid_thw: [n_videos, 3] host data, or None.
    spatial_merge_size: m of the tower.
    image_token_id, video_token_id: the placeholders (None: no such kind).

  Returns:
    (positions int32 [3, b, t] (padding 0), rope_deltas int32 [b]: each
    row's largest position + 1 - its token count).
  """
  m = spatial_merge_size
  ids = jnp.asarray(input_ids)
  b, t = ids.shape
  mask = (jnp.ones((b, t), bool) if attention_mask is None
          else jnp.asarray(attention_mask).astype(bool))
  kinds = []
  if image_grid_thw is not None and image_token_id is not None:
    grids = check_grid_thw(image_grid_thw, m, "image_grid_thw")
    kinds.append((ids == image_token_id, grids))
  if video_grid_thw is not None and video_token_id is not None:
    grids = check_grid_thw(video_grid_thw, m, "video_grid_thw")
    frames = np.repeat(grids, grids[:, 0], axis=0)
    frames[:, 0] = 1  # each frame its own block, as the processor splits
    kinds.append((ids == video_token_id, frames))
  offset = jnp.zeros((3, b, t), jnp.int32)
  advance = mask.astype(jnp.int32)  # text: 1, padding: 0
  for kind, grids in kinds:
    kind = kind & mask
    off, adv = _placeholder_tables(kind, *_block_tables(grids, m))
    offset = jnp.where(kind[None], off, offset)
    advance = jnp.where(kind, adv, advance)
  start = jnp.cumsum(advance, axis=1) - advance  # exclusive running sum
  positions = jnp.where(mask[None], start[None] + offset, 0)
  count = jnp.sum(mask, axis=1, dtype=jnp.int32)
  top = jnp.max(jnp.where(mask[None], positions, -1), axis=(0, 2))
  deltas = jnp.where(count > 0, top + 1 - count, 0)
  return positions.astype(jnp.int32), deltas.astype(jnp.int32)

