"""Several processes as one JAX program: start-up, data, I/O and errors.

JAX's multi-controller runtime runs the same program in every process (one
per host, or several on one machine); after `jax.distributed.initialize`
`jax.devices()` lists every process's devices and the sharded programs of
`qwen_jax.sharding` run unchanged over a mesh of them. What this module
adds is what the programs around them need:

  * `initialize`: `jax.distributed.initialize` with CPU collectives (gloo)
    and, on a CPU, N fake devices per process, then a watcher thread that
    ends this process, with the message, when another process fails
    (`abort`), so that no process waits forever in a collective.
  * Data: `process_slices` (the part of a global array this process's
    devices hold), `global_array` / `global_batch` (a global `jax.Array`
    assembled from each process's own part with
    `jax.make_array_from_process_local_data`), and `put_global` (a host
    tree that every process holds the same, placed on shardings).
  * I/O: `is_primary` (process 0 writes metrics, logs and files),
    `barrier`, and `fetch` (host copies of arrays that span processes;
    every process must call it: it is a collective).

With one process every function here is the plain single-process
operation, so library code calls them unconditionally.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from qwen_jax import sharding as sharding_lib
from qwen_jax.array_typing import PyTree
from qwen_jax.data import MEDIA_KEYS

# Keys of the coordination service's key-value store: a failing process
# writes its message under _ERROR_DIR, the others acknowledge under
# _ACK_DIR before they exit (so the failing process, which may host the
# service, outlives their reading it).
_ERROR_DIR = "qwen_jax/error/"
_ACK_DIR = "qwen_jax/ack/"
# How often the watcher polls the store, and how long a failing process
# waits for the others' acknowledgements.
_POLL_S = 0.2
_ACK_WAIT_S = 10.0
# How long process 0 outlives the others' acknowledgements.
_GRACE_S = 1.0


class _Runtime:
  """This process's part of the runtime (set by `initialize`)."""

  def __init__(self, name: str, index: int, count: int):
    self.name, self.index, self.count = name, index, count
    self.failing = False
    self.ending = False  # another process failed: the watcher exits
    self.watcher: threading.Thread | None = None


_RUNTIME: _Runtime | None = None


def _global_state() -> Any:
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state


def _client() -> Any:
  return _global_state().client


def _index(key: str) -> int | None:
  """The process index a key of the store ends with."""
  tail = key.rstrip("/").rsplit("/", 1)[-1]
  return int(tail) if tail.isdigit() else None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               cpu_devices: int | None = None,
               initialization_timeout: int = 300,
               heartbeat_timeout: int = 100,
               name: str = "qwen_jax") -> None:
  """Joins this process to a multi-process run (before any jax compute).

  Args:
    coordinator_address: "host:port" of process 0 (it serves there);
      None: `JAX_COORDINATOR_ADDRESS`, or the cluster's (SLURM, Open MPI,
      Cloud TPU) by JAX's auto-detection.
    num_processes: processes in the run; None: the cluster's.
    process_id: this process's index, 0 to num_processes - 1; None: the
      cluster's.
    cpu_devices: on a CPU, the fake devices of this process
      (`jax_num_cpu_devices`; sets the CPU platform); None leaves the
      platform alone.
    initialization_timeout: seconds to wait for every process to connect.
    heartbeat_timeout: seconds after which a silent process counts as
      dead (the runtime then ends the others).
    name: what the one-line messages of `abort` start with.

  Raises:
    ValueError: a process_id outside [0, num_processes), or arguments the
      cluster does not supply (from `jax.distributed.initialize`).
    RuntimeError: jax already started its backend, or was initialised.
  """
  global _RUNTIME
  if (num_processes is not None and process_id is not None
      and not 0 <= process_id < num_processes):
    raise ValueError(f"process_id: expected 0 to num_processes - 1 = "
                     f"{num_processes - 1}, found {process_id}")
  if cpu_devices is not None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  # Collectives between CPU processes (ignored by GPU and TPU backends).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, initialization_timeout=initialization_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout)
  state = _global_state()
  # Read from the runtime, not jax.process_index(): the watcher thread must
  # not be the one that starts the backend.
  _RUNTIME = _Runtime(name, state.process_id, state.num_processes)
  _RUNTIME.watcher = threading.Thread(target=_watch, name="qwen_jax-errors",
                                      daemon=True)
  _RUNTIME.watcher.start()


def is_active() -> bool:
  """Whether `initialize` joined this process to a run."""
  return _RUNTIME is not None and _client() is not None


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_primary() -> bool:
  """Whether this process writes the run's files and output (process 0)."""
  return jax.process_index() == 0


# ----------------------------------------------------------------- errors
def _write_line(text: str) -> None:
  sys.stdout.flush()
  sys.stderr.write(text.rstrip("\n") + "\n")
  sys.stderr.flush()


def _informed(client: Any) -> set[int]:
  """The processes that acknowledged an error or reported their own."""
  return {_index(k) for d in (_ACK_DIR, _ERROR_DIR)
          for k, _ in client.key_value_dir_get(d)}


def _exit_last(client: Any, status: int) -> None:
  """Exits; process 0 first waits (up to 10 s) for every other process to
  acknowledge the error: it hosts the coordination service, and when it
  goes the runtime ends the others before they can write their lines."""
  if _RUNTIME.index == 0:
    deadline = time.time() + _ACK_WAIT_S
    try:
      while (set(range(1, _RUNTIME.count)) - _informed(client)
             and time.time() < deadline):
        time.sleep(_POLL_S)
      time.sleep(_GRACE_S)  # they exit right after acknowledging
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(status)  # pylint: disable=protected-access


def _watch() -> None:
  """Ends this process when another one reports an error (`abort`)."""
  me = _RUNTIME.index
  while True:
    time.sleep(_POLL_S)
    client = _client()
    if client is None:  # shut down: the run ended
      return
    try:
      errors = client.key_value_dir_get(_ERROR_DIR)
    except Exception:  # pylint: disable=broad-except
      return  # the service is gone: the runtime ends this process
    others = sorted((_index(k), v) for k, v in errors
                    if _index(k) not in (None, me))
    if not others:
      continue
    try:
      client.key_value_set(f"{_ACK_DIR}{me}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass
    if _RUNTIME.failing:
      return  # this process reports its own error and exits
    _RUNTIME.ending = True
    pid, message = others[0]
    _write_line(f"{_RUNTIME.name}: error: process {pid} of "
                f"{_RUNTIME.count} failed: {message}")
    _exit_last(client, 1)


def abort(message: str, status: int = 1) -> None:
  """Ends this process and, through the watchers, every other one.

  Writes "NAME: error: MESSAGE" to stderr and `message` (one line) where
  the other processes' watchers read it; they write it with this process's
  index and exit with status 1. This process exits with `status` once they
  have read it (at most 10 s), without the interpreter's teardown (its
  shutdown barrier would wait for processes stuck in a collective).
  Without an active run it only writes and exits.
  """
  if ending():
    # Another process failed first and the watcher is ending this one
    # (the error here is likely its consequence: a collective cut short).
    while True:
      time.sleep(1.0)
  name = _RUNTIME.name if _RUNTIME is not None else "qwen_jax"
  client = _client() if is_active() else None
  if client is None:
    _write_line(f"{name}: error: {message}")
    os._exit(status)  # pylint: disable=protected-access
  _RUNTIME.failing = True
  try:
    client.key_value_set(f"{_ERROR_DIR}{_RUNTIME.index}", message,
                         allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except
    pass  # the service is gone; the runtime ends the others
  _write_line(f"{name}: error: {message}")
  try:
    deadline = time.time() + _ACK_WAIT_S
    waiting = set(range(_RUNTIME.count)) - {_RUNTIME.index}
    while waiting - _informed(client) and time.time() < deadline:
      time.sleep(_POLL_S)
  except Exception:  # pylint: disable=broad-except
    pass
  _exit_last(client, status)


def ending() -> bool:
  """Whether this process is ending because another one failed."""
  return _RUNTIME is not None and _RUNTIME.ending


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)` (no-op alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------- data
def process_slices(sharding: jax.sharding.Sharding,
                   shape: Sequence[int]) -> tuple[slice, ...]:
  """The box of a global array of `shape` that this process's devices
  hold, one slice per dimension.

  Raises:
    ValueError: this process's shards do not form one box (a mesh whose
      devices interleave the processes along a sharded dimension).
  """
  shape = tuple(int(s) for s in shape)
  index_map = sharding.addressable_devices_indices_map(shape)
  lows = [n for n in shape]
  highs = [0 for _ in shape]
  count = 0
  seen = set()
  for idx in index_map.values():
    box = []
    for d, (s, n) in enumerate(zip(idx, shape)):
      start, stop, _ = s.indices(n)
      lows[d] = min(lows[d], start)
      highs[d] = max(highs[d], stop)
      box.append((start, stop))
    if tuple(box) not in seen:
      seen.add(tuple(box))
      count += math.prod(b - a for a, b in box)
  if not shape:
    return ()
  out = tuple(slice(a, b) for a, b in zip(lows, highs))
  if count != math.prod(b - a for a, b in zip(lows, highs)):
    raise ValueError(f"sharding: this process's shards of an array of shape "
                     f"{shape} do not form one box (found the box "
                     f"{out} with only {count} of its elements held here)")
  return out


def global_array(x: Any, sharding: jax.sharding.Sharding,
                 local: bool = False,
                 global_shape: Sequence[int] | None = None) -> jax.Array:
  """A global array on `sharding` from host data.

  Args:
    x: the whole global array (the same on every process; each keeps its
      part), or with `local=True` only this process's part
      (`process_slices`).
    sharding: the global array's sharding.
    local: `x` is this process's part.
    global_shape: the global shape (needed with `local=True`).

  Returns:
    A `jax.Array` of the global shape
    (`jax.make_array_from_process_local_data`).
  """
  x = np.asarray(x)
  if not local:
    global_shape = x.shape
    x = x[process_slices(sharding, x.shape)]
  elif global_shape is None:
    raise ValueError("global_shape: expected the global shape with "
                     "local=True, found None")
  return jax.make_array_from_process_local_data(sharding, x,
                                                tuple(global_shape))


def global_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                 local: bool = False,
                 global_shape: Sequence[int] | None = None
                 ) -> dict[str, Any]:
  """A training batch ([b, t] arrays) as global arrays on `mesh`.

  Rows over the mesh's data and fsdp axes and tokens over seq
  (`sharding.batch_sharding`); image and video entries are replicated,
  static grids kept as they are. `local`/`global_shape` as in
  `global_array`: with `local=True` every [b, t] entry is this process's
  part and global_shape the global [b, t].
  """
  out: dict[str, Any] = {}
  for key, value in batch.items():
    if value is None or isinstance(value, jax.Array) and (
        not value.is_fully_addressable or len(value.devices()) > 1):
      out[key] = value  # already global (or absent)
    elif key in MEDIA_KEYS:
      if key.endswith("grid_thw"):
        out[key] = value  # static: host data
      else:
        out[key] = global_array(value, NamedSharding(mesh, P()))
    else:
      shape = tuple(global_shape) if local else np.shape(value)
      out[key] = global_array(value, sharding_lib.batch_sharding(mesh, shape),
                              local=local, global_shape=shape)
  return out


def put_global(tree: PyTree, shardings: PyTree) -> PyTree:
  """Places a host tree that every process holds the same (parameters
  initialised from one seed, or loaded from one file) on `shardings`;
  each process transfers only its devices' shards."""
  def one(x, sh):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda i: x[i])

  return jax.tree_util.tree_map(one, jax.device_get(tree), shardings)


def fetch(tree: PyTree) -> PyTree:
  """Host (NumPy) copies of a tree's arrays on every process.

  Arrays that span processes are gathered (`process_allgather`): every
  process must call this at the same point, with the same tree.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree_util.tree_map(one, tree)


def run_primary(fn: Callable[[], Any]) -> Any:
  """Calls `fn` on process 0 only (returns None elsewhere)."""
  return fn() if is_primary() else None


__all__ = ["abort", "barrier", "ending", "fetch", "global_array", "global_batch",
           "initialize", "is_active", "is_primary", "process_count",
           "process_index", "process_slices", "put_global", "run_primary"]
