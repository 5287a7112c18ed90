"""Low-rank adapters (LoRA, Hu et al. 2021) on the model's projections.

A LoRA adapter on a projection `y = x W` (W [d_in, d_out]) adds
`(x A) B * alpha / rank`, A [d_in, r], B [r, d_out]; only A and B train,
W stays frozen. B starts at zero, so the adapted model starts equal to the
base model; A starts uniform in +-1/sqrt(d_in) (the bound of PEFT's default
initialisation).

Which projections: `LoraSpec.targets`, a regular expression matched
(`re.fullmatch`) against parameter paths such as
`layers/layer_0/self_attn/q_proj/kernel`. The default takes the attention
projections (q, k, v, o), the Gated DeltaNet projections (in_proj_qkv,
in_proj_z, out_proj; not the per-head gate projections in_proj_a/b, whose
outputs have num_heads columns) and the MLP (gate, up, down). Only the
kernels of those projections may be matched: the embedding and LM head
(read by the loss outside the projection), the conv and the norms are not
projections.

How the model code stays unchanged: the adapters live in the parameter tree
beside the kernel they adapt (`.../q_proj/{kernel, lora_a, lora_b}`;
`combine`), so `nn.scan` slices them per layer with the rest of the
parameters, and a Flax method interceptor (`applied()`) around
`layers.Dense.__call__` adds the low-rank path in any Dense whose scope
holds `lora_a`. The interceptor reads nothing but the parameters (the
scale is folded into B by `combine`), so programs traced under it are
valid for any adapter values. The low-rank path is computed on the
activations, never as a [d_in, d_out] weight: the gradient reaches A and B
through rank-r products only, and no weight-sized gradient exists.

The trainable state is the adapter tree alone (its optimizer moments too):
`init_adapters`. For export, `merge` adds `A B * alpha / rank` into the
kernels (then `save_hf_checkpoint`), and `save_adapter` / `load_adapter`
write and read the adapters alone in PEFT's layout (adapter_config.json and
adapter_model.safetensors, keys
`base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight`, or
`base_model.model.model.language_model.layers...` for a model with a
vision tower, A stored
[r, d_in] and B [d_out, r] as torch Linear weights), which transformers'
PEFT integration loads onto the exported base checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import zlib
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import checkpoint as checkpoint_lib
from qwen_jax import layers
from qwen_jax.array_typing import PyTree
from qwen_jax.config import QwenConfig

# Projections of the decoder layers: each a `layers.Dense` whose kernel is
# [d_in, d_out] (with a leading [num_periods] axis when scanned).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv",
               "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
               "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = (r"layers/.*/(self_attn/[qkvo]_proj|"
                   r"linear_attn/(in_proj_qkv|in_proj_z|out_proj)|"
                   r"mlp/(gate|up|down)_proj)/kernel")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's wrapper names a module of the wrapped model base_model.model.NAME.
_PEFT_PREFIX = "base_model.model."
A, B = "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections get adapters, and their shape.

  Attributes:
    rank: r, the adapters' inner width (>= 1).
    alpha: the update is scaled by alpha / rank.
    targets: regular expression over parameter paths ("/"-joined, e.g.
      "layers/layer_3/mlp/up_proj/kernel"), matched whole.

  Raises:
    ValueError: rank < 1, alpha not a positive number, or a targets
      pattern that is not a valid regular expression.
  """
  rank: int = 8
  alpha: float = 16.0
  targets: str = DEFAULT_TARGETS

  def __post_init__(self):
    if (isinstance(self.rank, bool) or not isinstance(self.rank, int)
        or self.rank < 1):
      raise ValueError(f"lora rank: expected an int >= 1, found "
                       f"{self.rank!r}")
    if (isinstance(self.alpha, bool)
        or not isinstance(self.alpha, (int, float))
        or not 0 < self.alpha < math.inf):
      raise ValueError(f"lora alpha: expected a number > 0, found "
                       f"{self.alpha!r}")
    try:
      re.compile(self.targets)
    except (re.error, TypeError) as e:
      raise ValueError(f"lora targets: expected a regular expression, "
                       f"found {self.targets!r} ({e})") from None

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank


# ------------------------------------------------------------------ trees
def _path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _items(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """(path of keys, leaf) of a nested mapping."""
  if isinstance(tree, Mapping):
    for k in sorted(tree):
      yield from _items(tree[k], prefix + (k,))
  else:
    yield prefix, tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def target_paths(params: PyTree, spec: LoraSpec) -> list[tuple]:
  """The kernel paths of `params` (arrays or shapes) that `spec` adapts.

  Raises:
    ValueError: the pattern matches a parameter that is not a projection
      kernel, or nothing.
  """
  pattern = re.compile(spec.targets)
  out = []
  for path, leaf in _items(params):
    name = "/".join(path)
    if not pattern.fullmatch(name):
      continue
    is_proj = (len(path) >= 3 and path[0] == "layers" and path[-1] == "kernel"
               and path[-2] in PROJECTIONS)
    if not is_proj:
      raise ValueError(
          f"lora targets: expected a pattern matching projection kernels "
          f"only (layers/.../{{{','.join(PROJECTIONS)}}}/kernel), found "
          f"{spec.targets!r} matching {name!r}")
    out.append(path)
  if not out:
    raise ValueError(f"lora targets: expected a pattern matching some "
                     f"projection kernels (e.g. "
                     f"'layers/layer_0/self_attn/q_proj/kernel'), found "
                     f"{spec.targets!r}, which matches none")
  return out


def _seed_of(path: tuple) -> int:
  return zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF


def adapter_shapes(params: PyTree, spec: LoraSpec) -> dict:
  """{path...: {"lora_a", "lora_b"}} of ShapeDtypeStructs (float32)."""
  out: dict = {}
  for path in target_paths(params, spec):
    shape = tuple(_get(params, path).shape)
    lead, (d_in, d_out) = shape[:-2], shape[-2:]
    module = path[:-1]
    _set(out, module + (A,), jax.ShapeDtypeStruct(
        lead + (d_in, spec.rank), jnp.float32))
    _set(out, module + (B,), jax.ShapeDtypeStruct(
        lead + (spec.rank, d_out), jnp.float32))
  return out


def init_adapters(params: PyTree, spec: LoraSpec, seed: int = 0) -> dict:
  """Fresh float32 adapters for `params` (arrays or shapes): A uniform in
  +-1/sqrt(d_in), B zero (the adapted model equals the base model).

  Each adapter's draw depends on (seed, its path) only."""
  shapes = adapter_shapes(params, spec)
  out: dict = {}
  for path, s in _items(shapes):
    if path[-1] == A:
      bound = 1.0 / math.sqrt(s.shape[-2])
      key = jax.random.fold_in(jax.random.PRNGKey(seed), _seed_of(path))
      value = jax.random.uniform(key, s.shape, jnp.float32, -bound, bound)
    else:
      value = jnp.zeros(s.shape, jnp.float32)
    _set(out, path, value)
  return out


def combine(base: PyTree, adapters: PyTree, spec: LoraSpec) -> dict:
  """The parameter tree the model applies under `applied()`: `base` with
  each adapted module also holding lora_a and lora_b * alpha / rank."""
  out = jax.tree_util.tree_map(lambda x: x, dict(base))
  out = _plain_dict(out)
  for path, value in _items(adapters):
    if path[-1] == B:
      value = value * spec.scale
    _set(out, path, value)
  return out


def _plain_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _plain_dict(v) for k, v in tree.items()}
  return tree


def merge(base: PyTree, adapters: PyTree, spec: LoraSpec,
          dtype: Any = jnp.float32) -> dict:
  """`base` with W + A B * alpha / rank in every adapted kernel (float32
  sums, cast to `dtype`); the other parameters unchanged."""
  out = _plain_dict(base)
  for path, a in _items(adapters):
    if path[-1] != A:
      continue
    module = path[:-1]
    b = _get(adapters, module + (B,))
    w = _get(base, module + ("kernel",))
    delta = jnp.einsum("...dr,...rf->...df", jnp.asarray(a, jnp.float32),
                       jnp.asarray(b, jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    merged = jnp.asarray(w, jnp.float32) + delta * spec.scale
    _set(out, module + ("kernel",), merged.astype(dtype))
  return out


def count(adapters: PyTree) -> int:
  """Number of adapter parameters."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(
      adapters)))


# ------------------------------------------------------------ interception
def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name != "__call__"
      or not isinstance(module, layers.Dense)
      or not module.has_variable("params", A)):
    return next_fun(*args, **kwargs)
  y = next_fun(*args, **kwargs)
  x = args[0] if args else kwargs["x"]
  a = module.get_variable("params", A)
  b = module.get_variable("params", B)  # scaled by `combine`
  dtype = module.dtype
  h = jnp.einsum("...d,dr->...r", x.astype(dtype), a.astype(dtype))
  delta = jnp.einsum("...r,rf->...f", h, b.astype(dtype))
  return y + delta.astype(y.dtype)


@contextlib.contextmanager
def applied() -> Iterator[None]:
  """While active (around `Qwen35.apply`, also inside jit), every Dense
  whose parameters hold lora_a/lora_b adds its low-rank path."""
  with nn.intercept_methods(_interceptor):
    yield


# ----------------------------------------------------------------- files
def _hf_modules(cfg: QwenConfig, paths: list[tuple]
                ) -> list[tuple[str, tuple, int | None]]:
  """(HF module name, our kernel path, stacked index) of adapted kernels.

  The names are those of the checkpoint `save_hf_checkpoint` writes for
  `cfg`: `model.layers.*` for a text model, `model.language_model.layers.*`
  for one with a vision tower (transformers'
  Qwen3_5ForConditionalGeneration).
  """
  prefix = (checkpoint_lib.VLM_PREFIX if cfg.vision is not None
            else checkpoint_lib.TEXT_PREFIX)
  wanted = set(paths)
  out = []
  for key, path, idx, layout in checkpoint_lib.checkpoint_map(cfg, prefix):
    if layout == "linear" and tuple(path) in wanted:
      out.append((key[:-len(".weight")], tuple(path), idx))
  return out


def save_adapter(path: str, cfg: QwenConfig, adapters: PyTree,
                 spec: LoraSpec, base_model: str | None = None) -> None:
  """Writes the adapters alone (PEFT layout; see the module docstring).

  Files are written whole under hidden names and moved into place.
  """
  os.makedirs(path, exist_ok=True)
  adapters = jax.device_get(adapters)
  paths = [p[:-1] + ("kernel",) for p, _ in _items(adapters) if p[-1] == A]
  tensors = {}
  modules = []
  for name, kpath, idx in _hf_modules(cfg, paths):
    module = kpath[:-1]
    a = np.asarray(_get(adapters, module + (A,)), np.float32)
    b = np.asarray(_get(adapters, module + (B,)), np.float32)
    if idx is not None:
      a, b = a[idx], b[idx]
    tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    modules.append(name)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0,
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      "init_lora_weights": True, "inference_mode": True,
      "base_model_name_or_path": base_model,
      "target_modules": sorted(modules),
      "qwen_jax_targets": spec.targets,
  }
  checkpoint_lib.write_safetensors(os.path.join(path, ADAPTER_WEIGHTS),
                                   tensors, metadata={"format": "pt"})
  tmp = os.path.join(path, f".{ADAPTER_CONFIG}.tmp")
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
  os.replace(tmp, os.path.join(path, ADAPTER_CONFIG))


def load_adapter(path: str, cfg: QwenConfig) -> tuple[LoraSpec, dict]:
  """(spec, float32 adapters) from a folder written by `save_adapter`.

  Raises:
    ValueError: a missing file, or tensors that do not fit `cfg`.
  """
  cpath = os.path.join(path, ADAPTER_CONFIG)
  wpath = os.path.join(path, ADAPTER_WEIGHTS)
  for p in (cpath, wpath):
    if not os.path.isfile(p):
      raise ValueError(f"adapter {path!r}: expected {os.path.basename(p)}, "
                       f"found none")
  with open(cpath) as f:
    config = json.load(f)
  spec = LoraSpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                  targets=config.get("qwen_jax_targets", DEFAULT_TARGETS))
  f = checkpoint_lib.SafetensorsFile(wpath)
  shapes = checkpoint_lib.param_shapes(cfg)
  paths = target_paths(shapes, spec)
  out = {k: np.asarray(v, np.float32) for k, v in
         _items_flat(adapter_shapes(shapes, spec))}
  seen = set()
  for name, kpath, idx in _hf_modules(cfg, paths):
    module = kpath[:-1]
    for ours, theirs in ((A, "lora_A"), (B, "lora_B")):
      key = f"{_PEFT_PREFIX}{name}.{theirs}.weight"
      if key not in f.keys():
        raise ValueError(f"{wpath}: expected the tensor {key!r}, found "
                         f"none")
      value = np.asarray(f.get(key), np.float32).T
      target = out[module + (ours,)]
      want = target.shape if idx is None else target.shape[1:]
      if value.shape != want:
        raise ValueError(f"{wpath}: {key}: expected shape "
                         f"{tuple(reversed(want))}, found "
                         f"{tuple(reversed(value.shape))}")
      if idx is None:
        out[module + (ours,)] = value
      else:
        target[idx] = value
      seen.add(key)
  extra = sorted(set(f.keys()) - seen)
  if extra:
    raise ValueError(f"{wpath}: found tensors this model's adapters "
                     f"({spec.targets!r}) do not have, e.g. {extra[0]!r}")
  tree: dict = {}
  for p, v in out.items():
    _set(tree, p, jnp.asarray(v))
  return spec, tree


def _items_flat(shapes: dict) -> Iterator[tuple[tuple, np.ndarray]]:
  for p, s in _items(shapes):
    yield p, np.zeros(s.shape, np.float32)


__all__ = ["DEFAULT_TARGETS", "LoraSpec", "adapter_shapes", "applied",
           "combine", "count", "init_adapters", "load_adapter", "merge",
           "save_adapter", "target_paths"]
