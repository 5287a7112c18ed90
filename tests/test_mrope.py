"""Multimodal positions and M-RoPE tables against transformers' Qwen3.5.

References: `Qwen3_5Model.get_rope_index` (called on a stand-in that holds
only the merge size, the one config value it reads, so no model is built;
the token types come from the ids, as the processor's mm_token_type_ids)
and `Qwen3_5TextRotaryEmbedding`; for text, `qwen_jax.layers.rope_cos_sin`.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen3_5 import modeling_qwen3_5

from qwen_jax import image_processing
from qwen_jax import layers
from qwen_jax import mrope
from qwen_jax.vision import VisionTokens
from tests import hf_utils
from tests import tolerances

# Small ids inside a tiny vocabulary; text ids are drawn below 96.
TOKENS = VisionTokens(image_token_id=100, video_token_id=101,
                      vision_start_token_id=98, vision_end_token_id=99)
MERGE = 2


@pytest.fixture(scope="module")
def hf_model():
  """What `Qwen3_5Model.get_rope_index` reads of its model: the merge size
  and its own `get_vision_position_ids`."""
  cls = transformers.Qwen3_5Model
  stub = types.SimpleNamespace(config=types.SimpleNamespace(
      vision_config=types.SimpleNamespace(spatial_merge_size=MERGE)))
  stub.get_vision_position_ids = functools.partial(
      cls.get_vision_position_ids, stub)
  stub.get_rope_index = functools.partial(cls.get_rope_index, stub)
  return stub


def _hf_rope_index(model, ids, image_grid=None, video_grid=None, mask=None):
  ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
  types = torch.where(ids_t == TOKENS.image_token_id, 1,
                      torch.where(ids_t == TOKENS.video_token_id, 2, 0))
  kw = {"mm_token_type_ids": types}
  if image_grid is not None:
    kw["image_grid_thw"] = torch.tensor(image_grid)
  if video_grid is not None:
    kw["video_grid_thw"] = torch.tensor(video_grid)
  if mask is not None:
    kw["attention_mask"] = torch.tensor(mask)
  pos, delta = model.get_rope_index(ids_t, **kw)
  return pos.numpy(), delta.numpy()


def _text(rng, n):
  return [int(x) for x in rng.integers(0, 96, n)]


def _image(t, h, w):
  return ([TOKENS.vision_start_token_id] +
          [TOKENS.image_token_id] * (t * h * w // MERGE ** 2) +
          [TOKENS.vision_end_token_id])


def _video_prompt(rng, grid, times):
  """Text, a video expanded as the processor does (times as text ids)."""
  encode = lambda s: [90 + len(s) % 5, 91]  # stand-in tokenizer
  ids = _text(rng, 3) + [TOKENS.vision_start_token_id,
                         TOKENS.video_token_id,
                         TOKENS.vision_end_token_id] + _text(rng, 2)
  return image_processing.expand_placeholder_ids(
      ids, video_grid_thw=grid, merge_size=MERGE, video_timestamps=times,
      encode=encode, tokens=TOKENS)


def _cases():
  rng = np.random.default_rng(0)
  one = _text(rng, 4) + _image(1, 4, 6) + _text(rng, 3)
  two = (_text(rng, 2) + _image(1, 6, 2) + _text(rng, 1) + _image(1, 4, 4) +
         _text(rng, 5))
  video = _video_prompt(rng, [[3, 4, 6]], [[0.5, 1.5, 2.5]])
  yield "text", [_text(rng, 9)], None, None, None
  yield "one_image", [one], [[1, 4, 6]], None, None
  yield "two_images", [two], [[1, 6, 2], [1, 4, 4]], None, None
  yield "video", [video], None, [[3, 4, 6]], None
  # Left padding: an image row, a shorter text row, a row with two images
  # (the image grids are taken in order across the rows).
  rows = [_text(rng, 2) + _image(1, 4, 4) + _text(rng, 2), _text(rng, 5),
          _image(1, 2, 4) + _text(rng, 1) + _image(1, 2, 2)]
  width = max(map(len, rows))
  ids = [[0] * (width - len(r)) + r for r in rows]
  mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
  yield ("left_padding", ids, [[1, 4, 4], [1, 2, 4], [1, 2, 2]], None, mask)
  # Images and a video together.
  mixed = _image(1, 4, 4) + _video_prompt(rng, [[2, 2, 4]], None)
  yield "image_and_video", [mixed], [[1, 4, 4]], [[2, 2, 4]], None


CASES = list(_cases())


@pytest.mark.parametrize("name,ids,image_grid,video_grid,mask", CASES,
                         ids=[c[0] for c in CASES])
def test_positions_match_get_rope_index(hf_model, name, ids, image_grid,
                                        video_grid, mask):
  del name
  ref_pos, ref_delta = _hf_rope_index(hf_model, ids, image_grid, video_grid,
                                      mask)
  pos, delta = mrope.multimodal_positions(
      ids, image_grid, video_grid, mask, spatial_merge_size=MERGE,
      tokens=TOKENS)
  np.testing.assert_array_equal(pos, ref_pos)
  np.testing.assert_array_equal(delta, ref_delta)


def test_text_after_the_prompt_continues_as_transformers(hf_model):
  """text_positions(delta, count, k) = positions of k appended text tokens."""
  rng = np.random.default_rng(1)
  prompt = _text(rng, 3) + _image(1, 6, 4) + _text(rng, 2)
  full = prompt + _text(rng, 4)
  grid = [[1, 6, 4]]
  _, delta = mrope.multimodal_positions([prompt], grid,
                                        spatial_merge_size=MERGE,
                                        tokens=TOKENS)
  ref, _ = _hf_rope_index(hf_model, [full], grid)
  ours = mrope.text_positions(delta, len(prompt), 4)
  np.testing.assert_array_equal(np.asarray(ours), ref[:, :, len(prompt):])


@pytest.mark.parametrize("head_dim,section", [
    (64, (3, 3, 2)), (256, (11, 11, 10)),
    (32, (11, 11, 10)),   # more counts than the 4 frequencies: clipped
    (64, (2, 2, 1))])     # fewer than the 8: the rest follow t
def test_cos_sin_match_transformers(head_dim, section):
  cfg = hf_utils.make_text_config(
      head_dim=head_dim, rope_parameters={
          "rope_type": "default", "rope_theta": 1e7,
          "partial_rotary_factor": 0.25, "mrope_section": list(section)})
  rotary = modeling_qwen3_5.Qwen3_5TextRotaryEmbedding(cfg)
  # Mixed positions: text, an image, a video, left padding.
  _, ids, image_grid, video_grid, mask = CASES[-2]
  pos, _ = mrope.multimodal_positions(ids, image_grid, video_grid, mask,
                                      spatial_merge_size=MERGE,
                                      tokens=TOKENS)
  pos = pos + 37  # rows of different values at larger angles too
  with torch.no_grad():
    cos, sin = rotary(torch.zeros(1), torch.tensor(pos, dtype=torch.long))
  rd = head_dim // 4
  ours = mrope.mrope_cos_sin(jnp.asarray(pos), rd, 1e7, jnp.float32,
                             section)
  tolerances.assert_close(ours[0], cos.numpy(), jnp.float32)
  tolerances.assert_close(ours[1], sin.numpy(), jnp.float32)


def test_text_positions_give_ordinary_rope_exactly():
  rng = np.random.default_rng(2)
  flat = jnp.asarray(rng.integers(0, 5000, (2, 13)), jnp.int32)
  ref = layers.rope_cos_sin(flat, 64, 1e7, jnp.float32)
  for pos in (flat, jnp.broadcast_to(flat, (3, 2, 13))):
    cos, sin = mrope.mrope_cos_sin(pos, 64, 1e7, jnp.float32)
    np.testing.assert_array_equal(np.asarray(cos), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(sin), np.asarray(ref[1]))
  # Text-only prompts: positions are arange, all three rows.
  ids = np.asarray(rng.integers(0, 96, (2, 13)))
  pos, delta = mrope.multimodal_positions(ids, tokens=TOKENS)
  np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(13),
                                                     (3, 2, 13)))
  np.testing.assert_array_equal(delta, 0)


@pytest.mark.parametrize("name,ids,image_grid,video_grid,mask", CASES,
                         ids=[c[0] for c in CASES])
def test_traced_positions_equal_the_host_ones(name, ids, image_grid,
                                              video_grid, mask):
  """mrope_positions under jit (ids and mask traced, grids static) gives
  multimodal_positions' positions and deltas."""
  del name
  ref_pos, ref_delta = mrope.multimodal_positions(
      ids, image_grid, video_grid, mask, spatial_merge_size=MERGE,
      tokens=TOKENS)
  fn = jax.jit(lambda i, m: mrope.mrope_positions(
      i, m, image_grid, video_grid, spatial_merge_size=MERGE,
      image_token_id=TOKENS.image_token_id,
      video_token_id=TOKENS.video_token_id))
  ids = np.asarray(ids)
  pos, delta = fn(ids, np.ones(ids.shape, np.int32) if mask is None
                  else np.asarray(mask))
  np.testing.assert_array_equal(np.asarray(pos), ref_pos)
  np.testing.assert_array_equal(np.asarray(delta), ref_delta[:, 0])


def test_axes_interleave():
  axes = mrope.mrope_axes(64, (11, 11, 10))
  assert np.bincount(axes).tolist() == [11, 11, 10]
  assert axes[:6].tolist() == [0, 1, 2, 0, 1, 2]
  assert axes[-2:].tolist() == [0, 1]  # w stops after 10 frequencies


class TestBadInputs:

  def test_too_few_image_grids(self):
    ids = [[1] + _image(1, 4, 4) + [2] + _image(1, 2, 2)]
    with pytest.raises(ValueError, match=r"image_grid_thw: expected a grid "
                       r"for every image.*found 1 grids"):
      mrope.multimodal_positions(ids, [[1, 4, 4]], tokens=TOKENS)

  def test_too_many_grids(self):
    ids = [[1] + _image(1, 4, 4)]
    with pytest.raises(ValueError, match=r"image_grid_thw: expected one grid "
                       r"per image.*found 2 grids for 1"):
      mrope.multimodal_positions(ids, [[1, 4, 4], [1, 2, 2]], tokens=TOKENS)

  def test_run_shorter_than_the_grid(self):
    ids = [[1] + _image(1, 4, 4)[:-3] + [2]]
    with pytest.raises(ValueError, match=r"input_ids: expected 4 "
                       r"image_token_id tokens for grid \(1, 4, 4\).*found a "
                       r"run of 2"):
      mrope.multimodal_positions(ids, [[1, 4, 4]], tokens=TOKENS)

  def test_mask_shape(self):
    with pytest.raises(ValueError, match=r"attention_mask: expected shape "
                       r"\(1, 3\), found \(1, 4\)"):
      mrope.multimodal_positions([[1, 2, 3]], attention_mask=[[1, 1, 1, 1]])

  @pytest.mark.parametrize("section", [(11, 11), (11, -1, 10), [1.5, 1, 1],
                                       "11,11,10"])
  def test_mrope_section(self, section):
    with pytest.raises(ValueError, match=r"mrope_section: expected three "
                       r"counts \(t, h, w\) >= 0, found"):
      mrope.mrope_cos_sin(jnp.zeros((1, 2), jnp.int32), 64, 1e7, jnp.float32,
                          section)
