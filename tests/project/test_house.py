"""House rules of the package's structure, by the same rules as ``../shared/tools/house_metrics.py``.

- Production code (``hybridkv/**`` except ``hybridkv/testing``) reads another
  module's underscore names at most ``MAX_PRIVATE_READS`` times. A read is an
  attribute ``x._name`` (not dunder) whose base is not ``self`` / ``cls`` /
  ``super()`` nor one of the modules ``os sys np torch msgspec ctypes``, and whose
  name the reading module does not define itself (``def _x``, ``class _X``,
  ``self._x = ...`` or ``obj._x = ...``, ``_x: T = ...``).
- Every production module has at most ``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hybridkv"
MAX_PRIVATE_READS = 5
MAX_LINES = 400
#: bases whose underscore attributes are not another hybridkv module's private state
EXEMPT_NAMES = ("self", "cls", "super")
EXEMPT_MODULES = ("os", "sys", "np", "torch", "msgspec", "ctypes")


def production_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if "testing" not in p.relative_to(PACKAGE).parts)


def defined_private_names(tree: ast.AST) -> set[str]:
    """Underscore names a module defines: functions, classes, stored attributes, annotated names."""
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and n.name.startswith("_"):
            names.add(n.name)
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and n.attr.startswith("_"):
            names.add(n.attr)
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) \
                and n.target.id.startswith("_"):
            names.add(n.target.id)
    return names


def private_reads(path: Path, root: Path = ROOT) -> list[str]:
    """``path:line:name`` (relative to ``root``) of each read of another module's
    underscore name in ``path``."""
    tree = ast.parse(path.read_text())
    own = defined_private_names(tree)
    out = []
    for n in ast.walk(tree):
        if not (isinstance(n, ast.Attribute) and n.attr.startswith("_")
                and not n.attr.startswith("__")):
            continue
        base = n.value
        if isinstance(base, ast.Name) and base.id in EXEMPT_NAMES + EXEMPT_MODULES:
            continue
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) \
                and base.func.id == "super":
            continue
        if n.attr in own:
            continue  # the module reads its own private state
        out.append(f"{path.relative_to(root)}:{n.lineno}:{n.attr}")
    return out


def test_the_rule_counts_what_it_should(tmp_path):
    """Reads of foreign underscore names count; self, exempt modules and own names do not."""
    src = tmp_path / "m.py"
    src.write_text(
        "import os\n"
        "class A:\n"
        "    def __init__(self, other):\n"
        "        self._mine = 1\n"
        "        other._set = 2\n"
        "    def f(self, index):\n"
        "        return (self._mine, index._slot, index._set, os._exit, super()._x,\n"
        "                index.__dict__, index._mine, _helper(), index._flags)\n"
        "def _helper():\n"
        "    return 0\n")
    assert private_reads(src, tmp_path) == ["m.py:7:_slot", "m.py:8:_flags"]


def test_production_code_reads_few_private_names():
    reads = [r for p in production_modules() for r in private_reads(p)]
    assert len(reads) <= MAX_PRIVATE_READS, (
        f"{len(reads)} reads of another module's underscore names (at most "
        f"{MAX_PRIVATE_READS}):\n" + "\n".join(reads))


def test_production_modules_are_at_most_400_lines():
    sizes = {str(p.relative_to(ROOT)): sum(1 for _ in p.open()) for p in production_modules()}
    big = {name: n for name, n in sorted(sizes.items(), key=lambda kv: -kv[1]) if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{name} ({n})" for name, n in big.items())
