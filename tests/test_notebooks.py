"""Colab notebooks: in sync with their .py pair, and run top to bottom."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
sys.path.insert(0, COLAB)
import build_notebooks  # pylint: disable=g-import-not-at-top,wrong-import-position

NOTEBOOKS = sorted(f for f in os.listdir(COLAB) if f.endswith(".ipynb"))


def test_every_notebook_has_a_pair():
  assert NOTEBOOKS
  for src in build_notebooks.paired_sources():
    assert os.path.exists(src[:-3] + ".ipynb"), src


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_its_py(name):
  with open(os.path.join(COLAB, name[:-6] + ".py")) as f:
    expected = build_notebooks.render(build_notebooks.notebook_from_py(
        f.read()))
  with open(os.path.join(COLAB, name)) as f:
    assert f.read() == expected, (
        f"{name} is stale: run python colab/build_notebooks.py")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
  with open(os.path.join(COLAB, name)) as f:
    nb = json.load(f)
  code = "\n\n".join("".join(c["source"]) for c in nb["cells"]
                     if c["cell_type"] == "code")
  script = tmp_path / "notebook.py"
  script.write_text(code)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
