# %% [markdown]
# # qwen-jax quick start
#
# A Qwen3.5 hybrid model (Gated DeltaNet + gated attention) in JAX/Flax:
# build a model, round-trip a Hugging Face checkpoint, generate, describe
# an image, and compare the gated delta rule backends. Everything here runs
# on a CPU runtime in a minute or two; switch `PRESET` and load a real
# checkpoint on a GPU runtime.
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
# ## Describing an image
# A config with a vision tower (`cfg.vision`) takes images as transformers'
# processor gives them: patches `pixel_values` and a (t, h, w) patch grid
# per image, with one placeholder token per merged 2 x 2 block of patches
# in the prompt. `tiny-vl` is "tiny" with a two-block tower and random
# weights, so its description is noise; set `CHECKPOINT` to a Qwen3.5
# folder (config.json, weights, tokenizer.json, preprocessor_config.json)
# to describe the image for real (a GPU runtime for the larger models).

# %%
import PIL.Image

from qwen_jax import image_processing
from qwen_jax.vision import VisionTokens

CHECKPOINT = None  # e.g. "/content/Qwen3.5-0.8B"
picture = PIL.Image.fromarray(  # or PIL.Image.open("photo.jpg")
    np.random.default_rng(2).integers(0, 256, (48, 64, 3), np.uint8))
if CHECKPOINT:
  vcfg, vparams = qwen_jax.load_hf_checkpoint(CHECKPOINT)
  processor = qwen_jax.load_image_processor(CHECKPOINT)
  tokenizer = qwen_jax.load_tokenizer(CHECKPOINT)
  prompt = tokenizer.apply_chat_template(
      [{"role": "user", "content": [
          {"type": "image"},
          {"type": "text", "text": "Describe this image."}]}],
      add_generation_prompt=True, enable_thinking=False)
  decode = lambda new: tokenizer.decode(new, skip_special_tokens=True)
else:
  vcfg = qwen_jax.QwenConfig.from_preset("tiny-vl")
  vparams = flax.linen.meta.unbox(qwen_jax.Qwen35(vcfg).init(
      jax.random.PRNGKey(0), ids))["params"]
  # The tiny tower's patches are 4 pixels wide.
  settings = image_processing.ProcessorConfig(
      min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4,
      temporal_patch_size=2, merge_size=2, image_mean=(0.5, 0.5, 0.5),
      image_std=(0.5, 0.5, 0.5))
  processor = image_processing.VisionProcessor(settings, settings)
  prompt = ([vcfg.vision_start_token_id, vcfg.image_token_id,
             vcfg.vision_end_token_id] + list(b"Describe this image."))
  decode = lambda new: bytes(new).decode("utf-8", errors="replace")
inputs = processor(images=[picture])
print("patches:", inputs["pixel_values"].shape, "grid (t, h, w):",
      inputs["image_grid_thw"].tolist())
tokens = VisionTokens(
    image_token_id=vcfg.image_token_id, video_token_id=vcfg.video_token_id,
    vision_start_token_id=vcfg.vision_start_token_id,
    vision_end_token_id=vcfg.vision_end_token_id)
prompt = image_processing.expand_placeholder_ids(
    prompt, inputs["image_grid_thw"],
    merge_size=vcfg.vision.spatial_merge_size, tokens=tokens)
new = qwen_jax.generate(vcfg, vparams, np.asarray([prompt]),
                        max_new_tokens=16, stop_tokens=None if CHECKPOINT
                        else (), **inputs)
print(len(prompt), "prompt tokens;", decode(np.asarray(new)[0].tolist()))

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
