"""Which modules may import which: checked on the source (ast), so an arrow against the layers fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import anonjoin
from anonjoin._core.constants import ERROR_CODES
from anonjoin.simulator._wire import CODES

PACKAGE = Path(anonjoin.__file__).parent

SHARED = {"anonjoin._exceptions", "anonjoin._version"}
"""Modules every layer may use: the exception tree and the version (no I/O, no client logic)."""


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, by absolute name (``from anonjoin import _x`` counts as anonjoin._x, and
    ``from anonjoin._pkg import x`` as anonjoin._pkg.x: a name that is not a module is harmless here)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from anonjoin._core import constants`` imports the module anonjoin._core.constants
            found.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if alias.name.startswith("_") or node.module.startswith("anonjoin")
            )
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
        if name.startswith("anonjoin.")
        and not name.startswith("anonjoin.simulator")
        and not any(name == ok or name.startswith(ok + ".") for ok in SHARED)
    }
    assert not bad, sorted(bad)


def test_no_module_imports_through_dunder_import() -> None:
    assert not [path for path, names in _modules().items() if "__import__" in names]


def test_the_simulator_and_the_client_agree_on_error_codes() -> None:
    assert dict(CODES) == dict(ERROR_CODES)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from anonjoin._core import constants as C\nimport anonjoin._async.guest\n", encoding="utf-8"
    )
    assert {"anonjoin._core.constants", "anonjoin._async.guest"} <= _imports(probe)


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
    root is not followed: it imports its public names lazily (tests/e2e/test_startup.py checks that)."""
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
        "anonjoin._async.guest",
        "anonjoin._async.http",
        "anonjoin._async.retry",
        "anonjoin._async.service",
        "anonjoin._load.runner",
    }
    assert not drivers & set(graph), sorted(drivers & set(graph))


def test_the_core_checker_sees_an_io_import_through_another_module() -> None:
    assert "asyncio" in _imports(PACKAGE / "_async" / "retry.py")
    assert "anonjoin._async.retry" in _closure(
        {"anonjoin._async.guest"}
    )  # the driver reaches the step runner


LAYERS = ("_core", "_async", "_load", "_cli")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "_core": ("anonjoin._async", "anonjoin._load", "anonjoin._cli", "anonjoin.simulator", "anonjoin.locust"),
    "_async": ("anonjoin._load", "anonjoin._cli", "anonjoin.simulator", "anonjoin.locust"),
    "_load": ("anonjoin._cli", "anonjoin.simulator._", "anonjoin.locust"),
}
"""The arrows that must never exist: the core does no I/O and knows no driver; the client's I/O layer knows
no load runner, CLI or simulator; the load layer knows no CLI and only the simulator's public names."""


def _layer_violations() -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    for layer, forbidden in FORBIDDEN.items():
        for path, names in _modules(layer).items():
            bad.extend((path, name) for name in sorted(names) if name.startswith(forbidden))
    return bad


def test_every_layer_is_a_package_and_no_private_module_is_left_flat() -> None:
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").is_file(), layer
    flat = sorted(p.name for p in PACKAGE.glob("_*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert flat == ["_exceptions.py", "_version.py"], flat  # shared by every layer and the simulator


def test_no_import_goes_against_the_layers() -> None:
    assert not _layer_violations(), _layer_violations()


def test_nothing_outside_the_simulator_imports_its_internals() -> None:
    bad = {
        (path, name)
        for path, names in _modules().items()
        if not path.startswith("anonjoin/simulator/")
        for name in names
        if name.startswith("anonjoin.simulator._")
    }
    assert not bad, sorted(bad)


def test_the_layer_checker_sees_an_arrow_against_the_layers(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from anonjoin._cli.common import OneLineParser\n", encoding="utf-8")
    assert any(name.startswith(FORBIDDEN["_async"]) for name in _imports(probe))
