"""The qwen_jax modules import each other without a cycle.

Each module's source is parsed with `ast` (nothing is imported), and every
import statement in it counts, the ones inside functions included: a lazy
import is still a dependency. Imports of qwen_jax modules become edges of a
graph, which must be acyclic. The same code must find a cycle planted in a
package written to a temporary folder (a top-level import one way, a
function-level import back) and one planted in the real graph.

Pure parsing: the whole file runs in well under a second.
"""

from __future__ import annotations

import ast
import os
import textwrap

PACKAGE = "qwen_jax"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package_dir: str, package: str) -> dict[str, str]:
  """{dotted module name: path} of the package's .py files (the package's
  own `__init__.py` is the package name)."""
  out = {}
  for dirpath, _, files in os.walk(package_dir):
    rel = os.path.relpath(dirpath, package_dir)
    prefix = package if rel == "." else (
        package + "." + rel.replace(os.sep, "."))
    for name in files:
      if name.endswith(".py"):
        stem = name[:-3]
        module = prefix if stem == "__init__" else f"{prefix}.{stem}"
        out[module] = os.path.join(dirpath, name)
  return out


def _imported(source: str, module: str, is_package: bool,
              known: set[str]) -> set[str]:
  """The modules of `known` that `source` (module `module`) imports,
  anywhere in the file."""
  out = set()

  def add(name: str) -> None:
    # The longest known module that `name` is or lies inside.
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
      candidate = ".".join(parts[:n])
      if candidate in known:
        out.add(candidate)
        return

  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the module's own package upwards
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        base = ".".join(base + ([node.module] if node.module else []))
      else:
        base = node.module or ""
      for alias in node.names:
        # `from pkg import mod` imports the module pkg.mod; `from mod import
        # name` imports mod.
        add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known
            else base)
  out.discard(module)
  return out


def import_graph(package_dir: str, package: str,
                 sources: dict[str, str] | None = None
                 ) -> dict[str, set[str]]:
  """{module: the package's modules it imports}; `sources` replaces the
  text of some modules (by dotted name)."""
  modules = _modules(package_dir, package)
  known = set(modules)
  graph = {}
  for module, path in modules.items():
    if sources and module in sources:
      source = sources[module]
    else:
      with open(path, encoding="utf-8") as f:
        source = f.read()
    graph[module] = _imported(source, module,
                              path.endswith("__init__.py"), known)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle [a, b, ..., a] of the graph, or None (depth-first search)."""
  state = {}  # absent: not seen; 1: on the current path; 2: done
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_qwen_jax_has_no_import_cycle():
  graph = import_graph(os.path.join(ROOT, PACKAGE), PACKAGE)
  # The graph is the real one: the model and its parts are in it.
  assert {"qwen_jax.cache", "qwen_jax.attention"} <= graph["qwen_jax.model"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_planted_cycle_is_found(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text(textwrap.dedent("""\
      import os


      def f():
        from pkg.c import g  # lazy, still an edge
        return g
      """))
  (pkg / "c.py").write_text("from . import a\nfrom os import path\n")
  graph = import_graph(str(pkg), "pkg")
  assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"},
                   "pkg.c": {"pkg.a"}}
  assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
  # Without the function-level import the package is acyclic.
  (pkg / "b.py").write_text("import os\n")
  assert find_cycle(import_graph(str(pkg), "pkg")) is None


def test_a_lazy_import_planted_in_qwen_jax_is_found():
  path = os.path.join(ROOT, PACKAGE, "config.py")
  with open(path, encoding="utf-8") as f:
    source = f.read()
  # config.py is imported by model.py; a lazy import back closes a cycle.
  planted = source + textwrap.dedent("""

      def _planted():
        from qwen_jax import model  # pylint: disable=g-import-not-at-top
        return model
      """)
  graph = import_graph(os.path.join(ROOT, PACKAGE), PACKAGE,
                       {"qwen_jax.config": planted})
  cycle = find_cycle(graph)
  assert cycle is not None and "qwen_jax.config" in cycle, cycle
