"""Prerequisites from outside Python (a browser, graphviz's `dot`, a database server).

A test that lacks one is SKIPPED on a developer's machine, with the reason shown (`-ra`),
and FAILS under CI (`CI=true`, as `.ci/run` sets it), where a skip would turn an untested
feature into a green run. Use `require(...)` inside a test or fixture, or
`requires(...)` as a mark; either way the skip's reason starts with `MISSING`, and the
`pytest_runtest_makereport` hook in tests/conftest.py turns such skips into failures under CI.

    def test_postgres_store(dsn):
        require(can_connect(dsn), f"PostgreSQL at {dsn}", "start it: pg_ctlcluster 15 main start")
"""

from __future__ import annotations

import os

import pytest

MISSING = "prerequisite missing:"


def in_ci() -> bool:
    """True when the run is CI's (`CI` set to true/1/yes, as `.ci/run` and CI services do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def reason(what: str, how: str) -> str:
    """The skip reason for a missing `what`, with `how` to get it."""
    return f"{MISSING} {what} ({how})"


def require(available: object, what: str, how: str) -> None:
    """Skip the running test (fail it under CI) unless `available` is truthy."""
    if not available:
        pytest.skip(reason(what, how))


def requires(available: object, what: str, how: str) -> pytest.MarkDecorator:
    """The same as a mark: `pytestmark = requires(Path(x).exists(), ...)`."""
    return pytest.mark.skipif(not available, reason=reason(what, how))


def fail_in_ci(report: pytest.TestReport) -> None:
    """Turn `report`, a skip for a missing prerequisite, into a failure when `in_ci()`."""
    if not (report.skipped and in_ci() and isinstance(report.longrepr, tuple)):
        return
    message = str(report.longrepr[2])
    if MISSING in message:
        report.outcome = "failed"
        report.longrepr = f"{message.removeprefix('Skipped: ')} — CI=true, so this fails instead of skipping"
