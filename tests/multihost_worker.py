"""experiments.train as one process of a multi-process test run, able to die.

`python -m tests.multihost_worker [experiments.train flags]` runs the script
as `python -m experiments.train` does. With QWEN_JAX_TEST_KILL_AT=K:S in
the environment, process K kills itself with SIGKILL when the loop asks
for the checkpoint of step S, before saving it: a host that dies in the
middle of a run, at a known step (a kill from outside would race with the
few milliseconds a step of the tiny test model takes). With
QWEN_JAX_TEST_TRACE=1, each process writes to stderr a line for every MQAR
part it builds ("trace: process I builds rows A:B") and for every run file
and export it writes ("trace: process I writes PATH"), so that a test
sees who built and wrote what.
"""

import os
import signal
import sys

import jax

from experiments import cli
from experiments import train as train_script
from qwen_jax import data
from qwen_jax import train_checkpoint
from qwen_jax import train_workdir

KILL_VARIABLE = "QWEN_JAX_TEST_KILL_AT"
TRACE_VARIABLE = "QWEN_JAX_TEST_TRACE"


def _install_kill(spec: str) -> None:
  process, step = (int(v) for v in spec.split(":"))
  save = train_checkpoint.Checkpointer.save

  def save_or_die(self, state):
    if (jax.process_index() == process
        and int(jax.device_get(state.step)) == step):
      os.kill(os.getpid(), signal.SIGKILL)
    save(self, state)

  train_checkpoint.Checkpointer.save = save_or_die


def _trace(what: str) -> None:
  sys.stderr.write(f"trace: process {jax.process_index()} {what}\n")
  sys.stderr.flush()


def _install_trace() -> None:
  mqar_batch = data.mqar_batch
  atomic_write = train_workdir.atomic_write
  export_hf = train_checkpoint.export_hf

  def traced_mqar_batch(task, batch_size, seed=0, step=0, rows=None):
    batch = mqar_batch(task, batch_size, seed, step, rows)
    lo = 0 if rows is None else rows.start
    _trace(f"builds rows {lo}:{lo + len(batch['inputs'])}")
    return batch

  def traced_atomic_write(path, *args, **kwargs):
    _trace(f"writes {path}")
    return atomic_write(path, *args, **kwargs)

  def traced_export_hf(path, *args, **kwargs):
    _trace(f"writes {path}")
    return export_hf(path, *args, **kwargs)

  data.mqar_batch = traced_mqar_batch
  train_workdir.atomic_write = traced_atomic_write
  train_checkpoint.export_hf = traced_export_hf


def main() -> None:
  if os.environ.get(KILL_VARIABLE):
    _install_kill(os.environ[KILL_VARIABLE])
  if os.environ.get(TRACE_VARIABLE):
    _install_trace()
  train_script._HOLDERS = train_script.define_flags()  # pylint: disable=protected-access
  train_script._MESH = train_script.define_mesh_flags()  # pylint: disable=protected-access
  cli.run(train_script.main, name="experiments.train",
          on_interrupt=train_script._interrupted)  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
