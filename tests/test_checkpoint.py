"""Checkpoint round trips and the loader's errors on bad folders."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen_jax
from qwen_jax import checkpoint
from qwen_jax.config import FULL, LINEAR
from tests import hf_utils
from tests import tolerances

L, F = LINEAR, FULL


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  cfg = hf_utils.make_text_config(layer_types=[L, L, L, F, L, L, L, F])
  return hf_utils.save_causal_lm(tmp_path_factory.mktemp("ckpt"), cfg, 11)


def _logits(cfg, params, ids):
  return np.asarray(qwen_jax.Qwen35(cfg).apply({"params": params},
                                               jnp.asarray(ids)))


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("shard_bytes", [None, 60_000])
def test_round_trip_through_transformers(saved, tmp_path, scan, shard_bytes):
  path, model = saved
  cfg, params = qwen_jax.load_hf_checkpoint(path, scan_layers=scan)
  out = tmp_path / "ours"
  kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
  qwen_jax.save_hf_checkpoint(out, cfg, params, **kw)
  if shard_bytes:
    assert os.path.exists(out / checkpoint.INDEX_FILE)
  # Bit-exact tensors, and transformers loads the folder with equal logits.
  original = hf_utils.read_tensors(path)
  written = hf_utils.read_tensors(out)
  assert sorted(original) == sorted(written)
  for k, v in original.items():
    np.testing.assert_array_equal(written[k], v, err_msg=k)
  reloaded = hf_utils.load_hf_causal_lm(out)
  ids = hf_utils.random_ids(np.random.default_rng(0), 2, 70, 128)
  ref = hf_utils.hf_logits(model, ids)
  np.testing.assert_array_equal(hf_utils.hf_logits(reloaded, ids), ref)
  assert tolerances.max_rel_err(_logits(cfg, params, ids), ref) < (
      tolerances.HF_LOGITS_REL)


def test_round_trip_from_random_init(tmp_path):
  """Ours (fresh init, tied) -> save -> transformers gives our logits."""
  cfg = qwen_jax.QwenConfig.from_preset("tiny")
  model = qwen_jax.Qwen35(cfg)
  ids = hf_utils.random_ids(np.random.default_rng(1), 2, 33, cfg.vocab_size)
  import flax  # pylint: disable=g-import-not-at-top
  params = flax.linen.meta.unbox(
      model.init(jax.random.PRNGKey(3), jnp.asarray(ids)))["params"]
  # Move norms off their init values so (1 + w) mistakes would show.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(
          jax.random.PRNGKey(len(str(p))), x.shape) if "norm" in str(p)
      else x, params)
  qwen_jax.save_hf_checkpoint(tmp_path, cfg, params)
  assert "lm_head.weight" not in hf_utils.read_tensors(tmp_path)
  hf = hf_utils.load_hf_causal_lm(tmp_path)
  assert tolerances.max_rel_err(_logits(cfg, params, ids),
                                hf_utils.hf_logits(hf, ids)) < (
                                    tolerances.HF_LOGITS_REL)


def _copy(path, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(path, dst)
  return dst


def test_missing_weight(saved, tmp_path):
  dst = _copy(saved[0], tmp_path)
  hf_utils.remove_tensor(dst, "model.layers.2.linear_attn.A_log")
  with pytest.raises(ValueError, match=r"missing.*layers\.2\.linear_attn"
                     r"\.A_log"):
    qwen_jax.load_hf_checkpoint(dst)


def test_unexpected_weight(saved, tmp_path):
  dst = _copy(saved[0], tmp_path)
  hf_utils.add_tensors(dst, {"model.layers.9.mlp.up_proj.weight":
                             np.zeros((3, 4), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected.*layers\.9\.mlp"):
    qwen_jax.load_hf_checkpoint(dst)


def test_shape_mismatch_names_key_expected_found(saved, tmp_path):
  dst = _copy(saved[0], tmp_path)
  hf_utils.edit_config(dst, lambda d: d.update(intermediate_size=80))
  with pytest.raises(ValueError, match=r"weight model\.layers\.0\.mlp\."
                     r"gate_proj\.weight: expected shape \(80, 64\).*found "
                     r"\(96, 64\)"):
    qwen_jax.load_hf_checkpoint(dst)


def test_untied_config_without_lm_head(saved, tmp_path):
  dst = _copy(saved[0], tmp_path)
  hf_utils.remove_tensor(dst, "lm_head.weight")
  with pytest.raises(ValueError, match="missing.*lm_head.weight"):
    qwen_jax.load_hf_checkpoint(dst)


def test_unsupported_model_type(saved, tmp_path):
  dst = _copy(saved[0], tmp_path)
  hf_utils.edit_config(dst, lambda d: d.update(model_type="llama"))
  with pytest.raises(ValueError, match="model_type.*llama"):
    qwen_jax.load_hf_checkpoint(dst)


def test_pattern_length_mismatch(saved, tmp_path):
  dst = _copy(saved[0], tmp_path)
  hf_utils.edit_config(dst, lambda d: d.update(num_hidden_layers=6))
  with pytest.raises(ValueError, match="layer_types"):
    qwen_jax.load_hf_checkpoint(dst)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="expected a folder"):
    qwen_jax.load_hf_checkpoint(tmp_path / "nope")
  with pytest.raises(ValueError, match="config.json"):
    qwen_jax.load_hf_checkpoint(tmp_path)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(qwen_jax.QwenConfig.from_preset("tiny").to_hf_dict(), f)
  with pytest.raises(ValueError, match="model.safetensors"):
    qwen_jax.load_hf_checkpoint(tmp_path)


def test_save_rejects_params_of_another_config(tmp_path):
  cfg = qwen_jax.QwenConfig.from_preset("tiny")
  params = checkpoint.param_shapes(cfg)
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                  params)
  other = cfg.replace(num_hidden_layers=8,
                      layer_types=cfg.layer_types * 2)
  with pytest.raises(ValueError, match="params"):
    qwen_jax.save_hf_checkpoint(tmp_path, other, params)
