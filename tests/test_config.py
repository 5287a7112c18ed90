"""QwenConfig: presets, the layer-pattern helper, HF config round trips."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

import qwen_jax
from qwen_jax import checkpoint
from qwen_jax.config import FULL, LINEAR, PRESETS, layer_types_from_ratio
from qwen_jax.vision import VisionConfig

L, F = LINEAR, FULL


@pytest.mark.parametrize("text_only", [False, True],
                         ids=["as_published", "vision_none"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_transformers(name, text_only):
  """Presets with a tower count as transformers'
  Qwen3_5ForConditionalGeneration, `vision=None` as its Qwen3_5ForCausalLM
  (the Qwen3_5Moe classes for the mixture-of-experts presets)."""
  cfg = qwen_jax.QwenConfig.from_preset(name)
  if text_only:
    cfg = cfg.replace(vision=None)
  shapes = checkpoint.param_shapes(cfg)  # jax.eval_shape: no memory
  ours = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  moe = "Moe" if cfg.is_moe else ""  # the mixture-of-experts classes
  with torch.device("meta"):
    if cfg.vision is None:
      hf = getattr(transformers, f"Qwen3_5{moe}ForCausalLM")(
          cfg.to_hf_config())
    else:
      hf = getattr(transformers, f"Qwen3_5{moe}ForConditionalGeneration")(
          cfg.to_hf_config())
  theirs = sum(p.numel() for p in hf.parameters())
  assert ours == theirs == cfg.num_params()
  assert ("visual" in shapes) == (cfg.vision is not None)


def test_published_presets_carry_their_towers():
  for name in ("qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b"):
    cfg = qwen_jax.QwenConfig.from_preset(name)
    assert cfg.vision == VisionConfig.from_preset(name)
    assert cfg.mrope_section == (11, 11, 10)
    hf = transformers.Qwen3_5Config()
    assert (cfg.image_token_id, cfg.video_token_id,
            cfg.vision_start_token_id, cfg.vision_end_token_id) == (
                hf.image_token_id, hf.video_token_id,
                hf.vision_start_token_id, hf.vision_end_token_id)
  text = qwen_jax.QwenConfig.from_preset("qwen3.5-0.8b", vision=None)
  assert text.vision is None and text.to_hf_dict()["model_type"] == (
      "qwen3_5_text")
  assert qwen_jax.QwenConfig.from_preset("tiny").vision is None
  # The tower computes in the model's dtypes.
  bf16 = qwen_jax.QwenConfig.from_preset("qwen3.5-0.8b", dtype="bfloat16")
  assert bf16.vision.dtype == "bfloat16"
  assert bf16.vision.param_dtype == "float32"


@pytest.mark.parametrize("name,billions", [
    ("qwen3.5-0.8b", (0.7, 0.9)), ("qwen3.5-2b", (1.7, 2.4)),
    ("qwen3.5-4b", (3.9, 4.8)), ("qwen3.5-9b", (8.5, 9.9))])
def test_preset_sizes_are_plausible(name, billions):
  n = qwen_jax.QwenConfig.from_preset(name).num_params() / 1e9
  assert billions[0] < n < billions[1]


@pytest.mark.parametrize("ratio,n,expected", [
    ("3:1", 8, [L, L, L, F] * 2),
    ("1:1", 4, [L, F] * 2),
    ("7:1", 8, [L] * 7 + [F]),
    ((2, 1), 6, [L, L, F] * 2),
    ("all-full", 3, [F] * 3),
    ("all-linear", 3, [L] * 3),
])
def test_layer_types_from_ratio(ratio, n, expected):
  assert list(layer_types_from_ratio(ratio, n)) == expected


@pytest.mark.parametrize("ratio,n", [("3:1", 6), ("3-1", 4), ("0:0", 4),
                                     ("3:1", 0)])
def test_bad_ratio(ratio, n):
  with pytest.raises(ValueError, match="ratio|num_layers"):
    layer_types_from_ratio(ratio, n)


def test_unknown_preset():
  with pytest.raises(ValueError, match="preset.*qwen9"):
    qwen_jax.QwenConfig.from_preset("qwen9")


@pytest.mark.parametrize("change,field", [
    (dict(num_hidden_layers=5, layer_types=(L, L, L, F)), "layer_types"),
    (dict(layer_types=(L, "mamba", L, F)), "layer_types"),
    (dict(linear_num_value_heads=3), "linear_num_value_heads"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    # The Pallas tiling spec: a backward block that is not whole chunks, a
    # field that is not one, a chunk size set twice.
    (dict(gdr_block_sizes="bwd_block=100"), "gdr_block_sizes.*bwd_block"),
    (dict(gdr_block_sizes="bwd_blocks=128"), "gdr_block_sizes.*field"),
    (dict(gdr_block_sizes="chunk_size=32"), "gdr_block_sizes.*chunk_size"),
])
def test_bad_config(change, field):
  with pytest.raises(ValueError, match=field):
    qwen_jax.QwenConfig.from_preset("tiny", **change)


def test_hf_config_round_trip():
  for name in PRESETS:
    cfg = qwen_jax.QwenConfig.from_preset(name)
    back = qwen_jax.QwenConfig.from_hf_config(cfg.to_hf_config())
    assert back == cfg, name


def test_hf_defaults_pattern_and_theta():
  """A config built by transformers alone: interval-4 pattern, theta 1e4."""
  hf = transformers.Qwen3_5TextConfig(num_hidden_layers=8)
  cfg = qwen_jax.QwenConfig.from_hf_config(hf)
  assert cfg.layer_types == tuple(hf.layer_types)
  assert cfg.layer_types == tuple([L, L, L, F] * 2)
  assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
  assert cfg.partial_rotary_factor == 0.25


def test_sequence_too_long():
  cfg = qwen_jax.QwenConfig.from_preset("tiny", max_position_embeddings=16)
  ids = jax.numpy.zeros((1, 17), jax.numpy.int32)
  with pytest.raises(ValueError, match="max_position_embeddings=16.*17"):
    jax.eval_shape(lambda i: qwen_jax.Qwen35(cfg).init(
        jax.random.PRNGKey(0), i), ids)


# ------------------------------------------------- field types and ranges
@pytest.mark.parametrize("change,message", [
    (dict(vocab_size=2.5), "vocab_size: expected a positive integer, found "
     "2.5"),
    (dict(vocab_size="256"), "vocab_size: expected a positive integer, "
     "found '256'"),
    (dict(hidden_size=True), "hidden_size: expected a positive integer"),
    (dict(head_dim=None), "head_dim: expected a positive integer, found "
     "None"),
    (dict(linear_conv_kernel_dim=0), "linear_conv_kernel_dim: expected a "
     "positive integer, found 0"),
    (dict(gdr_chunk_size=8.0), "gdr_chunk_size: expected a positive integer"),
    (dict(partial_rotary_factor=-0.25), r"partial_rotary_factor: expected .*"
     r"\[0, 1\], found -0.25"),
    (dict(partial_rotary_factor="0.25"), "partial_rotary_factor: expected a "
     "finite real number, found '0.25'"),
    (dict(rope_theta=0.0), "rope_theta: expected .*> 0, found 0.0"),
    (dict(rope_theta=-5.0), "rope_theta: expected .*> 0, found -5.0"),
    (dict(rope_theta=float("nan")), "rope_theta: expected a finite real"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps: expected .*>= 0, found -1.0"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings: expected True "
     "or False, found 'false'"),
    (dict(scan_layers="no"), "scan_layers: expected True or False"),
    (dict(attention_bias=1), "attention_bias: expected True or False, found "
     "1"),
    (dict(gdr_interpret=None), "gdr_interpret: expected True or False"),
    (dict(eos_token_id="2"), "eos_token_id: expected an integer"),
    (dict(eos_token_id=[1, 2.0]), "eos_token_id: expected an integer"),
    (dict(gdr_implementation="foo"), "gdr_implementation: expected one of "
     r"\('auto', .*'chunked'.*\), found 'foo'"),
    (dict(gdr_block_sizes=5), "gdr_block_sizes: expected a string, found 5"),
    (dict(pad_token_id=1.0), "pad_token_id: expected an integer or None"),
    (dict(layer_types="linear_attention"), "layer_types: expected a "
     "sequence"),
    (dict(mrope_section=(11, 11)), r"mrope_section: expected three integers"
     r" >= 0 \(t, h, w\), found \(11, 11\)"),
    (dict(mrope_section=(11, 11, -1)), "mrope_section: expected three"),
    (dict(vision={"depth": 2}), "vision: expected a qwen_jax.vision."
     "VisionConfig or None, found 'dict'"),
    (dict(vision=VisionConfig.from_preset("tiny", out_hidden_size=32)),
     r"vision.out_hidden_size: expected the language model's "
     r"hidden_size=64, found 32"),
    (dict(image_token_id=-1), "image_token_id: expected an integer >= 0 or "
     "None, found -1"),
    (dict(vision=VisionConfig.from_preset("tiny"), image_token_id=5,
          video_token_id=5), r"image_token_id, video_token_id.*: expected "
     r"different ids, found \{'image_token_id': 5, 'video_token_id': 5\}"),
])
def test_bad_field_type_or_range(change, message):
  with pytest.raises(ValueError, match=message):
    qwen_jax.QwenConfig.from_preset("tiny", **change)


def test_field_types_that_are_accepted():
  """NumPy scalars become Python ones; a width-1 conv and NoPE are legal."""
  tiny = qwen_jax.QwenConfig.from_preset("tiny")
  cfg = qwen_jax.QwenConfig.from_preset(
      "tiny", vocab_size=np.int64(256), rope_theta=np.float32(1e7),
      tie_word_embeddings=np.bool_(True), eos_token_id=[np.int32(3), 4])
  assert cfg == tiny.replace(eos_token_id=(3, 4))
  assert type(cfg.vocab_size) is int and type(cfg.rope_theta) is float
  json.dumps(cfg.to_hf_dict())  # NumPy scalars would not serialise
  assert qwen_jax.QwenConfig.from_preset(
      "tiny", rope_theta=10000).rope_theta == 10000.0
  assert qwen_jax.QwenConfig.from_preset(
      "tiny", linear_conv_kernel_dim=1).linear_conv_kernel_dim == 1
  assert qwen_jax.QwenConfig.from_preset(
      "tiny", partial_rotary_factor=0.0).rotary_dim == 0
  for impl in ("auto", "chunked", "recurrent", "pallas"):
    assert qwen_jax.QwenConfig.from_preset(
        "tiny", gdr_implementation=impl).gdr_implementation == impl


# --------------------------------------------------- HF config edge cases
def test_hf_head_dim_null(tmp_path):
  hf = {"model_type": "qwen3_5_text", "head_dim": None}
  with pytest.raises(ValueError, match="head_dim: expected a positive "
                     "integer, found None"):
    qwen_jax.QwenConfig.from_hf_config(hf)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match=r"head_dim: .*found None \(in .*"
                     r"config\.json\)"):
    qwen_jax.QwenConfig.from_hf_config(tmp_path)


@pytest.mark.parametrize("rope,match", [
    (["default"], "rope_parameters: expected an object"),
    ({"rope_type": "default", "rope_theta": "1e7"},
     "rope_theta: expected a real number, found '1e7'"),
])
def test_hf_bad_rope_parameters(rope, match):
  with pytest.raises(ValueError, match=match):
    qwen_jax.QwenConfig.from_hf_config(
        {"model_type": "qwen3_5_text", "rope_parameters": rope})


def test_hf_string_size_is_refused():
  with pytest.raises(ValueError, match="hidden_size: expected a positive "
                     "integer, found '64'"):
    qwen_jax.QwenConfig.from_hf_config(
        {"model_type": "qwen3_5_text", "hidden_size": "64"})


@pytest.mark.parametrize("text_config", [None, [], "x"])
def test_vlm_config_without_text_config(text_config):
  hf = {"model_type": "qwen3_5"}
  if text_config is not None:
    hf["text_config"] = text_config
  with pytest.raises(ValueError, match="text_config: model_type 'qwen3_5' "
                     "needs a text_config object"):
    qwen_jax.QwenConfig.from_hf_config(hf)


def test_vlm_config_ties_from_either_flag():
  text = PRESETS["tiny"].replace(tie_word_embeddings=False).to_hf_dict()
  for top, inner, tied in [(True, False, True), (False, False, False),
                           (None, True, True)]:
    cfg = qwen_jax.QwenConfig.from_hf_config(
        {"model_type": "qwen3_5", "tie_word_embeddings": top,
         "text_config": dict(text, tie_word_embeddings=inner)})
    assert cfg.tie_word_embeddings is tied, (top, inner)


@pytest.mark.parametrize("interval", [0, -1, "4", 2.0])
def test_hf_bad_full_attention_interval(interval):
  with pytest.raises(ValueError, match="full_attention_interval: expected a "
                     "positive integer"):
    qwen_jax.QwenConfig.from_hf_config(
        {"model_type": "qwen3_5_text", "num_hidden_layers": 8,
         "full_attention_interval": interval})


@pytest.mark.parametrize("text,match", [
    ('{"model_type": "qwen3_5_text",}', "config.json: not valid JSON"),
    ("[1, 2]", "config.json: expected a JSON object, found a JSON list"),
])
def test_hf_config_file_not_an_object(tmp_path, text, match):
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(ValueError, match=match):
    qwen_jax.QwenConfig.from_hf_config(tmp_path)


# ------------------------------------------------- replace and the pattern
@pytest.mark.parametrize("pattern,n,expected", [
    ((F, L, L, L), 8, [F, L, L, L] * 2),
    ((L, F, L, L), 8, [L, F, L, L] * 2),
    ((L, L, L, F), 8, [L, L, L, F] * 2),   # tiny's 3:1, as before
    ((L, F, L, F), 6, [L, F] * 3),         # period 2 divides 6
    ((L,) * 4, 3, [L] * 3),
    ((L, F, L, L, L, F), 12, [L, F, L, L, L, F] * 2),  # not periodic
])
def test_replace_layers_repeats_the_period(pattern, n, expected):
  cfg = qwen_jax.QwenConfig.from_preset("tiny", layer_types=pattern,
                                        num_hidden_layers=len(pattern))
  out = cfg.replace(num_hidden_layers=n)
  assert list(out.layer_types) == expected
  assert out.num_hidden_layers == n


@pytest.mark.parametrize("pattern,n", [
    ((L, L, L, F), 6),
    ((F, L, L, L), 2),
    ((L, F, L, L, L, F), 8),
])
def test_replace_layers_not_a_multiple_of_the_period(pattern, n):
  cfg = qwen_jax.QwenConfig.from_preset("tiny", layer_types=pattern,
                                        num_hidden_layers=len(pattern))
  with pytest.raises(ValueError, match=r"num_hidden_layers: expected a "
                     r"multiple of the layer pattern's period .*found "
                     rf"{n}; pass layer_types"):
    cfg.replace(num_hidden_layers=n)


D, M = "dense", "moe"


@pytest.mark.parametrize("layers,mlps,n,expected", [
    ((L, L, L, F), (M,) * 4, 8, ([L, L, L, F] * 2, [M] * 8)),
    ((L, F), (D, M), 6, ([L, F] * 3, [D, M] * 3)),
    ((L, L), (D, M), 4, ([L] * 4, [D, M] * 2)),
    ((L, L), (D, M), 5, "mlp_types"),     # the MLPs' period 2 does not fit
    ((L, L, L, F), (D, M, D, M), 6, "layer_types"),
])
def test_replace_extends_both_patterns(layers, mlps, n, expected):
  cfg = qwen_jax.QwenConfig.from_preset(
      "tiny-moe", layer_types=layers, mlp_types=mlps,
      num_hidden_layers=len(layers))
  if isinstance(expected, str):
    with pytest.raises(ValueError, match=r"num_hidden_layers: expected a "
                       rf"multiple .*found {n}; pass {expected} as well"):
      cfg.replace(num_hidden_layers=n)
    return
  out = cfg.replace(num_hidden_layers=n)
  assert (list(out.layer_types), list(out.mlp_types)) == expected


def test_preset_with_bad_layer_count_names_the_field():
  with pytest.raises(ValueError, match="num_hidden_layers: .*period 4.*"
                     "found 6"):
    qwen_jax.QwenConfig.from_preset("tiny", num_hidden_layers=6)
  with pytest.raises(ValueError, match="num_hidden_layers: expected a "
                     "positive integer, found 8.0"):
    qwen_jax.QwenConfig.from_preset("tiny", num_hidden_layers=8.0)


@pytest.mark.parametrize("ratio,n,field", [
    ((3, 1, 2), 4, "ratio"), ((1.5, 0.5), 4, "ratio"), (3, 4, "ratio"),
    (None, 4, "ratio"), ((True, 1), 2, "ratio"), ("3:1", 8.0, "num_layers"),
    ((3, 1), "8", "num_layers"),
])
def test_bad_ratio_types(ratio, n, field):
  with pytest.raises(ValueError, match=f"^{field}: expected"):
    layer_types_from_ratio(ratio, n)
