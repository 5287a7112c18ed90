"""QwenConfig: presets, the layer-pattern helper, HF config round trips."""

import jax
import numpy as np
import pytest
import torch
import transformers

import qwen_jax
from qwen_jax import checkpoint
from qwen_jax.config import FULL, LINEAR, PRESETS, layer_types_from_ratio

L, F = LINEAR, FULL


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_transformers(name):
  cfg = qwen_jax.QwenConfig.from_preset(name)
  shapes = checkpoint.param_shapes(cfg)  # jax.eval_shape: no memory
  ours = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  with torch.device("meta"):
    hf = transformers.Qwen3_5ForCausalLM(cfg.to_hf_config())
  theirs = sum(p.numel() for p in hf.parameters())
  assert ours == theirs == cfg.num_params()


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
