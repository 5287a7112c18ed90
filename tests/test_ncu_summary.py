"""experiments/ncu_summary.py on a report in ncu's CSV layout."""

import pytest

from experiments import ncu_summary

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
