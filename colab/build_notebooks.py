"""Builds colab/*.ipynb from their paired colab/*.py (jupytext percent format).

The .py file is the source of truth (reviewable diffs); the notebook is
generated so that Colab can open it. Run after editing a .py:

  python colab/build_notebooks.py
"""

from __future__ import annotations

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_MARKER = re.compile(r"^# %%( \[markdown\])?\s*$")


def cells_from_py(text: str) -> list[dict]:
  """Splits percent-format source into notebook cells."""
  cells, kind, lines = [], None, []

  def flush():
    if kind is None:
      return
    body = "\n".join(lines).strip("\n")
    if kind == "markdown":
      body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#")
                       for l in body.splitlines())
    src = [l + "\n" for l in body.splitlines()]
    if src:
      src[-1] = src[-1].rstrip("\n")
    cell = {"cell_type": kind, "metadata": {}, "source": src}
    if kind == "code":
      cell.update(execution_count=None, outputs=[])
    cells.append(cell)

  for line in text.splitlines():
    m = _MARKER.match(line)
    if m:
      flush()
      kind, lines = ("markdown" if m.group(1) else "code"), []
    else:
      lines.append(line)
  flush()
  return cells


def notebook_from_py(text: str) -> dict:
  return {
      "cells": cells_from_py(text),
      "metadata": {
          "jupytext": {"formats": "ipynb,py:percent"},
          "kernelspec": {"display_name": "Python 3", "language": "python",
                         "name": "python3"},
          "language_info": {"name": "python"},
      },
      "nbformat": 4,
      "nbformat_minor": 5,
  }


def render(nb: dict) -> str:
  return json.dumps(nb, indent=1, sort_keys=True) + "\n"


def paired_sources() -> list[str]:
  return sorted(os.path.join(HERE, f) for f in os.listdir(HERE)
                if f.endswith(".py") and f != os.path.basename(__file__))


def main() -> int:
  for src in paired_sources():
    with open(src) as f:
      nb = notebook_from_py(f.read())
    out = src[:-3] + ".ipynb"
    with open(out, "w") as f:
      f.write(render(nb))
    print("wrote", out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
