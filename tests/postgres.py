"""The PostgreSQL half of the conformance suite: a database of its own per test run
(created at the first use, dropped at the end), emptied before each test that uses it.

From FLOWBOT_TEST_POSTGRES_URL (default: the local server's `postgres` database, trust
auth). With no server reachable the PostgreSQL tests skip with the reason, except under
CI (`CI=true`), where they fail (tests/prereq.py): CI must run both halves.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.prereq import require

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES = ("conversations", "waits", "outbox", "events", "early_statuses", "early_webhooks",
          "settings", "chat_aliases")


def admin_url() -> str:
    return os.environ.get("FLOWBOT_TEST_POSTGRES_URL", DEFAULT_URL)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def unreachable(why: str) -> None:
    """Skip locally; fail under CI, where the PostgreSQL half must run (tests/prereq.py)."""
    require(False, f"PostgreSQL at {admin_url().rsplit('@', 1)[-1]} ({why})",
            "start it (pg_ctlcluster 15 main start) or set FLOWBOT_TEST_POSTGRES_URL")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a fresh database for this run."""
    url = admin_url()
    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        unreachable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
    name = f"flowbot_test_{os.getpid()}_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_scratch(pg_database: str) -> Iterator[str]:
    """The URL of a database of this test's own with no tables at all (a fresh install, or
    a server's first start), dropped at the end; `pg_database` decides skip or fail."""
    url = admin_url()
    name = f"flowbot_scratch_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def empty(url: str) -> None:
    """Delete every row (the schema stays: migrations ran once for the run)."""
    with psycopg.connect(url, autocommit=True) as conn:
        have = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        tables = [t for t in TABLES if t in have]
        if tables:
            conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")


# -- the PostgreSQL half, counted in the summary (so CI's output shows it ran) -------------

_PG_TESTS: set[str] = set()


def pg_tests(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Notes the PostgreSQL half (for `pg_summary`); leaves out PostgreSQL with the process worker where a
    module asks for both parametrizations (the crash test covers that pair through a real
    `flowbot serve`, and it would add a process start per test)."""
    dropped = [item for item in items
               if getattr(item, "callspec", None) is not None
               and item.callspec.params.get("both_workers") == "process"  # type: ignore[attr-defined]
               and item.callspec.params.get("both_backends") == "postgresql"]  # type: ignore[attr-defined]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "pg_database" in names or "pg_url" in names or "postgresql" in item.nodeid:
            _PG_TESTS.add(item.nodeid)


def pg_summary(terminalreporter: Any) -> None:
    outcomes: dict[str, int] = {}
    for key in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(key, []):
            if getattr(report, "nodeid", "") in _PG_TESTS and (
                    report.when == "call" or report.outcome != "passed"):
                outcomes[key] = outcomes.get(key, 0) + 1
    if _PG_TESTS:
        shown = ", ".join(f"{n} {k}" for k, n in outcomes.items()) or "none run"
        terminalreporter.write_line(
            f"PostgreSQL half ({admin_url().rsplit('@', 1)[-1]}): {shown}")


def queued(worker: Any, jobs: list[tuple[Any, tuple[Any, ...]]]) -> list[asyncio.Future[Any]]:
    """`jobs` ((fn, args) each) submitted to a `storage.pg_worker.PgWorker` before its one
    thread starts, so that it takes them as one batch; their answers' futures."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Any]] = []
    for fn, args in jobs:
        fut: asyncio.Future[Any] = loop.create_future()
        worker.submit(fn, args, (fut, loop))
        futures.append(fut)
    return futures
