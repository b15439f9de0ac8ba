"""The package's floors: every import of a package module runs down (or across, without a circle), so a reader
meets what a module uses before the module itself; only the top floors use a trainer."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "scalingnote_jax"
# Bottom to top. A module may import its own floor's modules (without a circle) and lower floors'.
FLOORS = [
    {"__init__", "config", "sharding", "distributed"},
    {"models"},
    {"artifacts"},  # the formats of what runs leave on disk and the code that reads them
    {"data"},
    {"encoder"},
    {"index"},
    {"serve"},
    {"eval"},
    {"train"},
    {"scaling", "pipeline", "aot"},
    {"cli"},
]
# Where a function-local import of a package module is allowed, and why: commands import what they use when
# they run, so `scalingnote --help` starts without loading JAX and distributed.initialize() precedes JAX work.
LOCAL_IMPORTS_ALLOWED = {"scalingnote_jax.cli"}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(name: str) -> int:
  top = name.split(".")[1] if "." in name else "__init__"
  return next(i for i, floor in enumerate(FLOORS) if top in floor)


def package_imports(tree: ast.AST, modules: set[str]):
  """(imported module, line, whether inside a function) of every import of a package module."""
  def targets(node):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "scalingnote_jax":
      for alias in node.names:  # `from pkg import module` imports the module
        full = f"{node.module}.{alias.name}"
        yield full if full in modules else node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.split(".")[0] == "scalingnote_jax")

  local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
           for n in ast.walk(f)}
  for node in ast.walk(tree):
    for target in targets(node):
      yield target, node.lineno, id(node) in local


def import_graph():
  files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph, problems = {}, []
  for name, path in files.items():
    graph[name] = set()
    for target, line, local in package_imports(ast.parse(path.read_text()), set(files)):
      where = f"{path.relative_to(PACKAGE.parent)}:{line}"
      if target not in files:
        problems.append(f"{where}: imports {target}, which is not a module of the package")
        continue
      if target != name and not (name.startswith(target + ".") or target == "scalingnote_jax"):
        graph[name].add(target)  # (a package's own __init__ is imported with any of its modules)
      if floor_of(target) > floor_of(name):
        problems.append(f"{where}: {name} imports {target} from a floor above it")
      if local and name not in LOCAL_IMPORTS_ALLOWED:
        problems.append(f"{where}: a function-local import of {target}")
  return graph, problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_every_import_runs_down_the_floors_without_a_circle():
  graph, problems = import_graph()
  assert len(graph) > 40  # the walk found the package
  assert not problems, "\n".join(problems)
  assert not cycles(graph), cycles(graph)


def test_only_the_top_floors_use_a_trainer():
  graph, _ = import_graph()
  users = {name for name, targets in graph.items() if not name.startswith("scalingnote_jax.train")
           and any(t.startswith("scalingnote_jax.train") for t in targets)}
  assert users <= {"scalingnote_jax.cli", "scalingnote_jax.pipeline", "scalingnote_jax.aot",
                   "scalingnote_jax.scaling.sweep"}, users


@pytest.mark.parametrize("source, problem", [
    ("def f():\n  from scalingnote_jax.train import stage1\n", "from a floor above it"),
    ("import scalingnote_jax.serve.bundle\n", "from a floor above it"),
    ("def f():\n  from scalingnote_jax.models import llm\n", "function-local import"),
])
def test_the_check_sees_an_upward_or_local_import(tmp_path, monkeypatch, source, problem):
  """The same walk over a package with one bad module added (here: in index/) reports it."""
  bad = PACKAGE / "index" / "_bad_import_probe.py"
  real_rglob = pathlib.Path.rglob
  monkeypatch.setattr(pathlib.Path, "rglob", lambda self, pattern: [*real_rglob(self, pattern), bad]
                      if self == PACKAGE else real_rglob(self, pattern))
  real_read = pathlib.Path.read_text
  monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: source if self == bad else real_read(self, *a, **k))
  _, problems = import_graph()
  assert any("_bad_import_probe" in p and problem in p for p in problems), problems


def test_a_circle_is_found():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
