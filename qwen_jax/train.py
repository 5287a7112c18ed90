"""The training loop: steps, metrics, progress, checkpoints on schedule.

Importable by scripts and notebooks (experiments/train.py and
experiments/compare_ratios.py are thin absl front ends):

  cfg = QwenConfig.from_preset("tiny")
  tcfg = TrainConfig(batch_size=8, seq_len=64, num_steps=100)
  text = data.TextData(tcfg.seq_len)
  result = train(cfg, tcfg, lambda step: text.batch(8, seed=0, step=step),
                 workdir="/tmp/run")
  result.state.params, result.losses

`train` runs the compiled step of `qwen_jax.train_step` (optimizer, loss,
MFU estimate) for `TrainConfig.num_steps` steps, fetching metrics every
`log_every` steps into `TrainResult.history`, `<workdir>/metrics.csv` and a
progress bar; it resumes from and saves checkpoints through
`qwen_jax.train_checkpoint`. `evaluate` averages the loss and accuracy of
held-out batches.

Steps are counted as the progress bar and the checkpoints count them: row
`step` of metrics.csv is the state after that many updates (the loss of the
update's batch, the learning rate it applied). Tokens/s and MFU measure the
steps only: the time of checkpoint saves, callbacks, evaluations and the
CSV and progress output between them is left out.

Options for fine-tuning (`experiments/finetune.py` uses them): `frozen=` and
`lora=` train low-rank adapters over frozen base weights (the state, and so
the checkpoints, hold the adapters alone), `mesh=` shards the step over a
device mesh, and `evaluator=` runs every `eval_every` steps on the state
(held-out loss, samples).

With a device mesh (`mesh=`, `qwen_jax.sharding.make_mesh`), the step runs
sharded: the state is placed with `train_step.state_shardings`, and each
step's batch becomes global arrays, rows over the mesh's data and fsdp axes
and tokens over seq, each process transferring only the part its devices
hold (`qwen_jax.distributed.global_batch`); a batch function that builds
rows alone (`qwen_jax.data.RowBatches`, as the MQAR and text tasks of
experiments/train.py are) builds only those rows. The mesh may span several
processes (`qwen_jax.distributed.initialize`): every process then runs
`train` with the same arguments, orbax saves and restores each checkpoint
with all of them together, and only process 0 writes metrics.csv, the
history and the progress bar.

The workdir is checked before anything is written (`train_checkpoint.
plan_run`): a folder that is not a training workdir, a metrics.csv this
workdir's run did not write, or a resume with other settings than the
recorded ones (unless allowed by name) raises a ValueError. Each start and
resume is recorded in `<workdir>/run_history.json`; see
`qwen_jax.train_workdir` for the files and `qwen_jax.train_checkpoint` for
what a resumed run may change and the learning-rate schedule then.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import distributed
from qwen_jax import sharding
from qwen_jax import train_checkpoint
from qwen_jax import train_workdir
from qwen_jax.array_typing import Array, PyTree
from qwen_jax.config import QwenConfig
from qwen_jax.data import check_batch
from qwen_jax.data import MEDIA_KEYS
from qwen_jax.data import RowBatches
from qwen_jax.data import with_static_grids
from qwen_jax.train_step import Batch
from qwen_jax.train_step import BatchFn
from qwen_jax.train_step import device_peak_flops
from qwen_jax.train_step import flops_per_token
from qwen_jax.train_step import init_state
from qwen_jax.train_step import make_eval_step
from qwen_jax.train_step import make_train_step
from qwen_jax.train_step import model_config_for_training
from qwen_jax.train_step import state_shardings
from qwen_jax.train_step import TrainConfig
from qwen_jax.train_step import TrainState


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
    losses: {step: loss} for every step this call ran (keyed by the
      batch's step, `batch_fn(step)`: the state's step before the update).
    history: logged metric rows (dicts; the rows of metrics.csv, `step` the
      updates done).
    compile_s: seconds spent compiling the step.
    train_s: seconds spent in the steps after compilation (checkpoint
      saves and the host work between log points left out).
    tokens_per_s: mean training throughput (all tokens, over train_s).
    resumed_from: checkpoint step the run started from, or None.
    checkpoint_s: seconds spent saving checkpoints.
  """
  state: TrainState
  cfg: QwenConfig
  losses: dict[int, float]
  history: list[dict[str, float]]
  compile_s: float
  train_s: float
  tokens_per_s: float
  resumed_from: int | None
  checkpoint_s: float = 0.0

  def summary(self, num_steps: int, peak_bytes: int | None
              ) -> dict[str, Any]:
    """The run's "train" entry of a script's summary.json: steps, first
    and last loss, timings, `peak_bytes` (device memory, where the device
    reports it) and this process's device kind."""
    losses = [self.losses[s] for s in sorted(self.losses)]
    return {"num_steps": num_steps, "resumed_from": self.resumed_from,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "compile_s": self.compile_s, "train_s": self.train_s,
            "tokens_per_s": self.tokens_per_s,
            "peak_memory_bytes": peak_bytes,
            "device": jax.local_devices()[0].device_kind}


def summary_lines(train: Mapping[str, Any], step: int,
                  compile_time: bool = False) -> list[str]:
  """Human-readable lines of a `TrainResult.summary` entry (`step`: the
  state's step), with the compile time when `compile_time`."""
  lines = []
  if train["resumed_from"] is not None:
    lines.append(f"resumed: from step {train['resumed_from']}")
  if train["final_loss"] is not None:
    lines.append(
        f"train:   step {step}/{train['num_steps']}, loss "
        f"{train['first_loss']:.4f} -> {train['final_loss']:.4f}, "
        f"{train['tokens_per_s']:,.0f} tokens/s on {train['device']}"
        + (f" (compile {train['compile_s']:.1f} s)" if compile_time
           else ""))
  if train.get("peak_memory_bytes"):
    lines.append(f"memory:  peak {train['peak_memory_bytes'] / 2**30:.2f} "
                 f"GiB on the device")
  return lines


def _open_csv(path: str, moe: bool) -> tuple[Any, csv.DictWriter]:
  """(file, writer) appending rows to metrics.csv (checked to be this
  run's by `train_checkpoint.plan_run`; `moe`: with the routing columns);
  the header goes into a new file."""
  new_file = not os.path.exists(path)
  f = open(path, "a", newline="")  # pylint: disable=consider-using-with
  writer = csv.DictWriter(f, train_workdir.metrics_fields(moe),
                          lineterminator="\n")
  if new_file:
    writer.writeheader()
  return f, writer


def train(cfg: QwenConfig, tcfg: TrainConfig, batch_fn: BatchFn,
          workdir: str | None = None, *, params: PyTree | None = None,
          progress: bool | str = True,
          callback: Callable[[int, dict[str, float]], None] | None = None,
          settings: Mapping[str, Mapping[str, Any]] | None = None,
          allow_changes: Sequence[str] = (),
          other_files: Sequence[str] = (),
          frozen: PyTree | None = None,
          lora: Any = None,
          mesh: jax.sharding.Mesh | None = None,
          evaluator: Callable[[int, TrainState], None] | None = None,
          eval_every: int = 0,
          ) -> TrainResult:
  """Trains for `tcfg.num_steps` steps (resuming from `workdir` if it holds
  checkpoints).

  A resumed run whose newest checkpoint is at `tcfg.num_steps` trains no
  more and returns that state; one whose checkpoint is past
  `tcfg.num_steps` is refused (its state would not be the run asked for).
  A resumed run must have the settings recorded for the run it continues
  (model, train and `settings`), except those named in `allow_changes`;
  from the resume step s on, step t then uses the new settings' learning
  rate at t (`train_checkpoint` describes the rules).

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
      loss is fetched (at log points; step as in `batch_fn(step)`); raising
      stops the run without saving (the tests use this to simulate a
      crash).
    settings: the run's other config sections (e.g. {"data": {...},
      "eval": {...}}), recorded in run_history.json and compared on a
      resume.
    allow_changes: settings ("train.learning_rate") or sections ("data")
      that a resume may change from the recorded ones; the changes are
      recorded in run_history.json.
    other_files: entries of `workdir` that belong to the caller (e.g. an
      export folder), accepted beside the run's own files.
    frozen: with `lora`, the frozen base weights (not copied, not
      donated); `params` are then the adapters (`qwen_jax.lora`).
    lora: a `qwen_jax.lora.LoraSpec`: train adapters over `frozen`.
    mesh: run the step sharded over this device mesh (one or several
      processes; see the module docstring). `batch_fn(step)` then returns
      the step's whole batch on every process, each keeping its part;
      a `data.RowBatches` builds only the rows each process holds;
      `frozen` is placed with the weights' shardings.
    evaluator: called as evaluator(steps_done, state) every `eval_every`
      steps and after the last step (outside the timed steps); it must not
      change the state.
    eval_every: steps between evaluator calls (0: only after the last).

  Returns:
    A TrainResult.

  Raises:
    ValueError: a batch of the wrong keys, shape (other than
      [tcfg.batch_size, tcfg.seq_len]) or dtype, or with token ids outside
      [0, vocab_size) (checked on the host for NumPy batches, before each
      step); a workdir that is not a training workdir, or a checkpoint or
      settings this run cannot resume (`train_checkpoint.plan_run`), before
      anything is written.
  """
  cfg = model_config_for_training(cfg, tcfg)
  if (lora is None) != (frozen is None):
    raise ValueError("lora and frozen: expected both (adapters over frozen "
                     "base weights) or neither, found one")
  if lora is not None and params is None:
    raise ValueError("params: expected the adapters to train with lora, "
                     "found None")
  if params is not None:
    # The step donates the state: train on a copy so that the caller's
    # arrays stay valid.
    params = jax.tree_util.tree_map(jnp.copy, params)
  plan = None
  if workdir is not None:
    # Every check before anything is written or compiled.
    plan = train_checkpoint.plan_run(
        workdir, cfg, tcfg, settings=settings, allow_changes=allow_changes,
        other_files=other_files)
  state = init_state(cfg, tcfg, params)
  if mesh is not None:
    # Before a restore, which then reads each shard onto its device.
    state = distributed.put_global(state,
                                   state_shardings(cfg, tcfg, mesh, lora))
    if frozen is not None:
      frozen = distributed.put_global(frozen,
                                      sharding.param_shardings(cfg, mesh))
  ckpt = None
  resumed_from = None
  csv_path = None
  if plan is not None:
    if tcfg.save_checkpoints:
      ckpt, state, resumed_from = train_checkpoint.resume(
          workdir, cfg, tcfg, state)
    if resumed_from != plan.step:  # the folder changed since the check
      plan = train_checkpoint.plan_run(
          workdir, cfg, tcfg, settings=settings,
          allow_changes=allow_changes, other_files=other_files)
    # Every process has read the workdir before process 0 writes to it.
    distributed.barrier("qwen_jax.train: workdir checked")
    try:
      if distributed.is_primary():
        train_checkpoint.begin_run(plan)
    except BaseException:
      if ckpt is not None:
        ckpt.close()
      raise
    if distributed.is_primary():
      csv_path = os.path.join(workdir, train_workdir.METRICS_FILE)
  # One placement for fresh and restored states (orbax returns committed
  # arrays, a fresh init does not): the step then lowers to one program, and
  # a resumed run in the same process reuses its compilation.
  devices = {d for x in jax.tree_util.tree_leaves(state)
             for d in getattr(x, "devices", set)()}
  if len(devices) == 1 and mesh is None:  # a sharded state keeps its own
    device = devices.pop()
    state = jax.device_put(state, device)
    if frozen is not None:
      frozen = jax.device_put(frozen, device)
  start = int(jax.device_get(state.step))
  step_fn = make_train_step(cfg, tcfg, lora=lora, mesh=mesh)
  extra = () if frozen is None else (frozen,)
  expected = (tcfg.batch_size, tcfg.seq_len)

  # A batch function that builds rows alone (`data.RowBatches`), on a mesh:
  # each process builds only the rows (and keeps the tokens) its devices
  # hold, and the global batch is assembled from those parts.
  part = None
  if mesh is not None and isinstance(batch_fn, RowBatches):
    part = distributed.process_slices(
        sharding.batch_sharding(mesh, expected), expected)

  def get_part(step: int) -> Batch:
    rows, tokens = part
    batch = batch_fn.rows(step, rows)
    check_batch(batch, cfg.vocab_size)
    want = (rows.stop - rows.start, tcfg.seq_len)
    found = tuple(np.shape(batch["inputs"]))
    if found != want:
      raise ValueError(
          f"batch_fn.rows({step}, {rows}): expected inputs of shape {want} "
          f"(rows {rows.start} to {rows.stop - 1} of a batch of "
          f"TrainConfig.batch_size, TrainConfig.seq_len = {expected}), "
          f"found {found}")
    media = sorted(k for k in MEDIA_KEYS if batch.get(k) is not None)
    if media:
      raise ValueError(f"batch_fn.rows({step}, {rows}): expected no images "
                       f"or videos (a RowBatches builds token rows), found "
                       f"{media}")
    batch = {k: v[:, tokens] for k, v in batch.items() if v is not None}
    return distributed.global_batch(batch, mesh, local=True,
                                    global_shape=expected)

  def get_batch(step: int) -> Batch:
    if part is not None:
      return get_part(step)
    batch = batch_fn(step)
    check_batch(batch, cfg.vocab_size)
    batch = with_static_grids(batch)  # images' grids: static for the step
    found = tuple(np.shape(batch["inputs"]))
    if found != expected:
      raise ValueError(
          f"batch_fn({step}): expected inputs of shape (TrainConfig."
          f"batch_size, TrainConfig.seq_len) = {expected}, found {found}")
    if mesh is not None:
      batch = distributed.global_batch(batch, mesh)
    return batch

  try:
    first = get_batch(start if start < tcfg.num_steps else 0)
  except BaseException:
    if ckpt is not None:
      ckpt.close()
    raise
  t0 = time.time()
  compiled = step_fn.lower(state, first, *extra).compile()
  compile_s = time.time() - t0
  tokens_per_step = tcfg.batch_size * tcfg.seq_len
  fpt = flops_per_token(cfg, tcfg.seq_len)
  peak = tcfg.peak_flops or device_peak_flops() or 0.0
  peak *= jax.device_count()
  label = progress if isinstance(progress, str) else "train"
  bar = ProgressBar(tcfg.num_steps, label, start,
                    enabled=bool(progress) and distributed.is_primary())
  losses: dict[int, float] = {}
  history: list[dict[str, float]] = []
  pending: list[tuple[int, dict[str, Array]]] = []
  csv_file, writer = (None, None) if csv_path is None else _open_csv(
      csv_path, cfg.is_moe)
  t_loop = time.time()
  # Step time is measured from the end of the host work at one log point
  # to the fetch at the next: saves, callbacks and output are left out.
  t_last, steps_since, train_s, checkpoint_s = t_loop, 0, 0.0, 0.0
  try:
    for step in range(start, tcfg.num_steps):
      batch = first if step == start else get_batch(step)
      state, metrics = compiled(state, batch, *extra)
      pending.append((step, metrics))
      steps_since += 1
      last = step == tcfg.num_steps - 1
      save_now = (ckpt is not None and tcfg.checkpoint_every > 0
                  and (step + 1) % tcfg.checkpoint_every == 0)
      eval_now = evaluator is not None and (
          last or (eval_every > 0 and (step + 1) % eval_every == 0))
      if (step + 1) % tcfg.log_every == 0 or last or save_now or eval_now:
        fetched = jax.device_get(pending)
        now = time.time()
        interval = max(now - t_last, 1e-9)
        train_s += interval
        tps = steps_since * tokens_per_step / interval
        steps_since = 0
        for s, m in fetched:
          losses[s] = float(m["loss"])
          if callback is not None:
            callback(s, {k: float(v) for k, v in m.items()})
        pending = []
        _, m = fetched[-1]
        row = {"step": step + 1, "loss": float(m["loss"]),
               "grad_norm": float(m["grad_norm"]),
               "learning_rate": float(m["learning_rate"]),
               "tokens_per_s": tps,
               "mfu": fpt * tps / peak if peak else float("nan"),
               "elapsed_s": now - t_loop}
        if cfg.is_moe:
          row.update(train_workdir.routing_values(m))
        history.append(row)
        if writer is not None:
          writer.writerow(row)
          csv_file.flush()
        bar.update(step + 1, f"loss {row['loss']:.3f} "
                   f"{tps / 1e3:.1f}k tok/s")
        if save_now:
          t_save = time.time()
          ckpt.save(state)
          checkpoint_s += time.time() - t_save
        if eval_now:
          evaluator(step + 1, state)
        t_last = time.time()
    jax.block_until_ready(state)
    if ckpt is not None:
      t_save = time.time()
      ckpt.save(state)
      ckpt.wait()
      checkpoint_s += time.time() - t_save
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
                     tokens_per_s=tps, resumed_from=resumed_from,
                     checkpoint_s=checkpoint_s)


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


__all__ = ["ProgressBar", "TrainConfig", "TrainResult", "evaluate", "train"]
