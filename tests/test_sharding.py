"""Sharded programs on 8 fake CPU devices equal the single-device result.

How this module gets 8 devices: XLA reads
`XLA_FLAGS=--xla_force_host_platform_device_count=8` once, when the backend
starts, and other test modules in the same pytest process may already have
started it with one device. So:

  * run with the flag set (`XLA_FLAGS=--xla_force_host_platform_device_count=8
    pytest tests/test_sharding.py`): every test runs in this process;
  * run without it (plain `pytest`, CI): the tests here are skipped, and
    `tests/test_sharding_8_devices.py` re-runs this file in a fresh
    interpreter with the flag set and fails with its output if it fails.

Sizes: a tiny Qwen3.5 (8 layers = 2 scanned 3:1 periods), b = 2, t = 320
(40 tokens per shard on seq:8, 80 on seq:4: no shard holds a whole number of
64-token chunks). Attention blocks of 16 tokens exercise the blockwise
kernel, its padding and its causal skipping. Float32 throughout.

Gradient tolerance: per parameter, max |diff| <= 2e-4 * max(max |ref|,
1e-2 * largest gradient anywhere). The floor of the second term matters only
for the few leaves whose gradients are sums that nearly cancel (A_log,
dt_bias of the first layer): there two correct unsharded implementations
(chunked and token-by-token rule) already differ by up to 3e-3 relative to
the leaf.
"""

import os
import warnings

import numpy as np
import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
IN_PROCESS = _FLAG in os.environ.get("XLA_FLAGS", "")


if IN_PROCESS:
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from pallas_kernels.gated_delta_rule import gated_delta_rule
  from qwen_jax import cache as cache_lib
  from qwen_jax import data
  from qwen_jax import layers
  from qwen_jax import sequence_parallel as spm
  from qwen_jax import sharding
  from qwen_jax.attention import dot_product_attention
  from qwen_jax.config import QwenConfig
  from qwen_jax.generate import decode_step
  from qwen_jax.model import Qwen35
  from tests import tolerances
  # pylint: enable=g-import-not-at-top

pytestmark = pytest.mark.skipif(
    not IN_PROCESS, reason="needs 8 fake devices; see module docstring")

B, T = 2, 320
BLOCKS = dict(attention_block_q=16, attention_block_k=16)
MESHES = ("seq:8", "data:2,seq:4", "tensor:2,seq:4", "fsdp:2,seq:4")


def _grad_check(got, want, rtol=2e-4, floor=1e-2):
  gmax = max(float(np.abs(np.asarray(x)).max())
             for x in jax.tree_util.tree_leaves(want))
  bad = []
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree_util.tree_leaves(want)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, jax.tree_util.keystr(path)
    err = float(np.abs(a - b).max())
    scale = max(float(np.abs(b).max()), floor * gmax)
    if err > rtol * scale:
      bad.append(f"{jax.tree_util.keystr(path)}: {err:.3g} > "
                 f"{rtol} * {scale:.3g}")
  assert not bad, "\n".join(bad)


def _segments(t):
  ar = jnp.arange(t)[None, :]
  # Row 0: a document boundary inside a shard; row 1: one on a shard edge
  # (t / 8 * 2 = 80) and one mid-shard.
  return ((ar >= jnp.array([[100], [80]])).astype(jnp.int32)
          + (ar >= jnp.array([[250], [163]])))


# ------------------------------------------------------------------ mesh
class TestMeshSpec:

  def test_parse(self):
    assert sharding.parse_mesh_spec("data:2, seq:4") == {
        "data": 2, "fsdp": 1, "tensor": 1, "expert": 1, "seq": 4}

  def test_make_mesh(self):
    mesh = sharding.make_mesh("data:2,fsdp:2,tensor:1,seq:2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1,
                                "expert": 1, "seq": 2}
    assert sharding.mesh_spec_string(mesh) == "data:2,fsdp:2,seq:2"

  @pytest.mark.parametrize("spec, match", [
      ("data:2,seq:2", "multiply to 4, expected the device count 8"),
      ("seq:16", "multiply to 16"),
      ("data:2,pipe:4", "unknown axis 'pipe'"),
      ("data:2,data:4", "given twice"),
      ("seq:0,data:8", "positive integer"),
      ("seq:x", "positive integer"),
      ("seq=8", "axis:size"),
  ])
  def test_bad_spec(self, spec, match):
    with pytest.raises(ValueError, match=match):
      sharding.make_mesh(spec)

  def test_sequence_not_divisible(self):
    mesh = sharding.make_mesh("seq:8")
    with pytest.raises(ValueError, match="multiple of the mesh's seq axis"):
      sharding.put_batch(np.zeros((2, 100), np.int32), mesh)

  @pytest.mark.parametrize("spec, b, axes, dropped", [
      ("data:2,seq:4", 3, "data=2", "data"),
      ("data:8", 3, "data=8", "data"),
      ("data:2,fsdp:2,seq:2", 2, "data\\*fsdp=4", "fsdp"),
  ])
  def test_batch_not_divisible_warns(self, spec, b, axes, dropped):
    """A batch the data (and fsdp) axes do not divide stays replicated over
    them (documented: docs/sharding.md), with a warning naming both."""
    mesh = sharding.make_mesh(spec)
    with pytest.warns(UserWarning, match=f"batch: expected a multiple of "
                      f"the mesh's {axes} devices, found {b}; the batch is "
                      f"replicated over {dropped}"):
      x = sharding.put_batch(np.zeros((b, 64), np.int32), mesh)
    assert dropped not in jax.tree_util.tree_leaves(tuple(x.sharding.spec))

  def test_divisible_batch_does_not_warn(self):
    mesh = sharding.make_mesh("data:2,fsdp:2,seq:2")
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      x = sharding.put_batch(np.zeros((4, 64), np.int32), mesh)
      sharding.batch_sharding(mesh, (4, 64, 3))
    assert x.sharding.spec[0] == ("data", "fsdp")


# ------------------------------------------------------------ the ops
def _gdr_inputs(key, t, hk=2, hv=4, dk=16, dv=24, g_scale=1.0):
  """g_scale = 0.02: decays near 1, so the state a shard hands the next
  keeps most of what came before (at 1, e^G over a 40-token shard is about
  e^-30 and only the shard's last tokens reach the next)."""
  ks = jax.random.split(key, 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # pylint: disable=g-long-lambda
  q = unit(jax.random.normal(ks[0], (B, t, hk, dk)))
  k = unit(jax.random.normal(ks[1], (B, t, hk, dk)))
  v = jax.random.normal(ks[2], (B, t, hv, dv))
  g = -jax.nn.softplus(jax.random.normal(ks[3], (B, t, hv))) * g_scale
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, t, hv)))
  s0 = jax.random.normal(ks[5], (B, hv, dk, dv))
  return q, k, v, g, beta, s0


@pytest.mark.parametrize("spec,segmented,g_scale", [
    ("seq:8", False, 1.0), ("seq:8", True, 1.0),
    ("data:2,tensor:2,seq:2", False, 1.0),
    ("data:2,tensor:2,seq:2", True, 1.0),
    ("seq:8", True, 0.02), ("data:2,tensor:2,seq:2", False, 0.02)])
def test_gated_delta_rule_state_passing(spec, segmented, g_scale):
  """Output, final state and all input gradients equal the unsharded rule."""
  mesh = sharding.make_mesh(spec)
  args = _gdr_inputs(jax.random.PRNGKey(0), T, g_scale=g_scale)
  seg = _segments(T) if segmented else None
  wo = jax.random.normal(jax.random.PRNGKey(1), args[2].shape)
  ws = jax.random.normal(jax.random.PRNGKey(2), args[5].shape)

  def objective(rule, *a):
    o, s = rule(*a)
    return jnp.sum(o * wo) + jnp.sum(s * ws), (o, s)

  def plain(q, k, v, g, beta, s0):
    return gated_delta_rule(q, k, v, g, beta, s0, chunk_size=16,
                            segment_ids=seg)

  def sharded(q, k, v, g, beta, s0):
    with sharding.activate(mesh):
      return spm.gated_delta_rule(q, k, v, g, beta, s0, segment_ids=seg,
                                  chunk_size=16)

  grad = lambda rule: jax.jit(jax.grad(  # pylint: disable=g-long-lambda
      lambda *a: objective(rule, *a), argnums=tuple(range(6)),
      has_aux=True))
  want_g, (want_o, want_s) = grad(plain)(*args)
  got_g, (got_o, got_s) = grad(sharded)(*args)
  tolerances.assert_close(got_o, want_o, jnp.float32, scale=0.05)
  tolerances.assert_close(got_s, want_s, jnp.float32, scale=0.05)
  _grad_check(got_g, want_g)


@pytest.mark.parametrize("change, match", [
    # The shapes passed here, not a shard's (b = 2, t = 64 on data:2,seq:4).
    (dict(g=np.s_[:, :32]),
     r"g: expected shape \(2, 64, 4\), found \(2, 32, 4\)"),
    (dict(initial_state=np.s_[:, :2]),
     r"initial_state: expected shape \(2, 4, 16, 24\), found "
     r"\(2, 2, 16, 24\)"),
    (dict(q=np.s_[..., 0]), r"q: expected rank 4 \[b, t, hk, dk\], found "
     r"shape \(2, 64, 2\)"),
    (dict(v=np.s_[:, :, :3]), "v: expected a head count hv that is a "
     "multiple of hk=2, found hv=3"),
])
def test_sequence_parallel_rule_names_global_shapes(change, match):
  mesh = sharding.make_mesh("data:2,seq:4")
  names = ("q", "k", "v", "g", "beta", "initial_state")
  args = dict(zip(names, _gdr_inputs(jax.random.PRNGKey(0), 64)))
  for name, index in change.items():
    args[name] = args[name][index]
  with pytest.raises(ValueError, match=match):
    with sharding.activate(mesh):
      spm.gated_delta_rule(**args, implementation="chunked")
  # Concrete g is checked as in the unsharded rule; an explicit ctx works
  # without an active one.
  good = dict(zip(names, _gdr_inputs(jax.random.PRNGKey(0), 64)))
  with pytest.raises(ValueError, match="g: expected log decays <= 0"):
    spm.gated_delta_rule(**dict(good, g=jnp.abs(good["g"])),
                         implementation="chunked",
                         ctx=sharding.sp_context(mesh))


def test_causal_conv_left_context():
  mesh = sharding.make_mesh("data:2,seq:4")
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  x = jax.random.normal(ks[0], (B, T, 40))
  w = jax.random.normal(ks[1], (4, 40))
  seg = _segments(T)
  want = layers.causal_conv(x, w, None, seg)
  with_prefix = jax.random.normal(ks[2], (B, 3, 40))
  want_p = layers.causal_conv(x, w, with_prefix)

  def run(x, w, seg, prefix):
    with sharding.activate(mesh):
      conv = lambda xb, sb: layers.causal_conv(xb, w, None, sb)  # pylint: disable=g-long-lambda
      return spm.causal_conv(conv, x, 4, seg, prefix)

  got = jax.jit(run)(x, w, seg, None)
  got_p = jax.jit(run)(x, w, None, with_prefix)
  tolerances.assert_close(got, want, jnp.float32, scale=0.01)
  tolerances.assert_close(got_p, want_p, jnp.float32, scale=0.01)


@pytest.mark.parametrize("balance", [True, False])
def test_context_parallel_attention(balance):
  """Causal GQA with packing and padding; outputs and gradients."""
  mesh = sharding.make_mesh("tensor:2,seq:4")
  ks = jax.random.split(jax.random.PRNGKey(4), 4)
  q = jax.random.normal(ks[0], (B, T, 4, 32))
  k = jax.random.normal(ks[1], (B, T, 2, 32))
  v = jax.random.normal(ks[2], (B, T, 2, 32))
  seg = _segments(T)
  # Padded keys that are never the first of a document (every query keeps
  # a visible key, where blockwise and dense softmax agree exactly).
  valid = jnp.ones((B, T), bool).at[:, 120:130].set(False)
  w = jax.random.normal(ks[3], q.shape)
  ar = jnp.broadcast_to(jnp.arange(T), (B, T))

  def plain(q, k, v):
    o = dot_product_attention(q, k, v, ar, ar, valid, seg, seg)
    return jnp.sum(o * w), o

  def sharded(q, k, v):
    with sharding.activate(mesh, dict(BLOCKS, balance_attention=balance)):
      o = spm.attention(q, k, v, valid, seg)
    return jnp.sum(o * w), o

  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))  # pylint: disable=g-long-lambda
  want_g, want = grad(plain)(q, k, v)
  got_g, got = grad(sharded)(q, k, v)
  tolerances.assert_close(got, want, jnp.float32, scale=0.05)
  _grad_check(got_g, want_g)


# ----------------------------------------------------------- the model
def _model():
  cfg = QwenConfig.from_preset("tiny", num_hidden_layers=8)
  ids = jax.random.randint(jax.random.PRNGKey(1), (B, T + 3), 0,
                           cfg.vocab_size)
  params = nn.unbox(Qwen35(cfg).init(jax.random.PRNGKey(0), ids[:, :8])[
      "params"])
  return cfg, params, ids


_REF = {}


def _reference(segmented):
  """Unsharded logits, loss and gradients (computed once per variant)."""
  if segmented not in _REF:
    cfg, params, ids = _model()
    batch = _batch(ids, segmented)
    logits = jax.jit(Qwen35(cfg).apply)(
        {"params": params}, batch["inputs"],
        segment_ids=batch.get("segment_ids"))
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: sharding.loss_fn(cfg, p, batch, 64)))(params)
    _REF[segmented] = (logits, loss, grads)
  return _REF[segmented]


def _batch(ids, segmented):
  batch = {"inputs": ids[:, :T], "targets": ids[:, 1:T + 1]}
  if segmented:
    batch["segment_ids"] = _segments(T)
  return batch


@pytest.mark.parametrize("spec, segmented, remat", [
    ("seq:8", False, "none"),
    ("data:2,seq:4", True, "none"),
    ("tensor:2,seq:4", False, "none"),
    ("fsdp:2,seq:4", True, "full"),
])
def test_model_logits_and_gradients(spec, segmented, remat):
  cfg, params, ids = _model()
  want_logits, want_loss, want_grads = _reference(segmented)
  cfg = cfg.replace(remat_policy=remat)
  mesh = sharding.make_mesh(spec)
  batch = _batch(ids, segmented)
  placed = {k: sharding.put_batch(v, mesh) for k, v in batch.items()}
  sparams = sharding.shard_params(params, cfg, mesh)

  fwd = sharding.make_forward(cfg, mesh, sequence_parallel_options=BLOCKS)
  logits = fwd(sparams, placed["inputs"],
               segment_ids=placed.get("segment_ids"))
  assert logits.sharding.spec[1] == "seq"
  assert tolerances.max_rel_err(logits, want_logits) < 1e-5
  tolerances.assert_close(logits, want_logits, jnp.float32, scale=0.05)

  step = sharding.make_train_step(cfg, mesh, loss_chunk=64,
                                  sequence_parallel_options=BLOCKS)
  loss, grads = step(sparams, placed)
  assert abs(float(loss) - float(want_loss)) < 1e-5 * abs(float(want_loss))
  shardings = sharding.param_shardings(cfg, mesh)
  for g, s in zip(jax.tree_util.tree_leaves(grads),
                  jax.tree_util.tree_leaves(shardings)):
    assert g.sharding.is_equivalent_to(s, g.ndim)
  _grad_check(grads, want_grads)


def test_params_are_sharded():
  cfg, _, _ = _model()
  mesh = sharding.make_mesh("fsdp:2,tensor:2,seq:2")
  sh = sharding.param_shardings(cfg, mesh)
  emb = sh["embed_tokens"]["embedding"].spec
  assert emb == jax.sharding.PartitionSpec("tensor", ("fsdp", "seq"))
  qkv = sh["layers"]["layer_0"]["linear_attn"]["in_proj_qkv"]["kernel"].spec
  assert qkv == jax.sharding.PartitionSpec(None, ("fsdp", "seq"), "tensor")


def test_prefill_then_decode():
  """Prefill over seq:8, then decode on one device == the full forward."""
  cfg, params, ids = _model()
  full = np.asarray(jax.jit(Qwen35(cfg).apply)({"params": params}, ids))
  mesh = sharding.make_mesh("seq:8")
  prefill = sharding.make_prefill(cfg, mesh, T + 3,
                                  sequence_parallel_options=BLOCKS)
  last, cache = prefill(sharding.shard_params(params, cfg, mesh),
                        sharding.put_batch(ids[:, :T], mesh))
  tolerances.assert_close(last, full[:, T - 1], jnp.float32, scale=0.05)

  # The cache (GDN final states, conv tails, K/V) equals unsharded prefill.
  _, want = jax.jit(lambda p, i, c: Qwen35(cfg).apply(
      {"params": p}, i, cache=c))(params, ids[:, :T],
                                  cache_lib.init_cache(cfg, B, T + 3))
  cache = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), cache)
  assert int(cache["index"]) == T
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(cache)[0],
                          jax.tree_util.tree_leaves(want)):
    tolerances.assert_close(a, b, jnp.float32, scale=0.05,
                            err_msg=jax.tree_util.keystr(path))

  for i in range(3):
    logits, cache = decode_step(cfg, params, ids[:, T + i], cache)
    tolerances.assert_close(logits, full[:, T + i], jnp.float32, scale=0.05)


def test_images_through_the_sharded_programs():
  """A multimodal model (tiny-vl) on data:2,seq:4: forward, loss and
  gradients (the tower's included) and prefill with images equal the
  unsharded ones; decoding continues from the sharded cache's rope delta."""
  cfg = QwenConfig.from_preset("tiny-vl")
  params = jax.tree_util.tree_map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape,
                                            x.dtype),
      nn.unbox(Qwen35(cfg).init(jax.random.PRNGKey(0),
                                jnp.zeros((1, 8), jnp.int32))["params"]))
  rng = np.random.default_rng(0)
  t = 32

  def image(n):
    return ([cfg.vision_start_token_id] + [cfg.image_token_id] * n +
            [cfg.vision_end_token_id])

  rows = [image(6) + list(rng.integers(0, 200, t + 3 - 8)),
          list(rng.integers(0, 200, 5)) + image(2) +
          list(rng.integers(0, 200, t + 3 - 9))]
  ids = np.array(rows, np.int32)
  grid = np.array([[1, 4, 6], [1, 2, 4]])
  media = dict(pixel_values=rng.standard_normal(
      (32, cfg.vision.patch_dim)).astype(np.float32), image_grid_thw=grid)
  batch = {"inputs": ids[:, :t], "targets": ids[:, 1:t + 1], **media}
  static = data.with_static_grids(batch)
  want_logits = jax.jit(lambda p, b: Qwen35(cfg).apply(
      {"params": p}, b["inputs"], pixel_values=b["pixel_values"],
      image_grid_thw=b["image_grid_thw"]))(params, static)
  want_loss, want_grads = jax.jit(jax.value_and_grad(
      lambda p, b: sharding.loss_fn(cfg, p, b, 64)))(params, static)

  mesh = sharding.make_mesh("data:2,seq:4")
  sparams = sharding.shard_params(params, cfg, mesh)
  fwd = sharding.make_forward(cfg, mesh, sequence_parallel_options=BLOCKS)
  logits = fwd(sparams, sharding.put_batch(ids[:, :t], mesh), **media)
  # The replicated tower rounds a little differently inside the sharded
  # program: compared as transformers' logits are.
  assert tolerances.max_rel_err(logits, want_logits) < (
      tolerances.HF_LOGITS_REL)
  loss, grads = sharding.make_train_step(
      cfg, mesh, loss_chunk=64, sequence_parallel_options=BLOCKS)(
          sparams, batch)
  assert abs(float(loss) - float(want_loss)) < 1e-5 * abs(float(want_loss))
  assert float(jnp.abs(grads["visual"]["merger"]["linear_fc2"][
      "kernel"]).max()) > 0
  _grad_check(grads, want_grads)

  prefill = sharding.make_prefill(cfg, mesh, t + 3,
                                  sequence_parallel_options=BLOCKS)
  last, cache = prefill(sparams, sharding.put_batch(ids[:, :t], mesh),
                        **media)
  assert tolerances.max_rel_err(last, want_logits[:, -1]) < (
      tolerances.HF_LOGITS_REL)
  full = np.asarray(jax.jit(lambda p, i: Qwen35(cfg).apply(
      {"params": p}, i, **media))(params, ids))
  cache = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), cache)
  np.testing.assert_array_equal(cache["rope_delta"], [-3, 0])
  logits, _ = decode_step(cfg, params, ids[:, t], cache)
  assert tolerances.max_rel_err(logits, full[:, t]) < (
      tolerances.HF_LOGITS_REL)
