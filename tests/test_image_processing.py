"""Preprocessing against transformers' Pillow image processor (no torch).

Images: `Qwen2VLImageProcessorPil` on odd sizes, extreme aspect ratios,
RGBA, grey and palette images. Videos: transformers' video processor needs
torchvision, so the reference is the same math frame by frame: transformers'
Qwen3-VL video `smart_resize` for the size, its Pillow resize and the image
processor (without resizing) for each frame's values.
"""

import json
import types

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil
from transformers.models.qwen3_vl import processing_qwen3_vl
# The module itself, not the package's lazy attribute (that one asks for
# torchvision).
from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
    smart_resize as hf_video_smart_resize)

from qwen_jax import image_processing as ip
from qwen_jax.vision import VisionTokens
from tests import tolerances

# Released Qwen3.5 values (16-pixel patches, mean = std = 0.5) with a small
# pixel budget so the test images stay small.
SETTINGS = dict(patch_size=16, temporal_patch_size=2, merge_size=2,
                image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
MIN_PIXELS, MAX_PIXELS = 64 * 64, 32 * 32 * 40


def _hf_processor(**kw):
  kw = {**dict(SETTINGS), **kw}
  size = {"shortest_edge": kw.pop("min_pixels", MIN_PIXELS),
          "longest_edge": kw.pop("max_pixels", MAX_PIXELS)}
  kw["image_mean"], kw["image_std"] = list(kw["image_mean"]), list(
      kw["image_std"])
  return hf_pil.Qwen2VLImageProcessorPil(size=size, **kw)


def _ours(**kw):
  cfg = ip.ProcessorConfig(**{**dict(SETTINGS, min_pixels=MIN_PIXELS,
                                     max_pixels=MAX_PIXELS), **kw})
  return ip.VisionProcessor(cfg, cfg)


def _images(rng):
  def rgb(h, w):
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
  rgba = rng.integers(0, 256, (41, 29, 4), np.uint8)
  rgba[..., 3] = rng.choice([0, 128, 255], (41, 29))
  la = PIL.Image.fromarray(rng.integers(0, 256, (19, 23, 2), np.uint8), "LA")
  pal = PIL.Image.fromarray(rng.integers(0, 8, (20, 30), np.uint8), "P")
  pal.putpalette(list(rng.integers(0, 256, 24)) * 32)
  pal.info["transparency"] = 3  # one palette entry is transparent
  return [
      rgb(37, 53),                                     # odd size
      rgb(9, 700), rgb(640, 5),                        # aspect 78 and 128
      rgb(300, 200),                                   # shrunk to max_pixels
      PIL.Image.fromarray(rgba, "RGBA"),
      PIL.Image.fromarray(rng.integers(0, 256, (33, 47), np.uint8), "L"),
      la, pal, rgb(120, 90).convert("P"),
  ]


def test_images_match_transformers_pil_processor():
  rng = np.random.default_rng(0)
  images = _images(rng)
  ref = _hf_processor()(images=images)
  ours = _ours()(images=images)
  np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
  assert ours["image_grid_thw"].dtype == np.int64
  assert ours["pixel_values"].dtype == np.float32
  assert ours["pixel_values"].shape == ref["pixel_values"].shape
  tolerances.assert_close(ours["pixel_values"], ref["pixel_values"],
                          jnp.float32)


def test_arrays_and_defaults_match():
  """uint8 arrays as input; transformers' default settings (CLIP, 14 px)."""
  rng = np.random.default_rng(1)
  arrays = [rng.integers(0, 256, (45, 61, 3), np.uint8),
            rng.integers(0, 256, (30, 40), np.uint8),
            rng.integers(0, 256, (33, 21, 4), np.uint8)]
  ref = hf_pil.Qwen2VLImageProcessorPil()(
      images=[PIL.Image.fromarray(a) for a in arrays])
  ours = ip.VisionProcessor()(images=arrays)
  np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
  tolerances.assert_close(ours["pixel_values"], ref["pixel_values"],
                          jnp.float32)


def test_smart_resize_matches_transformers():
  rng = np.random.default_rng(2)
  for h, w in rng.integers(1, 3000, (300, 2)):
    h, w = int(h), int(w)
    if max(h, w) / min(h, w) > 200:
      continue
    for lo, hi in ((56 * 56, 28 * 28 * 1280), (4096, 32 * 32 * 40)):
      assert ip.smart_resize(h, w, 28, lo, hi) == hf_pil.smart_resize(
          h, w, 28, lo, hi)
    f = int(rng.integers(2, 40))
    assert ip.smart_resize_video(f, h, w, 2, 32, 4096, 32 * 32 * 300) == (
        hf_video_smart_resize(f, h, w, 2, 32, 4096,
                                               32 * 32 * 300))
  with pytest.raises(ValueError, match=r"aspect ratio of at most 200, found "
                     r"3 x 700"):
    ip.smart_resize(3, 700, 32, 4096, 65536)
  with pytest.raises(ValueError, match=r"images\[1\]: .*aspect ratio"):
    _ours()(images=[np.zeros((40, 40, 3), np.uint8),
                    np.zeros((2, 500, 3), np.uint8)])


@pytest.mark.parametrize("num_frames", [4, 5])
def test_video_matches_the_image_math_frame_by_frame(num_frames):
  rng = np.random.default_rng(num_frames)
  h, w = 23, 41
  frames = rng.integers(0, 256, (num_frames, h, w, 3), np.uint8)
  ours = _ours()(videos=[frames, [PIL.Image.fromarray(f) for f in frames]])
  rh, rw = hf_video_smart_resize(
      num_frames, h, w, temporal_factor=2, factor=32,
      min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  gt, gh, gw = -(-num_frames // 2), rh // 16, rw // 16
  np.testing.assert_array_equal(ours["video_grid_thw"],
                                [[gt, gh, gw], [gt, gh, gw]])
  hf = _hf_processor(do_resize=False)
  expected = []
  for f in list(frames) + [frames[-1]] * (2 * gt - num_frames):
    chw = np.moveaxis(f, -1, 0)
    resized = hf_pil.PilBackend.resize(
        hf, chw, SizeDict(height=rh, width=rw), resample=3)
    pv = hf(images=[np.moveaxis(resized, 0, -1)])["pixel_values"]
    # Each image patch is [C, T, P, P] with the frame repeated over T.
    expected.append(pv.reshape(gh * gw, 3, 2, 16, 16)[:, :, 0])
  exp = np.stack(expected).reshape(gt, 2, gh * gw, 3, 16, 16)
  exp = exp.transpose(0, 2, 3, 1, 4, 5).reshape(gt * gh * gw, -1)
  n = gt * gh * gw
  for k in range(2):  # the array and the list of frames agree
    tolerances.assert_close(ours["pixel_values_videos"][k * n:(k + 1) * n],
                            exp, jnp.float32)


def test_load_image_processor(tmp_path):
  image = {"size": {"longest_edge": 16777216, "shortest_edge": 65536},
           "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "processor_class": "Qwen3VLProcessor",
           "image_processor_type": "Qwen2VLImageProcessorFast"}
  (tmp_path / ip.IMAGE_CONFIG_NAME).write_text(json.dumps(image))
  proc = ip.load_image_processor(tmp_path)
  assert (proc.image.min_pixels, proc.image.max_pixels) == (65536, 16777216)
  assert proc.image.image_mean == (0.5, 0.5, 0.5)
  assert proc.video.patch_size == 16 and proc.video.min_pixels == 65536
  video = dict(image, size={"longest_edge": 25165824, "shortest_edge": 4096})
  (tmp_path / ip.VIDEO_CONFIG_NAME).write_text(json.dumps(video))
  proc = ip.load_image_processor(tmp_path)
  assert (proc.video.min_pixels, proc.video.max_pixels) == (4096, 25165824)
  # Legacy top-level min_pixels / max_pixels win over size.
  (tmp_path / ip.IMAGE_CONFIG_NAME).write_text(
      json.dumps(dict(image, min_pixels=1024, max_pixels=2048)))
  proc = ip.load_image_processor(tmp_path)
  assert (proc.image.min_pixels, proc.image.max_pixels) == (1024, 2048)


def test_load_image_processor_errors(tmp_path):
  with pytest.raises(ValueError, match=r"expected preprocessor_config\.json"):
    ip.load_image_processor(tmp_path)
  (tmp_path / ip.IMAGE_CONFIG_NAME).write_text("{not json")
  with pytest.raises(ValueError, match=r"preprocessor_config\.json: not "
                     r"valid JSON"):
    ip.load_image_processor(tmp_path)
  (tmp_path / ip.IMAGE_CONFIG_NAME).write_text(json.dumps({"patch_size": 0}))
  with pytest.raises(ValueError, match=r"patch_size: expected a positive "
                     r"integer, found 0 \(in .*preprocessor_config\.json\)"):
    ip.load_image_processor(tmp_path)
  (tmp_path / ip.IMAGE_CONFIG_NAME).write_text(
      json.dumps({"image_mean": [0.5, 0.5]}))
  with pytest.raises(ValueError, match=r"image_mean: expected 3 finite"):
    ip.load_image_processor(tmp_path)


def test_bad_inputs_name_the_argument():
  proc = _ours()
  with pytest.raises(ValueError, match=r"images\[0\]: expected uint8"):
    proc(images=[np.zeros((40, 40, 3), np.float32)])
  with pytest.raises(ValueError, match=r"images\[1\]: expected a PIL.Image"):
    proc(images=[np.zeros((40, 40, 3), np.uint8), "cat.png"])
  with pytest.raises(ValueError, match=r"videos\[0\]: video frames: "
                     r"expected at least temporal_patch_size=2, found 1"):
    proc(videos=[np.zeros((1, 40, 40, 3), np.uint8)])
  frames = [np.zeros((40, 40, 3), np.uint8), np.zeros((40, 41, 3), np.uint8)]
  with pytest.raises(ValueError, match=r"videos\[0\]\[1\]: expected every "
                     r"frame of size 40 x 40.*found 41 x 40"):
    proc(videos=[frames])
  with pytest.raises(ValueError, match=r"images, videos: expected at least "
                     r"one"):
    proc()


def _hf_replacements(grids, metadata):
  """transformers' Qwen3-VL processor replacements, on a stand-in."""
  cls = processing_qwen3_vl.Qwen3VLProcessor
  stub = types.SimpleNamespace(
      image_processor=types.SimpleNamespace(merge_size=2),
      video_processor=types.SimpleNamespace(merge_size=2,
                                            temporal_patch_size=2),
      image_token="<|image_pad|>", video_token="<|video_pad|>",
      vision_start_token="<|vision_start|>",
      vision_end_token="<|vision_end|>")
  stub._calculate_timestamps = lambda *a: cls._calculate_timestamps(stub, *a)
  images = [cls.replace_image_token(stub, {"image_grid_thw": np.array(
      grids["image"])}, i) for i in range(len(grids["image"]))]
  videos = [cls.replace_video_token(stub, {
      "video_grid_thw": np.array(grids["video"]),
      "video_metadata": metadata}, i) for i in range(len(grids["video"]))]
  return images, videos


def test_placeholder_text_matches_qwen3vl_processor():
  tok = VisionTokens()
  grids = {"image": [[1, 4, 6], [1, 2, 2]], "video": [[3, 4, 4]]}
  meta = [types.SimpleNamespace(fps=2.0, frames_indices=[0, 3, 6, 9, 12])]
  img_rep, vid_rep = _hf_replacements(grids, meta)
  times = [ip.video_frame_times([0, 3, 6, 9, 12], 2.0, 2)]
  wrap = lambda t: tok.vision_start_token + t + tok.vision_end_token
  text = (f"a {wrap(tok.image_token)} b {wrap(tok.video_token)} c "
          f"{wrap(tok.image_token)} d")
  want = (f"a {wrap(img_rep[0])} b {vid_rep[0]} c {wrap(img_rep[1])} d")
  got = ip.expand_placeholder_text(
      text, grids["image"], grids["video"], video_timestamps=times)
  assert got == want

  # The ids version agrees with the text version under a toy tokenizer.
  vocab = {tok.image_token: 10, tok.video_token: 11,
           tok.vision_start_token: 12, tok.vision_end_token: 13}
  def encode(s):
    out, i = [], 0
    while i < len(s):
      for name, j in vocab.items():
        if s.startswith(name, i):
          out.append(j)
          i += len(name)
          break
      else:
        out.append(100 + ord(s[i]))
        i += 1
    return out
  ids_tok = VisionTokens(10, 11, 12, 13)
  ids = ip.expand_placeholder_ids(
      encode(text), grids["image"], grids["video"], video_timestamps=times,
      encode=encode, tokens=ids_tok)
  assert ids == encode(want)


def test_placeholder_errors():
  with pytest.raises(ValueError, match=r"image_grid_thw: expected one grid "
                     r"per <\|image_pad\|> in text \(2\), found 1"):
    ip.expand_placeholder_text("<|image_pad|> <|image_pad|>", [[1, 2, 2]])
  with pytest.raises(ValueError, match=r"video_grid_thw: expected one grid "
                     r"per video_token_id \(248057\) in ids \(0\), found 1"):
    ip.expand_placeholder_ids([1, 2], video_grid_thw=[[2, 2, 2]])
  with pytest.raises(ValueError, match=r"encode: expected a tokenizer"):
    ip.expand_placeholder_ids([248057], video_grid_thw=[[1, 2, 2]],
                              video_timestamps=[[0.5]])
  with pytest.raises(ValueError, match=r"video_timestamps\[0\]: expected 2 "
                     r"times"):
    ip.expand_placeholder_text("<|video_pad|>", video_grid_thw=[[2, 2, 2]],
                               video_timestamps=[[0.5]])
