# %% [markdown]
# # qwen-jax quick start
#
# A Qwen3.5 hybrid model (Gated DeltaNet + gated attention) in JAX/Flax:
# build a model, round-trip a Hugging Face checkpoint, generate, and compare
# the gated delta rule backends. Everything here runs on a CPU runtime in a
# minute; switch `PRESET` and load a real checkpoint on a GPU runtime.
#
# On Colab, install first (a code cell):
# `%pip install "qwen-jax @ git+<this repository's URL>"`

# %%
import tempfile

import flax
import jax
import jax.numpy as jnp
import numpy as np

import qwen_jax
from pallas_kernels.gated_delta_rule import gated_delta_rule

PRESET = "tiny"  # or "qwen3.5-0.8b", ... (random weights)
print("jax", jax.__version__, "on", jax.default_backend())

# %% [markdown]
# ## A model from a preset
# The layer pattern is data: `cfg.layer_types`.

# %%
cfg = qwen_jax.QwenConfig.from_preset(PRESET)
print(cfg.layer_types)
model = qwen_jax.Qwen35(cfg)
ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                    (2, 48)), jnp.int32)
params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), ids))
params = params["params"]
logits = model.apply({"params": params}, ids)
print("parameters:", sum(x.size for x in jax.tree_util.tree_leaves(params)))
print("logits:", logits.shape)

# %% [markdown]
# ## Hugging Face checkpoints
# `save_hf_checkpoint` writes a folder transformers loads;
# `load_hf_checkpoint` reads any local Qwen3.5 folder (text or multimodal).

# %%
folder = tempfile.mkdtemp()
qwen_jax.save_hf_checkpoint(folder, cfg, params)
cfg2, params2 = qwen_jax.load_hf_checkpoint(folder)
logits2 = qwen_jax.Qwen35(cfg2).apply({"params": params2}, ids)
print("max |difference| after the round trip:",
      float(jnp.max(jnp.abs(logits2 - logits))))
assert jnp.allclose(logits, logits2, atol=1e-5)

# %% [markdown]
# ## Generation
# Prefill plus a compiled decode loop; greedy here.

# %%
new = qwen_jax.generate(cfg, params, ids[:, :8], max_new_tokens=12,
                        temperature=0.0, stop_tokens=())
print(np.asarray(new))

# %% [markdown]
# ## The gated delta rule
# Three backends behind one entry point: per-token `recurrent`, `chunked`
# (UT/WY, chunk 64) and the `pallas` kernel (interpret mode on a CPU).

# %%
rng = np.random.default_rng(1)
b, t, hk, hv, dk, dv = 1, 100, 2, 4, 16, 32
q = jnp.asarray(rng.normal(size=(b, t, hk, dk)), jnp.float32)
k = rng.normal(size=(b, t, hk, dk))
k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.float32)
v = jnp.asarray(rng.normal(size=(b, t, hv, dv)), jnp.float32)
g = jnp.asarray(-rng.uniform(0.01, 0.5, (b, t, hv)), jnp.float32)
beta = jnp.asarray(rng.uniform(0.1, 0.9, (b, t, hv)), jnp.float32)
outs = {}
for impl in ("recurrent", "chunked", "pallas"):
  outs[impl], _ = gated_delta_rule(
      q, k, v, g, beta, implementation=impl,
      interpret=jax.default_backend() == "cpu")
for impl in ("chunked", "pallas"):
  err = float(jnp.max(jnp.abs(outs[impl] - outs["recurrent"])))
  print(f"{impl:9s} vs recurrent: max |difference| {err:.2e}")
  assert err < 1e-4

# %% [markdown]
# ## Attention ratios
# Parameter counts of equal-depth models from all-attention to all-linear
# (the study itself: `python -m experiments.compare_ratios`).

# %%
for ratio in ("all-full", "1:1", "3:1", "7:1", "all-linear"):
  c = qwen_jax.QwenConfig.from_preset(
      "tiny", num_hidden_layers=8,
      layer_types=qwen_jax.layer_types_from_ratio(ratio, 8))
  print(f"{ratio:>10s}: {c.num_params():,} parameters")
