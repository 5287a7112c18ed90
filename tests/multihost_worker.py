"""experiments.train as one process of a multi-process test run, able to die.

`python -m tests.multihost_worker [experiments.train flags]` runs the script
as `python -m experiments.train` does. With QWEN_JAX_TEST_KILL_AT=K:S in
the environment, process K kills itself with SIGKILL when the loop asks
for the checkpoint of step S, before saving it: a host that dies in the
middle of a run, at a known step (a kill from outside would race with the
few milliseconds a step of the tiny test model takes).
"""

import os
import signal

import jax

from experiments import cli
from experiments import train as train_script
from qwen_jax import train_checkpoint

KILL_VARIABLE = "QWEN_JAX_TEST_KILL_AT"


def _install_kill(spec: str) -> None:
  process, step = (int(v) for v in spec.split(":"))
  save = train_checkpoint.Checkpointer.save

  def save_or_die(self, state):
    if (jax.process_index() == process
        and int(jax.device_get(state.step)) == step):
      os.kill(os.getpid(), signal.SIGKILL)
    save(self, state)

  train_checkpoint.Checkpointer.save = save_or_die


def main() -> None:
  if os.environ.get(KILL_VARIABLE):
    _install_kill(os.environ[KILL_VARIABLE])
  train_script._HOLDERS = train_script.define_flags()  # pylint: disable=protected-access
  train_script._MESH = train_script.define_mesh_flags()  # pylint: disable=protected-access
  cli.run(train_script.main, name="experiments.train",
          on_interrupt=train_script._interrupted)  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
