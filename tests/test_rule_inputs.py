"""Bad input to the public gated delta rule: each gets a named ValueError.

Covers `pallas_kernels.gated_delta_rule.gated_delta_rule` (implementations
"recurrent", "chunked" and "pallas", the last in interpret mode on CPU,
and its `interpret` argument), `BlockSizes`' int fields,
`qwen_jax.sequence_parallel` without a context or with bad context fields,
and a mesh given one device twice. Valid inputs next to each bad one still
run (g = 0, very negative g, t = 0, a traced scale, block_sizes None or a
`BlockSizes`). Tiny shapes: b = 1, t = 70, two heads, head dims 16.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import block_sizes as block_sizes_lib
from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
from qwen_jax import sequence_parallel as spm
from qwen_jax import sharding
from tests import tolerances

B, T, H, D = 1, 70, 2, 16
IMPLS = ("recurrent", "chunked", "pallas")


def _inputs(t=T, dv=D):
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # pylint: disable=g-long-lambda
  return dict(
      q=unit(jax.random.normal(ks[0], (B, t, H, D))),
      k=unit(jax.random.normal(ks[1], (B, t, H, D))),
      v=jax.random.normal(ks[2], (B, t, H, dv)),
      g=-jax.nn.softplus(jax.random.normal(ks[3], (B, t, H))),
      beta=jax.nn.sigmoid(jax.random.normal(ks[4], (B, t, H))),
      initial_state=jax.random.normal(ks[5], (B, H, D, dv)))


def _run(impl, inputs, **kw):
  if impl == "pallas":
    kw.setdefault("interpret", True)
  return gated_delta_rule(**inputs, implementation=impl, **kw)


# ------------------------------------------------------------- g values
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [0.3, 1e-3])
def test_positive_log_decay_raises(impl, value):
  """g > 0 (e.g. the decay alpha passed instead of log(alpha))."""
  inputs = _inputs()
  inputs["g"] = inputs["g"].at[0, 5, 1].set(value)
  with pytest.raises(ValueError, match=r"g: expected log decays <= 0, "
                     r"found 1 value.*LOG decay.*log\(alpha\)"):
    _run(impl, inputs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [-np.inf, np.inf, np.nan])
def test_non_finite_log_decay_raises(impl, value):
  inputs = _inputs()
  inputs["g"] = inputs["g"].at[0, 3].set(value)
  with pytest.raises(ValueError, match="g: expected finite log decays.*"
                     "found 2 non-finite"):
    _run(impl, inputs)


def test_log_decay_values_accepted():
  """0, very negative, numpy and bfloat16 g pass; all agree."""
  inputs = _inputs()
  want, _ = _run("recurrent", inputs)
  for g in (jnp.zeros_like(inputs["g"]), inputs["g"] - 200.0,
            np.asarray(inputs["g"]), inputs["g"].astype(jnp.bfloat16)):
    got, _ = _run("chunked", dict(inputs, g=g))
    ref, _ = _run("recurrent", dict(inputs, g=g))
    tolerances.assert_close(got, ref, jnp.float32, scale=0.01)
  chex.assert_shape(want, (B, T, H, D))


@pytest.mark.parametrize("impl", IMPLS)
def test_check_values_false_skips_only_the_g_check(impl):
  """For callers whose g is <= 0 by construction (the model's layer)."""
  inputs = _inputs()
  bad = dict(inputs, g=inputs["g"].at[0, 5, 1].set(0.3))
  _run(impl, bad, check_values=False)  # not read: no error
  with pytest.raises(ValueError, match="v: expected"):
    _run(impl, dict(inputs, v=inputs["v"][..., :1, :]), check_values=False)


def test_log_decay_values_not_checked_under_jit():
  """Traced g: no check, nothing added to the program (a value check
  cannot run under jit; the docstring says what g > 0 does there)."""
  inputs = _inputs()
  g_bad = jnp.full_like(inputs["g"], 0.3)
  rest = {n: x for n, x in inputs.items() if n != "g"}
  fn = jax.jit(lambda g: _run("chunked", dict(rest, g=g)))
  o, _ = fn(g_bad)
  chex.assert_shape(o, (B, T, H, D))
  # The program of a valid g is the program of any g.
  text = fn.lower(inputs["g"]).as_text()
  assert text == fn.lower(g_bad).as_text()
  # A concrete g closed over by the jitted function is checked while
  # tracing (on the host: no ConcretizationTypeError).
  with pytest.raises(ValueError, match="g: expected log decays"):
    jax.jit(lambda q: _run("chunked", dict(inputs, q=q, g=g_bad)))(
        inputs["q"])


# --------------------------------------------------------------- dtypes
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["q", "k", "v", "g", "beta",
                                  "initial_state"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, jnp.bool_])
def test_non_real_floating_dtype_raises(impl, name, dtype):
  inputs = _inputs()
  inputs[name] = inputs[name].astype(dtype)
  with pytest.raises(ValueError, match=f"{name}: expected a real floating "
                     f"dtype.*found {jnp.dtype(dtype).name}"):
    _run(impl, inputs)


def test_list_input_raises():
  inputs = _inputs()
  inputs["q"] = inputs["q"].tolist()
  with pytest.raises(ValueError, match="q: expected an array, found list"):
    _run("chunked", inputs)


# ------------------------------------------------------------- degenerate
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cut, match", [
    (dict(q=np.s_[:0], k=np.s_[:0], v=np.s_[:0], g=np.s_[:0],
          beta=np.s_[:0], initial_state=np.s_[:0]), "q: .*batch size b"),
    (dict(q=np.s_[:, :, :0], k=np.s_[:, :, :0]), "q: .*key head count hk"),
    (dict(q=np.s_[..., :0], k=np.s_[..., :0],
          initial_state=np.s_[:, :, :0]), "q: .*key head dim dk"),
    (dict(v=np.s_[:, :, :0], g=np.s_[:, :, :0], beta=np.s_[:, :, :0],
          initial_state=np.s_[:, :0]), "v: .*value head count hv"),
    (dict(v=np.s_[..., :0], initial_state=np.s_[..., :0]),
     "v: .*value head dim dv"),
])
def test_empty_dimension_raises(impl, cut, match):
  inputs = _inputs()
  for name, index in cut.items():
    inputs[name] = inputs[name][index]
  with pytest.raises(ValueError, match=match):
    _run(impl, inputs)


def test_empty_sequence_still_runs():
  inputs = _inputs(t=0)
  for impl in IMPLS:
    o, s = _run(impl, inputs)
    chex.assert_shape(o, (B, 0, H, D))
    chex.assert_shape(s, (B, H, D, D))


# ----------------------------------------------------------------- scale
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale, found", [
    ("0.5", "'0.5'"),
    (jnp.array([0.5, 0.25]), r"shape \(2,\)"),
    (1j, r"1j"),
    (jnp.array(0.5 + 0j), "complex64"),
])
def test_bad_scale_raises(impl, scale, found):
  with pytest.raises(ValueError, match="scale: expected None, a real "
                     f"number or a 0-d real array, found .*{found}"):
    _run(impl, _inputs(), scale=scale)


@pytest.mark.parametrize("interpret", ["yes", 1, None])
def test_bad_interpret_raises(interpret):
  """A string or number for interpret is named as such, not read as a
  request for TPU interpreter params (the message used to say that)."""
  with pytest.raises(ValueError, match="interpret: expected True, False or "
                     f"TPU interpreter params .*found {interpret!r}"):
    _run("pallas", _inputs(), interpret=interpret)


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_scale(impl):
  """A traced scale works on every implementation, gradient included,
  and equals the same scale given as a number."""
  inputs = _inputs()
  want, _ = _run("chunked", inputs, scale=0.5)
  got, _ = jax.jit(lambda s: _run(impl, inputs, scale=s))(0.5)
  tolerances.assert_close(got, want, jnp.float32, scale=0.01)
  # d/ds sum(o) = sum(o) / s: o is linear in the scale.
  ds = jax.jit(jax.grad(lambda s: jnp.sum(_run(impl, inputs, scale=s)[0])))(
      0.5)
  np.testing.assert_allclose(float(ds), float(jnp.sum(want)) / 0.5,
                             rtol=1e-4)


def test_traced_scale_with_seq_splits_on_pallas():
  inputs = _inputs()
  want, _ = _run("chunked", inputs, scale=0.5)
  got, _ = jax.jit(lambda s: _run("pallas", inputs, scale=s, chunk_size=16,
                                  seq_splits=2))(0.5)
  tolerances.assert_close(got, want, jnp.float32, scale=0.01)


# ----------------------------------------------------------- block sizes
@pytest.mark.parametrize("spec, match", [
    ("solve_block=abc", "solve_block: expected an int or None, found 'abc'"),
    ("sub_chunk=abc", "sub_chunk: expected an int or None, found 'abc'"),
    ("wy_block=abc", "wy_block: expected an int or None, found 'abc'"),
    ("out_block=x", "out_block: expected an int or None, found 'x'"),
    ("num_warps=abc", "num_warps: expected an int, found 'abc'"),
    ("num_warps=0", "num_warps: expected a power-of-two .*found 0"),
    ("num_warps=3", "num_warps: expected a power-of-two .*found 3"),
    ("num_warps_intra=abc", "num_warps_intra: expected an int, found 'abc'"),
    ("num_warps_intra=6", "num_warps_intra: expected a power-of-two"),
    ("num_stages=-1", "num_stages: expected a positive int, found -1"),
    ("num_stages=0", "num_stages: expected a positive int, found 0"),
    ("block_dv=True", "block_dv: expected a positive int.*found True"),
    ("state_stride=True", "state_stride: expected an int, found True"),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_block_sizes_int_fields(spec, match, impl):
  with pytest.raises(ValueError, match=match):
    _run(impl, _inputs(), block_sizes=spec)


def test_block_sizes_int_field_types():
  with pytest.raises(ValueError, match="chunk_size: expected an int, found "
                     "True"):
    BlockSizes(chunk_size=True)
  with pytest.raises(ValueError, match="wy_block: expected an int or None"):
    BlockSizes(wy_block=32.0)
  # numpy integers are ints (stored as int: the same hashable tiles).
  bs = BlockSizes(chunk_size=np.int64(64), num_warps=np.int32(8),
                  block_dv=np.int64(16), solve_block=np.int16(8))
  assert bs == BlockSizes(chunk_size=64, num_warps=8, block_dv=16,
                          solve_block=8)
  assert type(bs.chunk_size) is int and type(bs.block_dv) is int  # pylint: disable=unidiomatic-typecheck
  assert hash(bs) == hash(BlockSizes(chunk_size=64, num_warps=8, block_dv=16,
                                     solve_block=8))
  # The defaults of every backend pass.
  for backend in ("cpu", "gpu", "tpu"):
    BlockSizes.get_default(backend)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_sizes_none_or_object(impl):
  inputs = _inputs(t=20)
  want, _ = _run(impl, inputs, block_sizes="")
  for bs in (None, BlockSizes.get_default("cpu")):
    got, _ = _run(impl, inputs, block_sizes=bs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="block_sizes: expected a BlockSizes "
                     "with chunk_size equal to chunk_size=64, found "
                     "chunk_size=16"):
    _run(impl, inputs, block_sizes=BlockSizes(chunk_size=16))
  for bad in (3, {"block_dv": 16}, b"block_dv=16"):
    with pytest.raises(ValueError, match="block_sizes: expected a spec "
                       "string.*None or a BlockSizes"):
      _run(impl, inputs, block_sizes=bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_dv_checked_for_every_implementation(impl):
  inputs = _inputs()
  with pytest.raises(ValueError, match="block_dv: expected a divisor of "
                     "dv=16, found 5"):
    _run(impl, inputs, block_sizes="block_dv=5")
  # seq_splits > 1: the kernels see dv + dk value columns.
  with pytest.raises(ValueError, match=r"block_dv: expected a divisor of "
                     r"dv=32 \(dv=16 plus the dk=16 columns"):
    _run(impl, inputs, block_sizes="block_dv=12", seq_splits=2)
  _run(impl, inputs, block_sizes="block_dv=8")  # divides: runs


def test_block_dv_checked_against_the_padded_gpu_dim(monkeypatch):
  """On GPU dv = 12 is padded to 16 for the kernels: block_dv = 8 is fine
  there (whatever the implementation), 5 names both dims."""
  monkeypatch.setattr(block_sizes_lib, "target_backend", lambda: "gpu")
  inputs = _inputs(t=20, dv=12)
  with pytest.raises(ValueError, match=r"block_dv: expected a divisor of "
                     r"dv=16 \(the value dim 12, padded for the gpu "
                     r"kernels\), found 5"):
    _run("recurrent", inputs, block_sizes="block_dv=5")
  o, _ = _run("recurrent", inputs, block_sizes="block_dv=8")
  chex.assert_shape(o, (B, 20, H, 12))


# ------------------------------------------------------ sequence parallel
def test_sequence_parallel_ops_need_a_context():
  inputs = _inputs()
  assert spm.current() is None
  with pytest.raises(ValueError, match="ctx: sequence_parallel."
                     "gated_delta_rule needs a sequence-parallel context, "
                     "found none active"):
    spm.gated_delta_rule(**inputs, implementation="chunked")
  x = jnp.zeros((B, T, 8))
  with pytest.raises(ValueError, match="ctx: sequence_parallel.causal_conv"):
    spm.causal_conv(lambda xb, sb: xb, x, 4)
  with pytest.raises(ValueError, match="ctx: sequence_parallel.attention"):
    spm.attention(jnp.zeros((B, T, 2, 8)), x[..., None], x[..., None])


@pytest.mark.parametrize("field, value, match", [
    ("gdr_block", 0, "gdr_block: expected an int >= 1 or None, found 0"),
    ("gdr_block", -64, "gdr_block: expected an int >= 1 or None, found -64"),
    ("gdr_block", 64.0, "gdr_block: expected an int >= 1 or None, found "
     "64.0"),
    ("attention_block_q", 0, "attention_block_q: expected an int >= 1, "
     "found 0"),
    ("attention_block_k", True, "attention_block_k: expected an int >= 1, "
     "found True"),
    ("balance_attention", "no", "balance_attention: expected True or False, "
     "found 'no'"),
    ("seq_axis", "sequence", "seq_axis: expected an axis of the mesh"),
])
def test_sequence_parallel_context_fields(field, value, match):
  """gdr_block=0 used to run the whole shard in one call without a word."""
  mesh = sharding.make_mesh("seq:1")
  sharding.sp_context(mesh, gdr_block=64)  # valid
  with pytest.raises(ValueError, match=re.escape(match)):
    sharding.sp_context(mesh, **{field: value})


def test_mesh_devices_must_be_distinct():
  device = jax.devices()[0]
  with pytest.raises(ValueError, match="devices: expected distinct devices, "
                     "found 1 repeated"):
    sharding.make_mesh("seq:2", devices=[device, device])
