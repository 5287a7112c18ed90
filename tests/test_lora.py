"""Tests of qwen_jax/lora.py and the LoRA train step.

  * Zero-initialised adapters give the base model's logits exactly, and
    trained adapters the logits of the merged weights W + A B alpha / r.
  * The adapters' gradients equal the chain rule through the merged
    weights (dL/dA = s dL/dW B^T, dL/dB = s A^T dL/dW, with dL/dW taken on
    the merged model, no adapter involved); the train step's state and
    optimizer moments hold the adapters only and the base weights do not
    change.
  * Merged and exported, the checkpoint loads in transformers with logits
    equal to the adapted model's; the adapter file (PEFT layout) holds A
    and B such that W + B_hf A_hf alpha / r is the exported weight.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import checkpoint
from qwen_jax import lora
from qwen_jax import train_step
from qwen_jax.model import Qwen35
from tests import finetune_utils as fu
from tests.tolerances import HF_LOGITS_REL, assert_close, max_rel_err

SPEC = lora.LoraSpec(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def setup():
  cfg = fu.tiny_config(layers=4, ratio="1:1")  # scanned: two periods
  params = train_step.init_params(cfg, 0)
  return cfg, params


@pytest.fixture(scope="module")
def small():
  """One Gated DeltaNet and one attention layer (backward passes compile
  faster)."""
  cfg = fu.tiny_config(layers=2, ratio="1:1")
  return cfg, train_step.init_params(cfg, 0)


def _random_adapters(params, seed):
  ad = lora.init_adapters(params, SPEC, seed)
  leaves, tree = jax.tree_util.tree_flatten(ad)
  keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _apply(cfg, params, ids, adapted=False):
  """Jitted logits (under the adapters' interceptor when `adapted`)."""
  return _jit_apply(cfg, adapted)(params, ids)


_JITS = {}


def _jit_apply(cfg, adapted):
  if (cfg, adapted) not in _JITS:
    def f(p, ids):
      if adapted:
        with lora.applied():
          return Qwen35(cfg).apply({"params": p}, ids)
      return Qwen35(cfg).apply({"params": p}, ids)
    _JITS[cfg, adapted] = jax.jit(f)
  return _JITS[cfg, adapted]


def _ids(n=2, t=24, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 300, (n, t)),
                     jnp.int32)


def test_targets_and_shapes(setup):
  cfg, params = setup
  paths = lora.target_paths(params, SPEC)
  names = {p[-2] for p in paths}
  assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv",
                   "in_proj_z", "out_proj", "gate_proj", "up_proj",
                   "down_proj"}
  assert cfg.scan_layers
  ad = lora.init_adapters(params, SPEC, 0)
  q = ad["layers"]["layer_1"]["self_attn"]["q_proj"]
  assert q["lora_a"].shape == (2, cfg.hidden_size, 4)  # [periods, d, r]
  assert not np.any(np.asarray(q["lora_b"]))
  with pytest.raises(ValueError, match="projection kernels only"):
    lora.target_paths(params, lora.LoraSpec(targets=r".*conv1d/kernel"))
  with pytest.raises(ValueError, match="matches none"):
    lora.target_paths(params, lora.LoraSpec(targets=r"layers/nothing"))
  with pytest.raises(ValueError, match="lora rank"):
    lora.LoraSpec(rank=0)


def test_zero_adapters_equal_the_base_model(setup):
  cfg, params = setup
  ids = _ids()
  base = _apply(cfg, params, ids)
  ad = lora.init_adapters(params, SPEC, 3)
  out = _apply(cfg, lora.combine(params, ad, SPEC), ids, adapted=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_adapters_equal_merged_weights(setup):
  cfg, params = setup
  ids = _ids(seed=1)
  ad = _random_adapters(params, 1)
  out = _apply(cfg, lora.combine(params, ad, SPEC), ids, adapted=True)
  merged = _apply(cfg, lora.merge(params, ad, SPEC), ids)
  base = _apply(cfg, params, ids)
  assert max_rel_err(out, base) > 1e-2  # the adapters change the output
  assert_close(out, merged, "float32")


def _loss(cfg, params, batch):
  return train_step.loss_and_stats(params, cfg, batch)[0]


def test_gradients_follow_the_chain_rule_through_merged_weights(small):
  cfg, params = small
  ids = np.asarray(_ids(t=25, seed=2))
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
  ad = _random_adapters(params, 2)

  def adapted(a):
    with lora.applied():
      return _loss(cfg, lora.combine(params, a, SPEC), batch)

  got = jax.jit(jax.grad(adapted))(ad)
  # dL/dW of the merged model: no adapter, no interceptor.
  dw = jax.jit(jax.grad(lambda p: _loss(cfg, p, batch)))(
      lora.merge(params, ad, SPEC))
  hi = jax.lax.Precision.HIGHEST
  for path in lora.target_paths(params, SPEC):
    module = path[:-1]
    g, a, ga = dw, ad, got
    for k in module:
      g, a, ga = g[k], a[k], ga[k]
    g = g["kernel"]
    want_a = SPEC.scale * jnp.einsum("...df,...rf->...dr", g, a["lora_b"],
                                     precision=hi)
    want_b = SPEC.scale * jnp.einsum("...dr,...df->...rf", a["lora_a"], g,
                                     precision=hi)
    scale = float(jnp.max(jnp.abs(want_b))) + 1e-6
    assert_close(np.asarray(ga["lora_a"]) / scale,
                 np.asarray(want_a) / scale, "float32", scale=5)
    assert_close(np.asarray(ga["lora_b"]) / scale,
                 np.asarray(want_b) / scale, "float32", scale=5)


def test_train_step_trains_only_adapters(small):
  cfg, params = small
  tcfg = train_step.TrainConfig(batch_size=2, seq_len=24, num_steps=4,
                                learning_rate=1e-2, warmup_steps=0)
  ad = lora.init_adapters(params, SPEC, 0)
  state = train_step.init_state(cfg, tcfg, ad)
  # The optimizer state holds the adapters' moments and counters, nothing
  # of the base weights' size.
  n_ad = lora.count(ad)
  opt_sizes = [int(np.prod(x.shape)) for x in
               jax.tree_util.tree_leaves(state.opt_state)]
  assert sum(opt_sizes) <= 2 * n_ad + 16
  for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    keys = [str(getattr(k, "key", "")) for k in p]
    if any(k in ("kernel", "embedding", "weight") for k in keys):
      raise AssertionError(f"optimizer state holds a base weight: {p}")
  step = train_step.make_train_step(cfg, tcfg, donate=False, lora=SPEC)
  base_before = jax.tree_util.tree_map(np.asarray, params)
  ids = np.asarray(_ids(t=25, seed=3))
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
  for _ in range(2):
    state, metrics = step(state, batch, params)
  assert jax.tree_util.tree_structure(state.params) == (
      jax.tree_util.tree_structure(ad))
  jax.tree_util.tree_map(np.testing.assert_array_equal, base_before,
                         jax.tree_util.tree_map(np.asarray, params))
  q = state.params["layers"]["layer_0"]["mlp"]["up_proj"]
  q0 = ad["layers"]["layer_0"]["mlp"]["up_proj"]
  assert np.any(np.asarray(q["lora_b"]) != 0)
  assert np.any(np.asarray(q["lora_a"]) != np.asarray(q0["lora_a"]))
  assert np.isfinite(float(metrics["loss"]))


def test_merged_export_loads_in_transformers(setup, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg, params = setup
  ad = _random_adapters(params, 4)
  ids = np.asarray(_ids(n=2, t=24, seed=4))
  ours = _apply(cfg, lora.combine(params, ad, SPEC), jnp.asarray(ids),
                adapted=True)
  out = str(tmp_path / "merged")
  merged = lora.merge(params, ad, SPEC)
  checkpoint.save_hf_checkpoint(out, cfg, jax.device_get(merged),
                                dtype="float32")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, torch_dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  assert max_rel_err(theirs, ours) < HF_LOGITS_REL
  # The adapter alone, in PEFT's layout: W_base + B A alpha / r is the
  # exported weight (torch, from the files).
  adir = str(tmp_path / "adapter")
  lora.save_adapter(adir, cfg, ad, SPEC, "base")
  base_dir = str(tmp_path / "base")
  checkpoint.save_hf_checkpoint(base_dir, cfg, params, dtype="float32")
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  tensors = safetensors.torch.load_file(
      os.path.join(adir, lora.ADAPTER_WEIGHTS))
  base_w = safetensors.torch.load_file(
      os.path.join(base_dir, "model.safetensors"))
  exported = safetensors.torch.load_file(
      os.path.join(out, "model.safetensors"))
  names = [k[len("base_model.model."):-len(".lora_A.weight")]
           for k in tensors if k.endswith(".lora_A.weight")]
  # One per adapted projection of each layer: 6 in each Gated DeltaNet
  # layer, 7 in each attention layer.
  kinds = cfg.layer_types
  assert len(names) == 6 * kinds.count("linear_attention") + 7 * kinds.count(
      "full_attention")
  for name in names:
    a = tensors[f"base_model.model.{name}.lora_A.weight"]
    b = tensors[f"base_model.model.{name}.lora_B.weight"]
    want = base_w[f"{name}.weight"] + (b @ a) * SPEC.scale
    assert_close(exported[f"{name}.weight"].numpy(), want.numpy(),
                 "float32")
  spec2, back = lora.load_adapter(adir, cfg)
  assert spec2 == SPEC
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                 np.asarray(y)), ad, back)
