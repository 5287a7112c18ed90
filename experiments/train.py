"""Trains a Qwen3.5 model from an ml_collections config, then evaluates it.

The config (see experiments/configs/) names a model preset with overrides,
the TrainConfig fields, the data (MQAR or byte-level text) and the held-out
evaluation. The workdir receives orbax checkpoints (a rerun with the same
workdir resumes from the newest), metrics.csv, run_history.json (one entry
per start or resume), run_config.json and, after training, eval.json (MQAR
accuracy or text loss on held-out data, and a summary of the run). A
progress bar goes to stderr.

A rerun resumes only with the settings recorded for the run (the model,
train, data and eval sections); `--allow_changes=train.learning_rate,
train.num_steps` (or a section: `--allow_changes=eval`) accepts the changes
named and records them in run_history.json. The model's architecture,
param_dtype and scan_layers cannot change. See `qwen_jax.train_checkpoint`
for the rules and the learning-rate schedule after a change.

  python -m experiments.train --config=experiments/configs/mqar.py:runlocal \
      --workdir=/tmp/qwen_mqar_local
  python -m experiments.train --config=experiments/configs/mqar.py \
      --workdir=/tmp/qwen_mqar --config.train.num_steps=5000 \
      --config.model.hidden_size=256
  python -m experiments.train --config=experiments/configs/text.py \
      --workdir=/tmp/qwen_text --export_hf=/tmp/qwen_text/hf
  python -m experiments.train --config=experiments/configs/qwen3_5_0_8b.py \
      --workdir=/tmp/qwen08b_bench                      # GPU benchmark
  python -m experiments.train --config=experiments/configs/finetune.py \
      --config.init_checkpoint=DIR --config.data.path=FILE_OR_FOLDER \
      --workdir=/tmp/ft [--export_hf=OUT] [--config.lora_rank=16]

The finetune config adapts a transformers checkpoint (its config, weights
and tokenizer) to the user's text or chats, fully or with LoRA, on one
device or a mesh; experiments/finetune.py runs it.

Several devices, several processes: `--mesh data:8` (axes data, fsdp,
tensor, seq; `qwen_jax.sharding.make_mesh`) shards the step over the
devices (`--num_devices 8` gives a CPU 8 fake ones); with `--distributed`
every process (host) runs the same command and the mesh spans them all
(default `data:<all devices>`), see experiments/multihost.py and
docs/sharding.md. Then each process builds only the rows of each batch
(training and evaluation) that its devices hold, orbax writes each checkpoint with all processes
together, and process 0 alone writes metrics.csv, run_history.json,
run_config.json, eval.json, the --export_hf folder and the output; an
error in any process ends them all with its message.

  python -m experiments.train --config=experiments/configs/mqar.py:runlocal \
      --workdir=/tmp/qwen_mqar_2p --distributed --num_processes 2 \
      --process_id 0 --coordinator_address 127.0.0.1:12355 \
      --num_devices 4 --mesh data:8 &          # and --process_id 1

`--export_hf DIR` writes the trained weights as a transformers checkpoint
folder (`AutoModelForCausalLM.from_pretrained(DIR)` loads it); a text run
adds the byte-level tokenizer.json of its data, so that
`python -m experiments.generate --checkpoint DIR --prompt "def "` samples
it at once.

The config (file, arguments, `--config.*` overrides and every value),
--workdir (a new or empty folder, or a training workdir: nothing else in
it), a resume's settings, and --export_hf (a folder whose contents the
export keeps; see `qwen_jax.checkpoint.save_hf_checkpoint`) are checked
before anything is built or written; a misuse ends with one line on stderr
and exit status 1 (2 for usage errors). Ctrl-C ends training with one line
naming the last checkpoint (its step and folder) or saying that none was
written yet, and exit status 130; see experiments/cli.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from experiments import cli
from experiments import configs
from experiments import finetune
from experiments import multihost
from qwen_jax import data
from qwen_jax import distributed
from qwen_jax import sharding
from qwen_jax import train as train_lib
from qwen_jax import train_checkpoint
from qwen_jax import train_step
from qwen_jax import train_workdir
from qwen_jax.config import FULL, LINEAR, QwenConfig, layer_types_from_ratio
from qwen_jax.config import check_int as _check_int

DATA_KINDS = ("mqar", "text")
EVAL_FILE = "eval.json"
CONFIG_FILE = "run_config.json"


# ------------------------------------------------------------------ config
def build_model_config(model: Mapping[str, Any] | ml_collections.ConfigDict,
                       data_vocab_size: int | None = None) -> QwenConfig:
  """QwenConfig from the `model` part of a config.

  Args:
    model: `preset`, optional `ratio`, and QwenConfig fields (None keeps
      the preset's value).
    data_vocab_size: tokens the data uses; the model's vocabulary when
      `model.vocab_size` is None and it is given.

  Returns:
    The model config: the preset's language model (the tasks are text, so
    a preset's vision tower is left out).

  Raises:
    ValueError: an unknown preset or field, a bad ratio, or a vocabulary
      smaller than the data's.
  """
  values = configs.as_dict(model)
  preset = values.pop("preset", None)
  ratio = values.pop("ratio", None)
  fields = {f.name for f in dataclasses.fields(QwenConfig)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"config.model: expected QwenConfig fields, found "
                     f"unknown {unknown}")
  overrides = {k: v for k, v in values.items() if v is not None}
  if "vocab_size" not in overrides and data_vocab_size is not None:
    overrides["vocab_size"] = int(data_vocab_size)
  # ValueError naming a bad preset; text tasks: no vision tower.
  base = QwenConfig.from_preset(preset, vision=None)
  if ratio:
    n = overrides.get("num_hidden_layers", base.num_hidden_layers)
    overrides["layer_types"] = layer_types_from_ratio(ratio, n)
  cfg = base.replace(**overrides)
  if data_vocab_size is not None and cfg.vocab_size < data_vocab_size:
    raise ValueError(f"config.model.vocab_size: expected >= "
                     f"{data_vocab_size} (the data's vocabulary), found "
                     f"{cfg.vocab_size}")
  return cfg


@dataclasses.dataclass
class Task:
  """The data side of a run.

  Attributes:
    kind: "mqar" or "text".
    vocab_size: token ids the data uses (the model needs at least these).
    batch_fn: step -> training batch, a pure function of the step (a
      `data.RowBatches`: each process of a mesh builds only its rows).
    eval_batches: builds the held-out batches (called after training);
      eval_batches(rows) builds only the rows `rows` (a slice) of each.
    info: settings recorded in eval.json.
  """
  kind: str
  vocab_size: int
  batch_fn: Callable[[int], data.Batch]
  eval_batches: Callable[..., list[data.Batch]]
  info: dict[str, Any]


class ConfigError(cli.UserError):
  """A bad config, or a workdir the config cannot resume: raised by `run`
  before anything is written (the message names the field)."""


def build_task(config: ml_collections.ConfigDict,
               tcfg: train_step.TrainConfig) -> Task:
  """The Task of `config.data` / `config.eval` at tcfg's batch shape.

  Raises:
    ValueError: an unknown data kind or bad task settings (data or eval:
      seeds < 0, eval.batch_size or eval.num_batches < 1, max_bytes < 1).
  """
  d, ev = config.data, config.eval
  kind = d.kind
  bs, seed = tcfg.batch_size, d.get("seed", 0)
  # Checked here, before training: the evaluation runs only after it.
  _check_int("config.data.seed", seed, 0)
  _check_int("config.eval.batch_size", ev.get("batch_size"), 1)
  if kind == "mqar" or ev.get("num_batches") is not None:
    _check_int("config.eval.num_batches", ev.get("num_batches"), 1)
  if ev.get("seed") is not None:
    _check_int("config.eval.seed", ev.get("seed"), 0)
  for part, name in ((d, "config.data"), (ev, "config.eval")):
    if part.get("max_bytes") is not None:
      _check_int(f"{name}.max_bytes", part.get("max_bytes"), 1)
  if kind == "mqar":
    task = data.MQARConfig(
        seq_len=tcfg.seq_len, num_pairs=d.num_pairs,
        num_queries=d.get("num_queries"), key_vocab=d.key_vocab,
        value_vocab=d.value_vocab)
    eval_seed = ev.get("seed", seed + 1)
    return Task(
        kind=kind, vocab_size=task.vocab_size,
        batch_fn=data.RowBatches(
            lambda step, rows: data.mqar_batch(task, bs, seed, step, rows),
            bs),
        eval_batches=lambda rows=None: [
            data.mqar_batch(task, ev.batch_size, eval_seed, i, rows)
            for i in range(ev.num_batches)],
        info={"task": dataclasses.asdict(task), "queries": task.queries,
              "chance_accuracy": task.chance_accuracy})
  if kind == "text":
    text = data.TextData(tcfg.seq_len, "train", d.get("max_bytes"))

    def eval_batches(rows: slice | None = None) -> list[data.Batch]:
      held_out = data.TextData(tcfg.seq_len, "eval", ev.get("max_bytes"))
      return held_out.eval_batches(ev.batch_size, ev.get("num_batches"),
                                   rows)

    return Task(
        kind=kind, vocab_size=data.BYTE_VOCAB,
        batch_fn=data.RowBatches(
            lambda step, rows: text.batch(bs, seed, step, rows), bs),
        eval_batches=eval_batches,
        info={"train_rows": text.num_rows, "train_tokens": text.num_tokens})
  raise ValueError(f"config.data.kind: expected one of {DATA_KINDS}, found "
                   f"{kind!r}")


def build(config: ml_collections.ConfigDict,
          ) -> tuple[QwenConfig, train_step.TrainConfig, Task]:
  """(model config, train config, task) of a config, all validated."""
  for part in ("model", "train", "data", "eval"):
    if part not in config:
      raise ValueError(f"config.{part}: expected a section, found none")
  tcfg = configs.build_train_config(config.train)
  task = build_task(config, tcfg)
  cfg = build_model_config(
      config.model, task.vocab_size if task.kind == "mqar" else None)
  if cfg.vocab_size < task.vocab_size:
    raise ValueError(f"config.model.vocab_size: expected >= "
                     f"{task.vocab_size} for {task.kind} data, found "
                     f"{cfg.vocab_size}")
  if tcfg.seq_len > cfg.max_position_embeddings:
    raise ValueError(f"config.train.seq_len: expected <= "
                     f"max_position_embeddings={cfg.max_position_embeddings}"
                     f", found {tcfg.seq_len}")
  return cfg, tcfg, task


# --------------------------------------------------------------------- run
def _export_entry(workdir: str, export_hf: str | None) -> str | None:
  """The entry of `workdir` that `export_hf` lies in, or None.

  Raises:
    ConfigError: an export folder that is the workdir or one of its own
      files.
  """
  if not export_hf:
    return None
  rel = os.path.relpath(os.path.abspath(export_hf), os.path.abspath(workdir))
  if rel == os.curdir:
    raise ConfigError(f"--export_hf: expected a folder other than "
                      f"--workdir, found {export_hf!r}")
  if rel == os.pardir or rel.startswith(os.pardir + os.sep):
    return None
  entry = rel.split(os.sep, 1)[0]
  if entry in train_workdir.OWN_NAMES:
    raise ConfigError(f"--export_hf: expected a folder outside the "
                      f"workdir's own {entry!r}, found {export_hf!r}")
  return entry


def _settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The data and eval sections, as recorded and compared on a resume."""
  return {"data": configs.as_dict(config.data),
          "eval": configs.as_dict(config.eval)}


@contextlib.contextmanager
def _export_tokenizer(task: Task) -> Iterator[str | None]:
  """The folder whose tokenizer an export of `task`'s model carries: a
  byte-level tokenizer for text data (so the export can be sampled at
  once), none for MQAR."""
  if task.kind != "text":
    yield None
    return
  with tempfile.TemporaryDirectory() as folder:
    data.save_byte_tokenizer(folder)
    yield folder


def run(config: ml_collections.ConfigDict, workdir: str, *,
        export_hf: str | None = None, progress: bool | str = True,
        allow_changes: Sequence[str] = (),
        mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir`), evaluates, writes eval.json.

  Args:
    config: a config as returned by experiments/configs/*.py.
    workdir: output folder (checkpoints, metrics.csv, run_history.json,
      run_config.json, eval.json); created if needed.
    export_hf: also write the trained weights as a transformers folder.
    progress: progress bar on stderr (a string sets its label).
    allow_changes: settings ("train.learning_rate") or sections ("eval") a
      resume may change from the recorded run's.
    mesh: train and evaluate sharded over this device mesh (it may span
      several processes: each runs `run` with the same arguments, process
      0 writes the files).

  Returns:
    The summary written to eval.json.

  Raises:
    ConfigError (a ValueError), before anything is written: a bad config;
      a workdir that is not a training workdir; a checkpoint in `workdir`
      that this run cannot resume (another model, gradient clipping
      switched on or off, num_steps below its step); settings changed from
      the recorded run's and not allowed; an --export_hf folder whose
      contents the export would not keep.
  """
  if finetune.is_finetune_config(config):
    if mesh is not None:
      raise ConfigError(
          f"--mesh: expected none with the finetune config (it shards over "
          f"--config.mesh, in one process), found a mesh of "
          f"{mesh.devices.size} devices ({dict(mesh.shape)})")
    entry = _export_entry(workdir, export_hf)
    return finetune.run(config, workdir, export_hf=export_hf,
                        progress=progress, allow_changes=allow_changes,
                        other_files=[entry] if entry else [])
  try:
    cfg, tcfg, task = build(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  entry = _export_entry(workdir, export_hf)
  other = [entry] if entry else []
  if export_hf:
    try:
      with _export_tokenizer(task) as tokenizer_from:
        train_checkpoint.check_export(export_hf, cfg,
                                      tokenizer_from=tokenizer_from)
    except ValueError as e:
      raise ConfigError(f"--export_hf: {e}") from e
  settings = _settings(config)
  # Every check of the run before run_config.json is written.
  finetune.plan_run(ConfigError, workdir,
                    train_step.model_config_for_training(cfg, tcfg), tcfg,
                    settings=settings, allow_changes=allow_changes,
                    other_files=other)
  if distributed.is_primary():
    os.makedirs(workdir, exist_ok=True)
    train_workdir.atomic_write(
        os.path.join(workdir, CONFIG_FILE),
        config.to_json_best_effort(indent=2, sort_keys=True))
  label = progress if isinstance(progress, str) else task.kind
  result = train_lib.train(cfg, tcfg, task.batch_fn, workdir,
                           progress=label if progress else False,
                           settings=settings, allow_changes=allow_changes,
                           other_files=other, mesh=mesh)
  params = result.state.params
  # Peak device memory of the training so far (GPU/TPU; None on a CPU).
  stats = jax.local_devices()[0].memory_stats() or {}
  peak_bytes = stats.get("peak_bytes_in_use")
  if mesh is None:
    batches = task.eval_batches()
  else:
    # Each process builds the rows (and keeps the tokens) its devices hold.
    shape = (config.eval.batch_size, tcfg.seq_len)
    rows, tokens = distributed.process_slices(
        sharding.batch_sharding(mesh, shape), shape)
    batches = [distributed.global_batch(
        {k: v[:, tokens] for k, v in b.items()}, mesh, local=True,
        global_shape=shape) for b in task.eval_batches(rows)]
  ev = train_lib.evaluate(result.cfg, params, batches, tcfg.ce_chunk_size)
  ev["batches"] = len(batches)
  if task.kind == "text":
    ev["bits_per_byte"] = ev["loss"] / math.log(2.0)
  kinds = cfg.layer_types
  summary = {
      "task": task.kind,
      "workdir": os.path.abspath(workdir),
      "step": int(jax.device_get(result.state.step)),
      "model": {
          "preset": config.model.preset,
          "num_hidden_layers": cfg.num_hidden_layers,
          "linear_layers": kinds.count(LINEAR),
          "full_layers": kinds.count(FULL),
          "hidden_size": cfg.hidden_size,
          "vocab_size": cfg.vocab_size,
          "params": train_step.param_count(params),
          "compute_dtype": result.cfg.dtype,
      },
      "train": result.summary(tcfg.num_steps, peak_bytes),
      "data": task.info,
      "eval": ev,
  }
  if export_hf and mesh is not None:
    params = distributed.fetch(params)  # every process: a collective
  if export_hf and distributed.is_primary():
    # Recorded first: a later run then knows the folder if it lies in the
    # workdir, even when this export is cut short.
    train_workdir.record_export(workdir, export_hf)
    with _export_tokenizer(task) as tokenizer_from:
      try:
        train_checkpoint.export_hf(export_hf, result.cfg, params,
                                   tokenizer_from=tokenizer_from)
      except ValueError as e:  # the folder changed since the check
        raise cli.UserError(
            f"--export_hf: {e}; the trained state is in the checkpoints of "
            f"{os.path.abspath(workdir)}: the same command with another "
            f"--export_hf exports it without training") from e
  if export_hf:
    summary["export_hf"] = os.path.abspath(export_hf)
  if distributed.is_primary():
    train_workdir.atomic_write(os.path.join(workdir, EVAL_FILE),
                               json.dumps(summary, indent=2))
  return summary


def format_summary(summary: Mapping[str, Any]) -> str:
  """A few human-readable lines of a `run` summary."""
  if summary.get("task") == "finetune":
    return finetune.format_summary(summary)
  m, t, ev = summary["model"], summary["train"], summary["eval"]
  lines = [
      f"model:   {m['preset']}, {m['num_hidden_layers']} layers "
      f"({m['linear_layers']} Gated DeltaNet, {m['full_layers']} full "
      f"attention), width {m['hidden_size']}, {m['params']:,} parameters",
  ]
  lines += train_lib.summary_lines(t, summary["step"], compile_time=True)
  if summary["task"] == "mqar":
    lines.append(
        f"eval:    MQAR accuracy {ev['accuracy']:.4f} (chance "
        f"{summary['data']['chance_accuracy']:.4f}), loss {ev['loss']:.4f} "
        f"over {ev['tokens']:.0f} queries")
  else:
    lines.append(f"eval:    held-out loss {ev['loss']:.4f} "
                 f"({ev['bits_per_byte']:.3f} bits/byte) over "
                 f"{ev['tokens']:.0f} tokens")
  lines.append(f"wrote:   {os.path.join(summary['workdir'], EVAL_FILE)}")
  if summary.get("export_hf"):
    lines.append(f"export:  {summary['export_hf']}")
  return "\n".join(lines)


# ------------------------------------------------------------------- flags
def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Sequence[str] | None = None):
  """Defines --config, --workdir, --export_hf and --allow_changes on
  `flag_values`.

  Called when the script runs, not on import, so that importing this module
  next to other experiment scripts (which define --workdir too) is safe.

  Args:
    flag_values: where to define the flags.
    argv: the command line that `--config.*` overrides are read from
      (default sys.argv; ml_collections reads them from there, not from
      the list given to `flag_values`).

  Returns:
    The (config, workdir, export_hf, allow_changes) flag holders.
  """
  config = config_flags.DEFINE_config_file(
      "config", None, "A config file, e.g. experiments/configs/mqar.py or "
      "experiments/configs/mqar.py:runlocal.", flag_values=flag_values,
      sys_argv=None if argv is None else list(argv))
  workdir = flags.DEFINE_string(
      "workdir", None, "Folder for checkpoints, metrics.csv and eval.json "
      "(a rerun resumes from its checkpoints).", flag_values=flag_values)
  export = flags.DEFINE_string(
      "export_hf", None, "Also write the trained weights as a transformers "
      "checkpoint folder here.", flag_values=flag_values)
  allow = flags.DEFINE_list(
      "allow_changes", [], "Settings a resumed run may change from the "
      "recorded run's, e.g. train.learning_rate,train.num_steps, or a "
      "section (data, eval); recorded in run_history.json.",
      flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"],
                               flag_values=flag_values)
  return config, workdir, export, allow


def define_mesh_flags(flag_values: flags.FlagValues = flags.FLAGS
                      ) -> flags.FlagHolder:
  """Defines --mesh and the multi-process flags (experiments/multihost.py)
  on `flag_values`; returns the --mesh holder."""
  multihost.define_flags(flag_values)
  return flags.DEFINE_string(
      "mesh", None, "Shard the step over a device mesh such as 'data:8' or "
      "'data:2,seq:4' (axes data, fsdp, tensor, seq); default one device, "
      "or data:<all devices> with --distributed.", flag_values=flag_values)


def build_mesh(spec: str | None, distributed_run: bool
               ) -> jax.sharding.Mesh | None:
  """The mesh of --mesh (None: one device, or data:N over all devices of a
  multi-process run).

  Raises:
    cli.UserError: a bad spec, named with the flag.
  """
  if spec is None:
    if not distributed_run:
      return None
    spec = f"data:{jax.device_count()}"
  try:
    return sharding.make_mesh(spec)
  except ValueError as e:
    raise cli.UserError(f"--mesh {spec!r}: {e}") from e


def check_paths(workdir: str, export_hf: str | None) -> None:
  """Raises cli.UserError for a --workdir or --export_hf that cannot be a
  folder to write in (a file, or under a folder that is not writable)."""
  cli.writable_folder("--workdir", workdir)
  if export_hf is not None:
    cli.writable_folder("--export_hf", export_hf)


def interrupt_message(workdir: str, save_checkpoints: bool = True) -> str:
  """Where a run interrupted in `workdir` can resume from (for Ctrl-C)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  # Orbax writes a step under a temporary name and renames it to the bare
  # step number when complete.
  steps = sorted(int(n) for n in (os.listdir(directory)
                                  if os.path.isdir(directory) else ())
                 if n.isdigit())
  if steps:
    return (f"the last checkpoint is step {steps[-1]} in "
            f"{os.path.join(directory, str(steps[-1]))}; the same command "
            f"resumes from it")
  if not save_checkpoints:
    return "this run writes no checkpoints (config.train.save_checkpoints)"
  return f"no checkpoint was written yet in {directory}"


_HOLDERS = None


def _interrupted() -> str:
  config, workdir = _HOLDERS[0].value, _HOLDERS[1].value
  try:
    save = bool(config.train.get("save_checkpoints", True))
  except (AttributeError, KeyError, TypeError):
    save = True
  return interrupt_message(workdir, save)


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run refuses positional arguments
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  config, workdir, export, allow = (h.value for h in _HOLDERS)
  # First: with --distributed the processes meet before the other checks,
  # so that an error in one of them ends them all (experiments/cli.py).
  multihost.start()
  check_paths(workdir, export)
  mesh = build_mesh(_MESH.value, distributed.is_active())
  cli.hold_interrupts_inside("orbax")  # no half-written checkpoint
  # A bad config raises ConfigError (a cli.UserError): one line, exit 1.
  summary = run(config, workdir, export_hf=export, allow_changes=allow,
                mesh=mesh)
  if distributed.is_primary():
    print(format_summary(summary))


_MESH = None

if __name__ == "__main__":
  _HOLDERS = define_flags()
  _MESH = define_mesh_flags()
  cli.run(main, on_interrupt=_interrupted)
