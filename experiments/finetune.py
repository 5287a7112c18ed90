"""Fine-tunes a transformers checkpoint: the run behind experiments/train.py
with `--config=experiments/configs/finetune.py`.

  python -m experiments.train --config=experiments/configs/finetune.py \
      --config.init_checkpoint=DIR --config.data.path=FILE_OR_FOLDER \
      --workdir=W [--export_hf=OUT] [--config.lora_rank=N]

Order of work, so that a misuse costs seconds and loses nothing: the
config, the checkpoint's config.json and tokenizer, the mesh, the LoRA
targets and --export_hf are checked; the workdir is checked to be ours;
the data is read, checked line by line and tokenized into the workdir's
token cache (`qwen_jax.finetune_data`); a resume is checked against the
recorded settings (the data's SHA-256 among them); only then are the
weights loaded and the step compiled.

The workdir holds, beside the loop's checkpoints, metrics.csv and
run_history.json (`qwen_jax.train_workdir`):

  evals/step_NNNNNN.json   held-out loss, perplexity and token count, and
                           greedy completions (`qwen_jax.generate`) of the
                           first `eval.samples` held-out prompts with their
                           references, every `eval_every` steps and at the
                           end
  tensorboard/             event files (tensorboardX): train/loss,
                           train/grad_norm, train/learning_rate per step
                           (a mixture-of-experts model: and the routing
                           columns of metrics.csv, train/router_aux_loss
                           ...), eval/loss, eval/perplexity and the
                           samples as text per evaluation; a resumed run
                           hides the events past its checkpoint
                           (purge_step)
  loss.png                 training loss per step and held-out loss,
                           drawn at the end
  adapter/                 LoRA runs: the adapters alone (PEFT layout,
                           `qwen_jax.lora.save_adapter`)
  data/                    the token cache
  eval.json                the summary of the run

LoRA: the state (and so each checkpoint) holds the adapters and their
optimizer moments only; the base weights are read from init_checkpoint at
each start, so a resume needs the same folder (its config.json digest and
weight file sizes are recorded and compared). --export_hf merges the
adapters into the base weights and writes a full checkpoint, with the init
checkpoint's tokenizer, chat template and generation config copied
beside it (`save_hf_checkpoint(tokenizer_from=...)`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import cli
from experiments import configs
from qwen_jax import checkpoint as checkpoint_lib
from qwen_jax import decode_loop
from qwen_jax import finetune_data
from qwen_jax import lora as lora_lib
from qwen_jax import tokenizer as tokenizer_lib
from qwen_jax import train as train_lib
from qwen_jax import train_checkpoint
from qwen_jax import train_step
from qwen_jax import train_workdir
from qwen_jax.config import IMPLEMENTATION_FIELDS
from qwen_jax.config import QwenConfig
from qwen_jax.config import check_int as _check_int
from qwen_jax.generate import generate

EVAL_DIR = "evals"
TB_DIR = "tensorboard"
ADAPTER_DIR = "adapter"
DATA_DIR = "data"
PLOT_FILE = "loss.png"
EVAL_FILE = "eval.json"
CONFIG_FILE = "run_config.json"
FLOAT_DTYPES = ("float32", "bfloat16")
# config.model may set how the model computes (not what it computes) and,
# for a mixture-of-experts checkpoint, how its experts are trained: the
# dispatch over an expert axis, a capacity factor, the load-balancing
# weight. The architecture comes from the checkpoint.
MODEL_FIELDS = {"scan_layers": bool, "remat_policy": str,
                "gdr_implementation": str, "gdr_interpret": bool,
                "gdr_chunk_size": int, "gdr_block_sizes": str,
                "attention_implementation": str,
                "moe_implementation": str, "moe_dispatch": str,
                "moe_capacity_factor": float, "router_aux_loss_coef": float}
# The fields of MODEL_FIELDS that only a mixture-of-experts model uses.
MOE_FIELDS = ("moe_implementation", "moe_dispatch", "moe_capacity_factor",
              "router_aux_loss_coef")


class ConfigError(cli.UserError):
  """A bad fine-tuning config, data or workdir: raised by `run` before any
  weight is loaded (the message names the field, file or line)."""


def plan_run(error: type[Exception], workdir: str, cfg_run: QwenConfig,
             tcfg: Any, *, settings: Mapping[str, Any],
             allow_changes: Any, other_files: Sequence[str]) -> Any:
  """`train_checkpoint.plan_run`, its refusals raised as `error` with the
  script's flag and config names (--allow_changes, config.train.,
  --workdir) in place of the library's."""
  try:
    return train_checkpoint.plan_run(
        workdir, cfg_run, tcfg, settings=settings,
        allow_changes=allow_changes, other_files=other_files)
  except train_checkpoint.SettingsChangedError as e:
    names = ",".join(c.name for c in e.changes)
    raise error(e.message(f"pass --allow_changes={names}",
                          "--workdir")) from e
  except ValueError as e:
    message = str(e)
    for lib, flag in (("allow_changes:", "--allow_changes:"),
                      ("TrainConfig.", "config.train."),
                      ("workdir ", "--workdir ")):
      if message.startswith(lib):
        message = flag + message[len(lib):]
    raise error(message) from e


# ------------------------------------------------------------------ plan
@dataclasses.dataclass
class Plan:
  """Everything a fine-tuning run is built from, checked.

  Attributes:
    cfg: the checkpoint's model config (compute dtype set later by train).
    tcfg: the train config.
    tok: the checkpoint's tokenizer.
    spec: the LoRA spec, or None for full fine-tuning.
    base_dtype: dtype of the loaded weights.
    mesh: the device mesh, or None.
    options: the data options.
    overrides: the fields config.model sets (`MODEL_FIELDS`).
  """
  cfg: QwenConfig
  tcfg: train_step.TrainConfig
  tok: tokenizer_lib.Tokenizer
  spec: lora_lib.LoraSpec | None
  base_dtype: str
  mesh: Any
  options: finetune_data.DataOptions
  overrides: dict[str, Any]


def is_finetune_config(config: ml_collections.ConfigDict) -> bool:
  return "init_checkpoint" in config


def build(config: ml_collections.ConfigDict) -> Plan:
  """Checks the config, the checkpoint's config.json and tokenizer, the
  mesh and the LoRA targets; reads no weight and writes nothing.

  Raises:
    ValueError: naming the config field (or file) that is wrong.
  """
  for part in ("train", "data", "eval", "model"):
    if part not in config:
      raise ValueError(f"config.{part}: expected a section, found none")
  init = config.get("init_checkpoint")
  if not init:
    raise ValueError("config.init_checkpoint: expected a transformers "
                     "checkpoint folder, found none (pass "
                     "--config.init_checkpoint=DIR)")
  if not os.path.isdir(init):
    raise ValueError(f"config.init_checkpoint: expected a checkpoint "
                     f"folder, found no folder {init!r}")
  if not config.data.get("path"):
    raise ValueError("config.data.path: expected a file or folder of "
                     "training data, found none (pass "
                     "--config.data.path=FILE_OR_FOLDER)")
  rank = config.get("lora_rank", 0)
  _check_int("config.lora_rank", rank, 0)
  spec = None
  if rank:
    alpha = config.get("lora_alpha")
    try:
      spec = lora_lib.LoraSpec(
          rank=int(rank), alpha=float(2 * rank if alpha is None else alpha),
          targets=config.get("lora_targets", lora_lib.DEFAULT_TARGETS))
    except ValueError as e:
      raise ValueError(str(e).replace("lora ", "config.lora_", 1)) from None
  train = configs.as_dict(config.train)
  if train.get("learning_rate") is None:
    train["learning_rate"] = 2e-4 if spec is not None else 1e-5
  tcfg = configs.build_train_config(train)
  base_dtype = config.get("base_dtype", "auto")
  if base_dtype == "auto":
    base_dtype = "bfloat16" if spec is not None else "float32"
  if base_dtype not in FLOAT_DTYPES:
    raise ValueError(f"config.base_dtype: expected 'auto' or one of "
                     f"{FLOAT_DTYPES}, found {base_dtype!r}")
  if spec is None and base_dtype != "float32":
    raise ValueError(f"config.base_dtype: full fine-tuning keeps float32 "
                     f"master weights; expected 'auto' or 'float32', found "
                     f"{base_dtype!r} (bfloat16 is for LoRA's frozen base)")
  export_dtype = config.get("export_dtype", "auto")
  if export_dtype != "auto" and export_dtype not in FLOAT_DTYPES:
    raise ValueError(f"config.export_dtype: expected 'auto' or one of "
                     f"{FLOAT_DTYPES}, found {export_dtype!r}")
  _check_int("config.eval_every", config.get("eval_every", 0), 0)
  ev = config.eval
  if ev.get("batch_size") is not None:
    _check_int("config.eval.batch_size", ev.batch_size, 1)
  if ev.get("num_batches") is not None:
    _check_int("config.eval.num_batches", ev.num_batches, 1)
  _check_int("config.eval.samples", ev.get("samples", 0), 0)
  _check_int("config.eval.max_new_tokens", ev.get("max_new_tokens", 1), 1)
  _check_int("config.eval.prompt_tokens", ev.get("prompt_tokens", 1), 1)
  options = finetune_data.DataOptions(
      append_eos=config.data.get("append_eos", True),
      eval_fraction=config.data.get("eval_fraction", 0.05),
      seed=config.data.get("seed", 0))
  overrides = {k: v for k, v in configs.as_dict(config.model).items()
               if v is not None}
  unknown = sorted(set(overrides) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f"config.model: expected fields among "
                     f"{sorted(MODEL_FIELDS)} (the architecture "
                     f"comes from the checkpoint), found {unknown}")
  cfg = QwenConfig.from_hf_config(init, dtype="float32",
                                  param_dtype=base_dtype, **overrides)
  experts = sorted(set(overrides) & set(MOE_FIELDS))
  if experts and not cfg.is_moe:
    raise ValueError(f"config.model.{experts[0]}: expected a checkpoint "
                     f"with mixture-of-experts layers, found the dense "
                     f"{init!r}")
  if tcfg.seq_len > cfg.max_position_embeddings:
    raise ValueError(f"config.train.seq_len: expected <= "
                     f"max_position_embeddings={cfg.max_position_embeddings}"
                     f", found {tcfg.seq_len}")
  tok = tokenizer_lib.load_tokenizer(init)
  if spec is not None:
    lora_lib.target_paths(checkpoint_lib.param_shapes(cfg), spec)
  mesh = None
  if config.get("mesh"):
    from qwen_jax import sharding  # pylint: disable=g-import-not-at-top
    try:
      mesh = sharding.make_mesh(config.mesh)
    except ValueError as e:
      raise ValueError(f"config.mesh: {e}") from None
    n = mesh.shape["seq"]
    if tcfg.seq_len % n:
      raise ValueError(f"config.train.seq_len: expected a multiple of the "
                       f"mesh's seq axis ({n}), found {tcfg.seq_len}")
  if cfg.moe_dispatch == "all_to_all" and (
      mesh is None or mesh.shape.get("expert", 1) < 2):
    raise ValueError(f"config.model.moe_dispatch: 'all_to_all' exchanges "
                     f"over an expert axis: expected config.mesh with one "
                     f"of 2 or more devices, found "
                     f"{dict(mesh.shape) if mesh is not None else 'none'}")
  return Plan(cfg, tcfg, tok, spec, base_dtype, mesh, options, overrides)


def base_fingerprint(folder: str) -> dict[str, Any]:
  """What a resume compares of the init checkpoint: config.json's SHA-256
  and the weight files' names and sizes (read without the weights)."""
  with open(os.path.join(folder, checkpoint_lib.CONFIG_NAME), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  weights = sorted(
      [os.path.basename(p), os.path.getsize(p)]
      for p in glob.glob(os.path.join(folder, "*.safetensors")))
  return {"path": os.path.abspath(folder), "config_sha256": digest,
          "weights": weights}


def settings_of(config: ml_collections.ConfigDict, plan: Plan,
                corpus: finetune_data.Corpus) -> dict[str, Any]:
  """The sections recorded in run_history.json and compared on a resume."""
  return {
      "finetune": {
          "init_checkpoint": os.path.abspath(config.init_checkpoint),
          "lora_rank": 0 if plan.spec is None else plan.spec.rank,
          "lora_alpha": None if plan.spec is None else plan.spec.alpha,
          "lora_targets": None if plan.spec is None else plan.spec.targets,
          "base_dtype": plan.base_dtype,
          "mesh": config.get("mesh") or "",
          "eval_every": config.get("eval_every", 0),
          "export_dtype": config.get("export_dtype", "auto"),
      },
      "data": configs.as_dict(config.data),
      "eval": configs.as_dict(config.eval),
      "corpus": corpus.summary(),
      "base": base_fingerprint(config.init_checkpoint),
  }


# LoRA settings that fix the adapters' shapes (the checkpointed state).
_FIXED = ("finetune.lora_rank", "finetune.lora_targets")


def _check_fixed(contents: train_workdir.Contents,
                 settings: Mapping[str, Any]) -> None:
  """Refuses a resume whose adapters' layout differs from the recorded."""
  if not contents.checkpoint_steps:
    return
  workdir = contents.workdir
  entries = (contents.history or {}).get("entries") or []
  if not entries:
    return
  recorded = entries[-1].get("config", entries[-1]).get("finetune") or {}
  for name in _FIXED:
    field = name.split(".", 1)[1]
    if field in recorded and recorded[field] != settings["finetune"][field]:
      raise ValueError(
          f"config.{field}: the run in --workdir {workdir!r} trains "
          f"adapters of {field} {recorded[field]!r}, found "
          f"{settings['finetune'][field]!r}; the checkpointed adapters "
          f"cannot change shape: use another workdir")


# ------------------------------------------------------------- evaluation
class Evaluator:
  """Held-out loss, perplexity and samples, written to evals/ and
  TensorBoard (`train`'s evaluator hook)."""

  def __init__(self, workdir: str, plan: Plan, cfg: QwenConfig,
               frozen: Any, batches: list[dict[str, np.ndarray]],
               prompts: list[finetune_data.Prompt], max_new_tokens: int,
               writer: Any):
    self.workdir, self.plan, self.cfg = workdir, plan, cfg
    self.frozen, self.batches, self.prompts = frozen, batches, prompts
    self.max_new_tokens, self.writer = max_new_tokens, writer
    self.last: dict[str, Any] | None = None
    self._eval_step = train_step.make_eval_step(
        cfg, plan.tcfg.ce_chunk_size, plan.spec, plan.mesh)

  def _params_for_generation(self, params: Any) -> Any:
    if self.plan.spec is None:
      return params
    return lora_lib.combine(self.frozen, params, self.plan.spec)

  def __call__(self, step: int, state: train_step.TrainState) -> None:
    out: dict[str, Any] = {"step": step}
    if self.batches:
      loss_sum = tokens = 0.0
      extra = () if self.frozen is None else (self.frozen,)
      for b in self.batches:
        r = jax.device_get(self._eval_step(state.params, b, *extra))
        loss_sum += float(r["loss_sum"])
        tokens += float(r["tokens"])
      loss = loss_sum / max(tokens, 1.0)
      out.update(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                 tokens=tokens)
    samples = []
    if self.prompts:
      params = self._params_for_generation(state.params)
      tok = self.plan.tok
      stops = [i for i in (tok.eos_token_id,) if i is not None]
      # One left-padded batch of every prompt: one compiled program for
      # the run's evaluations.
      width = max(len(p.prompt) for p in self.prompts)
      ids = np.zeros((len(self.prompts), width), np.int32)
      mask = np.zeros((len(self.prompts), width), np.int32)
      for r, p in enumerate(self.prompts):
        ids[r, width - len(p.prompt):] = p.prompt
        mask[r, width - len(p.prompt):] = 1
      with lora_lib.applied():
        new = np.asarray(generate(
            self.cfg, params, ids, max_new_tokens=self.max_new_tokens,
            attention_mask=mask, stop_tokens=stops or (), pad_token_id=0))
      # generate keeps a decode-layout copy of float weights it converted
      # (on a CPU); these weights change every step: free it now.
      decode_loop.clear_cache()
      for p, row in zip(self.prompts, new):
        row = [int(i) for i in row]
        ends = [k for k, t in enumerate(row) if t in stops]
        if ends:
          row = row[:ends[0] + 1]
        samples.append({"document": p.document,
                        "prompt": tok.decode(p.prompt),
                        "completion": tok.decode(row),
                        "reference": tok.decode(p.reference)})
    out["samples"] = samples
    folder = os.path.join(self.workdir, EVAL_DIR)
    os.makedirs(folder, exist_ok=True)
    train_workdir.atomic_write(os.path.join(folder, f"step_{step:06d}.json"),
                               json.dumps(out, indent=2, ensure_ascii=False))
    if self.writer is not None:
      if "loss" in out:
        self.writer.add_scalar("eval/loss", out["loss"], step)
        self.writer.add_scalar("eval/perplexity", out["perplexity"], step)
      if samples:
        text = "\n\n".join(
            f"**prompt** `{s['prompt'][-300:]!r}`\n\n**completion** "
            f"`{s['completion']!r}`\n\n**reference** `{s['reference']!r}`"
            for s in samples)
        self.writer.add_text("eval/samples", text, step)
      self.writer.flush()
    self.last = out


def _tb_writer(workdir: str, start: int | None) -> Any:
  import tensorboardX  # pylint: disable=g-import-not-at-top
  return tensorboardX.SummaryWriter(
      os.path.join(workdir, TB_DIR), purge_step=start or None,
      flush_secs=30)


def plot_losses(workdir: str) -> str | None:
  """Draws loss.png from metrics.csv and evals/ (None: nothing to draw)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  contents = train_workdir.scan(workdir)
  if not contents.metrics:
    return None
  steps = [int(r[0]) for r in contents.metrics]
  losses = [float(r[1]) for r in contents.metrics]
  ev = []
  for p in sorted(glob.glob(os.path.join(workdir, EVAL_DIR, "step_*.json"))):
    with open(p) as f:
      rec = json.load(f)
    if "loss" in rec:
      ev.append((rec["step"], rec["loss"]))
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, losses, label="train (logged steps)")
  if ev:
    ax.plot([s for s, _ in ev], [l for _, l in ev], "o-", label="held-out")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, PLOT_FILE)
  tmp = os.path.join(workdir, f".{PLOT_FILE}.tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return path


# --------------------------------------------------------------- export
def _export_dtype(config: ml_collections.ConfigDict) -> str:
  dtype = config.get("export_dtype", "auto")
  if dtype != "auto":
    return dtype
  with open(os.path.join(config.init_checkpoint,
                         checkpoint_lib.CONFIG_NAME)) as f:
    hf = json.load(f)
  text = hf.get("text_config") if isinstance(hf.get("text_config"),
                                             dict) else {}
  found = hf.get("torch_dtype") or hf.get("dtype") or text.get("dtype") or (
      text.get("torch_dtype"))
  return found if found in FLOAT_DTYPES else "float32"


# -------------------------------------------------------------------- run
def _remove_if_empty(folder: str) -> None:
  try:
    os.rmdir(folder)
  except OSError:  # not empty, or gone: nothing of the user's is touched
    pass


def run(config: ml_collections.ConfigDict, workdir: str, *,
        export_hf: str | None = None, progress: bool | str = True,
        allow_changes: Sequence[str] = (),
        other_files: Sequence[str] = ()) -> dict[str, Any]:
  """Fine-tunes (resuming from `workdir`), evaluates, exports.

  Args: as experiments/train.py's `run`; `other_files`: entries of the
    workdir that belong to the caller (an export folder inside it).

  Returns:
    The summary written to eval.json.

  Raises:
    ConfigError: before any weight is loaded (see the module docstring).
  """
  try:
    plan = build(config)
    if export_hf:
      try:
        train_checkpoint.check_export(
            export_hf, plan.cfg, tokenizer_from=config.init_checkpoint)
      except ValueError as e:
        raise ValueError(f"--export_hf: {e}") from None
    contents = train_workdir.scan(workdir, other_files)
  except ValueError as e:
    message = str(e)
    if message.startswith("workdir "):
      message = "--workdir " + message[len("workdir "):]
    raise ConfigError(message) from e
  # The data: read, checked and tokenized into the workdir's cache. Folders
  # made for it are removed again when the data is refused.
  made = [p for p in (workdir, os.path.join(workdir, DATA_DIR))
          if not os.path.exists(p)]
  try:
    corpus = finetune_data.prepare_corpus(
        config.data.path, plan.tok, os.path.join(workdir, DATA_DIR),
        plan.options, plan.cfg.vocab_size)
    packed = finetune_data.PackedData(corpus, plan.tcfg.seq_len,
                                      plan.tcfg.batch_size,
                                      plan.options.seed)
  except ValueError as e:
    for folder in reversed(made):
      _remove_if_empty(folder)
    raise ConfigError(str(e)) from e
  settings = settings_of(config, plan, corpus)
  cfg_run = train_step.model_config_for_training(plan.cfg, plan.tcfg)
  try:
    _check_fixed(contents, settings)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  start = plan_run(ConfigError, workdir, cfg_run, plan.tcfg,
                   settings=settings, allow_changes=allow_changes,
                   other_files=other_files).step
  train_workdir.atomic_write(
      os.path.join(workdir, CONFIG_FILE),
      config.to_json_best_effort(indent=2, sort_keys=True))
  ev = config.eval
  eval_bs = ev.get("batch_size") or plan.tcfg.batch_size
  batches = finetune_data.eval_batches(corpus, plan.tcfg.seq_len, eval_bs,
                                       ev.get("num_batches"))
  prompts = finetune_data.sample_prompts(
      corpus, ev.get("samples", 0), ev.get("prompt_tokens", 64),
      ev.get("max_new_tokens", 64))
  # The weights.
  # The loader takes the implementation fields; the experts' training
  # choices (capacity, load-balancing weight) are set on the config after.
  how = {k: v for k, v in plan.overrides.items()
         if k in IMPLEMENTATION_FIELDS}
  cfg, weights = checkpoint_lib.load_hf_checkpoint(
      config.init_checkpoint, dtype=plan.cfg.dtype,
      param_dtype=plan.base_dtype, **how)
  cfg = cfg.replace(**{k: v for k, v in plan.overrides.items()
                       if k not in how})
  if plan.spec is None:
    params, frozen = weights, None
  else:
    params = lora_lib.init_adapters(weights, plan.spec, plan.tcfg.seed)
    frozen = weights
  cfg_run = train_step.model_config_for_training(cfg, plan.tcfg)
  writer = _tb_writer(workdir, start)

  def callback(step: int, metrics: Mapping[str, float]) -> None:
    scalars = {k: metrics[k] for k in ("loss", "grad_norm", "learning_rate")}
    if cfg_run.is_moe:
      scalars.update(train_workdir.routing_values(metrics))
    for k, value in scalars.items():
      writer.add_scalar(f"train/{k}", value, step + 1)

  evaluator = Evaluator(workdir, plan, cfg_run, frozen, batches, prompts,
                        ev.get("max_new_tokens", 64), writer)
  label = progress if isinstance(progress, str) else (
      "lora" if plan.spec is not None else "finetune")
  try:
    result = train_lib.train(
        cfg, plan.tcfg, packed.batch, workdir, params=params,
        progress=label if progress else False, callback=callback,
        settings=settings, allow_changes=allow_changes,
        other_files=other_files, frozen=frozen, lora=plan.spec,
        mesh=plan.mesh, evaluator=evaluator,
        eval_every=config.get("eval_every", 0))
  finally:
    writer.close()
  state = result.state
  if evaluator.last is None or evaluator.last["step"] != int(
      jax.device_get(state.step)):
    evaluator(int(jax.device_get(state.step)), state)  # a finished run
  plot = plot_losses(workdir)
  stats = jax.devices()[0].memory_stats() or {}
  summary: dict[str, Any] = {
      "task": "finetune",
      "workdir": os.path.abspath(workdir),
      "step": int(jax.device_get(state.step)),
      "init_checkpoint": os.path.abspath(config.init_checkpoint),
      "mode": "lora" if plan.spec is not None else "full",
      "model": {
          "num_hidden_layers": cfg.num_hidden_layers,
          "hidden_size": cfg.hidden_size,
          "vocab_size": cfg.vocab_size,
          "params": train_step.param_count(weights),
          "trained_params": train_step.param_count(state.params),
          "base_dtype": plan.base_dtype,
          "compute_dtype": result.cfg.dtype,
      },
      "train": dict(
          result.summary(plan.tcfg.num_steps,
                         stats.get("peak_bytes_in_use")),
          mesh=config.get("mesh") or None),
      "data": dict(corpus.summary(),
                   rows_per_epoch=packed.rows_per_epoch(0)),
      "eval": evaluator.last,
      "loss_plot": plot,
  }
  if plan.spec is not None:
    adapter_dir = os.path.join(workdir, ADAPTER_DIR)
    lora_lib.save_adapter(adapter_dir, cfg, state.params, plan.spec,
                          os.path.abspath(config.init_checkpoint))
    summary["adapter"] = adapter_dir
  if export_hf:
    train_workdir.record_export(workdir, export_hf)
    if plan.spec is None:
      out_params = state.params
    else:
      out_params = lora_lib.merge(frozen, state.params, plan.spec)
    out_params = jax.device_get(out_params)
    try:
      train_checkpoint.export_hf(export_hf, cfg, out_params,
                                 dtype=_export_dtype(config),
                                 tokenizer_from=config.init_checkpoint)
    except ValueError as e:  # the folder changed since the check
      raise cli.UserError(
          f"--export_hf: {e}; the trained state is in the checkpoints of "
          f"{os.path.abspath(workdir)}: the same command with another "
          f"--export_hf exports it without training") from e
    summary["export_hf"] = os.path.abspath(export_hf)
  train_workdir.atomic_write(os.path.join(workdir, EVAL_FILE),
                             json.dumps(summary, indent=2,
                                        ensure_ascii=False))
  return summary


def format_summary(summary: Mapping[str, Any]) -> str:
  """A few human-readable lines of a fine-tuning summary."""
  m, t, ev = summary["model"], summary["train"], summary["eval"] or {}
  lines = [f"model:   {summary['init_checkpoint']} ({m['params']:,} "
           f"parameters), {summary['mode']} fine-tuning of "
           f"{m['trained_params']:,}"]
  lines += train_lib.summary_lines(t, summary["step"])
  if "loss" in ev:
    lines.append(f"eval:    held-out loss {ev['loss']:.4f} (perplexity "
                 f"{ev['perplexity']:.2f}) over {ev['tokens']:.0f} tokens")
  for s in ev.get("samples", [])[:1]:
    lines.append(f"sample:  {s['completion'][:100]!r}")
  lines.append(f"wrote:   {os.path.join(summary['workdir'], EVAL_FILE)}")
  if summary.get("adapter"):
    lines.append(f"adapter: {summary['adapter']}")
  if summary.get("export_hf"):
    lines.append(f"export:  {summary['export_hf']}")
  return "\n".join(lines)
