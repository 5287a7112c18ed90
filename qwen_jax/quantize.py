"""The decode layout of the parameters, and weight-only int8 quantization.

`quantize(cfg, params, mode)` returns the parameters in the layout the
decode program reads fastest on a CPU, with the matrices stored in `mode`:

  "float32", "bfloat16"  the matrices in that dtype (exact for float32)
  "int8"                 per-output-channel symmetric int8 with a float32
                         scale per channel: w[o, i] ~ q[o, i] * scale[o],
                         q in [-127, 127], scale = max_i |w[o, i]| / 127

The decode layout differs from `Qwen35(cfg).init`'s tree in four ways:

  * the stack is unscanned: one slot `layer_{i}` per layer, whatever
    `cfg.scan_layers` says (no per-layer slice is cut out of a stacked
    array while decoding: XLA's CPU backend copies such slices);
  * every Dense kernel [in, out] is stored transposed, output-major, as
    `kernel_t` [out, in] (with `scale` [out] when int8). One decoded token
    is a vector-matrix product per kernel, and XLA's CPU backend fuses
    `x @ kernel_t.T` (with the int8 -> float32 conversion, when there is
    one) into a single loop that streams each row of the matrix once, so
    int8 weights are read from memory as int8;
  * a mixture of experts' stacked matrices gate_up_proj [E, d, 2I] and
    down_proj [E, I, d] are stored output-major as `gate_up_proj_t`
    [E, 2I, d] and `down_proj_t` [E, d, I], int8 with a scale per expert
    and output channel (`gate_up_proj_scale` [E, 2I], `down_proj_scale`
    [E, d]) or in the float dtype; a decoded token reads its k experts'
    matrices alone (`qwen_jax.moe.experts_stored`);
  * an int8 embedding is stored as `embedding_q` [vocab, d] and
    `embedding_scale` [vocab] (one scale per vocabulary row: per output
    channel of the tied LM head, and the row's own scale for the lookup).
    A float embedding stays `embedding` (the same array when its dtype is
    kept).

Norms, the conv kernel, A_log and dt_bias keep their dtype. Nothing reads
such a tree by accident: `Qwen35(cfg).apply` stops at the first kernel it
cannot find; `qwen_jax.decode_loop.apply_model` (used by `generate`,
`prefill` and `decode_step`) runs it. A decode-layout tree always goes with
the unscanned config, `cfg.replace(scan_layers=False)`; `generate`,
`prefill` and `decode_step` switch to it themselves (a cache for `prefill`
or `decode_step` comes from `init_cache(cfg.replace(scan_layers=False),
...)`).

Example:
  cfg, params = qwen_jax.load_hf_checkpoint(path)
  qparams = qwen_jax.quantize(cfg, params, "int8")
  del params  # the int8 tree is all generation needs
  new = qwen_jax.generate(cfg, qparams, prompt_ids, max_new_tokens=32)

`qwen_jax.quantize` is the function (the package's public API), which hides
this module's name on the package; import the other names with
`from qwen_jax.quantize import MODES, matmul, ...`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import moe
from qwen_jax import stack
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.config import QwenConfig
from qwen_jax.model import Qwen35

MODES = ("float32", "bfloat16", "int8")
_INT_MODES = ("int8",)
_QMAX = {"int8": 127}

# A Dense kernel in the decode layout: kernel_t [out, in] (+ scale [out]).
KERNEL_T = "kernel_t"
SCALE = "scale"
EMBED_Q = "embedding_q"
EMBED_SCALE = "embedding_scale"
# Modules with a "kernel" that is not a Dense matrix (kept as they are).
_NOT_DENSE = ("conv1d",)
# A mixture of experts' stacked matrices and their decode-layout names.
_EXPERTS = {"gate_up_proj": (moe.GATE_UP_T, moe.GATE_UP_SCALE),
            "down_proj": (moe.DOWN_T, moe.DOWN_SCALE)}

# Rows (tokens x batch) up to which a product with an int8 or bfloat16
# matrix runs as one fused vector-matrix loop per row (each pass reads the
# stored bytes; a row's second pass over a layer's matrix mostly hits the
# cache: 4 rows of an int8 [1024, 2048] matrix in 0.29 ms, against 0.71
# converted once and multiplied by the library matmul, measured on the
# 2-core CPU of docs/measurements/2026-12-06-cpu-*); above it the matrix is
# converted and multiplied by the library matmul. Float32 matrices use the
# loop for one row only.
ROW_LOOP_MAX = 8


def _first_gate_proj(params: Any) -> Any:
  """Layer 0's SwiGLU gate projection: the dense MLP's, or a mixture of
  experts' shared expert's (the stacked experts are not Dense kernels and
  keep their layout); None when there is none."""
  try:
    mlp = params["layers"]["layer_0"]["mlp"]
    return mlp["gate_proj"] if "gate_proj" in mlp else (
        mlp["shared_expert"]["gate_proj"])
  except (KeyError, TypeError, IndexError):
    return None


def is_decode_layout(params: Any) -> bool:
  """Whether `params` is a decode-layout tree (see the module docstring)."""
  mlp = _first_gate_proj(params)
  return isinstance(mlp, Mapping) and KERNEL_T in mlp


def weight_mode(params: Any) -> str | None:
  """The mode of a decode-layout tree ("int8", or the float dtype name of
  its matrices); None for any other tree."""
  if not is_decode_layout(params):
    return None
  k = _first_gate_proj(params)[KERNEL_T]
  return "int8" if jnp.dtype(k.dtype) == jnp.int8 else jnp.dtype(k.dtype).name


# ------------------------------------------------------------------ the math
def matmul(x: Array, w_t: Array, scale: Array | None, dtype: Any) -> Array:
  """x [..., in] times a decode-layout matrix w_t [out, in]: [..., out].

  Computes as `Dense` does in `dtype` (x and a float matrix rounded to
  `dtype`; products summed in float32; the result cast to `dtype`). An
  int8 matrix is multiplied as float32 integers and the sum scaled per
  output channel, which equals the product with q * scale up to rounding.

  One row (batch-1 decoding) is a vector-matrix product that XLA's CPU
  backend fuses with the conversion of w_t into one loop reading w_t once
  (up to ROW_LOOP_MAX rows for a converted matrix: one loop per row; see
  `_row_products`).
  """
  dtype = jnp.dtype(dtype)
  lead, d = x.shape[:-1], x.shape[-1]
  rows = int(np.prod(lead)) if lead else 1
  out = w_t.shape[0]
  x2 = x.astype(dtype).astype(jnp.float32).reshape(rows, d)
  # A stored dtype other than float32 is converted inside the loops; the
  # library matmul would read a converted copy of the whole matrix.
  loops = ROW_LOOP_MAX if w_t.dtype != jnp.float32 else 1
  if rows <= loops:
    y = _row_products(x2, w_t, dtype)
  else:
    y = x2 @ _as_float(w_t, dtype).T
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y.astype(dtype).reshape(lead + (out,))


def _as_float(w_t: Array, dtype: Any) -> Array:
  """The float32 values of a stored matrix (a float one rounded to the
  compute dtype first, as Dense rounds its kernel)."""
  if jnp.issubdtype(w_t.dtype, jnp.floating):
    return w_t.astype(dtype).astype(jnp.float32)
  return w_t.astype(jnp.float32)


def _row_products(x2: Array, w_t: Array, dtype: Any) -> Array:
  """[rows, out]: one vector-matrix product per row of x2.

  On XLA's CPU backend the products run inside a conditional whose
  predicate always holds (NaN included) but is not known to the compiler.
  Two rewrites that slow them down stop at its boundary:
    * the ops that compute x2 would be fused into each product's loop and
      redone for every row of w_t, and the loop would no longer vectorise
      (20x slower for an int8 [1024, 2048] matrix fed by the gated norm);
    * inside a `while_loop` (generate's decode loop) the conversion of w_t
      is loop-invariant and would be hoisted out of the loop: a float32
      copy of every matrix, read at 4 bytes an entry every step.
  `optimization_barrier` is removed before fusion there, so it cannot do
  this. Other backends compute the products directly.
  """

  def products(x2, w_t):
    wf = _as_float(w_t, dtype)
    return jnp.stack([v @ wf.T for v in x2])

  if jax.default_backend() != "cpu":
    return products(x2, w_t)
  x0 = x2[0, 0]
  always = jnp.isfinite(x0) | jnp.isnan(x0) | jnp.isinf(x0)
  zeros = lambda x2, w_t: jnp.zeros((x2.shape[0], w_t.shape[0]), jnp.float32)
  return jax.lax.cond(always, products, zeros, x2, w_t)


def embed_lookup(table_q: Array, scale: Array, ids: Array,
                 dtype: Any) -> Array:
  """Rows of an int8 embedding, dequantized: q[ids] * scale[ids]."""
  rows = jnp.take(table_q, ids, axis=0).astype(jnp.float32)
  return (rows * jnp.take(scale, ids, axis=0)[..., None]).astype(dtype)


# ------------------------------------------------------------- conversion
def _quantize_rows(w_t: Array, mode: str) -> tuple[Array, Array]:
  """(q, scale) of a float matrix [out, in], one scale per row."""
  qmax = _QMAX[mode]
  w = w_t.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=-1)
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  q = jnp.clip(jnp.round(w / scale[..., None]), -qmax, qmax)
  return q.astype(jnp.dtype(mode)), scale


def _is_dense(node: Any) -> bool:
  return (isinstance(node, Mapping) and "kernel" in node
          and getattr(node["kernel"], "ndim", 0) >= 2)


def _convert_experts(w: Array, mode: str | None, names: tuple[str, str]
                     ) -> dict[str, Array]:
  """A mixture of experts' stacked matrices [E, in, out] as the decode
  layout stores them (`qwen_jax.moe.experts_stored`): output-major
  [E, out, in], int8 with a scale [E, out] per expert and output channel,
  or a float dtype."""
  w_t = jnp.swapaxes(w, -1, -2)
  if mode in _INT_MODES:
    return dict(zip(names, _quantize_rows(w_t, mode)))
  return {names[0]: w_t if mode is None else w_t.astype(jnp.dtype(mode))}


def _convert_tree(node: Any, mode: str | None) -> Any:
  """Converts every Dense kernel and stacked experts under `node`."""
  if _is_dense(node):
    k = node["kernel"]
    k_t = jnp.swapaxes(k, -1, -2)
    new = {key: v for key, v in node.items() if key != "kernel"}
    if mode in _INT_MODES:
      new[KERNEL_T], new[SCALE] = _quantize_rows(k_t, mode)
    else:
      new[KERNEL_T] = k_t if mode is None else k_t.astype(jnp.dtype(mode))
    return new
  if isinstance(node, Mapping):
    out = {}
    for key, v in node.items():
      if key in _EXPERTS and getattr(v, "ndim", 0) == 3:
        out.update(_convert_experts(v, mode, _EXPERTS[key]))
      else:
        out[key] = v if key in _NOT_DENSE else _convert_tree(v, mode)
    return out
  return node


def _finite_flags(tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map(lambda a: jnp.all(jnp.isfinite(a)), tree)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _convert_layers(cfg: QwenConfig, layers: PyTree, mode: str | None):
  """Unstacks and converts params['layers']; also the finite flags."""
  out = {}
  for i in range(cfg.num_hidden_layers):
    slot, idx = stack.layer_location(cfg, i)
    layer = layers[slot]
    if idx is not None:
      layer = jax.tree_util.tree_map(lambda a, idx=idx: a[idx], layer)
    out[f"layer_{i}"] = _convert_tree(layer, mode)
  return out, _finite_flags(layers)


@functools.partial(jax.jit, static_argnums=1)
def _convert_embedding(table: Array, mode: str):
  q, scale = _quantize_rows(table, mode)
  return q, scale, jnp.all(jnp.isfinite(table))


@functools.partial(jax.jit, static_argnums=1)
def _convert_head(node: PyTree, mode: str | None):
  return _convert_tree(node, mode), _finite_flags(node)


@functools.lru_cache(maxsize=16)
def _expected_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
  """{path: shape} of Qwen35(cfg)'s parameters (nothing allocated); callers
  read the dict, never change it."""
  model = Qwen35(cfg)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  shapes = nn.meta.unbox(shapes)["params"]
  return {jax.tree_util.keystr(p): tuple(s.shape) for p, s in
          jax.tree_util.tree_flatten_with_path(shapes)[0]}


def check_params(cfg: QwenConfig, params: Any) -> None:
  """Raises ValueError unless `params` is the float parameter tree of
  `Qwen35(cfg)` (every entry, every shape, float dtypes), naming the first
  entry that differs."""
  if not isinstance(cfg, QwenConfig):
    raise ValueError(f"cfg: expected a QwenConfig, found "
                     f"{type(cfg).__name__}")
  if not isinstance(params, Mapping):
    raise ValueError(f"params: expected the parameter tree of Qwen35(cfg) "
                     f"(a dict), found {type(params).__name__}")
  if is_decode_layout(params):
    raise ValueError(f"params: expected float parameters, found a tree "
                     f"already in the decode layout ({weight_mode(params)} "
                     f"weights); quantize the parameters it came from")
  expected = _expected_shapes(cfg)
  found = {jax.tree_util.keystr(p): leaf for p, leaf in
           jax.tree_util.tree_flatten_with_path(params)[0]}
  where = (f"for this config ({cfg.num_hidden_layers} layers, "
           f"{'scanned' if stack.is_scanned(cfg) else 'unscanned'})")
  missing = [k for k in expected if k not in found]
  extra = [k for k in found if k not in expected]
  if missing or extra:
    raise ValueError(f"params: expected the entries of Qwen35(cfg).init "
                     f"{where}, found {len(missing)} missing (first "
                     f"{missing[:2]}) and {len(extra)} unexpected (first "
                     f"{extra[:2]})")
  for key, shape in expected.items():
    leaf = found[key]
    if tuple(np.shape(leaf)) != shape:
      raise ValueError(f"params{key}: expected shape {shape} {where}, found "
                       f"{tuple(np.shape(leaf))}")
    dt = getattr(leaf, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
      raise ValueError(f"params{key}: expected a float array, found dtype "
                       f"{dt}")


def _raise_nonfinite(flags: PyTree, prefix: str) -> None:
  for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]:
    if not bool(ok):
      raise ValueError(f"params{prefix}{jax.tree_util.keystr(path)}: "
                       f"expected finite weights, found NaN or Inf")


def to_decode_layout(cfg: QwenConfig, params: PyTree,
                     mode: str | None = None) -> PyTree:
  """The decode-layout tree of float `params` (checked first).

  Args:
    cfg: the model config.
    params: the parameter tree of `Qwen35(cfg)` (scanned or not, as cfg
      says; boxed or plain).
    mode: one of MODES, or None to keep each matrix's dtype.

  Returns:
    The decode-layout tree (see the module docstring).

  Raises:
    ValueError: an unknown mode, a tree that is not the float parameters
      of Qwen35(cfg) (named entry, expected and found), or non-finite
      weights (named entry).
  """
  if mode is not None and mode not in MODES:
    raise ValueError(f"mode: expected one of {list(MODES)}, found {mode!r}")
  params = nn.meta.unbox(params)
  check_params(cfg, params)
  out = {}
  for key, node in params.items():
    if key == "layers":
      out[key], flags = _convert_layers(cfg, node, mode)
      _raise_nonfinite(flags, "['layers']")
    elif key == "embed_tokens":
      table = node["embedding"]
      if mode in _INT_MODES:
        q, scale, ok = _convert_embedding(table, mode)
        if not bool(ok):
          _raise_nonfinite({"embedding": ok}, "['embed_tokens']")
        out[key] = {EMBED_Q: q, EMBED_SCALE: scale}
      else:
        if mode is not None and table.dtype != jnp.dtype(mode):
          table = jnp.asarray(table).astype(jnp.dtype(mode))
        out[key] = {"embedding": table}
    elif key == "lm_head":
      out[key], flags = _convert_head(node, mode)
      _raise_nonfinite(flags, "['lm_head']")
    else:
      out[key] = node  # the final norm: kept as it is
  return out


def quantize(cfg: QwenConfig, params: PyTree, mode: str = "int8") -> PyTree:
  """Weight-only quantization into the decode layout.

  Args:
    cfg: the model config (`load_hf_checkpoint`'s, scanned or not).
    params: its float parameters (as loaded or initialised).
    mode: "int8" (per-output-channel symmetric int8, float32 scales), or
      "bfloat16" / "float32" (the matrices stored in that dtype).

  Returns:
    A new tree in the decode layout (see the module docstring) for
    `qwen_jax.generate(cfg, tree, ...)` (and `prefill` / `decode_step`);
    `params` is left as it is.

  Raises:
    ValueError: `mode` not one of MODES, `cfg` not a QwenConfig, `params`
      not the float parameters of Qwen35(cfg) (already quantized, an entry
      missing or of another shape or dtype: named), or weights holding NaN
      or Inf (named).
  """
  if not isinstance(mode, str) or mode not in MODES:
    raise ValueError(f"mode: expected one of {list(MODES)}, found {mode!r}")
  return to_decode_layout(cfg, params, mode)


def weight_bytes(params: PyTree) -> int:
  """Bytes of every array in a parameter tree."""
  return int(sum(int(np.prod(np.shape(a))) * jnp.dtype(a.dtype).itemsize
                 for a in jax.tree_util.tree_leaves(params)))
