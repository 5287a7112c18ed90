"""pytest setup shared by the test suite.

Keeps torch to two threads (the CI machines have two cores; more threads only
add contention with XLA), lets every pytest-xdist worker load libtpu (the TPU
compiler of tests/test_tpu_compile.py, which by default takes a lockfile that
one process may hold), and provides a scratch directory that lives for the
whole pytest run, for checkpoints that several test modules build. Nothing
here hides failures.

Compiled programs are shared through JAX's persistent compilation cache, in
a directory made for the pytest run (removed at its end) unless
JAX_COMPILATION_CACHE_DIR is already set: the pytest-xdist workers and the
subprocesses the tests start (the notebooks, the 8-device sharding suite,
the scripts) inherit it, so a program that several tests compile (the same
tiny model at the same shapes) is compiled once. The cache is keyed by the
program (HLO), the compile options, the backend and the jax version, so it
returns only the executable that compiling would have produced.
QWEN_JAX_TEST_JAX_CACHE=0 turns it off (pallas_kernels/tools/gpu_checks.sh
does: the GPU runs keep the configuration they were measured in).
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

if ("JAX_COMPILATION_CACHE_DIR" not in os.environ
    and os.environ.get("QWEN_JAX_TEST_JAX_CACHE", "1") != "0"):
  # Set before jax is imported (jax reads these at import), here in the
  # pytest process that starts the xdist workers, which inherit it.
  _cache_dir = tempfile.mkdtemp(prefix="qwen_jax_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

try:
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:  # torch is only in the [hf] extra.
  torch = None

if torch is not None:
  torch.set_num_threads(2)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory):
  """A directory that lives for the whole pytest run."""
  return tmp_path_factory.mktemp("shared")
