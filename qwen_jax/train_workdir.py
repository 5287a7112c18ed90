"""The files of a training workdir: what is ours, metrics.csv, the history.

A workdir of `qwen_jax.train.train` holds

  checkpoints/             orbax step folders (`qwen_jax.train_checkpoint`)
  metrics.csv              one row per log point, appended as the run goes
  metrics.superseded.csv   rows a resumed run redid (see below)
  run_history.json         one entry per start or resume: step, time, the
                           whole config, the settings changed and allowed
  run_config.json, eval.json   written beside them by experiments/train.py
  loss.png, data/, evals/, tensorboard/, adapter/
                           written by a fine-tuning run (experiments/
                           finetune.py): the loss plot, the token cache,
                           held-out loss and samples per evaluation,
                           TensorBoard event files, the LoRA adapter

and, where a script exported into it, the folders recorded in the history.
Hidden entries (names starting with ".") are neither read nor touched; the
temporary files of the atomic writes here are hidden too.

`scan` reads a workdir without writing and refuses, with one ValueError
naming the entry, anything that is not ours: an unknown file or folder, a
checkpoints folder with entries orbax did not write, a metrics.csv (or
metrics.superseded.csv) without our header or with a row that does not
parse, or one beside which there is no run_history.json (the file then
belongs to no run of this workdir).

metrics.csv is only ever appended to, except on a start or resume: the rows
numbered past the step the run starts from were written after its last
checkpoint and are redone. They are moved, with the step the run resumed
from (column resumed_from), to metrics.superseded.csv, and metrics.csv
keeps the rest: both files are replaced atomically, the superseded one
first. metrics.csv then holds each step once, as an uninterrupted run's
would, and no row is lost.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import os
import uuid
from typing import Any, Mapping, Sequence

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.csv"
SUPERSEDED_FILE = "metrics.superseded.csv"
HISTORY_FILE = "run_history.json"
# Files experiments/train.py writes beside the loop's.
SCRIPT_FILES = ("run_config.json", "eval.json", "loss.png")
# Folders experiments/finetune.py writes beside them.
SCRIPT_FOLDERS = ("data", "evals", "tensorboard", "adapter")
OWN_NAMES = (CHECKPOINTS, METRICS_FILE, SUPERSEDED_FILE, HISTORY_FILE
             ) + SCRIPT_FILES + SCRIPT_FOLDERS

# metrics.csv columns. step: optimizer updates done (the progress bar's and
# the checkpoints' count); loss, grad_norm: of the batch of that update;
# learning_rate: the rate that update applied; tokens_per_s, mfu: of the
# steps since the previous row (checkpoint saves and the loop's own host
# work excluded); elapsed_s: wall-clock seconds since the loop began.
METRICS_FIELDS = ("step", "loss", "grad_norm", "learning_rate",
                  "tokens_per_s", "mfu", "elapsed_s")
# A model with mixture-of-experts layers adds the routing of the row's batch
# (`qwen_jax.moe.routing_metrics`): router_aux_loss, the load-balancing loss
# before its coefficient; expert_load_max / expert_load_min, the busiest and
# idlest expert's share of the routed slots over an even share (1 =
# balanced, 0 = an expert received no token); expert_dropped_share, the
# routed pairs a capacity factor dropped (0 where the dispatch is dropless).
ROUTING_FIELDS = ("router_aux_loss", "expert_load_max", "expert_load_min",
                  "expert_dropped_share")
# metrics.superseded.csv: the same, and the step of the resume that redid
# the row.
SUPERSEDED_FIELDS = METRICS_FIELDS + ("resumed_from",)
HISTORY_FORMAT = "qwen_jax.run_history/1"
# orbax writes a step under "<step>.orbax-checkpoint-tmp..." and renames it
# when complete; a complete step folder holds this file.
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_ORBAX_METADATA = "_CHECKPOINT_METADATA"
# The items our Checkpointer saves in each step.
_CHECKPOINT_ITEMS = {"state", "config"}
_TMP_PREFIX = ".qwen_jax-tmp-"


def metrics_fields(moe: bool) -> tuple[str, ...]:
  """metrics.csv's columns for a dense model or one with mixture-of-experts
  layers."""
  return METRICS_FIELDS + (ROUTING_FIELDS if moe else ())


def routing_values(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The ROUTING_FIELDS of a MoE train step's metrics as floats; a dropless
  dispatch reports no dropped share, which is 0."""
  return {k: float(metrics.get(k, 0.0)) for k in ROUTING_FIELDS}


def _not_ours(workdir: str, what: str) -> ValueError:
  return ValueError(
      f"workdir {workdir!r}: expected a training workdir (only "
      f"{', '.join(OWN_NAMES)}), found {what}; nothing was written: move it "
      f"away or use another workdir")


# ------------------------------------------------------------------ files
def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and `os.replace`: a
  reader (or a kill) sees the old file or the new one, never a part."""
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
  try:
    with open(tmp, "x", newline="") as f:  # the mode follows the umask
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read_csv(path: str, headers: Sequence[Sequence[str]]
              ) -> tuple[list[list[str]], list[str] | None, tuple[str, ...]]:
  """(complete rows, torn last row or None, header) of one of our CSV
  files, whose header is one of `headers`.

  A last line without its newline is a row a killed run was writing.

  Raises:
    ValueError: naming the file and line, for another header or a row
      that does not parse.
  """
  with open(path, newline="") as f:
    text = f.read()
  torn = None
  if text and not text.endswith("\n"):
    text, _, last = text.rpartition("\n")
    torn = next(csv.reader([last]), [])
    text += "\n" if text else ""
  lines = list(csv.reader(io.StringIO(text)))
  how = (f"move it away or use another workdir (a {os.path.basename(path)} "
         f"of a run starts with the header {','.join(headers[0])})")
  fields = next((tuple(h) for h in headers if lines and lines[0] == list(h)),
                None)
  if fields is None:
    found = ",".join(lines[0]) if lines else "an empty file"
    raise ValueError(f"{path}: expected a file written by a training run, "
                     f"found the header {found!r}; nothing was written: "
                     f"{how}")
  rows = lines[1:]
  for n, row in enumerate(rows, start=2):
    ok = len(row) == len(fields)
    if ok:
      try:
        int(row[0])
      except ValueError:
        ok = False
    if not ok:
      raise ValueError(f"{path}: line {n}: expected {len(fields)} values "
                       f"with an integer step, found {','.join(row)!r}; "
                       f"nothing was written: {how}")
  return rows, torn, fields


@dataclasses.dataclass
class Contents:
  """What a workdir holds, as `scan` read it.

  Attributes:
    workdir: the folder.
    history: run_history.json, or None.
    metrics: complete rows of metrics.csv (strings, `metrics_fields`).
    torn_row: a last metrics.csv row cut short by a kill, or None.
    superseded: rows of metrics.superseded.csv.
    fields: {file name: its header} of the CSV files present.
    checkpoint_steps: complete orbax steps under checkpoints/.
  """
  workdir: str
  history: dict[str, Any] | None = None
  metrics: list[list[str]] = dataclasses.field(default_factory=list)
  torn_row: list[str] | None = None
  superseded: list[list[str]] = dataclasses.field(default_factory=list)
  checkpoint_steps: list[int] = dataclasses.field(default_factory=list)
  fields: dict[str, tuple[str, ...]] = dataclasses.field(
      default_factory=dict)


def _check_checkpoints(workdir: str, folder: str) -> list[int]:
  """The complete steps in `folder`; ValueError for an entry orbax and our
  Checkpointer did not write."""
  steps = []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith("."):
      continue
    base = name.split(_ORBAX_TMP, 1)[0]
    if not (base.isdigit() and os.path.isdir(path)):
      raise _not_ours(workdir, f"{path!r} in its checkpoints folder, which "
                      f"is not an orbax step folder")
    if _ORBAX_TMP in name:
      continue  # a save that did not complete: orbax ignores and replaces it
    meta = os.path.join(path, _ORBAX_METADATA)
    try:
      with open(meta) as f:
        items = set(json.load(f).get("item_handlers") or {})
    except (OSError, ValueError, AttributeError):
      items = None
    if items != _CHECKPOINT_ITEMS:
      raise _not_ours(workdir, f"{path!r}, not a checkpoint of a training "
                      f"run (no {_ORBAX_METADATA} naming the items "
                      f"{sorted(_CHECKPOINT_ITEMS)})")
    steps.append(int(name))
  return sorted(steps)


def read_history(path: str) -> dict[str, Any]:
  """run_history.json; ValueError naming the file if it is not one."""
  try:
    with open(path) as f:
      history = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: expected the history of a training run (JSON "
                     f"of format {HISTORY_FORMAT!r}), found a file that "
                     f"does not read ({e}); nothing was written: move it "
                     f"away or use another workdir") from e
  if (not isinstance(history, dict)
      or history.get("format") != HISTORY_FORMAT
      or not isinstance(history.get("entries"), list)):
    found = (history.get("format") if isinstance(history, dict)
             else type(history).__name__)
    raise ValueError(f"{path}: expected the history of a training run "
                     f"(format {HISTORY_FORMAT!r}), found {found!r}; "
                     f"nothing was written: move it away or use another "
                     f"workdir")
  return history


def export_names(workdir: str, history: Mapping[str, Any] | None
                 ) -> set[str]:
  """Entries of `workdir` that hold folders exported by its runs."""
  out = set()
  for path in (history or {}).get("exports", ()):
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))
    if not rel.startswith(os.pardir) and rel != os.curdir:
      out.add(rel.split(os.sep, 1)[0])
  return out


def scan(workdir: str, other_files: Sequence[str] = ()) -> Contents:
  """Reads what `workdir` holds, writing nothing.

  Args:
    workdir: the run's folder (need not exist).
    other_files: further entries of `workdir` that belong to the caller
      (e.g. the folder an export goes to).

  Returns:
    The Contents.

  Raises:
    ValueError: one line naming the entry, for a workdir that is not ours
      (see the module docstring).
  """
  out = Contents(workdir)
  if not os.path.lexists(workdir):
    return out
  if not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r}: expected a folder, found a "
                     f"file")
  names = [n for n in sorted(os.listdir(workdir)) if not n.startswith(".")]
  hist_path = os.path.join(workdir, HISTORY_FILE)
  if HISTORY_FILE in names:
    out.history = read_history(hist_path)
  known = (set(OWN_NAMES) | set(other_files)
           | export_names(workdir, out.history))
  for name in names:
    path = os.path.join(workdir, name)
    if name not in known:
      kind = "the folder" if os.path.isdir(path) else "the file"
      raise _not_ours(workdir, f"{kind} {path!r}")
    if name == CHECKPOINTS:
      if not os.path.isdir(path):
        raise _not_ours(workdir, f"the file {path!r} where the checkpoints "
                        f"folder goes")
      out.checkpoint_steps = _check_checkpoints(workdir, path)
    elif name in (METRICS_FILE, SUPERSEDED_FILE, HISTORY_FILE) + SCRIPT_FILES:
      if not os.path.isfile(path):
        raise _not_ours(workdir, f"{path!r}, not a file")
    elif name in SCRIPT_FOLDERS:
      if not os.path.isdir(path):
        raise _not_ours(workdir, f"{path!r}, not a folder")
  headers = [metrics_fields(False), metrics_fields(True)]
  for name, extra in ((METRICS_FILE, ()), (SUPERSEDED_FILE, ("resumed_from",))):
    if name not in names:
      continue
    path = os.path.join(workdir, name)
    rows, torn, out.fields[name] = _read_csv(
        path, [h + extra for h in headers])
    if out.history is None:
      raise ValueError(
          f"{path}: found a {name} with no {HISTORY_FILE} beside it, so no "
          f"run of this workdir wrote it; nothing was written: move it away "
          f"or use another workdir")
    if name == METRICS_FILE:
      out.metrics, out.torn_row = rows, torn
    else:
      out.superseded = rows + ([torn] if torn else [])
  return out


# ---------------------------------------------------------------- history
def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


def json_record(value: Any) -> Any:
  """`value` as JSON reads it back (tuples become lists, ...)."""
  return json.loads(json.dumps(value))


def append_history(workdir: str, history: Mapping[str, Any] | None,
                   entry: Mapping[str, Any]) -> dict[str, Any]:
  """Adds `entry` to the history and writes run_history.json atomically."""
  new = dict(history or {"format": HISTORY_FORMAT, "entries": []})
  new["entries"] = list(new.get("entries", [])) + [json_record(entry)]
  atomic_write(os.path.join(workdir, HISTORY_FILE),
               json.dumps(new, indent=2) + "\n")
  return new


def record_export(workdir: str, path: str) -> None:
  """Records in run_history.json that a folder was exported to `path` (a
  later run then knows it, when it lies inside the workdir)."""
  hist_path = os.path.join(workdir, HISTORY_FILE)
  history = read_history(hist_path)
  exports = list(history.get("exports", []))
  path = os.path.abspath(path)
  if path not in exports:
    history["exports"] = exports + [path]
    atomic_write(hist_path, json.dumps(history, indent=2) + "\n")


# ---------------------------------------------------------------- metrics
def _csv_text(fields: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(fields)
  w.writerows(rows)
  return buf.getvalue()


def _padded(row: Sequence[str], n: int) -> list[str]:
  return list(row)[:n] + [""] * (n - len(row))


def supersede_rows(contents: Contents, start: int) -> int:
  """Moves the metrics.csv rows numbered past `start` (and a torn last
  row) to metrics.superseded.csv; returns how many moved.

  Both files are replaced atomically, the superseded one first: a kill
  between the two leaves a row in both files, never in neither (a row
  already in the superseded file is not added twice).
  """
  fields = contents.fields.get(METRICS_FILE, METRICS_FIELDS)
  n = len(fields)
  moved = [r for r in contents.metrics if int(r[0]) > start]
  if contents.torn_row is not None:
    moved.append(_padded(contents.torn_row, n))
  if not moved:
    return 0
  workdir = contents.workdir
  old = [_padded(r, n + 1) for r in contents.superseded]
  seen = {tuple(r) for r in old}
  new = [r + [str(start)] for r in moved
         if tuple(r + [str(start)]) not in seen]
  if new:
    atomic_write(os.path.join(workdir, SUPERSEDED_FILE),
                 _csv_text(fields + ("resumed_from",), old + new))
  kept = [r for r in contents.metrics if int(r[0]) <= start]
  atomic_write(os.path.join(workdir, METRICS_FILE),
               _csv_text(fields, kept))
  return len(moved)


__all__ = ["Contents", "METRICS_FIELDS", "ROUTING_FIELDS", "SUPERSEDED_FIELDS",
           "append_history", "atomic_write", "metrics_fields",
           "read_history", "record_export", "routing_values", "scan",
           "supersede_rows"]
