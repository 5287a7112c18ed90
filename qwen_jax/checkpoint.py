"""Hugging Face safetensors checkpoints <-> (QwenConfig, params).

Layouts read (QWEN35_SPEC.md §4.1):
  * text-only `Qwen3_5ForCausalLM`: `model.{embed_tokens,layers.i.*,norm}`
    and, when untied, `lm_head.weight`;
  * multimodal `Qwen3_5ForConditionalGeneration`: the same under
    `model.language_model.*`, plus `model.visual.*` and `mtp.*`, which are
    skipped with a log line.
Single `model.safetensors` or shards listed by `model.safetensors.index.json`.

Files are memory-mapped and converted one tensor at a time (torch is not
needed), so a 9B checkpoint never sits twice in host memory. Torch `Linear`
weights are [out, in]; ours are [in, out]; the depthwise conv is [c, 1, K]
in torch and [K, c] here.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qwen_jax import model as model_lib
from qwen_jax.config import LINEAR, QwenConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TEXT_PREFIX = "model."
VLM_PREFIX = "model.language_model."
# Keys that belong to parts of the released checkpoints we do not model.
_SKIPPED = (re.compile(r"^model\.visual\."), re.compile(r"^mtp\."),
            re.compile(r"^model\.mtp\."))

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

# (HF suffix inside a layer, our path inside the layer, layout).
_COMMON = [
    ("input_layernorm.weight", ("input_layernorm", "weight"), "vector"),
    ("post_attention_layernorm.weight", ("post_attention_layernorm",
                                         "weight"), "vector"),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "linear"),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "linear"),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "linear"),
]
_LINEAR_ATTN = [
    ("linear_attn.in_proj_qkv.weight", ("linear_attn", "in_proj_qkv",
                                        "kernel"), "linear"),
    ("linear_attn.in_proj_z.weight", ("linear_attn", "in_proj_z", "kernel"),
     "linear"),
    ("linear_attn.in_proj_b.weight", ("linear_attn", "in_proj_b", "kernel"),
     "linear"),
    ("linear_attn.in_proj_a.weight", ("linear_attn", "in_proj_a", "kernel"),
     "linear"),
    ("linear_attn.conv1d.weight", ("linear_attn", "conv1d", "kernel"),
     "conv"),
    ("linear_attn.A_log", ("linear_attn", "A_log"), "vector"),
    ("linear_attn.dt_bias", ("linear_attn", "dt_bias"), "vector"),
    ("linear_attn.norm.weight", ("linear_attn", "norm", "weight"), "vector"),
    ("linear_attn.out_proj.weight", ("linear_attn", "out_proj", "kernel"),
     "linear"),
]


def _full_attn(bias: bool):
  out = []
  for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
    out.append((f"self_attn.{p}.weight", ("self_attn", p, "kernel"),
                "linear"))
    if bias:
      out.append((f"self_attn.{p}.bias", ("self_attn", p, "bias"),
                  "vector"))
  out += [("self_attn.q_norm.weight", ("self_attn", "q_norm", "weight"),
           "vector"),
          ("self_attn.k_norm.weight", ("self_attn", "k_norm", "weight"),
           "vector")]
  return out


def weight_map(cfg: QwenConfig) -> list[tuple[str, tuple, int | None, str]]:
  """Every HF tensor of a text model and where it lives in our params.

  Returns:
    (HF key without the `model.` prefix, or `lm_head.weight`; our path in
    params; index on the leading stacked axis or None; layout: "linear"
    (transpose), "conv" ([c, 1, K] -> [K, c]), "vector" or "embed").
  """
  rows = [("embed_tokens.weight", ("embed_tokens", "embedding"), None,
           "embed"),
          ("norm.weight", ("norm", "weight"), None, "vector")]
  for i, layer_type in enumerate(cfg.layer_types):
    slot, idx = model_lib.layer_location(cfg, i)
    entries = _COMMON + (_LINEAR_ATTN if layer_type == LINEAR
                         else _full_attn(cfg.attention_bias))
    for suffix, sub, layout in entries:
      rows.append((f"layers.{i}.{suffix}", ("layers", slot) + sub, idx,
                   layout))
  if not cfg.tie_word_embeddings:
    rows.append(("lm_head.weight", ("lm_head", "kernel"), None, "linear"))
  return rows


def _to_ours(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return x.T
  if layout == "conv":
    return x[:, 0, :].T
  return x


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return x.T
  if layout == "conv":
    return x.T[:, None, :]
  return x


def _hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "linear":
    return tuple(reversed(shape))
  if layout == "conv":
    return (shape[1], 1, shape[0])
  return tuple(shape)


# ----------------------------------------------------------- safetensors I/O
class SafetensorsFile:
  """A memory-mapped safetensors file; tensors are read on demand."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from e
    self.metadata = header.pop("__metadata__", None)
    self.header = header
    self._offset = 8 + n
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    info = self.header[key]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{self.path}: tensor {key} has unsupported dtype "
                       f"{info['dtype']}")
    start, end = info["data_offsets"]
    raw = self._mmap[self._offset + start:self._offset + end]
    return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file (tensors stored C-contiguous, in order)."""
  header, offset, arrays = {}, 0, []
  for key, x in tensors.items():
    x = np.ascontiguousarray(x)
    if x.dtype not in _ST_NAMES:
      raise ValueError(f"{key}: dtype {x.dtype} cannot be saved")
    header[key] = {"dtype": _ST_NAMES[x.dtype], "shape": list(x.shape),
                   "data_offsets": [offset, offset + x.nbytes]}
    offset += x.nbytes
    arrays.append(x)
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * ((-len(blob)) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for x in arrays:
      f.write(x.tobytes())


def _open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
  """key -> the file that holds it, for a single or sharded checkpoint."""
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(index):
    with open(index) as f:
      wmap = json.load(f).get("weight_map")
    if not isinstance(wmap, dict):
      raise ValueError(f"{index}: expected a 'weight_map' object")
    files = {}
    out = {}
    for key, fname in wmap.items():
      if fname not in files:
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
          raise ValueError(f"{index}: lists shard {fname!r}, which is missing")
        files[fname] = SafetensorsFile(fpath)
      if key not in files[fname].header:
        raise ValueError(f"{index}: maps {key!r} to {fname!r}, which does "
                         f"not contain it")
      out[key] = files[fname]
    return out
  if os.path.exists(single):
    st = SafetensorsFile(single)
    return {k: st for k in st.keys()}
  names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(names) == 1:
    st = SafetensorsFile(os.path.join(path, names[0]))
    return {k: st for k in st.keys()}
  raise ValueError(
      f"checkpoint {path!r}: expected {SINGLE_FILE} or {INDEX_FILE}, found "
      f"{sorted(os.listdir(path))}")


def _layout_prefix(keys) -> str:
  if any(k.startswith(VLM_PREFIX) for k in keys):
    return VLM_PREFIX
  return TEXT_PREFIX


def _set(tree: dict, path: tuple, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def param_shapes(cfg: QwenConfig) -> dict:
  """Our parameter tree as ShapeDtypeStructs (no memory allocated)."""
  import flax  # pylint: disable=g-import-not-at-top
  model = model_lib.Qwen35(cfg)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), i), ids)
  return flax.linen.meta.unbox(shapes)["params"]


# ------------------------------------------------------------------- loading
def load_hf_checkpoint(path: str | os.PathLike, dtype: Any = "float32",
                       param_dtype: Any = None,
                       **config_overrides: Any) -> tuple[QwenConfig, dict]:
  """Loads a transformers Qwen3.5 checkpoint folder.

  Args:
    path: folder with config.json and model.safetensors (or shards and
      model.safetensors.index.json).
    dtype: compute dtype of the returned config.
    param_dtype: dtype of the returned parameters; defaults to `dtype`.
    **config_overrides: QwenConfig implementation fields (e.g. scan_layers,
      gdr_implementation); fields that change the math come from the file.

  Returns:
    (cfg, params) with params ready for `Qwen35(cfg).apply({"params": ...})`.

  Raises:
    ValueError: no such folder or config, unsupported model_type, a missing
      or unexpected weight, or a tensor whose shape contradicts the config.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint: expected a folder, found {path!r}")
  if not os.path.exists(os.path.join(path, CONFIG_NAME)):
    raise ValueError(f"checkpoint {path!r}: expected {CONFIG_NAME}, found "
                     f"{sorted(os.listdir(path))}")
  param_dtype = dtype if param_dtype is None else param_dtype
  cfg = QwenConfig.from_hf_config(
      path, dtype=jnp.dtype(dtype).name,
      param_dtype=jnp.dtype(param_dtype).name, **config_overrides)
  files = _open_checkpoint(path)
  prefix = _layout_prefix(files)
  pdt = np.dtype(jnp.dtype(param_dtype))

  skipped = [k for k in files if any(p.match(k) for p in _SKIPPED)]
  if skipped:
    groups = sorted({k.split(".")[0] if k.startswith("mtp")
                     else ".".join(k.split(".")[:2]) for k in skipped})
    log.info("Skipping %d tensors not used by the text model (%s).",
             len(skipped), ", ".join(f"{g}.*" for g in groups))
  wanted = {}
  for hf_key, ours, idx, layout in weight_map(cfg):
    full = hf_key if hf_key == "lm_head.weight" else prefix + hf_key
    wanted[full] = (ours, idx, layout)
  remaining = set(files) - set(skipped) - set(wanted)
  if cfg.tie_word_embeddings and "lm_head.weight" in remaining:
    log.info("tie_word_embeddings is set: ignoring lm_head.weight.")
    remaining.discard("lm_head.weight")
  if remaining:
    raise ValueError(
        f"checkpoint {path!r}: unexpected weights (not in a "
        f"{cfg.num_hidden_layers}-layer {list(cfg.layer_types)} model): "
        f"{sorted(remaining)[:10]}{' ...' if len(remaining) > 10 else ''}")
  missing = sorted(k for k in wanted if k not in files)
  if missing:
    raise ValueError(f"checkpoint {path!r}: missing weights "
                     f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")

  shapes = param_shapes(cfg)
  host: dict = {}
  for key, (ours, idx, layout) in wanted.items():
    target = _get(shapes, ours)
    per_layer = target.shape if idx is None else target.shape[1:]
    expected = _hf_shape(per_layer, layout)
    found = files[key].shape(key)
    if tuple(found) != tuple(expected):
      raise ValueError(f"weight {key}: expected shape {expected} (from "
                       f"config.json), found {tuple(found)}")
    x = _to_ours(files[key].get(key), layout).astype(pdt)
    if idx is None:
      _set(host, ours, jnp.asarray(x))
      continue
    try:
      buf = _get(host, ours)
    except KeyError:
      buf = np.empty(target.shape, pdt)
      _set(host, ours, buf)
    buf[idx] = x
  # Stacked leaves were filled on the host; move them now, one at a time.
  params = jax.tree_util.tree_map(jnp.asarray, host)
  return cfg, params


# ------------------------------------------------------------------- saving
def save_hf_checkpoint(path: str | os.PathLike, cfg: QwenConfig,
                       params: dict, dtype: Any = None,
                       max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes a folder that transformers' `from_pretrained` loads.

  Args:
    path: output folder (created).
    cfg: the config of `params`.
    params: our parameter tree (the "params" collection).
    dtype: dtype of the saved tensors; default each parameter's own.
    max_shard_bytes: split into shards with an index above this size.

  Raises:
    ValueError: params that do not match cfg.
  """
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  shapes = param_shapes(cfg)
  ours_struct = jax.tree_util.tree_structure(shapes)
  if jax.tree_util.tree_structure(params) != ours_struct:
    raise ValueError("params: expected the parameter tree of "
                     f"Qwen35({cfg.num_hidden_layers} layers, scan_layers="
                     f"{cfg.scan_layers}), found a different structure")

  def tensors() -> Iterator[tuple[str, np.ndarray]]:
    for hf_key, ours, idx, layout in weight_map(cfg):
      x = _get(params, ours)
      if tuple(x.shape) != tuple(_get(shapes, ours).shape):
        raise ValueError(f"params{list(ours)}: expected shape "
                         f"{_get(shapes, ours).shape}, found {x.shape}")
      x = x if idx is None else x[idx]
      x = np.asarray(x)
      if dtype is not None:
        x = x.astype(np.dtype(jnp.dtype(dtype)))
      key = hf_key if hf_key == "lm_head.weight" else TEXT_PREFIX + hf_key
      yield key, _to_hf(x, layout)

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key, x in tensors():
    if size and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = x
    size += x.nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    write_safetensors(os.path.join(path, SINGLE_FILE), shards[0], meta)
  else:
    wmap, total = {}, 0
    for n, shard in enumerate(shards):
      fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(path, fname), shard, meta)
      for key, x in shard.items():
        wmap[key] = fname
        total += x.nbytes
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f,
                indent=2, sort_keys=True)
  hf = cfg.to_hf_dict()
  if dtype is not None:
    hf["dtype"] = jnp.dtype(dtype).name
  with open(os.path.join(path, CONFIG_NAME), "w") as f:
    json.dump(hf, f, indent=2)
