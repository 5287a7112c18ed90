"""The fused TPU kernels compiled for TPUs, without one.

`pallas_kernels.tools.tpu_compile`: XLA's TPU compiler in libtpu, Mosaic's
passes included, compiles the rule's inference forward and its gradient for a
TPU generation it is only told of. Tracing and the TPU interpreter
(tests/test_pallas_gated_delta_rule.py) accept things a TPU does not:
the compiler is what refuses a kernel whose blocks overflow the scoped
VMEM. Nothing runs here; the numbers are checked in the interpreter.

Skipped where libtpu is not installed (`pip install -e ".[tpu]"`, which
CI does): it is the TPU compiler.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.tools import tpu_compile
from pallas_kernels.tools import triton_resources
from pallas_kernels.gated_delta_rule import block_sizes
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
import qwen_jax


@pytest.fixture(scope="module", autouse=True)
def _libtpu():
  try:
    tpu_compile.tpu_device("v5e")
  except RuntimeError as e:
    pytest.skip(str(e))


def _compile(generation, *shape, spec="", **kw):
  args = tpu_compile.rule_args(*shape, **kw)
  return tpu_compile.compile_rule(
      generation, *args,
      block_sizes=BlockSizes.from_spec(spec, "tpu") if spec else None)


# (batch, seq_len, key heads, value heads, dk, dv, dtype), options.
CASES = {
    # The benchmark's shape.
    "v5e_benchmark_shape": ("v5e", (1, 32768, 16, 16, 128, 128,
                                    jnp.bfloat16), {}),
    # The interpreter's kinds of input: value heads twice the key heads,
    # dk != dv, a length no multiple of 64, segments, an initial state.
    "v5e_f32_gva_segments_state": ("v5e", (2, 130, 1, 2, 64, 32,
                                           jnp.float32),
                                   dict(segments=True, initial_state=True)),
    "v5e_bf16_dv256": ("v5e", (2, 300, 2, 4, 128, 256, jnp.bfloat16),
                       dict(segments=True, initial_state=True)),
    # Qwen3.5's heads on the other generations.
    "v4_qwen_heads": ("v4", (1, 1000, 2, 4, 128, 128, jnp.bfloat16),
                      dict(segments=True)),
    "v5p_qwen_heads": ("v5p", (1, 1000, 2, 4, 128, 128, jnp.bfloat16),
                       dict(segments=True)),
    "v6e_qwen_heads": ("v6e", (1, 1000, 2, 4, 128, 128, jnp.bfloat16),
                       dict(segments=True)),
    # States too large for the scoped VMEM whole: the defaults tile dv
    # (block_dv "auto"), after padding it to a multiple of 128 if need be.
    "v4_state_512x512": ("v4", (1, 512, 1, 2, 512, 512, jnp.float32), {}),
    "v5p_state_1024x200": ("v5p", (1, 512, 1, 2, 1024, 200, jnp.float32),
                           {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tpu_kernels_compile(name):
  """The defaults compile: one Mosaic kernel in the inference forward,
  two (the forward that stores the states, the backward) in the
  gradient."""
  generation, shape, kw = CASES[name]
  got = _compile(generation, *shape, **kw)
  assert got["forward"]["kernels"] == 1, got
  assert got["grad"]["kernels"] == 2, got


@pytest.mark.parametrize("generation", ["v4", "v5e"])
def test_a_whole_large_state_overflows_the_vmem(generation):
  """What the value tiling is for, and what only the compiler sees: the
  backward with whole 512 x 512 states (block_dv None) needs more
  scoped VMEM than these generations give a kernel (19.1 MiB of 16 on v4,
  f32 inputs), so it does not compile."""
  with pytest.raises(Exception, match="(?i)vmem"):
    _compile(generation, 1, 512, 1, 2, 512, 512, jnp.float32,
             spec="block_dv=None")


def test_the_model_compiles_for_a_tpu_on_the_pallas_kernels():
  """The tiny hybrid (three Gated DeltaNet layers and one attention layer)
  with gdr_implementation="pallas", built on this CPU: under the TPU's
  abstract mesh the rule is built for the TPU (`block_sizes.
  target_backend`: the fused kernels, not a refusal to lower for the
  CPU), and the model's logits and the gradient of a loss of them compile
  for a v5e: a Mosaic kernel per Gated DeltaNet layer in the forward, two
  (the forward that keeps the states, the backward) in the gradient."""
  cfg = qwen_jax.QwenConfig.from_preset("tiny", gdr_implementation="pallas")
  layers = sum(t == "linear_attention" for t in cfg.layer_types)
  assert layers == 3, cfg.layer_types
  model = qwen_jax.Qwen35(cfg)
  ids = jax.ShapeDtypeStruct((2, 200), jnp.int32)
  # The parameters' shapes do not depend on the rule's implementation.
  params = jax.eval_shape(
      lambda: qwen_jax.Qwen35(qwen_jax.QwenConfig.from_preset("tiny")).init(
          jax.random.PRNGKey(0), jnp.zeros(ids.shape, ids.dtype))["params"])

  def logits(params, ids):
    return model.apply({"params": params}, ids)

  def grad(params, ids):
    return jax.grad(lambda p: jnp.mean(logits(p, ids) ** 2))(params)

  got = {name: tpu_compile.compile_for_tpu(fn, params, ids)
         for name, fn in (("forward", logits), ("grad", grad))}
  assert got["forward"]["kernels"] == layers, got
  assert got["grad"]["kernels"] == 2 * layers, got


def test_target_backend_follows_the_abstract_mesh():
  """Outside an abstract mesh with a device, the default backend; inside
  one naming a TPU, "tpu"."""
  assert block_sizes.target_backend() == jax.default_backend()
  with triton_resources.abstract_target("tpu"):
    assert block_sizes.target_backend() == "tpu"
