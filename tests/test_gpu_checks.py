"""pallas_kernels/tools/gpu_checks.sh, checked without a GPU.

The script runs in short calls on a GPU machine with a time limit; a
misspelt BlockSizes variant or a default step without a case would only
show there, after minutes of device time. So: it parses as bash, every default step has a case, and
every tiling it names is a valid `BlockSizes` spec over the GPU defaults.
"""

import pathlib
import re
import subprocess

import pytest

from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / (
    "pallas_kernels/tools/gpu_checks.sh")


def _text() -> str:
  return _SCRIPT.read_text()


def test_parses_as_bash():
  subprocess.run(["bash", "-n", str(_SCRIPT)], check=True, timeout=60)


def test_every_default_step_has_a_case():
  text = _text()
  defaults = re.search(r"steps=\(([^)]*)\)\n", text.split('steps=("$@")')[1])
  steps = defaults.group(1).split()
  assert "tests" in steps and "env" in steps, steps
  cases = set(re.findall(r"^    (\w+)\)", text, flags=re.M))
  assert set(steps) <= cases, set(steps) - cases


def _variant_lists() -> list[str]:
  text = _text()
  # Quoted ("a,b") or bare (a,b, inside a quoted `bash -c` command).
  lists = [quoted or bare for quoted, bare in re.findall(
      r'--(?:pallas|profile)_variants\s+(?:"([^"$]*)"|([^\s"\\$]+))',
      text)]
  # Defaults of overridable lists: "${WARPS_VARIANTS:-a,b}".
  lists += re.findall(r"\$\{\w+_VARIANTS:-([^}]*)\}", text)
  return lists


def test_finds_the_variant_lists():
  lists = _variant_lists()
  assert len(lists) >= 8, lists
  assert any("state_stride=2" in x and "output_in_state=True" in x
             and "--" not in x for x in lists), lists


@pytest.mark.parametrize("variants", _variant_lists())
def test_every_variant_is_a_block_sizes_spec(variants):
  for spec in variants.split(","):
    # A ValueError names the field or value at fault.
    BlockSizes.from_spec(spec, "gpu")
