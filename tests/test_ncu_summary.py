"""pallas_kernels/tools/ncu_summary.py on a report in ncu's CSV layout."""

import pathlib
import random

import pytest

from pallas_kernels.tools import ncu_summary

_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name",'
           '"Context","Stream","Block Size","Grid Size","Device","CC",'
           '"Section Name","Metric Name","Metric Unit","Metric Value"')


def _row(kid, kernel, section, name, unit, value):
  return (f'"{kid}","7","python3","h","{kernel}","1","13","(128, 1, 1)",'
          f'"(16, 16, 8)","0","9.0","{section}","{name}","{unit}","{value}"')


def test_summary_lists_headlines_and_worst_stalls():
  stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
  report = "\n".join([
      "ran pallas forward+backward once (finite gradients)",  # the program
      "==PROF== Disconnected from process 7",
      _HEADER,
      _row(0, "gated_delta_rule_prep", "GPU Speed Of Light Throughput",
           "Duration", "us", "771.52"),
      _row(0, "gated_delta_rule_prep", "GPU Speed Of Light Throughput",
           "DRAM Throughput", "%", "28.10"),
      _row(0, "gated_delta_rule_prep", "Launch Statistics", "Grid Size", "",
           "8,192"),
      _row(0, "gated_delta_rule_prep", "Command line profiler metrics",
           stall.format("barrier"), "", "3.25"),
      _row(0, "gated_delta_rule_prep", "Command line profiler metrics",
           stall.format("long_scoreboard"), "", "12.50"),
      _row(0, "gated_delta_rule_prep", "Command line profiler metrics",
           stall.format("wait"), "", "1,024.00"),
      _row(1, "gated_delta_rule_state_fwd", "Occupancy",
           "Achieved Occupancy", "%", "6.20"),
      "==PROF== Report done",
  ])
  assert ncu_summary.summarize(report, top=2) == [
      "0 gated_delta_rule_prep: Duration 771.52 us",
      "0 gated_delta_rule_prep: DRAM Throughput 28.10 %",
      "1 gated_delta_rule_state_fwd: Achieved Occupancy 6.20 %",
      "0 gated_delta_rule_prep: stalls (cycles per issued instruction) "
      "wait 1024.00, long_scoreboard 12.50",
  ]


def test_summary_without_a_report_names_the_problem():
  with pytest.raises(ValueError, match="no ncu CSV header"):
    ncu_summary.summarize("==PROF== ERR_NVGPUCTRPERM: no permission")


def _duration(kid, kernel, value, unit="us", grid="(16, 16, 8)"):
  return (f'"{kid}","7","python3","h","{kernel}","1","13","(128, 1, 1)",'
          f'"{grid}","0","9.0","GPU Speed Of Light Throughput","Duration",'
          f'"{unit}","{value}"')


def test_by_tiling_cuts_at_markers_and_sums_per_kernel():
  rng = random.Random(11)
  # Two tilings: one launch per kernel, then a blocked form with three
  # blocks (ncu suffixes repeated names with __N), durations in mixed units.
  plain = [("gated_delta_rule_prep_out", rng.uniform(100, 900)),
           ("gated_delta_rule_state_out", rng.uniform(100, 900))]
  blocked = [(name, rng.uniform(10, 90)) for _ in range(3)
             for name in ("gated_delta_rule_prep_out",
                          "gated_delta_rule_state_out")]
  rows, kid, seen = [], 0, {}

  def add(kernel, us, unit):
    nonlocal kid
    n = seen.get(kernel, 0)
    seen[kernel] = n + 1
    name = kernel if n == 0 else f"{kernel}__{n}"
    value = {"us": us, "ns": us * 1e3, "ms": us * 1e-3}[unit]
    rows.append(_duration(kid, name, f"{value:,.4f}", unit))
    kid += 1

  add("gated_delta_rule_marker", 2.0, "us")
  for kernel, us in plain:
    add(kernel, us, "us")
  add("gated_delta_rule_marker", 2.0, "ns")
  for i, (kernel, us) in enumerate(blocked):
    add(kernel, us, ("ns", "ms", "us")[i % 3])
  report = "\n".join(["ran pallas forward+backward once (finite gradients)",
                      "ran pallas[fwd_block=128] forward+backward once "
                      "(finite gradients)", _HEADER, *rows])
  lines = ncu_summary.by_tiling(report)
  ms = lambda xs: sum(us for _, us in xs) / 1e3
  per = lambda xs, k: sum(us for name, us in xs if name == k) / 1e3
  assert lines == [
      f"tiling pallas: 2 launches, {ms(plain):.3f} ms in kernels",
      f"  gated_delta_rule_prep_out: 1 x, "
      f"{per(plain, 'gated_delta_rule_prep_out'):.3f} ms",
      f"  gated_delta_rule_state_out: 1 x, "
      f"{per(plain, 'gated_delta_rule_state_out'):.3f} ms",
      f"tiling pallas[fwd_block=128]: 6 launches, {ms(blocked):.3f} ms in "
      f"kernels",
      f"  gated_delta_rule_prep_out: 3 x, "
      f"{per(blocked, 'gated_delta_rule_prep_out'):.3f} ms",
      f"  gated_delta_rule_state_out: 3 x, "
      f"{per(blocked, 'gated_delta_rule_state_out'):.3f} ms",
  ]


def test_by_tiling_marker_name_is_the_benchmarks():
  bench = (pathlib.Path(__file__).resolve().parents[1]
           / "experiments/bench_gated_delta_rule.py").read_text()
  assert f'MARKER = "{ncu_summary.MARKER}"' in bench


def test_by_tiling_without_markers_names_the_problem():
  report = "\n".join([_HEADER, _duration(0, "gated_delta_rule_prep", "1.0")])
  with pytest.raises(ValueError, match="no gated_delta_rule_marker launch"):
    ncu_summary.by_tiling(report)
  with pytest.raises(ValueError, match="unknown unit"):
    ncu_summary.by_tiling("\n".join(
        [_HEADER, _duration(0, "gated_delta_rule_marker", "1.0", "furlong")]))
