"""Runs pytest on the files given as arguments (the Bazel py_test main).

Under `bazel test` (TEST_TMPDIR set) the test has no HOME and the tree it
runs in is read-only, so: HOME becomes the test's private temporary
directory (Triton and matplotlib keep caches under ~), pytest keeps no
cache, and the results go to the JUnit XML file Bazel reads
(XML_OUTPUT_FILE).
"""

import os
import sys

import pytest


def main(argv: list[str]) -> int:
  args = ["-q"]
  if "TEST_TMPDIR" in os.environ:
    if not os.environ.get("HOME"):
      os.environ["HOME"] = os.environ["TEST_TMPDIR"]
    args += ["-p", "no:cacheprovider"]
    if os.environ.get("XML_OUTPUT_FILE"):
      args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
  return pytest.main(args + argv)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
