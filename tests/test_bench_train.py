"""experiments/bench_train.py and the FLOP count its MFU divides by.

  * `train_step.flops_per_token` against the matrix products of the model's
    own forward program (every `dot_general` of its jaxpr, inside scans
    and loops times their trip counts), x 3 for forward + backward: exact
    for full attention (the program computes the masked upper half of
    each block's scores, the count leaves it out, as causal FLOPs are
    counted) and for the projections, MLP and head; within
    `tolerances.FLOPS_MODEL_REL` for the gated delta rule's chunked form;
  * `--small --hf` on a CPU: ours and transformers' rows, finite losses
    near log(vocab) (random weights), a ratio, the JSON.
"""

import json
import math
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import train_step
from qwen_jax.config import QwenConfig
from qwen_jax.config import layer_types_from_ratio
from qwen_jax.model import Qwen35
from tests import tolerances

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sub_jaxprs(eqn):
  """(jaxpr, times it runs) of each sub-program of an equation."""
  times = 1
  if eqn.primitive.name == "scan":
    times = eqn.params["length"]
  elif eqn.primitive.name == "while":
    raise AssertionError("a while loop: its trip count is unknown here")
  for p in eqn.params.values():
    for x in (p if isinstance(p, (tuple, list)) else (p,)):
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr, times
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x, times


def dot_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general in a jaxpr."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      a = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(a[i] for i in contract)
    for sub, times in _sub_jaxprs(eqn):
      total += times * dot_flops(sub)
  return total


def _program_flops_per_token(cfg, t):
  model = Qwen35(cfg)
  params = jax.eval_shape(lambda: flax.linen.meta.unbox(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"])
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  jaxpr = jax.make_jaxpr(
      lambda p, i: model.apply({"params": p}, i))(params, ids)
  return dot_flops(jaxpr.jaxpr) / t


def _cfg(pattern, vocab):
  # Unscanned, the chunked rule (a scan over chunks; the CPU's triangular
  # solve is a library call, not a loop of products).
  return QwenConfig.from_preset(
      "tiny", layer_types=layer_types_from_ratio(pattern, 4),
      gdr_implementation="chunked", scan_layers=False, vocab_size=vocab)


@pytest.mark.parametrize("t", [64, 200])
def test_flops_full_attention_exact(t):
  vocab = int(np.random.default_rng().integers(300, 3000))
  cfg = _cfg("all-full", vocab)
  program = _program_flops_per_token(cfg, t)
  # The program computes every score of a block (t <= QUERY_BLOCK); the
  # count, causal, half of them: q k^T and p v, 2 FLOPs a multiply-add.
  masked = 2 * 2 * cfg.num_attention_heads * cfg.head_dim * (t / 2)
  want = program - masked * cfg.num_hidden_layers
  got = train_step.flops_per_token(cfg, t) / 3
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("t", [64, 256])
def test_flops_linear_layers_within_model(t):
  vocab = int(np.random.default_rng().integers(300, 3000))
  cfg = _cfg("all-linear", vocab)
  program = _program_flops_per_token(cfg, t)
  got = train_step.flops_per_token(cfg, t, cfg.gdr_chunk_size) / 3
  assert abs(got - program) / program < tolerances.FLOPS_MODEL_REL, (
      got, program)


def test_small_hf_smoke(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train", "--small", "--hf",
       f"--json_out={out}"], cwd=_ROOT, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  rows = {r["impl"]: r for r in report["rows"]}
  assert set(rows) == {"qwen_jax", "transformers"}, rows
  vocab = QwenConfig.from_preset("tiny").vocab_size
  for r in rows.values():
    assert r["workload"] == "train 1 x 64", r
    assert r["tokens_per_s"] > 0, r
    # Random weights: the loss is near log(vocab).
    assert abs(r["loss"] - math.log(vocab)) < 1.0, r
  ours = rows["qwen_jax"]
  assert ours["ratio"] == pytest.approx(
      ours["tokens_per_s"] / rows["transformers"]["tokens_per_s"])
  assert ours["flops_per_token"] == train_step.flops_per_token(
      QwenConfig.from_preset("tiny", vision=None, param_dtype="float32",
                             remat_policy="full"), 64)
  assert "| train 1 x 64 | qwen_jax |" in proc.stdout, proc.stdout
