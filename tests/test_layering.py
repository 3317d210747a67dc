"""The direction of imports (docs: DESIGN "The storage contract"): only storage/ imports a
database driver; channels never reach storage; bot/ defines the contract and only its
wiring modules (the server and the CLI) name a concrete store. Read from the source with
`ast`, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVERS = {"sqlite3", "sqlite_utils", "psycopg", "psycopg_pool", "psycopg2", "asyncpg"}
WIRING = {"bot/server.py", "bot/cli.py", "bot/cli_data.py"}  # they wire concrete stores in


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in the file, at any depth."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def test_only_storage_imports_a_database_driver() -> None:
    wrong = [f"{p.relative_to(ROOT)}:{line}: imports {mod}"
             for p in sources("bot", "channels") for line, mod in imports(p) if mod in DRIVERS]
    assert wrong == []


def test_imports_point_one_way() -> None:
    wrong = []
    for p in sources("bot", "channels"):
        name = str(p.relative_to(ROOT))
        for line, mod in imports(p):
            if mod == "storage" and name not in WIRING:
                wrong.append(f"{name}:{line}: imports storage (only {sorted(WIRING)} may)")
    for p in sources("storage"):  # a store knows bot's types, never a channel
        for line, mod in imports(p):
            if mod == "channels":
                wrong.append(f"{p.relative_to(ROOT)}:{line}: imports channels")
    assert wrong == []


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    import sqlite3\n    from psycopg import sql\n")
    assert imports(probe) == [(2, "sqlite3"), (3, "psycopg")]
