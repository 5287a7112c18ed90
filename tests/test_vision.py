"""The vision tower against transformers' Qwen3_5VisionModel, and its config.

The reference is a tiny randomised `Qwen3_5VisionModel` in float32 on CPU;
our parameters come from its state dict through `vision_weight_map`, so the
map and the layouts are tested with the math. Presets are counted against
transformers' models built on the meta device.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from qwen_jax import vision
from qwen_jax.vision import VisionConfig
from tests import tolerances


def _hf_config(vcfg: VisionConfig) -> transformers.Qwen3_5VisionConfig:
  d = vcfg.to_hf_dict()
  d.pop("model_type")
  return transformers.Qwen3_5VisionConfig(**d)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Every parameter random: LayerNorm weights near 1, the rest N(0, s)."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
    if "norm" in name and name.endswith("weight"):
      p.copy_(1.0 + 0.2 * noise)
    elif "pos_embed" in name:
      p.copy_(0.5 * noise)
    else:
      p.copy_(0.15 * noise)


@pytest.fixture(scope="module")
def tiny():
  """(our config with small query blocks, HF model, our params)."""
  # Blocks of 8 queries: several blocks per image, windows across segments.
  vcfg = VisionConfig.from_preset("tiny", attention_block=8)
  torch.manual_seed(0)
  model = transformers.Qwen3_5VisionModel(_hf_config(vcfg)).eval()
  _randomize(model, seed=1)
  tensors = {vision.VISION_PREFIX + k: v.numpy()
             for k, v in model.state_dict().items()}
  return vcfg, model, tensors, vision.params_from_hf(vcfg, tensors)


@pytest.mark.parametrize("grid,block", [
    ([[1, 4, 4]], 8),               # one image, the table's own size
    ([[1, 4, 6], [1, 6, 2]], 8),    # two images, different non-square grids
    ([[1, 10, 12]], 8),             # larger than the 4 x 4 position table
    ([[3, 4, 6], [1, 2, 2]], 512),  # a 3-frame video, then an image; the
                                    # whole sequence in one query block
], ids=["one", "two", "large", "video"])
def test_tower_matches_transformers(tiny, grid, block):
  vcfg, model, _, params = tiny
  vcfg = vcfg.replace(attention_block=block)
  grid = np.array(grid)
  n = int(grid.prod(axis=1).sum())
  x = np.random.default_rng(n).standard_normal(
      (n, vcfg.patch_dim)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.tensor(x), grid_thw=torch.tensor(grid))
  ref = ref.pooler_output.numpy()
  ours = np.asarray(vision.encode(vcfg, params, x, grid))
  chex.assert_shape(ours, (n // 4, vcfg.out_hidden_size))
  assert tolerances.max_rel_err(ours, ref) < tolerances.HF_LOGITS_REL
  parts = vision.split_features(ours, grid, vcfg.spatial_merge_size)
  assert [p.shape[0] for p in parts] == list(grid.prod(axis=1) // 4)


@pytest.mark.parametrize("lens,block", [
    ([5], 4), ([3, 7, 2], 4), ([1, 9, 4], 16), ([2, 11, 3, 5], 3)])
def test_packed_attention_matches_per_segment_softmax(lens, block):
  rng = np.random.default_rng(sum(lens) * block)
  n, h, e = sum(lens), 2, 4
  q, k, v = (rng.standard_normal((n, h, e)) for _ in range(3))
  cu = np.concatenate([[0], np.cumsum(lens)])
  plan = vision.attention_plan(cu, block)
  ours = vision.packed_attention(jnp.asarray(q, jnp.float32),
                                 jnp.asarray(k, jnp.float32),
                                 jnp.asarray(v, jnp.float32), plan)
  ref = np.zeros_like(q)
  for a, b in zip(cu[:-1], cu[1:]):
    s = np.einsum("qhe,khe->hqk", q[a:b], k[a:b])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref[a:b] = np.einsum("hqk,khe->qhe", p, v[a:b])
  tolerances.assert_close(ours, ref, jnp.float32)
  assert plan.window <= n


def test_attention_plan_windows_stay_within_segments():
  """Frames of 64 tokens in blocks of 32: each block reads one frame."""
  plan = vision.attention_plan(np.arange(0, 8 * 64 + 1, 64), 32)
  assert plan.window == 64 and len(plan.key_starts) == 16
  np.testing.assert_array_equal(plan.key_starts, np.repeat(np.arange(8), 2)
                                * 64)


def test_weight_map_covers_the_checkpoint_and_round_trips(tiny):
  vcfg, _, tensors, params = tiny
  names = {vision.VISION_PREFIX + hf for hf, _, _ in
           vision.vision_weight_map(vcfg)}
  assert names == set(tensors)
  back = vision.params_to_hf(vcfg, params)
  assert set(back) == set(tensors)
  for key, x in tensors.items():
    np.testing.assert_array_equal(back[key], x, err_msg=key)
  chex.assert_trees_all_equal_shapes(params, vision.param_shapes(vcfg))


def test_params_from_hf_names_a_wrong_shape(tiny):
  vcfg, _, tensors, _ = tiny
  bad = dict(tensors)
  key = vision.VISION_PREFIX + "blocks.1.attn.qkv.weight"
  bad[key] = bad[key][:, :-1]
  with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight.*"
                     r"expected shape \(96, 32\).*found \(96, 31\)"):
    vision.params_from_hf(vcfg, bad)


@pytest.mark.parametrize("name", ["qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b",
                                  "qwen3.5-9b", "tiny"])
def test_preset_parameter_counts_match_transformers(name):
  vcfg = VisionConfig.from_preset(name)
  with torch.device("meta"):
    model = transformers.Qwen3_5VisionModel(_hf_config(vcfg))
  hf = sum(p.numel() for p in model.parameters())
  ours = sum(int(np.prod(x.shape)) for x in
             jax.tree_util.tree_leaves(vision.param_shapes(vcfg)))
  assert ours == hf == vcfg.num_params()


def test_hf_config_round_trip():
  for name in sorted(vision.VISION_PRESETS):
    vcfg = VisionConfig.from_preset(name)
    hf = _hf_config(vcfg)
    assert VisionConfig.from_hf_dict(hf) == vcfg
    assert VisionConfig.from_hf_dict(hf.to_dict()) == vcfg
  # transformers' defaults are ours.
  assert VisionConfig.from_hf_dict(transformers.Qwen3_5VisionConfig()) == (
      VisionConfig())
  # A released-style vision_config: no rope_parameters, extra keys.
  d = {"model_type": "qwen3_5", "depth": 12, "hidden_size": 768,
       "intermediate_size": 3072, "num_heads": 12, "out_hidden_size": 1024,
       "deepstack_visual_indexes": [], "initializer_range": 0.02,
       "patch_size": [16, 16]}
  assert VisionConfig.from_hf_dict(d) == VisionConfig.from_preset(
      "qwen3.5-0.8b")


@pytest.mark.parametrize("change,match", [
    (dict(hidden_size=33), r"hidden_size: expected a multiple of "
     r"num_heads=2, found 33"),
    (dict(hidden_size=36, num_heads=6), r"num_heads: expected a head dim "
     r".*divisible by 4.*found 6 \(head dim 6\)"),
    (dict(num_position_embeddings=15), r"num_position_embeddings: expected "
     r"a square number.*found 15"),
    (dict(depth=0), r"depth: expected a positive integer, found 0"),
    (dict(patch_size=4.0), r"patch_size: expected a positive integer"),
    (dict(hidden_act="relu"), r"hidden_act: expected one of"),
    (dict(dtype="int8"), r"dtype: expected one of"),
    (dict(rope_theta=-1.0), r"rope_theta: expected a finite number > 0"),
])
def test_config_errors_name_the_field(change, match):
  with pytest.raises(ValueError, match=match):
    VisionConfig.from_preset("tiny", **change)


@pytest.mark.parametrize("d,match", [
    ({"deepstack_visual_indexes": [5, 11]}, r"deepstack_visual_indexes: "
     r"expected none.*found \[5, 11\]"),
    ({"model_type": "qwen2_vl"}, r"model_type: expected one of"),
    ({"rope_parameters": {"rope_type": "default"}}, r"rope_type: expected "
     r"'axial', found 'default'"),
    ({"patch_size": [16, 14]}, r"patch_size: expected one size"),
])
def test_hf_dict_errors(d, match):
  with pytest.raises(ValueError, match=match):
    VisionConfig.from_hf_dict(d)


def test_vision_tokens():
  top = transformers.Qwen3_5Config().to_dict()
  tokens = vision.VisionTokens.from_hf_dict(top)
  assert tokens == vision.VisionTokens()
  assert (tokens.image_token_id, tokens.video_token_id,
          tokens.vision_start_token_id, tokens.vision_end_token_id) == (
              top["image_token_id"], top["video_token_id"],
              top["vision_start_token_id"], top["vision_end_token_id"])
  with pytest.raises(ValueError, match="four different ids"):
    vision.VisionTokens(image_token_id=5, video_token_id=5)


class TestBadInputs:
  """Errors name the argument, the expected and the found value."""

  @pytest.fixture(scope="class")
  def setup(self):
    vcfg = VisionConfig.from_preset("tiny")
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                    vision.param_shapes(vcfg))
    return vcfg, params

  def test_grid_product_differs_from_patches(self, setup):
    vcfg, params = setup
    x = np.zeros((20, vcfg.patch_dim), np.float32)
    with pytest.raises(ValueError, match=r"grid_thw: expected its patches "
                       r"\(sum of t \* h \* w = 24\).*found 20 rows"):
      vision.encode(vcfg, params, x, [[1, 4, 6]])
    with pytest.raises(ValueError, match=r"grid_thw.*= 24\).*found 20"):
      vision.VisionTower(vcfg).apply({"params": params}, x, [[1, 4, 6]])

  def test_pixel_values_of_the_wrong_width(self, setup):
    vcfg, params = setup
    x = np.zeros((24, vcfg.patch_dim + 1), np.float32)
    with pytest.raises(ValueError, match=r"pixel_values: expected width .* "
                       r"= 96, found 97"):
      vision.encode(vcfg, params, x, [[1, 4, 6]])
    with pytest.raises(ValueError, match=r"pixel_values: expected shape"):
      vision.encode(vcfg, params, np.zeros((24,), np.float32), [[1, 4, 6]])

  def test_bad_grids(self, setup):
    vcfg, params = setup
    x = np.zeros((24, vcfg.patch_dim), np.float32)
    with pytest.raises(ValueError, match=r"grid_thw: expected h and w "
                       r"multiples of spatial_merge_size=2, found \(1, 3, "
                       r"8\)"):
      vision.encode(vcfg, params, x, [[1, 3, 8]])
    with pytest.raises(ValueError, match=r"grid_thw: expected shape "
                       r"\[num_images, 3\]"):
      vision.encode(vcfg, params, x, [1, 4, 6])
    with pytest.raises(ValueError, match=r"grid_thw: expected entries >= 1"):
      vision.encode(vcfg, params, x, [[0, 4, 6]])

  def test_traced_grid(self, setup):
    vcfg, params = setup
    x = np.zeros((24, vcfg.patch_dim), np.float32)
    fn = jax.jit(lambda g: vision.VisionTower(vcfg).apply(
        {"params": params}, x, g))
    with pytest.raises(ValueError, match=r"grid_thw: expected concrete host "
                       r"values.*found a traced array"):
      fn(jnp.array([[1, 4, 6]]))
