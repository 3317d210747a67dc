from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_twilio import AUTH_TOKEN
from tests.prereq import fail_in_ci
from tests.reliability.common import Server
from tests.seed import RUN_SEED


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
