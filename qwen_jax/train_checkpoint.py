"""Checkpoints of a training run: save, resume, and the resume checks.

Orbax checkpoints of the `TrainState` every N steps under
`<workdir>/checkpoints`, the last K kept, each with a JSON record of the
model and train configs. A restarted run resumes from the newest one and
reproduces the losses of an uninterrupted run (batches are pure functions
of the step). A checkpoint written for a different model config, or with
gradient clipping switched on or off, is refused with a ValueError naming
the fields, from the JSON record alone, before any array is read.

`plan_run` checks, writing nothing, everything a run in a workdir needs:
the workdir is ours (`train_workdir.scan`), its checkpoint fits, and a
resumed run has the settings recorded for the run it continues (the last
entry of run_history.json: the whole config, model, train and the caller's
other sections such as data and eval). A changed setting is refused,
listed with its old and new values, unless the caller allows it by name
(`allow_changes`); `begin_run` then records the start or resume, with its
changes, in run_history.json. Three kinds of setting:

  * free (no need to allow them; recorded): how the model is computed
    (`RESUMABLE_FIELDS`: compute dtype, remat, kernels, chunk sizes) and
    how the loop logs and saves (`FREE_TRAIN_FIELDS`);
  * allowed by name: every other train field and every field of the other
    sections (`allow_changes=["train.learning_rate", "data"]`; a section's
    name allows all its fields);
  * fixed: the model's architecture and `STATE_LAYOUT_FIELDS`, which fix
    the checkpoint's arrays (and gradient clipping switched on or off,
    which fixes the optimizer state's): refused by name, whatever is
    allowed.

The learning-rate schedule of a resumed run whose settings changed is
piecewise: the steps before the resume step s kept the rates they had, and
from s on, step t (the update from t to t + 1 steps) uses the new settings'
schedule at t, `learning_rate_schedule(new)(t)`, the rate an uninterrupted
run with the new settings would use there. It depends only on the step and
the settings in force, so replaying the history (each entry's config from
its step to the next entry's) reproduces the run. Changing num_steps moves
the cosine's end: the rate can jump at s (metrics.csv's learning_rate
column shows it).

`export_hf` writes the trained weights with `save_hf_checkpoint`, and
`check_export` runs that save's checks on a folder without writing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax

from qwen_jax import train_workdir
from qwen_jax.array_typing import PyTree
from qwen_jax.checkpoint import param_shapes
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
# TrainConfig fields a resumed run may change without allowing them: how
# often it logs and saves, orbax's options, the MFU reference, and the
# cross-entropy chunk (which changes the rounding only).
FREE_TRAIN_FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints",
                     "async_checkpointing", "peak_flops", "ce_chunk_size",
                     "save_checkpoints")


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


def check_resume(workdir: str, cfg: QwenConfig, tcfg: TrainConfig, *,
                 settings: Mapping[str, Mapping[str, Any]] | None = None,
                 allow_changes: Sequence[str] = (),
                 other_files: Sequence[str] = ()) -> int | None:
  """Checks that `train` can run in `workdir`, reading only the newest
  checkpoint's JSON record and the workdir's small files, writing nothing.

  Args: as `plan_run`.

  Returns:
    The step `train` would resume from; None when it would start afresh
    (no checkpoint, or `tcfg.save_checkpoints` off).

  Raises:
    ValueError: as `train` would, before any array is read (see
      `plan_run`).
  """
  return plan_run(workdir, cfg, tcfg, settings=settings,
                  allow_changes=allow_changes, other_files=other_files).step


# ------------------------------------------------------ settings of a run
@dataclasses.dataclass(frozen=True)
class Change:
  """A setting whose value differs from the recorded run's.

  Attributes:
    name: "section.field", e.g. "train.learning_rate".
    old: the recorded value (JSON).
    new: this run's value (JSON).
    kind: "free", "allow" (needs allow_changes) or "fixed".
  """
  name: str
  old: Any
  new: Any
  kind: str

  def __str__(self) -> str:
    return f"{self.name} {self.old!r} -> {self.new!r}"


def setting_kind(name: str) -> str:
  """"free", "allow" or "fixed" for a setting "section.field" (see the
  module docstring)."""
  section, _, field = name.partition(".")
  if section == "model":
    return "free" if field in RESUMABLE_FIELDS else "fixed"
  if section == "train" and field in FREE_TRAIN_FIELDS:
    return "free"
  return "allow"


def run_record(cfg: QwenConfig, tcfg: TrainConfig,
               settings: Mapping[str, Mapping[str, Any]] | None = None,
               ) -> dict[str, Any]:
  """The whole config of a run as JSON: {"model", "train", *settings}.

  Raises:
    ValueError: a settings section named model or train, or one that is
      not a mapping.
  """
  record = {"model": dataclasses.asdict(cfg),
            "train": dataclasses.asdict(tcfg)}
  for name, section in (settings or {}).items():
    if name in record or not hasattr(section, "items"):
      raise ValueError(f"settings[{name!r}]: expected a mapping of a "
                       f"section other than model and train, found "
                       f"{type(section).__name__}")
    record[name] = dict(section.items())
  return train_workdir.json_record(record)


_DEFAULTS = {
    "model": {f.name: f.default for f in dataclasses.fields(QwenConfig)},
    "train": {f.name: f.default for f in dataclasses.fields(TrainConfig)},
}


def settings_changes(recorded: Mapping[str, Any],
                     now: Mapping[str, Any]) -> list[Change]:
  """The settings of `now` (a `run_record`) that differ from `recorded`.

  A model or train field missing from `recorded` (added to the config
  since) counts as its default, one missing from `now` (removed since) is
  not compared; in the other sections a missing field counts as None. A
  section `recorded` lacks (an older record) is not compared.
  """
  order = ["model", "train"] + sorted(set(recorded) - {"model", "train"})
  out = []
  for section in order:
    if section not in recorded:
      continue
    old = dict(recorded[section] or {})
    new = dict(now.get(section) or {})
    defaults = train_workdir.json_record(
        {k: v for k, v in _DEFAULTS.get(section, {}).items()})
    for key in sorted(set(old) | set(new)):
      if section in _DEFAULTS:
        if key not in new:
          continue
        a = old[key] if key in old else defaults.get(key)
      else:
        a = old.get(key)
      b = new.get(key)
      if a != b:
        name = f"{section}.{key}"
        out.append(Change(name, a, b, setting_kind(name)))
  return out


class SettingsChangedError(ValueError):
  """A resumed run's settings differ from the recorded ones, and not all
  of the changes are allowed.

  Attributes:
    workdir, step: the run and the step it resumes from.
    changes: the refused changes.
    recorded_in: where the recorded settings were read.
  """

  def __init__(self, workdir: str, step: int, changes: Sequence[Change],
               recorded_in: str):
    self.workdir, self.step = workdir, step
    self.changes, self.recorded_in = list(changes), recorded_in
    super().__init__(self.message(
        f"pass allow_changes={[c.name for c in self.changes]!r}",
        "workdir"))

  def message(self, how: str, workdir_name: str = "workdir") -> str:
    """The one-line message; `how` says how to allow the changes."""
    return (f"{workdir_name} {self.workdir}: resuming from step "
            f"{self.step} with settings other than the run's ("
            f"{self.recorded_in}): "
            f"{', '.join(str(c) for c in self.changes)}; {how} to accept "
            f"them (they are then recorded in "
            f"{os.path.join(self.workdir, train_workdir.HISTORY_FILE)}), "
            f"or use another {workdir_name}")


def _check_allow_changes(names: Sequence[str],
                         record: Mapping[str, Any]) -> tuple[str, ...]:
  """The names of allow_changes, checked against the settings of `record`.

  Raises:
    ValueError: "allow_changes: ..." for a name that is no setting, or a
      setting that cannot change.
  """
  if isinstance(names, str):
    names = [names]
  known = set(record) | {f"{s}.{k}" for s, v in record.items()
                         for k in (v or {})}
  out = []
  for name in names:
    name = str(name).strip()
    if not name:
      continue
    if name not in known:
      raise ValueError(
          f"allow_changes: expected names of settings such as "
          f"train.learning_rate or a section ({', '.join(record)}), found "
          f"{name!r}")
    if name == "model" or setting_kind(name) == "fixed":
      raise ValueError(
          f"allow_changes: {name} cannot change when a run resumes (the "
          f"model's architecture, param_dtype and scan_layers fix the "
          f"checkpoint's arrays), found it in {list(names)!r}; use another "
          f"workdir")
    out.append(name)
  return tuple(out)


def _is_allowed(name: str, allowed: Sequence[str]) -> bool:
  return name in allowed or name.split(".", 1)[0] in allowed


@dataclasses.dataclass
class RunPlan:
  """What `begin_run` records for a run, as `plan_run` found it.

  Attributes:
    contents: the workdir's files (`train_workdir.scan`).
    step: the checkpoint step resumed from, or None (a start).
    record: the run's whole config (`run_record`).
    changes: settings changed from the recorded run (free and allowed).
    allowed: the names of allow_changes.
  """
  contents: train_workdir.Contents
  step: int | None
  record: dict[str, Any]
  changes: list[Change]
  allowed: tuple[str, ...]


def plan_run(workdir: str, cfg: QwenConfig, tcfg: TrainConfig, *,
             settings: Mapping[str, Mapping[str, Any]] | None = None,
             allow_changes: Sequence[str] = (),
             other_files: Sequence[str] = ()) -> RunPlan:
  """Checks a run in `workdir`, writing nothing; see the module docstring.

  Args:
    workdir: the run's folder (need not exist).
    cfg: the model config of this run (with its compute dtype).
    tcfg: the train config of this run.
    settings: the run's other config sections, e.g. {"data": {...},
      "eval": {...}}: recorded, and compared on a resume.
    allow_changes: settings ("train.learning_rate") or sections ("data")
      that a resumed run may change.
    other_files: entries of `workdir` that belong to the caller.

  Returns:
    The RunPlan.

  Raises:
    ValueError: a workdir that is not ours (`train_workdir.scan`); a bad
      allow_changes name; checkpoints in the workdir while
      `tcfg.save_checkpoints` is off; a checkpoint this run cannot resume
      (`Checkpointer.check`, num_steps below its step); a fixed setting
      changed; SettingsChangedError for changes not allowed.
  """
  record = run_record(cfg, tcfg, settings)
  allowed = _check_allow_changes(allow_changes, record)
  contents = train_workdir.scan(workdir, other_files)
  fields = train_workdir.metrics_fields(cfg.is_moe)
  for name, header in contents.fields.items():
    if header not in (fields, fields + ("resumed_from",)):
      kinds = ("a dense model", "a model with mixture-of-experts layers")
      raise ValueError(
          f"{os.path.join(workdir, name)}: written by a run of "
          f"{kinds[not cfg.is_moe]} (its header), this run trains "
          f"{kinds[cfg.is_moe]}; nothing was written: use another workdir")
  step, saved = None, None
  if contents.checkpoint_steps:
    directory = os.path.join(os.path.abspath(workdir),
                             train_workdir.CHECKPOINTS)
    if not tcfg.save_checkpoints:
      raise ValueError(
          f"TrainConfig.save_checkpoints: expected True in a workdir with "
          f"checkpoints (newest step {contents.checkpoint_steps[-1]} in "
          f"{directory}), found False: the run would start again beside "
          f"them; use another workdir")
    ckpt = Checkpointer(workdir, cfg, tcfg)
    try:
      step = _check_latest(ckpt, tcfg)
      saved = None if step is None else ckpt.read_config(step)
    finally:
      ckpt.close()
  changes = []
  if step is not None:
    entries = (contents.history or {}).get("entries") or []
    if entries:
      recorded = entries[-1].get("config") or {}
      where = f"{train_workdir.HISTORY_FILE}, entry {len(entries)}"
    else:  # a workdir without history: the checkpoint's record
      recorded = {"model": saved.get("model_config") or {},
                  "train": saved.get("train_config") or {}}
      where = f"the record of checkpoint {step}"
    changes = settings_changes(recorded, record)
    fixed = [c for c in changes if c.kind == "fixed"]
    if fixed:
      raise ValueError(
          f"workdir {workdir}: resuming from step {step} with "
          f"{', '.join(str(c) for c in fixed)} ({where}): these cannot "
          f"change when a run resumes (they fix the checkpoint's arrays); "
          f"use another workdir")
    refused = [c for c in changes
               if c.kind == "allow" and not _is_allowed(c.name, allowed)]
    if refused:
      raise SettingsChangedError(workdir, step, refused, where)
  return RunPlan(contents, step, record, changes, allowed)


def begin_run(plan: RunPlan) -> None:
  """Records the start or resume of `plan` in run_history.json and moves
  the metrics.csv rows it redoes to metrics.superseded.csv
  (`train_workdir.supersede_rows`)."""
  workdir = plan.contents.workdir
  os.makedirs(workdir, exist_ok=True)
  start = plan.step or 0
  train_workdir.supersede_rows(plan.contents, start)
  train_workdir.append_history(workdir, plan.contents.history, {
      "event": "start" if plan.step is None else "resume",
      "step": start,
      "time": train_workdir.now_iso(),
      "config": plan.record,
      "changes": {c.name: [c.old, c.new] for c in plan.changes},
      "allowed": sorted(c.name for c in plan.changes if c.kind == "allow"),
  })


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
    ValueError: a checkpoint this run cannot resume (`Checkpointer.check`,
      num_steps below its step), before any array is read (the Checkpointer
      is closed then). `train` runs the other checks of `plan_run` first.
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
  tokenizer files of `tokenizer_from` (see `save_hf_checkpoint`).

  Through `save_hf_checkpoint`: each file is moved into place whole, and
  nothing the folder holds beyond the text model's weights and config is
  lost (or the save refuses with a ValueError before writing).
  """
  save_hf_checkpoint(path, cfg, jax.device_get(params), dtype=dtype,
                     tokenizer_from=tokenizer_from)


def check_export(path: str, cfg: QwenConfig, dtype: Any = None,
                 tokenizer_from: str | None = None) -> None:
  """Runs the checks of `export_hf(path, cfg, ...)` without parameters and
  without writing: a folder whose contents that save would refuse to
  replace raises its ValueError now, before any training."""
  save_hf_checkpoint(path, cfg, param_shapes(cfg), dtype=dtype,
                     check_only=True, tokenizer_from=tokenizer_from)
