"""Headline rows of an Nsight Compute CSV report (`ncu --csv --page details`).

  python -m experiments.ncu_summary ncu32k.csv

prints, per profiled kernel, its time, its throughput against the SM, DRAM,
L2 and L1 peaks, occupancy and registers, and the five stall reasons that
cost its warps the most cycles per issued instruction (from `--metrics
regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio`).
`experiments/gpu_checks.sh ncu32k` writes such a report. Lines before the
CSV header (the profiled program's own output) and rows that are not
metrics (ncu's closing messages) are skipped.
"""

from __future__ import annotations

import csv
import re
import sys

HEADLINE = re.compile(
    r"^(Duration|Compute \(SM\) Throughput|DRAM Throughput|"
    r"L2 Cache Throughput|L1/TEX Cache Throughput|Achieved Occupancy|"
    r"Registers Per Thread|Warp Cycles Per Issued Instruction)$")
_STALL = re.compile(
    r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def _number(text: str) -> float:
  return float(text.replace(",", ""))


def summarize(text: str, top: int = 5) -> list[str]:
  """The report's headline lines: "ID kernel: metric value unit" for each
  HEADLINE metric, then one stall line per kernel."""
  lines = text.splitlines()
  start = next((i for i, line in enumerate(lines)
                if line.startswith('"ID"')), None)
  if start is None:
    raise ValueError("no ncu CSV header (\"ID\", ...) in the report")
  out, stalls = [], {}
  for row in csv.DictReader(lines[start:]):
    name, value = row.get("Metric Name"), row.get("Metric Value")
    if not name or value is None or not row.get("Kernel Name"):
      continue
    kernel = f'{row["ID"]} {row["Kernel Name"]}'
    if HEADLINE.match(name):
      out.append(f"{kernel}: {name} {value} {row.get('Metric Unit', '')}"
                 .rstrip())
    stall = _STALL.match(name)
    if stall:
      stalls.setdefault(kernel, []).append((_number(value), stall.group(1)))
  for kernel, reasons in stalls.items():
    worst = sorted(reasons, key=lambda x: -x[0])[:top]
    out.append(f"{kernel}: stalls (cycles per issued instruction) "
               + ", ".join(f"{name} {v:.2f}" for v, name in worst))
  return out


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit(__doc__)
  with open(argv[1]) as f:
    for line in summarize(f.read()):
      print("ncu", line)


if __name__ == "__main__":
  main(sys.argv)
