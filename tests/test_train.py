"""Training: loss, gradients, checkpoints, export, data and the train script.

What is checked:
  * a few AdamW steps on one fixed batch lower the loss clearly;
  * jax.grad of `train_step.loss_and_stats` (whole model, float64 parameters)
    matches central finite differences along random directions and for
    single entries of a norm weight, A_log, dt_bias, a conv kernel and the
    embedding;
  * `chunked_cross_entropy` equals the cross-entropy of the full logits
    (values, argmax hits and gradients), for chunk sizes that do and do not
    divide the token count, both head layouts;
  * a run stopped by an exception mid-run and restarted from its workdir
    gives bit-equal losses for every step and bit-equal final parameters;
  * restoring a checkpoint written for another model config raises a
    ValueError naming the field (implementation fields are free);
  * `export_hf` writes a folder that transformers loads, with our logits;
  * MQAR: targets equal the value of the queried key in the context (an
    independent lookup), keys are distinct, batches are pure functions of
    (seed, step); bad task shapes raise ValueError;
  * packing: the loss never crosses a document boundary, segment ids are
    right, text batches are deterministic;
  * experiments/train.py: `run` writes metrics.csv, checkpoints and
    eval.json and resumes; flags parse; bad config values raise ValueError.

The training tests share one compiled step: they all use the model and
TrainConfig of `experiments/configs/mqar.py:runlocal`.
"""

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

from absl import flags
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
from experiments import train as train_script
from experiments.configs import mqar as mqar_config
from experiments.configs import qwen3_5_0_8b as qwen08b_config
from experiments.configs import text as text_config
from qwen_jax import data
from qwen_jax import head
from qwen_jax import sharding
from qwen_jax import stack
from qwen_jax import train
from qwen_jax import train_checkpoint
from qwen_jax import train_step
from qwen_jax import train_workdir
from qwen_jax.config import FULL, LINEAR, QwenConfig
from qwen_jax.model import Qwen35
from tests import tolerances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "experiments", "configs")


def _local():
  """(config, cfg, tcfg, task) of the MQAR runlocal config."""
  config = mqar_config.get_config("runlocal")
  cfg, tcfg, task = train_script.build(config)
  return config, cfg, tcfg, task


def _csv_rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted run of the runlocal MQAR config, with checkpoints."""
  _, cfg, tcfg, task = _local()
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = train.train(cfg, tcfg, task.batch_fn, workdir, progress=False)
  return cfg, tcfg, task, result, workdir


# ------------------------------------------------------------- optimisation
def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
  _, cfg, tcfg, _ = _local()
  rng = np.random.default_rng(101)
  seq = rng.integers(0, cfg.vocab_size, (tcfg.batch_size, tcfg.seq_len + 1))
  batch = {"inputs": seq[:, :-1].astype(np.int32),
           "targets": seq[:, 1:].astype(np.int32),
           "loss_mask": np.ones((tcfg.batch_size, tcfg.seq_len), np.float32),
           "segment_ids": np.ones((tcfg.batch_size, tcfg.seq_len),
                                  np.int32)}
  params = train_step.init_params(cfg, seed=7)
  before = jax.tree_util.tree_map(np.array, params)
  result = train.train(cfg, tcfg, lambda step: batch, params=params,
                       progress=False)
  # The caller's parameters are neither donated (deleted) nor changed.
  chex.assert_trees_all_equal(params, before)
  with pytest.raises(AssertionError):  # the result's have moved
    chex.assert_trees_all_equal(result.state.params, before)
  losses = np.array([result.losses[s] for s in range(tcfg.num_steps)])
  # Starts near the uniform guess, ends clearly below it.
  assert abs(losses[0] - np.log(cfg.vocab_size)) < 0.3, losses
  assert losses[-1] < losses[0] - 0.5, losses
  assert np.all(np.isfinite(losses))
  grad_norms = [row["grad_norm"] for row in result.history]
  assert all(np.isfinite(g) and g > 0 for g in grad_norms)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  """A copy of the nested dict `tree` with the leaf at `path` replaced."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def _randomize(shapes, rng):
  """Random parameters of the given shapes, at scales where each matters
  (zero-centred norms off 0, decays spread, unit-variance projections)."""
  def draw(path, p):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    normal = rng.standard_normal(p.shape)
    if name.endswith("A_log"):  # decays exp(A) in [0.02, 4]
      return np.log(rng.uniform(0.02, 4.0, p.shape))
    if name.endswith("dt_bias"):
      return normal
    if name.endswith("linear_attn/norm/weight"):  # plain weight, init 1
      return 1.0 + 0.3 * normal
    if name.endswith("weight"):  # zero-centred norms: (1 + w)
      return 0.3 * normal
    if "embed" in name:
      return 0.5 * normal
    if "conv1d" in name:
      return 0.3 * normal
    return normal / np.sqrt(p.shape[-2])  # kernels [..., in, out]
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.asarray(draw(path, p), p.dtype), shapes)


@pytest.mark.parametrize("keys,named", [
    (("input_ids", "targets"), "missing ['inputs']"),
    (("inputs", "targets", "labels"), "unknown ['labels']"),
])
def test_a_batch_with_wrong_keys_is_refused_by_name(keys, named):
  _, cfg, _, _ = _local()
  ids = np.ones((1, 8), np.int32)
  batch = {k: ids for k in keys}
  params = train_step.init_params(cfg, seed=0)
  with pytest.raises(ValueError, match=re.escape(named)):
    train_step.loss_and_stats(params, cfg, batch)
  with pytest.raises(ValueError, match=re.escape(named)):
    sharding.loss_fn(cfg, params, batch)


def test_gradients_match_finite_differences():
  """jax.grad vs central differences (Richardson-extrapolated), float64.

  Parameters, matmuls and the loss are float64, but the model computes its
  norms, gates, conv, delta rule and softmax in float32 (as transformers
  does), so the loss carries float32 rounding (~1e-7 relative) and the
  differences are good to about 1e-3 of the largest gradient entry, not to
  float64 precision. The tolerance (2% of the value plus 1e-5 of the
  gradient norm) sits well above that and far below what a wrong gradient
  (a missing factor, a sign, a stopped path) gives.
  """
  with jax.enable_x64(True):
    cfg = QwenConfig.from_preset(
        "tiny", vocab_size=24, hidden_size=16, intermediate_size=24,
        num_hidden_layers=2, layer_types=(LINEAR, FULL),
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8, dtype="float64",
        param_dtype="float64", gdr_implementation="chunked",
        gdr_chunk_size=4)  # 10 tokens: three chunks, the last one padded
    rng = np.random.default_rng(202)
    shapes = jax.eval_shape(lambda: train_step.init_params(cfg))
    params = _randomize(shapes, rng)
    b, t = 2, 10
    seq = rng.integers(0, cfg.vocab_size, (b, t + 1))
    batch = {
        "inputs": jnp.asarray(seq[:, :-1], jnp.int32),
        "targets": jnp.asarray(seq[:, 1:], jnp.int32),
        "loss_mask": jnp.asarray(rng.random((b, t)) < 0.8, jnp.float64),
        # Two packed documents in each row.
        "segment_ids": jnp.asarray(np.repeat([[1] * 6 + [2] * 4], b, 0),
                                   jnp.int32),
    }

    def loss_fn(p):
      return train_step.loss_and_stats(p, cfg, batch, chunk_size=7)[0]

    # One compiled program for the gradient and every difference quotient.
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    loss = lambda p: value_and_grad(p)[0]
    grads = value_and_grad(params)[1]
    assert jax.tree_util.tree_leaves(grads)[0].dtype == jnp.float64
    gnorm = np.sqrt(sum(float(jnp.sum(x * x))
                        for x in jax.tree_util.tree_leaves(grads)))

    def central(direction, h):
      up = jax.tree_util.tree_map(lambda p, v: p + h * v, params, direction)
      down = jax.tree_util.tree_map(lambda p, v: p - h * v, params,
                                    direction)
      return (float(loss(up)) - float(loss(down))) / (2 * h)

    def richardson(direction, h):
      return (4 * central(direction, h / 2) - central(direction, h)) / 3

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    lin, full = "layer_0", "layer_1"
    paths = {
        "input norm": ("layers", lin, "input_layernorm", "weight"),
        "gated norm": ("layers", lin, "linear_attn", "norm", "weight"),
        "q_norm": ("layers", full, "self_attn", "q_norm", "weight"),
        "A_log": ("layers", lin, "linear_attn", "A_log"),
        "dt_bias": ("layers", lin, "linear_attn", "dt_bias"),
        "conv kernel": ("layers", lin, "linear_attn", "conv1d", "kernel"),
        "embedding": ("embed_tokens", "embedding"),
        "final norm": ("norm", "weight"),
    }
    checked = 0
    for name, path in paths.items():
      g = np.asarray(_get(grads, path))
      # The entry with the largest gradient, and a random one.
      for flat in (int(np.argmax(np.abs(g))), int(rng.integers(g.size))):
        idx = np.unravel_index(flat, g.shape)
        e = np.zeros(g.shape)
        e[idx] = 1.0
        fd = richardson(_set(zeros, path, jnp.asarray(e)), 3e-3)
        assert abs(fd - g[idx]) <= 2e-2 * abs(g[idx]) + 1e-5 * gnorm, (
            name, idx, fd, g[idx])
        checked += abs(g[idx]) > 1e-3 * gnorm
    assert checked >= len(paths)  # not only vanishing gradients

    def unit(tree):
      n = np.sqrt(sum(float(jnp.sum(x * x))
                      for x in jax.tree_util.tree_leaves(tree)))
      return jax.tree_util.tree_map(lambda x: x / n, tree)

    # Along the gradient (checks its norm; the loss curves fastest there, so
    # a smaller step) and along random directions through every parameter.
    directions = [(unit(grads), 3e-4)] + [(unit(jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)), 1e-2)
                                          for _ in range(2)]
    for v, h in directions:
      gv = sum(float(jnp.vdot(a, c)) for a, c in zip(
          jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(v)))
      fd = richardson(v, h)
      assert abs(fd - gv) <= 1e-2 * abs(gv) + 1e-5 * gnorm, (fd, gv, h)


def test_scanned_remat_stack_gradients_match_finite_differences():
  """The scanned stack (two periods of linear + full) with remat "full":
  directional derivatives of the float64 loss along the gradient and along
  random directions through every parameter (tolerances as above)."""
  with jax.enable_x64(True):
    cfg = QwenConfig.from_preset(
        "tiny", vocab_size=24, hidden_size=16, intermediate_size=24,
        num_hidden_layers=4, layer_types=(LINEAR, FULL) * 2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8, dtype="float64",
        param_dtype="float64", gdr_implementation="chunked",
        gdr_chunk_size=4, scan_layers=True, remat_policy="full")
    assert stack.is_scanned(cfg)
    rng = np.random.default_rng(303)
    params = _randomize(
        jax.eval_shape(lambda: train_step.init_params(cfg)), rng)
    b, t = 2, 9
    seq = rng.integers(0, cfg.vocab_size, (b, t + 1))
    batch = {"inputs": jnp.asarray(seq[:, :-1], jnp.int32),
             "targets": jnp.asarray(seq[:, 1:], jnp.int32)}
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda p: train_step.loss_and_stats(p, cfg, batch)[0]))
    grads = value_and_grad(params)[1]
    leaves = jax.tree_util.tree_leaves
    gnorm = np.sqrt(sum(float(jnp.sum(x * x)) for x in leaves(grads)))

    def unit(tree):
      n = np.sqrt(sum(float(jnp.sum(x * x)) for x in leaves(tree)))
      return jax.tree_util.tree_map(lambda x: x / n, tree)

    def derivative(v, h):  # Richardson-extrapolated central difference
      def central(h):
        up = jax.tree_util.tree_map(lambda p, d: p + h * d, params, v)
        down = jax.tree_util.tree_map(lambda p, d: p - h * d, params, v)
        return (float(value_and_grad(up)[0])
                - float(value_and_grad(down)[0])) / (2 * h)
      return (4 * central(h / 2) - central(h)) / 3

    directions = [(unit(grads), 3e-4)] + [(unit(jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)), 1e-2)
                                          for _ in range(2)]
    for v, h in directions:
      gv = sum(float(jnp.vdot(a, c)) for a, c in zip(leaves(grads),
                                                      leaves(v)))
      fd = derivative(v, h)
      assert abs(fd - gv) <= 1e-2 * abs(gv) + 1e-5 * gnorm, (fd, gv, h)


@pytest.mark.parametrize("vocab_major", [True, False])
def test_chunked_cross_entropy_equals_full_logits(vocab_major):
  rng = np.random.default_rng(303 + vocab_major)
  b, t, d, vocab = 3, 7, 16, 50  # 21 tokens
  hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  shape = (vocab, d) if vocab_major else (d, vocab)
  w = jnp.asarray(rng.standard_normal(shape) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
  mask = jnp.asarray(rng.random((b, t)) < 0.7, jnp.float32)
  mask = mask.at[0, 0].set(0.5)  # weights, not only 0/1
  spec = "btd,vd->btv" if vocab_major else "btd,dv->btv"

  def full(h, w):
    return head.cross_entropy(jnp.einsum(spec, h, w), targets, mask)[0]

  ref_loss, (ref_dh, ref_dw) = jax.jit(jax.value_and_grad(full, (0, 1)))(
      hidden, w)
  logits = np.asarray(jnp.einsum(spec, hidden, w))
  hits = (logits.argmax(-1) == np.asarray(targets)) * np.asarray(mask)

  # 1 and 4 leave a padded last chunk or many chunks; 7 divides 21; 0 picks
  # the automatic size (all 21 tokens here).
  for chunk in (1, 4, 7, 0):
    def chunked(h, w, chunk=chunk):
      loss, tokens, correct = head.chunked_cross_entropy(
          h, w, targets, mask, vocab_major=vocab_major, chunk_size=chunk)
      return loss, (tokens, correct)

    (loss, (tokens, correct)), (dh, dw) = jax.jit(jax.value_and_grad(
        chunked, (0, 1), has_aux=True))(hidden, w)
    msg = f"chunk_size={chunk}"
    tolerances.assert_close(loss, ref_loss, jnp.float32, err_msg=msg)
    assert float(tokens) == float(np.asarray(mask).sum()), msg
    assert float(correct) == pytest.approx(hits.sum()), msg
    tolerances.assert_close(dh, ref_dh, jnp.float32, err_msg=msg)
    tolerances.assert_close(dw, ref_dw, jnp.float32, err_msg=msg)


# -------------------------------------------------------------- checkpoints
class _Crash(Exception):
  pass


def test_killed_run_resumes_with_identical_losses(reference_run, tmp_path):
  cfg, tcfg, task, ref, ref_dir = reference_run
  workdir = str(tmp_path / "crashed")
  crash_at = 6
  seen = {}

  def crash(step, metrics):
    seen[step] = metrics["loss"]
    if step == crash_at:
      raise _Crash()

  with pytest.raises(_Crash):
    train.train(cfg, tcfg, task.batch_fn, workdir, progress=False,
                callback=crash)
  ckpt_steps = sorted(int(s) for s in os.listdir(
      os.path.join(workdir, "checkpoints")) if s.isdigit())
  # Saved every 4 steps; the save after step index 7 never happened.
  assert ckpt_steps == [4], ckpt_steps

  resumed = train.train(cfg, tcfg, task.batch_fn, workdir, progress=False)
  assert resumed.resumed_from == 4
  assert sorted(resumed.losses) == list(range(4, tcfg.num_steps))
  for step, value in seen.items():
    assert value == ref.losses[step], (step, value, ref.losses[step])
  for step, value in resumed.losses.items():
    assert value == ref.losses[step], (step, value, ref.losses[step])
  assert int(resumed.state.step) == tcfg.num_steps
  chex.assert_trees_all_equal(resumed.state.params, ref.state.params)
  chex.assert_trees_all_equal(resumed.state.opt_state, ref.state.opt_state)
  # metrics.csv holds each logged step once, as in the uninterrupted run.
  rows = _csv_rows(os.path.join(workdir, "metrics.csv"))
  ref_rows = _csv_rows(os.path.join(ref_dir, "metrics.csv"))
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
  assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
  # The row written after the last checkpoint (step 6; the crash came in
  # the callback of step index 6, before row 8) is kept, moved aside with
  # the step the resume started from: no row is lost.
  moved = _csv_rows(os.path.join(workdir, "metrics.superseded.csv"))
  assert [(r["step"], r["resumed_from"]) for r in moved] == [("6", "4")]
  (ref_6,) = [r for r in ref_rows if r["step"] == "6"]
  assert moved[0]["loss"] == ref_6["loss"]
  assert float(moved[0]["loss"]) == seen[5]  # the batch of step index 5


def test_mixture_of_experts_metrics_carry_the_routing(tmp_path):
  """A mixture-of-experts run's metrics.csv has the routing columns; a
  resume moves a redone row to metrics.superseded.csv in the same format,
  equal to the row that replaces it; a dense run's metrics.csv in the
  workdir is refused by name before anything is written."""
  _, cfg, tcfg, task = _local()
  moe_cfg = cfg.replace(num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16,
                        shared_expert_intermediate_size=16)
  tcfg = dataclasses.replace(tcfg, num_steps=4, checkpoint_every=2,
                             log_every=1)
  workdir = str(tmp_path / "moe")

  def crash(step, metrics):
    if step == 3:  # after row 3, written past the checkpoint of step 2
      raise _Crash()

  with pytest.raises(_Crash):
    train.train(moe_cfg, tcfg, task.batch_fn, workdir, progress=False,
                callback=crash)
  resumed = train.train(moe_cfg, tcfg, task.batch_fn, workdir,
                        progress=False)
  assert resumed.resumed_from == 2
  fields = list(train_workdir.metrics_fields(True))
  for name, header in (("metrics.csv", fields),
                       ("metrics.superseded.csv", fields + ["resumed_from"])):
    with open(os.path.join(workdir, name)) as f:
      assert next(csv.reader(f)) == header, name
  rows = _csv_rows(os.path.join(workdir, "metrics.csv"))
  assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
  for r in rows:
    assert 0 < float(r["router_aux_loss"]) <= 4, r
    assert 0 <= float(r["expert_load_min"]) <= 1 <= float(
        r["expert_load_max"]) <= 2, r
    assert float(r["expert_dropped_share"]) == 0.0, r
  (moved,) = _csv_rows(os.path.join(workdir, "metrics.superseded.csv"))
  assert moved["step"] == "3" and moved["resumed_from"] == "2"
  for k in train_workdir.ROUTING_FIELDS + ("loss",):
    assert moved[k] == rows[2][k], k  # the same batch from the same state

  dense_dir = str(tmp_path / "dense")
  no_ckpt = dataclasses.replace(tcfg, num_steps=1, save_checkpoints=False)
  train.train(cfg, no_ckpt, task.batch_fn, dense_dir, progress=False)
  before = sorted(os.listdir(dense_dir))
  with pytest.raises(ValueError, match=r"metrics\.csv: written by a run of "
                     r"a dense model .* this run trains a model with "
                     r"mixture-of-experts layers") as e:
    train.train(moe_cfg, no_ckpt, task.batch_fn, dense_dir, progress=False)
  assert len(str(e.value).splitlines()) == 1
  assert sorted(os.listdir(dense_dir)) == before


def test_restore_for_another_model_config_names_the_field(reference_run):
  cfg, tcfg, _, ref, workdir = reference_run
  for changes, fields in (
      ({"hidden_size": 48}, ["hidden_size"]),
      ({"layer_types": (FULL, LINEAR)}, ["layer_types"]),
      ({"vocab_size": 40, "tie_word_embeddings": False},
       ["vocab_size", "tie_word_embeddings"]),
      # Implementation fields that fix the saved state's structure.
      ({"scan_layers": not cfg.scan_layers}, ["scan_layers"]),
      ({"param_dtype": "bfloat16"}, ["param_dtype"])):
    ckpt = train_checkpoint.Checkpointer(workdir, cfg.replace(**changes), tcfg)
    try:
      with pytest.raises(ValueError) as err:
        ckpt.restore(ref.state)
    finally:
      ckpt.close()
    for field in fields:
      assert field in str(err.value), str(err.value)
    assert "num_hidden_layers" not in str(err.value)  # unchanged: not named
  # How the model is computed may change between save and restore.
  other = cfg.replace(remat_policy="full", gdr_implementation="recurrent")
  ckpt = train_checkpoint.Checkpointer(workdir, other, tcfg)
  try:
    state = ckpt.restore(ref.state)
  finally:
    ckpt.close()
  assert int(state.step) == tcfg.num_steps
  chex.assert_trees_all_equal(state.params, ref.state.params)


def test_export_hf_loads_in_transformers(reference_run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, _, _, ref, _ = reference_run
  cfg, params = ref.cfg, ref.state.params
  path = str(tmp_path / "hf")
  train_checkpoint.export_hf(path, cfg, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32).eval()
  ids = np.random.default_rng(404).integers(0, cfg.vocab_size, (2, 19))
  with torch.no_grad():
    theirs = model(input_ids=torch.as_tensor(ids), use_cache=False)
  theirs = theirs.logits.float().numpy()
  ours = np.asarray(Qwen35(cfg).apply({"params": params},
                                      jnp.asarray(ids, jnp.int32)))
  assert theirs.shape == ours.shape == (2, 19, cfg.vocab_size)
  err = tolerances.max_rel_err(ours, theirs)
  assert err < tolerances.HF_LOGITS_REL, err


# --------------------------------------------------------------------- MQAR
def _lookup(inputs_row, num_pairs):
  """{key: value} of a row's context, asserting distinct keys."""
  table = {}
  for i in range(num_pairs):
    key, value = int(inputs_row[2 * i]), int(inputs_row[2 * i + 1])
    assert key not in table, f"key {key} repeated in the context"
    table[key] = value
  return table


@pytest.mark.parametrize("kw", [
    dict(seq_len=64, num_pairs=8, key_vocab=10, value_vocab=5),
    dict(seq_len=40, num_pairs=6, num_queries=3, key_vocab=50,
         value_vocab=50),
    dict(seq_len=23, num_pairs=6, key_vocab=6, value_vocab=3),  # tight
])
def test_mqar_targets_are_the_values_of_the_queried_keys(kw):
  task = data.MQARConfig(**kw)
  seed, step = int(np.random.default_rng(kw["seq_len"]).integers(1000)), 7
  batch = data.mqar_batch(task, 16, seed=seed, step=step)
  inputs, targets = batch["inputs"], batch["targets"]
  mask = batch["loss_mask"]
  p, q = task.num_pairs, task.queries
  assert inputs.shape == targets.shape == mask.shape == (16, task.seq_len)
  assert inputs.dtype == targets.dtype == np.int32
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  assert set(np.unique(mask)) <= {0.0, 1.0}
  keys = range(1, 1 + task.key_vocab)
  values = range(1 + task.key_vocab, task.vocab_size)
  for r in range(16):
    table = _lookup(inputs[r], p)
    assert all(k in keys for k in table) and all(
        v in values for v in table.values())
    queries = np.nonzero(mask[r])[0]
    assert len(queries) == q
    assert queries.min() >= 2 * p  # queries follow the context
    asked = set()
    for pos in queries:
      key = int(inputs[r, pos])
      assert key in table, (r, pos, key)
      assert int(targets[r, pos]) == table[key], (r, pos)
      assert data.mqar_answer_from_context(inputs[r], pos, task) == table[key]
      asked.add(key)
    assert len(asked) == q  # distinct queried keys
    # Outside the context and the query pairs there is only padding.
    rest = np.ones(task.seq_len, bool)
    rest[:2 * p] = False
    rest[queries] = False
    rest[np.minimum(queries + 1, task.seq_len - 1)] = False
    assert np.all(inputs[r][rest] == data.PAD)

  again = data.mqar_batch(task, 16, seed=seed, step=step)
  for name in batch:
    np.testing.assert_array_equal(batch[name], again[name])
  for other in (data.mqar_batch(task, 16, seed=seed, step=step + 1),
                data.mqar_batch(task, 16, seed=seed + 1, step=step)):
    assert not np.array_equal(other["inputs"], inputs)


@pytest.mark.parametrize("kw,field", [
    (dict(num_pairs=0), "num_pairs"),
    (dict(num_pairs=8, key_vocab=7), "key_vocab"),
    (dict(value_vocab=0), "value_vocab"),
    (dict(num_pairs=4, num_queries=5), "num_queries"),
    (dict(num_pairs=4, num_queries=0), "num_queries"),
    (dict(seq_len=14, num_pairs=4), "seq_len"),
])
def test_bad_mqar_config_raises(kw, field):
  with pytest.raises(ValueError, match=field):
    data.MQARConfig(**kw)


def test_mqar_answer_from_context_rejects_a_repeated_key():
  task = data.MQARConfig(seq_len=9, num_pairs=2, key_vocab=4, value_vocab=4)
  row = np.array([1, 6, 1, 7, 0, 0, 1, 0, 0])
  assert data.mqar_answer_from_context(row, 6, task) is None


# ------------------------------------------------------------------ packing
def _random_docs(rng, n):
  lengths = rng.integers(0, 30, n)
  lengths[rng.integers(n)] = 0  # an empty document is skipped
  return [rng.integers(1, 256, size=k).astype(np.uint8) for k in lengths]


def _parts(rng, batch_size, processes):
  """Consecutive row slices of [0, batch_size), one per process (random
  cut points)."""
  cuts = np.sort(rng.choice(np.arange(1, batch_size), processes - 1,
                            replace=False))
  bounds = [0, *cuts.tolist(), batch_size]
  return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("processes", [2, 3, 8])
def test_batches_built_in_parts_equal_the_one_process_batch(processes):
  # Each simulated process builds only its rows; put together they must be
  # the batch one process builds whole (MQAR, text, and the held-out text
  # batches), at a fresh seed and step.
  rng = np.random.default_rng()
  seed, step, bs = int(rng.integers(1000)), int(rng.integers(100)), 8
  task = data.MQARConfig(seq_len=24, num_pairs=4, key_vocab=12,
                         value_vocab=9)
  text = data.TextData(seq_len=11, docs=_random_docs(rng, 30))
  builders = [
      lambda rows: data.mqar_batch(task, bs, seed, step, rows),
      lambda rows: text.batch(bs, seed, step, rows),
      lambda rows: text.eval_batches(bs, rows=rows)[-1],
  ]
  for build in builders:
    whole = build(None)
    parts = [build(rows) for rows in _parts(rng, bs, processes)]
    assert set(whole) == set(parts[0])
    for name in whole:
      np.testing.assert_array_equal(
          np.concatenate([p[name] for p in parts]), whole[name])
  # A row depends on its own number, not on the other rows built with it.
  r = int(rng.integers(bs))
  alone = data.mqar_batch(task, bs, seed, step, slice(r, r + 1))
  other = data.mqar_batch(task, bs, seed, step + 1, slice(r, r + 1))
  np.testing.assert_array_equal(alone["inputs"][0],
                                builders[0](None)["inputs"][r])
  assert not np.array_equal(alone["inputs"], other["inputs"])
  # As a training batch function.
  fn = data.RowBatches(
      lambda s, rows: data.mqar_batch(task, bs, seed, s, rows), bs)
  for name, value in fn(step).items():
    np.testing.assert_array_equal(value, builders[0](None)[name])
    np.testing.assert_array_equal(fn.rows(step, slice(r, r + 1))[name][0],
                                  value[r])


@pytest.mark.parametrize("rows", [slice(0, 9), slice(3, 3), slice(-1, 8),
                                  slice(0, 8, 2), (0, 4)])
def test_rows_outside_the_batch_are_refused(rows):
  task = data.MQARConfig(seq_len=24, num_pairs=4)
  text = data.TextData(seq_len=11, docs=[np.arange(1, 200, dtype=np.uint8)])
  for build in (lambda: data.mqar_batch(task, 8, rows=rows),
                lambda: text.batch(8, rows=rows),
                lambda: text.eval_batches(8, rows=rows)):
    with pytest.raises(ValueError, match=r"^rows: expected a slice of "
                       r"consecutive rows within \[0, batch_size=8\)"):
      build()


def test_packing_never_crosses_a_document_boundary():
  rng = np.random.default_rng(505)
  docs = _random_docs(rng, 14)
  row_len = 9
  tokens, seg = data.pack_documents(docs, row_len)
  # Independent record of which document each packed position holds.
  owner = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
  stream = np.concatenate(docs)
  rows = -(-len(stream) // row_len)
  assert tokens.shape == seg.shape == (rows, row_len)
  flat_owner = np.full(rows * row_len, -1)
  flat_owner[:len(owner)] = owner
  np.testing.assert_array_equal(tokens.reshape(-1)[:len(stream)], stream)
  assert np.all(tokens.reshape(-1)[len(stream):] == data.PAD)
  flat_owner = flat_owner.reshape(rows, row_len)
  for r in range(rows):
    expect, current, last = [], 0, None
    for c in range(row_len):
      o = flat_owner[r, c]
      if o < 0:
        expect.append(0)
        continue
      if o != last:
        current, last = current + 1, o
      expect.append(current)
    np.testing.assert_array_equal(seg[r], expect, err_msg=f"row {r}")

  batch = data.lm_batch_from_rows(tokens, seg)
  t = row_len - 1
  for name in ("inputs", "targets", "loss_mask", "segment_ids"):
    assert batch[name].shape == (rows, t)
  np.testing.assert_array_equal(batch["inputs"], tokens[:, :-1])
  np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
  same_doc = ((flat_owner[:, :-1] == flat_owner[:, 1:])
              & (flat_owner[:, :-1] >= 0))
  np.testing.assert_array_equal(batch["loss_mask"], same_doc.astype(
      np.float32))
  ids = batch["segment_ids"]
  for r in range(rows):
    for i in range(t):
      for j in range(t):
        same = flat_owner[r, i] == flat_owner[r, j]
        assert (ids[r, i] == ids[r, j]) == same, (r, i, j)
  # Every adjacent same-document pair is trained on, except those split by
  # a row boundary.
  cut = sum(owner[pos - 1] == owner[pos]
            for pos in range(row_len, len(owner), row_len))
  assert batch["loss_mask"].sum() == sum(
      max(0, len(d) - 1) for d in docs) - cut


def test_text_batches_are_deterministic():
  rng = np.random.default_rng(606)
  docs = _random_docs(rng, 20)
  text = data.TextData(seq_len=11, docs=docs)
  n, bs = text.num_rows, 3
  a = text.batch(bs, seed=5, step=2)
  b = text.batch(bs, seed=5, step=2)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(text.batch(bs, seed=5, step=3)["inputs"],
                            a["inputs"])
  assert not np.array_equal(text.batch(bs, seed=6, step=2)["inputs"],
                            a["inputs"])
  # One epoch visits every row once.
  per_epoch = np.concatenate([text.batch(1, seed=5, step=s)["inputs"]
                              for s in range(n)])
  assert sorted(map(tuple, per_epoch)) == sorted(
      map(tuple, text.tokens[:, :-1]))
  # Eval batches cover all rows in order (the last one padded, no loss).
  ev = text.eval_batches(4)
  got = np.concatenate([e["inputs"] for e in ev])
  np.testing.assert_array_equal(got[:n], text.tokens[:, :-1])
  assert np.all(got[n:] == data.PAD)
  one_epoch = text.batch(n, seed=0, step=0)
  assert sum(e["loss_mask"].sum() for e in ev) == one_epoch["loss_mask"].sum()

  corpus = data.TextData(seq_len=32, max_bytes=4000)
  again = data.TextData(seq_len=32, max_bytes=4000)
  np.testing.assert_array_equal(corpus.tokens, again.tokens)
  held_out = data.TextData(seq_len=32, split="eval", max_bytes=4000)
  assert not np.array_equal(held_out.tokens[:4], corpus.tokens[:4])
  with pytest.raises(ValueError, match="split"):
    data.text_documents("validation")


# ------------------------------------------------------------------- script
def test_train_script_writes_metrics_checkpoints_and_eval(reference_run,
                                                          tmp_path):
  config = mqar_config.get_config("runlocal")
  _, tcfg, _, ref, ref_dir = reference_run
  workdir = str(tmp_path / "run")
  hf_dir = str(tmp_path / "hf")
  summary = train_script.run(config, workdir, export_hf=hf_dir,
                             progress=False)
  assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors"]
  rows = _csv_rows(os.path.join(workdir, "metrics.csv"))
  # Numbered as the progress bar and the checkpoints: updates done.
  assert [int(r["step"]) for r in rows] == list(
      range(tcfg.log_every, tcfg.num_steps + 1, tcfg.log_every))
  # Same config, same data: the losses of the library run above.
  ref_rows = _csv_rows(os.path.join(ref_dir, "metrics.csv"))
  assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
  steps = sorted(int(s) for s in os.listdir(
      os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps == [4, 8, 12]
  with open(os.path.join(workdir, train_script.EVAL_FILE)) as f:
    written = json.load(f)
  assert written["step"] == tcfg.num_steps
  ev = written["eval"]
  assert 0.0 <= ev["accuracy"] <= 1.0 and np.isfinite(ev["loss"])
  queries = written["data"]["queries"]
  assert ev["tokens"] == config.eval.batch_size * config.eval.num_batches * (
      queries)
  assert written["train"]["final_loss"] == ref.losses[tcfg.num_steps - 1]
  assert summary["eval"] == ev and written["export_hf"] == hf_dir
  with open(os.path.join(workdir, train_script.CONFIG_FILE)) as f:
    assert json.load(f)["train"]["num_steps"] == tcfg.num_steps
  text = train_script.format_summary(summary)
  assert "MQAR accuracy" in text and "Gated DeltaNet" in text

  # A second call resumes from the final checkpoint and trains no more.
  again = train_script.run(config, workdir, progress=False)
  assert again["train"]["resumed_from"] == tcfg.num_steps
  assert again["eval"] == ev


def test_train_script_flags_parse_config_overrides(tmp_path):
  argv = ["train",
          f"--config={os.path.join(CONFIG_DIR, 'mqar.py')}:runlocal,"
          "ratio=3:1,layers=4",
          f"--workdir={tmp_path}", "--config.train.num_steps=3",
          "--config.model.hidden_size=48", "--config.data.num_pairs=5",
          f"--export_hf={tmp_path / 'hf'}"]
  fv = flags.FlagValues()
  holders = train_script.define_flags(fv, argv + [
      "--allow_changes=train.learning_rate,data"])
  fv(argv + ["--allow_changes=train.learning_rate,data"])
  config, workdir, export, allow = (h.value for h in holders)
  assert workdir == str(tmp_path) and export == str(tmp_path / "hf")
  assert allow == ["train.learning_rate", "data"]
  cfg, tcfg, task = train_script.build(config)
  assert tcfg.num_steps == 3 and cfg.hidden_size == 48
  assert cfg.layer_types == (LINEAR, LINEAR, LINEAR, FULL)
  assert task.info["task"]["num_pairs"] == 5
  assert cfg.vocab_size == task.vocab_size


def test_train_script_names_a_bad_config_without_a_traceback(tmp_path):
  """The command line: a bad config is one line naming the field (exit 1),
  before the workdir is written."""
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train",
       f"--config={os.path.join(CONFIG_DIR, 'mqar.py')}",
       f"--workdir={workdir}", "--config.train.num_steps=0"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 1, out.stderr[-2000:]
  assert ("experiments.train: error: config.train.num_steps: expected an "
          "int >= 1, found 0") in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not workdir.exists()


def _with(config, path, value):
  config = config.copy_and_resolve_references()
  node = config
  for k in path[:-1]:
    node = node[k]
  with config.ignore_type():
    node[path[-1]] = value
  return config


@pytest.mark.parametrize("path,value,field", [
    (("model", "preset"), "qwen9.9-1b", "preset"),
    (("model", "vocab_size"), 8, "vocab_size"),
    (("model", "ratio"), "2:1", "num_layers"),
    (("model", "remat_policy"), "some", "remat_policy"),
    (("train", "bogus_rate"), 1.0, "bogus_rate"),
    (("train", "num_steps"), 0, "num_steps"),
    (("data", "kind"), "images", "config.data.kind"),
    (("data", "num_pairs"), 15, "seq_len"),
    # Checked by TrainConfig, named as config fields.
    (("train", "log_every"), 0, "config.train.log_every"),
    (("train", "grad_clip"), -1.0, "config.train.grad_clip"),
    (("train", "b1"), 2.0, "config.train.b1"),
    (("train", "weight_decay"), -1.0, "config.train.weight_decay"),
    (("train", "min_lr_ratio"), 5.0, "config.train.min_lr_ratio"),
    (("train", "keep_checkpoints"), 0, "config.train.keep_checkpoints"),
    (("train", "learning_rate"), float("inf"), "config.train.learning_rate"),
    # Evaluation and data settings: refused before training, not after.
    (("eval", "batch_size"), 0, "config.eval.batch_size"),
    (("eval", "num_batches"), 0, "config.eval.num_batches"),
    (("eval", "num_batches"), -1, "config.eval.num_batches"),
    (("eval", "seed"), -1, "config.eval.seed"),
    (("data", "seed"), -1, "config.data.seed"),
    (("data", "max_bytes"), 0, "config.data.max_bytes"),
    (("eval", "max_bytes"), -5, "config.eval.max_bytes"),
])
def test_train_script_rejects_bad_config_values(path, value, field,
                                                tmp_path):
  config = _with(mqar_config.get_config("runlocal"), path, value)
  workdir = str(tmp_path / "never")
  with pytest.raises(ValueError, match=field):
    train_script.run(config, workdir, progress=False)
  assert not os.path.exists(workdir)  # nothing written


@pytest.mark.parametrize("module", [mqar_config, text_config, qwen08b_config])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_config_builds(module, arg):
  config = module.get_config(arg)
  cfg, tcfg, task = train_script.build(config)
  assert tcfg.num_steps >= 1 and task.vocab_size <= cfg.vocab_size
  assert task.batch_fn(0)["inputs"].shape == (tcfg.batch_size, tcfg.seq_len)
  if module is qwen08b_config and arg is None:
    preset = QwenConfig.from_preset("qwen3.5-0.8b", vision=None)
    assert cfg == preset.replace(remat_policy="full")
    assert (tcfg.batch_size, tcfg.seq_len) == (1, 8192)
  with pytest.raises(ValueError, match="nonsense"):
    module.get_config("nonsense")


def test_parse_arg_types():
  arg = configs.parse_arg("runlocal,layers=8,ratio=1:1,lr=0.5",
                          runlocal=False, layers=0, ratio=None, lr=1.0)
  assert arg.runlocal is True and arg.layers == 8
  assert arg.ratio == "1:1" and arg.lr == 0.5
  with pytest.raises(ValueError, match="layers"):
    configs.parse_arg("layers=eight", layers=0)


# ---------------------------------------------------------------- bad input
def _bad_batches(batch, vocab):
  """(name, bad batch, message) from a good [b, t] batch."""
  b, t = batch["inputs"].shape
  shape = (b, t)

  def change(**kw):
    out = dict(batch)
    out.update(kw)
    return out

  ids = batch["targets"]
  return [
      ("targets_short", change(targets=ids[:, :-1]),
       f"expected targets of the inputs' shape {shape}, found "
       f"{(b, t - 1)}"),
      ("loss_mask_1d", change(loss_mask=batch["loss_mask"][0]),
       f"expected loss_mask of the inputs' shape {shape}, found {(t,)}"),
      ("segment_ids_short", change(segment_ids=batch["segment_ids"][:, 1:]),
       f"expected segment_ids of the inputs' shape {shape}"),
      ("zero_rows", {k: v[:0] for k, v in batch.items()},
       f"expected at least one row and one token (inputs [b, t] with b, "
       f"t >= 1), found shape {(0, t)}"),
      ("inputs_1d", change(inputs=batch["inputs"][0]),
       "expected inputs of shape [b, t]"),
      ("float_targets", change(targets=ids.astype(np.float32)),
       "expected integer token ids in targets, found dtype float32"),
      ("targets_past_vocab", change(targets=np.full_like(ids, 999)),
       f"expected targets ids in [0, {vocab}) (the model's vocab_size), "
       f"found ids from 999 to 999"),
      ("negative_targets", change(targets=np.where(ids > 0, ids, -1)),
       f"expected targets ids in [0, {vocab})"),
      ("inputs_past_vocab", change(inputs=batch["inputs"] + vocab),
       f"expected inputs ids in [0, {vocab})"),
  ]


_BAD_BATCH_NAMES = ("targets_short", "loss_mask_1d", "segment_ids_short",
                    "zero_rows", "inputs_1d", "float_targets",
                    "targets_past_vocab", "negative_targets",
                    "inputs_past_vocab")


@pytest.mark.parametrize("name", _BAD_BATCH_NAMES)
def test_a_bad_batch_is_refused_by_name(name):
  _, cfg, tcfg, task = _local()
  good = task.batch_fn(0)
  data.check_batch(good, cfg.vocab_size)
  (batch, message), = [(b, m) for n, b, m in
                       _bad_batches(good, cfg.vocab_size) if n == name]
  with pytest.raises(ValueError, match=re.escape(message)):
    data.check_batch(batch, cfg.vocab_size)
  params = train_step.init_params(cfg, seed=0)
  # Before the compiled programs: evaluation, training, an eager loss.
  with pytest.raises(ValueError, match=re.escape(message)):
    train.evaluate(cfg, params, [batch])
  with pytest.raises(ValueError, match=re.escape(message)):
    train.train(cfg, tcfg, lambda step: batch, progress=False)
  with pytest.raises(ValueError, match=re.escape(message)):
    train_step.loss_and_stats(params, cfg, batch)
  # Traced (inside jit): keys, shapes and dtypes are static and checked;
  # ids are values, which are never read there (no host sync).
  trace = lambda: jax.eval_shape(  # pylint: disable=g-long-lambda
      lambda p, b: train_step.loss_and_stats(p, cfg, b)[0], params, batch)
  if "vocab" in name or "negative" in name:
    trace()
  else:
    with pytest.raises(ValueError, match=re.escape(message)):
      trace()


def test_a_later_bad_batch_stops_training_before_its_step():
  _, cfg, tcfg, task = _local()
  seen = []

  def batch_fn(step):
    batch = task.batch_fn(step)
    if step == 2:
      batch = dict(batch, targets=np.full_like(batch["targets"], 999))
    return batch

  with pytest.raises(ValueError, match=re.escape(
      f"expected targets ids in [0, {cfg.vocab_size})")):
    train.train(cfg, tcfg, batch_fn, progress=False,
                callback=lambda s, m: seen.append(s))
  assert seen == [0, 1]  # steps 0 and 1 ran (logged at step 1), not 2


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 4, "batch_fn(0): expected inputs of shape (TrainConfig."
     "batch_size, TrainConfig.seq_len) = (4, 32), found (8, 32)"),
    ("seq_len", 16, "= (8, 16), found (8, 32)"),
])
def test_train_refuses_a_batch_of_another_shape(field, value, message):
  _, cfg, tcfg, task = _local()
  with pytest.raises(ValueError, match=re.escape(message)):
    train.train(cfg, tcfg.replace(**{field: value}), task.batch_fn,
                progress=False)


def test_evaluate_needs_a_batch():
  _, cfg, _, _ = _local()
  with pytest.raises(ValueError, match="batches: expected at least one"):
    train.evaluate(cfg, train_step.init_params(cfg, 0), [])


@pytest.mark.parametrize("kw, message", [
    (dict(log_every=0), "TrainConfig.log_every: expected an int >= 1, "
     "found 0"),
    (dict(num_steps=0), "TrainConfig.num_steps: expected an int >= 1"),
    (dict(num_steps=-2), "TrainConfig.num_steps: expected an int >= 1"),
    (dict(num_steps=2.5), "TrainConfig.num_steps: expected an int, found "
     "2.5"),
    (dict(batch_size=0), "TrainConfig.batch_size: expected an int >= 1"),
    (dict(seq_len=0), "TrainConfig.seq_len: expected an int >= 1"),
    (dict(learning_rate=-1.0), "TrainConfig.learning_rate: expected a "
     "finite number >= 0, found -1.0"),
    (dict(learning_rate=float("nan")), "TrainConfig.learning_rate: "
     "expected a number"),
    (dict(b1=1.0), "TrainConfig.b1: expected a number in [0, 1)"),
    (dict(b2=1.5), "TrainConfig.b2: expected a number in [0, 1), found 1.5"),
    (dict(b2=-0.1), "TrainConfig.b2: expected a number in [0, 1)"),
    (dict(grad_clip=-1.0), "TrainConfig.grad_clip: expected a number > 0, "
     "or 0 or None (off), found -1.0"),
    (dict(min_lr_ratio=-1.0), "TrainConfig.min_lr_ratio: expected a number "
     "in [0, 1]"),
    (dict(warmup_steps=-5), "TrainConfig.warmup_steps: expected an int >= "
     "0, found -5"),
    (dict(weight_decay=-0.1), "TrainConfig.weight_decay"),
    (dict(keep_checkpoints=0), "TrainConfig.keep_checkpoints"),
    (dict(compute_dtype="fp16"), "TrainConfig.compute_dtype: expected one "
     "of ('auto', 'float32', 'bfloat16', 'float16', 'float64'), found "
     "'fp16'"),
    (dict(save_checkpoints="no"), "TrainConfig.save_checkpoints: expected "
     "a bool"),
])
def test_train_config_rejects_bad_fields(kw, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    train_step.TrainConfig(**kw)


def test_train_config_grad_clip_off():
  _, cfg, tcfg, _ = _local()
  params = train_step.init_params(cfg, 0)
  states = [train_step.make_optimizer(tcfg.replace(grad_clip=v)).init(params)
            for v in (None, 0.0, 1.0)]
  structure = [jax.tree_util.tree_structure(s) for s in states]
  assert structure[0] == structure[1] != structure[2]
  # Edge values that are valid.
  train_step.TrainConfig(learning_rate=0.0, b1=0.0, min_lr_ratio=1.0,
                    grad_clip=None, num_steps=1, log_every=1)


def _metrics_csv(workdir):
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return f.read()


def test_resume_with_clipping_switched_is_refused(reference_run):
  cfg, tcfg, task, ref, workdir = reference_run
  before = _metrics_csv(workdir)
  with pytest.raises(ValueError, match=re.escape(
      "was written with grad_clip=1.0 (clipping on), this run has "
      "grad_clip=0.0 (clipping off): the optimizer states differ")):
    train.train(cfg, tcfg.replace(grad_clip=0.0), task.batch_fn, workdir,
                progress=False)
  with pytest.raises(ValueError, match="grad_clip=None"):
    train_checkpoint.check_resume(workdir, cfg, tcfg.replace(grad_clip=None))
  assert _metrics_csv(workdir) == before  # refused before writing
  # Another clip value keeps the state's structure: the resume works.
  ckpt = train_checkpoint.Checkpointer(workdir, cfg,
                                      tcfg.replace(grad_clip=0.5))
  try:
    state = ckpt.restore(ref.state)
  finally:
    ckpt.close()
  assert int(state.step) == tcfg.num_steps
  chex.assert_trees_all_equal(state.opt_state, ref.state.opt_state)


def test_resume_past_num_steps_is_refused(reference_run, tmp_path):
  cfg, tcfg, task, _, workdir = reference_run
  before = _metrics_csv(workdir)
  message = (f"TrainConfig.num_steps: expected >= {tcfg.num_steps}, the "
             f"step of the newest checkpoint in "
             f"{os.path.join(workdir, 'checkpoints')}, found 8")
  with pytest.raises(ValueError, match=re.escape(message)):
    train.train(cfg, tcfg.replace(num_steps=8), task.batch_fn, workdir,
                progress=False)
  with pytest.raises(ValueError, match=re.escape(message)):
    train_checkpoint.check_resume(workdir, cfg, tcfg.replace(num_steps=8))
  assert _metrics_csv(workdir) == before
  # At the checkpoint's step or past it: resumes (nothing written here).
  assert train_checkpoint.check_resume(workdir, cfg, tcfg) == tcfg.num_steps
  assert train_checkpoint.check_resume(
      workdir, cfg, tcfg.replace(num_steps=20),
      allow_changes=["train.num_steps"]) == tcfg.num_steps
  assert train_checkpoint.check_resume(str(tmp_path), cfg, tcfg) is None
  assert not os.listdir(tmp_path)


def test_refused_resume_keeps_run_config(reference_run, tmp_path):
  _, _, _, _, ref_dir = reference_run
  config = mqar_config.get_config("runlocal")
  workdir = str(tmp_path / "run")
  shutil.copytree(os.path.join(ref_dir, "checkpoints"),
                  os.path.join(workdir, "checkpoints"))
  path = os.path.join(workdir, train_script.CONFIG_FILE)
  written = config.to_json_best_effort(indent=2, sort_keys=True)
  with open(path, "w") as f:
    f.write(written)
  for where, value, field in ((("model", "hidden_size"), 64, "hidden_size"),
                              (("train", "grad_clip"), 0.0, "grad_clip"),
                              (("train", "num_steps"), 4, "num_steps"),
                              (("train", "learning_rate"), 0.5,
                               "train.learning_rate 0.01 -> 0.5")):
    with pytest.raises(ValueError, match=field):
      train_script.run(_with(config, where, value), workdir, progress=False)
    with open(path) as f:
      assert f.read() == written, where
  assert sorted(os.listdir(workdir)) == ["checkpoints",
                                         train_script.CONFIG_FILE]


def test_data_generators_name_bad_arguments():
  task = data.MQARConfig(seq_len=32, num_pairs=4, key_vocab=16,
                         value_vocab=16)
  text = data.TextData(16, docs=[np.arange(200) % 256])
  cases = [
      (lambda: data.mqar_batch(task, 0), "batch_size: expected an int >= "
       "1, found 0"),
      (lambda: data.mqar_batch(task, 2.5), "batch_size: expected an int"),
      (lambda: data.mqar_batch(task, 2, seed=-1), "seed: expected an int "
       ">= 0, found -1"),
      (lambda: data.mqar_batch(task, 2, step=-1), "step: expected an int "
       ">= 0, found -1"),
      (lambda: text.batch(0), "batch_size: expected an int >= 1, found 0"),
      (lambda: text.batch(2, step=-1), "step: expected an int >= 0"),
      (lambda: text.eval_batches(0), "batch_size: expected an int >= 1"),
      (lambda: text.eval_batches(2, max_batches=0), "max_batches: expected "
       "an int >= 1, found 0"),
      (lambda: data.TextData(0, docs=[np.arange(10)]), "seq_len: expected "
       "an int >= 1, found 0"),
      (lambda: data.text_documents("train", max_bytes=0), "max_bytes: "
       "expected an int >= 1, found 0"),
  ]
  for fn, message in cases:
    with pytest.raises(ValueError, match=re.escape(message)):
      fn()
  assert len(text.eval_batches(2, max_batches=1)) == 1
  assert len(data.text_documents("eval", max_bytes=100)) == 1
