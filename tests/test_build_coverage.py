"""BUILD has a target for every module, data file, script and test file.

Bazel is not needed: BUILD is evaluated as Python (the part of Starlark it
uses is Python syntax), with `glob` computed on the tree by Bazel's rules
(`*` within one path segment, `**` any number of whole segments, no descent
into a folder with its own BUILD file) and each rule recording its
attributes. Then:

  * every tests/test_*.py is run by a py_test (a source of it, and its
    `$(location)` in the test's args);
  * every file under qwen_jax/, pallas_kernels/, experiments/, colab/ and
    tests/ is in some target's srcs or data;
  * every file BUILD names explicitly exists;
  * every module with a `__main__` block under qwen_jax/, pallas_kernels/
    or experiments/ is the main of a py_binary, and every py_binary's main
    has one (BUILD globs the scripts, less the shared modules it names);
  * every file of the tree a test names is among that test's runfiles (its
    srcs and data and its deps', transitively): another test module it
    imports, a path in a string ("experiments/configs/mqar.py"), a script
    it runs as a module ("experiments.forward"), a package folder
    ("colab"). Tests tagged `external` read the checkout itself and are
    left out.

The same checks run on small trees in a temporary folder, where a module,
test or script added without a target must be reported, and files added
to the real BUILD's packages must be covered by its globs.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import shutil

# The checkout this file lives in (resolved: under Bazel the test file is a
# symlink from the runfiles into the checkout).
ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("qwen_jax", "pallas_kernels", "experiments", "colab")
# Modules whose files must all have a target, and where a `__main__` block
# asks for a py_binary (colab/build_notebooks.py writes beside its sources
# and runs from the tree, so colab/ is not among them).
_COVERED_DIRS = PACKAGE_DIRS + ("tests",)
_SCRIPT_DIRS = ("qwen_jax", "pallas_kernels", "experiments")
_MAIN_BLOCK = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)
_RULES = ("py_library", "py_binary", "py_test", "filegroup", "sh_binary",
          "sh_test")


def tree_files(root: pathlib.Path) -> list[str]:
  """Every file under `root`, relative and '/'-separated, less version
  control, bytecode, Bazel's output links and packaging leftovers."""
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel = pathlib.Path(dirpath).relative_to(root)
    dirnames[:] = [
        d for d in dirnames
        if not (d.startswith(".") or d == "__pycache__"
                or d.endswith(".egg-info")
                or (rel == pathlib.Path(".") and d.startswith("bazel-")))]
    files.extend((rel / f).as_posix() for f in filenames
                 if not f.endswith(".pyc"))
  return sorted(files)


def glob_regex(pattern: str) -> re.Pattern[str]:
  """A regex for one Bazel glob pattern over '/'-separated paths."""
  out = ""
  segments = pattern.split("/")
  for i, segment in enumerate(segments):
    last = i == len(segments) - 1
    if segment == "**":
      out += r"[^/]+(?:/[^/]+)*" if last else r"(?:[^/]+/)*"
    else:
      out += re.escape(segment).replace(r"\*", "[^/]*") + ("" if last else "/")
  return re.compile(out + r"\Z")


class Build:
  """The root package of a tree: BUILD evaluated, its targets recorded."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.files = tree_files(root)
    subpackages = {os.path.dirname(f) for f in self.files
                   if os.path.basename(f) in ("BUILD", "BUILD.bazel")
                   and "/" in f}
    # Bazel's glob does not look into another package's folder.
    self._globbable = [f for f in self.files if not any(
        f.startswith(p + "/") for p in subpackages)]
    self.targets: dict[str, dict] = {}
    env = {"load": _ignore, "package": _ignore, "licenses": _ignore,
           "exports_files": _ignore, "glob": self.glob}
    for kind in _RULES:
      env[kind] = self._rule_recorder(kind)
    path = root / "BUILD"
    code = compile(path.read_text(), str(path), "exec")
    exec(code, env)  # pylint: disable=exec-used

  def glob(self, include: list[str], exclude: list[str] = (),
           **unused_kwargs) -> list[str]:
    inc = [glob_regex(p) for p in include]
    exc = [glob_regex(p) for p in exclude]
    return [f for f in self._globbable
            if any(r.match(f) for r in inc)
            and not any(r.match(f) for r in exc)]

  def _rule_recorder(self, kind: str):
    def rule(name: str, **attrs) -> None:
      assert name not in self.targets, f"two targets named {name!r}"
      self.targets[name] = dict(attrs, kind=kind, name=name)
    return rule

  def _local(self, label: str) -> str | None:
    """The name within the root package `label` stands for; None for an
    external repository or another package."""
    if label.startswith("@"):
      return None
    if label.startswith("//:"):
      return label[3:]
    if label.startswith("//"):
      return None
    return label[1:] if label.startswith(":") else label

  def direct_files(self, target: dict) -> set[str]:
    """The files a target lists in srcs, data and main (targets it lists
    there contribute their runfiles)."""
    out = set()
    labels = list(target.get("srcs", [])) + list(target.get("data", []))
    if "main" in target:
      labels.append(target["main"])
    for label in labels:
      out |= self.label_files(label)
    return out

  def label_files(self, label: str) -> set[str]:
    name = self._local(label)
    if name is None:
      return set()
    if name in self.targets:
      return self.runfiles(self.targets[name])
    return {name}

  def runfiles(self, target: dict) -> set[str]:
    out = self.direct_files(target)
    for dep in target.get("deps", []):
      out |= self.label_files(dep)
    return out

  def named_files(self) -> set[str]:
    """Every file BUILD names explicitly (not a target, not external)."""
    out = set()
    for target in self.targets.values():
      for label in (list(target.get("srcs", [])) + list(target.get("data", []))
                    + list(target.get("deps", []))
                    + ([target["main"]] if "main" in target else [])):
        name = self._local(label)
        if name is not None and name not in self.targets:
          out.add(name)
    return out


def _ignore(*unused_args, **unused_kwargs) -> None:
  pass


def _strings(source: str) -> list[str]:
  """The string constants of a module, less docstrings."""
  tree = ast.parse(source)
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                         ast.AsyncFunctionDef)):
      body = node.body
      if (body and isinstance(body[0], ast.Expr)
          and isinstance(body[0].value, ast.Constant)
          and isinstance(body[0].value.value, str)):
        docstrings.add(id(body[0].value))
  return [n.value for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and isinstance(n.value, str)
          and id(n) not in docstrings]


def _imported_modules(source: str) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def named_by_test(source: str, files: set[str]) -> set[str]:
  """The files and folders of the tree (`files`) that a test's source
  names: 'path' for a file, 'path/' for a folder."""
  dirs = {d for f in files for d in _parents(f)}
  out = set()

  def add_path(path: str) -> None:
    path = path.strip("/")
    if path in files:
      out.add(path)
    elif path in dirs:
      out.add(path + "/")

  for module in _imported_modules(source):
    path = module.replace(".", "/") + ".py"
    if module.startswith("tests.") and path in files:
      out.add(path)
  for s in _strings(source):
    for token in re.findall(r"[\w.-]+(?:/[\w.-]+)+/?", s):
      add_path(token)
    if re.fullmatch(r"test_\w+\.py", s) and f"tests/{s}" in files:
      out.add(f"tests/{s}")
    if s in _COVERED_DIRS + ("docs",):
      add_path(s)
    if re.fullmatch(r"(?:%s)(?:\.\w+)+" % "|".join(_SCRIPT_DIRS), s):
      add_path(s.replace(".", "/") + ".py")
  return out


def _parents(path: str) -> list[str]:
  parts = path.split("/")[:-1]
  return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def problems(root: pathlib.Path) -> list[str]:
  """Every way BUILD falls short of the tree at `root`, one line each."""
  build = Build(root)
  files = set(build.files)
  tests = [t for t in build.targets.values() if t["kind"] == "py_test"]
  out = []

  for f in sorted(files):
    if re.fullmatch(r"tests/test_\w+\.py", f) and not any(
        f in t.get("srcs", []) and f"$(location {f})" in t.get("args", [])
        for t in tests):
      out.append(f"{f}: no py_test runs it")

  covered = set()
  for target in build.targets.values():
    covered |= build.direct_files(target)
  for f in sorted(files):
    if f.split("/")[0] in _COVERED_DIRS and f not in covered:
      out.append(f"{f}: in no target's srcs or data")

  for name in sorted(build.named_files() - files):
    out.append(f"{name}: named in BUILD but not in the tree")

  mains = {t.get("main") for t in build.targets.values()
           if t["kind"] == "py_binary"}
  for f in sorted(files):
    if f.split("/")[0] not in _SCRIPT_DIRS or not f.endswith(".py"):
      continue
    script = _MAIN_BLOCK.search((root / f).read_text(encoding="utf-8"))
    if script and f not in mains:
      out.append(f"{f}: a script (a __main__ block) with no py_binary")
    elif f in mains and not script:
      out.append(f"{f}: the main of a py_binary, but no __main__ block "
                 "(a shared module: leave it out of the binaries)")

  for t in sorted(tests, key=lambda t: t["name"]):
    if "external" in t.get("tags", []):
      continue
    runfiles = build.runfiles(t)
    for src in t.get("srcs", []):
      if not re.fullmatch(r"tests/test_\w+\.py", src) or src not in files:
        continue
      source = (root / src).read_text(encoding="utf-8")
      for named in sorted(named_by_test(source, files)):
        if named.endswith("/"):
          ok = any(r.startswith(named) for r in runfiles)
        else:
          ok = named in runfiles
        if not ok:
          out.append(f"{src}: names {named}, which is not among the "
                     f"runfiles of :{t['name']}")
  return out


def test_build_covers_the_tree():
  found = problems(ROOT)
  assert not found, ("BUILD is out of date with the tree:\n"
                     + "\n".join(found))


def test_glob_semantics():
  r = glob_regex("a/**/*.py")
  assert r.match("a/x.py") and r.match("a/b/c/x.py")
  assert not r.match("a/x.pyc") and not r.match("b/x.py")
  assert glob_regex("a/*.py").match("a/x.py")
  assert not glob_regex("a/*.py").match("a/b/x.py")
  assert glob_regex("a/**").match("a/b/c") and not glob_regex("a/**").match("a")
  assert glob_regex("**/__pycache__/**").match("a/__pycache__/x.pyc")


_SMALL_BUILD = """
load("@rules_python//python:defs.bzl", "py_binary", "py_library", "py_test")

py_library(name = "lib", srcs = ["qwen_jax/a.py"], data = ["qwen_jax/a.txt"])

py_binary(name = "tool", srcs = ["experiments/tool.py"],
          main = "experiments/tool.py", deps = [":lib"])

py_test(
    name = "test_a",
    srcs = ["tests/test_a.py", "tests/run_pytest.py"],
    args = ["$(location tests/test_a.py)"],
    main = "tests/run_pytest.py",
    deps = [":lib", "@pypi//jax"],
)
"""


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


def test_reports_what_an_explicit_build_misses(tmp_path):
  _write(tmp_path, {
      "BUILD": _SMALL_BUILD,
      "qwen_jax/a.py": "",
      "qwen_jax/a.txt": "",
      "experiments/tool.py": 'if __name__ == "__main__":\n  pass\n',
      "tests/run_pytest.py": "",
      "tests/test_a.py": "import qwen_jax.a\n",
  })
  assert problems(tmp_path) == []
  _write(tmp_path, {
      "qwen_jax/b.py": "",
      "qwen_jax/vocab.json": "{}",
      "tests/test_b.py": "",
      "experiments/script.py": 'if __name__ == "__main__":\n  pass\n',
      "experiments/tool.py": "",
      "colab/nb.py": "",
      "tests/test_a.py": ('"""Runs colab/nb.py."""\n'
                          "from tests.test_b import helper\n"
                          'CONFIG = "--config=experiments/script.py:x"\n'
                          'SCRIPT = ["-m", "experiments.script"]\n'),
  })
  (tmp_path / "BUILD").write_text(
      _SMALL_BUILD + 'py_library(name = "x", srcs = ["qwen_jax/gone.py"])\n')
  assert sorted(problems(tmp_path)) == sorted([
      "colab/nb.py: in no target's srcs or data",
      "experiments/script.py: in no target's srcs or data",
      "experiments/script.py: a script (a __main__ block) with no py_binary",
      "experiments/tool.py: the main of a py_binary, but no __main__ block "
      "(a shared module: leave it out of the binaries)",
      "qwen_jax/b.py: in no target's srcs or data",
      "qwen_jax/vocab.json: in no target's srcs or data",
      "qwen_jax/gone.py: named in BUILD but not in the tree",
      "tests/test_b.py: no py_test runs it",
      "tests/test_b.py: in no target's srcs or data",
      "tests/test_a.py: names experiments/script.py, which is not among the "
      "runfiles of :test_a",
      "tests/test_a.py: names tests/test_b.py, which is not among the "
      "runfiles of :test_a",
  ])


def test_the_build_globs_take_in_new_files(tmp_path):
  """The real BUILD over a copy of the tree (file names only, empty files,
  BUILD and the scripts as they are): new modules, data files, tests and
  scripts need no edit; a new shared module beside the scripts does."""
  build = Build(ROOT)
  mains = {t["main"] for t in build.targets.values() if "main" in t}
  for f in build.files:
    (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
    if f == "BUILD" or f in mains:
      shutil.copyfile(ROOT / f, tmp_path / f)
    else:
      (tmp_path / f).touch()
  assert problems(tmp_path) == []
  _write(tmp_path, {
      "qwen_jax/chat.py": "",
      "qwen_jax/templates/chat.jinja": "",
      "pallas_kernels/gated_delta_rule/new_kernel.py": "",
      "experiments/configs/vision.py": "",
      "colab/vision.py": "",
      "colab/vision.ipynb": "",
      "tests/test_new_feature.py": "",
      "tests/new_helper.py": "",
      "tests/data/tiny.json": "",
      "experiments/new_script.py": 'if __name__ == "__main__":\n  pass\n',
      "pallas_kernels/tools/new_tool.py": (
          'if __name__ == "__main__":\n  pass\n'),
  })
  assert problems(tmp_path) == []
  _write(tmp_path, {"experiments/new_shared_code.py": ""})
  assert problems(tmp_path) == [
      "experiments/new_shared_code.py: the main of a py_binary, but no "
      "__main__ block (a shared module: leave it out of the binaries)"]
