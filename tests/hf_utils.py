"""Tiny random Hugging Face Qwen3.5 models for parity tests.

Everything here runs on the CPU in float32 and is seeded with
`torch.manual_seed` / a `torch.Generator`, so a (config, seed) pair always
gives the same weights. Every parameter is randomised, norms, `A_log` and
`dt_bias` included: HF's default init (zero-centred norms at 0, gated norm at
1) would hide `(1 + w)` versus `w` mistakes (transformers'
`models/qwen3_5/modeling_qwen3_5.py`: `Qwen3_5RMSNorm` scales by `1 + w`,
`Qwen3_5RMSNormGated` by `w`).

The helpers also edit saved checkpoints (add, drop or replace tensors, edit
config.json) so that tests can build checkpoints the project did not write.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable, Mapping

import numpy as np
import safetensors.numpy
import torch
import transformers

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# Fake multi-token-prediction head tensors, as released checkpoints carry;
# HF (`_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]` in
# modeling_qwen3_5.py) and our loader must both skip them.
_FAKE_MTP_SHAPES = {
    "mtp.fc.weight": (2, 4),
    "mtp.norm.weight": (4,),
    "mtp.pre_fc_norm_embedding.weight": (4,),
    "mtp.layers.0.input_layernorm.weight": (4,),
    "mtp.layers.0.mlp.up_proj.weight": (3, 4),
}


def make_text_config(**overrides: Any) -> transformers.Qwen3_5TextConfig:
  """A tiny `Qwen3_5TextConfig`: 3:1 pattern, GQA, GVA (nv = 2 nk), dk != dv.

  `rope_theta` is given explicitly (1e7, as released); HF would otherwise fall
  back to 10000. Pass `rope_parameters=None` (or any other dict) in
  `overrides` to change that.

  Args:
    **overrides: Qwen3_5TextConfig fields, e.g. layer_types, num_hidden_layers,
      tie_word_embeddings, attention_bias.

  Returns:
    The config (float32, eager-free: HF picks sdpa on CPU).
  """
  kw = dict(
      vocab_size=128,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=4,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=32,
      linear_key_head_dim=16,
      linear_value_head_dim=24,
      linear_num_key_heads=2,
      linear_num_value_heads=4,
      linear_conv_kernel_dim=4,
      rope_parameters={
          "rope_type": "default",
          "rope_theta": 1e7,
          "partial_rotary_factor": 0.25,
      },
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      max_position_embeddings=512,
  )
  kw.update(overrides)
  if kw.get("layer_types") is not None:
    kw["layer_types"] = list(kw["layer_types"])
    if "num_hidden_layers" not in overrides:
      kw["num_hidden_layers"] = len(kw["layer_types"])
  if kw.get("rope_parameters") is None:
    kw.pop("rope_parameters", None)
  return transformers.Qwen3_5TextConfig(**kw)


def make_vision_config() -> transformers.Qwen3_5VisionConfig:
  """A one-block vision tower; only its weights matter (skipped by loaders)."""
  return transformers.Qwen3_5VisionConfig(
      depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
      out_hidden_size=64, patch_size=4, temporal_patch_size=2,
      spatial_merge_size=2, num_position_embeddings=16)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.1,
               embed_std: float = 0.3) -> torch.nn.Module:
  """Randomises every parameter of `model` in place.

  Rules (by parameter name):
    * `A_log`: log of a log-uniform A in [0.02, 4] (moderate decays, some
      heads remember across a 64-token chunk).
    * `dt_bias`: N(0, 1).
    * GDN gated norm `linear_attn.norm.weight`: 1 + N(0, 0.3).
    * other 1-D `*norm*.weight` (zero-centred RMSNorms): N(0, 0.3).
    * embeddings: N(0, embed_std); 1-D biases and other 1-D: N(0, std);
      conv1d weights: N(0, 0.3); all other matrices: N(0, std).

  Tied weights share storage, and `named_parameters` yields them once, so
  the tie survives.

  Args:
    model: a transformers Qwen3.5 model (any head).
    seed: RNG seed.
    std: std of linear weights and biases.
    embed_std: std of the embedding (and of a tied LM head).

  Returns:
    `model`.
  """
  gen = torch.Generator().manual_seed(seed)

  def normal(shape, s, mean=0.0):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * s + mean

  for name, p in model.named_parameters():
    shape = tuple(p.shape)
    if name.endswith("A_log"):
      u = torch.rand(shape, generator=gen, dtype=torch.float32)
      new = math.log(0.02) + u * (math.log(4.0) - math.log(0.02))
    elif name.endswith("dt_bias"):
      new = normal(shape, 1.0)
    elif name.endswith("linear_attn.norm.weight"):
      new = normal(shape, 0.3, 1.0)
    elif "norm" in name and name.endswith("weight") and p.ndim == 1:
      new = normal(shape, 0.3)
    elif "embed_tokens" in name:
      new = normal(shape, embed_std)
    elif "conv1d" in name:
      new = normal(shape, 0.3)
    else:
      new = normal(shape, std)
    p.copy_(new.to(p.dtype))
  return model


def causal_lm(cfg: transformers.Qwen3_5TextConfig, seed: int,
              **randomize_kw: Any) -> transformers.Qwen3_5ForCausalLM:
  """A randomised float32 `Qwen3_5ForCausalLM` in eval mode (not saved)."""
  torch.manual_seed(seed)
  model = transformers.Qwen3_5ForCausalLM(cfg).to(torch.float32)
  randomize_(model, seed, **randomize_kw)
  return model.eval()


def _new_dir(tmpdir: str | os.PathLike, prefix: str) -> str:
  os.makedirs(tmpdir, exist_ok=True)
  return tempfile.mkdtemp(prefix=prefix, dir=os.fspath(tmpdir))


def save_causal_lm(tmpdir: str | os.PathLike,
                   cfg: transformers.Qwen3_5TextConfig, seed: int,
                   max_shard_size: int | str | None = None,
                   **randomize_kw: Any):
  """Builds, randomises and saves a `Qwen3_5ForCausalLM`.

  Args:
    tmpdir: parent directory; a fresh sub-directory is created in it.
    cfg: the text config.
    seed: seed of the weights.
    max_shard_size: passed to `save_pretrained` when given (sharding).
    **randomize_kw: passed to `randomize_`.

  Returns:
    (checkpoint directory, the torch model).
  """
  model = causal_lm(cfg, seed, **randomize_kw)
  path = _new_dir(tmpdir, "causal_lm_")
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kw)
  return path, model


def save_sharded(tmpdir: str | os.PathLike,
                 cfg: transformers.Qwen3_5TextConfig, seed: int,
                 max_shard_size: int | str = "100KB",
                 **randomize_kw: Any):
  """Like `save_causal_lm`, in several shards plus model.safetensors.index.json.

  Returns:
    (checkpoint directory, the torch model).
  """
  path, model = save_causal_lm(tmpdir, cfg, seed,
                               max_shard_size=max_shard_size, **randomize_kw)
  files = safetensors_files(path)
  if len(files) < 2 or not os.path.exists(os.path.join(path, SAFE_INDEX)):
    raise AssertionError(f"expected a sharded checkpoint, got {files}")
  return path, model


def save_conditional_generation(tmpdir: str | os.PathLike,
                                text_cfg: transformers.Qwen3_5TextConfig,
                                seed: int, add_mtp: bool = True,
                                **randomize_kw: Any):
  """Saves a randomised `Qwen3_5ForConditionalGeneration` (VLM wrapper).

  Keys on disk: `model.language_model.*` (text), `model.visual.*` (vision),
  `lm_head.weight` (absent when tied) and, with `add_mtp`, fake `mtp.*`
  tensors like the released checkpoints carry.

  Args:
    tmpdir: parent directory.
    text_cfg: the text config; its tie_word_embeddings is also set on the
      wrapper config (that is the flag the wrapper honours).
    seed: seed of the weights.
    add_mtp: add fake `mtp.*` tensors to the saved file.
    **randomize_kw: passed to `randomize_`.

  Returns:
    (checkpoint directory, the torch model).
  """
  cfg = transformers.Qwen3_5Config(
      text_config=text_cfg.to_dict(),
      vision_config=make_vision_config().to_dict(),
      tie_word_embeddings=text_cfg.tie_word_embeddings)
  torch.manual_seed(seed)
  model = transformers.Qwen3_5ForConditionalGeneration(cfg).to(torch.float32)
  randomize_(model, seed, **randomize_kw)
  model.eval()
  path = _new_dir(tmpdir, "vlm_")
  model.save_pretrained(path)
  if add_mtp:
    add_fake_mtp(path, seed)
  return path, model


# --------------------------------------------------------------- file edits
def safetensors_files(path: str | os.PathLike) -> list[str]:
  """Sorted names of the *.safetensors files in a checkpoint directory."""
  return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (single file or sharded)."""
  out = {}
  for f in safetensors_files(path):
    out.update(safetensors.numpy.load_file(os.path.join(path, f)))
  return out


def _file_of(path: str, key: str) -> str:
  index = os.path.join(path, SAFE_INDEX)
  if os.path.exists(index):
    with open(index) as f:
      return json.load(f)["weight_map"][key]
  return SAFE_SINGLE


def edit_tensors(path: str | os.PathLike,
                 fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 ) -> None:
  """Rewrites the checkpoint's safetensors through `fn(tensors) -> tensors`.

  Works for a single file and for a sharded checkpoint (keys that stay keep
  their shard, new keys go to the first shard, and the index is rewritten).

  Args:
    path: checkpoint directory.
    fn: maps the dict of all tensors to the new dict.
  """
  path = os.fspath(path)
  files = safetensors_files(path)
  old = {f: safetensors.numpy.load_file(os.path.join(path, f)) for f in files}
  owner = {k: f for f, d in old.items() for k in d}
  merged = {k: v for d in old.values() for k, v in d.items()}
  new = fn(dict(merged))
  per_file = {f: {} for f in files}
  for k, v in new.items():
    per_file[owner.get(k, files[0])][k] = np.ascontiguousarray(v)
  for f, d in per_file.items():
    safetensors.numpy.save_file(d, os.path.join(path, f),
                                metadata={"format": "pt"})
  index = os.path.join(path, SAFE_INDEX)
  if os.path.exists(index):
    with open(index) as f:
      idx = json.load(f)
    idx["weight_map"] = {k: f for f, d in per_file.items() for k in d}
    idx.setdefault("metadata", {})["total_size"] = int(
        sum(v.nbytes for v in new.values()))
    with open(index, "w") as f:
      json.dump(idx, f, indent=2, sort_keys=True)


def add_tensors(path: str | os.PathLike,
                tensors: Mapping[str, np.ndarray]) -> None:
  """Adds (or overwrites) tensors in a saved checkpoint."""
  edit_tensors(path, lambda d: {**d, **dict(tensors)})


def remove_tensor(path: str | os.PathLike, key: str) -> None:
  """Deletes one tensor from a saved checkpoint (KeyError if absent)."""
  def fn(d):
    del d[key]
    return d
  edit_tensors(path, fn)


def add_fake_mtp(path: str | os.PathLike, seed: int = 0) -> list[str]:
  """Adds fake `mtp.*` tensors; returns their names."""
  rng = np.random.default_rng(seed)
  tensors = {k: rng.standard_normal(s).astype(np.float32)
             for k, s in _FAKE_MTP_SHAPES.items()}
  add_tensors(path, tensors)
  return sorted(tensors)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def edit_config(path: str | os.PathLike,
                fn: Callable[[dict[str, Any]], None]) -> None:
  """Edits config.json in place through `fn(dict)` (which mutates it)."""
  d = read_config(path)
  fn(d)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(d, f, indent=2)


# ------------------------------------------------------------------ running
@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids,
              attention_mask=None) -> np.ndarray:
  """float32 logits [b, t, vocab] of a transformers causal LM, no cache."""
  ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
  kw = {}
  if attention_mask is not None:
    kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask),
                                           dtype=torch.long)
  out = model(input_ids=ids, use_cache=False, **kw)
  return out.logits.float().numpy()


def load_hf_causal_lm(path: str | os.PathLike) -> torch.nn.Module:
  """`AutoModelForCausalLM.from_pretrained` in float32, eval mode."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.fspath(path), dtype=torch.float32)
  return model.eval()


def count_unique_params(model: torch.nn.Module) -> int:
  """Number of parameters, each shared (tied) tensor counted once."""
  return sum(p.numel() for p in model.parameters())  # dedups tied tensors


def random_ids(rng: np.random.Generator, batch: int, length: int,
               vocab: int) -> np.ndarray:
  """int32 token ids [batch, length] from a seeded NumPy generator."""
  return rng.integers(0, vocab, size=(batch, length), dtype=np.int32)
