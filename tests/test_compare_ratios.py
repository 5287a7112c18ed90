"""The attention-ratio study (experiments/compare_ratios.py) and its report
(experiments/ratio_report.py).

One tiny run over three ratios and one placement (a few steps each: the
numbers mean nothing, the plumbing is what is checked), its outputs, reruns
that add a seed or change nothing, the chunked retrieval evaluation against
one full forward, the data, the Student-t intervals against SciPy, and the
paragraph of the report on synthetic results whose answer is known.
"""

import csv
import dataclasses
import json
import os
import shlex
import shutil

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import cli
from experiments import compare_ratios as cr
from experiments import ratio_report as rr
from qwen_jax import cache as cache_lib
from qwen_jax import data
from qwen_jax import train_step
from qwen_jax.config import FULL, LINEAR
from qwen_jax.model import Qwen35
from tests import tolerances

TINY = cr.PRESETS["smoke"].replace(
    num_layers=4, steps=2, ratios=("all-full", "3:1", "all-linear"),
    placements=("bottom",), memory_lengths=(256,), eval_lengths=(64, 128),
    retrieval_lengths=(64, 192), retrieval_chunk=64)
NAMES = ["all-full", "3:1", "all-linear", "3:1 bottom"]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ratios"))
  record = cr.run_study(TINY, workdir)
  return workdir, record


def _mtimes(folder):
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      path = os.path.join(root, f)
      out[os.path.relpath(path, folder)] = os.stat(path).st_mtime_ns
  return out


# ------------------------------------------------------------ the study run
def test_every_configuration_is_reported(study_run):
  _, record = study_run
  rows = record["configurations"]
  assert [r["config"] for r in rows] == NAMES
  assert [r["pattern"] for r in rows] == ["FFFF", "LLLF", "LLLL", "FLLL"]
  assert [r["placement"] for r in rows] == ["-", "periodic", "-", "bottom"]
  for r, conf in zip(rows, TINY.configurations()):
    cfg = cr.model_config(TINY, conf)
    # Parameter count from the trained tree vs the count from the shapes.
    assert r["params"] == cfg.num_params()
    assert r["linear_layers"] == cfg.layer_types.count(LINEAR)
    assert r["full_layers"] == cfg.layer_types.count(FULL)
    assert r["seeds"] == [0]
    m = r["metrics"]
    assert set(m) >= {"recall@64", "recall@128", "needle@64", "needle@192",
                      "mqar@64", "mqar@192", "text_bits_per_byte",
                      "tokens_per_s"}
    for name in ("recall@64", "recall@128", "needle@64", "needle@192",
                 "mqar@64", "mqar@192"):
      assert 0.0 <= m[name]["mean"] <= 1.0 and m[name]["n"] == 1
      assert np.isnan(m[name]["ci95"])  # one seed: no interval
    assert np.isfinite(m["text_bits_per_byte"]["mean"])
    assert m["tokens_per_s"]["mean"] > 0
    for n in (64, 192):
      assert r["retrieval_cache_bytes"][str(n)] == cache_lib.cache_bytes(
          cfg, 1, n, "bfloat16")
    (mem,) = r["memory"]
    assert mem["context"] == 256 and mem["temp_bytes"] > 0
  by = {r["config"]: r for r in rows}
  # KV memory follows the number of full-attention layers, wherever they
  # sit; all-linear keeps none, and its cache does not grow with length.
  kv = {k: r["memory"][0]["kv_bytes"] for k, r in by.items()}
  assert kv["all-linear"] == 0
  assert kv["all-full"] == 4 * kv["3:1"] == 4 * kv["3:1 bottom"]
  lin = by["all-linear"]["retrieval_cache_bytes"]
  assert lin["64"] == lin["192"]
  assert record["trained_runs"] == 4 and record["reused_runs"] == 0


def test_outputs_are_written(study_run):
  workdir, record = study_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert [r["config"] for r in saved["configurations"]] == NAMES
  assert len(saved["runs"]) == 4
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["config"] for r in rows] == NAMES
  for r, full in zip(rows, record["configurations"]):
    assert float(r["needle@192"]) == pytest.approx(
        full["metrics"]["needle@192"]["mean"])
  with open(os.path.join(workdir, "results.md")) as f:
    md = f.read()
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  for name in NAMES:
    assert f"| {name} |" in md and f"| {name} |" in report
  assert rr.findings(record) in report
  assert record["command"] in report
  assert "--preset=smoke" in record["command"]
  assert f"| jax | {jax.__version__} |" in report
  for name in rr.PLOTS:
    path = os.path.join(workdir, name)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert f"]({name})" in report
  for conf in TINY.configurations():
    run = cr.run_dir(workdir, conf, 0)
    for name in ("metrics.csv", "settings.json", "result.json"):
      assert os.path.exists(os.path.join(run, name)), (run, name)


def test_more_seeds_train_only_the_new_ones(study_run, monkeypatch):
  workdir, first = study_run
  one = TINY.replace(ratios=("3:1",), placements=())
  (conf,) = one.configurations()
  seed0 = cr.run_dir(workdir, conf, 0)
  before = _mtimes(seed0)
  again = cr.run_study(one.replace(seeds=2), workdir, plots=False)
  assert _mtimes(seed0) == before  # seed 0: nothing written, not even read
  assert again["trained_runs"] == 1 and again["reused_runs"] == 1
  new = [r for r in again["runs"] if r["seed_index"] == 1]
  assert len(new) == 1 and new[0]["seed"] == TINY.seed + 1
  assert os.path.exists(os.path.join(cr.run_dir(workdir, conf, 1),
                                     "checkpoints"))
  old = next(r for r in first["runs"] if r["config"] == "3:1")
  reused = next(r for r in again["runs"] if r["seed_index"] == 0)
  assert reused["metrics"] == old["metrics"]
  # Two seeds: a mean and a 95% interval of the two.
  (row,) = again["configurations"]
  vals = [old["metrics"]["text_loss"], new[0]["metrics"]["text_loss"]]
  assert row["metrics"]["text_loss"]["values"] == vals
  assert row["metrics"]["text_loss"]["mean"] == pytest.approx(np.mean(vals))

  # The same settings once more: nothing trains, no run file changes.
  def no_training(*args, **kwargs):
    raise AssertionError("trained a finished run")

  monkeypatch.setattr(cr.train_lib, "train", no_training)
  runs = os.path.join(workdir, "runs")
  before = _mtimes(runs)
  third = cr.run_study(one.replace(seeds=2), workdir, plots=False)
  assert third["trained_runs"] == 0 and third["reused_runs"] == 2
  assert _mtimes(runs) == before


def test_runs_of_other_settings_are_refused(study_run):
  workdir, _ = study_run
  runs = os.path.join(workdir, "runs")
  before = _mtimes(runs)
  with pytest.raises(cli.UserError, match=r"--workdir: .*seed-0 holds a run "
                     r"of other settings \(steps: 2 there, 3 now\)"):
    cr.run_study(TINY.replace(steps=3), workdir, plots=False)
  assert _mtimes(runs) == before


def test_other_eval_settings_evaluate_again_without_training(study_run):
  workdir, _ = study_run
  one = TINY.replace(ratios=("all-linear",), placements=(),
                     retrieval_lengths=(64,))
  (conf,) = one.configurations()
  metrics_csv = os.path.join(cr.run_dir(workdir, conf, 0), "metrics.csv")
  with open(metrics_csv) as f:
    log = f.read()
  record = cr.run_study(one, workdir, plots=False)
  (run,) = record["runs"]
  assert run["resumed_from"] == TINY.steps  # restored, not trained
  assert set(run["metrics"]) >= {"needle@64", "mqar@64"}
  assert "needle@192" not in run["metrics"]
  with open(metrics_csv) as f:
    assert f.read() == log


# ------------------------------------------------------ retrieval, chunked
def test_chunked_retrieval_equals_one_forward():
  """Chunked prefill through the cache (chunks of 64 over 200 tokens, 256
  slots) against one cache-free forward of the whole rows, on a model with
  both kinds of layer (LFLF)."""
  study = TINY.replace(ratios=("1:1",), placements=())
  cfg = cr.model_config(study, "1:1")
  params = train_step.init_params(cfg, 3)
  rng = np.random.default_rng(0)
  n = 200
  ids = rng.integers(0, cfg.vocab_size, (3, n)).astype(np.int32)
  mask = (rng.random((3, n)) < 0.2).astype(np.float32)
  mask[:, -1] = 1.0
  logits = Qwen35(cfg).apply({"params": params}, jnp.asarray(ids))
  pred = np.asarray(jnp.argmax(logits, -1))
  # Targets that the model predicts at half of the masked positions.
  tgt = np.where(rng.random((3, n)) < 0.5, pred, (pred + 1) % cfg.vocab_size)
  expected = float((pred == tgt)[mask > 0].mean())
  batch = {"inputs": ids, "targets": tgt.astype(np.int32), "loss_mask": mask}
  got = cr.retrieval_accuracy(cfg, params, batch, chunk=64, slots=256)
  assert got == pytest.approx(expected, abs=1e-12)
  assert 0.2 < expected < 0.8
  # Masked positions only in the first chunk: the later chunks are skipped.
  early = dict(batch, loss_mask=np.where(np.arange(n) < 64, mask, 0.0))
  first = float((pred == tgt)[early["loss_mask"] > 0].mean())
  assert cr.retrieval_accuracy(cfg, params, early, 64, 256) == pytest.approx(
      first, abs=1e-12)


# ------------------------------------------------------------------- data
def test_needle_rows():
  study = TINY
  b = cr.needle_batch(study, 96, 5, seed=1, step=2, split="eval")
  task = study.mqar()
  keys = data.BYTE_VOCAB + task.key_token(np.arange(task.key_vocab))
  values = data.BYTE_VOCAB + task.value_token(np.arange(task.value_vocab))
  corpus = cr._corpus("eval").astype(np.uint8).tobytes()
  for r in range(5):
    row = np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
    inserted = np.nonzero(row >= data.BYTE_VOCAB)[0]
    assert len(inserted) == 4 and inserted[-2] == 95 and inserted[-1] == 96
    k, v, k2, v2 = row[inserted]
    assert k in keys and v in values and (k2, v2) == (k, v)
    assert inserted[1] == inserted[0] + 1  # the pair is adjacent
    # The haystack is one window of the held-out corpus, cut at the pair.
    hay = np.delete(row, inserted)
    assert len(hay) == 96 + 1 - 4
    assert bytes(hay.astype(np.uint8)) in corpus
  # The loss falls on the last target only: the value of the key asked for.
  np.testing.assert_array_equal(np.nonzero(b["loss_mask"])[1], [95] * 5)
  assert np.all(np.isin(b["targets"][:, -1], values))
  again = cr.needle_batch(study, 96, 5, seed=1, step=2, split="eval")
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])


def test_mixed_batches():
  study = TINY.replace(batch_size=6)
  mixed = cr.MixedData(study, seed=4)
  b = mixed(3)
  assert b["inputs"].shape == (6, study.seq_len)
  n = mixed.n_mqar
  assert n == round(6 * study.mqar_fraction) and 0 < n < 6
  recall, text = slice(0, n), slice(n, 6)
  # Separate token ranges: bytes for text, the MQAR tokens above them; one
  # needle (a pair, then its key) in each text row.
  assert b["inputs"][recall].min() >= data.BYTE_VOCAB
  assert b["inputs"].max() < study.vocab_size
  assert np.all((b["inputs"][text] >= data.BYTE_VOCAB).sum(1) == 3)
  # Recall (MQAR queries and needle answers, the same weight each) is half
  # of the loss weight, the text the other half.
  total = study.batch_size * study.seq_len
  mask = b["loss_mask"]
  answers = mask[text][:, -1]
  prose = mask[text][:, :-1]
  np.testing.assert_allclose(mask[recall].sum() + answers.sum(), total / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(prose.sum(), total / 2, rtol=1e-5)
  queries = mask[recall][mask[recall] > 0]
  np.testing.assert_allclose(queries, answers[0], rtol=1e-6)
  np.testing.assert_allclose(answers, answers[0], rtol=1e-6)
  # No weight on the inserted pair or key (random, unpredictable).
  inserted = b["targets"][text] >= data.BYTE_VOCAB
  assert not np.any(prose[inserted[:, :-1]])
  # A pure function of (seed, step); another seed draws other data.
  again = mixed(3)
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])
  assert not np.array_equal(mixed(4)["inputs"], b["inputs"])
  assert not np.array_equal(cr.MixedData(study, seed=5)(3)["inputs"],
                            b["inputs"])


def test_models_differ_only_in_the_pattern():
  cfgs = [cr.model_config(TINY, c) for c in TINY.configurations()]
  base = dataclasses.asdict(cfgs[0])
  for cfg in cfgs[1:]:
    d = dataclasses.asdict(cfg)
    assert {k for k in d if d[k] != base[k]} == {"layer_types"}


# --------------------------------------------------------- configurations
def test_configurations():
  study = cr.PRESETS["default"].replace(
      placements=("periodic", "bottom", "top", "middle", "ends"),
      patterns=("FLLL LLLF", "LFLL LLLL"))
  got = [(c.name, c.pattern, c.ratio, c.placement)
         for c in study.configurations()]
  assert got == [
      ("all-full", "FFFFFFFF", "all-full", "-"),
      ("3:1", "LLLFLLLF", "3:1", "periodic"),  # also the periodic placement
      ("7:1", "LLLLLLLF", "7:1", "periodic"),
      ("all-linear", "LLLLLLLL", "all-linear", "-"),
      ("3:1 bottom", "FFLLLLLL", "3:1", "bottom"),
      ("3:1 top", "LLLLLLFF", "3:1", "top"),
      ("3:1 middle", "LLLFFLLL", "3:1", "middle"),
      # "FLLL LLLF" is the ends placement: listed once, under its name.
      ("3:1 ends", "FLLLLLLF", "3:1", "ends"),
      ("LFLLLLLL", "LFLLLLLL", "7:1", "pattern"),
  ]
  assert len({c.label for c in study.configurations()}) == 9
  assert [c.name for c in cr.PRESETS["smoke"].configurations()] == [
      "all-full", "3:1", "all-linear", "3:1 bottom"]


@pytest.mark.parametrize("changes, message", [
    (dict(patterns=("LLF",)), "patterns: expected num_layers=4 letters"),
    (dict(patterns=("LLXF",)), "patterns: expected letters L"),
    (dict(placements=("sideways",)), "placements: 'sideways'"),
    (dict(placements=("top", "top")), "placements: expected distinct"),
    (dict(placement_ratio="5:1"), "placement_ratio: "),
    (dict(placements=("ends",), placement_ratio="3:1"),
     "num_full: expected >= 2 for placement 'ends'"),
    (dict(seeds=0), "seeds: expected an int >= 1, found 0"),
    (dict(retrieval_lengths=(64, 2)), "retrieval_lengths: expected lengths "
     ">= 3"),
    (dict(ratios=(), placements=(), patterns=()), "ratios: expected at "
     "least one ratio, placement or pattern"),
])
def test_bad_study(changes, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    TINY.replace(**changes)


# ------------------------------------------------------------------ flags
def test_flags_build_the_study():
  fv = flags.FlagValues()
  holders = cr.define_flags(fv)
  fv(["prog", "--workdir=/tmp/x", "--preset=smoke", "--ratios=3:1,all-full",
      "--placements=top,ends", "--patterns=LFLL LLLF", "--seeds=3",
      "--steps=7", "--learning_rate=0.01", "--eval_lengths=64,256",
      "--retrieval_lengths=64,512"])
  study = cr.study_from_flags(holders)
  assert study == cr.PRESETS["smoke"].replace(
      ratios=("3:1", "all-full"), placements=("top", "ends"),
      patterns=("LFLL LLLF",), seeds=3, steps=7, learning_rate=0.01,
      eval_lengths=(64, 256), retrieval_lengths=(64, 512))
  fv2 = flags.FlagValues()
  holders = cr.define_flags(fv2)
  fv2(["prog", "--workdir=/tmp/x", "--placements="])
  assert cr.study_from_flags(holders).placements == ()


@pytest.mark.parametrize("study", [
    cr.PRESETS["default"],
    cr.PRESETS["gpu"].replace(seeds=3),
    TINY.replace(patterns=("FL LF",), placements=()),
])
def test_reproduce_command_gives_the_study(study):
  command = cr.reproduce_command(study, "/tmp/some dir")
  args = shlex.split(command)
  assert args[:3] == ["python", "-m", "experiments.compare_ratios"]
  fv = flags.FlagValues()
  holders = cr.define_flags(fv)
  fv(["prog"] + args[3:])
  assert fv.workdir == "/tmp/some dir"
  assert cr.study_from_flags(holders) == study


def test_bad_ratio_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="num_layers"):
    cr.run_study(TINY.replace(ratios=("3:1", "5:1")), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "runs"))


def test_bad_eval_length_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="eval_lengths"):
    cr.run_study(TINY.replace(eval_lengths=(64, 0)), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "runs"))


def test_forward_memory_gpu_branch_runs(monkeypatch):
  """The GPU-only branch (run the program, read the device's peak) on the
  CPU: the backend check and the device's memory stats are faked."""

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


# ------------------------------------------------------------- statistics
def test_t_quantile_and_cdf_match_scipy():
  rtol, atol = tolerances.tol("float64")
  for df in list(range(1, 31)) + [45, 100, 333]:
    for p in (0.005, 0.05, 0.3, 0.5, 0.8, 0.9, 0.975, 0.995):
      np.testing.assert_allclose(rr.t_quantile(p, df),
                                 scipy_stats.t.ppf(p, df), rtol=rtol,
                                 atol=atol, err_msg=f"p={p} df={df}")
    for x in (-7.0, -1.3, 0.0, 0.4, 2.2, 15.0):
      np.testing.assert_allclose(rr.t_cdf(x, df), scipy_stats.t.cdf(x, df),
                                 rtol=rtol, atol=atol,
                                 err_msg=f"x={x} df={df}")


def test_mean_ci95_matches_scipy():
  rtol, atol = tolerances.tol("float64")
  rng = np.random.default_rng(7)
  for n in (2, 3, 5, 10, 31):
    x = rng.normal(rng.uniform(-2, 2), rng.uniform(0.1, 3), n)
    got = rr.mean_ci95(x)
    lo, hi = scipy_stats.t.interval(0.95, n - 1, loc=np.mean(x),
                                    scale=scipy_stats.sem(x))
    assert got["n"] == n and got["values"] == list(x)
    np.testing.assert_allclose(got["mean"], np.mean(x), rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["ci95"], (hi - lo) / 2, rtol=rtol,
                               atol=atol)
  one = rr.mean_ci95([0.25])
  assert one["mean"] == 0.25 and np.isnan(one["ci95"]) and one["n"] == 1
  # Non-finite values (a run that could not measure) are left out.
  some = rr.mean_ci95([1.0, float("nan"), 3.0])
  assert some["n"] == 2 and some["mean"] == 2.0
  assert rr.mean_ci95([])["n"] == 0


# --------------------------------------------------- the report paragraph
def _stat(values):
  return rr.mean_ci95(values)


def _record(metric_values, seeds, placements=None):
  """A results record from {config: {metric: [value per seed]}}."""
  study = dataclasses.asdict(TINY)
  rows = []
  for name, metrics in metric_values.items():
    placement, pattern, full = (placements or {}).get(
        name, ("periodic", "LLLFLLLF", 2))
    rows.append({
        "config": name, "pattern": pattern, "ratio": "3:1",
        "placement": placement, "full_layers": full,
        "seeds": list(range(seeds)),
        "metrics": {m: _stat(v) for m, v in metrics.items()}})
  return {"study": study, "configurations": rows,
          "chance_accuracy": 1 / 16}


def _metrics(recall, needle=None, text=None, speed=None):
  out = {"recall@64": recall}
  n = len(recall)
  out["needle@192"] = needle or [0.5] * n
  out["text_bits_per_byte"] = text or [3.0] * n
  out["tokens_per_s"] = speed or [1000.0] * n
  return out


def test_findings_name_the_best_and_separate_intervals():
  record = _record({
      "A": _metrics([0.90, 0.92, 0.91], text=[3.1, 3.2, 3.15]),
      "B": _metrics([0.40, 0.45, 0.43], text=[2.50, 2.52, 2.51]),
      "C": _metrics([0.06, 0.07, 0.05], text=[2.50, 2.60, 2.55]),
  }, seeds=3)
  text = rr.findings(record)
  assert ("On MQAR recall at the trained length (64 tokens), A is best "
          "(0.910 ± 0.025); its 95% interval overlaps no other "
          "configuration's (next: B, 0.427 ± 0.063).") in text
  # Lower is better on text; B and C overlap there.
  assert ("On held-out text (bits per byte, lower is better), B is best "
          "(2.510 ± 0.025); its 95% interval overlaps that of C, so the data"
          " do not separate the two.") in text
  # C's interval reaches chance (1/16) on recall; A's and B's do not.
  assert "C does not clearly beat chance (0.062" in text
  assert "no intervals" not in text


def test_findings_with_overlap_ties_and_one_seed():
  record = _record({
      "A": _metrics([0.50, 0.60, 0.70], needle=[0.3, 0.3, 0.3]),
      "B": _metrics([0.45, 0.55, 0.65], needle=[0.3, 0.3, 0.3]),
  }, seeds=3)
  text = rr.findings(record)
  assert ("A is best (0.600 ± 0.248); its 95% interval overlaps that of B,"
          " so the data do not separate the two.") in text
  assert "the needle in text at 192 tokens, every configuration scores "\
      "0.300" in text
  single = _record({"A": _metrics([0.2]), "B": _metrics([0.8]),
                    "C": _metrics([0.5])}, seeds=1)
  text = rr.findings(single)
  assert text.startswith("With one seed per configuration there are no "
                         "intervals")
  assert ("On MQAR recall at the trained length (64 tokens), B is best "
          "(0.800) (next: C, 0.500).") in text
  assert "overlap" not in text


def test_findings_on_placement():
  placements = {"3:1": ("periodic", "LLLFLLLF", 2),
                "3:1 bottom": ("bottom", "FFLLLLLL", 2),
                "3:1 top": ("top", "LLLLLLFF", 2),
                "all-linear": ("-", "LLLLLLLL", 0)}
  record = _record({
      "3:1": _metrics([0.5, 0.52, 0.51], needle=[0.5, 0.6, 0.7]),
      "3:1 bottom": _metrics([0.10, 0.12, 0.11], needle=[0.5, 0.6, 0.6]),
      "3:1 top": _metrics([0.70, 0.72, 0.71], needle=[0.4, 0.5, 0.6]),
      "all-linear": _metrics([0.9, 0.9, 0.9]),
  }, seeds=3, placements=placements)
  text = rr.findings(record)
  assert ("Placing the 2 full-attention layers at different depths, top "
          "(LLLLLLFF) does best on MQAR recall at the trained length (64 "
          "tokens) (0.710 ± 0.025) and bottom (FFLLLLLL) worst (0.110 ± "
          "0.025); their 95% intervals do not overlap.") in text
  assert ("does best on the needle in text at 192 tokens (0.600 ± 0.248) "
          "and top (LLLLLLFF) worst (0.500 ± 0.248); their 95% intervals "
          "overlap.") in text
  # all-linear (no full layer) is in no placement group.
  assert "- (LLLLLLLL)" not in text


# ------------------------------------------------------ mixture of experts
MOE = "moe:4:1"
MOE_STUDY = TINY.replace(ratios=("3:1",), placements=(),
                         mlps=("dense", MOE))


def _mlp_sizes(params):
  """{layer path: parameter count under its "mlp"}, and the count of every
  other parameter, from the shapes of a parameter tree."""
  mlp, other = {}, 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, "key", None) for k in path]
    n = int(np.prod(x.shape))
    if "mlp" in keys:
      layer = "/".join(keys[:keys.index("mlp")])
      mlp[layer] = mlp.get(layer, 0) + n
    else:
      other += n
  return mlp, other


@pytest.mark.parametrize("mlp, experts, k", [("moe:4:1", 4, 1),
                                             ("moe:8:2", 8, 2),
                                             ("moe:5:5", 5, 5)])
def test_moe_configuration_matches_dense_active_params(mlp, experts, k):
  study = TINY.replace(ratios=("3:1",), placements=(),
                       mlps=("dense", mlp))
  dense_conf, moe_conf = study.configurations()
  assert (dense_conf.name, dense_conf.label) == ("3:1", "3-1")
  assert moe_conf.name == f"3:1 moe{experts}x{k}"
  assert moe_conf.label == f"3-1_moe{experts}x{k}"
  dense_cfg = cr.model_config(study, dense_conf)
  moe_cfg = cr.model_config(study, moe_conf)
  assert dense_cfg == cr.model_config(TINY, dense_conf)
  assert moe_cfg.mlp_types == ("moe",) * TINY.num_layers
  assert dense_cfg.mlp_types == ("dense",) * TINY.num_layers
  assert (moe_cfg.num_experts, moe_cfg.num_experts_per_tok) == (experts, k)
  # Only the MLPs differ.
  a, b = dataclasses.asdict(dense_cfg), dataclasses.asdict(moe_cfg)
  assert {f for f in a if a[f] != b[f]} <= {
      "mlp_types", "num_experts", "num_experts_per_tok",
      "moe_intermediate_size", "shared_expert_intermediate_size"}

  dense_p = jax.eval_shape(lambda: train_step.init_params(dense_cfg, 0))
  moe_p = jax.eval_shape(lambda: train_step.init_params(moe_cfg, 0))
  dense_mlp, dense_rest = _mlp_sizes(dense_p)
  moe_mlp, moe_rest = _mlp_sizes(moe_p)
  assert dense_rest == moe_rest and dense_mlp.keys() == moe_mlp.keys()
  # Active: every weight less (E - k) / E of the stacked experts.
  h = TINY.hidden_size
  idle, stacked = 0, 0
  for path, x in jax.tree_util.tree_flatten_with_path(moe_p)[0]:
    if getattr(path[-1], "key", None) in ("gate_up_proj", "down_proj"):
      assert x.shape[-3] == experts
      stacked += int(np.prod(x.shape))
      idle += int(np.prod(x.shape)) * (experts - k) // experts
  moe_total = sum(moe_mlp.values()) + moe_rest
  assert cr.active_param_count(moe_p, moe_cfg) == moe_total - idle
  assert cr.active_params_of(moe_cfg) == moe_total - idle
  dense_total = sum(dense_mlp.values()) + dense_rest
  assert cr.active_param_count(dense_p, dense_cfg) == dense_total
  # The routed experts a token goes through and the shared expert hold
  # exactly the dense MLP's weights; the router (h x E) and the shared
  # expert's gate (h) per layer come on top.
  routing = (h * experts + h) * TINY.num_layers
  assert moe_total - idle - routing == dense_total
  assert stacked * k // experts + (sum(moe_mlp.values()) - stacked
                                   - routing) == sum(dense_mlp.values())


@pytest.fixture(scope="module")
def moe_run(study_run, tmp_path_factory):
  """The dense 3:1 run of the study above copied into a new workdir, and
  the two-configuration study (dense, moe:4:1) run there: the dense run is
  reused, the mixture of experts trains."""
  workdir = str(tmp_path_factory.mktemp("ratios_moe"))
  dense, _ = MOE_STUDY.configurations()
  src = cr.run_dir(study_run[0], dense, 0)
  shutil.copytree(src, cr.run_dir(workdir, dense, 0))
  shutil.copy(os.path.join(os.path.dirname(src), "memory.json"),
              os.path.dirname(cr.run_dir(workdir, dense, 0)))
  record = cr.run_study(MOE_STUDY, workdir, plots=False)
  return workdir, record


def test_moe_study_reports_both(moe_run):
  workdir, record = moe_run
  assert record["trained_runs"] == 1 and record["reused_runs"] == 1
  dense, moe = record["configurations"]
  assert (dense["config"], moe["config"]) == ("3:1", "3:1 moe4x1")
  assert (dense["mlp"], moe["mlp"]) == ("dense", MOE)
  for row, conf in zip((dense, moe), MOE_STUDY.configurations()):
    cfg = cr.model_config(MOE_STUDY, conf)
    assert row["params"] == cfg.num_params()
    assert row["pattern"] == "LLLF"
  assert dense["active_params"] == dense["params"]
  h = TINY.hidden_size
  assert moe["active_params"] == dense["params"] + (h * 4 + h) * 4
  assert moe["params"] > moe["active_params"]
  run = next(r for r in record["runs"] if r["config"] == "3:1 moe4x1")
  assert run["mlp"] == MOE and run["active_params"] == moe["active_params"]
  assert os.path.exists(os.path.join(workdir, "runs", "3-1_moe4x1",
                                     "seed-0", "result.json"))
  # The routing at the end of training, for the mixture of experts only.
  m = moe["metrics"]
  assert 0.0 < m["router_aux_loss"]["mean"] <= 4.0  # at most E
  # Loads over an even share: the idlest <= 1 <= the busiest <= E / k.
  assert 0.0 <= m["expert_load_min"]["mean"] <= 1.0
  assert 1.0 <= m["expert_load_max"]["mean"] <= 4.0
  assert m["expert_load_min"]["n"] == 1
  assert "router_aux_loss" not in dense["metrics"]

  with open(os.path.join(workdir, "results.md")) as f:
    md = f.read()
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  head = ("| config | pattern | ratio | placement | mlp | params | active "
          "params |")
  for text in (md, report):
    assert head in text
    assert (f"| 3:1 | `LLLF` | 3:1 | periodic | dense | "
            f"{dense['params']:,} | {dense['active_params']:,} |") in text
    assert (f"| 3:1 moe4x1 | `LLLF` | 3:1 | periodic | {MOE} | "
            f"{moe['params']:,} | {moe['active_params']:,} |") in text
    assert "| 3:1 moe4x1 | 4 | 1 | 32 / 32 |" in text
  assert (f"At equal active parameters per token, 3:1 moe4x1 "
          f"({moe['active_params']:,} active of {moe['params']:,} "
          f"parameters) against the dense 3:1") in report
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["mlp"] for r in rows] == ["dense", MOE]
  assert rows[0]["router_aux_loss"] == ""
  assert float(rows[1]["router_aux_loss"]) == pytest.approx(
      m["router_aux_loss"]["mean"])


def test_moe_rerun_trains_nothing(moe_run, monkeypatch):
  workdir, first = moe_run

  def no_training(*args, **kwargs):
    raise AssertionError("trained a finished run")

  monkeypatch.setattr(cr.train_lib, "train", no_training)
  runs = os.path.join(workdir, "runs")
  before = _mtimes(runs)
  again = cr.run_study(MOE_STUDY, workdir, plots=False)
  assert again["trained_runs"] == 0 and again["reused_runs"] == 2
  assert _mtimes(runs) == before
  assert ([r["metrics"] for r in again["runs"]] ==
          [r["metrics"] for r in first["runs"]])


def test_dense_run_is_not_reused_for_moe(study_run, tmp_path):
  dense, moe = MOE_STUDY.configurations()
  assert cr.run_settings(MOE_STUDY, dense, 0) == cr.run_settings(
      TINY, dense, 0)  # dense runs keep their settings
  assert cr.run_settings(MOE_STUDY, moe, 0) != cr.run_settings(
      MOE_STUDY, dense, 0)
  # A dense run's folder where the mixture of experts' run goes: refused.
  shutil.copytree(cr.run_dir(study_run[0], dense, 0),
                  cr.run_dir(str(tmp_path), moe, 0))
  runs = os.path.join(tmp_path, "runs")
  before = _mtimes(runs)
  only_moe = MOE_STUDY.replace(mlps=(MOE,))
  with pytest.raises(cli.UserError, match=r"--workdir: .*3-1_moe4x1.*seed-0 "
                     r"holds a run of other settings \(mlp: None there, "
                     r"'moe:4:1' now\)"):
    cr.run_study(only_moe, str(tmp_path), plots=False)
  assert _mtimes(runs) == before


@pytest.mark.parametrize("value, found", [
    ("moe:2:4", "'moe:2:4' (E=2, k=4)"),
    ("moe:x:1", "'moe:x:1'"),
    ("sparse", "'sparse'"),
    ("moe:8:0", "'moe:8:0'"),
    ("dense,dense", "'dense,dense'"),
    ("moe:65:64", "found 'moe:65:64'"),  # 64 + 1 > the MLP width 64
])
def test_bad_mlps_fail_before_training(value, found, tmp_path, monkeypatch):
  fv = flags.FlagValues()
  holders = cr.define_flags(fv)
  fv(["prog", f"--workdir={tmp_path}", "--preset=smoke",
      f"--mlps={value}"])
  with pytest.raises(cli.UserError) as info:
    cr.study_from_flags(holders)
  message = str(info.value)
  assert message.startswith("--mlps: expected ") and found in message
  assert "\n" not in message

  def no_training(*args, **kwargs):
    raise AssertionError("trained before checking the flags")

  monkeypatch.setattr(cr, "_HOLDERS", holders, raising=False)
  monkeypatch.setattr(cr.train_lib, "train", no_training)
  with pytest.raises(cli.UserError, match="^--mlps: "):
    cr.main(["prog"])
  assert not os.path.exists(tmp_path / "runs")


def test_mlps_flag_and_command():
  fv = flags.FlagValues()
  holders = cr.define_flags(fv)
  fv(["prog", "--workdir=/tmp/x", "--preset=smoke", "--ratios=3:1",
      "--mlps=dense, moe:8:2"])
  study = cr.study_from_flags(holders)
  assert study.mlps == ("dense", "moe:8:2")
  assert [c.name for c in study.configurations()] == [
      "3:1", "3:1 moe8x2", "3:1 bottom", "3:1 bottom moe8x2"]
  assert cr.PRESETS["smoke"].mlps == cr.PRESETS["default"].mlps == (
      "dense",)
  args = shlex.split(cr.reproduce_command(study, "/tmp/x"))
  assert "--mlps=dense,moe:8:2" in args
  fv = flags.FlagValues()
  holders = cr.define_flags(fv)
  fv(["prog"] + args[3:])
  assert cr.study_from_flags(holders) == study


def test_findings_compare_dense_and_moe():
  record = _record({
      "3:1": _metrics([0.50, 0.52, 0.51], text=[3.0, 3.1, 3.05]),
      "3:1 moe8x2": _metrics([0.40, 0.60, 0.50], text=[2.5, 2.6, 2.55]),
  }, seeds=3)
  for row, mlp, params in zip(record["configurations"], ("dense", "moe:8:2"),
                              (1000, 3000)):
    row.update(mlp=mlp, params=params, active_params=1000)
  text = rr.findings(record)
  assert ("At equal active parameters per token, 3:1 moe8x2 (1,000 active "
          "of 3,000 parameters) against the dense 3:1 (1,000): MQAR recall "
          "at the trained length (64 tokens) 0.500 ± 0.248 against 0.510 ± "
          "0.025 (dense better; intervals overlap)") in text
  assert ("held-out text (bits per byte, lower is better) 2.550 ± 0.124 "
          "against 3.050 ± 0.124 (mixture of experts better; intervals "
          "apart)") in text
  # A dense-only record says nothing of the mixture of experts.
  dense_only = _record({"3:1": _metrics([0.5, 0.5, 0.5])}, seeds=3)
  assert "active parameters" not in rr.findings(dense_only)
