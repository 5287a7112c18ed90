"""pytest setup shared by the test suite.

Keeps torch to two threads (the CI machines have two cores; more threads only
add contention with XLA), lets every pytest-xdist worker load libtpu (the TPU
compiler of tests/test_tpu_compile.py, which by default takes a lockfile that
one process may hold), and provides a session-wide scratch directory for
checkpoints that several test modules build. Nothing here hides failures.
"""

import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

try:
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:  # torch is only in the [hf] extra.
  torch = None

if torch is not None:
  torch.set_num_threads(2)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory):
  """A directory that lives for the whole test session."""
  return tmp_path_factory.mktemp("session")
