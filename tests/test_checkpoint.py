"""Checkpoint round trips and the loader's errors on bad folders."""

import json
import os
import re
import shutil

import chex
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


# ------------------------------------------------- stale files, both layouts
def _scaled(params, factor):
  return jax.tree_util.tree_map(lambda x: x * factor, params)


def test_save_removes_stale_weight_files(saved, tmp_path):
  """Sharded, then single, then sharded again into one folder."""
  cfg, params = qwen_jax.load_hf_checkpoint(saved[0])
  out = tmp_path / "out"
  qwen_jax.save_hf_checkpoint(out, cfg, params, max_shard_bytes=60_000)
  shards = sorted(f for f in os.listdir(out) if f.startswith("model-"))
  assert len(shards) > 2
  user_files = ["README.md", "model_backup.safetensors", "model-notes.txt"]
  for f in user_files:
    (out / f).write_text("keep me")
  params2 = _scaled(params, 1.5)
  qwen_jax.save_hf_checkpoint(out, cfg, params2)
  assert sorted(os.listdir(out)) == sorted(
      ["config.json", checkpoint.SINGLE_FILE] + user_files)
  chex.assert_trees_all_equal(qwen_jax.load_hf_checkpoint(out)[1], params2)
  # Back to shards: the single file goes, fewer shards leave none behind.
  qwen_jax.save_hf_checkpoint(out, cfg, params, max_shard_bytes=200_000)
  names = os.listdir(out)
  assert checkpoint.SINGLE_FILE not in names
  new_shards = sorted(f for f in names if f.endswith("safetensors")
                      and f.startswith("model-"))
  assert 1 < len(new_shards) < len(shards)
  with open(out / checkpoint.INDEX_FILE) as f:
    assert set(new_shards) == set(json.load(f)["weight_map"].values())
  for f in user_files:
    assert (out / f).read_text() == "keep me"
  chex.assert_trees_all_equal(qwen_jax.load_hf_checkpoint(out)[1], params)


def test_single_file_beats_index_as_in_transformers(saved, tmp_path):
  """model.safetensors beside an index: both libraries load the single file."""
  cfg, params = qwen_jax.load_hf_checkpoint(saved[0])
  both, single = tmp_path / "both", tmp_path / "single"
  qwen_jax.save_hf_checkpoint(both, cfg, params, max_shard_bytes=60_000)
  params2 = _scaled(params, 1.5)
  qwen_jax.save_hf_checkpoint(single, cfg, params2)
  shutil.copy(single / checkpoint.SINGLE_FILE, both / checkpoint.SINGLE_FILE)
  assert os.path.exists(both / checkpoint.INDEX_FILE)
  _, loaded = qwen_jax.load_hf_checkpoint(both)
  chex.assert_trees_all_equal(loaded, params2)
  ids = hf_utils.random_ids(np.random.default_rng(2), 1, 12, cfg.vocab_size)
  theirs = hf_utils.hf_logits(hf_utils.load_hf_causal_lm(both), ids)
  assert tolerances.max_rel_err(_logits(cfg, loaded, ids), theirs) < (
      tolerances.HF_LOGITS_REL)


# ------------------------------------------------------ config overrides
@pytest.mark.parametrize("override", [
    dict(rope_theta=10.0), dict(rms_norm_eps=1.0), dict(hidden_size=32),
    dict(tie_word_embeddings=True), dict(layer_types=(L,) * 8),
    dict(eos_token_id=3)])
def test_load_refuses_overrides_that_change_the_math(saved, override):
  (field, value), = override.items()
  with pytest.raises(ValueError, match=rf"config_overrides: {field} changes "
                     r"the model.*only implementation fields.*scan_layers.*"
                     rf"found {field}="):
    qwen_jax.load_hf_checkpoint(saved[0], **override)


def test_load_accepts_implementation_overrides(saved):
  cfg, _ = qwen_jax.load_hf_checkpoint(
      saved[0], scan_layers=False, remat_policy="full", gdr_chunk_size=8,
      gdr_implementation="chunked", attention_implementation="xla")
  assert (cfg.scan_layers, cfg.remat_policy, cfg.gdr_chunk_size,
          cfg.gdr_implementation) == (False, "full", 8, "chunked")


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="bf16"), "dtype: expected one of .*'bfloat16'.*found 'bf16'"),
    (dict(dtype="int32"), "dtype: expected one of .*found 'int32'"),
    (dict(param_dtype="half-ish"), "param_dtype: expected one of .*found "
     "'half-ish'"),
])
def test_load_bad_dtype_names_the_argument(saved, kw, match):
  with pytest.raises(ValueError, match=match):
    qwen_jax.load_hf_checkpoint(saved[0], **kw)


# ------------------------------------------------------ broken files
def _rewrite_header(path, fn):
  """Rewrites a safetensors file's JSON header through fn(header)."""
  raw = open(path, "rb").read()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  fn(header)
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


def _truncate(path):
  raw = open(path, "rb").read()
  open(path, "wb").write(raw[:-1000])


def _garbage_length(path):
  raw = open(path, "rb").read()
  open(path, "wb").write(b"\xff" * 8 + raw[8:])


def _short_offsets(path):
  def fn(h):
    h["model.norm.weight"]["data_offsets"][1] -= 4
  _rewrite_header(path, fn)


def _bad_shape(path):
  def fn(h):
    h["model.norm.weight"]["shape"] = [64, "x"]
  _rewrite_header(path, fn)


def _bad_offsets(path):
  def fn(h):
    h["model.norm.weight"]["data_offsets"] = [8, 4]
  _rewrite_header(path, fn)


def _bad_dtype_entry(path):
  def fn(h):
    h["model.norm.weight"]["dtype"] = 32
  _rewrite_header(path, fn)


def _header_not_object(path):
  raw = open(path, "rb").read()
  open(path, "wb").write((2).to_bytes(8, "little") + b"[]" + raw[8:])


@pytest.mark.parametrize("corrupt,match", [
    (_bad_offsets, r"model\.safetensors: tensor model\.norm\.weight: "
     r"expected data_offsets \[begin, end\].*found \[8, 4\]"),
    (_bad_dtype_entry, r"model\.safetensors: tensor model\.norm\.weight: "
     r"expected a dtype name, found 32"),
    (_header_not_object, r"model\.safetensors: not a safetensors file \(the "
     r"header is a JSON list"),
    (_truncate, r"model\.safetensors: tensor \S+: data ends at byte \d+ .*"
     r"only \d+ bytes of data \(truncated file\?\)"),
    (_garbage_length, r"model\.safetensors: not a safetensors file, or "
     r"truncated: the header length says \d+ bytes"),
    (_short_offsets, r"model\.safetensors: tensor model\.norm\.weight: "
     r"data_offsets \[\d+, \d+\] span 252 bytes, expected 256"),
    (_bad_shape, r"model\.safetensors: tensor model\.norm\.weight: expected "
     r"a shape of non-negative integers"),
])
def test_broken_safetensors_file(saved, tmp_path, corrupt, match):
  dst = _copy(saved[0], tmp_path)
  corrupt(str(dst / checkpoint.SINGLE_FILE))
  with pytest.raises(ValueError, match=match):
    qwen_jax.load_hf_checkpoint(dst)


def test_broken_config_json(saved, tmp_path):
  dst = _copy(saved[0], tmp_path)
  with open(dst / "config.json", "a") as f:
    f.write("}")
  with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
    qwen_jax.load_hf_checkpoint(dst)


@pytest.mark.parametrize("text,match", [
    ('{"weight_map": {', r"index\.json: not valid JSON"),
    ('["model-00001-of-00002.safetensors"]', r"index\.json: expected a JSON "
     r"object, found a JSON list"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"index\.json: weight_map"
     r"\['model\.norm\.weight'\]: expected a file name, found 3"),
])
def test_broken_index(saved, tmp_path, text, match):
  cfg, params = qwen_jax.load_hf_checkpoint(saved[0])
  qwen_jax.save_hf_checkpoint(tmp_path, cfg, params, max_shard_bytes=60_000)
  (tmp_path / checkpoint.INDEX_FILE).write_text(text)
  with pytest.raises(ValueError, match=match):
    qwen_jax.load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("key,value,stored", [
    ("model.norm.weight", np.ones((64,), np.int32), "I32"),
    ("model.layers.0.linear_attn.A_log", np.ones((4,), bool), "BOOL"),
])
def test_non_float_weight(saved, tmp_path, key, value, stored):
  dst = _copy(saved[0], tmp_path)
  hf_utils.add_tensors(dst, {key: value})
  with pytest.raises(ValueError, match=rf"weight {re.escape(key)}: expected "
                     rf"a floating dtype .*found {stored} \(in .*model\."
                     r"safetensors\)"):
    qwen_jax.load_hf_checkpoint(dst)


def test_shape_error_says_when_config_used_a_default(saved, tmp_path):
  dst = _copy(saved[0], tmp_path)
  hf_utils.edit_config(dst, lambda d: d.pop("head_dim"))
  with pytest.raises(ValueError, match=r"expected shape \(\d+, 64\) \(from "
                     r"config\.json; head_dim not in it, QwenConfig defaults "
                     r"used\), found"):
    qwen_jax.load_hf_checkpoint(dst)


def test_vlm_config_without_text_config(saved, tmp_path):
  dst = _copy(saved[0], tmp_path)
  hf_utils.edit_config(dst, lambda d: d.update(model_type="qwen3_5"))
  with pytest.raises(ValueError, match="text_config: model_type 'qwen3_5' "
                     "needs a text_config object"):
    qwen_jax.load_hf_checkpoint(dst)


# ------------------------------------------------------ saving: bad input
@pytest.fixture(scope="module")
def tiny_init():
  cfg = qwen_jax.QwenConfig.from_preset("tiny")
  ids = jnp.zeros((1, 4), jnp.int32)
  boxed = qwen_jax.Qwen35(cfg).init(jax.random.PRNGKey(0), ids)["params"]
  return cfg, boxed


@pytest.mark.parametrize("dtype", ["int8", "bool", np.int32, "bf16"])
def test_save_rejects_non_float_dtype(tmp_path, tiny_init, dtype):
  import flax  # pylint: disable=g-import-not-at-top
  cfg, boxed = tiny_init
  with pytest.raises(ValueError, match="dtype: expected one of .*'float32'"):
    qwen_jax.save_hf_checkpoint(tmp_path, cfg, flax.linen.meta.unbox(boxed),
                                dtype=dtype)
  assert not os.path.exists(tmp_path / checkpoint.SINGLE_FILE)


def test_save_accepts_boxed_and_frozen_params(tmp_path, tiny_init):
  import flax  # pylint: disable=g-import-not-at-top
  cfg, boxed = tiny_init
  plain = flax.linen.meta.unbox(boxed)
  for name, p in [("boxed", boxed), ("frozen", flax.core.freeze(plain)),
                  ("frozen_boxed", flax.core.freeze(boxed))]:
    qwen_jax.save_hf_checkpoint(tmp_path / name, cfg, p, dtype="bfloat16")
    back_cfg, back = qwen_jax.load_hf_checkpoint(tmp_path / name)
    assert back_cfg == cfg
    chex.assert_trees_all_equal(back, jax.tree_util.tree_map(
        lambda b: np.asarray(b).astype(jnp.bfloat16).astype(np.float32),
        plain))


def test_save_structure_errors_name_the_key(tmp_path, tiny_init):
  import flax  # pylint: disable=g-import-not-at-top
  cfg, boxed = tiny_init
  plain = flax.linen.meta.unbox(boxed)
  with pytest.raises(ValueError, match="single 'params' key: pass "
                     r"variables\['params'\]"):
    qwen_jax.save_hf_checkpoint(tmp_path, cfg, {"params": plain})
  untied = dict(plain, lm_head={"kernel": np.zeros((64, 256), np.float32)})
  with pytest.raises(ValueError, match="tie_word_embeddings=True.*extra "
                     "'lm_head/kernel'"):
    qwen_jax.save_hf_checkpoint(tmp_path, cfg, untied)
  with pytest.raises(ValueError, match="tie_word_embeddings=False.*missing "
                     "'lm_head/kernel'"):
    qwen_jax.save_hf_checkpoint(
        tmp_path, cfg.replace(tie_word_embeddings=False), plain)
  with pytest.raises(ValueError, match="params: expected the parameter dict"
                     ".*found list"):
    qwen_jax.save_hf_checkpoint(tmp_path, cfg, [plain])
