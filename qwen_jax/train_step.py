"""The optimizer and the compiled train and eval steps.

  * f32 master weights (`param_dtype`), computed in bf16 on GPU/TPU
    (`TrainConfig.compute_dtype="auto"`); remat per layer from
    `QwenConfig.remat_policy`.
  * AdamW (decoupled weight decay on matrices only) with linear warmup and
    cosine decay, global-norm gradient clipping.
  * The loss from the final hidden states through the chunked
    cross-entropy of `qwen_jax.head` (one chunk's float32 logits at a time).
  * One jit-compiled step with the state donated; metrics loss, gradient
    norm, learning rate and loss tokens. `flops_per_token` and
    `device_peak_flops` give the MFU estimate the loop reports.
  * Two options of the step (`make_train_step`): `lora=LoraSpec(...)`
    trains low-rank adapters (`qwen_jax.lora`) over frozen base weights
    passed as a third argument, `step(state, batch, base)`, the state then
    holding the adapters and their optimizer moments only; `mesh=` runs
    the step sharded over a device mesh (`qwen_jax.sharding`: weights and
    optimizer state ZeRO-3 over fsdp/seq, tokens over seq, sequence
    parallel Gated DeltaNet and attention).

The loop around the step is `qwen_jax.train`, its checkpoints
`qwen_jax.train_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from qwen_jax import head
from qwen_jax import lora as lora_lib
from qwen_jax import moe
from qwen_jax import sharding
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.config import FULL, QwenConfig
from qwen_jax.config import is_int, is_real
from qwen_jax.data import MEDIA_KEYS
from qwen_jax.data import check_batch
from qwen_jax.data import media_args
from qwen_jax.data import placeholder_loss_mask
from qwen_jax.data import with_static_grids
from qwen_jax.model import Qwen35

Batch = Mapping[str, Any]
BatchFn = Callable[[int], Batch]

# TrainConfig fields that the compiled step does not read: runs that differ
# only in these share one compiled step (see `make_train_step`).
_LOOP_ONLY_FIELDS = ("seed", "log_every", "checkpoint_every",
                     "keep_checkpoints", "async_checkpointing", "peak_flops",
                     "save_checkpoints", "batch_size", "seq_len")

# Dense bf16 peak FLOP/s per device, by a substring of `device_kind`.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12),
)

# Accepted values of TrainConfig.compute_dtype.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


# ------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of a training run.

  Attributes:
    batch_size: sequences per step.
    seq_len: tokens per sequence.
    num_steps: total optimizer steps (the schedule's length).
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0.
    min_lr_ratio: final learning rate / peak (cosine decay).
    weight_decay: AdamW decay on parameters with >= 2 dims.
    b1, b2, eps: Adam moments.
    grad_clip: global-norm clip (0 or None = off).
    seed: parameter-init seed.
    compute_dtype: "auto" (bf16 on GPU/TPU, the model config's dtype on
      CPU) or a dtype name.
    ce_chunk_size: tokens per cross-entropy chunk; 0 picks about 2^27
      logits per chunk.
    log_every: steps between metric fetches, CSV rows and progress updates.
    checkpoint_every: steps between orbax checkpoints (0 = only at the end
      when a workdir is given).
    keep_checkpoints: newest checkpoints kept.
    async_checkpointing: let orbax write in the background.
    peak_flops: per-device peak FLOP/s for MFU (0 = look up the device).
    save_checkpoints: write orbax checkpoints when a workdir is given
      (False: metrics.csv only, no resume; for benchmarks of big models).

  Raises:
    ValueError: a field of the wrong type or out of range (the message names
      it, the expected range and the value found).
  """
  batch_size: int = 32
  seq_len: int = 64
  num_steps: int = 1000
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  seed: int = 0
  compute_dtype: str = "auto"
  ce_chunk_size: int = 0
  log_every: int = 10
  checkpoint_every: int = 0
  keep_checkpoints: int = 3
  async_checkpointing: bool = False
  peak_flops: float = 0.0
  save_checkpoints: bool = True

  def __post_init__(self):
    def bad(name: str, expected: str) -> None:
      raise ValueError(f"TrainConfig.{name}: expected {expected}, found "
                       f"{getattr(self, name)!r}")

    def number(name: str, integer: bool = False) -> float:
      v = getattr(self, name)
      if not (is_int(v) if integer else is_real(v)):
        bad(name, "an int" if integer else "a number")
      if not integer and math.isnan(v):
        bad(name, "a number")
      return v

    for name, low in (("batch_size", 1), ("seq_len", 1), ("num_steps", 1),
                      ("log_every", 1), ("keep_checkpoints", 1),
                      ("warmup_steps", 0), ("checkpoint_every", 0),
                      ("ce_chunk_size", 0)):
      if number(name, integer=True) < low:
        bad(name, f"an int >= {low}")
    number("seed", integer=True)
    for name in ("learning_rate", "weight_decay", "eps", "peak_flops"):
      v = number(name)
      if not 0 <= v < math.inf:
        bad(name, "a finite number >= 0")
    if not 0 <= number("min_lr_ratio") <= 1:
      bad("min_lr_ratio", "a number in [0, 1]")
    for name in ("b1", "b2"):
      if not 0 <= number(name) < 1:
        bad(name, "a number in [0, 1)")
    if self.grad_clip is not None and not number("grad_clip") >= 0:
      bad("grad_clip", "a number > 0, or 0 or None (off)")
    if self.compute_dtype not in COMPUTE_DTYPES:
      bad("compute_dtype", f"one of {COMPUTE_DTYPES}")
    for name in ("async_checkpointing", "save_checkpoints"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        bad(name, "a bool")

  def replace(self, **changes: Any) -> "TrainConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    """From a mapping (e.g. an ml_collections ConfigDict), unknown keys
    ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d).items() if k in names})


def on_accelerator() -> bool:
  return jax.default_backend() in ("gpu", "tpu")


def model_config_for_training(cfg: QwenConfig,
                              tcfg: TrainConfig) -> QwenConfig:
  """The model config with the compute dtype the run uses."""
  if tcfg.compute_dtype == "auto":
    dtype = "bfloat16" if on_accelerator() else cfg.dtype
  else:
    dtype = tcfg.compute_dtype
  return cfg.replace(dtype=dtype)


# --------------------------------------------------------------- optimizer
def learning_rate_schedule(tcfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to the peak, cosine decay to min_lr_ratio x peak."""
  warmup = min(tcfg.warmup_steps, max(tcfg.num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(tcfg.num_steps, warmup + 1),
      end_value=tcfg.learning_rate * tcfg.min_lr_ratio)


def clipping_on(grad_clip: float | None) -> bool:
  """Whether a grad_clip value turns clipping on (0 and None: off)."""
  return bool(grad_clip) and grad_clip > 0


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW (no decay on vectors: norms, biases)."""
  def decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

  parts = []
  if clipping_on(tcfg.grad_clip):
    parts.append(optax.clip_by_global_norm(tcfg.grad_clip))
  parts.append(optax.adamw(
      learning_rate_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
      weight_decay=tcfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
  """Everything a step changes (a pytree; checkpointed as a whole).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: float32 master weights (the "params" collection).
    opt_state: the optax state.
  """
  step: Array
  params: PyTree
  opt_state: PyTree


@functools.lru_cache(maxsize=16)
def _jitted_init(cfg: QwenConfig) -> Callable:
  # One jit object per config, so repeated runs (resume, seeds) reuse the
  # compiled init.
  model = Qwen35(cfg)
  return jax.jit(model.init)


def init_params(cfg: QwenConfig, seed: int = 0) -> PyTree:
  """Random parameters (unboxed from their partitioning metadata)."""
  dummy = jnp.zeros((1, 8), jnp.int32)
  variables = _jitted_init(cfg)(jax.random.PRNGKey(seed), dummy)
  return nn.meta.unbox(variables)["params"]


def init_state(cfg: QwenConfig, tcfg: TrainConfig,
               params: PyTree | None = None) -> TrainState:
  """A fresh state (random parameters unless `params` is given)."""
  if params is None:
    params = init_params(cfg, tcfg.seed)
  opt_state = make_optimizer(tcfg).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=opt_state)


# -------------------------------------------------------------------- loss
def loss_and_stats(params: PyTree, cfg: QwenConfig, batch: Batch,
                   chunk_size: int = 0, mesh: Any = None
                   ) -> tuple[Array, dict[str, Array]]:
  """Mean masked cross-entropy of a batch, and its sums.

  Args:
    params: model parameters.
    cfg: model config (its dtype is the compute dtype).
    batch: "inputs", "targets" [b, t]; optional "loss_mask" [b, t] (default
      all ones) and "segment_ids" [b, t] (packed documents); for a model
      with a tower, optional images and videos (`data.MEDIA_KEYS`; grids
      static under jit: `data.with_static_grids`). Targets that are image
      or video placeholders are left out of the loss (their embeddings are
      the tower's features, not tokens to predict); gradients reach the
      tower through the features.
    chunk_size: cross-entropy chunk (see `head.chunked_cross_entropy`).
    mesh: a device mesh: the model runs inside `sharding.activate(mesh)`
      (sequence parallel) and the loss is `sharding.chunked_lm_loss`
      (each device's own tokens); "correct" is then NaN (not computed).

  Returns:
    (mean loss, {"loss_sum", "tokens", "correct"}). A mixture-of-experts
    model adds `cfg.router_aux_loss_coef` times the router's
    load-balancing loss to the mean (as transformers'
    `Qwen3_5MoeForCausalLM` does with `output_router_logits`), and the
    stats hold `moe.load_summary`'s scalars.
  """
  check_batch(batch, cfg.vocab_size)
  inputs, targets = batch["inputs"], batch["targets"]
  mask = batch.get("loss_mask")
  if mask is None:
    mask = jnp.ones(inputs.shape, jnp.float32)
  mask = placeholder_loss_mask(cfg, targets, mask)

  def forward():
    out = Qwen35(cfg).apply(
        {"params": params}, inputs, segment_ids=batch.get("segment_ids"),
        attention_mask=batch.get("attention_mask"),
        return_hidden=True, **media_args(batch),
        mutable=["intermediates"] if cfg.is_moe else False)
    if cfg.is_moe:
      (_, hidden), inter = out
      return hidden, inter
    return out[1], None

  if mesh is not None:
    with sharding.activate(mesh):
      hidden, inter = forward()
      loss_sum, tokens = sharding.chunked_lm_loss(
          cfg, params, hidden, targets, mask, chunk_size or 1024, mesh)
    correct = jnp.full((), jnp.nan, jnp.float32)
  else:
    hidden, inter = forward()
    w, vocab_major = head.head_weights(cfg, params)
    loss_sum, tokens, correct = head.chunked_cross_entropy(
        hidden, w, targets, mask, vocab_major=vocab_major,
        chunk_size=chunk_size, dtype=jnp.dtype(cfg.dtype))
  if cfg.is_moe:
    routing = moe.routing_metrics(inter, cfg.num_experts_per_tok)
  loss = loss_sum / jnp.maximum(tokens, 1.0)
  stats = {"loss_sum": loss_sum, "tokens": tokens, "correct": correct}
  if cfg.is_moe:
    loss = loss + cfg.router_aux_loss_coef * routing["router_aux_loss"]
    stats.update(routing)
  return loss, stats


def _model_loss(trained: PyTree, frozen: PyTree | None, cfg: QwenConfig,
                batch: Batch, chunk_size: int,
                lora: lora_lib.LoraSpec | None, mesh: Any):
  """`loss_and_stats` of the trained parameters (the adapters over the
  frozen base when `lora` is set)."""
  if lora is None:
    return loss_and_stats(trained, cfg, batch, chunk_size, mesh)
  with lora_lib.applied():
    return loss_and_stats(lora_lib.combine(frozen, trained, lora), cfg,
                          batch, chunk_size, mesh)


# ---------------------------------------------------------------- sharding
def state_shardings(cfg: QwenConfig, tcfg: TrainConfig, mesh: Any,
                    lora: lora_lib.LoraSpec | None = None) -> TrainState:
  """NamedShardings of the TrainState on `mesh`: the weights and their
  optimizer moments as `sharding.param_shardings` places the weights
  (ZeRO-3 over fsdp and seq, Megatron over tensor); adapters, the step and
  the optimizer's counters replicated."""
  replicated = NamedSharding(mesh, P())
  shapes = sharding.abstract_params(cfg)
  shapes = nn.meta.unbox(shapes)
  if lora is None:
    param_sh = sharding.param_shardings(cfg, mesh)
    params = shapes
  else:
    params = lora_lib.adapter_shapes(shapes, lora)
    param_sh = jax.tree_util.tree_map(lambda _: replicated, params)
  tx = make_optimizer(tcfg)
  opt = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, opt, param_sh,
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


# -------------------------------------------------------------------- step
def make_train_step(cfg: QwenConfig, tcfg: TrainConfig,
                    donate: bool = True, *,
                    lora: lora_lib.LoraSpec | None = None,
                    mesh: Any = None) -> Callable:
  """jit-compiled `step(state, batch) -> (state, metrics)`.

  With `mesh`, the state comes back with `state_shardings` and the metrics
  replicated (the batch and state go in as global arrays on the mesh, the
  batch's rows over data/fsdp and its tokens over seq; the model runs
  inside `sharding.activate`, sequence parallel).

  The state is donated (its buffers are reused for the new state). Metrics:
  loss, grad_norm (before clipping), learning_rate, tokens (loss tokens).
  Calls with the same model config and the same optimizer settings return
  the same function, so a second run in the process (a resume, another
  seed) does not compile again. A batch's image and video grids become
  static (`data.with_static_grids`): one compilation per grid set;
  `fn.lower(state, batch[, base])` lowers the program for that batch.

  Args:
    cfg: the model config (compute dtype set).
    tcfg: the train config.
    donate: donate the state.
    lora: train these adapters: `step(state, batch, base)`, state.params
      the adapters, `base` the frozen weights (not donated).
    mesh: shard the step over this mesh (`state_shardings`; the batch's
      rows over data/fsdp and its tokens over seq, images and videos
      replicated).
  """
  key = tcfg.replace(**{f: getattr(TrainConfig, f)
                        for f in _LOOP_ONLY_FIELDS})
  return _make_train_step(cfg, key, donate, lora, mesh)


@functools.lru_cache(maxsize=16)
def _make_train_step(cfg: QwenConfig, tcfg: TrainConfig, donate: bool,
                     lora: lora_lib.LoraSpec | None, mesh: Any
                     ) -> Callable:
  tx = make_optimizer(tcfg)
  schedule = learning_rate_schedule(tcfg)

  def step(state: TrainState, batch: Batch, frozen: PyTree = None):
    grad_fn = jax.value_and_grad(_model_loss, has_aux=True)
    (loss, stats), grads = grad_fn(state.params, frozen, cfg, batch,
                                   tcfg.ce_chunk_size, lora, mesh)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state.step),
               "tokens": stats["tokens"]}
    metrics.update({k: v for k, v in stats.items() if k.startswith(
        ("router_", "expert_"))})
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, metrics

  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return _static_grid_call(jax.jit(step, donate_argnums=donate_argnums))
  st = state_shardings(cfg, tcfg, mesh, lora)
  frozen_sh = None if lora is None else sharding.param_shardings(cfg, mesh)
  return _MeshStep(step, st, frozen_sh, NamedSharding(mesh, P()), mesh,
                   donate_argnums)


def _static_grid_call(jitted: Callable) -> Callable:
  """fn(x, batch, *rest) -> jitted(x, with_static_grids(batch), *rest),
  with `lower`."""
  def call(x, batch, *rest):
    return jitted(x, with_static_grids(batch), *rest)

  def lower(x, batch, *rest):
    return jitted.lower(x, with_static_grids(batch), *rest)

  call.lower = lower
  return call


class _MeshStep:
  """The sharded step: one `jax.jit` per batch shape, with the state's
  shardings in and out (a resumed or next step reuses the placement);
  images and videos replicated, their grids static."""

  def __init__(self, step, state_sh, frozen_sh, replicated, mesh,
               donate_argnums):
    self._step, self._state_sh, self._frozen_sh = step, state_sh, frozen_sh
    self._replicated, self._mesh = replicated, mesh
    self._donate = donate_argnums
    self._jits = {}
    self.state_shardings = state_sh
    self.frozen_shardings = frozen_sh

  def _jit(self, batch: Batch):
    shapes = tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()
                          if k not in MEDIA_KEYS))
    media = tuple(sorted(k for k in batch if k in MEDIA_KEYS))
    key = (shapes, media)
    if key not in self._jits:
      batch_sh = {k: sharding.batch_sharding(self._mesh, s)
                  for k, s in shapes}
      batch_sh.update({k: self._replicated for k in media})
      ins = (self._state_sh, batch_sh)
      if self._frozen_sh is not None:
        ins += (self._frozen_sh,)
      self._jits[key] = jax.jit(
          self._step, in_shardings=ins,
          out_shardings=(self._state_sh, self._replicated),
          donate_argnums=self._donate)
    return self._jits[key]

  @staticmethod
  def _batch(batch: Batch) -> dict[str, Any]:
    return with_static_grids({k: v for k, v in batch.items()
                              if v is not None})

  def lower(self, state, batch, *frozen):
    batch = self._batch(batch)
    return self._jit(batch).lower(state, batch, *frozen)

  def __call__(self, state, batch, *frozen):
    batch = self._batch(batch)
    return self._jit(batch)(state, batch, *frozen)


@functools.lru_cache(maxsize=16)
def make_eval_step(cfg: QwenConfig, chunk_size: int = 0,
                   lora: lora_lib.LoraSpec | None = None,
                   mesh: Any = None) -> Callable:
  """jit-compiled `eval(params, batch[, base]) -> {"loss_sum", "tokens",
  "correct"}` (sums over the batch's masked tokens; one function per
  (cfg, chunk_size, lora, mesh); grids static as in `make_train_step`).
  With `lora`, params are the adapters and `base` the frozen weights."""

  def evaluate(params, batch, frozen=None):
    return _model_loss(params, frozen, cfg, batch, chunk_size, lora,
                       mesh)[1]

  return _static_grid_call(jax.jit(evaluate))


# ------------------------------------------------------------- flops / mfu
def flops_per_token(cfg: QwenConfig, seq_len: int,
                    chunk_size: int = 64) -> float:
  """Estimated training FLOPs per token (3 x forward matmul FLOPs).

  Counts projections, MLP and LM head (2 per multiply-add), causal
  attention scores and values (average context seq_len / 2), and the
  chunked gated delta rule (intra-chunk c x c products and state
  reads/writes). Norms, activations and the embedding lookup are ignored.
  """
  d, i = cfg.hidden_size, cfg.intermediate_size
  h, n, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  hv = cfg.linear_num_value_heads
  dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
  c = min(chunk_size, seq_len)
  mlp = {"dense": 2 * 3 * d * i,  # a "moe" layer: its active experts
         "moe": 2 * cfg.moe_mlp_params(active=True)}
  full = 2 * (d * 2 * h * e + 2 * d * n * e + h * e * d)
  full += 2 * 2 * h * e * (seq_len / 2)
  lin = 2 * (d * cfg.linear_conv_dim + d * cfg.linear_value_dim
             + 2 * d * hv + cfg.linear_value_dim * d)
  lin += 2 * cfg.linear_conv_kernel_dim * cfg.linear_conv_dim
  lin += 2 * hv * (c * (2 * dk + 2 * dv) + 3 * dk * dv)
  fwd = 2 * d * cfg.vocab_size
  for kind, mlp_kind in zip(cfg.layer_types, cfg.mlp_types):
    fwd += mlp[mlp_kind] + (full if kind == FULL else lin)
  return 3.0 * fwd


def device_peak_flops(device: Any = None) -> float | None:
  """Dense bf16 peak FLOP/s of a device from its kind; None if unknown."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


def param_count(params: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
