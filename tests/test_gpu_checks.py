"""The GPU step scripts, checked without a GPU.

pallas_kernels/tools/gpu_checks.sh (the kernels) and
experiments/model_gpu_checks.sh (the model against transformers) run in
short calls on a GPU machine with a time limit; a misspelt BlockSizes
variant, flag or default step would only show there, after minutes of
device time. So: both parse as bash and source the shared
pallas_kernels/tools/gpu_steps.sh (run here with an unknown step: it is
logged, nothing else runs), every default step has a case, every tiling
named is a valid `BlockSizes` spec over the GPU defaults, and every flag
the model script passes to an experiments script is one that script
defines.
"""

import os
import pathlib
import re
import subprocess

import pytest

from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = _ROOT / "pallas_kernels/tools/gpu_checks.sh"
_MODEL_SCRIPT = _ROOT / "experiments/model_gpu_checks.sh"
_SCRIPTS = [_SCRIPT, _MODEL_SCRIPT]


def _text() -> str:
  return _SCRIPT.read_text()


@pytest.mark.parametrize("script", _SCRIPTS, ids=lambda p: p.name)
def test_parses_as_bash(script):
  subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)


@pytest.mark.parametrize("script", _SCRIPTS, ids=lambda p: p.name)
def test_sources_the_shared_steps(script, tmp_path):
  # An unknown step: the shared file is sourced (OUT, the log, `step`),
  # the step is named in the log, nothing is run.
  env = dict(os.environ, OUT=str(tmp_path), BUDGET_S="100")
  proc = subprocess.run(["bash", str(script), "no_such_step"], cwd=_ROOT,
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  logs = list(tmp_path.glob("*.log"))
  assert [p.name for p in logs] == [script.stem + ".log"], logs
  assert "unknown step no_such_step" in logs[0].read_text()


def _defaults_and_cases(text):
  defaults = re.search(r"steps=\(([^)]*)\)\n", text.split('steps=("$@")')[1])
  cases = {name for names in re.findall(r"^    ([\w|]+)\)", text, flags=re.M)
           for name in names.split("|")}
  return defaults.group(1).split(), cases


def test_every_default_step_has_a_case():
  steps, cases = _defaults_and_cases(_text())
  assert "tests" in steps and "env" in steps, steps
  assert set(steps) <= cases, set(steps) - cases


def test_model_script_steps():
  steps, cases = _defaults_and_cases(_MODEL_SCRIPT.read_text())
  assert steps[:4] == ["env", "train", "prefill", "decode"], steps
  assert set(steps) <= cases, set(steps) - cases
  # Every step named in the header is a case, and the reverse.
  header = _MODEL_SCRIPT.read_text().split("set -u")[0].split("# Steps")[1]
  named = set(re.findall(r"^#   (\w+) ", header, flags=re.M))
  assert named == cases, (named ^ cases)


def _defined_flags(module: str) -> set[str]:
  text = (_ROOT / (module.replace(".", "/") + ".py")).read_text()
  names = set(re.findall(r'flags\.DEFINE_(?:\w+)\(\s*"(\w+)"', text))
  bools = set(re.findall(r'flags\.DEFINE_bool\(\s*"(\w+)"', text))
  return names | {"no" + b for b in bools}


def test_model_script_flags_exist():
  text = _MODEL_SCRIPT.read_text().split("set -u", 1)[1]
  # Each command: "python3 -m experiments.X" up to the next ";;" or "&&".
  commands = re.findall(r"-m\s+(experiments\.\w+)(.*?)(?:;;|&&)", text,
                        flags=re.S)
  assert len(commands) >= 10, commands
  shared = re.search(r"DECODE=\((.*?)\)", text, flags=re.S).group(1)
  for module, args in commands:
    args = args.replace('"${DECODE[@]}"', shared)
    used = set(re.findall(r"--(\w+)", args))
    missing = used - _defined_flags(module)
    assert not missing, (module, missing)


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
