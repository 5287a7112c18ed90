"""Headline rows of an Nsight Compute CSV report (`ncu --csv --page details`).

  python -m pallas_kernels.tools.ncu_summary ncu32k.csv

prints, per profiled kernel, its time, its throughput against the SM, DRAM,
L2 and L1 peaks, occupancy and registers, and the five stall reasons that
cost its warps the most cycles per issued instruction (from `--metrics
regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio`).
`pallas_kernels/tools/gpu_checks.sh ncu32k` writes such a report. Lines
before the CSV header (the profiled program's own output) and rows that
are not metrics (ncu's closing messages) are skipped.

  python -m pallas_kernels.tools.ncu_summary --by_tiling ncu_blocks32k.csv

prints, for a profile of `bench_gated_delta_rule --once` (which launches a
marker kernel before each tiling), each tiling's kernel time in its
forward+backward, per kernel name (`gpu_checks.sh ncu_blocks32k`).
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


_TO_MS = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3,
          "ms": 1.0, "msecond": 1.0, "s": 1e3, "second": 1e3}
_RAN = re.compile(r"^ran (.+?) forward\+backward once", re.MULTILINE)
_REPEAT = re.compile(r"__\d+$")  # ncu's suffix for a repeated kernel name
MARKER = "gated_delta_rule_marker"  # bench_gated_delta_rule.MARKER


def by_tiling(text: str) -> list[str]:
  """Kernel time per tiling of a `bench_gated_delta_rule --once` profile:
  the launches between two MARKER kernels are one tiling's
  forward+backward (labelled by the program's "ran LABEL ..." lines, in
  order). Per tiling, its total Duration and, per kernel name, the number
  of launches and their summed Duration in ms (the blocked forms launch
  each kernel once per block)."""
  lines = text.splitlines()
  start = next((i for i, line in enumerate(lines)
                if line.startswith('"ID"')), None)
  if start is None:
    raise ValueError("no ncu CSV header (\"ID\", ...) in the report")
  launches = {}  # ID -> (kernel, ms), in report order
  for row in csv.DictReader(lines[start:]):
    if row.get("Metric Name") != "Duration" or not row.get("Kernel Name"):
      continue
    unit = row.get("Metric Unit", "")
    if unit not in _TO_MS:
      raise ValueError(f"Duration in unknown unit {unit!r}")
    launches[row["ID"]] = (_REPEAT.sub("", row["Kernel Name"]),
                           _number(row["Metric Value"]) * _TO_MS[unit])
  tilings = []
  for kernel, ms in launches.values():
    if kernel == MARKER:
      tilings.append({})
    elif tilings:  # launches before the first marker are not a tiling's
      count, total = tilings[-1].get(kernel, (0, 0.0))
      tilings[-1][kernel] = (count + 1, total + ms)
  if not tilings:
    raise ValueError(f"no {MARKER} launch in the report (not a "
                     f"bench_gated_delta_rule --once profile?)")
  labels = _RAN.findall(text)
  out = []
  for n, kernels in enumerate(tilings):
    label = labels[n] if len(labels) == len(tilings) else f"tiling {n}"
    total = sum(ms for _, ms in kernels.values())
    count = sum(c for c, _ in kernels.values())
    out.append(f"tiling {label}: {count} launches, {total:.3f} ms in "
               f"kernels")
    out += [f"  {kernel}: {c} x, {ms:.3f} ms"
            for kernel, (c, ms) in kernels.items()]
  return out


def main(argv: list[str]) -> None:
  tiling = "--by_tiling" in argv
  argv = [a for a in argv if a != "--by_tiling"]
  if len(argv) != 2:
    sys.exit(__doc__)
  with open(argv[1]) as f:
    text = f.read()
  for line in by_tiling(text) if tiling else summarize(text):
    print("ncu", line)


if __name__ == "__main__":
  main(sys.argv)
