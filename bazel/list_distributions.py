"""Prints the interpreter and its installed distributions for Bazel.

Run by the `python_distributions` repository rule (repositories.bzl) with
the Python the tests are to use. Output, one item a line: the interpreter's
path (sys.executable, not resolved: a virtual environment is found through
the path it was started by), its version, then the name of every installed
distribution, normalised as PEP 503 does and with "-" as "_" (the form of a
Bazel package name: "orbax-checkpoint" -> "orbax_checkpoint").
"""

import importlib.metadata
import re
import sys


def normalise(name: str) -> str:
  """PEP 503 name, with "_" for its separators."""
  return re.sub(r"[-_.]+", "_", name).lower()


def main() -> None:
  names = set()
  for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"]
    if name:  # a broken install can leave a dist-info without metadata
      names.add(normalise(name))
  print(sys.executable)
  print("%d.%d.%d" % sys.version_info[:3])
  for name in sorted(names):
    print(name)


if __name__ == "__main__":
  main()
