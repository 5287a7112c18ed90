"""The attention-ratio study: what does the share of full attention buy?

Trains the same small model at several `linear:full` layer ratios (equal
depth and width, same data, same steps, same seed) on a mixed task, then
measures for each:

  recall     multi-query associative recall (MQAR) accuracy at the trained
             length and at longer ones (more key-value pairs to remember,
             `--eval_lengths`); chance is 1 / value vocabulary.
  language   held-out byte-level text loss (bits per byte) on Python
             standard-library sources the model never trained on.
  speed      training tokens/s on this machine (after compilation).
  memory     decoding-cache bytes against context length (exact sizes of
             the KV cache and the Gated DeltaNet states) and the temporary
             memory of a compiled forward pass at that length (XLA's memory
             analysis; on a GPU also the measured peak).

Every batch holds MQAR rows and packed text rows (separate token ranges of
one vocabulary: bytes 0..255, then the MQAR tokens), with the loss of each
task weighted equally. Writes under --workdir:

  results.json, results.csv, results.md    one row per ratio (and the raw
                                           curves in the JSON)
  recall_vs_length.png, train_loss.png, memory_vs_context.png,
  summary.png                              plots
  runs/<ratio>/                            checkpoints and metrics.csv of
                                           each run (a rerun resumes them)

  # The README's main job (8 minutes on a 2-core CPU):
  python -m experiments.compare_ratios --workdir /tmp/qwen_jax_ratios
  # A two-minute smoke run (the numbers mean little):
  python -m experiments.compare_ratios --workdir /tmp/r --preset smoke
  # Your own sweep:
  python -m experiments.compare_ratios --workdir /tmp/r \\
      --ratios all-full,3:1,all-linear --num_layers 8 --steps 2000

Every flag, --workdir and (unless --no_plots) matplotlib are checked before
the first run trains; a misuse ends with one line on stderr and exit status
1 (2 for usage errors); see experiments/cli.py.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from qwen_jax import cache as cache_lib
from qwen_jax import data
from qwen_jax import train as train_lib
from qwen_jax import train_step
from qwen_jax.config import FULL, LINEAR, QwenConfig, layer_types_from_ratio
from qwen_jax.config import check_int, is_int, is_real
from qwen_jax.model import Qwen35

DEFAULT_RATIOS = ("all-full", "1:1", "3:1", "7:1", "all-linear")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Settings of one study; every ratio gets the same.

  Attributes:
    ratios: `linear:full` ratios (see `layer_types_from_ratio`).
    num_layers: depth (a multiple of every ratio's period).
    hidden_size: model width.
    num_heads: attention query heads (key/value heads: half of them) and
      Gated DeltaNet value heads (key heads: half of them).
    head_dim: head size of both kinds of layer.
    steps: optimizer steps per ratio.
    batch_size: rows per step (MQAR rows, then text rows).
    mqar_fraction: share of the rows that are MQAR (the two tasks weigh the
      same in the loss whatever their share of rows).
    seq_len: training tokens per row.
    learning_rate: peak AdamW learning rate.
    warmup_steps: linear warmup.
    num_pairs: MQAR key-value pairs at the training length.
    key_vocab: MQAR key tokens.
    value_vocab: MQAR value tokens (chance accuracy = 1 / value_vocab).
    eval_lengths: MQAR evaluation lengths; pairs grow in proportion.
    eval_batches: MQAR batches per length (of batch_size rows).
    text_eval_batches: held-out text batches.
    memory_lengths: context lengths of the memory table.
    gdr_chunk: chunk size of the gated delta rule during the study.
    seed: parameters and data.

  Raises:
    ValueError: a setting of the wrong type or out of range, named with the
      expected range and the value found (the fields are the flags of the
      same names), so that a bad study fails before any training.
  """
  ratios: tuple[str, ...] = DEFAULT_RATIOS
  num_layers: int = 8
  hidden_size: int = 64
  num_heads: int = 4
  head_dim: int = 16
  steps: int = 300
  batch_size: int = 16
  mqar_fraction: float = 0.75
  seq_len: int = 64
  learning_rate: float = 1e-3
  warmup_steps: int = 30
  num_pairs: int = 4
  key_vocab: int = 16
  value_vocab: int = 16
  eval_lengths: tuple[int, ...] = (64, 128, 256)
  eval_batches: int = 4
  text_eval_batches: int = 8
  memory_lengths: tuple[int, ...] = (1024, 16384, 262144)
  gdr_chunk: int = 32
  seed: int = 0

  def __post_init__(self):
    def bad(name: str, expected: str, found: Any = None) -> None:
      found = getattr(self, name) if found is None else found
      raise ValueError(f"{name}: expected {expected}, found {found!r}")

    for name, low in (("num_layers", 1), ("hidden_size", 1),
                      ("num_heads", 1), ("head_dim", 1), ("steps", 1),
                      ("batch_size", 2), ("seq_len", 1),
                      ("warmup_steps", 0), ("num_pairs", 1),
                      ("key_vocab", 1), ("value_vocab", 1),
                      ("eval_batches", 1), ("text_eval_batches", 1),
                      ("gdr_chunk", 1), ("seed", 0)):
      v = getattr(self, name)
      if not is_int(v) or v < low:
        bad(name, f"an int >= {low}")
    lr = self.learning_rate
    if not is_real(lr) or not 0 < lr < float("inf"):
      bad("learning_rate", "a finite number > 0")
    if not is_real(self.mqar_fraction) or not 0 < self.mqar_fraction < 1:
      bad("mqar_fraction", "a number in (0, 1)")
    n_mqar = int(round(self.batch_size * self.mqar_fraction))
    if not 1 <= n_mqar < self.batch_size:
      bad("batch_size", f"room for MQAR and text rows at mqar_fraction="
          f"{self.mqar_fraction}")
    if not self.ratios:
      bad("ratios", "at least one ratio")
    labels = [str(r).replace(":", "-") for r in self.ratios]  # ratio_label
    if len(set(labels)) != len(labels):
      bad("ratios", "distinct ratios (each run has its own directory)",
          ",".join(self.ratios))
    for name in ("eval_lengths", "memory_lengths"):
      lengths = getattr(self, name)
      if not lengths or not all(is_int(n) and n >= 1 for n in lengths):
        bad(name, "one or more ints >= 1", ",".join(map(str, lengths)))
    if self.num_pairs > self.key_vocab:
      bad("num_pairs", f"<= key_vocab={self.key_vocab} (keys are distinct)")
    for n in (self.seq_len,) + tuple(self.eval_lengths):
      pairs = self._pairs(n)
      if pairs > self.key_vocab:
        bad("eval_lengths", f"lengths whose pairs (num_pairs * length / "
            f"seq_len) fit key_vocab={self.key_vocab}; length {n} needs "
            f"{pairs} pairs", ",".join(map(str, self.eval_lengths)))
      try:
        self.mqar(n)
      except ValueError as e:
        where = "seq_len" if n == self.seq_len else "eval_lengths"
        raise ValueError(f"{where}: MQAR at length {n}: {e}") from e

  def replace(self, **changes: Any) -> "StudyConfig":
    return dataclasses.replace(self, **changes)

  def _pairs(self, seq_len: int) -> int:
    return max(1, self.num_pairs * seq_len // self.seq_len)

  def mqar(self, seq_len: int | None = None) -> data.MQARConfig:
    """The MQAR task at a length (pairs in proportion to the length)."""
    seq_len = self.seq_len if seq_len is None else seq_len
    check_int("seq_len", seq_len, 1)
    pairs = min(self._pairs(seq_len), self.key_vocab)
    return data.MQARConfig(seq_len=seq_len, num_pairs=pairs,
                           key_vocab=self.key_vocab,
                           value_vocab=self.value_vocab)

  @property
  def vocab_size(self) -> int:
    """Bytes, then the MQAR tokens (pad, keys, values)."""
    return data.BYTE_VOCAB + self.mqar().vocab_size


# Named settings. "default" is the README's main job; "smoke" checks the
# plumbing (about two minutes on 2 cores; the numbers mean little).
PRESETS: dict[str, StudyConfig] = {
    "default": StudyConfig(),
    "smoke": StudyConfig(
        num_layers=8, hidden_size=32, num_heads=2, head_dim=16, steps=6,
        batch_size=4, seq_len=64, warmup_steps=2, num_pairs=4,
        key_vocab=16, value_vocab=16, eval_lengths=(64, 128),
        eval_batches=1, text_eval_batches=1, memory_lengths=(256, 1024)),
}


# ------------------------------------------------------------------ model
def model_config(study: StudyConfig, ratio: str) -> QwenConfig:
  """The model of one ratio: same shapes for every ratio but the pattern."""
  h = study.num_heads
  kv = max(1, h // 2)
  return QwenConfig(
      vocab_size=study.vocab_size, hidden_size=study.hidden_size,
      intermediate_size=2 * study.hidden_size,
      num_hidden_layers=study.num_layers,
      layer_types=layer_types_from_ratio(ratio, study.num_layers),
      num_attention_heads=h, num_key_value_heads=kv,
      head_dim=study.head_dim, linear_num_key_heads=kv,
      linear_num_value_heads=h, linear_key_head_dim=study.head_dim,
      linear_value_head_dim=study.head_dim, linear_conv_kernel_dim=4,
      rope_theta=1e4, partial_rotary_factor=0.5,
      max_position_embeddings=max(study.memory_lengths +
                                  study.eval_lengths + (study.seq_len,)),
      tie_word_embeddings=True, gdr_chunk_size=study.gdr_chunk)


def ratio_label(ratio: str) -> str:
  """A file-system-safe name: "3:1" -> "3-1"."""
  return ratio.replace(":", "-")


# ------------------------------------------------------------------- data
def _offset_mqar(batch: data.Batch) -> data.Batch:
  """MQAR tokens moved after the byte range of the shared vocabulary."""
  out = dict(batch)
  for name in ("inputs", "targets"):
    out[name] = batch[name] + data.BYTE_VOCAB
  return out


def _weighted(batch: data.Batch, total: float) -> data.Batch:
  """The batch with its loss mask rescaled to sum to `total`."""
  out = dict(batch)
  m = batch["loss_mask"].astype(np.float32)
  out["loss_mask"] = m * (total / max(float(m.sum()), 1.0))
  return out


def _concat(a: data.Batch, b: data.Batch) -> data.Batch:
  return {k: np.concatenate([a[k], b[k]], axis=0) for k in a}


class MixedData:
  """Training batches: MQAR rows then text rows, each task half the loss.

  A pure function of (seed, step), so a resumed run sees the same data.
  """

  def __init__(self, study: StudyConfig):
    self.study = study
    self.task = study.mqar()
    self.text = data.TextData(study.seq_len, "train")
    self.n_mqar = int(round(study.batch_size * study.mqar_fraction))
    self.n_text = study.batch_size - self.n_mqar
    if self.n_mqar < 1 or self.n_text < 1:
      raise ValueError(
          f"batch_size: expected room for MQAR and text rows at "
          f"mqar_fraction={study.mqar_fraction}, found {study.batch_size}")

  def __call__(self, step: int) -> data.Batch:
    s = self.study
    recall = _offset_mqar(data.mqar_batch(self.task, self.n_mqar, s.seed,
                                          step))
    text = self.text.batch(self.n_text, s.seed, step)
    # Equal weight per task: each mask sums to half the batch's tokens.
    half = 0.5 * s.batch_size * s.seq_len
    return _concat(_weighted(recall, half), _weighted(text, half))


def mqar_eval_batches(study: StudyConfig, seq_len: int) -> list[data.Batch]:
  """Held-out MQAR batches at a length (a seed no training step uses)."""
  task = study.mqar(seq_len)
  return [_offset_mqar(data.mqar_batch(task, study.batch_size,
                                       study.seed + 10_000, i))
          for i in range(study.eval_batches)]


# ----------------------------------------------------------------- memory
def forward_memory(cfg: QwenConfig, seq_len: int) -> dict[str, float]:
  """Memory of a compiled batch-1 forward (no logits) at `seq_len` tokens.

  Compiles without running: XLA's memory analysis of the program (weights
  as arguments, temporaries, outputs). On a GPU the program is also run
  once and the device's peak is read.
  """
  model = Qwen35(cfg)
  params = jax.eval_shape(lambda: train_step.init_params(cfg, 0))
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)

  def hidden(p, x):
    return model.apply({"params": p}, x, return_hidden=True)[1]

  compiled = jax.jit(hidden).lower(params, ids).compile()
  out = {"temp_bytes": float("nan"), "argument_bytes": float("nan")}
  mem = compiled.memory_analysis()
  if mem is not None:
    out["temp_bytes"] = float(mem.temp_size_in_bytes)
    out["argument_bytes"] = float(mem.argument_size_in_bytes)
  if jax.default_backend() == "gpu":
    real = train_step.init_params(cfg, 0)
    jax.block_until_ready(compiled(real, jnp.zeros((1, seq_len), jnp.int32)))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["measured_peak_bytes"] = float(stats["peak_bytes_in_use"])
  return out


def memory_table(cfg: QwenConfig,
                 lengths: Sequence[int]) -> list[dict[str, float]]:
  """Per context length: decode-cache bytes by kind and forward memory."""
  rows = []
  for n in lengths:
    kinds = cache_lib.cache_bytes_by_kind(cfg, 1, n, jnp.bfloat16)
    total = cache_lib.cache_bytes(cfg, 1, n, jnp.bfloat16)
    row = {"context": n, "cache_bytes": float(total),
           "kv_bytes": float(kinds["kv"]),
           "state_bytes": float(kinds["state"] + kinds["conv"])}
    row.update(forward_memory(cfg, n))
    rows.append(row)
  return rows


# -------------------------------------------------------------------- run
def run_ratio(study: StudyConfig, ratio: str, workdir: str, index: int,
              total: int, mixed: MixedData) -> dict[str, Any]:
  """Trains and evaluates one ratio; returns its result row."""
  cfg = model_config(study, ratio)
  tcfg = train_step.TrainConfig(
      batch_size=study.batch_size, seq_len=study.seq_len,
      num_steps=study.steps, learning_rate=study.learning_rate,
      warmup_steps=study.warmup_steps, weight_decay=0.01, seed=study.seed,
      log_every=max(1, study.steps // 20),
      checkpoint_every=max(1, study.steps // 2), keep_checkpoints=1)
  run_dir = os.path.join(workdir, "runs", ratio_label(ratio))
  label = f"[{index}/{total}] {ratio:>10}"
  result = train_lib.train(cfg, tcfg, mixed, run_dir, progress=label)
  params, cfg = result.state.params, result.cfg

  # Every evaluation batch is right-padded to one length (a causal model
  # gives the same outputs on the real tokens), so one program serves all.
  t0 = time.time()
  eval_len = max(study.eval_lengths + (study.seq_len,))
  eval_step = train_step.make_eval_step(cfg)

  def pad(batches):
    return [data.pad_batch(b, eval_len) for b in batches]

  recall = {}
  for n in study.eval_lengths:
    ev = train_lib.evaluate(cfg, params, pad(mqar_eval_batches(study, n)),
                            eval_step=eval_step)
    recall[n] = ev["accuracy"]
  text = data.TextData(study.seq_len, "eval")
  ev_text = train_lib.evaluate(
      cfg, params, pad(text.eval_batches(study.batch_size,
                                         study.text_eval_batches)),
      eval_step=eval_step)
  memory = memory_table(cfg, study.memory_lengths)
  eval_s = time.time() - t0

  n_lin = cfg.layer_types.count(LINEAR)
  n_full = cfg.layer_types.count(FULL)
  row = {
      "ratio": ratio,
      "linear_layers": n_lin,
      "full_layers": n_full,
      "params": train_step.param_count(params),
      "final_train_loss": (result.history[-1]["loss"] if result.history
                           else float("nan")),
      "text_loss": ev_text["loss"],
      "text_bits_per_byte": ev_text["loss"] / np.log(2.0),
      "tokens_per_s": result.tokens_per_s,
      "compile_s": result.compile_s,
      "train_s": result.train_s,
      "eval_s": eval_s,
      "resumed_from": result.resumed_from,
      "recall": {str(k): v for k, v in recall.items()},
      "memory": memory,
      "loss_curve": [(h["step"], h["loss"]) for h in result.history],
  }
  summary = "  ".join(f"recall@{k} {v:.2f}" for k, v in recall.items())
  print(f"{label}: {summary}  text {row['text_bits_per_byte']:.2f} bpb  "
        f"{row['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
  return row


def run_study(study: StudyConfig, workdir: str,
              plots: bool = True) -> dict[str, Any]:
  """Runs every ratio and writes the results; returns the JSON record."""
  for r in study.ratios:
    layer_types_from_ratio(r, study.num_layers)  # fail before training
  os.makedirs(workdir, exist_ok=True)
  mixed = MixedData(study)
  t0 = time.time()
  rows = [run_ratio(study, r, workdir, i + 1, len(study.ratios), mixed)
          for i, r in enumerate(study.ratios)]
  record = {
      "study": dataclasses.asdict(study),
      "chance_accuracy": study.mqar().chance_accuracy,
      "results": rows,
      "elapsed_s": time.time() - t0,
      "environment": environment(),
  }
  write_results(record, workdir)
  if plots:
    write_plots(record, workdir)
  return record


def environment() -> dict[str, str]:
  dev = jax.devices()[0]
  return {
      "date": datetime.date.today().isoformat(),
      "device": f"{dev.platform}: {dev.device_kind}",
      "jax": jax.__version__,
      "python": platform.python_version(),
      "cpu_count": str(os.cpu_count()),
  }


# ----------------------------------------------------------------- output
def _human_bytes(n: float) -> str:
  if not np.isfinite(n):
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def markdown_table(record: dict[str, Any]) -> str:
  """The results as a markdown table (one row per ratio)."""
  study = record["study"]
  lengths = [str(n) for n in study["eval_lengths"]]
  long_ctx = study["memory_lengths"][-1]
  head = (["ratio", "lin/full", "params"] +
          [f"recall@{n}" for n in lengths] +
          ["text bpb", "train tok/s", f"cache @{long_ctx}",
           f"fwd temp @{long_ctx}"])
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for r in record["results"]:
    mem = r["memory"][-1]
    cells = ([r["ratio"], f"{r['linear_layers']}/{r['full_layers']}",
              f"{r['params']:,}"] +
             [f"{r['recall'][n]:.3f}" for n in lengths] +
             [f"{r['text_bits_per_byte']:.3f}", f"{r['tokens_per_s']:,.0f}",
              _human_bytes(mem["cache_bytes"]),
              _human_bytes(mem["temp_bytes"])])
    lines.append("| " + " | ".join(cells) + " |")
  env = record["environment"]
  pairs = [study["num_pairs"] * n // study["seq_len"]
           for n in study["eval_lengths"]]
  lines += [
      "",
      f"Recall: MQAR accuracy at the query tokens, trained at "
      f"{study['seq_len']} tokens with {study['num_pairs']} pairs; "
      f"evaluated with {', '.join(map(str, pairs))} pairs at "
      f"{', '.join(lengths)} tokens (chance "
      f"{record['chance_accuracy']:.3f}). Text: held-out bits per byte. "
      f"Cache: decoding cache for one sequence (bf16 K/V, f32 states); "
      f"fwd temp: XLA's memory analysis of a compiled batch-1 forward.",
      f"{study['steps']} steps of {study['batch_size']} x "
      f"{study['seq_len']} tokens per ratio, {env['device']}, jax "
      f"{env['jax']}, {env['date']}, {record['elapsed_s']:.0f} s in all.",
  ]
  return "\n".join(lines) + "\n"


def write_results(record: dict[str, Any], workdir: str) -> None:
  """results.json, results.csv and results.md under workdir."""
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(record, f, indent=1, default=float)
  lengths = [str(n) for n in record["study"]["eval_lengths"]]
  fields = (["ratio", "linear_layers", "full_layers", "params"] +
            [f"recall@{n}" for n in lengths] +
            ["text_loss", "text_bits_per_byte", "final_train_loss",
             "tokens_per_s", "compile_s", "train_s"] +
            [f"cache_bytes@{m['context']}"
             for m in record["results"][0]["memory"]] +
            [f"forward_temp_bytes@{m['context']}"
             for m in record["results"][0]["memory"]])
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    for r in record["results"]:
      row = {k: r[k] for k in fields if k in r}
      for n in lengths:
        row[f"recall@{n}"] = r["recall"][n]
      for m in r["memory"]:
        row[f"cache_bytes@{m['context']}"] = m["cache_bytes"]
        row[f"forward_temp_bytes@{m['context']}"] = m["temp_bytes"]
      w.writerow(row)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown_table(record))


def write_plots(record: dict[str, Any], workdir: str) -> list[str]:
  """The PNG plots; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = record["results"]
  study = record["study"]
  paths = []

  def save(fig, name):
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(6, 4))
  lengths = study["eval_lengths"]
  for r in rows:
    ax.plot(lengths, [r["recall"][str(n)] for n in lengths], "o-",
            label=r["ratio"])
  ax.axhline(record["chance_accuracy"], color="gray", ls=":", label="chance")
  ax.axvline(study["seq_len"], color="gray", ls="--", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length (pairs grow in proportion)")
  ax.set_ylabel("MQAR accuracy")
  ax.set_ylim(0, 1.02)
  ax.set_title("Recall against length (dashed: trained length)")
  ax.legend(fontsize=8)
  save(fig, "recall_vs_length.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    curve = np.asarray(r["loss_curve"], float)
    if len(curve):
      ax.plot(curve[:, 0], curve[:, 1], label=r["ratio"])
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (MQAR + text)")
  ax.set_title("Training loss")
  ax.legend(fontsize=8)
  save(fig, "train_loss.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ctx = [m["context"] for m in r["memory"]]
    ax.plot(ctx, [m["cache_bytes"] / 2**20 for m in r["memory"]], "o-",
            label=r["ratio"])
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("decoding cache (MiB, batch 1)")
  ax.set_title("Cache memory against context")
  ax.legend(fontsize=8)
  save(fig, "memory_vs_context.png")

  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  names = [r["ratio"] for r in rows]
  x = np.arange(len(rows))
  axes[0].bar(x, [r["recall"][str(lengths[0])] for r in rows])
  axes[0].axhline(record["chance_accuracy"], color="gray", ls=":")
  axes[0].set_title(f"MQAR accuracy @{lengths[0]} (dotted: chance)")
  axes[1].bar(x, [r["text_bits_per_byte"] for r in rows])
  axes[1].set_title("held-out text (bits/byte)")
  axes[2].bar(x, [r["tokens_per_s"] / 1e3 for r in rows])
  axes[2].set_title("training k tokens/s")
  for ax in axes:
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, fontsize=8)
  save(fig, "summary.png")
  return paths


# ------------------------------------------------------------------ flags
def _list_of_ints(v: Sequence[str]) -> tuple[int, ...]:
  return tuple(int(x) for x in v)


# (flag = StudyConfig field, parser, help); an absent flag keeps the
# preset's value.
_FLAG_FIELDS = (
    ("ratios", tuple, "Ratios, e.g. all-full,1:1,3:1,7:1,all-linear."),
    ("num_layers", int, "Depth (a multiple of every ratio's period)."),
    ("hidden_size", int, "Width."),
    ("steps", int, "Optimizer steps per ratio."),
    ("batch_size", int, "Rows per step."),
    ("seq_len", int, "Training length."),
    ("learning_rate", float, "Peak learning rate."),
    ("num_pairs", int, "MQAR pairs at the training length."),
    ("key_vocab", int, "MQAR key tokens."),
    ("value_vocab", int, "MQAR value tokens (chance = 1 / value_vocab)."),
    ("eval_lengths", _list_of_ints, "MQAR evaluation lengths."),
    ("memory_lengths", _list_of_ints, "Context lengths of the memory table."),
    ("seed", int, "Seed of parameters and data."),
)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS
                 ) -> dict[str, flags.FlagHolder]:
  """Defines the script's flags on `flag_values`.

  Called when the script runs, not on import, so that this module can be
  imported next to other experiment scripts that define --workdir or
  --preset too.
  """
  holders = {
      "workdir": flags.DEFINE_string("workdir", None, "Output folder.",
                                     required=True, flag_values=flag_values),
      "preset": flags.DEFINE_enum(
          "preset", "default", sorted(PRESETS),
          "Named settings; the flags below override them.",
          flag_values=flag_values),
      "no_plots": flags.DEFINE_bool("no_plots", False, "Skip the PNG plots.",
                                    flag_values=flag_values),
  }
  for name, parse, help_text in _FLAG_FIELDS:
    define = (flags.DEFINE_list if parse in (tuple, _list_of_ints) else
              {int: flags.DEFINE_integer,
               float: flags.DEFINE_float}[parse])
    holders[name] = define(name, None, help_text, flag_values=flag_values)
  return holders


def study_from_flags(holders: dict[str, flags.FlagHolder]) -> StudyConfig:
  """The preset named by --preset with the flags that were given.

  Raises:
    cli.UserError (a ValueError): a bad flag, named as "--flag", or a ratio
      the depth cannot follow.
  """
  study = PRESETS[holders["preset"].value]
  changes = {}
  for name, parse, _ in _FLAG_FIELDS:
    value = holders[name].value
    if value is not None:
      try:
        changes[name] = parse(value)
      except ValueError as e:
        raise cli.UserError(f"--{name}: expected a comma-separated list of "
                            f"integers, found {','.join(value)!r}") from e
  # StudyConfig checks every field: a bad flag fails here, before training.
  try:
    study = study.replace(**changes)
  except ValueError as e:
    field = str(e).split(":", 1)[0]
    flag = "--" if field in {f[0] for f in _FLAG_FIELDS} else ""
    raise cli.UserError(f"{flag}{e}") from e
  for r in study.ratios:
    with cli.user_errors(f"--ratios {r!r} with --num_layers "
                         f"{study.num_layers}"):
      layer_types_from_ratio(r, study.num_layers)
  return study


def main(argv):
  del argv  # cli.run refuses positional arguments
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  workdir = cli.writable_folder("--workdir", _HOLDERS["workdir"].value)
  study = study_from_flags(_HOLDERS)
  plots = not _HOLDERS["no_plots"].value
  if plots and importlib.util.find_spec("matplotlib") is None:
    raise cli.UserError("plots: expected matplotlib (pip install "
                        "matplotlib), found it missing; --no_plots skips "
                        "the plots")
  cli.hold_interrupts_inside("orbax")  # no half-written checkpoint
  record = run_study(study, workdir, plots=plots)
  print()
  print(markdown_table(record))
  print(f"Results, plots and runs under {os.path.abspath(workdir)}")


if __name__ == "__main__":
  _HOLDERS = define_flags()
  cli.run(main)
