"""`flowbot serve` start-up failures: one or two lines saying what and what to do, exit 2
for configuration and 1 for environment, no traceback (unless --debug), no "serving" line,
and no database file left by a run that failed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bot import startup
from storage import preflight

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "config.example.toml").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(tmp_path: Path, text: str = EXAMPLE) -> Path:
    path = tmp_path / "bot.toml"
    path.write_text(text)
    return path


def serve(config: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`flowbot serve` expected to fail at start-up."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("TELEGRAM_", "TWILIO_", "SHOP_"))}
    return subprocess.run([sys.executable, "-m", "bot.cli", "serve", "--config", str(config),
                           *args], capture_output=True, text=True, cwd=config.parent,
                          env={**base, **(env or {})}, timeout=timeout)


def assert_clean(proc: subprocess.CompletedProcess[str], code: int, line: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.splitlines() == [line]
    assert proc.stdout == ""  # no "serving" line
    assert "Traceback" not in proc.stderr


def test_port_in_use(tmp_path: Path) -> None:
    config = write(tmp_path)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = serve(config, "--port", str(port))
    assert_clean(proc, 1, f"flowbot: port {port} on 127.0.0.1 is in use — stop the other "
                          "process or pass --port (or set server.port)")
    assert not (tmp_path / "flowbot.db").exists()


def test_host_that_is_not_ours(tmp_path: Path) -> None:
    proc = serve(write(tmp_path), "--host", "192.0.2.1", "--port", str(free_port()))
    assert_clean(proc, 1, "flowbot: 192.0.2.1 is not an address of this machine — set "
                          "server.host to one (127.0.0.1, or 0.0.0.0 for every interface)")
    assert not (tmp_path / "flowbot.db").exists()


def test_missing_secret_is_configuration(tmp_path: Path) -> None:
    text = EXAMPLE.replace('[channels.telegram]', '[channels.telegram]\nenabled = true', 1)
    text = text.replace('enabled = false\ntoken_env', 'token_env')
    proc = serve(write(tmp_path, text), "--port", str(free_port()),
                 env={"TELEGRAM_WEBHOOK_SECRET": "s3cret"})
    assert_clean(proc, 2, "flowbot: the environment variable TELEGRAM_BOT_TOKEN (named by "
                          "channels.telegram.token_env) is empty — export "
                          "TELEGRAM_BOT_TOKEN=… before starting flowbot")
    assert not (tmp_path / "flowbot.db").exists()


def test_missing_webhook_block_secret(tmp_path: Path) -> None:
    text = EXAMPLE.replace("timeout = 300\n", 'timeout = 300\nsecret_env = "SHOP_SECRET"\n')
    proc = serve(write(tmp_path, text), "--port", str(free_port()))
    assert_clean(proc, 2, "flowbot: the environment variable SHOP_SECRET (named by "
                          "flows.main.blocks.webhook_intro.secret_env) is empty — export "
                          "SHOP_SECRET=… before starting flowbot")


def test_corrupt_database(tmp_path: Path) -> None:
    config = write(tmp_path)
    db = tmp_path / "flowbot.db"
    db.write_bytes(b"this is not SQLite\n" * 400)
    proc = serve(config, "--port", str(free_port()))
    assert_clean(proc, 1, f"flowbot: the database {db} is unreadable (file is not a database) "
                          "— restore it from a backup or move it away to start with an empty "
                          "one")
    assert db.read_bytes() == b"this is not SQLite\n" * 400  # untouched
    assert not (tmp_path / "flowbot.db-wal").exists()


def test_database_directory_missing(tmp_path: Path) -> None:
    config = write(tmp_path, EXAMPLE.replace('path = "flowbot.db"', 'path = "data/flowbot.db"'))
    proc = serve(config, "--port", str(free_port()))
    assert_clean(proc, 1, f"flowbot: the database directory {tmp_path / 'data'} does not exist "
                          "— create it, or change storage.path")
    assert not (tmp_path / "data").exists()


def test_database_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "flowbot.db").mkdir()
    proc = serve(write(tmp_path), "--port", str(free_port()))
    # the environment's fault, as a missing or unwritable folder: exit 1 (docs/operations.md)
    assert_clean(proc, 1, f"flowbot: the database {tmp_path / 'flowbot.db'} is a directory — "
                          f"storage.path must name a file (e.g. "
                          f"{tmp_path / 'flowbot.db' / 'flowbot.db'}), or remove that directory")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "flowbot.db").write_bytes(b"garbage" * 100)
    proc = serve(write(tmp_path), "--port", str(free_port()), "--debug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("flowbot: the database ")


def test_config_errors_still_exit_2_before_anything(tmp_path: Path) -> None:
    proc = serve(write(tmp_path, EXAMPLE.replace('start = "hello"', 'start = "helo"')))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{tmp_path / 'bot.toml'}: 1 error:",
        "  error: flows.main.start: no block named 'helo' (did you mean 'hello'?)"]
    assert not (tmp_path / "flowbot.db").exists()


# Root passes every permission check, so the permission cases are checked in-process with
# os.access answering as it would for an ordinary user.

def test_read_only_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "flowbot.db"
    db.write_bytes(b"")
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != db)
    with pytest.raises(startup.StartupError) as info:
        preflight.check_database(db)
    assert info.value.exit_code == 1
    assert str(info.value).startswith(f"cannot open the database {db} for writing: permission "
                                      "denied — make it readable and writable by this user (")


def test_unwritable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path)
    with pytest.raises(startup.StartupError) as info:
        preflight.check_database(tmp_path / "flowbot.db")
    assert str(info.value) == (f"cannot create the database {tmp_path / 'flowbot.db'}: no "
                               f"permission to write in {tmp_path} — fix its permissions or "
                               "change storage.path")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may listen on any port")
def test_privileged_port(tmp_path: Path) -> None:
    proc = serve(write(tmp_path), "--port", "81")
    assert_clean(proc, 1, "flowbot: no permission to listen on port 81 — ports below 1024 "
                          "need root; use a higher port behind a reverse proxy (see "
                          "docs/deploy.md)")


def test_serving_is_printed_once_the_server_answers(tmp_path: Path) -> None:
    """The "serving" line comes after the database opened and the port is bound."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--config",
                             str(write(tmp_path)), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == (f"flowbot: serving {tmp_path / 'bot.toml'} — open "
                        f"http://127.0.0.1:{port}/ to chat\n")
        assert (tmp_path / "flowbot.db").exists()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert b'{"status": "ok"}' in conn.recv(4096)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


# -- PostgreSQL: a failed start leaves no tables and no session ----------------------------

def on_postgresql(text: str, url: str) -> str:
    """The example config with its data in PostgreSQL at `url`."""
    head, _, rest = text.partition("[storage]\n")
    rest = "\n".join(x for x in rest.split("\n")
                     if not x.startswith(("path =", "path=")))
    return f'{head}[storage]\nurl = "{url}"\n{rest}'


def untouched(url: str) -> None:
    """No table created, and no session of a flowbot left on the database."""
    import psycopg

    with psycopg.connect(url) as conn:
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = "
                              "current_schema()").fetchall()
        sessions = conn.execute("SELECT application_name FROM pg_stat_activity WHERE "
                                "datname = current_database() AND pid != pg_backend_pid()"
                                ).fetchall()
    assert tables == [] and sessions == []


def test_postgresql_port_in_use_leaves_nothing(tmp_path: Path, pg_scratch: str) -> None:
    config = write(tmp_path, on_postgresql(EXAMPLE, pg_scratch))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = serve(config, "--port", str(port))
    assert_clean(proc, 1, f"flowbot: port {port} on 127.0.0.1 is in use — stop the other "
                          "process or pass --port (or set server.port)")
    untouched(pg_scratch)
    assert not (tmp_path / "flowbot.db").exists()


def test_postgresql_missing_secret_leaves_nothing(tmp_path: Path, pg_scratch: str) -> None:
    text = EXAMPLE.replace('[channels.telegram]', '[channels.telegram]\nenabled = true', 1)
    text = text.replace('enabled = false\ntoken_env', 'token_env')
    proc = serve(write(tmp_path, on_postgresql(text, pg_scratch)), "--port", str(free_port()),
                 env={"TELEGRAM_WEBHOOK_SECRET": "s3cret"})
    assert proc.returncode == 2 and "TELEGRAM_BOT_TOKEN" in proc.stderr, proc.stderr
    untouched(pg_scratch)


def test_postgresql_unreachable_is_one_line(tmp_path: Path) -> None:
    proc = serve(write(tmp_path, on_postgresql(EXAMPLE, "postgresql://x@127.0.0.1:1/none")),
                 "--port", str(free_port()))
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("flowbot: cannot reach the PostgreSQL database none on "
                           "127.0.0.1:1: "), line
    assert proc.stdout == ""


def test_postgresql_url_env_unset_is_configuration(tmp_path: Path) -> None:
    text = on_postgresql(EXAMPLE, "x").replace('url = "x"', 'url_env = "FLOWBOT_NO_SUCH_URL"')
    proc = serve(write(tmp_path, text), "--port", str(free_port()))
    assert_clean(proc, 2, "flowbot: storage.url_env: the environment variable "
                          "FLOWBOT_NO_SUCH_URL is not set (it should hold the postgresql:// "
                          "URL)")
