"""Long-context sharded programs: compiled memory, FLOPs and collectives.

Two jobs over the sharded programs of `qwen_jax.sharding` (sequence
parallelism over the mesh axis "seq"; docs/sharding.md):

  --aot     builds abstract parameters and inputs (`jax.ShapeDtypeStruct`s
            with their shardings; no weight is allocated), lowers and
            compiles the program (`--mode` forward, prefill or train) for
            the mesh, and prints the per-device memory of the compiled
            program (`memory_analysis`), its FLOPs (`cost_analysis`) and the
            bytes each kind of collective moves (read from the compiled
            HLO).
  --verify  runs the program at --seq_len tokens with random weights (in
            float32), sharded on --mesh and unsharded on one device, prints
            the largest deviation of its outputs (forward: the logits;
            prefill: the last logits and the cache; train: the loss and the
            gradients) relative to the largest reference value, and exits
            non-zero above --tolerance.

With `--tpu_topology` (e.g. v5p:4x4x4) --aot compiles for a TPU slice
that libtpu only describes (deviceless compilation, nothing runs); for a
mixture-of-experts model this is the memory to read, as XLA's CPU backend
expands `ragged_dot` into dense per-group products (`tpu_devices`):

  python -m experiments.long_context --aot --tpu_topology v5p:4x4x4 \
      --mesh expert:16,seq:4 --preset qwen3.5-35b-a3b --seq_len 16384 \
      --batch 16

On a laptop, `--num_devices N` gives the CPU N fake devices (it must come
before jax starts its backend; the script sets it first thing):

  # 0.8B train step at 262,144 tokens over 16 devices, compiled on a CPU:
  python -m experiments.long_context --aot --num_devices 16 --mesh seq:16
  # 9B prefill on 8 devices, JSON for BENCHMARKS.md:
  python -m experiments.long_context --aot --num_devices 8 --mesh seq:8 \
      --preset qwen3.5-9b --mode prefill --json_out prefill_9b.json
  # sharded == unsharded on 8 fake devices, tiny model:
  python -m experiments.long_context --verify --num_devices 8 \
      --preset tiny --seq_len 512 --batch 2 --mesh data:2,seq:4
  # the same as 2 processes with 4 fake devices each (run both):
  python -m experiments.long_context --verify --distributed \
      --coordinator_address 127.0.0.1:12355 --num_processes 2 \
      --process_id 0 --num_devices 4 --preset tiny --seq_len 512 \
      --batch 2 --mesh data:2,seq:4          # and --process_id 1
  # on 8 GPUs (one host), the same commands without --num_devices; on
  # several hosts or a TPU slice, with --distributed on every host (see
  # experiments/multihost.py and docs/sharding.md).

Under --distributed every process builds the same random weights from
--seed, keeps its own part of the batch, and computes the --verify
reference on one of its own devices; process 0 prints the report and
writes --json_out and --hlo_out.

A bad --mesh (an unknown axis, sizes that do not multiply to the device
count), a --seq_len the mesh cannot split, a number out of range or an
output path that cannot be written (--json_out, --hlo_out) ends with one
line on stderr and exit status 1 (2 for usage errors), before anything is
compiled; see experiments/cli.py.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import sys
import textwrap
import time
from typing import Any, Callable, Mapping, Sequence

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments import multihost
from qwen_jax import cache as cache_lib
from qwen_jax import distributed
from qwen_jax import sharding
from qwen_jax.array_typing import PyTree
from qwen_jax.config import QwenConfig
from qwen_jax.config import is_int
from qwen_jax.config import layer_types_from_ratio
from qwen_jax.layer_pattern import MOE
from qwen_jax.model import Qwen35

MODES = ("forward", "prefill", "train")


def define_flags() -> None:
  """Defines the script's flags.

  Called when the script runs, not on import, so that tests can import this
  module next to other experiment scripts that define --preset or --seq_len
  too.
  """
  global _PRESET, _SEQ_LEN, _BATCH, _MESH, _MODE, _REMAT, _DTYPE, _PARAM_DTYPE
  global _AOT, _VERIFY, _JSON_OUT, _LOGITS
  global _MAX_LEN, _LOSS_CHUNK, _ATTENTION_BLOCK, _GDR_BLOCK, _RATIO
  global _NUM_LAYERS, _TOLERANCE, _SEED, _HLO_OUT, _TPU_TOPOLOGY
  global _MOE_DISPATCH, _MOE_CAPACITY
  _PRESET = flags.DEFINE_string("preset", "qwen3.5-0.8b",
                                "QwenConfig preset name (random weights).")
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 262144, "Tokens per sequence.")
  _BATCH = flags.DEFINE_integer("batch", 1, "Sequences per batch.")
  _MESH = flags.DEFINE_string("mesh", None, "Mesh spec such as "
                              "'data:2,seq:4' over the axes data, fsdp, "
                              "tensor, seq; default 'seq:N' over all devices.")
  _MODE = flags.DEFINE_enum("mode", "train", list(MODES),
                            "forward: logits (--logits); prefill: the cache "
                            "and the last logits; train: loss and gradients.")
  _REMAT = flags.DEFINE_enum("remat", None, ["none", "full", "dots"],
                             "Per-layer rematerialisation; default 'full' for "
                             "train, 'none' otherwise.")
  _DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                             "Compute dtype (--verify always runs float32).")
  _PARAM_DTYPE = flags.DEFINE_enum(
      "param_dtype", None, ["bfloat16", "float32"],
      "Parameter dtype; default float32 for train (master weights), --dtype "
      "otherwise.")
  _AOT = flags.DEFINE_bool("aot", False, "Compile ahead of time and report "
                           "memory, FLOPs and collectives.")
  _VERIFY = flags.DEFINE_bool("verify", False, "Run sharded and unsharded "
                              "and compare.")
  # --distributed, --coordinator_address, --num_processes, --process_id,
  # --distributed_timeout, --num_devices.
  multihost.define_flags()
  _JSON_OUT = flags.DEFINE_string("json_out", None, "Write the report here.")
  _LOGITS = flags.DEFINE_enum("logits", "last", ["hidden", "last", "all"],
                              "What --mode forward returns (--aot).")
  _MAX_LEN = flags.DEFINE_integer("max_len", None, "Cache slots of --mode "
                                  "prefill; default --seq_len.")
  _LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 1024, "Tokens per chunk "
                                     "of the cross-entropy (0: about 2^27 "
                                     "logits per chunk).")
  _ATTENTION_BLOCK = flags.DEFINE_integer(
      "attention_block", 512, "Query and key block of the context-parallel "
      "flash attention.")
  _GDR_BLOCK = flags.DEFINE_integer(
      "gdr_block", None, "Tokens per gated-delta-rule call inside a sequence "
      "shard (SPContext.gdr_block); default: the whole shard in one call.")
  _RATIO = flags.DEFINE_string("ratio", None, "Override the layer pattern: "
                               "'3:1', 'all-linear', ...")
  _NUM_LAYERS = flags.DEFINE_integer("num_layers", None, "Override the "
                                     "number of layers.")
  _TOLERANCE = flags.DEFINE_float("tolerance", 2e-4, "--verify: largest "
                                  "accepted relative deviation (float32).")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and tokens.")
  _HLO_OUT = flags.DEFINE_string("hlo_out", None, "--aot: write the compiled "
                                 "HLO text here.")
  _TPU_TOPOLOGY = flags.DEFINE_string(
      "tpu_topology", None, "--aot: compile for this TPU topology instead "
      "of the local devices, without a TPU (libtpu's deviceless "
      "compilation), e.g. v5p:4x4x4 (64 chips).")
  _MOE_DISPATCH = flags.DEFINE_enum(
      "moe_dispatch", "gather", ["gather", "all_to_all"],
      "Mixture-of-experts models over an expert axis: how tokens reach the "
      "experts (QwenConfig.moe_dispatch).")
  _MOE_CAPACITY = flags.DEFINE_float(
      "moe_capacity_factor", 0.0, "--moe_dispatch=all_to_all: pairs per "
      "destination as a multiple of an even share, the rest dropped; 0: "
      "dropless (QwenConfig.moe_capacity_factor).")

# What the collective table counts (printed with it).
COLLECTIVES_NOTE = (
    "per device, from the compiled (SPMD-partitioned) HLO: every "
    "all-gather, all-reduce, reduce-scatter, collective-permute and "
    "all-to-all (async -start ops counted, -done skipped); 'operand' and "
    "'result' are the sizes of each op's input and output buffers on one "
    "device, summed over executions: ops inside while loops (layer scan, "
    "chunk loops) are multiplied by the loops' known trip counts, and "
    "every branch of a conditional is counted as if it ran. Source: "
    "'gdn' = inside the Gated DeltaNet shard_map (state transfers, conv "
    "halo), 'attention' = inside the attention shard_map (K/V gathers, "
    "query swaps), 'experts' = inside the expert-parallel shard_map of "
    "a mixture-of-experts layer (token gathers and reduce-scatters of the "
    "experts' sums, or all-to-alls of the routed pairs), 'other' = "
    "parameter gathers, gradient reductions, resharding.")
FLOPS_NOTE = ("XLA cost_analysis: a while-loop body (layer scan, chunk "
              "loops) is counted once, not once per iteration, so this is "
              "a lower bound")
MEMORY_NOTE = (
    "XLA memory_analysis of the compiled program, per device: arguments "
    "(parameters, inputs), outputs (gradients / cache / logits), "
    "temporaries (the peak of every live intermediate buffer, from buffer "
    "assignment), generated code; total = arguments + outputs + "
    "temporaries + code - aliased")


class ConfigError(cli.UserError):
  """A flag combination that cannot run (reported without a traceback)."""


# ----------------------------------------------------------------- setup
def build_config(preset: str, seq_len: int, dtype: str = "bfloat16",
                 param_dtype: str | None = None, remat: str | None = None,
                 mode: str = "train", ratio: str | None = None,
                 num_layers: int | None = None, moe_dispatch: str = "gather",
                 moe_capacity_factor: float = 0.0) -> QwenConfig:
  """The preset's language model (no vision tower) with the dtypes, remat
  policy and layer pattern asked for.

  The `tiny` preset (a test model) has its max_position_embeddings raised
  to seq_len when needed; the real presets keep theirs (262,144).

  Raises:
    ConfigError: an unknown preset, mode or ratio, or a seq_len past the
      preset's max_position_embeddings.
  """
  if mode not in MODES:
    raise ConfigError(f"--mode: expected one of {MODES}, found {mode!r}")
  if remat is None:
    remat = "full" if mode == "train" else "none"
  if param_dtype is None:
    param_dtype = "float32" if mode == "train" else dtype
  over: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype,
                              remat_policy=remat, moe_dispatch=moe_dispatch,
                              moe_capacity_factor=moe_capacity_factor)
  try:
    base = QwenConfig.from_preset(preset, vision=None)  # the text model
    n = base.num_hidden_layers if num_layers is None else num_layers
    if num_layers is not None:
      over["num_hidden_layers"] = n
    if ratio is not None:
      over["layer_types"] = layer_types_from_ratio(ratio, n)
    if preset == "tiny" and seq_len > base.max_position_embeddings:
      over["max_position_embeddings"] = seq_len
    cfg = base.replace(**over)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if seq_len < 1 or seq_len > cfg.max_position_embeddings:
    raise ConfigError(f"--seq_len: expected 1 to max_position_embeddings="
                      f"{cfg.max_position_embeddings} of {preset}, found "
                      f"{seq_len}")
  return cfg


def build_mesh(spec: str | None,
               devices: Sequence[jax.Device] | None = None
               ) -> jax.sharding.Mesh:
  """The mesh of a spec (default "seq:N" over all devices).

  Raises:
    ConfigError: the spec's ValueError (unknown axis, bad size, sizes whose
      product is not the device count), prefixed with "--mesh".
  """
  devices = list(jax.devices() if devices is None else devices)
  spec = spec or f"seq:{len(devices)}"
  try:
    return sharding.make_mesh(spec, devices)
  except ValueError as e:
    raise ConfigError(f"--mesh {spec!r}: {e}") from e


def check_moe(cfg: QwenConfig, mesh: jax.sharding.Mesh, preset: str
              ) -> None:
  """--moe_dispatch / --moe_capacity_factor where they take effect: a model
  with mixture-of-experts layers, and for the all-to-all an expert axis of
  more than one device (without one the flags would be ignored).

  Raises:
    ConfigError: either flag set on a dense model, or the all-to-all asked
      for without an expert axis.
  """
  asked = cfg.moe_dispatch != "gather" or cfg.moe_capacity_factor != 0
  if asked and MOE not in cfg.mlp_types:
    raise ConfigError(
        f"--moe_dispatch/--moe_capacity_factor: expected a preset with "
        f"mixture-of-experts layers, found the dense {preset!r}")
  if cfg.moe_dispatch == "all_to_all" and mesh.shape.get("expert", 1) < 2:
    raise ConfigError(
        f"--moe_dispatch=all_to_all: expected an expert axis of 2 or more "
        f"devices in --mesh, found {dict(mesh.shape)}")


def tpu_devices(topology: str | None, aot: bool = True
                ) -> list[Any] | None:
  """The devices of a TPU topology for deviceless compilation, or None.

  libtpu (`pip install -e ".[tpu]"`) describes the topology and XLA's TPU
  compiler compiles for it; nothing runs. XLA's CPU backend expands
  `jax.lax.ragged_dot` into a dense [groups, rows, width] product, so the
  compiled memory of a mixture-of-experts model on fake CPU devices counts
  buffers E / n times too large; the TPU compiler lowers it as a grouped
  matmul.

  Raises:
    ConfigError: a topology without --aot, or one libtpu cannot describe.
  """
  if topology is None:
    return None
  if not aot:
    raise ConfigError(f"--tpu_topology: compiles only (--aot), found "
                      f"--tpu_topology {topology} without --aot")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(platform="tpu",
                                        topology_name=topology)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--tpu_topology: libtpu cannot describe "
                      f"{topology!r} (expected e.g. v5p:4x4x4): "
                      f"{str(e)[:200]}") from e
  return list(desc.devices)


def check_lengths(cfg: QwenConfig, mesh: jax.sharding.Mesh, seq_len: int,
                  batch: int, mode: str, max_len: int | None = None) -> None:
  """Raises ConfigError when the mesh cannot split the sequence."""
  n = mesh.shape["seq"]
  if batch < 1:
    raise ConfigError(f"--batch: expected a positive integer, found {batch}")
  if seq_len % n:
    raise ConfigError(f"--seq_len: expected a multiple of the mesh's seq "
                      f"axis ({n}), found {seq_len}")
  k1 = cfg.linear_conv_kernel_dim - 1
  if n > 1 and seq_len // n < k1:
    raise ConfigError(f"--seq_len: expected at least {k1} tokens per "
                      f"sequence shard, found {seq_len // n}")
  if mode != "prefill" and max_len is not None:
    raise ConfigError(f"--max_len: sets the cache slots of --mode prefill "
                      f"only, found --max_len {max_len} with --mode {mode}")
  if mode == "prefill":
    slots = seq_len if max_len is None else max_len
    if slots < seq_len or slots > cfg.max_position_embeddings:
      raise ConfigError(f"--max_len: expected {seq_len} to "
                        f"{cfg.max_position_embeddings}, found {slots}")


def check_blocks(attention_block: int, gdr_block: int | None) -> None:
  """Raises ConfigError for a block size that is not a positive integer
  (--gdr_block may also be left unset: the whole shard in one call)."""
  for name, value in (("attention_block", attention_block),
                      ("gdr_block", gdr_block)):
    if value is None and name == "gdr_block":
      continue
    if not is_int(value) or value < 1:
      raise ConfigError(f"--{name}: expected a positive integer, found "
                        f"{value!r}")


def check_flags() -> None:
  """Raises ConfigError for a number out of range or an output path that
  cannot be written (before jax starts its backend)."""
  for name, holder, low in (("loss_chunk", _LOSS_CHUNK, 0),
                            ("num_layers", _NUM_LAYERS, 1),
                            ("batch", _BATCH, 1), ("seq_len", _SEQ_LEN, 1),
                            ("max_len", _MAX_LEN, 1)):
    if holder.value is not None and holder.value < low:
      raise ConfigError(f"--{name}: expected an int >= {low}, found "
                        f"{holder.value}")
  if not 0.0 <= _TOLERANCE.value < float("inf"):  # NaN fails too
    raise ConfigError(f"--tolerance: expected a finite number >= 0, found "
                      f"{_TOLERANCE.value}")
  for flag, holder in (("--json_out", _JSON_OUT), ("--hlo_out", _HLO_OUT)):
    if holder.value is not None:
      try:
        cli.writable_file(flag, holder.value)
      except cli.UserError as e:
        raise ConfigError(str(e)) from e


def sp_options(attention_block: int = 512,
               gdr_block: int | None = None) -> dict[str, Any]:
  """SPContext fields (qwen_jax.sequence_parallel) from the flags."""
  return dict(attention_block_q=attention_block,
              attention_block_k=attention_block, gdr_block=gdr_block)


# ------------------------------------------------------------- programs
def abstract_params(cfg: QwenConfig, mesh: jax.sharding.Mesh) -> PyTree:
  """ShapeDtypeStructs of the parameters, with their shardings."""
  shapes = nn.unbox(sharding.abstract_params(cfg))
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, sharding.param_shardings(cfg, mesh))


def abstract_inputs(mesh: jax.sharding.Mesh, mode: str, batch: int,
                    seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of the token inputs ([b, t] int32, sharded)."""
  shape = (batch, seq_len)
  ids = jax.ShapeDtypeStruct(shape, jnp.int32,
                             sharding=sharding.batch_sharding(mesh, shape))
  if mode == "train":
    return {"inputs": ids, "targets": ids}
  return {"inputs": ids}


def build_program(cfg: QwenConfig, mesh: jax.sharding.Mesh, mode: str,
                  seq_len: int, logits: str = "last",
                  max_len: int | None = None, loss_chunk: int = 1024,
                  options: Mapping[str, Any] | None = None
                  ) -> Callable[..., Any]:
  """The sharded program of a mode: fn(params, inputs dict).

  forward: `make_forward` (logits "hidden", "last" or "all"); prefill:
  `make_prefill` into an empty cache of max_len slots; train:
  `make_train_step` (loss and gradients). `fn.lower(params, inputs)` lowers
  it for AOT compilation.
  """
  options = dict(options or {})
  if mode == "train":
    return sharding.make_train_step(cfg, mesh, loss_chunk=loss_chunk,
                                    sequence_parallel_options=options)
  if mode == "forward":
    f = sharding.make_forward(cfg, mesh, logits=logits,
                              sequence_parallel_options=options)
  elif mode == "prefill":
    f = sharding.make_prefill(cfg, mesh, max_len or seq_len,
                              sequence_parallel_options=options)
  else:
    raise ConfigError(f"--mode: expected one of {MODES}, found {mode!r}")

  def call(params, inputs):
    return f(params, inputs["inputs"])

  def lower(params, inputs):
    return f.lower(params, inputs["inputs"])

  call.lower = lower
  return call


# --------------------------------------------------------- HLO parsing
_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8,
    "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32, "u32": 32,
    "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")
_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|"
                     r"false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter",
                    "collective-permute", "all-to-all")
SOURCES = ("gdn", "attention", "experts", "other")


def _array_bytes(shape_text: str) -> int:
  """Bytes of every array shape in an HLO type string (tuples summed)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype.startswith("f8"):
      bits = 8
    else:
      bits = _DTYPE_BITS.get(dtype)
    if bits is None:  # token[], opaque, ...
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += (n * bits + 7) // 8
  return total


def _tuple_elements(shape_text: str) -> list[str]:
  """Top-level elements of an HLO tuple type "(a, b, ...)"."""
  text = re.sub(r"/\*.*?\*/", "", shape_text.strip())[1:-1]
  out, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append(text[start:i])
      start = i + 1
  out.append(text[start:])
  return [e.strip() for e in out if e.strip()]


def _split_instruction(line: str):
  """(name, result type, opcode, operand text, rest) of one HLO line."""
  s = line.strip()
  if s.startswith("ROOT "):
    s = s[5:]
  name, eq, rhs = s.partition(" = ")
  if not eq or not name.startswith("%"):
    return None
  rhs = rhs.strip()
  if rhs.startswith("("):  # tuple result type: up to the matching ")"
    depth = 0
    for i, ch in enumerate(rhs):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, rhs = rhs[:i + 1], rhs[i + 1:].strip()
  else:
    shape, _, rhs = rhs.partition(" ")
  op, paren, rhs = rhs.partition("(")
  if not paren:
    return None
  depth, i = 1, 0
  for i, ch in enumerate(rhs):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      break
  return name[1:], shape, op.strip(), rhs[:i], rhs[i + 1:]


def _source(op_name: str) -> str:
  """"gdn", "attention", "experts" or "other" from an op's metadata name.

  XLA joins the names of combined ops (e.g. one all-reduce of many
  gradients) with ":"; such an op belongs to a source only if all its parts
  do.
  """
  found = set()
  for part in op_name.split(":"):
    if "shard_map" in part and "linear_attn" in part:
      found.add("gdn")
    elif "shard_map" in part and "self_attn" in part:
      found.add("attention")
    elif "shard_map" in part and "/mlp/" in part:
      found.add("experts")
    else:
      found.add("other")
  return found.pop() if len(found) == 1 else "other"


def collective_stats(hlo_text: str) -> dict[str, Any]:
  """Collectives of a compiled HLO module, counted per kind and source.

  See COLLECTIVES_NOTE for what is counted. Returns
  {"kinds": {kind: {"ops", "executions", "operand_bytes",
  "result_bytes"}}, "sources": {source: {kind: same}},
  "unknown_trip_counts": while loops counted once for want of a trip
  count}.
  """
  comps: list[tuple[str, list[str]]] = []
  current = None
  for line in hlo_text.splitlines():
    if not line.strip():
      continue
    if not line[0].isspace() and line.rstrip().endswith("{"):
      m = _COMP_HEADER.match(line)
      if m and not line.startswith("HloModule"):
        current = (m.group(1), [], line.startswith("ENTRY"))
        comps.append(current)
        continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      current[1].append(line)

  shapes: dict[str, str] = {}
  parsed: dict[str, list[tuple]] = {}
  for name, lines, _ in comps:
    rows = []
    for line in lines:
      ins = _split_instruction(line)
      if ins is None:
        continue
      shapes[ins[0]] = ins[1]
      rows.append(ins)
    parsed[name] = rows

  # Callees are printed before their callers (ENTRY last): walk backwards.
  mult: dict[str, int] = {name: 0 for name, _, _ in comps}
  for name, _, is_entry in comps:
    if is_entry:
      mult[name] = 1
  unknown = 0
  for name, _, _ in reversed(comps):
    m = mult[name]
    if not m:
      continue
    for _, _, op, _, rest in parsed[name]:
      trip = 1
      if op == "while":
        t = _TRIP.search(rest)
        if t:
          trip = int(t.group(1))
        else:
          unknown += 1
      for kind, callee in _CALLEE.findall(rest):
        if callee in mult:
          mult[callee] += m * (trip if kind in ("body", "condition") else 1)
      b = _BRANCHES.search(rest)
      if b:
        for callee in re.findall(r"%?([\w.\-]+)", b.group(1)):
          if callee in mult:
            mult[callee] += m

  def empty():
    return {k: dict(ops=0, executions=0, operand_bytes=0, result_bytes=0)
            for k in COLLECTIVE_KINDS}

  kinds, sources = empty(), {s: empty() for s in SOURCES}
  for name, _, _ in comps:
    for _, shape, op, args, rest in parsed[name]:
      base = op[:-6] if op.endswith("-start") else op
      if base not in COLLECTIVE_KINDS:
        continue
      operand = 0
      for arg in args.split(","):
        arg = arg.strip()
        if not arg:
          continue
        if "[" in arg:  # "f32[2,3]{1,0} %x": the type is printed inline
          operand += _array_bytes(arg.split("%")[0])
        else:
          operand += _array_bytes(shapes.get(arg.lstrip("%"), ""))
      result = _array_bytes(shape)
      if op.endswith("-start") and shape.startswith("("):
        # (operands..., results..., context...): keep the results.
        n_in = len([a for a in args.split(",") if a.strip()])
        result = sum(_array_bytes(e)
                     for e in _tuple_elements(shape)[n_in:2 * n_in])
      op_name = _OP_NAME.search(rest)
      src = _source(op_name.group(1) if op_name else "")
      for table in (kinds, sources[src]):
        row = table[base]
        row["ops"] += 1
        row["executions"] += mult[name]
        row["operand_bytes"] += operand * mult[name]
        row["result_bytes"] += result * mult[name]
  return dict(kinds=kinds, sources=sources, unknown_trip_counts=unknown)


# ---------------------------------------------------------------- AOT
def params_bytes(params: PyTree) -> tuple[int, int]:
  """(bytes of all parameters, bytes of one device's shards)."""
  total = per_device = 0
  for p in jax.tree_util.tree_leaves(params):
    item = jnp.dtype(p.dtype).itemsize
    total += math.prod(p.shape) * item
    per_device += math.prod(p.sharding.shard_shape(p.shape)) * item
  return total, per_device


def memory_stats(compiled: Any) -> dict[str, int]:
  """Per-device bytes from `compiled.memory_analysis()` (see MEMORY_NOTE)."""
  m = compiled.memory_analysis()
  out = dict(arguments=int(m.argument_size_in_bytes),
             outputs=int(m.output_size_in_bytes),
             temporaries=int(m.temp_size_in_bytes),
             generated_code=int(m.generated_code_size_in_bytes),
             aliased=int(m.alias_size_in_bytes))
  out["total"] = (out["arguments"] + out["outputs"] + out["temporaries"]
                  + out["generated_code"] - out["aliased"])
  return out


def cost_stats(compiled: Any) -> dict[str, float]:
  """FLOPs, transcendentals and bytes accessed (see FLOPS_NOTE)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {k: float(cost.get(k, 0.0))
          for k in ("flops", "transcendentals", "bytes accessed")}


def run_aot(cfg: QwenConfig, mesh: jax.sharding.Mesh, mode: str,
            seq_len: int, batch: int = 1, logits: str = "last",
            max_len: int | None = None, loss_chunk: int = 1024,
            attention_block: int = 512, gdr_block: int | None = None,
            hlo_out: str | None = None) -> dict[str, Any]:
  """Lowers and compiles one sharded program; memory, FLOPs, collectives.

  Nothing the size of the model is allocated: parameters and inputs are
  ShapeDtypeStructs carrying their NamedShardings. `hlo_out`: a path to
  write the compiled HLO text to.
  """
  check_lengths(cfg, mesh, seq_len, batch, mode, max_len)
  params = abstract_params(cfg, mesh)
  inputs = abstract_inputs(mesh, mode, batch, seq_len)
  fn = build_program(cfg, mesh, mode, seq_len, logits, max_len, loss_chunk,
                     sp_options(attention_block, gdr_block))
  t0 = time.perf_counter()
  lowered = fn.lower(params, inputs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  total, per_device = params_bytes(params)
  text = compiled.as_text()
  if hlo_out and distributed.is_primary():
    with open(hlo_out, "w") as f:
      f.write(text)
  return dict(
      memory=memory_stats(compiled), cost=cost_stats(compiled),
      collectives=collective_stats(text),
      params_bytes=total, params_bytes_per_device=per_device,
      lower_s=t1 - t0, compile_s=t2 - t1)


# -------------------------------------------------------------- verify
def max_rel_dev(got: PyTree, want: PyTree) -> float:
  """max |got - want| over all leaves / max |want| over all leaves."""
  err = ref = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
      raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size:
      err = max(err, float(np.abs(a - b).max()))
      ref = max(ref, float(np.abs(b).max()))
  return err / max(ref, 1e-30)


def max_leaf_rel_dev(got: PyTree, want: PyTree) -> float:
  """Worst leaf of max |got - want| / max |want| (leaves of mixed scale)."""
  return max((max_rel_dev(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))),
             default=0.0)


def failures(deviations: Mapping[str, float], tolerance: float) -> list[str]:
  """The deviations above tolerance (NaN counts as above), as messages."""
  return [f"{k}: {v:.3g} > {tolerance:.3g}"
          for k, v in deviations.items() if not v <= tolerance]


def long_memory(params: PyTree, seed: int = 0) -> PyTree:
  """Slow Gated DeltaNet decays, so that the state matters across shards.

  The default init draws A = exp(A_log) from U(0.01, 16): most heads forget
  within a few tokens, and a wrong hand-off of the state between sequence
  shards would hardly change the outputs. Here A ~ U(0.001, 0.05) (per
  token decay exp(-A softplus(a + dt_bias)) of about 0.93 to 0.999).
  """
  rng = np.random.default_rng(seed + 1)

  def one(path, x):
    if getattr(path[-1], "key", None) != "A_log":
      return x
    a = rng.uniform(0.001, 0.05, size=x.shape)
    return jnp.asarray(np.log(a), x.dtype)

  return jax.tree_util.tree_map_with_path(one, params)


def run_verify(cfg: QwenConfig, mesh: jax.sharding.Mesh, mode: str,
               seq_len: int, batch: int = 1, seed: int = 0,
               max_len: int | None = None, loss_chunk: int = 1024,
               attention_block: int = 512, gdr_block: int | None = None,
               reference_device: jax.Device | None = None
               ) -> dict[str, float]:
  """Sharded vs unsharded run of a mode in float32, random weights.

  The reference is the plain model (dense attention, no sequence
  parallelism) jitted on one device (in a multi-process run, one of each
  process's own devices: every process computes it, and the sharded
  outputs are gathered to every process to compare). The weights are the model's random
  init with slow Gated DeltaNet decays (`long_memory`). Deviations are
  relative to the largest reference value: forward "logits"; prefill
  "last_logits" and "cache" (per leaf: states and K/V differ in scale);
  train "loss" and "grads".

  Returns:
    {quantity: relative deviation}.
  """
  check_lengths(cfg, mesh, seq_len, batch, mode, max_len)
  cfg = cfg.replace(dtype="float32", param_dtype="float32")
  model = Qwen35(cfg)
  ids = np.random.default_rng(seed).integers(
      0, cfg.vocab_size, size=(batch, seq_len + 1), dtype=np.int32)
  batch_np = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
  dev = reference_device or jax.local_devices()[0]
  params = jax.jit(lambda k: nn.unbox(model.init(k, ids[:1, :8])["params"]))(
      jax.random.PRNGKey(seed))
  params = jax.device_put(long_memory(params, seed), dev)
  ref_batch = jax.device_put(batch_np, dev)
  sparams = sharding.shard_params(params, cfg, mesh)
  # Each process transfers only the part of the batch its devices hold.
  placed = distributed.global_batch(batch_np, mesh)
  opts = sp_options(attention_block, gdr_block)
  out: dict[str, float] = {}

  if mode == "forward":
    want = jax.jit(lambda p, i: model.apply({"params": p}, i))(
        params, ref_batch["inputs"])
    got = build_program(cfg, mesh, "forward", seq_len, "all",
                        options=opts)(sparams, placed)
    out["logits"] = max_rel_dev(distributed.fetch(got), want)
  if mode == "prefill":
    slots = max_len or seq_len

    def ref_prefill(p, i):
      logits, c = model.apply({"params": p}, i,
                              cache=cache_lib.init_cache(cfg, batch, slots))
      return logits[:, -1].astype(jnp.float32), c

    want_last, want_cache = jax.jit(ref_prefill)(params,
                                                 ref_batch["inputs"])
    got_last, got_cache = build_program(
        cfg, mesh, "prefill", seq_len, max_len=slots, options=opts)(
            sparams, placed)
    got_last, got_cache = distributed.fetch((got_last, got_cache))
    out["last_logits"] = max_rel_dev(got_last, want_last)
    out["cache"] = max_leaf_rel_dev(got_cache, want_cache)
  if mode == "train":
    want_loss, want_grads = jax.jit(jax.value_and_grad(
        lambda p: sharding.loss_fn(cfg, p, ref_batch, loss_chunk)))(params)
    got_loss, got_grads = build_program(
        cfg, mesh, "train", seq_len, loss_chunk=loss_chunk, options=opts)(
            sparams, placed)
    got_loss, got_grads = distributed.fetch((got_loss, got_grads))
    out["loss"] = max_rel_dev(got_loss, want_loss)
    out["grads"] = max_rel_dev(got_grads, want_grads)
  return out


# ------------------------------------------------------------- output
def _size(n: float) -> str:
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if abs(n) >= scale:
      return f"{n / scale:,.2f} {unit}"
  return f"{int(n):,} B"


def describe(report: Mapping[str, Any]) -> str:
  """One line naming the program of a report."""
  return (f"{report['mode']} ({report['program']}), {report['preset']} "
          f"[{report['layers']}], {report['seq_len']:,} tokens x "
          f"{report['batch']}, mesh {report['mesh']} "
          f"({report['num_devices']} devices{_in_processes(report)}), "
          f"{report['dtype']} compute, "
          f"{report['param_dtype']} params, remat {report['remat']}")


def _in_processes(report: Mapping[str, Any]) -> str:
  n = report.get("processes", 1)
  return f" in {n} processes" if n > 1 else ""


def format_aot(report: Mapping[str, Any]) -> str:
  """The AOT report as a readable table."""
  mem, col = report["memory"], report["collectives"]

  def note(text):
    return textwrap.fill(text, 78, initial_indent="  ",
                         subsequent_indent="  ")

  lines = [f"program      {describe(report)}",
           f"platform     {report['platform']}, jax {report['jax']}",
           f"compile      lower {report['lower_s']:.1f} s, compile "
           f"{report['compile_s']:.1f} s", "",
           "per-device memory", note(MEMORY_NOTE)]
  for k in ("arguments", "outputs", "temporaries", "generated_code",
            "aliased", "total"):
    if k in mem:
      lines.append(f"  {k:<16}{_size(mem[k]):>14}")
  per_dev = _size(report["params_bytes_per_device"])
  lines.append(f"  {'parameters':<16}{per_dev:>14}   per device, from the "
               f"shardings ({_size(report['params_bytes'])} in all)")
  c = report["cost"]
  lines += ["", f"FLOPs        {c['flops']:.4g}", note(FLOPS_NOTE),
            f"transcend.   {c['transcendentals']:.4g}",
            f"bytes acc.   {c['bytes accessed']:.4g}", "",
            "collectives", note(COLLECTIVES_NOTE),
            f"  {'kind':<20}{'ops':>6}{'executed':>10}{'operand':>14}"
            f"{'result':>14}   gdn / attention / experts / other "
            "(result)"]
  for kind in COLLECTIVE_KINDS:
    r = col["kinds"][kind]
    by = " / ".join(_size(col["sources"][s][kind]["result_bytes"])
                    for s in SOURCES)
    lines.append(f"  {kind:<20}{r['ops']:>6}{r['executions']:>10}"
                 f"{_size(r['operand_bytes']):>14}"
                 f"{_size(r['result_bytes']):>14}   {by}")
  if col["unknown_trip_counts"]:
    lines.append(f"  ({col['unknown_trip_counts']} while loops without a "
                 "known trip count were counted once)")
  return "\n".join(lines)


def format_verify(report: Mapping[str, Any]) -> str:
  """The verify report: one line per compared quantity."""
  lines = [f"program      {describe(report)} (verify: float32)",
           "reference    the unsharded model on one device",
           "max |sharded - unsharded| / max |unsharded|:"]
  for k, v in report["deviations"].items():
    ok = "ok" if v <= report["tolerance"] else "FAIL"
    lines.append(f"  {k:<12}{v:>12.3e}   {ok} (tolerance "
                 f"{report['tolerance']:.1e})")
  return "\n".join(lines)


def _base_report(cfg: QwenConfig, mesh: jax.sharding.Mesh, preset: str,
                 mode: str, seq_len: int, batch: int,
                 logits: str) -> dict[str, Any]:
  n_lin = cfg.layer_types.count("linear_attention")
  program = {"forward": f"make_forward(logits={logits!r})",
             "prefill": "make_prefill", "train": "make_train_step"}[mode]
  return dict(
      preset=preset, mode=mode, program=program, seq_len=seq_len,
      batch=batch, mesh=sharding.mesh_spec_string(mesh),
      num_devices=int(mesh.devices.size), processes=jax.process_count(),
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, remat=cfg.remat_policy,
      layers=f"{n_lin} GDN + {cfg.num_hidden_layers - n_lin} attention"
      + (f", MoE {cfg.num_experts} experts top-{cfg.num_experts_per_tok}"
         f", {cfg.moe_dispatch} dispatch"
         + (f" (capacity factor {cfg.moe_capacity_factor:g})"
            if cfg.moe_capacity_factor else "")
         if cfg.is_moe else ""),
      platform=(f"{mesh.devices.flat[0].platform} "
                f"({mesh.devices.flat[0].device_kind})"),
      jax=jax.__version__, python=platform.python_version(),
      date=datetime.datetime.now().isoformat(timespec="seconds"),
      command=" ".join(["python -m experiments.long_context"]
                       + sys.argv[1:]))


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run refuses positional arguments
  # A ConfigError (a cli.UserError) is one line on stderr, exit status 1.
  # First: with --distributed the processes meet before the other checks,
  # so that an error in one of them ends them all (experiments/cli.py).
  multihost.start()
  if _AOT.value == _VERIFY.value:
    raise ConfigError("expected exactly one of --aot and --verify")
  check_flags()
  check_blocks(_ATTENTION_BLOCK.value, _GDR_BLOCK.value)
  cfg = build_config(_PRESET.value, _SEQ_LEN.value, _DTYPE.value,
                     _PARAM_DTYPE.value, _REMAT.value, _MODE.value,
                     _RATIO.value, _NUM_LAYERS.value, _MOE_DISPATCH.value,
                     _MOE_CAPACITY.value)
  mesh = build_mesh(_MESH.value, tpu_devices(_TPU_TOPOLOGY.value,
                                             _AOT.value))
  check_moe(cfg, mesh, _PRESET.value)
  check_lengths(cfg, mesh, _SEQ_LEN.value, _BATCH.value, _MODE.value,
                _MAX_LEN.value)

  report = _base_report(cfg, mesh, _PRESET.value, _MODE.value,
                        _SEQ_LEN.value, _BATCH.value, _LOGITS.value)
  common = dict(max_len=_MAX_LEN.value, loss_chunk=_LOSS_CHUNK.value,
                attention_block=_ATTENTION_BLOCK.value,
                gdr_block=_GDR_BLOCK.value)
  if _AOT.value:
    report.update(run_aot(cfg, mesh, _MODE.value, _SEQ_LEN.value,
                          _BATCH.value, logits=_LOGITS.value,
                          hlo_out=_HLO_OUT.value, **common))
    report.update(notes=dict(memory=MEMORY_NOTE, flops=FLOPS_NOTE,
                             collectives=COLLECTIVES_NOTE))
    if distributed.is_primary():
      print(format_aot(report))
  else:
    dev = run_verify(cfg, mesh, _MODE.value, _SEQ_LEN.value, _BATCH.value,
                     _SEED.value, **common)
    report.update(dtype="float32", param_dtype="float32", deviations=dev,
                  tolerance=_TOLERANCE.value)
    bad = failures(dev, _TOLERANCE.value)
    report["passed"] = not bad
    if distributed.is_primary():
      print(format_verify(report))
  if _JSON_OUT.value and jax.process_index() == 0:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(report, f, indent=2)
  if _VERIFY.value and not report["passed"]:
    sys.exit("experiments.long_context: verify failed: " + "; ".join(bad))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
