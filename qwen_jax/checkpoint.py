"""Hugging Face safetensors checkpoints <-> (QwenConfig, params).

Layouts read (the state-dict names of transformers' Qwen3.5 classes):
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
from qwen_jax import stack
from qwen_jax.config import IMPLEMENTATION_FIELDS
from qwen_jax.config import LINEAR
from qwen_jax.config import QwenConfig
from qwen_jax.config import is_int
from qwen_jax.hf_config import hf_text_config
from qwen_jax.hf_config import read_hf_config
from qwen_jax.hf_config import read_json_object

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TEXT_PREFIX = "model."
VLM_PREFIX = "model.language_model."
# Keys that belong to parts of the published checkpoints we do not model.
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
_FLOAT_ST_DTYPES = ("F32", "BF16", "F16", "F64")
# dtypes of loaded and saved weights (those QwenConfig.param_dtype takes).
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# config.json fields that fix tensor shapes (named when left to defaults).
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "linear_num_key_heads",
                 "linear_num_value_heads", "linear_key_head_dim",
                 "linear_value_head_dim", "linear_conv_kernel_dim",
                 "attention_bias", "tie_word_embeddings")
# Weight files this module writes (and may remove as stale).
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

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
    slot, idx = stack.layer_location(cfg, i)
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
  """A memory-mapped safetensors file; tensors are read on demand.

  The header is checked when the file is opened: its length against the
  file size, and each tensor's data_offsets against its shape, dtype and
  the bytes present (a truncated download fails here, naming the tensor).
  """

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if size < 8 or n > size - 8:
        raise ValueError(
            f"{path}: not a safetensors file, or truncated: the header "
            f"length says {n} bytes, the file has {max(size - 8, 0)} after "
            f"the 8-byte length")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from e
    if not isinstance(header, dict):
      raise ValueError(f"{path}: not a safetensors file (the header is a "
                       f"JSON {type(header).__name__}, not an object)")
    self.metadata = header.pop("__metadata__", None)
    self.header = header
    self._offset = 8 + n
    data_bytes = size - self._offset
    for key, info in header.items():
      self._check_entry(key, info, data_bytes)
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

  def _check_entry(self, key: str, info: Any, data_bytes: int) -> None:
    """Raises ValueError naming the file and tensor of a bad header entry."""
    where = f"{self.path}: tensor {key}"
    if not isinstance(info, dict):
      raise ValueError(f"{where}: expected a header object, found {info!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(info.get("dtype"), str):
      raise ValueError(f"{where}: expected a dtype name, found "
                       f"{info.get('dtype')!r}")
    if (not isinstance(shape, list) or
        not all(is_int(d) and d >= 0 for d in shape)):
      raise ValueError(f"{where}: expected a shape of non-negative integers, "
                       f"found {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or
        not all(is_int(o) for o in offsets) or
        not 0 <= offsets[0] <= offsets[1]):
      raise ValueError(f"{where}: expected data_offsets [begin, end] with "
                       f"0 <= begin <= end, found {offsets!r}")
    start, end = offsets
    dt = _ST_DTYPES.get(info["dtype"])
    if dt is not None:  # an unknown dtype is refused when read
      nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
      if end - start != nbytes:
        raise ValueError(
            f"{where}: data_offsets {offsets} span {end - start} bytes, "
            f"expected {nbytes} for shape {shape} of {info['dtype']}")
    if end > data_bytes:
      raise ValueError(
          f"{where}: data ends at byte {end} of the data, but the file "
          f"holds only {data_bytes} bytes of data (truncated file?)")

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def dtype_name(self, key: str) -> str:
    """The stored dtype's safetensors name ("F32", "BF16", "I32", ...)."""
    return self.header[key]["dtype"]

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


def _read_index(index: str) -> dict[str, str]:
  """The weight_map of a model.safetensors.index.json, checked."""
  wmap = read_json_object(index).get("weight_map")
  if not isinstance(wmap, dict):
    raise ValueError(f"{index}: expected a 'weight_map' object")
  for key, fname in wmap.items():
    if not isinstance(fname, str):
      raise ValueError(f"{index}: weight_map[{key!r}]: expected a file name, "
                       f"found {fname!r}")
  return wmap


def _open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
  """key -> the file that holds it, for a single or sharded checkpoint.

  When both model.safetensors and model.safetensors.index.json exist, the
  single file wins, as in transformers' `from_pretrained` (which checks for
  model.safetensors first), so both libraries load the same weights.
  """
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(single):
    if os.path.exists(index):
      log.warning("%s holds both %s and %s: loading %s, as transformers "
                  "does; the index and its shards are ignored.", path,
                  SINGLE_FILE, INDEX_FILE, SINGLE_FILE)
    st = SafetensorsFile(single)
    return {k: st for k in st.keys()}
  if os.path.exists(index):
    wmap = _read_index(index)
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
def _dtype_name(arg: str, value: Any, allowed: tuple[str, ...]) -> str:
  """The jnp dtype name of `value`, or ValueError naming the argument."""
  try:
    name = jnp.dtype(value).name
  except TypeError:
    name = None
  if name not in allowed:
    raise ValueError(f"{arg}: expected one of {allowed}, found {value!r}")
  return name


def load_hf_checkpoint(path: str | os.PathLike, dtype: Any = "float32",
                       param_dtype: Any = None,
                       **config_overrides: Any) -> tuple[QwenConfig, dict]:
  """Loads a transformers Qwen3.5 checkpoint folder.

  Args:
    path: folder with config.json and model.safetensors (or shards and
      model.safetensors.index.json; model.safetensors wins when both exist,
      as in transformers).
    dtype: compute dtype of the returned config.
    param_dtype: dtype of the returned parameters; defaults to `dtype`.
    **config_overrides: QwenConfig implementation fields only
      (`config.IMPLEMENTATION_FIELDS`: scan_layers, remat_policy,
      gdr_implementation, gdr_interpret, gdr_chunk_size, gdr_block_sizes,
      attention_implementation; dtype and param_dtype are the arguments
      above). They change how the model computes, not what: the fields that
      change the math (sizes, rope_theta, rms_norm_eps, the layer pattern,
      ...) come from config.json, and overriding one raises ValueError
      (change them on the returned config with `cfg.replace` if you mean
      to run another model with these weights).

  Returns:
    (cfg, params) with params ready for `Qwen35(cfg).apply({"params": ...})`.

  Raises:
    ValueError: no such folder or config, unsupported model_type, a config
      override of a field that changes the math, a bad dtype, a broken
      safetensors or index file, a missing or unexpected weight, a tensor
      that is not floating point, or a tensor whose shape contradicts the
      config.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint: expected a folder, found {path!r}")
  if not os.path.exists(os.path.join(path, CONFIG_NAME)):
    raise ValueError(f"checkpoint {path!r}: expected {CONFIG_NAME}, found "
                     f"{sorted(os.listdir(path))}")
  allowed = tuple(f for f in IMPLEMENTATION_FIELDS
                  if f not in ("dtype", "param_dtype"))  # the arguments
  for field, value in config_overrides.items():
    if field not in allowed:
      raise ValueError(
          f"config_overrides: {field} changes the model (it comes from "
          f"{CONFIG_NAME}); only implementation fields {allowed} may be "
          f"overridden, found {field}={value!r}")
  dtype = _dtype_name("dtype", dtype, _FLOAT_DTYPES)
  param_dtype = dtype if param_dtype is None else _dtype_name(
      "param_dtype", param_dtype, _FLOAT_DTYPES)
  cfg = QwenConfig.from_hf_config(
      path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
  # The fields that fix tensor shapes which config.json leaves to defaults,
  # for the errors below.
  text = hf_text_config(read_hf_config(path))
  defaulted = [f for f in _SHAPE_FIELDS if f not in text]
  source = (f"from {CONFIG_NAME}" if not defaulted else
            f"from {CONFIG_NAME}; {', '.join(defaulted)} not in it, "
            f"QwenConfig defaults used")
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
                     f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
                     f" (expected {source})")

  shapes = param_shapes(cfg)
  host: dict = {}
  for key, (ours, idx, layout) in wanted.items():
    target = _get(shapes, ours)
    per_layer = target.shape if idx is None else target.shape[1:]
    expected = _hf_shape(per_layer, layout)
    found = files[key].shape(key)
    if tuple(found) != tuple(expected):
      raise ValueError(f"weight {key}: expected shape {expected} ({source}), "
                       f"found {tuple(found)}")
    stored = files[key].dtype_name(key)
    if stored not in _FLOAT_ST_DTYPES:
      raise ValueError(f"weight {key}: expected a floating dtype "
                       f"{_FLOAT_ST_DTYPES}, found {stored} (in "
                       f"{files[key].path})")
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
def _leaf_paths(tree: Any, prefix: tuple = ()) -> list[str]:
  """'a/b/c' for each leaf of a tree of mappings."""
  if not hasattr(tree, "items"):
    return ["/".join(map(str, prefix))]
  out = []
  for k, v in tree.items():
    out += _leaf_paths(v, prefix + (k,))
  return out


def _as_plain_params(params: Any, shapes: dict, cfg: QwenConfig) -> dict:
  """params as nested dicts of arrays, or ValueError saying what differs.

  Boxed leaves (flax `nn.Partitioned` / `LogicallyPartitioned`, straight
  from `Module.init`) are unboxed and FrozenDicts unfrozen, as
  `Module.apply` would accept them.
  """
  import flax  # pylint: disable=g-import-not-at-top
  if not hasattr(params, "items"):
    raise ValueError(f"params: expected the parameter dict of Qwen35, found "
                     f"{type(params).__name__}")
  params = flax.core.unfreeze(flax.linen.meta.unbox(params))
  if jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      shapes):
    return params
  what = (f"params: expected the parameter tree of Qwen35("
          f"{cfg.num_hidden_layers} layers, scan_layers={cfg.scan_layers}, "
          f"tie_word_embeddings={cfg.tie_word_embeddings})")
  if list(params) == ["params"]:
    raise ValueError(f"{what}, found a dict with a single 'params' key: "
                     f"pass variables['params']")
  ours, theirs = set(_leaf_paths(shapes)), set(_leaf_paths(params))
  details = []
  if ours - theirs:
    details.append(f"missing {sorted(ours - theirs)[0]!r}")
  if theirs - ours:
    details.append(f"extra {sorted(theirs - ours)[0]!r}")
  n = len(ours ^ theirs)
  raise ValueError(f"{what}, found a different structure: "
                   f"{'; '.join(details) or 'other container types'}"
                   f"{f' ({n} keys differ)' if n > 1 else ''}")


def _remove_stale_weights(path: str, written: set[str]) -> None:
  """Deletes the weight files of an earlier save that `written` replaces.

  Only names this module writes (model.safetensors, model-NNNNN-of-NNNNN
  .safetensors, model.safetensors.index.json) are removed; any other file
  stays. A stale index or shard beside a fresh model.safetensors would
  otherwise make loaders disagree about which weights the folder holds.
  """
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if name in written or not (os.path.isfile(full) or os.path.islink(full)):
      continue
    if name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(name):
      log.info("Removing %s, left by an earlier save.", full)
      os.remove(full)


def save_hf_checkpoint(path: str | os.PathLike, cfg: QwenConfig,
                       params: dict, dtype: Any = None,
                       max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes a folder that transformers' `from_pretrained` loads.

  Weight files of an earlier save in the same folder (model.safetensors,
  model-NNNNN-of-NNNNN.safetensors, model.safetensors.index.json) that this
  save does not rewrite are removed; other files are left alone.

  Args:
    path: output folder (created).
    cfg: the config of `params`.
    params: our parameter tree (the "params" collection); boxed leaves
      straight from `Module.init` and FrozenDicts are accepted.
    dtype: dtype of the saved tensors (float32, bfloat16, float16 or
      float64); default each parameter's own.
    max_shard_bytes: split into shards with an index above this size.

  Raises:
    ValueError: params that do not match cfg (naming the first missing or
      extra key), or a dtype that is not floating point.
  """
  path = os.fspath(path)
  if dtype is not None:
    dtype = _dtype_name("dtype", dtype, _FLOAT_DTYPES)
  shapes = param_shapes(cfg)
  params = _as_plain_params(params, shapes, cfg)
  os.makedirs(path, exist_ok=True)

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
    written = {SINGLE_FILE}
  else:
    written = {INDEX_FILE}
    wmap, total = {}, 0
    for n, shard in enumerate(shards):
      fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(path, fname), shard, meta)
      written.add(fname)
      for key, x in shard.items():
        wmap[key] = fname
        total += x.nbytes
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f,
                indent=2, sort_keys=True)
  _remove_stale_weights(path, written)
  hf = cfg.to_hf_dict()
  if dtype is not None:
    hf["dtype"] = dtype
  with open(os.path.join(path, CONFIG_NAME), "w") as f:
    json.dump(hf, f, indent=2)
