from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_twilio import AUTH_TOKEN
from tests.postgres import empty, pg_database, pg_scratch, pg_summary, pg_tests
from tests.prereq import fail_in_ci
from tests.reliability.common import Server
from tests.seed import RUN_SEED

__all__ = ["pg_database", "pg_scratch"]  # fixtures defined with the PostgreSQL helpers


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the long reliability forms")


@pytest.hookimpl(tryfirst=True)  # before hypothesis's plugin reads its option
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = RUN_SEED


def pytest_report_header(config: pytest.Config) -> str:
    return f"random generation seed: {config.getoption('hypothesis_seed')} (tests/seed.py)"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    seed = config.getoption("hypothesis_seed")
    terminalreporter.write_line(f"random generation seed: {seed}; replay: FLOWBOT_TEST_SEED={seed}")
    pg_summary(terminalreporter)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    pg_tests(config, items)  # which tests are the PostgreSQL half (tests/postgres.py)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[
        None, pytest.TestReport, pytest.TestReport]:
    """Under CI a test skipped for a missing prerequisite fails (tests/prereq.py)."""
    report = yield
    fail_in_ci(report)
    return report


@pytest.fixture(params=["thread", "process"])
def both_workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Use in a module (`pytestmark = pytest.mark.usefixtures("both_workers")`) to run each
    of its tests with the database worker as a thread and as a process of its own."""
    monkeypatch.setenv("FLOWBOT_TEST_WORKER", request.param)
    return str(request.param)


@pytest.fixture
def twilio_auth_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake Twilio account's Auth Token, where the config says to find it."""
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """`serve(home, **kw)` makes a `flowbot serve` process (tests/reliability/common.Server);
    every one made is stopped when the test ends, however it ends: none outlives its test."""
    made: list[Server] = []

    def make(home: Path, **kw: Any) -> Server:
        made.append(Server(home, **kw))
        return made[-1]

    try:
        yield make
    finally:
        for server in made:
            server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def both_backends(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Use in a module (`pytestmark = pytest.mark.usefixtures("both_backends")`) to run each
    of its tests on SQLite and on PostgreSQL (an emptied database of this run's own):
    `tests.support.write_config` reads FLOWBOT_TEST_STORAGE."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database")
        empty(url)
        monkeypatch.setenv("FLOWBOT_TEST_STORAGE", url)
    else:
        monkeypatch.delenv("FLOWBOT_TEST_STORAGE", raising=False)
    return str(request.param)
