"""Hugging Face safetensors checkpoints <-> (QwenConfig, params).

Layouts read (the state-dict names of transformers' Qwen3.5 classes):
  * text-only `Qwen3_5ForCausalLM`: `model.{embed_tokens,layers.i.*,norm}`
    and, when untied, `lm_head.weight`;
  * multimodal `Qwen3_5ForConditionalGeneration`: the same under
    `model.language_model.*`, the vision tower under `model.visual.*`
    (loaded into params["visual"] when config.json has a vision_config;
    `load_hf_checkpoint(path, vision=None)` loads the language model
    alone), and `mtp.*`, which the loader skips with a log line and a save
    into the folder carries over.
Single `model.safetensors` or shards listed by `model.safetensors.index.json`.
A config with a tower is saved in the multimodal layout, with a "qwen3_5"
config.json.

Files are memory-mapped and converted one tensor at a time (torch is not
needed), so a 9B checkpoint never sits twice in host memory; a weight with
NaN or Inf is refused by name. Torch `Linear` weights are [out, in]; ours
are [in, out]; the depthwise conv is [c, 1, K] in torch and [K, c] here;
the tower's patch Conv3d is [D, C, T, P, P] in torch and [C, T, P, P, D]
here.

Saving writes every file into a hidden folder inside the destination and
moves each into place with `os.replace`; what the destination held that the
model does not own (tensors, config entries, other files) is kept (see
`save_hf_checkpoint`). `tokenizer_from=FOLDER` also copies that folder's
tokenizer, chat templates and generation_config.json, so that a fine-tune
of a downloaded checkpoint is saved ready to chat.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qwen_jax import model as model_lib
from qwen_jax import stack
from qwen_jax import tokenizer as tokenizer_lib
from qwen_jax import vision as vision_lib
from qwen_jax.config import IMPLEMENTATION_FIELDS
from qwen_jax.config import LINEAR
from qwen_jax.config import MOE
from qwen_jax.config import QwenConfig
from qwen_jax.config import is_int
from qwen_jax.hf_config import MULTIMODAL_MODEL_TYPES
from qwen_jax.hf_config import hf_text_config
from qwen_jax.hf_config import read_hf_config
from qwen_jax.hf_config import read_json_object

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TEXT_PREFIX = "model."
VLM_PREFIX = "model.language_model."
VISION_PREFIX = vision_lib.VISION_PREFIX  # "model.visual."
# Keys that belong to parts of the published checkpoints we do not model
# (the tower's too, when the config has none).
_SKIPPED = (re.compile(r"^mtp\."), re.compile(r"^model\.mtp\."))
_VISION_KEY = re.compile(r"^model\.visual\.")

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

# (HF suffix inside a layer, our path inside the layer, layout).
_NORMS = [
    ("input_layernorm.weight", ("input_layernorm", "weight"), "vector"),
    ("post_attention_layernorm.weight", ("post_attention_layernorm",
                                         "weight"), "vector"),
]
_DENSE_MLP = [
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "linear"),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "linear"),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "linear"),
]
# transformers' Qwen3_5MoeSparseMoeBlock; the fused experts are [E, out, in]
# there and [E, in, out] here (layout "experts": the last two axes swap).
_MOE_MLP = [
    ("mlp.gate.weight", ("mlp", "router", "kernel"), "linear"),
    ("mlp.experts.gate_up_proj", ("mlp", "gate_up_proj"), "experts"),
    ("mlp.experts.down_proj", ("mlp", "down_proj"), "experts"),
] + [(f"mlp.shared_expert.{p}.weight", ("mlp", "shared_expert", p, "kernel"),
      "linear") for p in ("gate_proj", "up_proj", "down_proj")] + [
    ("mlp.shared_expert_gate.weight", ("mlp", "shared_expert_gate",
                                       "kernel"), "linear"),
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
    entries = _NORMS + (_MOE_MLP if cfg.mlp_types[i] == MOE
                        else _DENSE_MLP)
    entries += (_LINEAR_ATTN if layer_type == LINEAR
                else _full_attn(cfg.attention_bias))
    for suffix, sub, layout in entries:
      rows.append((f"layers.{i}.{suffix}", ("layers", slot) + sub, idx,
                   layout))
  if not cfg.tie_word_embeddings:
    rows.append(("lm_head.weight", ("lm_head", "kernel"), None, "linear"))
  return rows


def checkpoint_map(cfg: QwenConfig, prefix: str
                   ) -> list[tuple[str, tuple, int | None, str]]:
  """`weight_map` with full checkpoint keys, the tower's included.

  Args:
    cfg: the model config.
    prefix: the text model's prefix ("model." or "model.language_model.").

  Returns:
    (key in the checkpoint, our path in params, index on the leading
    stacked axis or None, layout); the tower's rows (when cfg.vision is
    set) are `model.visual.*` -> ("visual", ...), layout "conv3d" for the
    patch embedding.
  """
  rows = [(k if k == "lm_head.weight" else prefix + k, ours, idx, layout)
          for k, ours, idx, layout in weight_map(cfg)]
  if cfg.vision is not None:
    rows += [(VISION_PREFIX + k, ("visual",) + ours, None, layout)
             for k, ours, layout in vision_lib.vision_weight_map(cfg.vision)]
  return rows


def _to_ours(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return x.T
  if layout == "experts":
    return x.transpose(0, 2, 1)
  if layout == "conv":
    return x[:, 0, :].T
  if layout == "conv3d":
    return vision_lib.vision_to_ours(x, layout)
  return x


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return x.T
  if layout == "experts":
    return x.transpose(0, 2, 1)
  if layout == "conv":
    return x.T[:, None, :]
  if layout == "conv3d":
    return vision_lib.vision_to_hf(x, layout)
  return x


def _hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "linear":
    return tuple(reversed(shape))
  if layout == "experts":
    return (shape[0], shape[2], shape[1])
  if layout == "conv":
    return (shape[1], 1, shape[0])
  if layout == "conv3d":
    return vision_lib.vision_hf_shape(shape, layout)
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
    return self.raw(key).view(_ST_DTYPES[info["dtype"]]).reshape(
        info["shape"])

  def raw(self, key: str) -> np.ndarray:
    """The stored bytes of a tensor (uint8, memory-mapped), any dtype."""
    start, end = self.header[key]["data_offsets"]
    return self._mmap[self._offset + start:self._offset + end]


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor of a file to write: its header fields and how to read it.

  `read()` returns an array whose bytes are the tensor's (C order); it is
  called once, when the tensor is written, so a file never holds more than
  one tensor in host memory at a time.
  """
  key: str
  dtype: str  # safetensors name ("F32", "BF16", ... or any other, copied)
  shape: tuple[int, ...]
  nbytes: int
  read: Callable[[], np.ndarray]


def _array_entry(key: str, x: Any) -> _Entry:
  x = np.asarray(x)
  if x.dtype not in _ST_NAMES:
    raise ValueError(f"{key}: dtype {x.dtype} cannot be saved")
  return _Entry(key, _ST_NAMES[x.dtype], tuple(x.shape), x.nbytes,
                lambda: x)


def _write_tensor(f, entry: _Entry) -> None:
  """Appends one tensor's bytes to the open file `f`."""
  data = np.ascontiguousarray(entry.read()).reshape(-1).view(np.uint8)
  if data.size != entry.nbytes:
    raise ValueError(f"{entry.key}: expected {entry.nbytes} bytes, the "
                     f"tensor has {data.size}")
  f.write(data)


def _write_file(path: str, entries: list[_Entry],
                metadata: dict[str, str] | None) -> None:
  """Writes a safetensors file tensor by tensor, then syncs it to disk."""
  header, offset = {}, 0
  for e in entries:
    header[e.key] = {"dtype": e.dtype, "shape": list(e.shape),
                     "data_offsets": [offset, offset + e.nbytes]}
    offset += e.nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * ((-len(blob)) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for e in entries:
      _write_tensor(f, e)
    f.flush()
    os.fsync(f.fileno())


def _write_json(path: str, obj: Any, **kw: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, **kw)
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
  """Makes the renames in `path` durable (where the OS allows it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file (tensors stored C-contiguous, in order).

  The file is written under a hidden temporary name beside `path` and moved
  into place with `os.replace`, so `path` is never left half written.
  """
  path = os.fspath(path)
  entries = [_array_entry(k, x) for k, x in tensors.items()]
  folder, name = os.path.split(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
  os.close(fd)
  try:
    _write_file(tmp, entries, metadata)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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


def _index_files(path: str, index: str
                 ) -> tuple[dict[str, SafetensorsFile],
                            dict[str, SafetensorsFile]]:
  """(key -> shard, shard name -> shard) of an index, each shard checked."""
  wmap = _read_index(index)
  files, out = {}, {}
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
  return out, files


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
    return _index_files(path, index)[0]
  names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(names) == 1:
    st = SafetensorsFile(os.path.join(path, names[0]))
    return {k: st for k in st.keys()}
  raise ValueError(
      f"checkpoint {path!r}: expected {SINGLE_FILE} or {INDEX_FILE}, found "
      f"{sorted(os.listdir(path))}")


# One expert's projection, as checkpoints that store the experts one by one
# hold them (transformers' conversion mapping for qwen3_5_moe fuses
# `mlp.experts.{j}.{gate,up,down}_proj.weight` on load).
_PER_EXPERT = re.compile(
    r"^(?P<layer>.*\.mlp\.experts)\.(?P<j>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


class _FusedExperts:
  """The fused `experts.gate_up_proj` / `experts.down_proj` of a layer
  whose checkpoint stores one tensor per expert, read like a
  SafetensorsFile (only the layer's experts are in memory while read).

  gate_up_proj is [E, 2I, d]: expert j's gate_proj rows, then its up_proj
  rows; down_proj is [E, d, I].
  """

  def __init__(self, key: str, parts: list[list[tuple[str, Any]]]):
    self.key = key
    self.parts = parts  # per expert: [(key, file)] of its pieces, in order
    first = [f.shape(k) for k, f in parts[0]]
    for j, pieces in enumerate(parts):
      for (k, f), want in zip(pieces, first):
        if tuple(f.shape(k)) != tuple(want):
          raise ValueError(f"weight {k}: expected shape {tuple(want)} (as "
                           f"expert 0's), found {tuple(f.shape(k))}")
    rows = sum(s[0] for s in first)
    self.header = {key: None}
    self._shape = (len(parts), rows) + tuple(first[0][1:])
    self.path = parts[0][0][1].path

  def shape(self, key: str) -> tuple[int, ...]:
    del key
    return self._shape

  def dtype_name(self, key: str) -> str:
    del key
    names = {f.dtype_name(k) for pieces in self.parts for k, f in pieces}
    return names.pop() if len(names) == 1 else f"mixed {sorted(names)}"

  def get(self, key: str) -> np.ndarray:
    del key
    return np.stack([np.concatenate([f.get(k) for k, f in pieces])
                     for pieces in self.parts])


def _fuse_per_expert(files: dict[str, Any]) -> dict[str, Any]:
  """`files` with per-expert tensors replaced by fused virtual ones.

  Raises:
    ValueError: a layer whose experts are not numbered 0 .. E-1, or whose
      expert lacks a projection (named).
  """
  layers: dict[str, dict[int, dict[str, str]]] = {}
  for key in files:
    m = _PER_EXPERT.match(key)
    if m:
      layers.setdefault(m["layer"], {}).setdefault(int(m["j"]), {})[
          m["proj"]] = key
  if not layers:
    return files
  out = {k: f for k, f in files.items() if not _PER_EXPERT.match(k)}
  for layer, experts in layers.items():
    n = len(experts)
    if sorted(experts) != list(range(n)):
      raise ValueError(
          f"weight {layer}.*: expected experts numbered 0 .. {n - 1}, found "
          f"{sorted(experts)}")
    for fused, projs in (("gate_up_proj", ("gate_proj", "up_proj")),
                         ("down_proj", ("down_proj",))):
      parts = []
      for j in range(n):
        missing = [p for p in projs if p not in experts[j]]
        if missing:
          raise ValueError(f"weight {layer}.{j}.{missing[0]}.weight: "
                           f"expected with the other experts' "
                           f"{missing[0]}, found none")
        parts.append([(experts[j][p], files[experts[j][p]]) for p in projs])
      key = f"{layer}.{fused}"
      out[key] = _FusedExperts(key, parts)
  return out


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
_FINITE_BLOCK = 1 << 24  # elements checked at a time (bounds the temporary)


def _check_finite(key: str, x: np.ndarray, src: np.ndarray, where: str,
                  param_dtype: str) -> None:
  """ValueError naming `key` when the converted weight `x` has NaN or Inf.

  Checked on the array just converted (in blocks, so the temporary stays
  small); the stored tensor `src` is read again only to word the error.
  """
  flat = x.ravel(order="K")  # a view: x is contiguous in some order
  bad = 0
  for i in range(0, flat.size, _FINITE_BLOCK):
    block = flat[i:i + _FINITE_BLOCK]
    bad += block.size - int(np.count_nonzero(np.isfinite(block)))
  if not bad:
    return
  nan = int(np.count_nonzero(np.isnan(src)))
  inf = int(np.count_nonzero(np.isinf(src)))
  if nan + inf:
    raise ValueError(
        f"weight {key}: expected finite values, found {nan + inf} non-finite "
        f"of {src.size} ({nan} NaN, {inf} Inf) (in {where})")
  raise ValueError(
      f"weight {key}: expected values finite in {param_dtype}, found {bad} "
      f"of {src.size} that overflow it (largest |value| "
      f"{float(np.max(np.abs(src.astype(np.float64))))}) (in {where})")


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
      above), and `vision=None`, which loads a multimodal checkpoint's
      language model alone (its `model.visual.*` tensors are skipped, as
      for a config without a vision_config). They change how the model
      computes, not what: the fields that change the math (sizes,
      rope_theta, rms_norm_eps, the layer pattern, ...) come from
      config.json, and overriding one raises ValueError (change them on
      the returned config with `cfg.replace` if you mean to run another
      model with these weights).

  Returns:
    (cfg, params) with params ready for `Qwen35(cfg).apply({"params": ...})`;
    a multimodal checkpoint's tower (with a vision_config in config.json)
    sits in params["visual"] and cfg.vision describes it.

  Raises:
    ValueError: no such folder or config, unsupported model_type, a config
      override of a field that changes the math, a bad dtype, a broken
      safetensors or index file, a missing or unexpected weight, a tensor
      that is not floating point, a tensor whose shape contradicts the
      config, or a tensor holding NaN or Inf (or values that overflow
      `param_dtype`), named with the count of such entries.
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
    if field == "vision" and value is None:
      continue  # the language model alone: drops the tower, not the math
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
  files = _fuse_per_expert(_open_checkpoint(path))
  prefix = _layout_prefix(files)
  pdt = np.dtype(jnp.dtype(param_dtype))

  skipped = [k for k in files if any(p.match(k) for p in _SKIPPED) or (
      cfg.vision is None and _VISION_KEY.match(k))]
  if skipped:
    groups = sorted({k.split(".")[0] if k.startswith("mtp")
                     else ".".join(k.split(".")[:2]) for k in skipped})
    log.info("Skipping %d tensors not used by the model (%s).",
             len(skipped), ", ".join(f"{g}.*" for g in groups))
  wanted = {full: (ours, idx, layout)
            for full, ours, idx, layout in checkpoint_map(cfg, prefix)}
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
    src = files[key].get(key)
    with np.errstate(over="ignore"):  # overflow is reported just below
      x = _to_ours(src, layout).astype(pdt)
    _check_finite(key, x, src, files[key].path, param_dtype)
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


# The text model's own fields that fix tensor shapes: a checkpoint's other
# parts (vision tower, multi-token-prediction head) are made for them.
_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "layer_types", "num_attention_heads",
                "num_key_value_heads", "head_dim", "linear_num_key_heads",
                "linear_num_value_heads", "linear_key_head_dim",
                "linear_value_head_dim", "linear_conv_kernel_dim",
                "attention_bias", "mlp_types", "num_experts",
                "moe_intermediate_size", "shared_expert_intermediate_size")
# config.json names that say what `to_hf_dict` says under another name
# (older transformers releases); updated where present, so none disagrees.
_DTYPE_ALIASES = ("torch_dtype",)
_ROPE_ALIASES = ("rope_theta", "partial_rotary_factor")
# Prefix of the hidden folder a save writes into before moving files.
STAGING_PREFIX = ".qwen_jax-save-"


def _text_namespace(prefix: str) -> re.Pattern:
  """Keys of the text model itself under `prefix` (and the LM head)."""
  return re.compile(rf"^(?:{re.escape(prefix)}(?:embed_tokens|norm|layers)\."
                    rf"|lm_head\.)")


def _group(key: str) -> str:
  """'mtp.*', 'model.visual.*', ...: how foreign tensors are named."""
  parts = key.split(".")
  return ".".join(parts[:1 if parts[0] != "model" else 2]) + ".*"


def _groups(keys) -> str:
  return ", ".join(sorted({_group(k) for k in keys}))


# --------------------------------------- what the destination holds already
@dataclasses.dataclass
class _Destination:
  """The checkpoint already in a folder a save writes into.

  Attributes:
    config: its config.json, or None.
    tensors: key -> the file holding it (the single file wins over shards
      for a key both hold, as loaders read it).
    removable: its weight files (model.safetensors, the index and the
      shards the index lists): superseded once every tensor in them is
      rewritten or carried into the new files.
  """
  config: dict[str, Any] | None = None
  tensors: dict[str, SafetensorsFile] = dataclasses.field(
      default_factory=dict)
  removable: list[str] = dataclasses.field(default_factory=list)


def _plain_name(name: str) -> bool:
  """A file name right inside the folder (no path, no '..')."""
  return (name == os.path.basename(name) and name not in ("", ".", "..")
          and os.sep not in name and "/" not in name)


def _read_destination(path: str) -> _Destination:
  """What `path` holds; ValueError when its checkpoint cannot be read."""
  dest = _Destination()
  if not os.path.isdir(path):
    return dest
  if os.path.exists(os.path.join(path, CONFIG_NAME)):
    dest.config = read_hf_config(os.path.join(path, CONFIG_NAME))
    hf_text_config(dest.config)  # an unsupported model_type raises here
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(index):
    by_key, shards = _index_files(path, index)
    dest.tensors.update(by_key)
    dest.removable += [INDEX_FILE] + [f for f in shards if _plain_name(f)]
  if os.path.exists(single):
    st = SafetensorsFile(single)
    dest.tensors.update({k: st for k in st.keys()})
    dest.removable.append(SINGLE_FILE)
  if not dest.removable:
    # A lone weight file of another name (loaders read it): carried, kept.
    names = [f for f in os.listdir(path) if f.endswith(".safetensors")
             and os.path.isfile(os.path.join(path, f))]
    if len(names) == 1:
      st = SafetensorsFile(os.path.join(path, names[0]))
      dest.tensors = {k: st for k in st.keys()}
  return dest


def _differences(dest: _Destination, theirs: QwenConfig | None,
                 cfg: QwenConfig, prefix: str, their_prefix: str,
                 ours: dict[str, tuple[int, ...]]) -> list[str]:
  """How the model in `dest` (config `theirs`) differs from `cfg`'s: the
  text model's fields and tensors (theirs under `their_prefix`, compared
  with ours under `prefix`), and the shapes of any tensor both own."""
  out = []
  if theirs is not None:
    for f in _ARCH_FIELDS:
      a, b = getattr(theirs, f), getattr(cfg, f)
      if a != b:
        out.append(f"{f} {list(a) if f == 'layer_types' else a!r} there, "
                   f"{list(b) if f == 'layer_types' else b!r} here")
  text = _text_namespace(their_prefix)
  for key, st in dest.tensors.items():
    mine = _as_ours(key, prefix, their_prefix)
    if mine in ours and tuple(st.shape(key)) != ours[mine]:
      out.append(f"{key} of shape {tuple(st.shape(key))} there, "
                 f"{ours[mine]} here")
    elif (mine not in ours and key != "lm_head.weight"
          and text.match(key)):
      out.append(f"{key} there is not in this model")
  return out


def _as_ours(key: str, prefix: str, their_prefix: str) -> str:
  """A text-model key of the destination under our prefix (the same key
  when the layouts agree, or for anything else)."""
  if (prefix != their_prefix and key.startswith(their_prefix) and
      _text_namespace(their_prefix).match(key)):
    return prefix + key[len(their_prefix):]
  return key


# Top-level entries of a "qwen3_5" config.json that a save writes (with a
# tower, also its vision_config and placeholder ids).
_WRAPPER_OWN = ("text_config", "architectures", "model_type", "dtype",
                "torch_dtype", "tie_word_embeddings", "transformers_version")
_WRAPPER_VISION = ("vision_config", "image_token_id", "video_token_id",
                   "vision_start_token_id", "vision_end_token_id")


def _carried(path: str, dest: _Destination, theirs: QwenConfig | None,
             cfg: QwenConfig, prefix: str, their_prefix: str,
             ours: dict[str, tuple[int, ...]]) -> list[_Entry]:
  """The tensors of `dest` the model does not own, as entries to copy.

  The destination's text model (under `their_prefix`) and, when `cfg` has
  a tower, its `model.visual.*` are the model's own: replaced, never
  carried.

  Raises:
    ValueError: one line naming what would be lost, when the folder holds
      parts of another model (they would no longer fit this one).
  """
  text = _text_namespace(their_prefix)
  foreign = [k for k in dest.tensors
             if _as_ours(k, prefix, their_prefix) not in ours
             and k != "lm_head.weight" and not text.match(k)]
  if cfg.vision is not None:
    foreign = [k for k in foreign if not _VISION_KEY.match(k)]
  wrapper = (dest.config is not None and
             dest.config.get("model_type") in MULTIMODAL_MODEL_TYPES)
  differs = _differences(dest, theirs, cfg, prefix, their_prefix, ours)
  if differs:
    own = _WRAPPER_OWN + (_WRAPPER_VISION if cfg.vision is not None else ())
    extra = sorted(k for k in dest.config if k not in own) if wrapper else []
    if foreign or extra:
      what = []
      if foreign:
        what.append(f"{len(foreign)} tensors ({_groups(foreign)})")
      if extra:
        what.append(f"the config entries {', '.join(extra)}")
      raise ValueError(
          f"save_hf_checkpoint: {path!r} holds a checkpoint of another "
          f"model ({differs[0]}); its {' and '.join(what)} were made for "
          f"that model and would not fit this one, so saving here would "
          f"lose them; nothing was written: save to another folder")
    return []  # the model there is replaced as a whole
  out = []
  for key in foreign:
    st = dest.tensors[key]
    info = st.header[key]
    start, end = info["data_offsets"]
    out.append(_Entry(key, info["dtype"], tuple(info["shape"]), end - start,
                      functools.partial(st.raw, key)))
  return out


def _merged_config(old: dict[str, Any] | None, cfg: QwenConfig,
                   dtype: str) -> dict[str, Any]:
  """config.json: `cfg.to_hf_dict()` written into the folder's own config.

  Entries we do not own (a multimodal wrapper's vision_config and token
  ids when the model has no tower, any other field) are kept; the model's
  fields are updated where they live (top level, or text_config and
  vision_config of a "qwen3_5" wrapper). A model with a tower saved over a
  text-only config gets a wrapper, the old file's other entries moving
  into its text_config. `dtype`: the saved weights' dtype.
  """
  ours = dict(cfg.to_hf_dict(), dtype=dtype)
  if cfg.vision is not None:
    ours["text_config"] = dict(ours["text_config"], dtype=dtype)
  if old is None:
    return ours
  if (cfg.vision is not None and
      old.get("model_type") not in MULTIMODAL_MODEL_TYPES):
    new = ours
    text = new["text_config"]
    for k, v in old.items():
      if k == "transformers_version":
        new[k] = v
      elif k not in text and k not in ("architectures", "model_type"):
        text[k] = v
    _update_aliases(text, cfg, dtype)
    return new
  new = dict(old)
  if old.get("model_type") in MULTIMODAL_MODEL_TYPES:
    ours_text = (ours["text_config"] if cfg.vision is not None else ours)
    text = dict(old["text_config"])
    had_dtype = "dtype" in text
    ours_text = dict(ours_text, rope_parameters=_merged_rope(
        text.get("rope_parameters"), ours_text["rope_parameters"], cfg))
    text.update({k: v for k, v in ours_text.items()
                 if k not in ("architectures", "dtype")})
    if had_dtype:
      text["dtype"] = dtype
    _update_aliases(text, cfg, dtype)
    new["text_config"] = text
    if cfg.vision is not None:
      old_vision = old.get("vision_config")
      vision = dict(old_vision) if isinstance(old_vision, dict) else {}
      had_dtype = "dtype" in vision
      vision.update(ours["vision_config"])
      if had_dtype:
        vision["dtype"] = dtype
      new["vision_config"] = vision
      for k in _WRAPPER_VISION[1:]:
        new[k] = ours[k]
      new.setdefault("architectures", ours["architectures"])
    # Either flag ties in transformers' wrapper: both say what cfg says.
    new["tie_word_embeddings"] = cfg.tie_word_embeddings
    new["dtype"] = dtype
  else:
    new.update(ours)
    new["rope_parameters"] = _merged_rope(old.get("rope_parameters"),
                                          ours["rope_parameters"], cfg)
  _update_aliases(new, cfg, dtype,
                  rope=old.get("model_type") not in
                  MULTIMODAL_MODEL_TYPES)
  return new


def _merged_rope(old: Any, ours: dict[str, Any],
                 cfg: QwenConfig) -> dict[str, Any]:
  """rope_parameters: ours over the old entries (mrope_interleaved, ...),
  mrope_section written where the old one had it."""
  if not isinstance(old, dict):
    return ours
  new = dict(old, **ours)
  if "mrope_section" in old:
    new["mrope_section"] = list(cfg.mrope_section)
  return new


def _update_aliases(d: dict[str, Any], cfg: QwenConfig, dtype: str,
                    rope: bool = True) -> None:
  """Older names of fields we write (torch_dtype, rope_theta, ...)."""
  for alias in _DTYPE_ALIASES:
    if alias in d:
      d[alias] = dtype
  for name in _ROPE_ALIASES if rope else ():
    if name in d:
      d[name] = getattr(cfg, name)


# ------------------------------------------------------------ the save itself
def save_hf_checkpoint(path: str | os.PathLike, cfg: QwenConfig,
                       params: dict, dtype: Any = None,
                       max_shard_bytes: int = 5 * 2**30, *,
                       check_only: bool = False,
                       tokenizer_from: str | os.PathLike | None = None
                       ) -> None:
  """Writes a folder that transformers' `from_pretrained` loads.

  Nothing a folder holds is lost:

  * Every file is written into a hidden folder inside `path`
    (`.qwen_jax-save-*`, on the same filesystem) and moved into place with
    `os.replace` once all are complete, so a save that fails or is killed
    while writing leaves the checkpoint that was there as it was (a killed
    one leaves its hidden folder behind, which may be deleted).
  * When `path` holds a checkpoint already, the tensors outside the text
    model's weight map (`mtp.*`, `model.visual.*`, anything else) are
    carried into the new files, copied one at a time with their stored
    dtype, and its layout is kept: a multimodal `model.language_model.*`
    checkpoint stays one, its config.json keeps every entry (vision_config,
    token ids, ...) and only the text model's fields are updated. Loading a
    checkpoint in bfloat16 and saving it into its own folder converts its
    text weights and leaves the rest as they were.
  * Files other than the weights and config.json (tokenizer, generation
    config, README, anything unknown) are never touched, except for the
    files copied from `tokenizer_from`, which are written only where the
    folder holds no file of that name or an identical one (a different
    one refuses the save, before anything is written). The old weight
    files (model.safetensors, model.safetensors.index.json and the shards
    the index lists) are removed only after the new files are in place,
    and only when every tensor in them has been rewritten (the text
    model's own, which the save replaces) or carried into those files.
  * When the folder's checkpoint cannot be read (so its tensors could not
    be carried), holds parts of another model beside a text model of other
    shapes (a vision tower made for another hidden size would no longer
    fit), or has a file in the way of a new weight file that is not part of
    its checkpoint, the save refuses with a ValueError naming what would be
    lost, before writing anything. A text-only checkpoint of another shape
    is replaced as a whole, as saving over a file would.

  The moves themselves are one `os.replace` per file: the new index (or
  model.safetensors) is moved after the shards it lists, and the old
  single file removed before config.json is moved. Shards whose names the
  old checkpoint used as well are replaced one by one, so a kill in the
  middle of those few renames leaves whole files of both saves (the new
  index still in the hidden folder).

  Args:
    path: output folder (created).
    cfg: the config of `params`.
    params: our parameter tree (the "params" collection); boxed leaves
      straight from `Module.init` and FrozenDicts are accepted.
    dtype: dtype of the saved text-model tensors (float32, bfloat16,
      float16 or float64); default each parameter's own. Carried tensors
      keep theirs.
    max_shard_bytes: split into shards with an index above this size.
    check_only: run every check above and return before writing anything
      (`params` may then be `param_shapes(cfg)`: no tensor is read).
    tokenizer_from: a checkpoint folder (e.g. the one the weights were
      loaded from) whose tokenizer files are copied along, staged and moved
      like the weights: tokenizer.json, tokenizer_config.json,
      special_tokens_map.json, chat_template.jinja, chat_template.json,
      vocab.json, merges.txt, added_tokens.json, generation_config.json
      and additional_chat_templates/*.jinja, those it has. It must hold a
      tokenizer.json that `qwen_jax.tokenizer.load_tokenizer` reads, with
      ids inside cfg.vocab_size. None (or `path` itself) copies nothing.

  Raises:
    ValueError: params that do not match cfg (naming the first missing or
      extra key), a dtype that is not floating point, a `path` that is a
      file, a folder whose contents the save would lose (see above), or a
      `tokenizer_from` without a readable tokenizer that fits the model.
  """
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"path: expected a folder, found the file {path!r}")
  if dtype is not None:
    dtype = _dtype_name("dtype", dtype, _FLOAT_DTYPES)
  if not is_int(max_shard_bytes) or max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes: expected a positive integer, found "
                     f"{max_shard_bytes!r}")
  shapes = param_shapes(cfg)
  params = _as_plain_params(params, shapes, cfg)
  try:
    dest = _read_destination(path)
    theirs = (None if dest.config is None else
              QwenConfig.from_hf_config(dest.config))
  except ValueError as e:
    raise ValueError(
        f"save_hf_checkpoint: cannot read the checkpoint in {path!r} ({e}), "
        f"so what it holds beyond this model could not be kept; nothing was "
        f"written: save to another folder or move it away") from e
  their_prefix = None
  if dest.tensors:
    their_prefix = _layout_prefix(dest.tensors)
  elif (dest.config is not None and
        dest.config.get("model_type") in MULTIMODAL_MODEL_TYPES):
    their_prefix = VLM_PREFIX
  # A model with a tower is always saved in the multimodal layout.
  prefix = VLM_PREFIX if cfg.vision is not None else (
      their_prefix or TEXT_PREFIX)
  ours = _own_entries(cfg, params, shapes, dtype, prefix)
  carried = _carried(path, dest, theirs, cfg, prefix,
                     their_prefix or prefix, {e.key: e.shape for e in ours})
  config = _merged_config(dest.config, cfg, dtype or cfg.param_dtype)

  shards: list[list[_Entry]] = [[]]
  size = 0
  for e in ours + carried:
    if size and size + e.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += e.nbytes
  if len(shards) == 1:
    names = [SINGLE_FILE]
  else:
    names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
             for n in range(len(shards))]
  switch = SINGLE_FILE if len(shards) == 1 else INDEX_FILE
  for name in set(names) | {switch}:
    full = os.path.join(path, name)
    if os.path.lexists(full) and name not in dest.removable:
      raise ValueError(
          f"save_hf_checkpoint: {full!r} is in the way of a new weight file "
          f"and is not part of the checkpoint in {path!r} (no index lists "
          f"it), so saving would lose it; nothing was written: move it away")
  copies = ([] if tokenizer_from is None else
            _tokenizer_copies(os.fspath(tokenizer_from), path, cfg))
  if check_only:
    dest.tensors.clear()
    return

  os.makedirs(path, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path)
  try:
    for name in copies:
      _copy_file(os.path.join(os.fspath(tokenizer_from), name),
                 os.path.join(staging, name))
    meta = {"format": "pt"}
    for name, entries in zip(names, shards):
      _write_file(os.path.join(staging, name), entries, meta)
    if len(shards) > 1:
      wmap = {e.key: name for name, entries in zip(names, shards)
              for e in entries}
      total = sum(e.nbytes for entries in shards for e in entries)
      _write_json(os.path.join(staging, INDEX_FILE),
                  {"metadata": {"total_size": total}, "weight_map": wmap},
                  sort_keys=True)
    _write_json(os.path.join(staging, CONFIG_NAME), config)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  # Every tensor is read: let the old files' memory maps go.
  del ours, carried, shards
  dest.tensors.clear()
  _commit(path, staging, names, switch, dest.removable, copies)


def _tokenizer_copies(source: str, path: str, cfg: QwenConfig) -> list[str]:
  """The tokenizer files of `source` to copy into `path` (relative paths).

  Raises:
    ValueError: no readable tokenizer in `source`, ids past cfg.vocab_size,
      or a file of another content in `path` where one would be copied
      (nothing is written).
  """
  if not os.path.isdir(source):
    raise ValueError(f"tokenizer_from: expected a checkpoint folder, found "
                     f"{source!r}")
  if not os.path.isfile(os.path.join(source, tokenizer_lib.TOKENIZER_FILE)):
    raise ValueError(f"tokenizer_from: expected a folder with "
                     f"{tokenizer_lib.TOKENIZER_FILE}, found none in "
                     f"{source!r}")
  try:
    tok = tokenizer_lib.load_tokenizer(source)
    tokenizer_lib.load_generation_config(source)
  except ValueError as e:
    raise ValueError(f"tokenizer_from: {e}") from e
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer_from: expected a tokenizer whose ids fit "
                     f"the model's vocab_size {cfg.vocab_size}, found ids up "
                     f"to {tok.vocab_size - 1} in {source!r}")
  if os.path.isdir(path) and os.path.samefile(source, path):
    return []  # the files are there already
  names = [n for n in tokenizer_lib.TOKENIZER_FILES + (
      tokenizer_lib.GENERATION_CONFIG_FILE,)
           if os.path.isfile(os.path.join(source, n))]
  extra = os.path.join(source, tokenizer_lib.CHAT_TEMPLATE_DIR)
  if os.path.isdir(extra):
    names += [os.path.join(tokenizer_lib.CHAT_TEMPLATE_DIR, n)
              for n in sorted(os.listdir(extra)) if n.endswith(".jinja")
              and os.path.isfile(os.path.join(extra, n))]
  copies = []
  for name in names:
    dst = os.path.join(path, name)
    if not os.path.lexists(dst):
      copies.append(name)
      continue
    if os.path.isfile(dst):
      with open(dst, "rb") as a, open(os.path.join(source, name), "rb") as b:
        if a.read() == b.read():
          continue  # already there
    raise ValueError(
        f"save_hf_checkpoint: {dst!r} differs from {name} in "
        f"tokenizer_from {source!r}, so copying it would lose it; nothing "
        f"was written: move it away or save to another folder")
  subdir = os.path.join(path, tokenizer_lib.CHAT_TEMPLATE_DIR)
  if (any(os.path.dirname(n) for n in copies) and os.path.lexists(subdir)
      and not os.path.isdir(subdir)):
    raise ValueError(
        f"save_hf_checkpoint: {subdir!r} is not a folder, so the chat "
        f"templates of tokenizer_from cannot go there; nothing was written: "
        f"move it away")
  return copies


def _copy_file(src: str, dst: str) -> None:
  """Copies a file's bytes into the staging folder, synced to disk."""
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout)
    fout.flush()
    os.fsync(fout.fileno())


def _own_entries(cfg: QwenConfig, params: dict, shapes: dict,
                 dtype: str | None, prefix: str) -> list[_Entry]:
  """The model's tensors in HF layout, checked, as entries (none read)."""
  out = []
  for key, ours, idx, layout in checkpoint_map(cfg, prefix):
    x = _get(params, ours)
    want = _get(shapes, ours).shape
    if tuple(np.shape(x)) != tuple(want):
      raise ValueError(f"params{list(ours)}: expected shape {want}, found "
                       f"{tuple(np.shape(x))}")
    src = getattr(x, "dtype", None)  # (a dtype is falsy: test for None)
    src = np.dtype(np.asarray(x).dtype if src is None else src)
    dt = src if dtype is None else np.dtype(jnp.dtype(dtype))
    if dt not in _ST_NAMES or dt.kind != "f" and dt != _ST_DTYPES["BF16"]:
      raise ValueError(f"params{list(ours)}: expected a floating dtype, "
                       f"found {src}")
    shape = _hf_shape(want if idx is None else want[1:], layout)

    def read(x=x, idx=idx, layout=layout, dt=dt):
      x = np.asarray(x if idx is None else x[idx])
      return _to_hf(x.astype(dt, copy=False), layout)

    out.append(_Entry(key, _ST_NAMES[dt], shape,
                      int(np.prod(shape, dtype=np.int64)) * dt.itemsize,
                      read))
  return out


def _commit(path: str, staging: str, names: list[str], switch: str,
            removable: list[str], copies: list[str] = ()) -> None:
  """Moves the staged files into `path`, then removes superseded ones."""
  def move(name):
    os.replace(os.path.join(staging, name), os.path.join(path, name))

  for name in copies:  # tokenizer files: none is in the way (checked)
    if os.path.dirname(name):
      os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
    move(name)
  for name in names:
    if name != switch:
      move(name)
  move(switch)  # from here on, loaders read the new weights ...
  written = set(names) | {switch}
  if SINGLE_FILE in removable and SINGLE_FILE not in written:
    # ... or from here, where an old model.safetensors would win.
    log.info("Removing %s: every tensor in it is in the new files.",
             os.path.join(path, SINGLE_FILE))
    os.remove(os.path.join(path, SINGLE_FILE))
  move(CONFIG_NAME)
  for name in removable:
    full = os.path.join(path, name)
    if name in written or name == SINGLE_FILE or not os.path.isfile(full):
      continue
    log.info("Removing %s: every tensor in it is in the new files.", full)
    os.remove(full)
  for sub in sorted({os.path.dirname(n) for n in copies} - {""}):
    os.rmdir(os.path.join(staging, sub))
  os.rmdir(staging)
  _fsync_dir(path)
