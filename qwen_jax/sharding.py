"""Device meshes, the logical-axis rules table and sharded jit programs.

One mesh with the named axes ("data", "fsdp", "tensor", "expert", "seq"),
built from a spec such as "data:2,fsdp:2,tensor:1,seq:4" (absent axes have
size 1). Parameters and activations carry logical axis names
(qwen_jax/layers.py, model.py, ...); `RULES` maps them to mesh axes, and
every sharding here is derived from it:

  data, fsdp  the batch (plain data parallelism; fsdp also shards weights)
  tensor      heads, MLP width, vocabulary (Megatron-style)
  seq         the token axis, in contiguous shards (sequence parallelism,
              qwen_jax/sequence_parallel.py); weights are also sharded over
              it (ZeRO-3 style, gathered layer by layer) so that a long
              sequence on many devices does not replicate the model.
  expert      the batch outside the mixture-of-experts layers (as data)
              and the routed experts inside them: each device holds
              num_experts / n experts, gathers the axis' tokens, runs its
              experts on the pairs routed to them, and a reduce-scatter
              returns each device its tokens' sums
              (`qwen_jax.moe.experts_expert_parallel`).

`make_forward`, `make_prefill` and `make_train_step` return `jax.jit`
programs with `NamedSharding`s for a (config, mesh); inside them the
sequence-parallel context is active, so Gated DeltaNet passes its state
between shards and attention is context parallel. They run unchanged over a
multi-host mesh after `jax.distributed.initialize()` (docs/sharding.md).
They take images and videos too (a model with a vision tower): the pixel
values are replicated and the tower runs on every device (its parameters
are replicated by the rules), the grids are static (one compilation per
grid set), and the language model stays sequence parallel.

Example:
  mesh = make_mesh("data:2,seq:4")
  params = shard_params(params, cfg, mesh)
  logits = make_forward(cfg, mesh)(params, put_batch(ids, mesh))
  loss, grads = make_train_step(cfg, mesh)(params, batch)
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_jax import cache as cache_lib
from qwen_jax import head
from qwen_jax import moe
from qwen_jax import sequence_parallel
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.config import QwenConfig
from qwen_jax.data import MEDIA_KEYS
from qwen_jax.data import check_batch
from qwen_jax.data import media_args
from qwen_jax.data import placeholder_loss_mask
from qwen_jax.data import with_static_grids
from qwen_jax.model import Qwen35

AXES = ("data", "fsdp", "tensor", "expert", "seq")

# The one table from logical axis names to mesh axes. Flax applies the first
# rule whose mesh axes are still free in the array, so order matters only
# when two names of one array would claim the same mesh axis.
RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", ("fsdp", "seq")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("linear_qkv", "tensor"),
    ("linear_v", "tensor"),
    ("linear_heads", "tensor"),
    ("conv_width", None),
    ("norm", None),
    ("layers", None),
    ("expert", "expert"),  # mixture of experts: the stacked experts
    ("moe_mlp", None),
    # Activations ("heads" above serves the query activations too).
    ("batch", ("data", "fsdp", "expert")),
    ("seq", "seq"),
    ("embed_act", None),
    ("kv_heads_act", "tensor"),
    ("linear_heads_act", "tensor"),
    ("mlp_act", "tensor"),
    ("vocab_act", "tensor"),
)


# ------------------------------------------------------------------- mesh
def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
  """{"data": 2, ...} from "data:2,seq:4" (every axis present, default 1).

  Raises:
    ValueError: an unknown or repeated axis, a size that is not a positive
      integer, or an entry that is not `axis:size`.
  """
  if isinstance(spec, Mapping):
    items = list(spec.items())
  else:
    items = []
    for part in (p.strip() for p in str(spec).split(",")):
      if not part:
        continue
      name, sep, size = part.partition(":")
      if not sep:
        raise ValueError(f"mesh spec: expected entries 'axis:size' such as "
                         f"'data:2,seq:4', found {part!r} in {spec!r}")
      items.append((name.strip(), size.strip()))
  sizes = {a: 1 for a in AXES}
  seen = set()
  for name, size in items:
    if name not in AXES:
      raise ValueError(f"mesh spec: unknown axis {name!r}; expected axes "
                       f"from {AXES}")
    if name in seen:
      raise ValueError(f"mesh spec: axis {name!r} given twice in {spec!r}")
    seen.add(name)
    try:
      n = int(size)
    except (TypeError, ValueError):
      n = 0
    if n < 1 or str(n) != str(size).strip():
      raise ValueError(f"mesh spec: size of axis {name!r} must be a "
                       f"positive integer, found {size!r}")
    sizes[name] = n
  return sizes


def make_mesh(spec: str | Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes AXES from a spec such as "data:2,fsdp:2,seq:4".

  Args:
    spec: "axis:size,..." over AXES (absent axes are 1), or a mapping.
    devices: the devices to use; default all of `jax.devices()` (every
      host's, after `jax.distributed.initialize()`).

  Returns:
    A `jax.sharding.Mesh` (axis types Auto: the compiler propagates
    shardings between the constraints the model sets).

  Raises:
    ValueError: a bad spec (see `parse_mesh_spec`), a device given twice,
      or axis sizes whose product differs from the number of devices.
  """
  sizes = parse_mesh_spec(spec)
  devices = list(jax.devices() if devices is None else devices)
  if len(set(devices)) != len(devices):
    raise ValueError(f"devices: expected distinct devices, found "
                     f"{len(devices) - len(set(devices))} repeated in "
                     f"{devices}")
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(
        f"mesh spec: axis sizes {spec!r} multiply to {total}, expected the "
        f"device count {len(devices)}")
  shape = tuple(sizes[a] for a in AXES)
  return jax.make_mesh(shape, AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def mesh_spec_string(mesh: Mesh) -> str:
  """"data:2,seq:4" (axes of size 1 left out; "seq:1" for one device)."""
  parts = [f"{a}:{mesh.shape[a]}" for a in AXES if mesh.shape[a] > 1]
  return ",".join(parts) or "seq:1"


# ------------------------------------------------------------- shardings
def fit_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
             mesh: Mesh, rules=RULES) -> P:
  """Mesh PartitionSpec for logical names, dropping axes that do not divide.

  A dimension whose size the mesh axes do not divide loses the innermost
  of them until they do (at worst it is replicated); a jit argument must
  split evenly.
  """
  if logical is None:
    return P()
  axes_per_dim = nn.logical_to_mesh_axes(tuple(logical), rules)
  out = []
  for axes, size in zip(axes_per_dim, shape):
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def abstract_params(cfg: QwenConfig) -> PyTree:
  """Boxed (logically partitioned) parameter shapes, nothing allocated."""
  model = Qwen35(cfg)
  ids = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))[
      "params"]


def logical_param_specs(cfg: QwenConfig) -> PyTree:
  """The logical PartitionSpec of every parameter (from Qwen35 init)."""
  return nn.get_partition_spec(abstract_params(cfg))


def param_shardings(cfg: QwenConfig, mesh: Mesh) -> PyTree:
  """NamedSharding of every parameter (unboxed tree structure)."""
  boxed = abstract_params(cfg)
  logical = nn.get_partition_spec(boxed)
  shapes = nn.unbox(boxed)
  return jax.tree_util.tree_map(
      lambda spec, s: NamedSharding(mesh, fit_spec(tuple(spec), s.shape,
                                                   mesh)),
      logical, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """[b, t, ...] batch arrays: batch over (data, fsdp), tokens over seq.

  The token axis must divide (a ValueError otherwise). A batch that the
  mesh's data * fsdp devices do not divide is replicated over the axes
  that do not divide it (`fit_spec`; docs/sharding.md), which turns off
  data parallelism there: every such replica computes the whole batch.
  That runs and is exact, so it is allowed, with a `UserWarning` naming
  the batch size and the axes.
  """
  names = ("batch", "seq") + (None,) * (len(shape) - 2)
  spec = fit_spec(names, shape, mesh)
  n = mesh.shape["seq"]
  if len(shape) > 1 and n > 1 and shape[1] % n:
    raise ValueError(f"sequence length: expected a multiple of the mesh's "
                     f"seq axis ({n}), found {shape[1]}")
  batch_axes = [a for a in ("data", "fsdp", "expert")
                if mesh.shape.get(a, 1) > 1]
  want = math.prod(mesh.shape[a] for a in batch_axes)
  if shape and want > 1 and shape[0] % want:
    kept = spec[0] if len(spec) else None
    kept = () if kept is None else (kept,) if isinstance(kept, str) else kept
    dropped = [a for a in batch_axes if a not in kept]
    warnings.warn(
        f"batch: expected a multiple of the mesh's "
        f"{'*'.join(batch_axes)}={want} devices, found {shape[0]}; the "
        f"batch is replicated over {', '.join(dropped)} (those devices "
        f"each compute all {shape[0]} rows: no data parallelism there)",
        stacklevel=2)
  return NamedSharding(mesh, spec)


def cache_shardings(cfg: QwenConfig, mesh: Mesh, batch: int,
                    max_len: int) -> PyTree:
  """NamedShardings of a `qwen_jax.cache` pytree (KV slots over seq)."""
  shapes = cache_lib.cache_shapes(cfg, batch, max_len)
  names = {"k": ("batch", "seq", "kv_heads_act", None),
           "v": ("batch", "seq", "kv_heads_act", None),
           "conv": ("batch", None, "linear_qkv"),
           "state": ("batch", "linear_heads_act", None, None)}

  def one(path, s):
    key = path[-1].key
    if key == "index":
      return NamedSharding(mesh, P())
    n = names[key]
    n = (None,) * (len(s.shape) - len(n)) + n  # scanned: leading periods
    return NamedSharding(mesh, fit_spec(n, s.shape, mesh))

  return jax.tree_util.tree_map_with_path(one, shapes)


def shard_params(params: PyTree, cfg: QwenConfig, mesh: Mesh) -> PyTree:
  """Places (unboxed) params on the mesh with `param_shardings`.

  Multi-process: every process passes the same full tree (one seed, one
  file) and transfers only its own devices' shards.
  """
  params = nn.unbox(params)
  shardings = param_shardings(cfg, mesh)
  if jax.process_count() == 1:
    return jax.device_put(params, shardings)

  def one(x, sh):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sh, lambda i: x[i])

  return jax.tree_util.tree_map(one, params, shardings)


def put_batch(x: Any, mesh: Mesh) -> jax.Array:
  """Places a global [b, t, ...] array (the same on every host) on the mesh.

  Multi-host: every process passes the whole global array and each keeps
  its addressable shards (`jax.make_array_from_callback`).
  """
  x = np.asarray(x)
  sharding = batch_sharding(mesh, x.shape)
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


# ----------------------------------------------------- tracing context
def sp_context(mesh: Mesh, **options: Any) -> sequence_parallel.SPContext:
  """The sequence-parallel context of a mesh (options: SPContext fields)."""
  return sequence_parallel.SPContext(mesh=mesh, rules=RULES, **options)


@contextlib.contextmanager
def activate(mesh: Mesh, sequence_parallel_options: Mapping[str, Any] | None
             = None, sequence_parallel_on: bool = True) -> Iterator[None]:
  """Inside a traced function: the mesh, the rules and (optionally) SP.

  Use it around `model.apply` in your own jitted functions; the programs
  below do.
  """
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    stack.enter_context(nn.logical_axis_rules(RULES))
    if sequence_parallel_on:
      stack.enter_context(sequence_parallel.activate(
          sp_context(mesh, **dict(sequence_parallel_options or {}))))
    yield


# --------------------------------------------------------------- the loss
def chunked_lm_loss(cfg: QwenConfig, params: PyTree, hidden: Array,
                    targets: Array, loss_mask: Array | None = None,
                    chunk: int = 1024, mesh: Mesh | None = None
                    ) -> tuple[Array, Array]:
  """Summed next-token cross-entropy without materialising [t, vocab].

  `qwen_jax.head.chunked_cross_entropy` (chunks of tokens, float32 logits
  of one chunk at a time, rematerialised for the backward pass), run on
  the whole batch, or on each device's own tokens inside a `jax.shard_map`
  over `mesh`. Sharded, the head weight is gathered once, before the chunk
  loop (the vocabulary still split over "tensor"), and the weight's
  gradient is accumulated locally and reduced once after it (left to the
  compiler, the gather and a full-size gradient all-reduce happen in every
  chunk).

  Args:
    cfg: the model config.
    params: unboxed params (for the head weight).
    hidden: [b, t, d] final normalised hidden states.
    targets: [b, t] int ids to predict at each position.
    loss_mask: [b, t] weights (1 = counts) or None.
    chunk: tokens per chunk (on each device when sharded).
    mesh: the mesh when sharded.

  Returns:
    (sum of losses, sum of weights), float32 scalars.
  """
  b, t, _ = hidden.shape
  w, vocab_major = head.head_weights(cfg, params)
  w = w.astype(hidden.dtype)
  if loss_mask is None:
    loss_mask = jnp.ones((b, t), jnp.float32)
  loss_mask = loss_mask.astype(jnp.float32)
  ce = functools.partial(head.chunked_cross_entropy, vocab_major=vocab_major,
                         chunk_size=chunk)
  if mesh is None:
    return ce(hidden, w, targets, loss_mask)[:2]

  hs = fit_spec(("batch", "seq", None), hidden.shape, mesh)
  v = 0 if vocab_major else 1  # the vocabulary's axis in w
  ws = fit_spec(("vocab", None) if vocab_major else (None, "vocab"), w.shape,
                mesh)
  ms = P(hs[0], hs[1])
  token_axes = tuple(a for e in (hs[0], hs[1]) if e is not None
                     for a in ((e,) if isinstance(e, str) else e))
  vocab_axis = ws[v]

  def body(w, h, tgt, m):
    offset = 0
    if vocab_axis is not None:
      offset = jax.lax.axis_index(vocab_axis) * w.shape[v]
    total, count, _ = ce(h, w, tgt, m, vocab_axis=vocab_axis,
                         vocab_offset=offset)
    if token_axes:
      total = jax.lax.psum(total, token_axes)
      count = jax.lax.psum(count, token_axes)
    return total, count

  # check_vma=False, as in qwen_jax.sequence_parallel: the chunk loop's
  # zero carries would fail the varying-type check. The outputs are summed
  # over every axis they vary on, so P() holds, and the transpose sums the
  # weight's gradient over the axes it is replicated on.
  return jax.shard_map(body, mesh=mesh, in_specs=(ws, hs, ms, ms),
                       out_specs=(P(), P()), check_vma=False)(
                           w, hidden, targets, loss_mask)


def loss_and_metrics(cfg: QwenConfig, params: PyTree,
                     batch: Mapping[str, Array], loss_chunk: int = 1024,
                     mesh: Mesh | None = None
                     ) -> tuple[Array, dict[str, Array]]:
  """The training loss of a batch and its metrics (unsharded or inside SP).

  The loss is the mean next-token cross-entropy; a mixture-of-experts
  model adds `cfg.router_aux_loss_coef` times the router's load-balancing
  loss, as `train_step.loss_and_stats` does. Metrics: "tokens" (the loss
  tokens) and, for a mixture-of-experts model, `moe.routing_metrics`:
  "router_aux_loss", "expert_load_max", "expert_load_min" and, where a
  capacity factor may drop pairs, "expert_dropped_share". The router
  statistics are those of the whole global batch: the layers compute them
  on the logical (global) arrays, and the compiler partitions the sums.

  batch: "inputs" [b, t]; "targets" [b, t]; optional "loss_mask",
  "attention_mask", "segment_ids" [b, t], and images or videos
  (`data.MEDIA_KEYS`, grids static; placeholder targets are left out of
  the loss as in `train_step.loss_and_stats`) (`data.check_batch`).
  """
  check_batch(batch)
  out = Qwen35(cfg).apply(
      {"params": params}, batch["inputs"],
      attention_mask=batch.get("attention_mask"),
      segment_ids=batch.get("segment_ids"), return_hidden=True,
      mutable=["intermediates"] if cfg.is_moe else False,
      **media_args(batch))
  if cfg.is_moe:
    (_, hidden), inter = out
  else:
    _, hidden = out
  mask = batch.get("loss_mask")
  if cfg.vision is not None:
    if mask is None:
      mask = jnp.ones(batch["inputs"].shape, jnp.float32)
    mask = placeholder_loss_mask(cfg, batch["targets"], mask)
  total, count = chunked_lm_loss(cfg, params, hidden, batch["targets"],
                                 mask, loss_chunk, mesh)
  loss = total / jnp.maximum(count, 1.0)
  metrics = {"tokens": count}
  if cfg.is_moe:
    routing = moe.routing_metrics(inter, cfg.num_experts_per_tok)
    loss = loss + cfg.router_aux_loss_coef * routing["router_aux_loss"]
    metrics.update(routing)
  return loss, metrics


def loss_fn(cfg: QwenConfig, params: PyTree, batch: Mapping[str, Array],
            loss_chunk: int = 1024, mesh: Mesh | None = None) -> Array:
  """`loss_and_metrics`' loss alone (the mean next-token cross-entropy,
  plus the weighted load-balancing loss of a mixture-of-experts model)."""
  return loss_and_metrics(cfg, params, batch, loss_chunk, mesh)[0]


def _media(mesh: Mesh, media: Mapping[str, Any]
           ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
  """(media with static grids, their shardings: replicated) or Nones."""
  media = {k: v for k, v in media.items() if v is not None}
  unknown = sorted(set(media) - set(MEDIA_KEYS))
  if unknown:
    raise TypeError(f"unexpected keyword arguments {unknown}; images and "
                    f"videos take {MEDIA_KEYS}")
  if not media:
    return None, None
  media = with_static_grids(media)
  return media, {k: NamedSharding(mesh, P()) for k in media}


# --------------------------------------------------------------- programs
def _last_logits(cfg: QwenConfig, params: PyTree, hidden: Array) -> Array:
  """[b, vocab] logits of the last position, float32 accumulation."""
  w, vocab_major = head.head_weights(cfg, params)
  return head.lm_logits(hidden[:, -1], w, vocab_major, hidden.dtype)


def _sp_args(mesh: Mesh, sequence_parallel_on: bool,
             options: Mapping[str, Any] | None):
  return dict(sequence_parallel_options=options,
              sequence_parallel_on=sequence_parallel_on)


def make_forward(cfg: QwenConfig, mesh: Mesh, logits: str = "all",
                 sequence_parallel_on: bool = True,
                 sequence_parallel_options: Mapping[str, Any] | None = None
                 ) -> Callable[..., Array]:
  """Sharded forward pass: fn(params, input_ids, attention_mask=None,
  segment_ids=None, **media) -> logits, media being pixel_values,
  image_grid_thw, pixel_values_videos, video_grid_thw (as `Qwen35` takes
  them; grids as host data).

  Args:
    cfg: the model config.
    mesh: the device mesh.
    logits: "all" ([b, t, vocab], vocab over tensor, tokens over seq),
      "last" ([b, vocab] of the last position) or "hidden" (the final
      normalised hidden states [b, t, d]; long sequences).
    sequence_parallel_on: route GDN / attention through the SP ops.
    sequence_parallel_options: SPContext fields (attention block sizes,
      balance_attention).

  Returns:
    A jitted function.
  """
  if logits not in ("all", "last", "hidden"):
    raise ValueError(f"logits: expected 'all', 'last' or 'hidden', found "
                     f"{logits!r}")
  model = Qwen35(cfg)
  p_sh = param_shardings(cfg, mesh)
  sp = _sp_args(mesh, sequence_parallel_on, sequence_parallel_options)

  def fn(params, input_ids, attention_mask=None, segment_ids=None,
         media=None):
    with activate(mesh, **sp):
      out, hidden = model.apply(
          {"params": params}, input_ids, attention_mask=attention_mask,
          segment_ids=segment_ids, return_hidden=True, **(media or {}))
      if logits == "all":
        return out
      if logits == "hidden":
        return hidden
      return _last_logits(cfg, params, hidden)

  def bsh(x):
    return None if x is None else batch_sharding(mesh, x.shape)

  def jitted(input_ids, attention_mask, segment_ids, media_sh):
    shapes = (input_ids, attention_mask, segment_ids)
    return _jit_cached(fn, (p_sh,) + tuple(bsh(x) for x in shapes) + (
        media_sh,))

  def call(params, input_ids, attention_mask=None, segment_ids=None,
           **media):
    media, media_sh = _media(mesh, media)
    return jitted(input_ids, attention_mask, segment_ids, media_sh)(
        params, input_ids, attention_mask, segment_ids, media)

  def lower(params, input_ids, attention_mask=None, segment_ids=None,
            **media):
    media, media_sh = _media(mesh, media)
    return jitted(input_ids, attention_mask, segment_ids, media_sh).lower(
        params, input_ids, attention_mask, segment_ids, media)

  call.lower = lower
  return call


_JIT_CACHE: dict[Any, Any] = {}


def _jit_cached(fn, in_shardings, out_shardings=None):
  key = (fn, tuple(map(_hashable, in_shardings)), _hashable(out_shardings))
  if key not in _JIT_CACHE:
    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    _JIT_CACHE[key] = jax.jit(fn, in_shardings=in_shardings, **kw)
  return _JIT_CACHE[key]


def _hashable(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return (treedef, tuple(leaves))


def make_prefill(cfg: QwenConfig, mesh: Mesh, max_len: int,
                 sequence_parallel_on: bool = True,
                 sequence_parallel_options: Mapping[str, Any] | None = None
                 ) -> Callable[..., tuple[Array, PyTree]]:
  """Sharded prefill into an empty cache: fn(params, input_ids,
  attention_mask=None, **media) -> (last-position logits [b, vocab] f32,
  cache), media as in `make_forward`.

  The prompt runs in one call with its tokens split over "seq"; the cache
  (`qwen_jax.cache`, KV slots over "seq" when they divide; with images or
  videos also "rope_delta") is then ready for `qwen_jax.generate`'s decode
  step on any mesh or one device.

  Args:
    cfg: the model config.
    mesh: the device mesh.
    max_len: cache slots (prompt + tokens to generate).
    sequence_parallel_on, sequence_parallel_options: as in `make_forward`.

  Returns:
    A function; `fn.lower(...)` gives the lowered program (AOT).
  """
  model = Qwen35(cfg)
  p_sh = param_shardings(cfg, mesh)
  sp = _sp_args(mesh, sequence_parallel_on, sequence_parallel_options)

  def fn(params, input_ids, attention_mask=None, media=None):
    b, t = input_ids.shape
    if t > max_len:
      raise ValueError(f"prompt length: expected at most max_len={max_len},"
                       f" found {t}")
    cache = cache_lib.init_cache(cfg, b, max_len)
    if attention_mask is not None:  # [b, t] prompt mask -> [b, S] slots
      attention_mask = jnp.concatenate(
          [attention_mask.astype(jnp.int32),
           jnp.ones((b, max_len - t), jnp.int32)], axis=1)
    with activate(mesh, **sp):
      _, new_cache, hidden = model.apply(
          {"params": params}, input_ids, attention_mask=attention_mask,
          cache=cache, return_hidden=True, **(media or {}))
      last = _last_logits(cfg, params, hidden)
    return last, new_cache

  def jitted(input_ids, attention_mask, media_sh):
    b = input_ids.shape[0]
    ins = (p_sh, batch_sharding(mesh, input_ids.shape),
           None if attention_mask is None
           else batch_sharding(mesh, attention_mask.shape), media_sh)
    cache_sh = cache_shardings(cfg, mesh, b, max_len)
    if media_sh is not None:
      cache_sh = dict(cache_sh, rope_delta=NamedSharding(mesh, P()))
    outs = (NamedSharding(mesh, fit_spec(("batch", "vocab_act"),
                                         (b, cfg.vocab_size), mesh)),
            cache_sh)
    return _jit_cached(fn, ins, outs)

  def call(params, input_ids, attention_mask=None, **media):
    media, media_sh = _media(mesh, media)
    return jitted(input_ids, attention_mask, media_sh)(
        params, input_ids, attention_mask, media)

  def lower(params, input_ids, attention_mask=None, **media):
    media, media_sh = _media(mesh, media)
    return jitted(input_ids, attention_mask, media_sh).lower(
        params, input_ids, attention_mask, media)

  call.lower = lower
  return call


def make_train_step(cfg: QwenConfig, mesh: Mesh, loss_chunk: int = 1024,
                    sequence_parallel_on: bool = True,
                    sequence_parallel_options: Mapping[str, Any] | None = None,
                    with_metrics: bool = False
                    ) -> Callable[..., tuple[Array, ...]]:
  """Sharded loss and gradients: fn(params, batch) -> (loss, grads), or
  (loss, grads, metrics) with `with_metrics`.

  batch: {"inputs", "targets"[, "loss_mask", "attention_mask",
  "segment_ids"]}, each [b, t], and for a model with a tower optionally
  its images and videos (`data.MEDIA_KEYS`: pixel values replicated, grids
  static). The loss is the mean next-token cross-entropy (`loss_fn`),
  computed in chunks (no [t, vocab] logits); gradients come back with the
  parameters' shardings, the tower's included. Rematerialisation follows
  `cfg.remat_policy` ("full" for long sequences). A mixture-of-experts
  model's loss includes its weighted load-balancing loss and its metrics
  the router statistics (`loss_and_metrics`), as the single-device
  `train_step.make_train_step`'s.

  Args:
    cfg: the model config.
    mesh: the device mesh.
    loss_chunk: tokens per chunk of the loss.
    sequence_parallel_on, sequence_parallel_options: as in `make_forward`.
    with_metrics: also return `loss_and_metrics`' metrics (replicated
      float32 scalars).

  Returns:
    A function; `fn.lower(params, batch)` gives the lowered program.
  """
  p_sh = param_shardings(cfg, mesh)
  sp = _sp_args(mesh, sequence_parallel_on, sequence_parallel_options)

  def fn(params, batch):
    def f(p):
      with activate(mesh, **sp):
        return loss_and_metrics(cfg, p, batch, loss_chunk, mesh)
    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    return (loss, grads, metrics) if with_metrics else (loss, grads)

  def jitted(batch):
    tokens = batch["inputs"] if "inputs" in batch else next(
        iter(batch.values()))
    bsh = batch_sharding(mesh, np.shape(tokens))
    rep = NamedSharding(mesh, P())
    shardings = {k: rep if k in MEDIA_KEYS else bsh for k in batch}
    rep_out = NamedSharding(mesh, P())
    outs = (rep_out, p_sh) + ((rep_out,) if with_metrics else ())
    return _jit_cached(fn, (p_sh, shardings), outs)

  def call(params, batch):
    batch = with_static_grids(batch)
    return jitted(batch)(params, batch)

  def lower(params, batch):
    batch = with_static_grids(batch)
    return jitted(batch).lower(params, batch)

  call.lower = lower
  return call
