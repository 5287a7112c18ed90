"""Logit parity with Hugging Face transformers (torch, CPU, float32).

Every checkpoint here is written by transformers' own `save_pretrained` from
a randomised tiny model (tests/hf_utils.py); we load the folder and compare
logits within `tolerances.HF_LOGITS_REL` of the largest logit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen_jax
from qwen_jax.attention import GatedAttention
from qwen_jax.config import FULL, LINEAR, layer_types_from_ratio
from qwen_jax.gated_deltanet import GatedDeltaNet
from tests import hf_utils
from tests import tolerances

L, F = LINEAR, FULL
_PERIODIC = [L, L, L, F, L, L, L, F]


@functools.lru_cache(maxsize=None)
def _saved(key):
  """(path, torch model) for a named config, built once per process."""
  import tempfile  # pylint: disable=g-import-not-at-top
  overrides, seed, kind = _CASES[key]
  cfg = hf_utils.make_text_config(**overrides)
  tmp = tempfile.mkdtemp(prefix=f"qwen_jax_{key}_")
  if kind == "vlm":
    return hf_utils.save_conditional_generation(tmp, cfg, seed)
  if kind == "sharded":
    return hf_utils.save_sharded(tmp, cfg, seed)
  return hf_utils.save_causal_lm(tmp, cfg, seed)


_CASES = {
    # GVA (4 value heads on 2 key heads), dk=16 != dv=24, GQA 4:2, 2 periods.
    "periodic_untied": (dict(layer_types=_PERIODIC), 1, "causal"),
    "periodic_tied": (dict(layer_types=_PERIODIC, tie_word_embeddings=True),
                      2, "causal"),
    "non_periodic": (dict(layer_types=[L, F, L, L, F]), 3, "causal"),
    "all_full": (dict(layer_types=layer_types_from_ratio("all-full", 3)), 4,
                 "causal"),
    "all_linear": (dict(layer_types=layer_types_from_ratio("all-linear", 3)),
                   5, "causal"),
    # No GVA (hv == hk), attention biases, HF's default interval pattern.
    "bias_no_gva": (dict(num_hidden_layers=4, layer_types=None,
                         attention_bias=True, linear_num_value_heads=2),
                    6, "causal"),
    "vlm_untied": (dict(layer_types=[L, L, L, F]), 7, "vlm"),
    "vlm_tied": (dict(layer_types=[L, L, L, F], tie_word_embeddings=True), 8,
                 "vlm"),
    "sharded": (dict(layer_types=[L, F, L, F]), 9, "sharded"),
}


def _ours(path, ids, mask=None, **overrides):
  cfg, params = qwen_jax.load_hf_checkpoint(path, **overrides)
  model = qwen_jax.Qwen35(cfg)
  fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m))
  return np.asarray(fn(params, jnp.asarray(ids),
                       None if mask is None else jnp.asarray(mask)))


def _hf_vlm_logits(model, ids):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
                use_cache=False)
  return out.logits.float().numpy()


def _check(ours, ref, where=""):
  err = tolerances.max_rel_err(ours, ref)
  assert err < tolerances.HF_LOGITS_REL, (
      f"{where}: max |ours - hf| / max|hf| = {err:.2e} >= "
      f"{tolerances.HF_LOGITS_REL}")


@pytest.mark.parametrize("t", [1, 5, 63, 64, 65, 150])
@pytest.mark.parametrize("scan", [True, False])
def test_periodic_untied(t, scan):
  path, model = _saved("periodic_untied")
  ids = hf_utils.random_ids(np.random.default_rng(t), 2, t, 128)
  _check(_ours(path, ids, scan_layers=scan), hf_utils.hf_logits(model, ids),
         f"t={t} scan={scan}")


@pytest.mark.parametrize("key", ["periodic_tied", "non_periodic", "all_full",
                                 "all_linear", "bias_no_gva", "sharded"])
@pytest.mark.parametrize("t", [37, 150])
def test_other_configs(key, t):
  path, model = _saved(key)
  ids = hf_utils.random_ids(np.random.default_rng(100 + t), 2, t, 128)
  _check(_ours(path, ids), hf_utils.hf_logits(model, ids), f"{key} t={t}")


@pytest.mark.parametrize("key", ["vlm_untied", "vlm_tied"])
def test_conditional_generation_checkpoint(key, caplog):
  """Text through a multimodal checkpoint: its tower is loaded (mtp.* is
  skipped), or left out with vision=None; the logits are the same."""
  path, model = _saved(key)
  ids = hf_utils.random_ids(np.random.default_rng(0), 2, 70, 128)
  with caplog.at_level("INFO", logger="qwen_jax.checkpoint"):
    ours = _ours(path, ids)
  assert "mtp.*" in caplog.text and "model.visual.*" not in caplog.text
  ref = _hf_vlm_logits(model, ids)
  _check(ours, ref, key)
  caplog.clear()
  with caplog.at_level("INFO", logger="qwen_jax.checkpoint"):
    text_only = _ours(path, ids, vision=None)
  assert "mtp.*" in caplog.text and "model.visual.*" in caplog.text
  np.testing.assert_array_equal(text_only, ours)


def test_left_padding():
  path, model = _saved("periodic_untied")
  rng = np.random.default_rng(5)
  ids = hf_utils.random_ids(rng, 3, 90, 128)
  mask = np.ones((3, 90), np.int32)
  mask[1, :17] = 0
  mask[2, :70] = 0
  ids[mask == 0] = 0
  ours = _ours(path, ids, mask)
  ref = hf_utils.hf_logits(model, ids, mask)
  real = mask.astype(bool)
  _check(ours[real], ref[real], "left padding")
  # Each padded row equals its unpadded prompt run alone.
  for row in (1, 2):
    alone = _ours(path, ids[row:row + 1, mask[row] == 1])
    _check(ours[row, mask[row] == 1], alone[0], f"row {row} alone")


def test_bfloat16_load():
  path, model = _saved("periodic_untied")
  cfg, params = qwen_jax.load_hf_checkpoint(path, dtype="bfloat16")
  assert cfg.dtype == "bfloat16" and cfg.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
  ids = hf_utils.random_ids(np.random.default_rng(1), 1, 20, 128)
  out = qwen_jax.Qwen35(cfg).apply({"params": params}, jnp.asarray(ids))
  assert out.dtype == jnp.bfloat16
  m16 = hf_utils.load_hf_causal_lm(path).to(torch.bfloat16)
  ref = hf_utils.hf_logits(m16, ids)
  err = tolerances.max_rel_err(np.asarray(out, np.float32), ref)
  assert err < tolerances.HF_BF16_LOGITS_REL, err


# ------------------------------------------------------------ layer parity
def _layer_inputs(cfg, seed, t=70, b=2):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, t, cfg.hidden_size)).astype(np.float32)


def test_gated_deltanet_layer_parity():
  path, model = _saved("periodic_untied")
  cfg, params = qwen_jax.load_hf_checkpoint(path, scan_layers=False)
  x = _layer_inputs(cfg, 0)
  ours, _ = GatedDeltaNet(cfg).apply(
      {"params": params["layers"]["layer_1"]["linear_attn"]}, jnp.asarray(x))
  with torch.no_grad():
    ref = model.model.layers[1].linear_attn(torch.from_numpy(x)).numpy()
  _check(np.asarray(ours), ref, "GatedDeltaNet layer")


def test_attention_layer_parity():
  path, model = _saved("periodic_untied")
  cfg, params = qwen_jax.load_hf_checkpoint(path, scan_layers=False)
  b, t = 2, 70
  x = _layer_inputs(cfg, 1, t, b)
  positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
  ours, _ = GatedAttention(cfg).apply(
      {"params": params["layers"]["layer_3"]["self_attn"]}, jnp.asarray(x),
      jnp.asarray(positions))
  xt = torch.from_numpy(x)
  pos = torch.as_tensor(positions, dtype=torch.long)[None].expand(3, b, t)
  causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
  with torch.no_grad():
    cos_sin = model.model.rotary_emb(xt, pos)
    ref, _ = model.model.layers[3].self_attn(
        xt, position_embeddings=cos_sin, attention_mask=causal.expand(
            b, 1, t, t))
  _check(np.asarray(ours), ref.numpy(), "attention layer")
