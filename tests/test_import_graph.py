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


IO_LIBRARIES = frozenset(
    {
        "asyncio",
        "aiohttp",
        "msal",
        "tenacity",
        "requests",
        "ssl",
        "socket",
        "sqlite3",
        "hdrh",
        "locust",
        "gevent",
    }
)
"""What the sans-IO core must never import, directly or through another anonjoin module."""


def _module_file(name: str) -> Path | None:
    """The source file of an ``anonjoin`` module (``anonjoin._x`` or ``anonjoin._pkg.x``), if it is one."""
    parts = name.split(".")
    if parts[0] != "anonjoin":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _closure(start: set[str]) -> dict[str, set[str]]:
    """Every anonjoin module reachable from ``start`` by static imports, and what each imports. The package
    root is not followed: it imports its public names lazily (tests/test_startup.py checks that)."""
    seen: dict[str, set[str]] = {}
    todo = list(start)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = names = _imports(path)
        todo.extend(n for n in names if n.startswith("anonjoin."))
    return seen


def test_the_core_imports_no_io_library() -> None:
    core = {f"anonjoin._core.{p.stem}" for p in (PACKAGE / "_core").glob("*.py") if p.stem != "__init__"}
    assert {"anonjoin._core.conversation", "anonjoin._core.policy"} <= core
    graph = _closure(core | {"anonjoin._core"})
    bad = {
        (mod, name) for mod, names in graph.items() for name in names if name.split(".")[0] in IO_LIBRARIES
    }
    assert not bad, sorted(bad)
    # nor any driver, the load runner or the CLI
    drivers = {
        "anonjoin._guest",
        "anonjoin._http",
        "anonjoin._retry",
        "anonjoin._service",
        "anonjoin._runner",
    }
    assert not drivers & set(graph), sorted(drivers & set(graph))


def test_the_core_checker_sees_an_io_import_through_another_module() -> None:
    assert "asyncio" in _imports(PACKAGE / "_retry.py")
    assert "anonjoin._retry" in _closure({"anonjoin._guest"})  # the driver reaches the step runner
