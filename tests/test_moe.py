"""The mixture-of-experts MLP: config, routing, grouped matmul, parity.

References: a float64 NumPy loop over tokens and their chosen experts, the
dense all-experts computation, and transformers'
`Qwen3_5MoeSparseMoeBlock` (outputs and gradients, CPU, float32). Tiny
sizes: 8 experts, d = 32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe

import qwen_jax
from qwen_jax import checkpoint
from qwen_jax import moe
from qwen_jax.config import PRESETS
from qwen_jax.config import find_period, layer_types_from_ratio
from tests import tolerances

D, E, F, FS = 32, 8, 16, 24  # width, experts, expert width, shared width


def _cfg(k, impl="ragged"):
  return qwen_jax.QwenConfig.from_preset(
      "tiny-moe", hidden_size=D, num_experts=E, num_experts_per_tok=k,
      moe_intermediate_size=F, shared_expert_intermediate_size=FS,
      moe_implementation=impl)


# ----------------------------------------------------------------- config
# (The presets' parameter counts against transformers' Qwen3_5Moe classes
# on the meta device: tests/test_config.py, with every preset.)
@pytest.mark.parametrize("name,total,active", [
    ("qwen3.5-35b-a3b", (34, 37), (2.5, 3.6)),
    ("qwen3.5-122b-a10b", (118, 126), (9, 11)),
    ("qwen3.5-397b-a17b", (390, 405), (16, 18))])
def test_moe_preset_sizes_are_plausible(name, total, active):
  cfg = qwen_jax.QwenConfig.from_preset(name, vision=None)
  per_layer = cfg.moe_mlp_params() - cfg.moe_mlp_params(active=True)
  n_active = (cfg.num_params() - cfg.num_hidden_layers * per_layer
              - cfg.vocab_size * cfg.hidden_size)  # the embedding is a lookup
  assert total[0] < cfg.num_params() / 1e9 < total[1]
  assert active[0] < n_active / 1e9 < active[1]


@pytest.mark.parametrize("vision", [None, "tiny"])
def test_moe_hf_config_round_trip(vision):
  cfg = qwen_jax.QwenConfig.from_preset("tiny-moe")
  if vision:
    cfg = cfg.replace(vision=qwen_jax.QwenConfig.from_preset(
        "tiny-vl").vision, **{f: getattr(PRESETS["tiny-vl"], f) for f in (
            "mrope_section", "image_token_id", "video_token_id",
            "vision_start_token_id", "vision_end_token_id")})
  d = cfg.to_hf_dict()
  assert d["model_type"] == ("qwen3_5_moe" if vision else "qwen3_5_moe_text")
  text = d["text_config"] if vision else d
  assert (text["num_experts"], text["num_experts_per_tok"],
          text["moe_intermediate_size"],
          text["shared_expert_intermediate_size"]) == (8, 2, 32, 48)
  assert qwen_jax.QwenConfig.from_hf_config(d) == cfg
  hf = cfg.to_hf_config()
  assert qwen_jax.QwenConfig.from_hf_config(hf) == cfg
  # The layout follows the MLP kinds: no experts, no "moe" layer.
  dense = cfg.replace(num_experts=0)
  assert set(dense.mlp_types) == {"dense"}
  assert dense.to_hf_dict()["model_type"] in ("qwen3_5", "qwen3_5_text")


@pytest.mark.parametrize("changes,field", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(num_experts=2.5), "num_experts"),
    (dict(mlp_types=("moe", "dense", "moe")), "mlp_types"),
    (dict(mlp_types=("moe", "dense", "moe", "sparse")), "mlp_types"),
    (dict(moe_implementation="loop"), "moe_implementation"),
    (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
    (dict(moe_dispatch="alltoall"), "moe_dispatch"),
    (dict(moe_dispatch="all_to_all", moe_capacity_factor=-0.5),
     "moe_capacity_factor"),
    # The gather dispatch computes every pair: a capacity means nothing.
    (dict(moe_capacity_factor=1.25), "moe_capacity_factor"),
])
def test_moe_config_errors_name_the_field(changes, field):
  with pytest.raises(ValueError, match=field) as e:
    qwen_jax.QwenConfig.from_preset("tiny-moe").replace(**changes)
  assert "expected" in str(e.value) and "found" in str(e.value)


def test_mixed_mlp_kinds_run_but_have_no_transformers_config():
  lt = layer_types_from_ratio("3:1", 8)
  cfg = qwen_jax.QwenConfig.from_preset(
      "tiny-moe", num_hidden_layers=8, layer_types=lt,
      mlp_types=("dense", "moe") * 4)
  assert cfg.period == 4 and cfg.num_periods == 2
  # The MLP kinds shape the period: these repeat only once in 8 layers.
  other = cfg.replace(mlp_types=("moe",) * 4 + ("dense",) * 4)
  assert find_period(lt) == 4 and other.period == 8
  slots = checkpoint.param_shapes(cfg)["layers"]  # eval_shape: no memory
  assert slots["layer_1"]["mlp"]["gate_up_proj"].shape == (2, 8, 64, 64)
  assert "gate_proj" in slots["layer_0"]["mlp"]
  with pytest.raises(ValueError, match="mlp_types: expected every layer"):
    cfg.to_hf_dict()


# ------------------------------------------------------------ the layer
def _random_params(rng):
  n = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)
  return {
      "router": {"kernel": n(D, E)},
      "gate_up_proj": n(E, D, 2 * F), "down_proj": n(E, F, D),
      "shared_expert": {"gate_proj": {"kernel": n(D, FS)},
                        "up_proj": {"kernel": n(D, FS)},
                        "down_proj": {"kernel": n(FS, D)}},
      "shared_expert_gate": {"kernel": n(D, 1)},
  }


def _numpy_block(p, x, k):
  """float64 reference, one token and one chosen expert at a time."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64).reshape(-1, D)
  silu = lambda z: z / (1 + np.exp(-z))
  out = np.zeros_like(x)
  counts = np.zeros(E, int)
  for i, xi in enumerate(x):
    logits = xi @ p["router"]["kernel"]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs, kind="stable")[:k]
    w = probs[chosen] / probs[chosen].sum()
    for wj, j in zip(w, chosen):
      counts[j] += 1
      h = xi @ p["gate_up_proj"][j]
      out[i] += wj * ((silu(h[:F]) * h[F:]) @ p["down_proj"][j])
    s = p["shared_expert"]
    sh = (silu(xi @ s["gate_proj"]["kernel"]) * (xi @ s["up_proj"]["kernel"])
          ) @ s["down_proj"]["kernel"]
    g = 1 / (1 + np.exp(-(xi @ p["shared_expert_gate"]["kernel"])))
    out[i] += g * sh
  return out, counts


@pytest.mark.parametrize("impl", ["ragged", "dense"])
@pytest.mark.parametrize("k", [1, 3])
def test_block_matches_float64_reference(k, impl):
  """Top-1 and top-k; 9 tokens over 8 experts route unevenly and leave
  one expert without a token (checked)."""
  rng = np.random.default_rng(k)
  p = _random_params(rng)
  x = rng.normal(size=(1, 9, D)).astype(np.float32)
  # Expert E-1 is never chosen: x's first feature is large and positive,
  # its router weight for E-1 very negative.
  x[..., 0] = 3 + np.abs(x[..., 0])
  p["router"]["kernel"][0, E - 1] = -10.0
  y = moe.SparseMoeBlock(_cfg(k, impl)).apply({"params": p}, jnp.asarray(x))
  ref, counts = _numpy_block(p, x, k)
  assert (counts == 0).any() and counts.max() >= 2
  tolerances.assert_close(np.asarray(y).reshape(-1, D), ref, "float32")


def test_grouped_matmul_gradients_equal_dense():
  """ragged_dot over expert-sorted pairs against every expert on every
  token: outputs and all gradients (x, routing weights, both stacks)."""
  rng = np.random.default_rng(3)
  t, k = 13, 2
  x = jnp.asarray(rng.normal(size=(t, D)), jnp.float32)
  idx = jnp.asarray(np.stack([rng.choice(E - 2, k, replace=False)
                              for _ in range(t)]))  # experts 6, 7: none
  w = jax.nn.softmax(jnp.asarray(rng.normal(size=(t, k)), jnp.float32))
  gu = jnp.asarray(rng.normal(0, 0.2, (E, D, 2 * F)), jnp.float32)
  dn = jnp.asarray(rng.normal(0, 0.2, (E, F, D)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(t, D)), jnp.float32)

  def loss(fn):
    return lambda xx, ww, g, d: jnp.sum(fn(xx, ww, idx, g, d) * cot)

  ys = [fn(x, w, idx, gu, dn) for fn in (moe.experts_ragged,
                                          moe.experts_dense)]
  tolerances.assert_close(ys[0], ys[1], "float32")
  gs = [jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3)))(x, w, gu, dn)
        for fn in (moe.experts_ragged, moe.experts_dense)]
  for name, a, b in zip(("x", "weights", "gate_up", "down"), *gs):
    tolerances.assert_close(a, b, "float32", err_msg=name)
  # The experts no token chose get no gradient.
  assert not np.any(np.asarray(gs[0][2])[E - 2:])


def _hf_block(k, seed):
  cfg = transformers.Qwen3_5MoeTextConfig(
      hidden_size=D, num_experts=E, num_experts_per_tok=k,
      moe_intermediate_size=F, shared_expert_intermediate_size=FS)
  torch.manual_seed(seed)
  block = modeling_qwen3_5_moe.Qwen3_5MoeSparseMoeBlock(cfg).float()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, prm in block.named_parameters():
      prm.copy_(torch.randn(prm.shape, generator=gen) * 0.2)
  return block


def _ours_from_hf(block, grad=False):
  """Our parameter tree from the torch block's weights (or their .grad)."""
  def t(prm):
    return (prm.grad if grad else prm).detach().numpy()
  s = block.shared_expert
  return {
      "router": {"kernel": t(block.gate.weight).T},
      "gate_up_proj": t(block.experts.gate_up_proj).transpose(0, 2, 1),
      "down_proj": t(block.experts.down_proj).transpose(0, 2, 1),
      "shared_expert": {n: {"kernel": t(getattr(s, n).weight).T}
                        for n in ("gate_proj", "up_proj", "down_proj")},
      "shared_expert_gate": {"kernel": t(block.shared_expert_gate.weight).T},
  }


@pytest.mark.parametrize("k", [1, 2])
def test_block_matches_transformers_with_gradients(k):
  block = _hf_block(k, seed=10 + k)
  rng = np.random.default_rng(k)
  x = rng.normal(size=(2, 7, D)).astype(np.float32)
  cot = rng.normal(size=(2, 7, D)).astype(np.float32)
  xt = torch.tensor(x, requires_grad=True)
  yt = block(xt)
  (yt * torch.tensor(cot)).sum().backward()

  params = _ours_from_hf(block)
  model = moe.SparseMoeBlock(_cfg(k))

  def loss(p, xx):
    return jnp.sum(model.apply({"params": p}, xx) * cot)

  y = model.apply({"params": params}, jnp.asarray(x))
  assert tolerances.max_rel_err(y, yt.detach().numpy()) < (
      tolerances.HF_LOGITS_REL)
  gp, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
  theirs = _ours_from_hf(block, grad=True)
  assert tolerances.max_rel_err(gx, xt.grad.numpy()) < tolerances.HF_GRAD_REL
  # Relative to the leaf's largest gradient, floored at 1% of the largest
  # anywhere: with top-1 the router's gradient is 0 in exact arithmetic
  # (the one weight is p / p), and both sides hold only rounding there.
  floor = 1e-2 * max(float(np.abs(x).max()) for x in
                     jax.tree_util.tree_leaves(theirs))
  for path, a in jax.tree_util.tree_leaves_with_path(gp):
    b = theirs
    for key in path:
      b = b[key.key]
    err = float(np.abs(np.asarray(a) - b).max()) / max(
        float(np.abs(b).max()), floor)
    assert err < tolerances.HF_GRAD_REL, (path, err)


def test_router_stats_and_load_balancing_loss():
  """Against transformers' `load_balancing_loss_func` on the same logits,
  with a padding mask."""
  rng = np.random.default_rng(0)
  k, t = 2, 12
  logits = [rng.normal(size=(t, E)).astype(np.float32) for _ in range(3)]
  mask = np.ones((1, t), np.int64)
  mask[0, :4] = 0
  stats = []
  for lg in logits:
    _, idx = moe.route(jnp.asarray(lg), k)
    stats.append(moe.router_stats(jnp.asarray(lg), idx, E,
                                  jnp.asarray(mask[0] == 1)))
  stats = jnp.stack(stats)
  ours = float(moe.load_balancing_loss(stats))
  ref = float(modeling_qwen3_5_moe.load_balancing_loss_func(
      tuple(torch.tensor(lg) for lg in logits), E, k, torch.tensor(mask)))
  np.testing.assert_allclose(ours, ref, rtol=tolerances.tol("float32")[0])
  # Every real token is routed to k experts: nothing is dropped.
  np.testing.assert_allclose(np.asarray(stats[:, 0].sum(-1)), k, rtol=1e-6)
