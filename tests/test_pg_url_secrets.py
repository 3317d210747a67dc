"""A PostgreSQL URL's password never reaches a terminal, a log or monitoring: libpq quotes
the piece of a URL it cannot parse, and that piece can be the password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage.preflight import mask_secrets
from tests.test_startup import EXAMPLE, on_postgresql

SECRET = "Hunter2s3cret"
# URLs libpq refuses, each quoting (part of) the password in its error
BAD_URLS = [
    f"postgresql://bot:{SECRET} x@127.0.0.1:5432/flowbot",  # a space in the password
    f"postgresql://bot:{SECRET}%zz@127.0.0.1:5432/flowbot",  # a bad percent escape
    f"postgresql://bot@127.0.0.1:5432/flowbot?password={SECRET}%zz",
    f"postgresql://bot:{SECRET}@127.0.0.1:5432/flowbot?bogus=1",
]


def run(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "bot.toml"
    config.write_text(on_postgresql(EXAMPLE, "x").replace('url = "x"',
                                                          'url_env = "FLOWBOT_TEST_BAD_URL"'))
    argv = [a.replace("CONFIG", str(config)) for a in args]
    return subprocess.run([sys.executable, "-m", "bot.cli", *argv], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "FLOWBOT_TEST_BAD_URL": url})


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("command", [
    ("serve", "--config", "CONFIG", "--port", "1"),
    ("check", "--config", "CONFIG"),
    ("conversations", "--config", "CONFIG"),
    ("backup", "--config", "CONFIG", "out.dump"),
    ("migrate-storage", "--from", "sqlite:empty.db", "--to", "env:FLOWBOT_TEST_BAD_URL"),
])
def test_unparsable_url_is_reported_without_its_password(
        tmp_path: Path, url: str, command: tuple[str, ...]) -> None:
    (tmp_path / "empty.db").touch()
    proc = run(tmp_path, url, *command)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert SECRET not in out and SECRET.lower() not in out.lower(), out
    assert "is not a valid PostgreSQL URL" in proc.stderr, out
    assert not (tmp_path / "out.dump").exists()


def test_mask_secrets_forms() -> None:
    url = "postgresql://bot:p%40ss%20w@h/db?password=other&sslmode=require"
    text = "p%40ss%20w / p@ss w / other / sslmode"
    assert mask_secrets(text, url) == "*** / *** / *** / sslmode"
    assert mask_secrets("no secret here", "postgresql://bot@h/db") == "no secret here"


def test_the_log_redacts_the_url_password(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A warning or error that quotes it (a library's message, a traceback) shows
    [secret], as for the channels' tokens."""
    import logging

    from bot.cli import _secret_values
    from bot.config import load_config
    from bot.logs import Redact

    config = tmp_path / "bot.toml"
    config.write_text(on_postgresql(EXAMPLE, "x").replace('url = "x"',
                                                          'url_env = "FLOWBOT_TEST_URL"'))
    monkeypatch.setenv("FLOWBOT_TEST_URL", f"postgresql://bot:{SECRET}%21@127.0.0.1/db")
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s / %s", (
        f"{SECRET}%21", f"{SECRET}!"), None)
    Redact(_secret_values(load_config(config))).filter(record)
    assert record.getMessage() == "failed: [secret] / [secret]"


def test_a_migration_s_lock_on_the_sqlite_file_does_not_show_its_url_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock file names its holder's command line to a server started meanwhile; the
    command line of `migrate-storage --to postgresql://user:pass@…` holds a password."""
    from bot.errors import DatabaseInUse
    from storage.lock import WriterLock

    monkeypatch.setattr(sys, "argv", [
        "flowbot", "migrate-storage", "--from", "sqlite:flowbot.db",
        "--to", f"postgresql://bot:{SECRET}@x@127.0.0.1/db?sslmode=require&password={SECRET}"])
    db = tmp_path / "flowbot.db"
    held = WriterLock.acquire(db)
    try:
        with pytest.raises(DatabaseInUse) as refused:
            WriterLock.acquire(db, wait=0)
    finally:
        held.release()
    said = str(refused.value) + (tmp_path / "flowbot.db.lock").read_text()
    assert SECRET not in said and "@x@" not in said, said
    assert "postgresql://bot:***@127.0.0.1/db?sslmode=require&password=***" in said
