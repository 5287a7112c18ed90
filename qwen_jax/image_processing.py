"""Image and video preprocessing for the vision tower, with Pillow and NumPy.

The math of transformers' Qwen2-VL image processor (its Pillow backend,
`image_processing_pil_qwen2_vl`), which Qwen3.5 checkpoints name, and of
the Qwen3-VL video processor that Qwen3.5 uses for videos:

  1. RGB: an image with alpha (or a palette with a transparent entry) is
     composited onto white; grey and palette images are expanded.
  2. Smart resize: both sides rounded to multiples of patch_size *
     merge_size, the aspect ratio kept as far as possible, the pixel count
     brought within [min_pixels, max_pixels] (`smart_resize`; videos count
     the frames too, `smart_resize_video`). Pillow's bicubic filter.
  3. x * rescale_factor (in float64, stored float32), then (x - mean) / std.
  4. Patches in merge-block order, each flattened as [C, T, P, P]: an image
     is repeated T (temporal_patch_size) times; a video's frames are taken
     T at a time, the last frame repeated to fill the final group.

The output is what transformers' processor returns: `pixel_values` float32
[n_patches, C*T*P*P] with `image_grid_thw` int64 [n_images, 3], and
`pixel_values_videos` with `video_grid_thw`. Frames are resized with Pillow
like images; transformers' video processor resizes with torchvision, so its
video values differ from these by the two libraries' filters (the grids
agree). Frames are used as given: sample them beforehand.

`expand_placeholder_text` / `expand_placeholder_ids` turn the one
placeholder per image or video of a chat prompt into the right number of
tokens, as transformers' Qwen3-VL processor does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import PIL.Image

from qwen_jax.vision import VisionTokens
from qwen_jax.vision import check_grid_thw

IMAGE_CONFIG_NAME = "preprocessor_config.json"
VIDEO_CONFIG_NAME = "video_preprocessor_config.json"
# Pillow's resampling filters (PIL.Image.Resampling values).
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic",
             4: "box", 5: "hamming"}
_MAX_ASPECT = 200


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
  """Settings of the image or the video processor.

  Attributes:
    min_pixels: smallest pixel count after resizing (`size.shortest_edge`
      in transformers' files; frames x pixels for videos).
    max_pixels: largest pixel count (`size.longest_edge`).
    patch_size: P.
    temporal_patch_size: T.
    merge_size: m; sides become multiples of P * m.
    image_mean: per-channel mean (3 values).
    image_std: per-channel std (3 values).
    rescale_factor: multiplies the 0..255 values.
    do_resize, do_rescale, do_normalize, do_convert_rgb: the steps.
    resample: Pillow filter (3 = bicubic).
    cap_pixels_per_frame: videos: cap each frame's pixels at
      min(max_video_tokens * (P m)^2, max_pixels / frames), at least
      1.05 min_pixels (transformers' Qwen3-VL option).
    max_video_tokens: the per-frame token cap above.
  """

  min_pixels: int
  max_pixels: int
  patch_size: int
  temporal_patch_size: int
  merge_size: int
  image_mean: tuple[float, ...]
  image_std: tuple[float, ...]
  rescale_factor: float = 1 / 255
  do_resize: bool = True
  do_rescale: bool = True
  do_normalize: bool = True
  do_convert_rgb: bool = True
  resample: int = 3
  cap_pixels_per_frame: bool = False
  max_video_tokens: int = 768

  def __post_init__(self):
    def bad(field, expected, found):
      raise ValueError(f"{field}: expected {expected}, found {found!r}")

    for f in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size",
              "merge_size", "max_video_tokens"):
      x = getattr(self, f)
      if (not isinstance(x, (int, np.integer)) or isinstance(x, bool)
          or x < 1):
        bad(f, "a positive integer", x)
      object.__setattr__(self, f, int(x))
    if self.min_pixels > self.max_pixels:
      bad("min_pixels", f"at most max_pixels={self.max_pixels}",
          self.min_pixels)
    for f in ("image_mean", "image_std"):
      x = getattr(self, f)
      if isinstance(x, (int, float)) and not isinstance(x, bool):
        x = (x,) * 3
      if (not isinstance(x, (list, tuple)) or len(x) != 3 or not all(
          isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v) for v in x)):
        bad(f, "3 finite numbers (one per RGB channel)", x)
      object.__setattr__(self, f, tuple(float(v) for v in x))
    if any(s == 0 for s in self.image_std):
      bad("image_std", "non-zero values", self.image_std)
    x = self.rescale_factor
    if (not isinstance(x, (int, float)) or isinstance(x, bool) or
        not math.isfinite(x)):
      bad("rescale_factor", "a finite number", x)
    object.__setattr__(self, "rescale_factor", float(x))
    for f in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb",
              "cap_pixels_per_frame"):
      if not isinstance(getattr(self, f), bool):
        bad(f, "True or False", getattr(self, f))
    if self.resample not in _RESAMPLE or isinstance(self.resample, bool):
      bad("resample", f"a Pillow filter in {_RESAMPLE}", self.resample)

  @property
  def factor(self) -> int:
    """Sides are multiples of this: patch_size * merge_size."""
    return self.patch_size * self.merge_size

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], defaults: "ProcessorConfig",
                source: str = "") -> "ProcessorConfig":
    """From a transformers preprocessor JSON object over `defaults`.

    `size` {shortest_edge, longest_edge} gives min/max pixels; top-level
    min_pixels / max_pixels override it (as transformers does). Keys that
    name classes or other processors' options are ignored.

    Raises:
      ValueError: a bad value, naming the field and `source`.
    """
    kw = dataclasses.asdict(defaults)
    size = d.get("size")
    if size is not None:
      if not isinstance(size, Mapping):
        raise ValueError(f"size: expected an object with shortest_edge and "
                         f"longest_edge, found {size!r}{_where(source)}")
      if "shortest_edge" in size:
        kw["min_pixels"] = size["shortest_edge"]
      if "longest_edge" in size:
        kw["max_pixels"] = size["longest_edge"]
    for key in ("min_pixels", "max_pixels"):
      if d.get(key) is not None:
        kw[key] = d[key]
    for f in dataclasses.fields(cls):
      if f.name in d and f.name not in ("min_pixels", "max_pixels"):
        kw[f.name] = d[f.name]
    try:
      return cls(**kw)
    except ValueError as e:
      raise ValueError(f"{e}{_where(source)}") from None


def _where(source: str) -> str:
  return f" (in {source})" if source else ""


# transformers' defaults: the Qwen2-VL image processor's class attributes
# (CLIP mean/std, 14-pixel patches) and the Qwen3-VL video processor's.
# Qwen3.5's files set their own (16-pixel patches, mean = std = 0.5).
IMAGE_DEFAULTS = ProcessorConfig(
    min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14,
    temporal_patch_size=2, merge_size=2,
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711))
VIDEO_DEFAULTS = ProcessorConfig(
    min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768, patch_size=16,
    temporal_patch_size=2, merge_size=2, image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5))


# ------------------------------------------------------------ resizing math
def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
  """(height, width) for an image: multiples of `factor`, pixels in range.

  Each side is rounded to the nearest multiple of `factor` (Python's
  round, halves to even); if the area is then above max_pixels (below
  min_pixels) both sides shrink (grow) by the same ratio, rounded down (up)
  to multiples, never below one `factor`.

  Raises:
    ValueError: an aspect ratio above 200.
  """
  if max(height, width) / min(height, width) > _MAX_ASPECT:
    raise ValueError(f"image size: expected an aspect ratio of at most "
                     f"{_MAX_ASPECT}, found {height} x {width}")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def smart_resize_video(num_frames: int, height: int, width: int,
                       temporal_factor: int, factor: int, min_pixels: int,
                       max_pixels: int) -> tuple[int, int]:
  """(height, width) of a video's frames (Qwen3-VL's rule).

  Like `smart_resize`, with the pixel budget counted over the frames
  (frames rounded to a multiple of temporal_factor), and sides below
  `factor` first scaled up to it.

  Raises:
    ValueError: fewer frames than temporal_factor, or an aspect ratio
      above 200.
  """
  if num_frames < temporal_factor:
    raise ValueError(f"video frames: expected at least temporal_patch_size="
                     f"{temporal_factor}, found {num_frames}")
  if height < factor or width < factor:
    scale = max(factor / height, factor / width)
    height, width = int(height * scale), int(width * scale)
  if max(height, width) / min(height, width) > _MAX_ASPECT:
    raise ValueError(f"video size: expected an aspect ratio of at most "
                     f"{_MAX_ASPECT}, found {height} x {width}")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  t = round(num_frames / temporal_factor) * temporal_factor
  if t * h * w > max_pixels:
    beta = math.sqrt(num_frames * height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif t * h * w < min_pixels:
    beta = math.sqrt(min_pixels / (num_frames * height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


# ------------------------------------------------------------------ pixels
def _to_pil(x: Any, name: str) -> PIL.Image.Image:
  """A Pillow image from a Pillow image or a uint8 array [H, W(, C)]."""
  if isinstance(x, PIL.Image.Image):
    return x
  if isinstance(x, np.ndarray):
    if x.dtype != np.uint8:
      raise ValueError(f"{name}: expected uint8 values 0..255, found dtype "
                       f"{x.dtype}")
    if x.ndim == 3 and x.shape[-1] == 1:
      x = x[..., 0]
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (3, 4)):
      return PIL.Image.fromarray(x)
    raise ValueError(f"{name}: expected an array [H, W] or [H, W, C] with C "
                     f"in (1, 3, 4), found shape {x.shape}")
  raise ValueError(f"{name}: expected a PIL.Image or a uint8 NumPy array, "
                   f"found {type(x).__name__}")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """RGB, with any transparency composited onto white."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def _prepare(x: Any, name: str, cfg: ProcessorConfig) -> PIL.Image.Image:
  image = _to_pil(x, name)
  if cfg.do_convert_rgb:
    return to_rgb(image)
  if image.mode != "RGB":
    raise ValueError(f"{name}: expected an RGB image with do_convert_rgb="
                     f"False, found mode {image.mode!r}")
  return image


def _normalize(image: PIL.Image.Image, cfg: ProcessorConfig) -> np.ndarray:
  """[C, H, W] float32 after rescale and normalisation."""
  x = np.asarray(image).transpose(2, 0, 1)
  if cfg.do_rescale:
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
  else:
    x = x.astype(np.float32)
  if cfg.do_normalize:
    mean = np.asarray(cfg.image_mean, np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, np.float32)[:, None, None]
    x = (x - mean) / std
  return x


def _patchify(frames: np.ndarray, cfg: ProcessorConfig) -> np.ndarray:
  """[F, C, H, W] (F a multiple of T) -> [F/T * gh * gw, C*T*P*P]."""
  f, c, h, w = frames.shape
  p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  gh, gw = h // p, w // p
  x = frames.reshape(f // t, t, c, gh // m, m, p, gw // m, m, p)
  # -> (frame group, block row, block col, row in block, col in block,
  #     C, T, P, P): merge-block order, each patch flattened [C, T, P, P].
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return x.reshape(f // t * gh * gw, c * t * p * p)


def _check_size(h: int, w: int, cfg: ProcessorConfig, name: str) -> None:
  if h % cfg.factor or w % cfg.factor:
    raise ValueError(f"{name}: with do_resize=False expected sides that are "
                     f"multiples of patch_size * merge_size = {cfg.factor}, "
                     f"found {h} x {w}")


def process_image(image: Any, cfg: ProcessorConfig,
                  name: str = "image") -> tuple[np.ndarray, np.ndarray]:
  """(patches float32 [gh * gw, C*T*P*P], grid [1, gh, gw]) of one image."""
  im = _prepare(image, name, cfg)
  w, h = im.size
  if cfg.do_resize:
    try:
      rh, rw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
    im = im.resize((rw, rh), resample=cfg.resample)
    h, w = rh, rw
  else:
    _check_size(h, w, cfg, name)
  x = _normalize(im, cfg)[None]
  x = np.repeat(x, cfg.temporal_patch_size, axis=0)
  p = cfg.patch_size
  return _patchify(x, cfg), np.array([1, h // p, w // p], np.int64)


def process_video(frames: Any, cfg: ProcessorConfig,
                  name: str = "video") -> tuple[np.ndarray, np.ndarray]:
  """(patches float32 [gt * gh * gw, C*T*P*P], grid [gt, gh, gw])."""
  if isinstance(frames, np.ndarray) and frames.ndim in (3, 4):
    frames = list(frames)
  if not isinstance(frames, (list, tuple)) or not frames:
    raise ValueError(f"{name}: expected a non-empty list of frames or an "
                     f"array [frames, H, W(, C)], found "
                     f"{type(frames).__name__}")
  ims = [_prepare(f, f"{name}[{i}]", cfg) for i, f in enumerate(frames)]
  w, h = ims[0].size
  for i, im in enumerate(ims):
    if im.size != (w, h):
      raise ValueError(f"{name}[{i}]: expected every frame of size {w} x "
                       f"{h} (width x height) like frame 0, found "
                       f"{im.size[0]} x {im.size[1]}")
  t = cfg.temporal_patch_size
  if cfg.do_resize:
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
      cap = cfg.max_video_tokens * cfg.factor * cfg.factor
      per_frame = max(min(cap, cfg.max_pixels // len(ims)),
                      int(cfg.min_pixels * 1.05))
      max_pixels = per_frame * len(ims)
    try:
      rh, rw = smart_resize_video(len(ims), h, w, t, cfg.factor,
                                  cfg.min_pixels, max_pixels)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
    ims = [im.resize((rw, rh), resample=cfg.resample) for im in ims]
    h, w = rh, rw
  else:
    _check_size(h, w, cfg, name)
  x = np.stack([_normalize(im, cfg) for im in ims])
  if len(ims) % t:  # fill the last group with the last frame
    x = np.concatenate([x, np.repeat(x[-1:], t - len(ims) % t, axis=0)])
  p = cfg.patch_size
  grid = np.array([x.shape[0] // t, h // p, w // p], np.int64)
  return _patchify(x, cfg), grid


class VisionProcessor:
  """Images and videos -> the tower's inputs (transformers' keys).

  Attributes:
    image: the image settings.
    video: the video settings.
  """

  def __init__(self, image: ProcessorConfig = IMAGE_DEFAULTS,
               video: ProcessorConfig | None = None):
    self.image = image
    self.video = VIDEO_DEFAULTS if video is None else video

  def __call__(self, images: Any = None,
               videos: Any = None) -> dict[str, np.ndarray]:
    """Preprocesses images and/or videos.

    Args:
      images: a list of images (PIL images or uint8 arrays [H, W(, C)]), or
        one image.
      videos: a list of videos, each a list of frames (as images) or a
        uint8 array [frames, H, W(, C)].

    Returns:
      {"pixel_values" float32 [n, C*T*P*P], "image_grid_thw" int64
      [n_images, 3]} for images, {"pixel_values_videos",
      "video_grid_thw"} for videos (both sets when both are given).

    Raises:
      ValueError: neither given, an input of another type, or a size the
        resize rule refuses (naming images[i] / videos[i]).
    """
    if images is None and videos is None:
      raise ValueError("images, videos: expected at least one, found "
                       "neither")
    out = {}
    if images is not None:
      if isinstance(images, (PIL.Image.Image, np.ndarray)):
        images = [images]
      if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images: expected a non-empty list of images, "
                         f"found {type(images).__name__}")
      res = [process_image(im, self.image, f"images[{i}]")
             for i, im in enumerate(images)]
      out["pixel_values"] = np.concatenate([r[0] for r in res])
      out["image_grid_thw"] = np.stack([r[1] for r in res])
    if videos is not None:
      if not isinstance(videos, (list, tuple)) or not videos:
        raise ValueError(f"videos: expected a non-empty list of videos, "
                         f"found {type(videos).__name__}")
      res = [process_video(v, self.video, f"videos[{i}]")
             for i, v in enumerate(videos)]
      out["pixel_values_videos"] = np.concatenate([r[0] for r in res])
      out["video_grid_thw"] = np.stack([r[1] for r in res])
    return out


def _read_json(path: str) -> dict[str, Any]:
  import json  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    try:
      d = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object, found a JSON "
                     f"{type(d).__name__}")
  return d


def load_image_processor(path: str | os.PathLike) -> VisionProcessor:
  """The processor of a checkpoint folder.

  Reads preprocessor_config.json (images) and, when present,
  video_preprocessor_config.json (videos; otherwise the image file's
  values over the video defaults). Absent keys take transformers' class
  defaults (`IMAGE_DEFAULTS`, `VIDEO_DEFAULTS`).

  Raises:
    ValueError: no such folder or preprocessor_config.json, invalid JSON,
      or a bad value (naming the field and the file).
  """
  path = os.fspath(path)
  image_file = os.path.join(path, IMAGE_CONFIG_NAME)
  if not os.path.isdir(path):
    raise ValueError(f"path: expected a checkpoint folder, found {path!r}")
  if not os.path.exists(image_file):
    raise ValueError(f"{path}: expected {IMAGE_CONFIG_NAME}, found "
                     f"{sorted(os.listdir(path))}")
  d = _read_json(image_file)
  image = ProcessorConfig.from_dict(d, IMAGE_DEFAULTS, image_file)
  video_file = os.path.join(path, VIDEO_CONFIG_NAME)
  if os.path.exists(video_file):
    video = ProcessorConfig.from_dict(_read_json(video_file), VIDEO_DEFAULTS,
                                      video_file)
  else:
    video = ProcessorConfig.from_dict(d, VIDEO_DEFAULTS, image_file)
  return VisionProcessor(image, video)


# ------------------------------------------------------------ placeholders
def video_frame_times(frame_indices: Sequence[int], fps: float,
                     temporal_patch_size: int = 2) -> list[float]:
  """Seconds of each temporal patch of a video (Qwen3-VL's prompt times).

  The indices (of the sampled frames in the source video) are padded with
  the last one to a multiple of T; each group of T gives the mean of its
  first and last frame times.
  """
  idx = [int(i) for i in frame_indices]
  if not idx or not fps or fps <= 0:
    raise ValueError(f"frame_indices, fps: expected frames and fps > 0, "
                     f"found {len(idx)} frames at fps {fps!r}")
  t = temporal_patch_size
  idx += [idx[-1]] * (-len(idx) % t)
  secs = [i / fps for i in idx]
  return [(secs[i] + secs[i + t - 1]) / 2 for i in range(0, len(secs), t)]


def _frame_counts(grid_thw: Any, merge_size: int, name: str):
  if grid_thw is None:
    return []
  g = check_grid_thw(grid_thw, merge_size, name)
  return [(int(t), int(h * w) // merge_size ** 2) for t, h, w in g]


def _check_timestamps(video_timestamps: Any, frames, name: str):
  if video_timestamps is None:
    return None
  if len(video_timestamps) != len(frames):
    raise ValueError(f"{name}: expected one list per video "
                     f"({len(frames)}), found {len(video_timestamps)}")
  for i, ((t, _), ts) in enumerate(zip(frames, video_timestamps)):
    if len(ts) != t:
      raise ValueError(f"{name}[{i}]: expected {t} times (one per temporal "
                       f"patch of video_grid_thw), found {len(ts)}")
  return video_timestamps


def expand_placeholder_text(
    text: str, image_grid_thw: Any = None, video_grid_thw: Any = None, *,
    merge_size: int = 2, video_timestamps: Sequence[Sequence[float]] |
    None = None, tokens: VisionTokens = VisionTokens()) -> str:
  """Expands each image and video placeholder of a prompt.

  The k-th `<|image_pad|>` becomes t*h*w/m^2 copies for image k. Each video
  placeholder (`<|vision_start|><|video_pad|><|vision_end|>` as the chat
  template writes it, or a bare `<|video_pad|>`) becomes, per temporal
  patch: `<{s:.1f} seconds>` (when times are given), `<|vision_start|>`,
  h*w/m^2 `<|video_pad|>`, `<|vision_end|>`.

  Args:
    text: the prompt.
    image_grid_thw: [n_images, 3] or None.
    video_grid_thw: [n_videos, 3] or None.
    merge_size: m.
    video_timestamps: per video, seconds per temporal patch
      (`video_frame_times`), or None for no time text.
    tokens: the placeholder strings.

  Raises:
    ValueError: placeholder counts that differ from the grids' counts.
  """
  images = _frame_counts(image_grid_thw, merge_size, "image_grid_thw")
  videos = _frame_counts(video_grid_thw, merge_size, "video_grid_thw")
  times = _check_timestamps(video_timestamps, videos, "video_timestamps")
  parts = text.split(tokens.image_token)
  if len(parts) - 1 != len(images):
    raise ValueError(f"image_grid_thw: expected one grid per "
                     f"{tokens.image_token} in text ({len(parts) - 1}), "
                     f"found {len(images)}")
  out = parts[0]
  for (t, n), rest in zip(images, parts[1:]):
    out += tokens.image_token * (t * n) + rest
  wrapper = tokens.vision_start_token + tokens.video_token + (
      tokens.vision_end_token)
  parts = out.replace(wrapper, tokens.video_token).split(tokens.video_token)
  if len(parts) - 1 != len(videos):
    raise ValueError(f"video_grid_thw: expected one grid per "
                     f"{tokens.video_token} in text ({len(parts) - 1}), "
                     f"found {len(videos)}")
  out = parts[0]
  for k, ((t, n), rest) in enumerate(zip(videos, parts[1:])):
    for f in range(t):
      if times is not None:
        out += f"<{times[k][f]:.1f} seconds>"
      out += (tokens.vision_start_token + tokens.video_token * n +
              tokens.vision_end_token)
    out += rest
  return out


def expand_placeholder_ids(
    ids: Sequence[int], image_grid_thw: Any = None,
    video_grid_thw: Any = None, *, merge_size: int = 2,
    video_timestamps: Sequence[Sequence[float]] | None = None,
    encode: Callable[[str], Sequence[int]] | None = None,
    tokens: VisionTokens = VisionTokens()) -> list[int]:
  """`expand_placeholder_text` on token ids (one prompt).

  Args:
    ids: the prompt's ids, one image_token_id per image and one
      video_token_id (alone or between vision start/end) per video.
    image_grid_thw, video_grid_thw, merge_size, tokens: as for text.
    video_timestamps: per video, seconds per temporal patch, or None.
    encode: text -> ids (the tokenizer) for the time text; needed with
      video_timestamps.

  Raises:
    ValueError: placeholder counts that differ from the grids' counts, or
      times without `encode`.
  """
  images = _frame_counts(image_grid_thw, merge_size, "image_grid_thw")
  videos = _frame_counts(video_grid_thw, merge_size, "video_grid_thw")
  times = _check_timestamps(video_timestamps, videos, "video_timestamps")
  if times is not None and encode is None:
    raise ValueError("encode: expected a tokenizer function for the video "
                     "times, found None")
  ids = [int(i) for i in ids]
  n_img = sum(i == tokens.image_token_id for i in ids)
  n_vid = sum(i == tokens.video_token_id for i in ids)
  if n_img != len(images):
    raise ValueError(f"image_grid_thw: expected one grid per image_token_id "
                     f"({tokens.image_token_id}) in ids ({n_img}), found "
                     f"{len(images)}")
  if n_vid != len(videos):
    raise ValueError(f"video_grid_thw: expected one grid per video_token_id "
                     f"({tokens.video_token_id}) in ids ({n_vid}), found "
                     f"{len(videos)}")
  start, end = tokens.vision_start_token_id, tokens.vision_end_token_id
  out: list[int] = []
  ki = kv = 0
  i = 0
  while i < len(ids):
    x = ids[i]
    if x == tokens.image_token_id:
      t, n = images[ki]
      out += [x] * (t * n)
      ki += 1
    elif x == tokens.video_token_id:
      # Drop the template's wrapper: every frame gets its own.
      if (out and out[-1] == start and i + 1 < len(ids) and
          ids[i + 1] == end):
        out.pop()
        i += 1
      t, n = videos[kv]
      for f in range(t):
        if times is not None:
          out += [int(j) for j in encode(f"<{times[kv][f]:.1f} seconds>")]
        out += [start] + [x] * n + [end]
      kv += 1
    else:
      out.append(x)
    i += 1
  return out
