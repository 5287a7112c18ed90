"""Images and videos through the whole model, against transformers.

The reference is a tiny randomised `Qwen3_5ForConditionalGeneration`
(float32, CPU) written by transformers' own `save_pretrained`, with its
placeholder ids inside the 128-token vocabulary; we load that folder once
(module fixture) and compare:

  * logits (`tolerances.HF_LOGITS_REL`) for one image, two images of
    different non-square grids, a grid larger than the 4 x 4 position
    table, a video beside an image, and a left-padded batch;
  * greedy generation with images, left padded, the prompt's prefill
    blocks cutting an image in two: transformers' `generate`, token for
    token;
  * checkpoints: our random multimodal params saved (sharded) load in
    transformers with our logits; transformers' sharded save loads as its
    single file does; a save over a text-only folder switches it to the
    multimodal layout, keeping what it does not own, and a text-only save
    into a multimodal folder carries its tower;
  * text alone: a model with a tower gives bit for bit the logits of the
    same language model without one;
  * training: the loss with an image and the tower's gradients equal
    torch's (placeholder targets left out of the loss), and a train step
    reports torch's loss and gradient norm and moves the tower;
  * bad inputs: one ValueError naming the argument, expected and found.
"""

import functools
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from experiments import generate as script
import qwen_jax
from qwen_jax import checkpoint
from qwen_jax import data
from qwen_jax import image_processing
from qwen_jax import train_step
from qwen_jax import vision
from qwen_jax.config import FULL, LINEAR
from qwen_jax.generate import stream
from tests import hf_utils
from tests import tolerances

VOCAB = 128
START, END, IMAGE, VIDEO = 124, 125, 126, 127
TEXT_MAX = 120  # text ids are drawn below this
MERGE = 2
PATCH_DIM = 3 * 2 * 4 * 4  # make_vision_config: C * T * P * P


def _hf_config() -> transformers.Qwen3_5Config:
  text = hf_utils.make_text_config(
      layer_types=[LINEAR, LINEAR, LINEAR, FULL],
      rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                       "partial_rotary_factor": 0.25,
                       "mrope_section": [2, 1, 1]})
  return transformers.Qwen3_5Config(
      text_config=text.to_dict(),
      vision_config=hf_utils.make_vision_config().to_dict(),
      image_token_id=IMAGE, video_token_id=VIDEO,
      vision_start_token_id=START, vision_end_token_id=END)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
  """(folder, torch model, our cfg, our params)."""
  torch.manual_seed(0)
  model = transformers.Qwen3_5ForConditionalGeneration(_hf_config()).float()
  hf_utils.randomize_(model, 31)
  model.eval()
  path = tmp_path_factory.mktemp("vlm") / "ckpt"
  model.save_pretrained(path)
  cfg, params = qwen_jax.load_hf_checkpoint(path)
  return str(path), model, cfg, params


# ------------------------------------------------------------------ prompts
def _text(rng, n):
  return [int(x) for x in rng.integers(0, TEXT_MAX, n)]


def _image(t, h, w):
  return [START] + [IMAGE] * (t * h * w // MERGE ** 2) + [END]


def _video(grid):
  return image_processing.expand_placeholder_ids(
      [START, VIDEO, END], video_grid_thw=grid, merge_size=MERGE,
      tokens=vision.VisionTokens(image_token_id=IMAGE, video_token_id=VIDEO,
                                 vision_start_token_id=START,
                                 vision_end_token_id=END))


def _pixels(rng, grid):
  n = int(np.asarray(grid).prod(axis=1).sum())
  return rng.standard_normal((n, PATCH_DIM)).astype(np.float32)


def _pad_left(rows):
  width = max(map(len, rows))
  ids = np.array([[0] * (width - len(r)) + r for r in rows], np.int64)
  mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                  np.int64)
  return ids, mask


def _case(name):
  """(ids [b, t], mask or None, media kwargs with NumPy grids)."""
  rng = np.random.default_rng(sum(map(ord, name)))
  if name == "one_image":
    grid = [[1, 4, 6]]
    ids = [_text(rng, 5) + _image(1, 4, 6) + _text(rng, 4)]
    return np.array(ids), None, dict(pixel_values=_pixels(rng, grid),
                                     image_grid_thw=np.array(grid))
  if name == "two_images":  # different non-square grids
    grid = [[1, 6, 2], [1, 2, 8]]
    ids = [_text(rng, 3) + _image(1, 6, 2) + _text(rng, 2) +
           _image(1, 2, 8) + _text(rng, 3)]
    return np.array(ids), None, dict(pixel_values=_pixels(rng, grid),
                                     image_grid_thw=np.array(grid))
  if name == "large_grid":  # 10 x 12 patches over a 4 x 4 position table
    grid = [[1, 10, 12]]
    ids = [_text(rng, 2) + _image(1, 10, 12) + _text(rng, 3)]
    return np.array(ids), None, dict(pixel_values=_pixels(rng, grid),
                                     image_grid_thw=np.array(grid))
  if name == "video":  # a 3-frame video after an image
    image, video = [[1, 2, 2]], [[3, 4, 4]]
    ids = [_text(rng, 2) + _image(1, 2, 2) + _text(rng, 2) + _video(video) +
           _text(rng, 3)]
    return np.array(ids), None, dict(
        pixel_values=_pixels(rng, image), image_grid_thw=np.array(image),
        pixel_values_videos=_pixels(rng, video),
        video_grid_thw=np.array(video))
  if name == "left_padding":  # image row, shorter text row, two images
    grid = [[1, 4, 4], [1, 2, 4], [1, 2, 2]]
    ids, mask = _pad_left([
        _text(rng, 3) + _image(1, 4, 4) + _text(rng, 2), _text(rng, 6),
        _image(1, 2, 4) + _text(rng, 1) + _image(1, 2, 2) + _text(rng, 2)])
    return ids, mask, dict(pixel_values=_pixels(rng, grid),
                           image_grid_thw=np.array(grid))
  raise ValueError(name)


CASES = ("one_image", "two_images", "large_grid", "video", "left_padding")


def _types(ids, mask):
  types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
  return types if mask is None else types * mask


@torch.no_grad()
def _hf_logits(model, ids, mask, media):
  kw = {k: torch.tensor(v) for k, v in media.items()}
  if mask is not None:
    kw["attention_mask"] = torch.tensor(mask)
  out = model(input_ids=torch.tensor(ids), use_cache=False,
              mm_token_type_ids=torch.tensor(_types(ids, mask)), **kw)
  return out.logits.numpy()


@functools.lru_cache(maxsize=None)
def _forward(cfg, grids):
  """Our jitted forward for one grid set (grids static, closed over)."""
  grids = dict(grids)

  def fn(params, ids, mask, pixels):
    return qwen_jax.Qwen35(cfg).apply(
        {"params": params}, ids, attention_mask=mask, **pixels, **grids)
  return jax.jit(fn)


def _ours(cfg, params, ids, mask, media):
  grids = tuple((k, vision.grid_key(v)) for k, v in media.items()
                if k.endswith("grid_thw"))
  pixels = {k: v for k, v in media.items() if not k.endswith("grid_thw")}
  return np.asarray(_forward(cfg, grids)(params, ids, mask, pixels))


# ------------------------------------------------------------------ logits
@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(vlm, name):
  _, model, cfg, params = vlm
  ids, mask, media = _case(name)
  ref = _hf_logits(model, ids, mask, media)
  ours = _ours(cfg, params, ids, mask, media)
  real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
  err = tolerances.max_rel_err(ours[real], ref[real])
  assert err < tolerances.HF_LOGITS_REL, (name, err)


def test_text_alone_is_the_language_model_bit_for_bit(vlm):
  _, _, cfg, params = vlm
  rng = np.random.default_rng(7)
  ids = rng.integers(0, TEXT_MAX, (2, 21))
  text_params = {k: v for k, v in params.items() if k != "visual"}
  with_tower = _ours(cfg, params, ids, None, {})
  alone = _ours(cfg.replace(vision=None), text_params, ids, None, {})
  np.testing.assert_array_equal(with_tower, alone)


# -------------------------------------------------------------- generation
def test_greedy_generation_matches_transformers(vlm):
  _, model, cfg, params = vlm
  rng = np.random.default_rng(3)
  grid = np.array([[1, 4, 6], [1, 2, 4]])
  ids, mask = _pad_left([
      _text(rng, 5) + _image(1, 4, 6) + _text(rng, 4),
      _text(rng, 2) + _image(1, 2, 4) + _text(rng, 3)])
  pixels = _pixels(rng, grid)
  with torch.no_grad():
    ref = model.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
        pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
        mm_token_type_ids=torch.tensor(_types(ids, mask)), max_new_tokens=6,
        do_sample=False, eos_token_id=None, pad_token_id=0)
  # Blocks of 12 tokens: the first image is cut between two of them.
  ours = qwen_jax.generate(cfg, params, ids, 6, attention_mask=mask,
                           pixel_values=pixels, image_grid_thw=grid,
                           stop_tokens=(), prefill_block=12)
  np.testing.assert_array_equal(np.asarray(ours),
                                ref[:, ids.shape[1]:].numpy())
  # The decode layout built by qwen_jax.quantize keeps the tower as it is.
  laid_out = qwen_jax.quantize(cfg, params, "float32")
  ours = qwen_jax.generate(cfg, laid_out, ids, 6, attention_mask=mask,
                           pixel_values=pixels, image_grid_thw=grid,
                           stop_tokens=(), prefill_block=12)
  np.testing.assert_array_equal(np.asarray(ours),
                                ref[:, ids.shape[1]:].numpy())


# -------------------------------------------------------------- checkpoints
def test_our_save_loads_in_transformers_with_our_logits(vlm, tmp_path):
  _, _, cfg, _ = vlm
  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map(
      lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
      checkpoint.param_shapes(cfg))
  qwen_jax.save_hf_checkpoint(tmp_path, cfg, params, max_shard_bytes=100_000)
  assert len(hf_utils.safetensors_files(tmp_path)) > 1
  config = hf_utils.read_config(tmp_path)
  assert config["model_type"] == "qwen3_5"
  assert config["image_token_id"] == IMAGE
  model, info = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
      tmp_path, dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids, mask, media = _case("two_images")
  ref = _hf_logits(model.eval(), ids, mask, media)
  ours = _ours(cfg, params, ids, mask, media)
  assert tolerances.max_rel_err(ours, ref) < tolerances.HF_LOGITS_REL
  back_cfg, back = qwen_jax.load_hf_checkpoint(tmp_path)
  assert back_cfg == cfg
  chex.assert_trees_all_equal(back, params)


def test_transformers_sharded_save_loads_as_its_single_file(vlm, tmp_path):
  _, model, cfg, params = vlm
  model.save_pretrained(tmp_path, max_shard_size="100KB")
  assert len(hf_utils.safetensors_files(tmp_path)) > 1
  back_cfg, back = qwen_jax.load_hf_checkpoint(tmp_path)
  assert back_cfg == cfg and "visual" in back
  chex.assert_trees_all_equal(back, params)


def test_saves_switch_layouts_and_keep_what_they_do_not_own(vlm, tmp_path):
  """A model with a tower saved over a text-only checkpoint of its language
  model: the multimodal layout, the old text tensors replaced, a foreign
  tensor and config entry kept. Its language model alone (vision=None)
  saved into a multimodal folder: the tower there is carried bit for bit."""
  _, model, cfg, params = vlm
  text_cfg = cfg.replace(vision=None)
  text_params = {k: v for k, v in params.items() if k != "visual"}
  dst = tmp_path / "text"
  qwen_jax.save_hf_checkpoint(dst, text_cfg, text_params)
  hf_utils.add_fake_mtp(dst)
  hf_utils.edit_config(dst, lambda d: d.update(my_field=[1, 2]))
  qwen_jax.save_hf_checkpoint(dst, cfg, params)
  keys = sorted(hf_utils.read_tensors(dst))
  assert not [k for k in keys if k.startswith("model.layers.")]
  assert "model.language_model.norm.weight" in keys
  assert any(k.startswith("model.visual.") for k in keys)
  assert any(k.startswith("mtp.") for k in keys)
  config = hf_utils.read_config(dst)
  assert config["model_type"] == "qwen3_5"
  assert config["text_config"]["my_field"] == [1, 2]
  back_cfg, back = qwen_jax.load_hf_checkpoint(dst)
  assert back_cfg == cfg
  chex.assert_trees_all_equal(back, params)
  theirs = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
      dst, dtype=torch.float32).state_dict()
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(theirs[k].numpy(), v.numpy(), err_msg=k)

  mm = tmp_path / "multimodal"
  model.save_pretrained(mm)
  tower = {k: v for k, v in hf_utils.read_tensors(mm).items()
           if k.startswith("model.visual.")}
  qwen_jax.save_hf_checkpoint(
      mm, text_cfg, jax.tree_util.tree_map(lambda x: x * 2, text_params))
  after = hf_utils.read_tensors(mm)
  for k, v in tower.items():
    np.testing.assert_array_equal(after[k], v, err_msg=k)
  assert hf_utils.read_config(mm)["vision_config"]["depth"] == 1


# ----------------------------------------------------------------- training
def test_training_with_an_image_matches_torch(vlm):
  """The loss and the tower's gradients against torch's autograd; then a
  train step: its loss and gradient norm are torch's, the tower moves."""
  path, _, cfg, params = vlm
  ids, _, media = _case("one_image")
  targets = np.concatenate([ids[:, 1:], np.zeros((1, 1), ids.dtype)], 1)
  loss_mask = np.ones(ids.shape, np.float32)
  loss_mask[:, -1] = 0
  batch = dict(inputs=ids, targets=targets, loss_mask=loss_mask, **media)
  # torch: labels -100 at the placeholders (transformers shifts them).
  model = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
      path, dtype=torch.float32)
  labels = np.where(ids == IMAGE, -100, ids)
  out = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
              pixel_values=torch.tensor(media["pixel_values"]),
              image_grid_thw=torch.tensor(media["image_grid_thw"]),
              mm_token_type_ids=torch.tensor(_types(ids, None)),
              use_cache=False)
  out.loss.backward()
  theirs = dict(model.named_parameters())
  norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in theirs.values()
                              if p.grad is not None)))

  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, b: train_step.loss_and_stats(p, cfg, b), has_aux=True))
  (loss, stats), grads = grad_fn(params, data.with_static_grids(batch))
  assert int(stats["tokens"]) == int((labels[:, 1:] != -100).sum())
  tolerances.assert_close(loss, out.loss.item(), jnp.float32)
  for hf, ours_path, layout in vision.vision_weight_map(cfg.vision):
    g = grads["visual"]
    for p in ours_path:
      g = g[p]
    ref = vision.vision_to_ours(
        theirs["model.visual." + hf].grad.numpy(), layout)
    assert np.abs(ref).max() > 0, hf
    err = tolerances.max_rel_err(g, ref)
    assert err < tolerances.HF_GRAD_REL, (hf, err)

  tcfg = train_step.TrainConfig(batch_size=1, seq_len=ids.shape[1],
                                num_steps=2, warmup_steps=0,
                                learning_rate=1e-2)
  state = train_step.init_state(cfg, tcfg, jax.tree_util.tree_map(
      jnp.copy, params))
  new, metrics = train_step.make_train_step(cfg, tcfg)(state, batch)
  tolerances.assert_close(metrics["loss"], out.loss.item(), jnp.float32)
  tolerances.assert_close(metrics["grad_norm"], norm, jnp.float32)
  moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                 new.params["visual"], params["visual"])
  assert all(jax.tree_util.tree_leaves(moved))


# --------------------------------------------------------------- bad inputs
class TestBadInputs:
  """Each refused before any work, naming the argument, expected, found."""

  def _apply(self, cfg, params, ids, **kw):
    return qwen_jax.Qwen35(cfg).apply({"params": params}, ids, **kw)

  def test_placeholder_count_differs_from_the_features(self, vlm):
    _, _, cfg, params = vlm
    ids, _, media = _case("one_image")
    ids = ids.copy()
    ids[0, np.flatnonzero(ids[0] == IMAGE)[0]] = 3  # 5 placeholders left
    msg = (r"input_ids: expected 6 image_token_id \(126\) placeholders, one "
           r"per image feature of image_grid_thw \[\[1, 4, 6\]\] \(6 "
           r"features\), found 5 placeholders")
    with pytest.raises(ValueError, match=msg):
      self._apply(cfg, params, ids, **media)
    with pytest.raises(ValueError, match=msg):
      qwen_jax.generate(cfg, params, ids, 2, **media)

  def test_grid_differs_from_the_patches(self, vlm):
    _, _, cfg, params = vlm
    ids, _, media = _case("one_image")
    with pytest.raises(ValueError, match=(
        r"image_grid_thw: expected its patches \(sum of t \* h \* w = 24\) "
        r"to equal pixel_values' rows, found 20 rows")):
      self._apply(cfg, params, ids, pixel_values=media["pixel_values"][:20],
                  image_grid_thw=media["image_grid_thw"])

  def test_pixel_values_of_the_wrong_width(self, vlm):
    _, _, cfg, params = vlm
    ids, _, media = _case("one_image")
    with pytest.raises(ValueError, match=(
        r"pixel_values: expected shape \[n_patches, 96\] .*found \(24, 97\)")):
      self._apply(cfg, params, ids, image_grid_thw=media["image_grid_thw"],
                  pixel_values=np.zeros((24, 97), np.float32))

  def test_images_to_a_text_only_model(self, vlm):
    _, _, cfg, params = vlm
    ids, _, media = _case("one_image")
    text = {k: v for k, v in params.items() if k != "visual"}
    with pytest.raises(ValueError, match=(
        r"pixel_values: expected no images or videos for a text-only model "
        r"\(QwenConfig.vision is None\), found an array of shape \(24, 96\)")):
      self._apply(cfg.replace(vision=None), text, ids, **media)

  def test_a_video_without_a_video_token(self, vlm):
    _, _, cfg, params = vlm
    ids, _, media = _case("video")
    with pytest.raises(ValueError, match=(
        r"pixel_values_videos: expected no videos: the model has no video "
        r"placeholder \(video_token_id is None in its config\), found an "
        r"array of shape \(48, 96\)")):
      self._apply(cfg.replace(video_token_id=None), params, ids, **media)

  def test_a_traced_grid(self, vlm):
    _, _, cfg, params = vlm
    ids, _, media = _case("one_image")
    fn = jax.jit(lambda g: self._apply(
        cfg, params, ids, pixel_values=media["pixel_values"],
        image_grid_thw=g))
    with pytest.raises(ValueError, match=(
        r"image_grid_thw: expected concrete host values .*found a traced "
        r"array; pass it as a static argument")):
      fn(jnp.asarray(media["image_grid_thw"]))


# ---------------------------------------------------------------- the script
def test_generate_script_with_an_image(tmp_path):
  """experiments.generate --image, on the random tiny-vl model: the image
  preprocessed and its placeholders expanded before the prompt bytes."""
  rng = np.random.default_rng(11)
  pixels = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
  PIL.Image.fromarray(pixels).save(tmp_path / "a.png")
  out = io.StringIO()
  r = script.run(None, "Hi", max_new_tokens=3, images=[str(tmp_path /
                                                          "a.png")],
                 dtype="float32", out=out)
  assert out.getvalue().startswith("Hi")
  cfg, params = script.load(None, "float32", 0, vision_model=True)
  patches, grid = image_processing.process_image(
      PIL.Image.open(tmp_path / "a.png"), script.TINY_PROCESSOR)
  assert grid.tolist() == [1, 6, 8]  # 24 x 28 -> 24 x 32 pixels, 4-pixel
  ids = ([cfg.vision_start_token_id] + [cfg.image_token_id] * 12 +
         [cfg.vision_end_token_id] + list(b"Hi"))
  assert r["prompt_tokens"] == len(ids)
  # The script's own decode loop (stream, 8 steps a call): compiled once.
  want = np.concatenate(list(stream(
      cfg, params, np.array([ids]), 3, stop_tokens=[], block_steps=8,
      pixel_values=patches, image_grid_thw=grid[None])), axis=1)
  assert r["ids"] == want[0].tolist()
