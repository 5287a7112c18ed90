"""The Pallas TPU kernels compiled for a TPU, without one.

Mosaic's TPU compiler ships in libtpu (`pip install -e ".[tpu]"`: the
libtpu that jax[tpu] pins for the installed jax). With it, jax compiles
for a TPU it is only told of (`jax.experimental.topologies`: deviceless
ahead-of-time compilation): the program is lowered for that TPU
generation (the kernels in Mosaic) and compiled by XLA's TPU compiler,
Mosaic's passes included, which refuse what the TPU cannot run that
tracing and the interpreter accept (scoped VMEM overflows, for one).
Nothing runs: it says whether the gated delta rule's TPU kernels compile
for a generation and shape, and how much memory XLA gives the program
(`memory_analysis`).

  python -m pallas_kernels.tools.tpu_compile --generations v5e,v6e \
      --seq_len 32768

No TPU is needed; libtpu finds none, says so on stderr, and jax keeps the
CPU as its default backend.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from pallas_kernels.tools.triton_resources import abstract_target
from pallas_kernels.tools.triton_resources import rule_args
from pallas_kernels.gated_delta_rule import pallas_gdr
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes

# libtpu takes a lockfile that one process may hold (a TPU is not shared);
# compiling uses no TPU, so processes side by side (test workers) may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# A TPU generation -> a single-host topology of it that libtpu describes.
GENERATIONS = {
    "v4": "v4:2x2x1",
    "v5e": "v5e:2x2",
    "v5p": "v5p:2x2x1",
    "v6e": "v6e:2x2",
}


def tpu_device(generation: str):
  """A device of `generation`'s topology, for compiling only. Raises
  RuntimeError where libtpu (the TPU compiler) is not installed."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if generation not in GENERATIONS:
    raise ValueError(f"generation: expected one of {sorted(GENERATIONS)}, "
                     f"found {generation!r}")
  try:
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=GENERATIONS[generation])
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"cannot describe a TPU {generation} without libtpu, the TPU "
        f"compiler (pip install -e '.[tpu]'): {str(e)[:200]}") from e
  return topology.devices[0]


def compile_for_tpu(fn, *args, generation: str = "v5e") -> dict:
  """Compiles `fn(*args)` (pytrees of ShapeDtypeStructs, or None) for one
  device of `generation`. Returns dict(seconds, temp_mib, kernels: the
  Mosaic kernels in the compiled program); raises what XLA's TPU
  compiler raises."""
  device = tpu_device(generation)
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      args)
  # Pallas' TPU lowering reads the generation from the abstract mesh, and
  # the rule its backend (`block_sizes.target_backend`).
  start = time.perf_counter()
  with abstract_target("tpu", device_kind=device.device_kind,
                       num_cores=getattr(device, "num_cores", None) or 1):
    lowered = jax.jit(fn).trace(*args).lower()
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  return dict(seconds=round(time.perf_counter() - start, 2),
              temp_mib=round(memory.temp_size_in_bytes / 2**20, 1),
              kernels=compiled.as_text().count('custom_call_target="tpu_'
                                               'custom_call"'))


def compile_rule(generation: str, *args,
                 block_sizes: BlockSizes | None = None) -> dict:
  """The rule's TPU kernels (`backend="tpu"`) compiled for `generation`
  on `rule_args(...)`: the inference forward ("forward") and the gradient
  of every input through the custom_vjp ("grad"), each as
  `compile_for_tpu` returns it."""
  q, k, v, g, beta, s0, segment_ids = args

  def forward(q, k, v, g, beta, s0, segment_ids):
    return pallas_gdr.gated_delta_rule_pallas(
        q, k, v, g, beta, s0, segment_ids=segment_ids, backend="tpu",
        block_sizes=block_sizes)

  def loss(*a):
    o, state = forward(*a)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

  diff = tuple(range(6 if s0 is not None else 5))
  return {name: compile_for_tpu(fn, q, k, v, g, beta, s0, segment_ids,
                                generation=generation)
          for name, fn in (("forward", forward),
                           ("grad", jax.grad(loss, argnums=diff)))}


def _define_flags():
  """The command's flags, defined only when it runs as a command."""
  # pylint: disable-next=g-import-not-at-top
  from pallas_kernels.tools import gdr_shapes
  return dict(
      shape=gdr_shapes,
      generations=flags.DEFINE_list(
          "generations", sorted(GENERATIONS), "TPU generations to compile "
          "for."),
      block_sizes=flags.DEFINE_string(
          "block_sizes", "", "BlockSizes fields over the TPU defaults, "
          "'/'-separated (e.g. 'block_dv=128')."),
      segments=flags.DEFINE_bool("segments", False, "With segment ids."),
      json_out=flags.DEFINE_string("json_out", None, "Write results here."))


def main(argv, f):
  del argv
  shape = f["shape"]
  args = rule_args(shape.BATCH.value, shape.SEQ_LEN.value,
                   shape.KEY_HEADS.value or shape.HEADS.value,
                   shape.HEADS.value, shape.DK.value, shape.DV.value,
                   jnp.dtype(shape.DTYPE.value), f["segments"].value)
  blocks = BlockSizes.from_spec(f["block_sizes"].value, "tpu")
  results = {}
  for generation in f["generations"].value:
    try:
      results[generation] = compile_rule(generation, *args,
                                         block_sizes=blocks)
    except Exception as e:  # pylint: disable=broad-except
      results[generation] = dict(error=str(e)[:2000])
    print(generation, json.dumps(results[generation]), flush=True)
  if f["json_out"].value:
    with open(f["json_out"].value, "w") as out:
      json.dump(dict(jax=jax.__version__, results=results), out, indent=1)


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
