"""The scripts' flags for running as several processes (hosts) at once.

Every script that runs sharded programs (experiments/long_context.py,
experiments/train.py) takes

  --distributed            join a multi-process run before anything else
                           (`qwen_jax.distributed.initialize`): every host
                           runs the same command;
  --coordinator_address    "host:port" of process 0 (default: the
                           JAX_COORDINATOR_ADDRESS variable, or the
                           cluster's: SLURM, Open MPI, Cloud TPU);
  --num_processes          how many processes (default: the cluster's);
  --process_id             this process's index (default: the cluster's);
  --distributed_timeout    seconds to wait for every process to connect, and
                           for a silent process before it counts as dead;
  --num_devices            on a CPU, N fake devices in this process.

`start` checks them (one line and exit status 1 for a bad value, through
experiments/cli.py) and joins the run. It is called first in a script's
`main`: the script's other checks then run after the processes have met,
so that a bad value in one process ends every process with its message
(`qwen_jax.distributed.abort`, which experiments/cli.py calls for any error
once the run is joined) instead of leaving the others waiting. A value
absl cannot parse ends that process before it joins; JAX's runtime then
ends the others after --distributed_timeout seconds (DEADLINE_EXCEEDED,
exit status 134).

Two processes on one machine, 4 fake CPU devices each (8 in the mesh):

  python -m experiments.long_context --verify --distributed \
      --coordinator_address 127.0.0.1:12355 --num_processes 2 \
      --process_id 0 --num_devices 4 --preset tiny --seq_len 512 \
      --mesh data:2,seq:4 &
  python -m experiments.long_context ... --process_id 1 ...
"""

from __future__ import annotations

import re
from typing import Any

from absl import flags
import jax

from experiments import cli

_HOLDERS: dict[str, Any] = {}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the flags of the module docstring on `flag_values`."""
  _HOLDERS["distributed"] = flags.DEFINE_bool(
      "distributed", False, "Join a multi-process run first (every host runs "
      "the same command; docs/sharding.md).", flag_values=flag_values)
  _HOLDERS["coordinator_address"] = flags.DEFINE_string(
      "coordinator_address", None, "--distributed: host:port of process 0 "
      "(default: $JAX_COORDINATOR_ADDRESS or the cluster's).",
      flag_values=flag_values)
  _HOLDERS["num_processes"] = flags.DEFINE_integer(
      "num_processes", None, "--distributed: number of processes (default: "
      "the cluster's).", flag_values=flag_values)
  _HOLDERS["process_id"] = flags.DEFINE_integer(
      "process_id", None, "--distributed: this process's index, 0 to "
      "num_processes - 1 (default: the cluster's).",
      flag_values=flag_values)
  _HOLDERS["distributed_timeout"] = flags.DEFINE_integer(
      "distributed_timeout", 300, "--distributed: seconds to wait for every "
      "process to connect, and for a silent process before the others "
      "end.", flag_values=flag_values)
  _HOLDERS["num_devices"] = flags.DEFINE_integer(
      "num_devices", None, "On a CPU: N fake devices in this process (sets "
      "the CPU platform before jax starts; with --distributed, per "
      "process).", flag_values=flag_values)


def value(name: str) -> Any:
  """The value of one of this module's flags."""
  return _HOLDERS[name].value


_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d+)$")


def check_flags(distributed: bool, coordinator_address: str | None,
                num_processes: int | None, process_id: int | None,
                timeout: int, num_devices: int | None) -> None:
  """Raises cli.UserError for a value out of range, or a distributed
  setting given without --distributed."""
  if num_devices is not None and num_devices < 1:
    raise cli.UserError(f"--num_devices: expected an int >= 1, found "
                        f"{num_devices}")
  given = [n for n, v in (("coordinator_address", coordinator_address),
                          ("num_processes", num_processes),
                          ("process_id", process_id)) if v is not None]
  if not distributed:
    if given:
      raise cli.UserError(f"--{given[0]}: expected it with --distributed "
                          f"(it sets up a multi-process run), found it "
                          f"without")
    return
  if coordinator_address is not None:
    m = _ADDRESS.match(coordinator_address)
    if not m or not 1 <= int(m.group(2)) <= 65535:
      raise cli.UserError(f"--coordinator_address: expected host:port "
                          f"(port 1 to 65535), found "
                          f"{coordinator_address!r}")
  if num_processes is not None and num_processes < 1:
    raise cli.UserError(f"--num_processes: expected an int >= 1, found "
                        f"{num_processes}")
  if process_id is not None:
    top = "num_processes - 1" if num_processes is None else (
        f"{num_processes - 1} (--num_processes {num_processes})")
    if process_id < 0 or (num_processes is not None
                          and process_id >= num_processes):
      raise cli.UserError(f"--process_id: expected 0 to {top}, found "
                          f"{process_id}")
  if timeout < 1:
    raise cli.UserError(f"--distributed_timeout: expected an int >= 1 "
                        f"(seconds), found {timeout}")


def configure_cpu_devices(num_devices: int | None) -> None:
  """Gives the CPU platform `num_devices` devices (before jax starts).

  Raises:
    cli.UserError: the backend already started with another count.
  """
  if num_devices is None:
    return
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)
  except RuntimeError:  # the backend already started (e.g. in a test)
    if jax.local_device_count() != num_devices:
      raise cli.UserError(
          f"--num_devices: jax already started with "
          f"{jax.local_device_count()} devices; expected {num_devices}"
      ) from None


def start(name: str | None = None) -> None:
  """Checks the flags and, with --distributed, joins the run.

  Processes that do not all connect within --distributed_timeout seconds
  are ended by JAX's runtime (its message names DEADLINE_EXCEEDED and the
  RegisterTask call; exit status 134).

  Raises:
    cli.UserError: a bad value (see `check_flags`), or settings the
      cluster does not supply.
  """
  from qwen_jax import distributed  # pylint: disable=g-import-not-at-top
  args = {k: value(k) for k in ("distributed", "coordinator_address",
                                "num_processes", "process_id",
                                "distributed_timeout", "num_devices")}
  check_flags(args["distributed"], args["coordinator_address"],
              args["num_processes"], args["process_id"],
              args["distributed_timeout"], args["num_devices"])
  if not args["distributed"]:
    configure_cpu_devices(args["num_devices"])
    return
  timeout = args["distributed_timeout"]
  try:
    distributed.initialize(
        args["coordinator_address"], args["num_processes"],
        args["process_id"], cpu_devices=args["num_devices"],
        initialization_timeout=timeout, heartbeat_timeout=timeout,
        name=name or cli.script_name())
  except (ValueError, TypeError) as e:  # arguments the cluster lacks
    raise cli.UserError(f"--distributed: {cli.one_line(e)}") from e
