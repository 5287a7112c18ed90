"""Checkpoints of a training run: save, resume, and the resume checks.

Orbax checkpoints of the `TrainState` every N steps under
`<workdir>/checkpoints`, the last K kept, each with a JSON record of the
model and train configs. A restarted run resumes from the newest one and
reproduces the losses of an uninterrupted run (batches are pure functions
of the step). A checkpoint written for a different model config, or with
gradient clipping switched on or off, is refused with a ValueError naming
the fields, from the JSON record alone, before any array is read.
`export_hf` writes the trained weights with `save_hf_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax

from qwen_jax.array_typing import PyTree
from qwen_jax.checkpoint import save_hf_checkpoint
from qwen_jax.config import IMPLEMENTATION_FIELDS, QwenConfig
from qwen_jax.train_step import TrainConfig, TrainState, clipping_on

# Implementation fields that also fix the structure of the saved train
# state: scan_layers stacks the layers' parameters (and their optimizer
# moments) on a leading axis or not, and param_dtype is the dtype of those
# arrays. A checkpoint resumes only under the values it was written with.
STATE_LAYOUT_FIELDS = ("param_dtype", "scan_layers")
# The QwenConfig fields a checkpoint may be resumed under other values of.
RESUMABLE_FIELDS = tuple(f for f in IMPLEMENTATION_FIELDS
                         if f not in STATE_LAYOUT_FIELDS)


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
    if "grad_clip" in saved and (clipping_on(saved["grad_clip"])
                                 != clipping_on(self._tcfg.grad_clip)):
      def state(v):
        return "clipping on" if clipping_on(v) else "clipping off"
      raise ValueError(
          f"{where} was written with grad_clip={saved['grad_clip']!r} "
          f"({state(saved['grad_clip'])}), this run has grad_clip="
          f"{self._tcfg.grad_clip!r} ({state(self._tcfg.grad_clip)}): the "
          f"optimizer states differ; resume with clipping "
          f"{'on' if clipping_on(saved['grad_clip']) else 'off'} or use another "
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


def _check_latest(ckpt: Checkpointer, tcfg: TrainConfig) -> int | None:
  """The newest checkpoint's step, after checking from its JSON record alone
  that this run can resume it (`Checkpointer.check`, and a step not past
  `tcfg.num_steps`); None without checkpoints."""
  step = ckpt.latest_step()
  if step is not None:
    ckpt.check(step)
    if step > tcfg.num_steps:
      raise ValueError(
          f"TrainConfig.num_steps: expected >= {step}, the step of the "
          f"newest checkpoint in {ckpt.directory}, found {tcfg.num_steps} "
          f"(the run is already past its end; raise num_steps to train on, "
          f"or use another workdir)")
  return step


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
    return _check_latest(ckpt, tcfg)
  finally:
    ckpt.close()


def resume(workdir: str, cfg: QwenConfig, tcfg: TrainConfig,
           state: TrainState
           ) -> tuple[Checkpointer, TrainState, int | None]:
  """Opens the checkpoints of `workdir` and restores the newest, if any.

  Args:
    workdir: the run's folder (checkpoints under `<workdir>/checkpoints`).
    cfg: the model config of this run.
    tcfg: the train config of this run.
    state: a fresh state: the structure and shardings to restore onto, and
      the state returned when there is no checkpoint.

  Returns:
    (the Checkpointer, open for the run's saves; the restored state, or
    `state`; the step resumed from, or None).

  Raises:
    ValueError: as `check_resume`, before any array is read (the
      Checkpointer is closed then).
  """
  ckpt = Checkpointer(workdir, cfg, tcfg)
  try:
    latest = _check_latest(ckpt, tcfg)
    restored = ckpt.restore(state, latest)
    if restored is None:
      return ckpt, state, None
    return ckpt, restored, int(jax.device_get(restored.step))
  except BaseException:
    ckpt.close()
    raise


def _as_dict(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params,
          "opt_state": state.opt_state}


def export_hf(path: str, cfg: QwenConfig, params: PyTree,
              dtype: Any = None, tokenizer_from: str | None = None) -> None:
  """Writes trained params as a transformers checkpoint folder, with the
  tokenizer files of `tokenizer_from` (see `save_hf_checkpoint`)."""
  save_hf_checkpoint(path, cfg, jax.device_get(params), dtype=dtype,
                     tokenizer_from=tokenizer_from)
