"""The package as a user installs it: every third-party module it imports is a declared dependency, and the
built wheel (configs included) installs outside the checkout and runs (tests/test_pipeline.py runs the demo's
smoke variant from it)."""

import ast
import importlib.metadata
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from helpers import ROOT

pytestmark = pytest.mark.floor  # also run on the oldest supported stack (make test-floor)


def imported_top_modules(package_dir: str) -> dict[str, tuple[str, bool]]:
  """Top-level names of the absolute imports in a package's files -> (one file importing each, whether every
  import of it sits inside a function: an optional dependency, imported only when its feature is used)."""
  found = {}
  for dirpath, _, files in os.walk(package_dir):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        tree = ast.parse(open(path).read(), path)
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
          elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
          else:
            continue
          for n in names:
            where, lazy = found.get(n.split(".")[0], (os.path.relpath(path, ROOT), True))
            found[n.split(".")[0]] = (where, lazy and id(node) in in_function)
  return found


def test_every_imported_module_is_a_declared_dependency():
  """Imported at module level: a dependency. Imported only inside functions (mteb for eval/mteb_adapter.py): a
  dependency or in an extra (`pip install .[interop]`), by its distribution or, when not installed, its name."""
  def names(requirements):
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}
  requires = importlib.metadata.requires("scalingnote-jax")
  declared = names(r for r in requires if "extra ==" not in r)
  optional = names(r for r in requires if "extra ==" in r)
  providers = importlib.metadata.packages_distributions()
  missing = {}
  for module, (where, lazy) in imported_top_modules(os.path.join(ROOT, "scalingnote_jax")).items():
    if module in sys.stdlib_module_names or module == "scalingnote_jax":
      continue
    allowed = declared | optional if lazy else declared
    dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
    if lazy and not dists and module.lower().replace("_", "-") in optional:
      continue  # an extra's module, not installed here
    assert dists, f"{where} imports {module!r}, which no installed distribution provides"
    if not dists & allowed:
      missing[module] = (where, sorted(dists))
  assert not missing, f"imported but not declared in pyproject.toml's dependencies: {missing}"


def test_wheel_installs_outside_the_checkout_with_its_configs(installed_wheel, tmp_path):
  python = os.path.join(installed_wheel, "bin", "python")
  where = subprocess.run([python, "-c", "import scalingnote_jax, scalingnote_jax.config as c; "
                          "print(scalingnote_jax.__file__); print(c.resolve_config_path('configs/demo.py'))"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
  assert all(p.startswith(installed_wheel) for p in where), where  # the wheel's files, not the checkout's
  out = subprocess.run([os.path.join(installed_wheel, "bin", "scalingnote"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True)
  assert out.returncode == 0 and "pipeline" in out.stdout, out.stderr
  # the wheel's declared requirements are all met (by the test environment's packages; pip check also lists
  # the weight packages, installed with --no-deps on purpose: only the wheel's own lines count)
  check = subprocess.run([sys.executable, "-m", "pip", "--python", python, "check"], capture_output=True, text=True)
  assert "scalingnote-jax" not in check.stdout.lower(), check.stdout


def test_a_config_name_that_is_not_a_path_finds_the_packaged_config(tmp_path):
  from scalingnote_jax.config import resolve_config_path

  os.chdir(tmp_path)  # no configs/ here
  want = os.path.join(ROOT, "configs", "demo.py")  # the editable install's packaged configs are the checkout's
  assert {resolve_config_path(n) for n in ("demo", "demo.py", "configs/demo.py")} == {want}
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "demo.py").write_text("def get_config(variant=''): ...\n")
  assert resolve_config_path("configs/demo.py") == "configs/demo.py"  # a file that exists wins
  with pytest.raises(FileNotFoundError, match=r"elsewhere/demo\.py: no such config file.*packaged: demo, "):
    resolve_config_path("elsewhere/demo.py")  # a path to another directory is not silently replaced
