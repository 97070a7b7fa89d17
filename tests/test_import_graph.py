"""Which modules may import which: checked on the source (ast), so an arrow against the layers fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import anonjoin
from anonjoin._constants import ERROR_CODES
from anonjoin.simulator._wire import CODES

PACKAGE = Path(anonjoin.__file__).parent

SHARED = {"anonjoin._exceptions", "anonjoin._version"}
"""Modules every layer may use: the exception tree and the version (no I/O, no client logic)."""


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, by absolute name (``from anonjoin import _x`` counts as anonjoin._x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_"))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.add("__import__")
    return found


def _modules(sub: str = "") -> dict[str, set[str]]:
    root = PACKAGE / sub if sub else PACKAGE
    return {str(p.relative_to(PACKAGE.parent)): _imports(p) for p in sorted(root.rglob("*.py"))}


def test_the_simulator_imports_no_client_module() -> None:
    bad = {
        (path, name)
        for path, names in _modules("simulator").items()
        for name in names
        if name.startswith("anonjoin.") and not name.startswith("anonjoin.simulator") and name not in SHARED
    }
    assert not bad, sorted(bad)


def test_no_module_imports_through_dunder_import() -> None:
    assert not [path for path, names in _modules().items() if "__import__" in names]


def test_the_simulator_and_the_client_agree_on_error_codes() -> None:
    assert dict(CODES) == dict(ERROR_CODES)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from anonjoin import _constants as C\nimport anonjoin._guest\n", encoding="utf-8")
    assert {"anonjoin._constants", "anonjoin._guest"} <= _imports(probe)
