"""experiments/bench_generate.py end to end on the CPU (`--small`), with
transformers beside ours: a dense and a mixture-of-experts preset."""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_small_run_times_ours_and_transformers(tmp_path, preset):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_generate", "--small",
       "--preset", preset, "--hf", "--variants", "scan",
       "--prefill_variants", "scan", "--prefill_lengths", "64",
       "--decode_batches", "2", "--decode_prompt", "16", "--decode_new", "4",
       "--noquality", f"--json_out={out}"], cwd=_ROOT, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  meta = report["meta"]
  assert meta["preset"] == preset
  # transformers ran the same model (its class chosen by the config).
  assert meta["hf_parameters"] == meta["parameters"], meta
  rows = {r["workload"]: r for r in report["rows"]}
  assert set(rows) == {"prefill 1 x 64", "generate b=2, 16+4",
                       "decode loop only b=2"}, rows
  for r in rows.values():
    assert r["variant"] == "scan", r
  # The loop alone is generate(n) less generate(1): with a tiny model the
  # difference may vanish in the timing noise, and the row then says so
  # (None) rather than report a rate.
  loop = rows["decode loop only b=2"]["value"]
  assert loop is None or loop > 0, rows
  # transformers times the same workloads; each ratio is ours over
  # theirs.
  for w in ("prefill 1 x 64", "generate b=2, 16+4"):
    r = rows[w]
    assert r["value"] > 0 and r["hf"] > 0 and r["ratio"] == pytest.approx(
        r["value"] / r["hf"]), r
