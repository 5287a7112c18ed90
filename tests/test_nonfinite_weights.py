"""Weights holding NaN or Inf (or values that overflow the dtype they are
loaded in) are refused by `load_hf_checkpoint`, naming the tensor, the file
and the count, single file or shards."""

import shutil

import numpy as np
import pytest

import qwen_jax
from qwen_jax.config import FULL, LINEAR
from tests import hf_utils


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
  cfg = hf_utils.make_text_config(layer_types=[LINEAR] * 3 + [FULL])
  return hf_utils.save_causal_lm(tmp_path_factory.mktemp("text"), cfg, 23)[0]


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_nan_weights_refused_naming_the_tensor(text_ckpt, tmp_path, layout):
  dst = _copy(text_ckpt, tmp_path)
  if layout == "sharded":
    cfg, params = qwen_jax.load_hf_checkpoint(dst)
    shutil.rmtree(dst)
    qwen_jax.save_hf_checkpoint(dst, cfg, params, max_shard_bytes=60_000)
  key = "model.layers.2.mlp.up_proj.weight"
  x = hf_utils.read_tensors(dst)[key].copy()
  x[3, 5] = np.nan
  x[7, 1] = np.nan
  x[0, 0] = -np.inf
  hf_utils.add_tensors(dst, {key: x})
  with pytest.raises(ValueError, match=(
      rf"weight {key}: expected finite values, found 3 non-finite of "
      rf"{x.size} \(2 NaN, 1 Inf\) \(in .*\.safetensors\)")):
    qwen_jax.load_hf_checkpoint(dst)
  with pytest.raises(ValueError, match=key):
    qwen_jax.load_hf_checkpoint(dst, dtype="bfloat16")


def test_values_that_overflow_the_load_dtype_refused(text_ckpt, tmp_path):
  dst = _copy(text_ckpt, tmp_path)
  key = "model.norm.weight"
  x = hf_utils.read_tensors(dst)[key].copy()
  x[:2] = 1e5  # finite in float32, inf in float16 (max 65504)
  hf_utils.add_tensors(dst, {key: x})
  qwen_jax.load_hf_checkpoint(dst)  # float32: fine
  with pytest.raises(ValueError, match=(
      rf"weight {key}: expected values finite in float16, found 2 of "
      rf"{x.size} that overflow it \(largest \|value\| 100000\.0\)")):
    qwen_jax.load_hf_checkpoint(dst, dtype="float16")
