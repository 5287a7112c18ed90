"""The attention-ratio study (experiments/compare_ratios.py) end to end.

One tiny run over all five ratios (a few steps each: the numbers mean
nothing, the plumbing is what is checked), its outputs, a rerun that resumes
from the checkpoints, and the data mixing on its own.
"""

import csv
import dataclasses
import json
import os

from absl import flags
import numpy as np
import pytest

from experiments import compare_ratios as cr
from qwen_jax import cache as cache_lib
from qwen_jax import data
from qwen_jax.config import FULL, LINEAR

TINY = cr.PRESETS["smoke"].replace(steps=3, memory_lengths=(256,),
                                   eval_lengths=(64, 128))


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ratios"))
  record = cr.run_study(TINY, workdir)
  return workdir, record


def test_every_ratio_is_reported(study_run):
  workdir, record = study_run
  rows = record["results"]
  assert [r["ratio"] for r in rows] == list(cr.DEFAULT_RATIOS)
  for r in rows:
    cfg = cr.model_config(TINY, r["ratio"])
    # Parameter count from the trained tree vs the count from the shapes.
    assert r["params"] == cfg.num_params()
    assert r["linear_layers"] == cfg.layer_types.count(LINEAR)
    assert r["full_layers"] == cfg.layer_types.count(FULL)
    assert r["linear_layers"] + r["full_layers"] == TINY.num_layers
    assert set(r["recall"]) == {"64", "128"}
    for acc in r["recall"].values():
      assert 0.0 <= acc <= 1.0
    assert np.isfinite(r["text_loss"]) and r["text_loss"] > 0
    assert r["tokens_per_s"] > 0
    assert len(r["loss_curve"]) >= 1
    (mem,) = r["memory"]
    assert mem["context"] == 256
    assert mem["cache_bytes"] == cache_lib.cache_bytes(cfg, 1, 256, "bfloat16")
    assert mem["temp_bytes"] > 0
  by = {r["ratio"]: r for r in rows}
  # KV memory follows the number of full-attention layers; all-linear has
  # none, and its cache does not depend on the context length.
  kv = {k: r["memory"][0]["kv_bytes"] for k, r in by.items()}
  assert kv["all-linear"] == 0
  assert kv["all-full"] == 2 * kv["1:1"] == 4 * kv["3:1"] == 8 * kv["7:1"]
  # Width and depth are the same, so parameter counts differ only by the
  # mixer: within a few percent of each other.
  counts = [r["params"] for r in rows]
  assert max(counts) / min(counts) < 1.1


def test_outputs_are_written(study_run):
  workdir, record = study_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert [r["ratio"] for r in saved["results"]] == list(cr.DEFAULT_RATIOS)
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["ratio"] for r in rows] == list(cr.DEFAULT_RATIOS)
  for r, full in zip(rows, record["results"]):
    assert float(r["recall@128"]) == pytest.approx(full["recall"]["128"])
  with open(os.path.join(workdir, "results.md")) as f:
    md = f.read()
  for ratio in cr.DEFAULT_RATIOS:
    assert f"| {ratio} |" in md
  for name in ("recall_vs_length.png", "train_loss.png",
               "memory_vs_context.png", "summary.png"):
    path = os.path.join(workdir, name)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  for ratio in cr.DEFAULT_RATIOS:
    run = os.path.join(workdir, "runs", cr.ratio_label(ratio))
    assert os.path.exists(os.path.join(run, "metrics.csv"))


def test_rerun_resumes_from_checkpoints(study_run):
  workdir, record = study_run
  again = cr.run_study(TINY.replace(ratios=("3:1",)), workdir, plots=False)
  (row,) = again["results"]
  assert row["resumed_from"] == TINY.steps
  first = next(r for r in record["results"] if r["ratio"] == "3:1")
  # Same trained weights, same evaluation data: the same numbers.
  assert row["recall"] == first["recall"]
  assert row["text_loss"] == pytest.approx(first["text_loss"], rel=1e-6)


def test_mixed_batches():
  study = TINY.replace(batch_size=6)
  mixed = cr.MixedData(study)
  b = mixed(3)
  assert b["inputs"].shape == (6, study.seq_len)
  n = mixed.n_mqar
  assert n == round(6 * study.mqar_fraction) and 0 < n < 6
  recall, text = slice(0, n), slice(n, 6)
  # Separate token ranges: bytes for text, the MQAR tokens above them.
  assert b["inputs"][recall].min() >= data.BYTE_VOCAB
  assert b["inputs"][text].max() < data.BYTE_VOCAB
  assert b["inputs"].max() < study.vocab_size
  # Each task carries half of the loss weight.
  half = 0.5 * study.batch_size * study.seq_len
  np.testing.assert_allclose(b["loss_mask"][recall].sum(), half, rtol=1e-5)
  np.testing.assert_allclose(b["loss_mask"][text].sum(), half, rtol=1e-5)
  # The MQAR loss sits exactly on the query keys, whose targets are values.
  task = study.mqar()
  rows, cols = np.nonzero(b["loss_mask"][recall])
  tgt = b["targets"][recall][rows, cols] - data.BYTE_VOCAB
  assert np.all(tgt > task.key_vocab)
  # A pure function of the step.
  again = mixed(3)
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])
  assert not np.array_equal(mixed(4)["inputs"], b["inputs"])


def test_models_differ_only_in_the_pattern():
  cfgs = [cr.model_config(TINY, r) for r in cr.DEFAULT_RATIOS]
  base = dataclasses.asdict(cfgs[0])
  for cfg in cfgs[1:]:
    d = dataclasses.asdict(cfg)
    diff = {k for k in d if d[k] != base[k]}
    assert diff == {"layer_types"}


def test_flags_build_the_study():
  fv = flags.FlagValues()
  holders = cr.define_flags(fv)
  fv(["prog", "--workdir=/tmp/x", "--preset=smoke", "--ratios=3:1,all-full",
      "--steps=7", "--learning_rate=0.01", "--eval_lengths=64,256"])
  study = cr.study_from_flags(holders)
  assert study == cr.PRESETS["smoke"].replace(
      ratios=("3:1", "all-full"), steps=7, learning_rate=0.01,
      eval_lengths=(64, 256))


def test_bad_ratio_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="num_layers"):
    cr.run_study(TINY.replace(ratios=("3:1", "5:1")), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "runs"))


def test_forward_memory_gpu_branch_runs(monkeypatch):
  """The GPU-only branch (run the program, read the device's peak) on the
  CPU: the backend check and the device's memory stats are faked."""
  import jax  # pylint: disable=g-import-not-at-top

  class FakeDevice:

    def __init__(self, device):
      self._device = device

    def memory_stats(self):
      return {"peak_bytes_in_use": 12345}

    def __getattr__(self, name):
      return getattr(self._device, name)

  real = jax.devices()
  # The chunked rule and XLA attention run on the CPU whatever the backend
  # claims to be ("auto" would pick the GPU kernels).
  cfg = cr.model_config(TINY, "1:1").replace(gdr_implementation="chunked")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [FakeDevice(real[0])])
  out = cr.forward_memory(cfg, 64)
  assert out["measured_peak_bytes"] == 12345.0
  assert out["temp_bytes"] > 0 and out["argument_bytes"] > 0


def test_bad_eval_length_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="eval_lengths"):
    cr.run_study(TINY.replace(eval_lengths=(64, 0)), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "runs"))
