"""The attention-ratio study: what do the share and the depth of full
attention buy?

Trains the same small model (equal depth and width, same data, same steps)
with several layer patterns, each `--seeds` times (run k draws its
parameters and its data order from seed + k), on a mixed task, and
measures for each:

  recall     multi-query associative recall (MQAR) accuracy at the trained
             length and at longer ones with more key-value pairs in
             proportion (`--eval_lengths`): how much a model holds.
  retrieval  a needle (one MQAR key-value pair) hidden in held-out text
             and asked for at the end, and MQAR with the trained number of
             pairs, at lengths far past the trained one
             (`--retrieval_lengths`): how far recall carries. Evaluated by
             a chunked prefill through the decoding cache (no gradients,
             `--retrieval_chunk` tokens per call), and shown beside the
             size of that cache at each length.
  language   held-out byte-level text loss (bits per byte) on Python
             standard-library sources the model never trained on.
  speed      training tokens/s on this machine (after compilation).
  memory     decoding-cache bytes against context length (exact sizes of
             the KV cache and the Gated DeltaNet states) and the temporary
             memory of a compiled forward pass at that length (XLA's memory
             analysis; on a GPU also the measured peak).

The layer patterns ("configurations"), one letter per layer from the
bottom (next to the embedding), L = Gated DeltaNet, F = full attention:

  --ratios      `linear:full` ratios, full attention closing every group
                (3:1 = LLLF LLLF, Qwen3.5's layout), all-full, all-linear;
  --placements  the full-attention layers of `--placement_ratio` at other
                depths: periodic, bottom, top, middle, ends
                (`qwen_jax.layer_pattern.layer_types_from_placement`);
  --patterns    explicit patterns, e.g. "FLLL LLLF".

A pattern given twice runs once (the 3:1 ratio is the periodic placement
at 3:1).

A second axis, the MLP of every layer (`--mlps`, default `dense` only):
each entry runs with every pattern, as its own configuration.

  dense         the SwiGLU MLP of intermediate_size = 2 * hidden_size.
  moe:E:k       E routed experts (top-k routing) and a gated shared expert
                (`qwen_jax.moe`), named "3:1 moe8x2" (folder 3-1_moe8x2).
                The MLPs are matched at equal active parameters per token:
                each routed expert has width intermediate_size // (k + 1),
                the shared expert the rest, so the k experts a token is
                sent to and the shared expert hold exactly the dense MLP's
                3 * hidden_size * intermediate_size weights. The router
                (hidden_size * E) and the shared expert's gate
                (hidden_size) are left out of the match: they come on top,
                the cost of routing, and are counted in the reported
                active parameters (all parameters less the E - k experts a
                token is not sent to, per layer). The load-balancing loss
                enters training with QwenConfig's router_aux_loss_coef
                (0.001); each run reports its routing at the end of
                training on held-out batches (the load-balancing loss, the
                busiest and idlest expert's load).

Every batch holds MQAR rows and text rows, each text row with a
needle: a key-value pair of MQAR tokens at a random depth, its key again
at the end (separate token ranges of one vocabulary: bytes 0..255, then
the MQAR tokens). Recall (the MQAR queries and the needles' answers) is
half of the loss, the text the other half.

Writes under --workdir:

  report.md               tables, plots, the command, the versions and a
                          paragraph written from the numbers
  results.json, .csv, .md per configuration the mean and 95% interval over
                          the seeds (Student-t), and every run's numbers
  recall_vs_length.png, retrieval_vs_length.png, train_loss.png,
  memory_vs_context.png, summary.png    plots (error bars: 95% intervals)
  runs/<config>/seed-<k>/ checkpoints, metrics.csv, settings.json and
                          result.json of one run (<config>: the label,
                          "3-1", "3-1_bottom", "3-1_moe8x2")
  runs/<config>/memory.json             the memory table of one pattern
  jax_cache/              compiled programs (JAX's persistent cache), so
                          that seeds and reruns compile each program once

A rerun in the same --workdir reuses every finished run: with more --seeds
it trains only the new seeds, with the same settings nothing, with other
evaluation settings it evaluates again from the checkpoints; a run of
other training settings is refused before anything trains.

  # The README's main job (one seed, under 10 minutes on a 2-core CPU):
  python -m experiments.compare_ratios --workdir /tmp/qwen_jax_ratios
  # The same study with three seeds (reuses the seed-0 runs above):
  python -m experiments.compare_ratios --workdir /tmp/qwen_jax_ratios \\
      --seeds 3
  # Plumbing in a few minutes (the numbers mean little):
  python -m experiments.compare_ratios --workdir /tmp/r --preset smoke
  # Tens of millions of parameters, retrieval to 64k tokens (one GPU):
  python -m experiments.compare_ratios --workdir /tmp/r --preset gpu
  # Your own:
  python -m experiments.compare_ratios --workdir /tmp/r --ratios 3:1 \\
      --placements periodic,bottom,top --patterns "FLLL LLLF" --seeds 5
  # Dense against mixture of experts at equal active parameters (8 routed
  # experts, top-2), smoke-sized (a few minutes on 2 CPU cores):
  python -m experiments.compare_ratios --workdir /tmp/r --preset smoke \\
      --ratios 3:1,all-linear --placements= --mlps dense,moe:8:2

Every flag, --workdir, the runs already there and (unless --no_plots)
matplotlib are checked before the first run trains; a misuse ends with one
line on stderr and exit status 1 (2 for usage errors); see
experiments/cli.py.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments import ratio_report as report
from qwen_jax import cache as cache_lib
from qwen_jax import data
from qwen_jax import layer_pattern
from qwen_jax import moe as moe_lib
from qwen_jax import train as train_lib
from qwen_jax import train_step
from qwen_jax.config import FULL, LINEAR, QwenConfig, layer_types_from_ratio
from qwen_jax.config import is_int, is_real
from qwen_jax.model import Qwen35

# Tokens of a needle row beyond the text: the pair, then the key.
NEEDLE_MIN_LENGTH = 3
# Positions (RoPE) the models accept: Qwen3.5's native context. Fixed, so
# that the trained model's config (which a checkpoint records) does not
# depend on the evaluation lengths.
MAX_POSITIONS = 262144


# --------------------------------------------------------- configurations
def ratio_name(layer_types: Sequence[str]) -> str:
  """"3:1" for LLLF LLLF (reduced), "all-full", "all-linear"."""
  n_lin, n_full = layer_types.count(LINEAR), layer_types.count(FULL)
  if n_lin == 0:
    return "all-full"
  if n_full == 0:
    return "all-linear"
  g = math.gcd(n_lin, n_full)
  return f"{n_lin // g}:{n_full // g}"


def _named_placement(layer_types: tuple[str, ...]) -> str | None:
  """The named placement that gives this pattern, if one does."""
  n, f = len(layer_types), layer_types.count(FULL)
  for name in layer_pattern.PLACEMENTS:
    try:
      if layer_pattern.layer_types_from_placement(name, n, f) == layer_types:
        return name
    except ValueError:
      continue
  return None


# ------------------------------------------------------------------- MLPs
DENSE_MLP = "dense"
_MOE_MLP = re.compile(r"moe:([0-9]+):([0-9]+)")


def parse_mlp(mlp: str) -> tuple[int, int] | None:
  """(E routed experts, top-k) of "moe:E:k"; None for "dense".

  Raises:
    ValueError: neither "dense" nor "moe:E:k" with integers E >= k >= 1,
      named as the `mlps` field.
  """
  if mlp == DENSE_MLP:
    return None
  m = _MOE_MLP.fullmatch(str(mlp))
  if m is None:
    raise ValueError(f"mlps: expected entries 'dense' or 'moe:E:k' (E "
                     f"routed experts, top-k; integers), found {mlp!r}")
  e, k = int(m.group(1)), int(m.group(2))
  if not e >= k >= 1:
    raise ValueError(f"mlps: expected 'moe:E:k' with E >= k >= 1, found "
                     f"{mlp!r} (E={e}, k={k})")
  return e, k


def moe_widths(intermediate_size: int, k: int) -> tuple[int, int]:
  """(routed expert width, shared expert width) whose k routed experts and
  shared expert hold as many weights as one dense MLP of
  `intermediate_size`: each routed expert intermediate_size // (k + 1),
  the shared expert the rest (k * expert + shared = intermediate_size
  exactly, the shared expert at most k wider than a routed one).

  Raises:
    ValueError: the routed width would be 0 (k + 1 > intermediate_size).
  """
  expert = intermediate_size // (k + 1)
  if expert < 1:
    raise ValueError(f"k: expected k + 1 <= intermediate_size="
                     f"{intermediate_size}, found {k}")
  return expert, intermediate_size - k * expert


def mlp_suffix(mlp: str) -> str:
  """The configuration name's suffix: "" for dense, " moe8x2" for
  "moe:8:2"."""
  moe = parse_mlp(mlp)
  return "" if moe is None else f" moe{moe[0]}x{moe[1]}"


@dataclasses.dataclass(frozen=True)
class Configuration:
  """One (layer pattern, MLP) pair of the study.

  Attributes:
    name: "3:1", "3:1 bottom", or the pattern ("FLLLLLLF"), with the MLP's
      suffix for a mixture of experts ("3:1 moe8x2").
    layer_types: one entry per layer, bottom first.
    placement: "periodic", "bottom", "top", "middle", "ends", "pattern"
      (an explicit pattern matching no named placement), or "-" (one kind
      of layer only).
    mlp: every layer's MLP: "dense" or "moe:E:k" (`parse_mlp`).
  """
  name: str
  layer_types: tuple[str, ...]
  placement: str
  mlp: str = DENSE_MLP

  @property
  def ratio(self) -> str:
    return ratio_name(self.layer_types)

  @property
  def pattern(self) -> str:
    return layer_pattern.pattern_string(self.layer_types)

  @property
  def label(self) -> str:
    """A file-system-safe name: "3:1 bottom" -> "3-1_bottom", "3:1
    moe8x2" -> "3-1_moe8x2"."""
    return self.name.replace(":", "-").replace(" ", "_")


def ratio_label(ratio: str) -> str:
  """A file-system-safe name: "3:1" -> "3-1"."""
  return ratio.replace(":", "-")


def _placement_of(layer_types: tuple[str, ...]) -> str:
  if len(set(layer_types)) == 1:
    return "-"
  return _named_placement(layer_types) or "pattern"


# ------------------------------------------------------------------ study
@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Settings of one study; every configuration gets the same.

  Attributes:
    ratios: `linear:full` ratios (see `layer_types_from_ratio`).
    placements: named depths (`layer_pattern.PLACEMENTS`) of the
      full-attention layers of `placement_ratio`.
    placement_ratio: the ratio whose full-attention layers `placements`
      moves.
    patterns: explicit patterns, "LLFF LLLL" (L linear, F full; bottom
      first; spaces ignored).
    mlps: the MLP of every layer, each entry a second axis of the study
      (every layer pattern with every entry): "dense" (SwiGLU of
      `intermediate_size`) or "moe:E:k" (E routed experts, top-k, and a
      gated shared expert, widths from `moe_widths`: the same active
      MLP weights per token as the dense MLP).
    seeds: runs per configuration; run k uses seed + k for parameters and
      data order (the evaluation data are the same for every run).
    num_layers: depth (a multiple of every ratio's period).
    hidden_size: model width.
    num_heads: attention query heads (key/value heads: half of them) and
      Gated DeltaNet value heads (key heads: half of them).
    head_dim: head size of both kinds of layer.
    steps: optimizer steps per run.
    batch_size: rows per step (MQAR rows, then text rows, each with a
      needle).
    mqar_fraction: share of the rows that are MQAR (recall is half of the
      loss and text the other half whatever the share of rows).
    seq_len: training tokens per row.
    learning_rate: peak AdamW learning rate.
    warmup_steps: linear warmup.
    num_pairs: MQAR key-value pairs at the training length.
    key_vocab: MQAR key tokens.
    value_vocab: MQAR value tokens (chance accuracy = 1 / value_vocab).
    eval_lengths: MQAR evaluation lengths; pairs grow in proportion.
    eval_batches: MQAR batches per length (of batch_size rows).
    text_eval_batches: held-out text batches.
    retrieval_lengths: lengths of the needle and fixed-pair MQAR
      evaluation.
    retrieval_rows: rows per task and length.
    retrieval_chunk: tokens per prefill call of the retrieval evaluation.
    memory_lengths: context lengths of the memory table.
    gdr_chunk: chunk size of the gated delta rule during the study.
    seed: the first run's seed of parameters and data.

  Raises:
    ValueError: a setting of the wrong type or out of range, named with the
      expected range and the value found (the fields are the flags of the
      same names), so that a bad study fails before any training.
  """
  ratios: tuple[str, ...] = ("all-full", "3:1", "7:1", "all-linear")
  placements: tuple[str, ...] = ("periodic", "bottom", "top")
  placement_ratio: str = "3:1"
  patterns: tuple[str, ...] = ()
  mlps: tuple[str, ...] = (DENSE_MLP,)
  seeds: int = 1
  num_layers: int = 8
  hidden_size: int = 64
  num_heads: int = 4
  head_dim: int = 16
  steps: int = 250
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
  retrieval_lengths: tuple[int, ...] = (64, 256, 1024, 4096)
  retrieval_rows: int = 4
  retrieval_chunk: int = 256
  memory_lengths: tuple[int, ...] = (1024, 16384, 262144)
  gdr_chunk: int = 32
  seed: int = 0

  def __post_init__(self):
    def bad(name: str, expected: str, found: Any = None) -> None:
      found = getattr(self, name) if found is None else found
      raise ValueError(f"{name}: expected {expected}, found {found!r}")

    for name, low in (("seeds", 1), ("num_layers", 1), ("hidden_size", 1),
                      ("num_heads", 1), ("head_dim", 1), ("steps", 1),
                      ("batch_size", 2), ("seq_len", 1),
                      ("warmup_steps", 0), ("num_pairs", 1),
                      ("key_vocab", 1), ("value_vocab", 1),
                      ("eval_batches", 1),
                      ("text_eval_batches", 1), ("retrieval_rows", 1),
                      ("retrieval_chunk", 1), ("gdr_chunk", 1),
                      ("seed", 0)):
      v = getattr(self, name)
      if not is_int(v) or v < low:
        bad(name, f"an int >= {low}")
    lr = self.learning_rate
    if not is_real(lr) or not 0 < lr < float("inf"):
      bad("learning_rate", "a finite number > 0")
    if not is_real(self.mqar_fraction) or not 0 < self.mqar_fraction < 1:
      bad("mqar_fraction", "a number in (0, 1)")
    if min(self.rows()) < 1:
      bad("batch_size", f"room for MQAR and text rows at mqar_fraction="
          f"{self.mqar_fraction}")
    labels = [ratio_label(str(r)) for r in self.ratios]
    if len(set(labels)) != len(labels):
      bad("ratios", "distinct ratios (each run has its own directory)",
          ",".join(self.ratios))
    for r in self.ratios:
      try:
        layer_types_from_ratio(r, self.num_layers)
      except ValueError as e:
        raise ValueError(f"ratios: {r!r} with num_layers={self.num_layers}:"
                         f" {e}") from None
    if len(set(self.placements)) != len(self.placements):
      bad("placements", "distinct placements", ",".join(self.placements))
    full = self.placement_full_layers
    for p in self.placements:
      try:
        layer_pattern.layer_types_from_placement(p, self.num_layers, full)
      except ValueError as e:
        raise ValueError(f"placements: {p!r} of placement_ratio="
                         f"{self.placement_ratio!r} over num_layers="
                         f"{self.num_layers}: {e}") from None
    for p in self.patterns:
      try:
        types = layer_pattern.layer_types_from_string(p)
      except ValueError:
        bad("patterns", "letters L (linear) and F (full), one per layer", p)
      if len(types) != self.num_layers:
        bad("patterns", f"num_layers={self.num_layers} letters L/F, one "
            f"per layer", p)
    self._check_mlps(bad)
    if not self.configurations():
      bad("ratios", "at least one ratio, placement or pattern", "none")
    for name in ("eval_lengths", "retrieval_lengths", "memory_lengths"):
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
    need = NEEDLE_MIN_LENGTH
    if self.seq_len < need:
      bad("seq_len", f">= {need} (a needle: its pair, then its key)")
    for n in self.retrieval_lengths:
      if n < need:
        bad("retrieval_lengths", f"lengths >= {need} (a needle: its pair, "
            f"then its key)", ",".join(map(str, self.retrieval_lengths)))
      try:
        self.mqar_fixed(n)
      except ValueError as e:
        raise ValueError(f"retrieval_lengths: MQAR with {self.num_pairs} "
                         f"pairs at length {n}: {e}") from e

  def _check_mlps(self, bad) -> None:
    if isinstance(self.mlps, str) or not self.mlps:
      bad("mlps", "one or more of 'dense', 'moe:E:k'", self.mlps)
    kinds = [parse_mlp(m) for m in self.mlps]
    if len(set(kinds)) != len(kinds):
      bad("mlps", "distinct entries (each has its own run directories)",
          ",".join(self.mlps))
    for mlp, moe in zip(self.mlps, kinds):
      if moe is not None and moe[1] + 1 > self.intermediate_size:
        bad("mlps", f"top-k + 1 <= {self.intermediate_size}, the dense MLP "
            f"width (2 * hidden_size; each routed expert gets width // "
            f"(k + 1))", mlp)

  def replace(self, **changes: Any) -> "StudyConfig":
    return dataclasses.replace(self, **changes)

  @property
  def intermediate_size(self) -> int:
    """Width of the dense MLP (SwiGLU), twice the model width."""
    return 2 * self.hidden_size

  def rows(self) -> tuple[int, int]:
    """(MQAR, text) rows of a training batch."""
    n_mqar = int(round(self.batch_size * self.mqar_fraction))
    return n_mqar, self.batch_size - n_mqar

  @property
  def placement_full_layers(self) -> int:
    """Full-attention layers that `placements` moves."""
    try:
      types = layer_types_from_ratio(self.placement_ratio, self.num_layers)
    except ValueError as e:
      raise ValueError(f"placement_ratio: {e}") from None
    return types.count(FULL)

  def configurations(self) -> list[Configuration]:
    """The (layer pattern, MLP) pairs of the study, in order: each pattern
    once, with each of `mlps` in turn."""
    return [Configuration(c.name + mlp_suffix(m), c.layer_types,
                          c.placement, m)
            for c in self._patterns() for m in self.mlps]

  def _patterns(self) -> list[Configuration]:
    """The layer patterns of the study, in order; each pattern once."""
    out: list[Configuration] = []
    seen = set()

    def add(name, types, placement):
      if types not in seen:
        seen.add(types)
        out.append(Configuration(name, types, placement))

    for r in self.ratios:
      types = layer_types_from_ratio(r, self.num_layers)
      add(ratio_name(types), types, _placement_of(types))
    if self.placements:
      f = self.placement_full_layers
      periodic = layer_pattern.layer_types_from_placement(
          "periodic", self.num_layers, f)
      for p in self.placements:
        types = layer_pattern.layer_types_from_placement(
            p, self.num_layers, f)
        if len(set(types)) == 1:
          add(ratio_name(types), types, "-")
        elif types == periodic:
          add(ratio_name(types), types, "periodic")
        else:
          add(f"{ratio_name(types)} {p}", types, p)
    for p in self.patterns:
      types = layer_pattern.layer_types_from_string(p)
      add(layer_pattern.pattern_string(types), types, _placement_of(types))
    return out

  def _pairs(self, seq_len: int) -> int:
    return max(1, self.num_pairs * seq_len // self.seq_len)

  def mqar(self, seq_len: int | None = None) -> data.MQARConfig:
    """The MQAR task at a length (pairs in proportion to the length)."""
    seq_len = self.seq_len if seq_len is None else seq_len
    if not is_int(seq_len) or seq_len < 1:
      raise ValueError(f"seq_len: expected an int >= 1, found {seq_len!r}")
    pairs = min(self._pairs(seq_len), self.key_vocab)
    return data.MQARConfig(seq_len=seq_len, num_pairs=pairs,
                           key_vocab=self.key_vocab,
                           value_vocab=self.value_vocab)

  def mqar_fixed(self, seq_len: int) -> data.MQARConfig:
    """MQAR at a length with the trained number of pairs (the queries
    spread over the whole length: recall at a distance)."""
    return self.mqar().replace(seq_len=seq_len)

  @property
  def vocab_size(self) -> int:
    """Bytes, then the MQAR tokens (pad, keys, values)."""
    return data.BYTE_VOCAB + self.mqar().vocab_size

  @property
  def retrieval_slots(self) -> int:
    """Cache slots of the retrieval evaluation: the longest length rounded
    up to whole chunks (one compiled program serves every length)."""
    c = self.retrieval_chunk
    return -(-max(self.retrieval_lengths) // c) * c


# Named settings. "default" is the README's main job (one seed: under 10
# minutes on 2 CPU cores); "smoke" checks the plumbing (a few minutes; the
# numbers mean little); "gpu" is the study at tens of millions of
# parameters with retrieval to 64k tokens, sized for one H100 (see the
# README for its FLOP estimate).
PRESETS: dict[str, StudyConfig] = {
    "default": StudyConfig(),
    "smoke": StudyConfig(
        ratios=("all-full", "3:1", "all-linear"),
        placements=("periodic", "bottom"),
        num_layers=8, hidden_size=32, num_heads=2, head_dim=16, steps=6,
        batch_size=4, seq_len=64, warmup_steps=2, num_pairs=4,
        key_vocab=16, value_vocab=16, eval_lengths=(64, 128),
        eval_batches=1, text_eval_batches=1, retrieval_lengths=(64, 256),
        retrieval_rows=2, retrieval_chunk=128, memory_lengths=(256, 1024)),
    "gpu": StudyConfig(
        ratios=("all-full", "1:1", "3:1", "7:1", "all-linear"),
        placements=("periodic", "bottom", "top", "middle", "ends"),
        num_layers=16, hidden_size=512, num_heads=8, head_dim=64,
        steps=2000, batch_size=16, seq_len=512, learning_rate=1e-3,
        warmup_steps=200, num_pairs=32, key_vocab=256, value_vocab=256,
        eval_lengths=(512, 1024, 2048), eval_batches=4, text_eval_batches=8,
        retrieval_lengths=(512, 2048, 8192, 32768, 65536), retrieval_rows=4,
        retrieval_chunk=1024, memory_lengths=(8192, 65536, 262144),
        gdr_chunk=64),
}


# ------------------------------------------------------------------ model
def model_config(study: StudyConfig,
                 configuration: Configuration | str) -> QwenConfig:
  """The model of one configuration (or ratio, with the dense MLP): the
  same shapes for every configuration but the layer pattern and the MLP.

  A "moe:E:k" configuration replaces every layer's MLP by E routed experts
  (top-k) and a gated shared expert, their widths from `moe_widths`: the
  k routed experts and the shared expert a token goes through hold
  exactly the dense MLP's 3 * hidden_size * intermediate_size weights;
  the router (hidden_size * E) and the shared expert's gate (hidden_size)
  come on top, the cost of routing. The router's load-balancing loss
  enters the training loss with QwenConfig's default weight
  (`router_aux_loss_coef`, `train_step`).
  """
  mlp = DENSE_MLP
  if isinstance(configuration, str):
    types = layer_types_from_ratio(configuration, study.num_layers)
  else:
    types, mlp = configuration.layer_types, configuration.mlp
  h = study.num_heads
  kv = max(1, h // 2)
  moe = {}
  experts = parse_mlp(mlp)
  if experts is not None:
    e, k = experts
    expert, shared = moe_widths(study.intermediate_size, k)
    moe = dict(mlp_types=("moe",) * study.num_layers, num_experts=e,
               num_experts_per_tok=k, moe_intermediate_size=expert,
               shared_expert_intermediate_size=shared)
  return QwenConfig(
      vocab_size=study.vocab_size, hidden_size=study.hidden_size,
      intermediate_size=study.intermediate_size,
      num_hidden_layers=study.num_layers, layer_types=tuple(types),
      num_attention_heads=h, num_key_value_heads=kv,
      head_dim=study.head_dim, linear_num_key_heads=kv,
      linear_num_value_heads=h, linear_key_head_dim=study.head_dim,
      linear_value_head_dim=study.head_dim, linear_conv_kernel_dim=4,
      rope_theta=1e4, partial_rotary_factor=0.5,
      max_position_embeddings=MAX_POSITIONS,
      tie_word_embeddings=True, gdr_chunk_size=study.gdr_chunk, **moe)


def _with_positions(cfg: QwenConfig, n: int) -> QwenConfig:
  """cfg accepting n positions (evaluation past MAX_POSITIONS)."""
  if n <= cfg.max_position_embeddings:
    return cfg
  return cfg.replace(max_position_embeddings=n)


# ------------------------------------------------------------------- data
def _offset_mqar(batch: data.Batch) -> data.Batch:
  """MQAR tokens moved after the byte range of the shared vocabulary."""
  out = dict(batch)
  for name in ("inputs", "targets"):
    out[name] = batch[name] + data.BYTE_VOCAB
  return out


def _concat(*batches: data.Batch) -> data.Batch:
  return {k: np.concatenate([b[k] for b in batches], axis=0)
          for k in batches[0]}


@functools.lru_cache(maxsize=2)
def _corpus(split: str) -> np.ndarray:
  """The text corpus of a split as one byte array (the haystacks)."""
  return np.concatenate(data.text_documents(split)).astype(np.int32)


@functools.lru_cache(maxsize=4)
def _text_data(seq_len: int, split: str) -> data.TextData:
  return data.TextData(seq_len, split)


def _needle_rows(study: StudyConfig, seq_len: int, rows: int, seed: int,
                 step: int, split: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [rows, seq_len + 1], answer mask, text mask [rows, seq_len]).

  The masks mark the targets: the needle's answer (the last target), and
  the text (not the inserted pair or key).
  """
  fill = seq_len + 1 - 4
  if fill < 0:
    raise ValueError(f"seq_len: expected >= {NEEDLE_MIN_LENGTH} for a "
                     f"needle, found {seq_len}")
  task = study.mqar()
  corpus = _corpus(split)
  if len(corpus) <= fill:
    corpus = np.tile(corpus, fill // len(corpus) + 2)
  rng = np.random.default_rng([seed, 0x4E44, step, seq_len])
  starts = rng.integers(0, len(corpus) - fill, rows)
  depths = rng.integers(0, fill + 1, rows)
  keys = data.BYTE_VOCAB + task.key_token(rng.integers(0, task.key_vocab,
                                                       rows))
  values = data.BYTE_VOCAB + task.value_token(
      rng.integers(0, task.value_vocab, rows))
  tokens = np.empty((rows, seq_len + 1), np.int32)
  is_text = np.zeros((rows, seq_len + 1), bool)
  for r in range(rows):
    hay = corpus[starts[r]:starts[r] + fill]
    p = depths[r]
    tokens[r] = np.concatenate([hay[:p], [keys[r], values[r]], hay[p:],
                                [keys[r], values[r]]])
    is_text[r, :p] = True
    is_text[r, p + 2:fill + 2] = True
  answer = np.zeros((rows, seq_len), np.float32)
  answer[:, -1] = 1.0  # the key at the end: its value
  return tokens, answer, is_text[:, 1:].astype(np.float32)


def needle_batch(study: StudyConfig, seq_len: int, rows: int, seed: int,
                 step: int, split: str = "eval") -> data.Batch:
  """Needle rows: a key-value pair hidden in text, asked for at the end.

  One row of `seq_len + 1` tokens (inputs: the first seq_len, targets: the
  last seq_len), K and V MQAR tokens:

    text ... K V text ... K V

  The text is a window of the split's corpus (held-out modules for
  "eval"), the pair at a uniformly drawn depth; the loss mask is 1 at the
  last target only (the value, chance 1 / value_vocab). A pure function of
  its arguments.
  """
  tokens, answer, _ = _needle_rows(study, seq_len, rows, seed, step, split)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": answer,
          "segment_ids": np.ones((rows, seq_len), np.int32)}


class MixedData:
  """Training batches: MQAR rows, then text rows that each hide a needle.

  Recall (the MQAR queries and the needles' answers, each the same weight)
  is half of the loss, the text the other half (the loss masks are rescaled
  to these totals). A pure function of (seed, step), so a resumed run sees
  the same data. `split` "eval" takes the text from the held-out sources.
  """

  def __init__(self, study: StudyConfig, seed: int | None = None,
               split: str = "train"):
    self.study = study
    self.seed = study.seed if seed is None else seed
    self.split = split
    self.task = study.mqar()
    self.n_mqar, self.n_text = study.rows()

  def __call__(self, step: int) -> data.Batch:
    s = self.study
    half = s.batch_size * s.seq_len / 2
    recall = _offset_mqar(data.mqar_batch(self.task, self.n_mqar, self.seed,
                                          step))
    tokens, answer, text = _needle_rows(s, s.seq_len, self.n_text,
                                        self.seed, step, self.split)
    per_query = half / (recall["loss_mask"].sum() + answer.sum())
    rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": (text * (half / max(text.sum(), 1.0)) +
                          answer * per_query).astype(np.float32),
            "segment_ids": np.ones((self.n_text, s.seq_len), np.int32)}
    recall["loss_mask"] = (recall["loss_mask"] * per_query).astype(
        np.float32)
    return _concat(recall, rows)


def mqar_eval_batches(study: StudyConfig, seq_len: int) -> list[data.Batch]:
  """Held-out MQAR batches at a length (a seed no training run uses)."""
  task = study.mqar(seq_len)
  return [_offset_mqar(data.mqar_batch(task, study.batch_size,
                                       study.seed + 10_000, i))
          for i in range(study.eval_batches)]


def retrieval_batches(study: StudyConfig
                      ) -> dict[int, dict[str, data.Batch]]:
  """Per retrieval length: needle rows (held-out text) and fixed-pair MQAR
  rows, from seeds no training run uses."""
  out = {}
  for i, n in enumerate(study.retrieval_lengths):
    out[n] = {
        "needle": needle_batch(study, n, study.retrieval_rows,
                               study.seed + 20_000, i, split="eval"),
        "mqar": _offset_mqar(data.mqar_batch(
            study.mqar_fixed(n), study.retrieval_rows, study.seed + 30_000,
            i)),
    }
  return out


# -------------------------------------------------------------- retrieval
def _chunk_correct(cfg: QwenConfig, params: Any, ids: jax.Array,
                   targets: jax.Array, mask: jax.Array, cache: Any):
  """One prefill chunk: the cache moves on; correct masked predictions."""
  logits, cache = Qwen35(cfg).apply({"params": params}, ids, cache=cache)
  hit = (jnp.argmax(logits, axis=-1) == targets) & (mask > 0)
  return hit.sum(), cache


_chunk_correct_jit = jax.jit(_chunk_correct, static_argnums=0,
                             donate_argnums=5)


def retrieval_accuracy(cfg: QwenConfig, params: Any, batch: data.Batch,
                       chunk: int, slots: int) -> float:
  """Accuracy at the masked targets of one batch by chunked prefill.

  The rows go through the model `chunk` tokens at a time, each call
  continuing from the cache the last one left (full attention reads the
  keys and values so far, Gated DeltaNet its state), so memory holds one
  chunk's activations and the cache. The cache has `slots` slots whatever
  the batch's length: one compiled program serves every length.
  """
  ids, tgt, mask = (np.asarray(batch[k]) for k in
                    ("inputs", "targets", "loss_mask"))
  rows, n = ids.shape
  last = int(np.nonzero(mask.any(0))[0].max()) + 1 if mask.any() else 0
  padded = -(-max(last, 1) // chunk) * chunk
  if padded > slots:
    raise ValueError(f"batch: expected at most {slots} tokens (the cache's "
                     f"slots), found {n}")
  pad = ((0, 0), (0, max(0, padded - n)))
  ids, tgt, mask = (np.pad(x, pad)[:, :padded] for x in (ids, tgt, mask))
  cfg = _with_positions(cfg, slots)
  cache = cache_lib.init_cache(cfg, rows, slots)
  hits = []
  for s in range(0, padded, chunk):
    part = slice(s, s + chunk)
    h, cache = _chunk_correct_jit(cfg, params, jnp.asarray(ids[:, part]),
                                  jnp.asarray(tgt[:, part]),
                                  jnp.asarray(mask[:, part]), cache)
    hits.append(h)
  correct = float(sum(int(h) for h in jax.device_get(hits)))
  return correct / max(float((mask > 0).sum()), 1.0)


def evaluate_retrieval(study: StudyConfig, cfg: QwenConfig, params: Any,
                       batches: dict[int, dict[str, data.Batch]]
                       ) -> dict[str, float]:
  """{"needle@n": accuracy, "mqar@n": accuracy} per retrieval length."""
  out = {}
  for n, tasks in batches.items():
    for task, batch in tasks.items():
      out[f"{task}@{n}"] = retrieval_accuracy(
          cfg, params, batch, study.retrieval_chunk, study.retrieval_slots)
  return out


# ----------------------------------------------------------------- memory
def forward_memory(cfg: QwenConfig, seq_len: int) -> dict[str, float]:
  """Memory of a compiled batch-1 forward (no logits) at `seq_len` tokens.

  Compiles without running: XLA's memory analysis of the program (weights
  as arguments, temporaries, outputs). On a GPU the program is also run
  once and the device's peak is read.
  """
  cfg = _with_positions(cfg, seq_len)
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


def memory_table(cfg: QwenConfig, lengths: Sequence[int],
                 forward_at: Sequence[int] | None = None
                 ) -> list[dict[str, float]]:
  """Per context length: decode-cache bytes by kind, and the memory of a
  compiled forward (`forward_memory`) at the lengths of `forward_at`
  (default: the longest; NaN at the others, each one a compilation)."""
  forward_at = lengths[-1:] if forward_at is None else forward_at
  rows = []
  for n in lengths:
    c = _with_positions(cfg, n)
    kinds = cache_lib.cache_bytes_by_kind(c, 1, n, jnp.bfloat16)
    total = cache_lib.cache_bytes(c, 1, n, jnp.bfloat16)
    row = {"context": n, "cache_bytes": float(total),
           "kv_bytes": float(kinds["kv"]),
           "state_bytes": float(kinds["state"] + kinds["conv"])}
    if n in forward_at:
      row.update(forward_memory(cfg, n))
    else:
      row.update(temp_bytes=float("nan"), argument_bytes=float("nan"))
    rows.append(row)
  return rows


def cache_bytes_at(cfg: QwenConfig, n: int) -> float:
  """Decoding-cache bytes of one sequence of n tokens (bf16 K/V)."""
  return float(cache_lib.cache_bytes(_with_positions(cfg, n), 1, n,
                                     jnp.bfloat16))


# ------------------------------------------------------------------- runs
# The StudyConfig fields a trained run depends on (a run of other values
# cannot be reused), and those its evaluation depends on (a run of other
# values is evaluated again from its checkpoint).
TRAIN_FIELDS = ("num_layers", "hidden_size", "num_heads", "head_dim",
                "steps", "batch_size", "mqar_fraction",
                "seq_len", "learning_rate", "warmup_steps", "num_pairs",
                "key_vocab", "value_vocab", "gdr_chunk")
EVAL_FIELDS = ("eval_lengths", "eval_batches", "text_eval_batches",
               "retrieval_lengths", "retrieval_rows", "retrieval_chunk")


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x))


def run_settings(study: StudyConfig, configuration: Configuration,
                 seed_index: int) -> dict[str, Any]:
  """What one run was trained with (its settings.json).

  The MLP is recorded as "mlp" for a mixture of experts only: a dense run
  keeps the settings it had before the study had an MLP axis (so its
  folder is reused), and a dense run's settings never equal a mixture of
  experts' (so neither is reused for the other).
  """
  s = {f: getattr(study, f) for f in TRAIN_FIELDS}
  s["pattern"] = configuration.pattern
  if configuration.mlp != DENSE_MLP:
    s["mlp"] = configuration.mlp
  s["seed"] = study.seed + seed_index
  return _jsonable(s)


def eval_settings(study: StudyConfig) -> dict[str, Any]:
  return _jsonable({f: getattr(study, f) for f in EVAL_FIELDS})


def run_dir(workdir: str, configuration: Configuration,
            seed_index: int) -> str:
  return os.path.join(workdir, "runs", configuration.label,
                      f"seed-{seed_index}")


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise cli.UserError(f"--workdir: expected a readable JSON file at "
                        f"{path}, found {type(e).__name__}: {e}") from e


def check_workdir(study: StudyConfig, workdir: str) -> None:
  """Refuses, before anything trains, runs of other training settings.

  Raises:
    cli.UserError: a run folder of this study holds a run trained with
      other settings (named with the first differing field).
  """
  for conf in study.configurations():
    for k in range(study.seeds):
      where = run_dir(workdir, conf, k)
      saved = _read_json(os.path.join(where, "settings.json"))
      want = run_settings(study, conf, k)
      if saved is None or saved == want:
        continue
      diff = sorted(f for f in set(saved) | set(want)
                    if saved.get(f) != want.get(f))
      f = diff[0]
      raise cli.UserError(
          f"--workdir: {where} holds a run of other settings ({f}: "
          f"{saved.get(f)!r} there, {want.get(f)!r} now); use another "
          f"--workdir, or the settings of that run")


def active_param_count(params: Any, cfg: QwenConfig) -> int:
  """Parameters one token goes through, counted from the parameter tree:
  all of them less the routed experts it is not sent to, (E - k) / E of
  every "moe" layer's stacked expert weights (`gate_up_proj`,
  `down_proj`; the router and the shared expert count as active)."""
  total = train_step.param_count(params)
  if not cfg.is_moe:
    return total
  e, k = cfg.num_experts, cfg.num_experts_per_tok
  idle = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if getattr(path[-1], "key", None) in ("gate_up_proj", "down_proj"):
      if x.shape[-3] != e:  # [..., E, in, out]; a scanned stack: [n, ...]
        raise ValueError(f"params: expected {e} experts on axis -3 of "
                         f"{jax.tree_util.keystr(path)}, found shape "
                         f"{x.shape}")
      idle += int(np.prod(x.shape)) // e * (e - k)
  return total - idle


def router_load(cfg: QwenConfig, params: Any,
                batches: Sequence[data.Batch]) -> dict[str, float]:
  """The routing of a mixture-of-experts model over held-out batches
  (`qwen_jax.moe.load_summary` of the router statistics averaged over the
  batches, each of the same number of tokens): "router_aux_loss" (the
  load-balancing loss, k when balanced) and "expert_load_max" /
  "expert_load_min" (the busiest and idlest expert's share of the routed
  slots over an even share, over every layer)."""

  @jax.jit
  def stats(p, ids):
    _, inter = Qwen35(cfg).apply({"params": p}, ids,
                                 mutable=["intermediates"])
    return moe_lib.collected_router_stats(inter)

  mean = np.mean([np.asarray(stats(params, jnp.asarray(b["inputs"])))
                  for b in batches], axis=0)
  summary = moe_lib.load_summary(jnp.asarray(mean),
                                 cfg.num_experts_per_tok)
  return {k: float(v) for k, v in summary.items()}


def _metrics_csv(path: str) -> list[dict[str, float]]:
  try:
    with open(path, newline="") as f:
      return [{k: float(v) for k, v in row.items() if v not in ("", None)}
              for row in csv.DictReader(f)]
  except FileNotFoundError:
    return []


class _EvalData:
  """The evaluation batches, made once per study (the same for every run)."""

  def __init__(self, study: StudyConfig):
    self.recall = {n: mqar_eval_batches(study, n)
                   for n in study.eval_lengths}
    text = _text_data(study.seq_len, "eval")
    self.text = text.eval_batches(study.batch_size, study.text_eval_batches)
    self.retrieval = retrieval_batches(study)
    # The training mix from seeds no run trains on, the text held out: the
    # routing statistics of mixture-of-experts runs.
    mixed = MixedData(study, study.seed + 40_000, split="eval")
    self.routing = [mixed(i) for i in range(study.eval_batches)]


def run_one(study: StudyConfig, configuration: Configuration,
            seed_index: int, workdir: str, evals: _EvalData,
            label: str = "") -> dict[str, Any]:
  """Trains and evaluates one (configuration, seed), or reuses its result.

  Returns:
    The run's record (its result.json) with "reused": whether it came from
    an earlier call unchanged.
  """
  where = run_dir(workdir, configuration, seed_index)
  result_path = os.path.join(where, "result.json")
  settings = run_settings(study, configuration, seed_index)
  evals_now = eval_settings(study)
  prev = _read_json(result_path)
  if (prev is not None and prev.get("settings") == settings
      and prev.get("eval_settings") == evals_now):
    return dict(prev, reused=True)
  os.makedirs(where, exist_ok=True)
  if not os.path.exists(os.path.join(where, "settings.json")):
    report.write_json(os.path.join(where, "settings.json"), settings)

  cfg = model_config(study, configuration)
  seed = study.seed + seed_index
  tcfg = train_step.TrainConfig(
      batch_size=study.batch_size, seq_len=study.seq_len,
      num_steps=study.steps, learning_rate=study.learning_rate,
      warmup_steps=study.warmup_steps, weight_decay=0.01, seed=seed,
      log_every=max(1, study.steps // 20),
      checkpoint_every=0, keep_checkpoints=1)  # a checkpoint at the end
  # settings.json and result.json are the study's, beside the run's files.
  result = train_lib.train(cfg, tcfg, MixedData(study, seed), where,
                           progress=label,
                           other_files=("settings.json", "result.json"))
  params, cfg = result.state.params, result.cfg
  history = _metrics_csv(os.path.join(where, "metrics.csv"))
  trained = result.resumed_from != study.steps
  if trained:
    speed = result.tokens_per_s
  else:  # nothing trained in this call: the speed the log recorded
    speed = float(np.median([h["tokens_per_s"] for h in history])
                  if history else float("nan"))

  # Every recall / text batch is right-padded to one length (a causal model
  # gives the same outputs on the real tokens), so one program serves all.
  t0 = time.time()
  eval_len = max(study.eval_lengths + (study.seq_len,))
  eval_step = train_step.make_eval_step(cfg)

  def pad(batches):
    return [data.pad_batch(b, eval_len) for b in batches]

  metrics = {}
  for n, batches in evals.recall.items():
    ev = train_lib.evaluate(cfg, params, pad(batches), eval_step=eval_step)
    metrics[f"recall@{n}"] = ev["accuracy"]
  metrics.update(evaluate_retrieval(study, cfg, params, evals.retrieval))
  ev_text = train_lib.evaluate(cfg, params, pad(evals.text),
                               eval_step=eval_step)
  metrics["text_loss"] = ev_text["loss"]
  metrics["text_bits_per_byte"] = ev_text["loss"] / np.log(2.0)
  metrics["tokens_per_s"] = speed
  metrics["final_train_loss"] = (history[-1]["loss"] if history
                                 else float("nan"))
  if cfg.is_moe:
    # The trained routing on held-out rows of both tasks at the trained
    # length (MQAR, then text with needles: the training mix).
    metrics.update(router_load(cfg, params, evals.routing))
  row = {
      "config": configuration.name,
      "pattern": configuration.pattern,
      "seed_index": seed_index,
      "seed": seed,
      "settings": settings,
      "eval_settings": evals_now,
      "mlp": configuration.mlp,
      "params": train_step.param_count(params),
      "active_params": active_param_count(params, cfg),
      "metrics": metrics,
      "compile_s": result.compile_s,
      "train_s": result.train_s,
      "eval_s": time.time() - t0,
      "resumed_from": result.resumed_from,
      "loss_curve": [(h["step"], h["loss"]) for h in history],
      "finished": datetime.datetime.now().isoformat(timespec="seconds"),
  }
  report.write_json(result_path, row)
  n_max = max(study.retrieval_lengths)
  shown = [f"{m} {metrics[m]:.2f}" for m in
           (f"recall@{study.seq_len}", f"needle@{n_max}", f"mqar@{n_max}",
            "text_bits_per_byte") if m in metrics]
  print(f"{label}: {'  '.join(shown)}  {speed:,.0f} tok/s",
        file=sys.stderr, flush=True)
  return dict(row, reused=False)


def config_memory(study: StudyConfig, configuration: Configuration,
                  workdir: str) -> list[dict[str, float]]:
  """The memory table of a pattern (runs/<config>/memory.json; computed
  once: it depends on shapes, not on weights)."""
  path = os.path.join(workdir, "runs", configuration.label, "memory.json")
  cfg = model_config(study, configuration)
  key = {"lengths": list(study.memory_lengths),
         "model": _jsonable(dataclasses.asdict(cfg)),
         "backend": jax.default_backend()}
  saved = _read_json(path)
  if saved is not None and saved.get("key") == key:
    return saved["rows"]
  rows = memory_table(cfg, study.memory_lengths)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  report.write_json(path, {"key": key, "rows": rows})
  return rows


def active_params_of(cfg: QwenConfig) -> int:
  """`active_param_count` from the config's shapes alone (the runs of a
  workdir written before runs recorded it)."""
  total = cfg.num_params()
  if not cfg.is_moe:
    return total
  idle = (cfg.num_experts - cfg.num_experts_per_tok) * 3 * (
      cfg.hidden_size * cfg.moe_intermediate_size)
  return total - idle * cfg.mlp_types.count("moe")


def summarize(study: StudyConfig, runs: Sequence[dict[str, Any]],
              memory: dict[str, list[dict[str, float]]]
              ) -> list[dict[str, Any]]:
  """One row per configuration: mean and 95% interval of every metric over
  its seeds, with the pattern, the MLP, counts, parameters (all, and those
  a token goes through) and memory."""
  out = []
  for conf in study.configurations():
    mine = [r for r in runs if r["config"] == conf.name]
    names = list(mine[0]["metrics"]) if mine else []
    metrics = {m: report.mean_ci95([r["metrics"][m] for r in mine])
               for m in names}
    curves = [np.asarray(r["loss_curve"], float) for r in mine
              if len(r["loss_curve"])]
    curve = []
    if curves and all(c.shape == curves[0].shape for c in curves):
      curve = np.column_stack([curves[0][:, 0],
                               np.mean([c[:, 1] for c in curves], 0)]
                              ).tolist()
    cfg = model_config(study, conf)
    out.append({
        "config": conf.name,
        "pattern": conf.pattern,
        "ratio": conf.ratio,
        "placement": conf.placement,
        "linear_layers": conf.layer_types.count(LINEAR),
        "full_layers": conf.layer_types.count(FULL),
        "params": mine[0]["params"] if mine else cfg.num_params(),
        "mlp": conf.mlp,
        "active_params": (mine[0].get("active_params") if mine else None)
                         or active_params_of(cfg),
        "experts": cfg.num_experts if cfg.is_moe else 0,
        "top_k": cfg.num_experts_per_tok if cfg.is_moe else 0,
        "expert_width": cfg.moe_intermediate_size if cfg.is_moe else 0,
        "shared_width": (cfg.shared_expert_intermediate_size if cfg.is_moe
                         else 0),
        "mlp_width": cfg.intermediate_size,
        "seeds": [r["seed"] for r in mine],
        "metrics": metrics,
        "retrieval_cache_bytes": {str(n): cache_bytes_at(cfg, n)
                                  for n in study.retrieval_lengths},
        "memory": memory[conf.name],
        "loss_curve": curve,
    })
  return out


def run_study(study: StudyConfig, workdir: str, plots: bool = True,
              command: str | None = None) -> dict[str, Any]:
  """Runs (or reuses) every (configuration, seed) and writes the results.

  Args:
    study: the settings.
    workdir: the output folder (created).
    plots: write the PNG plots (matplotlib).
    command: the command line shown in report.md (default: the equivalent
      `python -m experiments.compare_ratios` command, `reproduce_command`).

  Returns:
    The JSON record (results.json).

  Raises:
    ValueError: a bad study (`StudyConfig` checks its fields), or runs in
      `workdir` of other training settings (`check_workdir`), before any
      training.
  """
  confs = study.configurations()
  os.makedirs(workdir, exist_ok=True)
  check_workdir(study, workdir)
  t0 = time.time()
  evals = _EvalData(study)
  runs, memory = [], {}
  total = len(confs) * study.seeds
  i = 0
  for conf in confs:
    memory[conf.name] = config_memory(study, conf, workdir)
    for k in range(study.seeds):
      i += 1
      label = f"[{i}/{total}] {conf.name:>12} seed {study.seed + k}"
      runs.append(run_one(study, conf, k, workdir, evals, label))
  record = {
      "study": dataclasses.asdict(study),
      "chance_accuracy": study.mqar().chance_accuracy,
      "configurations": summarize(study, runs, memory),
      "runs": runs,
      "trained_runs": sum(not r["reused"] for r in runs),
      "reused_runs": sum(bool(r["reused"]) for r in runs),
      "elapsed_s": time.time() - t0,
      "environment": environment(),
      "command": command or reproduce_command(study, workdir),
  }
  report.write_results(record, workdir)
  if plots:
    report.write_plots(record, workdir)
  report.write_report(record, workdir, plots)
  return record


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _git_commit() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, timeout=10,
                         check=False)
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True,
                           text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  commit = out.stdout.strip()
  if out.returncode or not commit:
    return "unknown"
  return commit + (" (with uncommitted changes)" if dirty.stdout.strip()
                   else "")


def environment() -> dict[str, str]:
  dev = jax.devices()[0]
  return {
      "date": datetime.date.today().isoformat(),
      "device": f"{dev.platform}: {dev.device_kind}",
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "optax": _version("optax"),
      "numpy": np.__version__,
      "python": platform.python_version(),
      "cpu_count": str(os.cpu_count()),
      "commit": _git_commit(),
  }


def reproduce_command(study: StudyConfig, workdir: str) -> str:
  """The `python -m experiments.compare_ratios` command of a study: the
  preset nearest to it and a flag per field that differs. Fields without a
  flag that differ from every preset are given as a Python call instead."""
  flag_names = {f[0] for f in _FLAG_FIELDS}
  best = None
  for name, preset in PRESETS.items():
    diff = [f.name for f in dataclasses.fields(StudyConfig)
            if getattr(study, f.name) != getattr(preset, f.name)]
    if best is None or len(diff) < len(best[1]):
      best = (name, diff)
  name, diff = best
  if any(f not in flag_names for f in diff):
    changes = ", ".join(f"{f}={getattr(study, f)!r}" for f in diff)
    return (f"experiments.compare_ratios.run_study(PRESETS[{name!r}]"
            f".replace({changes}), {workdir!r})")
  args = ["python", "-m", "experiments.compare_ratios",
          f"--workdir={workdir}"]
  if name != "default":
    args.append(f"--preset={name}")
  for f in diff:
    v = getattr(study, f)
    v = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    args.append(f"--{f}={v}")
  return " ".join(shlex.quote(a) for a in args)


# ------------------------------------------------------------------ flags
def _list_of_ints(v: Sequence[str]) -> tuple[int, ...]:
  return tuple(int(x) for x in v)


def _list_of_str(v: Sequence[str]) -> tuple[str, ...]:
  return tuple(x.strip() for x in v if x.strip())


# (flag = StudyConfig field, parser, help); an absent flag keeps the
# preset's value.
_FLAG_FIELDS = (
    ("ratios", _list_of_str,
     "Ratios, e.g. all-full,1:1,3:1,7:1,all-linear (full attention closing "
     "each group)."),
    ("placements", _list_of_str,
     "Depths of the full-attention layers of --placement_ratio: periodic,"
     "bottom,top,middle,ends (empty: none)."),
    ("placement_ratio", str, "The ratio whose full layers --placements "
     "moves, e.g. 3:1."),
    ("patterns", _list_of_str,
     "Explicit patterns, one letter per layer from the bottom (L linear, F "
     "full), e.g. 'FLLL LLLF,LLFF LLLL'."),
    ("mlps", _list_of_str,
     "Every layer's MLP, each entry with every pattern: dense, or moe:E:k "
     "(E routed experts, top-k, and a shared expert, as many active MLP "
     "weights per token as dense), e.g. dense,moe:8:2."),
    ("seeds", int, "Runs per configuration (seed, seed + 1, ...); a rerun "
     "trains only the seeds not yet in --workdir."),
    ("num_layers", int, "Depth (a multiple of every ratio's period)."),
    ("hidden_size", int, "Width."),
    ("steps", int, "Optimizer steps per run."),
    ("batch_size", int, "Rows per step."),
    ("seq_len", int, "Training length."),
    ("learning_rate", float, "Peak learning rate."),
    ("num_pairs", int, "MQAR pairs at the training length."),
    ("key_vocab", int, "MQAR key tokens."),
    ("value_vocab", int, "MQAR value tokens (chance = 1 / value_vocab)."),
    ("mqar_fraction", float, "Share of the rows that are MQAR (the rest: "
     "text rows, each with a needle)."),
    ("eval_lengths", _list_of_ints, "MQAR evaluation lengths (pairs grow "
     "in proportion)."),
    ("retrieval_lengths", _list_of_ints,
     "Needle and fixed-pair MQAR evaluation lengths."),
    ("retrieval_rows", int, "Rows per task and retrieval length."),
    ("retrieval_chunk", int, "Tokens per prefill call of the retrieval "
     "evaluation."),
    ("memory_lengths", _list_of_ints, "Context lengths of the memory table."),
    ("seed", int, "Seed of the first run's parameters and data."),
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
    define = (flags.DEFINE_list if parse in (_list_of_str, _list_of_ints)
              else {int: flags.DEFINE_integer, float: flags.DEFINE_float,
                    str: flags.DEFINE_string}[parse])
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
  if not jax.config.jax_compilation_cache_dir:
    # Seeds of one pattern, and reruns, compile each program once.
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(workdir, "jax_cache"))
  command = " ".join(shlex.quote(a) for a in
                     ["python", "-m", "experiments.compare_ratios"] +
                     sys.argv[1:])
  record = run_study(study, workdir, plots=plots, command=command)
  print()
  print(report.markdown_tables(record))
  print(report.findings(record))
  print(f"\nReport, results, plots and runs under "
        f"{os.path.abspath(workdir)} (report.md)")


if __name__ == "__main__":
  _HOLDERS = define_flags()
  cli.run(main)
