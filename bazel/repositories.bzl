"""Repository rules that let the workspace build and test offline.

Bazel 4 (Debian's `bazel-bootstrap`) has py_library, py_binary and py_test
built in, but a py_test still asks for three repositories that it would
download (rules_cc, rules_java, remote_coverage_tools), and the BUILD file
loads rules_python and takes its third-party packages from `@pypi`. Every
one of them is made here from local files:

  * `native_rules_repository`: a repository whose `<package>/defs.bzl`
    forwards each named rule to Bazel's built-in `native.<rule>`; it stands
    in for rules_python, rules_cc and rules_java.
  * `coverage_tools_repository`: the two coverage tools as scripts that fail
    saying coverage is not available offline (`bazel coverage` is the only
    command that runs them).
  * `python_distributions`: one empty `py_library` per distribution
    installed in a chosen Python (`@pypi//jax`, `@pypi//orbax_checkpoint`),
    and that Python as the Python toolchain. A dependency the Python lacks
    is a build error ("no such package '@pypi//x'"), not a test that
    imports something else.
"""

_FORWARDER = """def {rule}(**kwargs):
    native.{rule}(**kwargs)
"""

def _forwarder(rule):
    return _FORWARDER.format(rule = rule)

def _native_rules_repository_impl(rctx):
    rctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % rctx.name)
    rctx.file("BUILD", "")
    for package, rules in rctx.attr.packages.items():
        rctx.file(package + "/BUILD", "")
        rctx.file(
            package + "/defs.bzl",
            ("\"\"\"Bazel's built-in rules under %s's names.\"\"\"\n\n" %
             rctx.name) +
            "\n\n".join([_forwarder(rule) for rule in rules]),
        )

native_rules_repository = repository_rule(
    implementation = _native_rules_repository_impl,
    attrs = {
        "packages": attr.string_list_dict(
            mandatory = True,
            doc = "package -> the rules its defs.bzl forwards to native",
        ),
    },
    local = True,
    doc = "A stand-in for a rules_* repository: defs.bzl files that " +
          "forward to Bazel's built-in rules.",
)

_UNAVAILABLE = """#!/bin/sh
echo "$0: coverage is not available offline: this workspace has no" \
    "coverage tools (bazel/repositories.bzl)" >&2
exit 1
"""

_COVERAGE_TOOL = """sh_binary(
    name = "{name}",
    srcs = ["unavailable.sh"],
    visibility = ["//visibility:public"],
)
"""

def _coverage_tools_repository_impl(rctx):
    rctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % rctx.name)
    rctx.file("unavailable.sh", _UNAVAILABLE, executable = True)
    rctx.file("BUILD", "".join([_COVERAGE_TOOL.format(name = name) for name in [
        "coverage_report_generator",
        "lcov_merger",
    ]]))

coverage_tools_repository = repository_rule(
    implementation = _coverage_tools_repository_impl,
    local = True,
    doc = "remote_coverage_tools without the tools: each one fails saying so.",
)

_PYTHON_ENV = "QWEN_JAX_BAZEL_PYTHON"

_ROOT_BUILD = """# The Python that {env} (else `python3` on PATH) named
# when this repository was made: {python} ({version}).
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "python3",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":python3",
)

toolchain(
    name = "python_toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

_DIST_BUILD = """# Installed in {python}: on sys.path through the
# interpreter itself.
py_library(
    name = "{name}",
    visibility = ["//visibility:public"],
)
"""

def _python_distributions_impl(rctx):
    python = rctx.os.environ.get(_PYTHON_ENV, "")
    if not python:
        found = rctx.which("python3")
        if not found:
            fail(("%s is not set and there is no python3 on PATH: set " +
                  "it to the Python that has the project's dependencies") %
                 _PYTHON_ENV)
        python = str(found)
    result = rctx.execute([python, rctx.path(rctx.attr._lister)])
    if result.return_code != 0:
        fail("%s (%s) could not list its distributions (exit %d):\n%s" % (
            python,
            _PYTHON_ENV,
            result.return_code,
            result.stderr,
        ))
    lines = result.stdout.strip().split("\n")
    executable, version, names = lines[0], lines[1], lines[2:]
    rctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % rctx.name)
    rctx.file("BUILD", _ROOT_BUILD.format(
        env = _PYTHON_ENV,
        python = executable,
        version = version,
    ))
    for name in names:
        rctx.file(name + "/BUILD", _DIST_BUILD.format(
            name = name,
            python = executable,
        ))

python_distributions = repository_rule(
    implementation = _python_distributions_impl,
    attrs = {
        "_lister": attr.label(default = Label("//bazel:list_distributions.py")),
    },
    environ = [_PYTHON_ENV, "PATH"],
    local = True,
    configure = True,
    doc = "`@<name>//<distribution>` for each distribution installed in " +
          "$%s (else python3 on PATH), and that Python as the " % _PYTHON_ENV +
          "toolchain. Installing a package does not refresh it: run " +
          "`bazel sync --configure` (or change %s)." % _PYTHON_ENV,
)
