"""Mixture-of-experts models against transformers' Qwen3_5Moe classes.

Checkpoints are written by transformers' `save_pretrained` from randomised
tiny models (8 experts, d = 64; `tests/hf_utils.randomize_`): logits,
greedy generation, our save read back by transformers, the per-expert
layout and a wrongly shaped fused tensor. CPU, float32.
"""

import functools
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import qwen_jax
from qwen_jax import decode_loop
from qwen_jax import train_step
from qwen_jax.config import FULL, LINEAR
from qwen_jax.quantize import is_decode_layout
from tests import hf_utils
from tests import tolerances

L, F = LINEAR, FULL
VOCAB = 128


def _text_config(**overrides):
  kw = dict(
      vocab_size=VOCAB, hidden_size=64, num_hidden_layers=8,
      layer_types=[L, L, L, F] * 2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=32, linear_key_head_dim=16,
      linear_value_head_dim=24, linear_num_key_heads=2,
      linear_num_value_heads=4, linear_conv_kernel_dim=4,
      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
      shared_expert_intermediate_size=48,
      rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                       "partial_rotary_factor": 0.25},
      rms_norm_eps=1e-6, tie_word_embeddings=False,
      max_position_embeddings=512)
  kw.update(overrides)
  kw["num_hidden_layers"] = len(kw["layer_types"])
  return transformers.Qwen3_5MoeTextConfig(**kw)


_CASES = {
    "top2": dict(),
    "top1_tied": dict(num_experts_per_tok=1, tie_word_embeddings=True,
                      layer_types=[L, F, L]),
    "vlm": dict(layer_types=[L, L, L, F]),
}


@functools.lru_cache(maxsize=None)
def _saved(key):
  """(folder, torch model) of a case, written once per process."""
  text = _text_config(**_CASES[key])
  torch.manual_seed(0)
  if key == "vlm":
    vision = hf_utils.make_vision_config().to_dict()
    vision["model_type"] = "qwen3_5_moe_vision"
    model = transformers.Qwen3_5MoeForConditionalGeneration(
        transformers.Qwen3_5MoeConfig(text_config=text.to_dict(),
                                      vision_config=vision))
  else:
    model = transformers.Qwen3_5MoeForCausalLM(text)
  hf_utils.randomize_(model.float(), seed=len(key))
  model.eval()
  path = tempfile.mkdtemp(prefix=f"qwen_jax_moe_{key}_")
  model.save_pretrained(path)
  return path, model


def _logits(cfg, params, ids, mask=None):
  model = qwen_jax.Qwen35(cfg)
  return np.asarray(jax.jit(lambda p, i: model.apply(
      {"params": p}, i, attention_mask=mask))(params, jnp.asarray(ids)))


def _hf(model, ids):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                use_cache=False)
  return out.logits.float().numpy()


def _check(ours, ref, where):
  err = tolerances.max_rel_err(ours, ref)
  assert err < tolerances.HF_LOGITS_REL, f"{where}: {err:.2e}"


@pytest.mark.parametrize("key,scan", [("top2", True), ("top2", False),
                                      ("top1_tied", True), ("vlm", True)])
def test_logits_equal_transformers(key, scan):
  path, model = _saved(key)
  cfg, params = qwen_jax.load_hf_checkpoint(path, scan_layers=scan)
  assert cfg.is_moe and cfg.num_experts == 8
  assert (cfg.vision is not None) == (key == "vlm")
  ids = hf_utils.random_ids(np.random.default_rng(1), 2, 37, VOCAB)
  _check(_logits(cfg, params, ids), _hf(model, ids), f"{key} scan={scan}")


def test_save_then_transformers_loads_equal_logits(tmp_path):
  path, model = _saved("top2")
  cfg, params = qwen_jax.load_hf_checkpoint(path)
  out = os.fspath(tmp_path / "saved")
  qwen_jax.save_hf_checkpoint(out, cfg, params)
  reloaded = hf_utils.load_hf_causal_lm(out)
  assert type(reloaded).__name__ == "Qwen3_5MoeForCausalLM"
  ids = hf_utils.random_ids(np.random.default_rng(2), 2, 21, VOCAB)
  np.testing.assert_array_equal(_hf(reloaded, ids), _hf(model, ids))
  cfg2, params2 = qwen_jax.load_hf_checkpoint(out)
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def _fused(tensors):
  """The per-expert tensors transformers' save_pretrained writes
  (`mlp.experts.{j}.{gate,up,down}_proj.weight`) fused as its modules hold
  them (`mlp.experts.gate_up_proj [E, 2I, d]`, `down_proj [E, d, I]`)."""
  pat = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")
  out, parts = {}, {}
  for k, v in tensors.items():
    m = pat.match(k)
    if m:
      parts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = v
    else:
      out[k] = v
  for layer, p in parts.items():
    stack = lambda name: np.stack([p[name][j] for j in sorted(p[name])])
    out[f"{layer}.gate_up_proj"] = np.concatenate(
        [stack("gate_proj"), stack("up_proj")], axis=1)
    out[f"{layer}.down_proj"] = stack("down_proj")
  return out


def test_per_expert_and_fused_layouts_load_the_same(tmp_path):
  """transformers writes one tensor per expert (its conversion mapping
  fuses them on load); a folder with the fused tensors (as ours saves)
  loads to the same parameters, and an expert missing a projection is
  named."""
  path, _ = _saved("top1_tied")
  cfg, params = qwen_jax.load_hf_checkpoint(path)
  tensors = hf_utils.read_tensors(path)
  assert "model.layers.0.mlp.experts.7.up_proj.weight" in tensors
  fused = _fused(tensors)
  assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (
      8, 64, 64)
  out = tmp_path / "fused"
  out.mkdir()
  _write(path, out, fused)
  cfg2, params2 = qwen_jax.load_hf_checkpoint(out)
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
  _write(path, out, tensors)
  with pytest.raises(ValueError, match=r"experts\.5\.up_proj"):
    qwen_jax.load_hf_checkpoint(out)


def _write(src, dest, tensors):
  """config.json of `src` and `tensors` as dest/model.safetensors."""
  shutil.copy(os.path.join(src, "config.json"), dest / "config.json")
  safetensors.numpy.save_file({k: np.ascontiguousarray(v)
                               for k, v in tensors.items()},
                              os.fspath(dest / "model.safetensors"),
                              metadata={"format": "pt"})


def test_fused_tensor_of_wrong_shape_is_named(tmp_path):
  path, _ = _saved("top1_tied")
  tensors = _fused(hf_utils.read_tensors(path))
  key = "model.layers.0.mlp.experts.gate_up_proj"
  good = tensors[key].shape
  tensors[key] = tensors[key][:, :-2]  # [E, 2I - 2, d]
  out = tmp_path / "bad"
  out.mkdir()
  _write(path, out, tensors)
  with pytest.raises(ValueError) as e:
    qwen_jax.load_hf_checkpoint(out)
  msg = str(e.value)
  assert key in msg and str(tuple(good)) in msg and (
      str(tuple(tensors[key].shape)) in msg)


def test_greedy_generation_equals_transformers():
  path, model = _saved("top2")
  cfg, params = qwen_jax.load_hf_checkpoint(path)
  # On a CPU generate runs the decode layout (qwen_jax.decode_loop): the
  # router, shared expert and stacked experts output-major
  # (moe.experts_stored).
  if jax.default_backend() == "cpu":
    assert is_decode_layout(decode_loop.prepare(cfg, params)[1])
  ids = hf_utils.random_ids(np.random.default_rng(3), 2, 9, VOCAB)
  ours = np.asarray(qwen_jax.generate(cfg, params, ids, max_new_tokens=12,
                                      prefill_block=4, stop_tokens=()))
  with torch.no_grad():
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    ref = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                         max_new_tokens=12, min_new_tokens=12,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
  np.testing.assert_array_equal(ours, ref[:, ids.shape[1]:].numpy())


def test_training_loss_adds_transformers_router_aux_loss():
  """`train_step.loss_and_stats`: the router's load-balancing loss equals
  transformers' `aux_loss` (output_router_logits) on the same checkpoint,
  and the objective is the cross-entropy plus router_aux_loss_coef times
  it."""
  path, model = _saved("top2")
  cfg, params = qwen_jax.load_hf_checkpoint(path)
  ids = hf_utils.random_ids(np.random.default_rng(4), 2, 17, VOCAB)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
  loss, stats = train_step.loss_and_stats(params, cfg, batch)
  with torch.no_grad():
    ref = model(input_ids=torch.as_tensor(batch["inputs"], dtype=torch.long),
                output_router_logits=True, use_cache=False).aux_loss
  np.testing.assert_allclose(float(stats["router_aux_loss"]), float(ref),
                             rtol=tolerances.tol("float32")[0])
  ce = float(stats["loss_sum"]) / float(stats["tokens"])
  np.testing.assert_allclose(
      float(loss), ce + cfg.router_aux_loss_coef * float(ref),
      rtol=tolerances.tol("float32")[0])
  assert 0 <= float(stats["expert_load_min"]) <= 1 <= float(
      stats["expert_load_max"])


def test_save_in_place_over_per_expert_tensors(tmp_path):
  """Saving into the folder of transformers' per-expert tensors replaces
  them by the fused ones (none left behind) and transformers reads the
  result with the same logits."""
  path, model = _saved("top2")
  dst = os.fspath(tmp_path / "ckpt")
  shutil.copytree(path, dst)
  before = _tensor_names(dst)
  assert any(".experts.0.gate_proj." in k for k in before)
  cfg, params = qwen_jax.load_hf_checkpoint(dst)
  qwen_jax.save_hf_checkpoint(dst, cfg, params)
  after = _tensor_names(dst)
  assert not any(".experts.0." in k for k in after), sorted(after)[:5]
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in after)
  ids = hf_utils.random_ids(np.random.default_rng(4), 2, 19, VOCAB)
  np.testing.assert_array_equal(_hf(hf_utils.load_hf_causal_lm(dst), ids),
                                _hf(model, ids))


def _tensor_names(folder):
  names = []
  for name in os.listdir(folder):
    if name.endswith(".safetensors"):
      with safetensors.safe_open(os.path.join(folder, name), "np") as f:
        names += list(f.keys())
  return names
