"""Training: optimizer, loss, jit-compiled step, checkpoints and the loop.

Importable by scripts and notebooks (experiments/train.py and
experiments/compare_ratios.py are thin absl front ends):

  cfg = QwenConfig.from_preset("tiny")
  tcfg = TrainConfig(batch_size=8, seq_len=64, num_steps=100)
  text = data.TextData(tcfg.seq_len)
  result = train(cfg, tcfg, lambda step: text.batch(8, seed=0, step=step),
                 workdir="/tmp/run")
  result.state.params, result.losses

What it does:
  * f32 master weights (`param_dtype`), computed in bf16 on GPU/TPU
    (`TrainConfig.compute_dtype="auto"`); remat per layer from
    `QwenConfig.remat_policy`.
  * AdamW (decoupled weight decay on matrices only) with linear warmup and
    cosine decay, global-norm gradient clipping.
  * A cross-entropy computed from the final hidden states and the LM-head
    weights in chunks of tokens under `jax.checkpoint`: only one chunk's
    float32 logits [chunk, vocab] exist at a time, forward or backward
    (for the 248,320-token vocabulary a whole 8k sequence would need 8 GB).
  * One jit-compiled step with the state donated; metrics loss, gradient
    norm, learning rate, tokens/s and an MFU estimate.
  * Orbax checkpoints every N steps, the last K kept; a restarted run resumes
    from the newest one and reproduces the losses of an uninterrupted run
    (batches are pure functions of the step). A checkpoint written for a
    different model config raises ValueError naming the fields.
  * `export_hf` writes the trained weights with `save_hf_checkpoint`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen_jax import head
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.checkpoint import save_hf_checkpoint
from qwen_jax.config import FULL, IMPLEMENTATION_FIELDS, QwenConfig
from qwen_jax.config import is_int, is_real
from qwen_jax.data import check_batch
from qwen_jax.model import Qwen35

Batch = Mapping[str, Any]
BatchFn = Callable[[int], Batch]

# Implementation fields that also fix the structure of the saved train
# state: scan_layers stacks the layers' parameters (and their optimizer
# moments) on a leading axis or not, and param_dtype is the dtype of those
# arrays. A checkpoint resumes only under the values it was written with.
STATE_LAYOUT_FIELDS = ("param_dtype", "scan_layers")
# The QwenConfig fields a checkpoint may be resumed under other values of.
RESUMABLE_FIELDS = tuple(f for f in IMPLEMENTATION_FIELDS
                         if f not in STATE_LAYOUT_FIELDS)

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


def _clips(grad_clip: float | None) -> bool:
  """Whether a grad_clip value turns clipping on (0 and None: off)."""
  return bool(grad_clip) and grad_clip > 0


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW (no decay on vectors: norms, biases)."""
  def decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

  parts = []
  if _clips(tcfg.grad_clip):
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
                   chunk_size: int = 0) -> tuple[Array, dict[str, Array]]:
  """Mean masked cross-entropy of a batch, and its sums.

  Args:
    params: model parameters.
    cfg: model config (its dtype is the compute dtype).
    batch: "inputs", "targets" [b, t]; optional "loss_mask" [b, t] (default
      all ones) and "segment_ids" [b, t] (packed documents).
    chunk_size: cross-entropy chunk (see `head.chunked_cross_entropy`).

  Returns:
    (mean loss, {"loss_sum", "tokens", "correct"}).
  """
  check_batch(batch, cfg.vocab_size)
  inputs, targets = batch["inputs"], batch["targets"]
  mask = batch.get("loss_mask")
  if mask is None:
    mask = jnp.ones(inputs.shape, jnp.float32)
  _, hidden = Qwen35(cfg).apply(
      {"params": params}, inputs, segment_ids=batch.get("segment_ids"),
      attention_mask=batch.get("attention_mask"),
      return_hidden=True)
  w, vocab_major = head.head_weights(cfg, params)
  loss_sum, tokens, correct = head.chunked_cross_entropy(
      hidden, w, targets, mask, vocab_major=vocab_major,
      chunk_size=chunk_size, dtype=jnp.dtype(cfg.dtype))
  loss = loss_sum / jnp.maximum(tokens, 1.0)
  return loss, {"loss_sum": loss_sum, "tokens": tokens, "correct": correct}


# -------------------------------------------------------------------- step
def make_train_step(cfg: QwenConfig, tcfg: TrainConfig,
                    donate: bool = True) -> Callable:
  """jit-compiled `step(state, batch) -> (state, metrics)`.

  The state is donated (its buffers are reused for the new state). Metrics:
  loss, grad_norm (before clipping), learning_rate, tokens (loss tokens).
  Calls with the same model config and the same optimizer settings return
  the same jit object, so a second run in the process (a resume, another
  seed) does not compile again.
  """
  key = tcfg.replace(**{f: getattr(TrainConfig, f)
                        for f in _LOOP_ONLY_FIELDS})
  return _make_train_step(cfg, key, donate)


@functools.lru_cache(maxsize=16)
def _make_train_step(cfg: QwenConfig, tcfg: TrainConfig,
                     donate: bool) -> Callable:
  tx = make_optimizer(tcfg)
  schedule = learning_rate_schedule(tcfg)

  def step(state: TrainState, batch: Batch):
    grad_fn = jax.value_and_grad(loss_and_stats, has_aux=True)
    (loss, stats), grads = grad_fn(state.params, cfg, batch,
                                   tcfg.ce_chunk_size)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state.step),
               "tokens": stats["tokens"]}
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, metrics

  return jax.jit(step, donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=16)
def make_eval_step(cfg: QwenConfig, chunk_size: int = 0) -> Callable:
  """jit-compiled `eval(params, batch) -> {"loss_sum", "tokens",
  "correct"}` (sums over the batch's masked tokens; one jit object per
  (cfg, chunk_size))."""

  def evaluate(params, batch):
    return loss_and_stats(params, cfg, batch, chunk_size)[1]

  return jax.jit(evaluate)


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
  mlp = 2 * 3 * d * i
  full = 2 * (d * 2 * h * e + 2 * d * n * e + h * e * d)
  full += 2 * 2 * h * e * (seq_len / 2)
  lin = 2 * (d * cfg.linear_conv_dim + d * cfg.linear_value_dim
             + 2 * d * hv + cfg.linear_value_dim * d)
  lin += 2 * cfg.linear_conv_kernel_dim * cfg.linear_conv_dim
  lin += 2 * hv * (c * (2 * dk + 2 * dv) + 3 * dk * dv)
  fwd = 2 * d * cfg.vocab_size
  for kind in cfg.layer_types:
    fwd += mlp + (full if kind == FULL else lin)
  return 3.0 * fwd


def device_peak_flops(device: Any = None) -> float | None:
  """Dense bf16 peak FLOP/s of a device from its kind; None if unknown."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


# ------------------------------------------------------------- checkpoints
def _config_record(cfg: QwenConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_differences(saved: Mapping[str, Any],
                       cfg: QwenConfig) -> list[str]:
  """'field: checkpoint X, this run Y' for the fields a resume must keep
  (all but `RESUMABLE_FIELDS`)."""
  now = _config_record(cfg)
  defaults = {f.name: f.default for f in dataclasses.fields(QwenConfig)}
  out = []
  for key in sorted(set(saved) | set(now)):
    if key in RESUMABLE_FIELDS:
      continue
    if key not in saved and now.get(key) == defaults.get(key):
      continue  # a field added since the checkpoint, at its default
    if saved.get(key) != now.get(key):
      out.append(f"{key}: checkpoint {saved.get(key)!r}, this run "
                 f"{now.get(key)!r}")
  return out


class Checkpointer:
  """Orbax checkpoints of a TrainState under `<workdir>/checkpoints`.

  Each step directory holds the state and a JSON record of the model and
  train configs; `restore` checks the model config before touching arrays.

  Attributes:
    directory: the checkpoint folder.
  """

  def __init__(self, workdir: str, cfg: QwenConfig, tcfg: TrainConfig):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._cfg, self._tcfg = cfg, tcfg
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, tcfg.keep_checkpoints), create=True,
        enable_async_checkpointing=tcfg.async_checkpointing)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: TrainState) -> None:
    ocp = self._ocp
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return
    record = {"model_config": _config_record(self._cfg),
              "train_config": dataclasses.asdict(self._tcfg)}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_as_dict(state)),
        config=ocp.args.JsonSave(record)), force=True)

  def read_config(self, step: int) -> dict[str, Any]:
    ocp = self._ocp
    out = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
    return out["config"]

  def check(self, step: int) -> None:
    """Checks, from its JSON record alone, that the checkpoint at `step`
    fits this run: the same model config (implementation fields aside) and
    an optimizer state of the same structure (gradient clipping on in both
    or off in both; the clip value itself may change).

    Raises:
      ValueError: naming the fields that differ and both values.
    """
    record = self.read_config(step)
    where = f"checkpoint {self.directory} (step {step})"
    diffs = config_differences(record.get("model_config", {}), self._cfg)
    if diffs:
      raise ValueError(
          f"{where} was written for a different model config; "
          + "; ".join(diffs))
    saved = record.get("train_config") or {}
    if "grad_clip" in saved and (_clips(saved["grad_clip"])
                                 != _clips(self._tcfg.grad_clip)):
      def state(v):
        return "clipping on" if _clips(v) else "clipping off"
      raise ValueError(
          f"{where} was written with grad_clip={saved['grad_clip']!r} "
          f"({state(saved['grad_clip'])}), this run has grad_clip="
          f"{self._tcfg.grad_clip!r} ({state(self._tcfg.grad_clip)}): the "
          f"optimizer states differ; resume with clipping "
          f"{'on' if _clips(saved['grad_clip']) else 'off'} or use another "
          f"workdir")

  def restore(self, like: TrainState,
              step: int | None = None) -> TrainState | None:
    """The state at `step` (default newest), or None without checkpoints.

    Raises:
      ValueError: the checkpoint was written for another model config or
        with an optimizer state of another structure (see `check`).
    """
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    self.check(step)
    # Restore onto `like`'s shardings: the arrays then match the ones the
    # step was compiled for (no second compile after a resume).
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None)),
        _as_dict(like))
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
    except ValueError as e:
      if "tree structures do not match" not in str(e):
        raise
      saved = self.read_config(step).get("train_config") or {}
      now = dataclasses.asdict(self._tcfg)
      diffs = [f"{k}: checkpoint {saved[k]!r}, this run {now[k]!r}"
               for k in sorted(saved) if k in now and saved[k] != now[k]]
      raise ValueError(
          f"checkpoint {self.directory} (step {step}): its state does not "
          f"fit this run's (train config differences: "
          f"{'; '.join(diffs) or 'none'}); orbax: {e}") from e
    d = out["state"]
    restored = TrainState(step=d["step"], params=d["params"],
                          opt_state=d["opt_state"])
    # Same pytree classes as `like` (orbax may return plain containers).
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(like),
        jax.tree_util.tree_leaves(restored))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _check_steps(step: int, tcfg: TrainConfig, directory: str) -> None:
  if step > tcfg.num_steps:
    raise ValueError(
        f"TrainConfig.num_steps: expected >= {step}, the step of the newest "
        f"checkpoint in {directory}, found {tcfg.num_steps} (the run is "
        f"already past its end; raise num_steps to train on, or use "
        f"another workdir)")


def check_resume(workdir: str, cfg: QwenConfig,
                 tcfg: TrainConfig) -> int | None:
  """Checks that `train` can resume in `workdir`, reading only the newest
  checkpoint's JSON record and writing nothing.

  Returns:
    The step `train` would resume from; None when it would start afresh
    (no checkpoint, or `tcfg.save_checkpoints` off).

  Raises:
    ValueError: as `train` would, before any array is read: another model
      config, gradient clipping switched on or off (`Checkpointer.check`),
      or `tcfg.num_steps` below the checkpoint's step.
  """
  if not tcfg.save_checkpoints:
    return None
  if not os.path.isdir(os.path.join(os.path.abspath(workdir),
                                    "checkpoints")):
    return None
  ckpt = Checkpointer(workdir, cfg, tcfg)
  try:
    step = ckpt.latest_step()
    if step is not None:
      ckpt.check(step)
      _check_steps(step, tcfg, ckpt.directory)
  finally:
    ckpt.close()
  return step


def _as_dict(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params,
          "opt_state": state.opt_state}


def export_hf(path: str, cfg: QwenConfig, params: PyTree,
              dtype: Any = None) -> None:
  """Writes trained params as a transformers checkpoint folder."""
  save_hf_checkpoint(path, cfg, jax.device_get(params), dtype=dtype)


# ---------------------------------------------------------------- progress
def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 60}:{s % 60:02d}"


class ProgressBar:
  """A dependency-free progress bar on stderr.

  On a terminal it redraws one line; elsewhere (logs, CI) it prints a line
  roughly every 10% so the output stays readable.
  """

  def __init__(self, total: int, desc: str = "", initial: int = 0,
               stream=None, width: int = 24, enabled: bool = True):
    self.total, self.desc, self.n = max(total, 1), desc, initial
    self.stream = stream or sys.stderr
    self.width, self.enabled = width, enabled
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._t0 = time.time()
    self._n0 = initial
    self._last_print = -1.0
    self._last_decile = -1
    self._postfix = ""
    self._drawn: tuple[int, str] | None = None

  def update(self, n: int, postfix: str = "", force: bool = False) -> None:
    self.n, self._postfix = n, postfix or self._postfix
    if not self.enabled:
      return
    now = time.time()
    decile = int(10 * n / self.total)
    if self.tty:
      if not force and now - self._last_print < 0.2 and n < self.total:
        return
    elif not force and decile == self._last_decile:
      return
    self._last_print, self._last_decile = now, decile
    self._draw(now)

  def _draw(self, now: float) -> None:
    frac = min(self.n / self.total, 1.0)
    fill = int(round(frac * self.width))
    bar = "#" * fill + "." * (self.width - fill)
    elapsed = now - self._t0
    done = self.n - self._n0
    eta = elapsed / done * (self.total - self.n) if done > 0 else 0.0
    line = (f"{self.desc} [{bar}] {self.n}/{self.total} "
            f"{_fmt_time(elapsed)}<{_fmt_time(eta)} {self._postfix}")
    if self.tty:
      self.stream.write("\r" + line[:160].ljust(80))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()
    self._drawn = (self.n, self._postfix)

  def close(self) -> None:
    if self.enabled:
      # Off a terminal, a line already printed for this state is not
      # repeated.
      if self.tty or self._drawn != (self.n, self._postfix):
        self._draw(time.time())
      if self.tty:
        self.stream.write("\n")
      self.stream.flush()


# -------------------------------------------------------------------- loop
@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    state: the final TrainState.
    cfg: the model config used (with the compute dtype).
    losses: {step: loss} for every step this call ran (step = the state's
      step before the update).
    history: logged metric rows (dicts).
    compile_s: seconds spent compiling the step.
    train_s: seconds in the loop after compilation.
    tokens_per_s: mean training throughput (all tokens, after compile).
    resumed_from: checkpoint step the run started from, or None.
  """
  state: TrainState
  cfg: QwenConfig
  losses: dict[int, float]
  history: list[dict[str, float]]
  compile_s: float
  train_s: float
  tokens_per_s: float
  resumed_from: int | None


_CSV_FIELDS = ("step", "loss", "grad_norm", "learning_rate", "tokens_per_s",
               "mfu", "elapsed_s")


def _rewrite_csv(path: str, keep_below: int) -> None:
  """Drops rows at or after `keep_below` (a resumed run redoes them)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [r for r in csv.DictReader(f) if int(r["step"]) < keep_below]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, _CSV_FIELDS)
    w.writeheader()
    w.writerows(rows)


def train(cfg: QwenConfig, tcfg: TrainConfig, batch_fn: BatchFn,
          workdir: str | None = None, *, params: PyTree | None = None,
          progress: bool | str = True,
          callback: Callable[[int, dict[str, float]], None] | None = None,
          ) -> TrainResult:
  """Trains for `tcfg.num_steps` steps (resuming from `workdir` if it holds
  checkpoints).

  A resumed run whose newest checkpoint is at `tcfg.num_steps` trains no
  more and returns that state; one whose checkpoint is past
  `tcfg.num_steps` is refused (its state would not be the run asked for).

  Args:
    cfg: model config (the compute dtype is set from tcfg).
    tcfg: train config.
    batch_fn: step -> batch dict ("inputs", "targets", optional
      "loss_mask", "segment_ids"), a pure function of the step so that a
      resumed run sees the same data.
    workdir: where checkpoints and metrics.csv go; None keeps nothing.
    params: initial parameters (default random from tcfg.seed); copied,
      the caller's arrays are not donated.
    progress: show a progress bar (a string sets its label).
    callback: called after every step with (step, {"loss": ...}) once the
      loss is fetched (at log points); raising stops the run without saving
      (the tests use this to simulate a crash).

  Returns:
    A TrainResult.

  Raises:
    ValueError: a batch of the wrong keys, shape (other than
      [tcfg.batch_size, tcfg.seq_len]) or dtype, or with token ids outside
      [0, vocab_size) (checked on the host for NumPy batches, before each
      step); a checkpoint in `workdir` that this run cannot resume (see
      `check_resume`).
  """
  cfg = model_config_for_training(cfg, tcfg)
  if params is not None:
    # The step donates the state: train on a copy so that the caller's
    # arrays stay valid.
    params = jax.tree_util.tree_map(jnp.copy, params)
  state = init_state(cfg, tcfg, params)
  ckpt = None
  resumed_from = None
  csv_path = None
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    if tcfg.save_checkpoints:
      ckpt = Checkpointer(workdir, cfg, tcfg)
      try:
        latest = ckpt.latest_step()
        if latest is not None:  # refused before any array is read
          ckpt.check(latest)
          _check_steps(latest, tcfg, ckpt.directory)
        restored = ckpt.restore(state, latest)
        if restored is not None:
          state = restored
          resumed_from = int(jax.device_get(state.step))
      except BaseException:
        ckpt.close()
        raise
    csv_path = os.path.join(workdir, "metrics.csv")
    _rewrite_csv(csv_path, resumed_from or 0)
  # One placement for fresh and restored states (orbax returns committed
  # arrays, a fresh init does not): the step then lowers to one program, and
  # a resumed run in the same process reuses its compilation.
  devices = {d for x in jax.tree_util.tree_leaves(state)
             for d in getattr(x, "devices", set)()}
  if len(devices) == 1:  # a sharded state keeps its placement
    state = jax.device_put(state, devices.pop())
  start = int(jax.device_get(state.step))
  step_fn = make_train_step(cfg, tcfg)
  expected = (tcfg.batch_size, tcfg.seq_len)

  def get_batch(step: int) -> Batch:
    batch = batch_fn(step)
    check_batch(batch, cfg.vocab_size)
    found = tuple(np.shape(batch["inputs"]))
    if found != expected:
      raise ValueError(
          f"batch_fn({step}): expected inputs of shape (TrainConfig."
          f"batch_size, TrainConfig.seq_len) = {expected}, found {found}")
    return batch

  try:
    first = get_batch(start if start < tcfg.num_steps else 0)
  except BaseException:
    if ckpt is not None:
      ckpt.close()
    raise
  t0 = time.time()
  compiled = step_fn.lower(state, first).compile()
  compile_s = time.time() - t0
  tokens_per_step = tcfg.batch_size * tcfg.seq_len
  fpt = flops_per_token(cfg, tcfg.seq_len)
  peak = tcfg.peak_flops or device_peak_flops() or 0.0
  peak *= jax.device_count()
  label = progress if isinstance(progress, str) else "train"
  bar = ProgressBar(tcfg.num_steps, label, start, enabled=bool(progress))
  losses: dict[int, float] = {}
  history: list[dict[str, float]] = []
  pending: list[tuple[int, dict[str, Array]]] = []
  csv_file = None
  writer = None
  if csv_path is not None:
    new_file = not os.path.exists(csv_path)
    csv_file = open(csv_path, "a", newline="")
    writer = csv.DictWriter(csv_file, _CSV_FIELDS)
    if new_file:
      writer.writeheader()
  t_loop = time.time()
  t_last, steps_since = t_loop, 0
  try:
    for step in range(start, tcfg.num_steps):
      batch = first if step == start else get_batch(step)
      state, metrics = compiled(state, batch)
      pending.append((step, metrics))
      steps_since += 1
      last = step == tcfg.num_steps - 1
      save_now = (ckpt is not None and tcfg.checkpoint_every > 0
                  and (step + 1) % tcfg.checkpoint_every == 0)
      if (step + 1) % tcfg.log_every == 0 or last or save_now:
        fetched = jax.device_get(pending)
        now = time.time()
        tps = steps_since * tokens_per_step / max(now - t_last, 1e-9)
        t_last, steps_since = now, 0
        for s, m in fetched:
          losses[s] = float(m["loss"])
          if callback is not None:
            callback(s, {k: float(v) for k, v in m.items()})
        pending = []
        s, m = fetched[-1]
        row = {"step": s, "loss": float(m["loss"]),
               "grad_norm": float(m["grad_norm"]),
               "learning_rate": float(m["learning_rate"]),
               "tokens_per_s": tps,
               "mfu": fpt * tps / peak if peak else float("nan"),
               "elapsed_s": now - t_loop}
        history.append(row)
        if writer is not None:
          writer.writerow(row)
          csv_file.flush()
        bar.update(step + 1, f"loss {row['loss']:.3f} "
                   f"{tps / 1e3:.1f}k tok/s")
      if save_now:
        ckpt.save(state)
    jax.block_until_ready(state)
    train_s = time.time() - t_loop
    if ckpt is not None:
      ckpt.save(state)
      ckpt.wait()
  finally:
    bar.close()
    if csv_file is not None:
      csv_file.close()
    if ckpt is not None:
      ckpt.close()
  ran = tcfg.num_steps - start
  tps = ran * tokens_per_step / train_s if ran > 0 and train_s > 0 else 0.0
  return TrainResult(state=state, cfg=cfg, losses=losses, history=history,
                     compile_s=compile_s, train_s=train_s,
                     tokens_per_s=tps, resumed_from=resumed_from)


def evaluate(cfg: QwenConfig, params: PyTree,
             batches: Sequence[Batch], chunk_size: int = 0,
             eval_step: Callable | None = None) -> dict[str, float]:
  """Mean loss and accuracy over masked tokens of several batches.

  Raises:
    ValueError: no batch, or a bad batch (`check_batch`, ids checked on the
      host for NumPy batches).
  """
  batches = list(batches)
  if not batches:
    raise ValueError("batches: expected at least one batch, found none")
  eval_step = eval_step or make_eval_step(cfg, chunk_size)
  totals = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
  for batch in batches:
    check_batch(batch, cfg.vocab_size)  # ids on the host, before the step
    out = jax.device_get(eval_step(params, batch))
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["tokens"], 1.0)
  return {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n,
          "tokens": totals["tokens"]}


def param_count(params: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


__all__ = [
    "Checkpointer", "ProgressBar", "TrainConfig", "TrainResult", "TrainState",
    "check_batch", "check_resume", "device_peak_flops", "evaluate",
    "export_hf", "flops_per_token", "init_params", "init_state",
    "learning_rate_schedule", "loss_and_stats",
    "make_eval_step", "make_optimizer", "make_train_step",
    "model_config_for_training", "param_count", "train",
]
