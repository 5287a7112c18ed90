"""Runs tests/test_sharding.py on 8 fake CPU devices, in a fresh interpreter.

XLA reads `--xla_force_host_platform_device_count` once, when the backend
starts; the pytest process that collects this file may already have started
it with one device. So this test starts a new interpreter with the flag set,
runs the sharding tests there, and fails with their output if any fails (or
if they were all skipped, which would mean the flag did not take).
"""

import os
import re
import subprocess
import sys

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"


def test_sharding_suite_on_8_fake_devices():
  if _FLAG in os.environ.get("XLA_FLAGS", ""):
    pytest.skip("this process already has 8 fake devices: "
                "tests/test_sharding.py runs here directly")
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + _FLAG).strip()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  target = os.path.join(root, "tests", "test_sharding.py")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       target], cwd=root, env=env, capture_output=True, text=True,
      timeout=3000, check=False)
  out = proc.stdout[-20000:] + proc.stderr[-5000:]
  assert proc.returncode == 0, out
  passed = re.search(r"(\d+) passed", proc.stdout)
  assert passed and int(passed.group(1)) >= 20, out
