"""A training workdir keeps what it holds; a resume keeps the run's settings.

What is checked (the MQAR runlocal config of experiments/configs/mqar.py,
whose compiled step the training tests share):
  * a folder that is not a training workdir (an unknown file, a
    checkpoints folder orbax did not write, a metrics.csv of another
    header, of a bad row, or with no run_history.json beside it) is refused
    with one ValueError naming it, by the library and by the script,
    before anything is written: every byte stays;
  * a crash that cut the last metrics.csv row short: the resume keeps
    every row, moving those it redoes to metrics.superseded.csv;
  * each kind of changed setting (train, data, eval) is refused on a resume,
    listed with its old and new values and the flag, with run_config.json,
    run_history.json and metrics.csv untouched; settings fixing the
    checkpoint's arrays are refused even when allowed;
  * allowed changes are recorded in run_history.json; the learning rate
    after the resume is the new settings' warmup-cosine schedule at each
    step (computed here in float64 from its definition), before it the
    old one's; replaying the history in a new workdir reproduces the run
    bit for bit;
  * an exception inside an orbax save leaves the previous checkpoint
    restorable, and the resumed run equals the uninterrupted one;
  * slow checkpoint saves are not charged to tokens/s;
  * --export_hf: a folder the export would not keep is refused before
    training; an export folder inside the workdir keeps its other files
    and is known to the workdir's later runs.
"""

import csv
import hashlib
import json
import math
import os
import shutil
import time

import chex
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import train as train_script
from experiments.configs import mqar as mqar_config
from qwen_jax import train
from qwen_jax import train_checkpoint
from qwen_jax import train_step
from qwen_jax import train_workdir
from qwen_jax.config import QwenConfig
from tests import tolerances


def _config():
  return mqar_config.get_config("runlocal")


def _build(config):
  """(cfg, tcfg, task, the data and eval sections) as the script has them."""
  cfg, tcfg, task = train_script.build(config)
  return cfg, tcfg, task, {"data": config.data.to_dict(),
                           "eval": config.eval.to_dict()}


def _snapshot(root):
  """Every entry under root with its bytes' hash."""
  out = {}
  for d, dirs, files in os.walk(root):
    out[d] = tuple(sorted(dirs + files))
    for f in files:
      with open(os.path.join(d, f), "rb") as fh:
        out[os.path.join(d, f)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _restore(workdir, cfg, tcfg, step=None):
  like = train_step.init_state(cfg, tcfg)
  ckpt = train_checkpoint.Checkpointer(workdir, cfg, tcfg)
  try:
    return ckpt.restore(like, step)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
  """A complete run of experiments.train (checkpoints 4, 8, 12)."""
  workdir = str(tmp_path_factory.mktemp("script") / "run")
  train_script.run(_config(), workdir, progress=False)
  return workdir


def _copy_at_4(src, dst):
  """`src` as a run that crashed after its rows of step 12 were written
  but whose last checkpoint is step 4."""
  shutil.copytree(src, dst)
  for step in ("8", "12"):
    shutil.rmtree(os.path.join(dst, "checkpoints", step))
  os.remove(os.path.join(dst, "eval.json"))
  return dst


# ---------------------------------------------------------- not our folder
def _foreign(kind, root, script_dir):
  """A workdir at root/kind holding something not ours; the name the
  message must give."""
  d = os.path.join(root, kind)
  os.makedirs(d)
  metrics = os.path.join(d, "metrics.csv")
  if kind == "unknown_file":
    with open(os.path.join(d, "notes.txt"), "w") as f:
      f.write("my notes\n")
    return d, "notes.txt"
  if kind == "checkpoints_not_orbax":
    os.makedirs(os.path.join(d, "checkpoints"))
    with open(os.path.join(d, "checkpoints", "model.pkl"), "wb") as f:
      f.write(b"\x80weights")
    return d, "model.pkl"
  if kind == "other_header":
    with open(metrics, "w") as f:
      f.write("epoch,accuracy\n1,0.5\n2,0.75\n")
    return d, "metrics.csv"
  if kind == "ours_without_history":  # a run's file, not this workdir's
    shutil.copy(os.path.join(script_dir, "metrics.csv"), metrics)
    return d, "metrics.csv"
  if kind == "bad_row":
    shutil.copy(os.path.join(script_dir, "metrics.csv"), metrics)
    shutil.copy(os.path.join(script_dir, "run_history.json"), d)
    with open(metrics, "a") as f:
      f.write("three,1.0,1.0,1.0,1.0,nan,1.0\n2,4\n")
    return d, "metrics.csv: line 8"
  if kind == "not_a_history":
    with open(os.path.join(d, "run_history.json"), "w") as f:
      f.write('{"entries": "mine"}')
    return d, "run_history.json"
  raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "unknown_file", "checkpoints_not_orbax", "other_header",
    "ours_without_history", "bad_row", "not_a_history"])
def test_a_folder_that_is_not_a_training_workdir_is_refused_untouched(
    kind, script_run, tmp_path):
  workdir, name = _foreign(kind, str(tmp_path), script_run)
  before = _snapshot(workdir)
  config = _config()
  cfg, tcfg, task, _ = _build(config)
  with pytest.raises(ValueError) as err:
    train.train(cfg, tcfg, task.batch_fn, workdir, progress=False)
  assert name in str(err.value) and "\n" not in str(err.value), str(err.value)
  with pytest.raises(train_script.ConfigError) as err:
    train_script.run(config, workdir, progress=False)
  assert name in str(err.value), str(err.value)
  assert _snapshot(workdir) == before  # run_config.json not written either


def test_a_crash_resume_keeps_every_metrics_row(script_run, tmp_path):
  workdir = _copy_at_4(script_run, str(tmp_path / "run"))
  metrics = os.path.join(workdir, "metrics.csv")
  full = _rows(metrics)
  # The kill came while row 14 was being written.
  with open(metrics, "a") as f:
    f.write("14,3.0")
  train_script.run(_config(), workdir, progress=False)
  # The redone rows equal the ones they replace (same data, same state),
  # timings aside.
  def values(rows):
    return [(r["step"], r["loss"], r["grad_norm"], r["learning_rate"])
            for r in rows]
  assert values(_rows(metrics)) == values(full)
  moved = _rows(os.path.join(workdir, "metrics.superseded.csv"))
  assert [(r["step"], r["resumed_from"]) for r in moved] == [
      ("6", "4"), ("8", "4"), ("10", "4"), ("12", "4"), ("14", "4")]
  originals = {r["step"]: r for r in _rows(os.path.join(script_run,
                                                        "metrics.csv"))}
  for r in moved[:-1]:
    assert r["loss"] == originals[r["step"]]["loss"]
  assert (moved[-1]["loss"], moved[-1]["grad_norm"]) == ("3.0", "")
  history = train_workdir.read_history(
      os.path.join(workdir, "run_history.json"))
  assert [(e["event"], e["step"], e["changes"])
          for e in history["entries"]] == [("start", 0, {}),
                                           ("resume", 4, {})]


# ------------------------------------------------------------ settings
def _changed(config, name, value):
  config = config.copy_and_resolve_references()
  section, field = name.split(".")
  with config.ignore_type():
    config[section][field] = value
  return config


@pytest.mark.parametrize("name, value", [
    ("train.learning_rate", 0.02), ("train.batch_size", 4),
    ("train.seq_len", 48), ("train.num_steps", 16), ("train.warmup_steps", 3),
    ("train.weight_decay", 0.0), ("train.seed", 5), ("data.seed", 3),
    ("data.num_pairs", 5), ("eval.num_batches", 3)])
def test_each_changed_setting_is_refused_by_name(name, value, script_run):
  before = _snapshot(script_run)
  config = _config()
  old = config[name.split(".")[0]][name.split(".")[1]]
  with pytest.raises(train_script.ConfigError) as err:
    train_script.run(_changed(config, name, value), script_run,
                     progress=False)
  message = str(err.value)
  assert f"{name} {old!r} -> {value!r}" in message, message
  assert f"--allow_changes={name} " in message, message
  assert "resuming from step 12" in message, message
  # Library: the same, naming its argument.
  cfg, tcfg, task, settings = _build(_changed(config, name, value))
  with pytest.raises(train_checkpoint.SettingsChangedError) as err:
    train.train(cfg, tcfg, task.batch_fn, script_run, progress=False,
                settings=settings)
  assert f"allow_changes=[{name!r}]" in str(err.value), str(err.value)
  assert _snapshot(script_run) == before


@pytest.mark.parametrize("name, value, named", [
    ("model.hidden_size", 64, "hidden_size"),
    ("model.scan_layers", False, "scan_layers"),
    ("model.param_dtype", "bfloat16", "param_dtype"),
    ("train.grad_clip", 0.0, "grad_clip"),  # clipping off: another state
])
def test_settings_that_fix_the_checkpoint_stay_refused(name, value, named,
                                                       script_run):
  before = _snapshot(script_run)
  config = _changed(_config(), name, value)
  for allow in ([], [name]):
    with pytest.raises(ValueError) as err:
      train_script.run(config, script_run, progress=False,
                       allow_changes=allow)
    assert named in str(err.value), str(err.value)
  assert _snapshot(script_run) == before


def _lr(step, tcfg):
  """The warmup-cosine rate of `step` from its definition (float64): linear
  from 0 over the warmup, then a cosine to min_lr_ratio x peak at
  num_steps."""
  peak, n = tcfg.learning_rate, tcfg.num_steps
  warmup = min(tcfg.warmup_steps, n - 1)
  if step < warmup:
    return peak * step / warmup
  span = max(n, warmup + 1) - warmup
  frac = min(step - warmup, span) / span
  r = tcfg.min_lr_ratio
  return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * frac)))


class _Stop(Exception):
  pass


ALLOWED = ["train.learning_rate", "train.num_steps", "train.batch_size",
           "data.seed", "eval"]


def _resumed_config():
  config = _config()
  for name, value in (("train.learning_rate", 0.02), ("train.num_steps", 14),
                      ("train.batch_size", 4), ("train.log_every", 1),
                      ("data.seed", 3), ("eval.num_batches", 1)):
    config = _changed(config, name, value)
  return config


def test_allowed_changes_are_recorded_and_the_schedule_follows_them(
    script_run, tmp_path):
  workdir = _copy_at_4(script_run, str(tmp_path / "run"))
  config = _resumed_config()
  summary = train_script.run(config, workdir, progress=False,
                             allow_changes=ALLOWED)
  assert summary["train"]["resumed_from"] == 4
  history = train_workdir.read_history(
      os.path.join(workdir, "run_history.json"))
  first, entry = history["entries"]
  assert (entry["event"], entry["step"]) == ("resume", 4)
  assert entry["changes"] == {
      "train.learning_rate": [0.01, 0.02], "train.num_steps": [12, 14],
      "train.batch_size": [8, 4], "train.log_every": [2, 1],
      "data.seed": [0, 3], "eval.num_batches": [2, 1]}
  # log_every is free: changed and recorded, not needing to be allowed.
  assert entry["allowed"] == sorted(set(entry["changes"])
                                    - {"train.log_every"})
  assert entry["config"]["train"]["learning_rate"] == 0.02
  assert first["config"]["train"]["learning_rate"] == 0.01
  with open(os.path.join(workdir, train_script.CONFIG_FILE)) as f:
    assert json.load(f)["train"]["learning_rate"] == 0.02

  # The schedule: row t holds the rate of the update from t - 1 to t.
  _, old_tcfg, _, _ = _build(_config())
  _, new_tcfg, _, _ = _build(config)
  rows = _rows(os.path.join(workdir, "metrics.csv"))
  assert [int(r["step"]) for r in rows] == [2, 4] + list(range(5, 15))
  got = np.array([float(r["learning_rate"]) for r in rows])
  want = np.array([_lr(int(r["step"]) - 1, old_tcfg if int(r["step"]) <= 4
                       else new_tcfg) for r in rows])
  tolerances.assert_close(got, want, np.float32)
  # Not the old schedule, nor the new one from its start.
  assert abs(want[2] - _lr(4, old_tcfg)) > 1e-3

  # Replaying the history in a new workdir reproduces the run bit for bit.
  replay = str(tmp_path / "replay")
  entries = history["entries"]
  for i, e in enumerate(entries):
    rec = e["config"]
    cfg, tcfg = QwenConfig(**rec["model"]), train_step.TrainConfig(
        **rec["train"])
    sections = ml_collections.ConfigDict({k: rec[k] for k in ("data",
                                                              "eval")})
    task = train_script.build_task(sections, tcfg)
    stop = entries[i + 1]["step"] if i + 1 < len(entries) else None

    def crash(step, metrics, stop=stop):
      del metrics
      if stop is not None and step >= stop:
        raise _Stop()  # as a kill after checkpoint `stop`

    try:
      train.train(cfg, tcfg, task.batch_fn, replay, progress=False,
                  callback=crash, settings={"data": rec["data"],
                                            "eval": rec["eval"]},
                  allow_changes=e["allowed"])
    except _Stop:
      assert stop is not None
  assert ([r["loss"] for r in _rows(os.path.join(replay, "metrics.csv"))]
          == [r["loss"] for r in rows])
  cfg, tcfg, _, _ = _build(config)
  cfg = train_step.model_config_for_training(cfg, tcfg)
  chex.assert_trees_all_equal(_restore(replay, cfg, tcfg),
                              _restore(workdir, cfg, tcfg))


# -------------------------------------------------------- checkpoint saves
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted library run of the runlocal config."""
  cfg, tcfg, task, _ = _build(_config())
  workdir = str(tmp_path_factory.mktemp("reference"))
  return train.train(cfg, tcfg, task.batch_fn, workdir, progress=False), \
      workdir


class _SaveFailed(Exception):
  pass


def test_an_exception_inside_a_save_keeps_the_previous_checkpoint(
    reference, tmp_path, monkeypatch):
  ref, ref_dir = reference
  cfg, tcfg, task, _ = _build(_config())
  workdir = str(tmp_path / "run")
  save = ocp.handlers.JsonCheckpointHandler.async_save

  async def failing(self, directory, *args, **kwargs):
    # The config item of step 8, after the state item was handed to
    # orbax: the step is half written.
    if os.path.basename(os.path.dirname(str(directory))).startswith("8"):
      raise _SaveFailed()
    return await save(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save",
                      failing)
  with pytest.raises(_SaveFailed):
    train.train(cfg, tcfg, task.batch_fn, workdir, progress=False)
  monkeypatch.undo()
  ckpts = os.path.join(workdir, "checkpoints")
  assert "4" in os.listdir(ckpts) and "8" not in os.listdir(ckpts)
  run_cfg = train_step.model_config_for_training(cfg, tcfg)
  restored = _restore(workdir, run_cfg, tcfg)
  assert int(restored.step) == 4
  chex.assert_trees_all_equal(restored, _restore(ref_dir, run_cfg, tcfg, 4))
  resumed = train.train(cfg, tcfg, task.batch_fn, workdir, progress=False)
  assert resumed.resumed_from == 4
  chex.assert_trees_all_equal(resumed.state.params, ref.state.params)
  assert ([r["loss"] for r in _rows(os.path.join(workdir, "metrics.csv"))]
          == [r["loss"] for r in _rows(os.path.join(ref_dir,
                                                    "metrics.csv"))])
  moved = _rows(os.path.join(workdir, "metrics.superseded.csv"))
  assert [(r["step"], r["resumed_from"]) for r in moved] == [
      ("6", "4"), ("8", "4")]


def test_slow_checkpoint_saves_are_not_charged_to_throughput(
    reference, tmp_path, monkeypatch):
  del reference  # its compiled step
  cfg, tcfg, task, _ = _build(_config())
  tcfg = tcfg.replace(log_every=1)  # a row per step
  pause = 1.0
  save = train_checkpoint.Checkpointer.save
  saves = []

  def slow_save(self, state):
    saves.append(int(state.step))
    time.sleep(pause)
    save(self, state)

  monkeypatch.setattr(train_checkpoint.Checkpointer, "save", slow_save)
  t0 = time.time()
  result = train.train(cfg, tcfg, task.batch_fn, str(tmp_path),
                       progress=False)
  wall = time.time() - t0 - result.compile_s
  assert saves[:3] == [4, 8, 12]
  tokens = tcfg.batch_size * tcfg.seq_len
  rows = _rows(os.path.join(tmp_path, "metrics.csv"))
  assert [int(r["step"]) for r in rows] == list(range(1, 13))
  # Each row's interval (tokens / tokens_per_s) is one step, far below a
  # save's pause, also for the steps right after a save (5 and 9).
  intervals = {int(r["step"]): tokens / float(r["tokens_per_s"])
               for r in rows}
  assert max(intervals.values()) < pause / 2, intervals
  assert result.checkpoint_s >= len(saves) * pause
  assert result.train_s <= wall - len(saves) * pause
  assert result.train_s == pytest.approx(sum(intervals.values()), rel=1e-6)


# ----------------------------------------------------------------- export
def test_export_folder_checked_before_training_and_kept(script_run,
                                                        tmp_path):
  config = _config()
  # A folder whose weights cannot be read: the export could not keep what
  # it holds, so the run stops before anything is written.
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "model.safetensors").write_bytes(b"\x00" * 16)
  workdir = str(tmp_path / "new_run")
  with pytest.raises(train_script.ConfigError, match="--export_hf: "
                     "save_hf_checkpoint: cannot read the checkpoint"):
    train_script.run(config, workdir, export_hf=str(bad), progress=False)
  assert not os.path.exists(workdir)
  assert sorted(os.listdir(bad)) == ["model.safetensors"]

  # An export folder inside the workdir, holding a file of the user's.
  workdir = str(tmp_path / "run")
  shutil.copytree(script_run, workdir)
  hf = os.path.join(workdir, "hf")
  os.makedirs(hf)
  with open(os.path.join(hf, "tokenizer.json"), "w") as f:
    f.write('{"mine": true}')
  train_script.run(config, workdir, export_hf=hf, progress=False)
  assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors",
                                    "tokenizer.json"]
  with open(os.path.join(hf, "tokenizer.json")) as f:
    assert f.read() == '{"mine": true}'
  # A later run without --export_hf knows the folder.
  again = train_script.run(config, workdir, progress=False)
  assert again["train"]["resumed_from"] == 12
  # An export folder that is the workdir is refused.
  with pytest.raises(train_script.ConfigError, match="--export_hf"):
    train_script.run(config, workdir, export_hf=workdir, progress=False)
