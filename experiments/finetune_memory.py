"""Memory of a fine-tuning step, without a GPU: exact state bytes and XLA's
count for the compiled step.

  python -m experiments.finetune_memory --preset qwen3.5-4b --seq_len 8192 \
      --lora_rank 16
  python -m experiments.finetune_memory --preset qwen3.5-9b --seq_len 4096 \
      --lora_rank 16 --json_out 9b.json

Two numbers per configuration:

  * state (exact, from shapes): the frozen base weights in bfloat16, the
    float32 adapters, and the optimizer state (AdamW's two float32 moments
    of the adapters and its counters, `jax.eval_shape` of the optimizer's
    init); for full fine-tuning the float32 weights and their moments.
  * the compiled train step's `memory_analysis()` (arguments, outputs,
    temporaries, generated code; total = their sum less the aliased
    bytes): the step is lowered with abstract arguments (nothing is
    allocated) and compiled by the XLA compiler of this machine. On a
    machine without a GPU that is the host (CPU) compiler: its buffer
    assignment, fusion and the Gated DeltaNet implementation it runs (the
    chunked jnp rule, not the Pallas GPU kernel) differ from the GPU
    compiler's, so its count is labelled as the CPU compiler's; it is what
    the program needs when compiled for the CPU, an estimate of the GPU's
    and not a measurement on one.

The presets are the released checkpoints, vision tower included (its
weights are loaded with the checkpoint; the step, on text, does not run
it).

The step is the one `experiments.train` runs (`train_step.make_train_step`
with `lora=`): batch 1 x seq_len tokens, bfloat16 compute, per-layer full
rematerialisation (`--remat full`), the chunked cross-entropy.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Sequence

from absl import flags
import jax
import jax.numpy as jnp

from experiments import cli
from qwen_jax import checkpoint as checkpoint_lib
from qwen_jax import lora as lora_lib
from qwen_jax import train_step
from qwen_jax.config import PRESETS
from qwen_jax.config import QwenConfig

_PRESET = flags.DEFINE_string("preset", "qwen3.5-4b", "Model preset.")
_SEQ = flags.DEFINE_integer("seq_len", 8192, "Tokens per step.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per step.")
_RANK = flags.DEFINE_integer("lora_rank", 16, "LoRA rank (0: full "
                             "fine-tuning).")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots"],
                           "Rematerialisation per layer.")
_COMPILE = flags.DEFINE_boolean("compile", True, "Compile the step and "
                                "report XLA's memory analysis (slow for the "
                                "big presets on a CPU).")
_JSON = flags.DEFINE_string("json_out", None, "Also write the report here.")

GIB = 2 ** 30


def _bytes(tree: Any) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def report(preset: str, seq_len: int, batch: int = 1, lora_rank: int = 16,
           remat: str = "full", compile_step: bool = True
           ) -> dict[str, Any]:
  """The state bytes and (optionally) the compiled step's memory analysis.

  Raises:
    ValueError: an unknown preset, or a size < 1.
  """
  for name, v in (("seq_len", seq_len), ("batch", batch)):
    if v < 1:
      raise ValueError(f"--{name}: expected >= 1, found {v}")
  if lora_rank < 0:
    raise ValueError(f"--lora_rank: expected >= 0, found {lora_rank}")
  base_dtype = "bfloat16" if lora_rank else "float32"
  cfg = QwenConfig.from_preset(preset, dtype="bfloat16",
                               param_dtype=base_dtype, remat_policy=remat)
  tcfg = train_step.TrainConfig(batch_size=batch, seq_len=seq_len,
                                num_steps=1000, compute_dtype="bfloat16")
  spec = lora_lib.LoraSpec(rank=lora_rank, alpha=2.0 * lora_rank) if (
      lora_rank) else None
  base = checkpoint_lib.param_shapes(cfg)
  trained = lora_lib.adapter_shapes(base, spec) if spec else base
  opt = jax.eval_shape(train_step.make_optimizer(tcfg).init, trained)
  out: dict[str, Any] = {
      "preset": preset, "seq_len": seq_len, "batch": batch,
      "mode": f"lora rank {lora_rank}" if spec else "full",
      "remat": remat, "compute_dtype": "bfloat16",
      "base_dtype": base_dtype,
      "params": train_step.param_count(base),
      "trained_params": train_step.param_count(trained),
      "bytes": {
          "base_weights": _bytes(base) if spec else 0,
          "trained": _bytes(trained),
          "optimizer_state": _bytes(opt),
      },
  }
  out["bytes"]["state_total"] = sum(out["bytes"].values())
  if not compile_step:
    return out
  run_cfg = train_step.model_config_for_training(cfg, tcfg)
  step = train_step.make_train_step(run_cfg, tcfg, lora=spec)
  state = train_step.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=trained,
      opt_state=opt)
  ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  batch_arg = {"inputs": ids, "targets": ids,
               "loss_mask": jax.ShapeDtypeStruct((batch, seq_len),
                                                 jnp.float32),
               "segment_ids": ids}
  args = (state, batch_arg) + ((base,) if spec else ())
  t0 = time.time()
  compiled = step.lower(*args).compile()
  m = compiled.memory_analysis()
  xla = dict(arguments=int(m.argument_size_in_bytes),
             outputs=int(m.output_size_in_bytes),
             temporaries=int(m.temp_size_in_bytes),
             generated_code=int(m.generated_code_size_in_bytes),
             aliased=int(m.alias_size_in_bytes))
  xla["total"] = (xla["arguments"] + xla["outputs"] + xla["temporaries"]
                  + xla["generated_code"] - xla["aliased"])
  out["xla"] = dict(xla, compiler=jax.devices()[0].platform,
                    device=jax.devices()[0].device_kind,
                    compile_s=round(time.time() - t0, 1))
  return out


def format_report(r: dict[str, Any]) -> str:
  b = r["bytes"]
  lines = [
      f"{r['preset']}, {r['mode']}, {r['batch']} x {r['seq_len']} tokens, "
      f"remat {r['remat']}, {r['compute_dtype']} compute",
      f"  parameters {r['params']:,}, trained {r['trained_params']:,}",
      f"  state (exact): base {b['base_weights'] / GIB:.2f} GiB "
      f"({r['base_dtype']}) + trained {b['trained'] / GIB:.3f} GiB + "
      f"optimizer {b['optimizer_state'] / GIB:.3f} GiB = "
      f"{b['state_total'] / GIB:.2f} GiB"]
  if "xla" in r:
    x = r["xla"]
    lines.append(
        f"  XLA memory_analysis ({x['compiler']} compiler, {x['device']}): "
        f"arguments {x['arguments'] / GIB:.2f} + outputs "
        f"{x['outputs'] / GIB:.2f} + temporaries {x['temporaries'] / GIB:.2f}"
        f" + code {x['generated_code'] / GIB:.3f} - aliased "
        f"{x['aliased'] / GIB:.2f} = {x['total'] / GIB:.2f} GiB "
        f"(compiled in {x['compile_s']} s)")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run refuses positional arguments
  # Every flag checked before the (minutes long) compilation.
  cli.positive_int("--seq_len", _SEQ.value)
  cli.positive_int("--batch", _BATCH.value)
  cli.positive_int("--lora_rank", _RANK.value, low=0)
  json_out = (cli.writable_file("--json_out", _JSON.value)
              if _JSON.value else None)
  if _PRESET.value not in PRESETS:
    raise cli.UserError(f"--preset: expected one of {sorted(PRESETS)}, "
                        f"found {_PRESET.value!r}")
  try:
    r = report(_PRESET.value, _SEQ.value, _BATCH.value, _RANK.value,
               _REMAT.value, _COMPILE.value)
  except ValueError as e:
    raise cli.UserError(str(e)) from e
  print(format_report(r))
  if json_out:
    with open(json_out, "w") as f:
      json.dump(r, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
