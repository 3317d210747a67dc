"""`flowbot backup` while the server runs under load: the copy is consistent, and restored
it serves — waits whose deadlines passed meanwhile fire at start, the others still take
their callbacks."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.reliability.common import Server, seed_waits
from tests.test_restart import wait_for


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, restored = Server(tmp_path / "a"), Server(tmp_path / "b")
    yield first, restored
    first.stop()
    restored.stop()


def consistent(db: Path) -> None:
    """Every conversation waits on a pending wait of its own, and every pending WebView
    wait is the one its conversation waits on: a torn copy breaks one or the other."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute(
            "SELECT count(*) FROM conversations c LEFT JOIN waits w ON w.id = c.wait_id "
            "WHERE c.wait_id IS NOT NULL AND (w.state IS NOT 'pending' "
            "OR w.conversation_id != c.id)").fetchone()[0] == 0
        assert con.execute(
            "SELECT count(*) FROM waits w JOIN conversations c ON c.id = w.conversation_id "
            "WHERE w.state = 'pending' AND c.wait_id IS NOT w.id").fetchone()[0] == 0
    finally:
        con.close()


async def test_a_backup_under_load_restores_to_a_database_that_serves(
        servers: tuple[Server, Server], tmp_path: Path) -> None:
    """"Under load" is checked by order, not by time: callbacks answered before the backup
    started are in the copy, callbacks sent after it ended are not, and some were answered
    while it ran (the server kept committing); each of the load's 16 clients goes on until
    the backup ends (or its 175 waits run out)."""
    first, restored = servers
    eids = seed_waits(first.db, 3000, deadline=time.time() + 600, prefix="u")
    pool, later = eids[:2800], eids[2800:2850]  # the load's, and the ones for after
    first.start()
    out = tmp_path / "backup.db"
    answered: list[tuple[str, int]] = []

    backed_up = asyncio.Event()

    async def callback(http: aiohttp.ClientSession, eid: str) -> None:
        async with http.post(first.base + "/webview/callback", json={
                "executionId": eid, "success": True, "data": {"ref": eid[:4]}}) as r:
            answered.append((eid, r.status))

    async def callbacks(http: aiohttp.ClientSession, ids: list[str]) -> None:
        for eid in ids:  # until the backup is done
            if backed_up.is_set():
                return
            await callback(http, eid)

    async with aiohttp.ClientSession() as http:
        load = [asyncio.create_task(callbacks(http, pool[i::16])) for i in range(16)]
        while len(answered) < 100:
            await asyncio.sleep(0.01)
        before = {eid for eid, _ in answered}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "backup", "--config", str(first.config), str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await proc.communicate()
        during = {eid for eid, _ in answered} - before
        backed_up.set()
        await asyncio.gather(*load)
        sent = {eid for eid, _ in answered}
        for eid in later:
            await callback(http, eid)
    assert proc.returncode == 0, stderr.decode()
    assert during, "no callback was answered while the backup ran"
    assert {status for _, status in answered} == {200}
    assert "pending wait(s)" in stdout.decode() and str(out) in stdout.decode()
    consistent(out)
    # a second backup to the same name is refused: nothing is ever overwritten
    again = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "backup", "--config", str(first.config), str(out),
        stderr=asyncio.subprocess.PIPE)
    _, err = await again.communicate()
    assert again.returncode == 2 and b"already exists" in err

    con = sqlite3.connect(out)
    paid = {r[0] for r in con.execute("SELECT id FROM waits WHERE state = 'success'")}
    pending = [r[0] for r in con.execute(
        "SELECT w.id FROM waits w WHERE w.state = 'pending' ORDER BY w.id")]
    assert before <= paid <= sent and not paid & set(later)
    assert len(paid) + len(pending) == len(eids)
    # while the server was down, some deadlines passed
    overdue, open_ = pending[:50], pending[50:]
    with con:
        con.executemany("UPDATE waits SET deadline = ? WHERE id = ?",
                        [(time.time() - 1, w) for w in overdue])
    users = dict(con.execute("SELECT w.id, c.user_id FROM waits w JOIN conversations c "
                             "ON c.id = w.conversation_id"))
    con.close()

    first.stop()
    shutil.copy(out, restored.db)  # the restore: a stopped server, the copy in place
    restored.start()
    for wid in overdue[:5]:
        wait_for(restored, users[wid], "expired")
    async with aiohttp.ClientSession() as http:
        async with http.post(restored.base + "/webview/callback", json={
                "executionId": open_[0], "success": True, "data": {"ref": "R-1"}}) as r:
            assert r.status == 200
        async with http.post(restored.base + "/webview/callback", json={
                "executionId": next(iter(paid)), "success": True}) as r:
            assert r.status == 409  # resolved before the backup: resolved in it
    wait_for(restored, users[open_[0]], "paid R-1")
    restored.until(lambda: restored.sql("SELECT count(*) FROM waits WHERE state = 'expired'")
                   == [(50,)], "every overdue wait expired")


def test_a_backup_into_a_missing_folder_names_the_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    db = tmp_path / "flowbot.db"
    sqlite3.connect(db).close()
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{db}"\n[flows.main]\nstart = "a"\n'
                      '[flows.main.blocks.a]\ntype = "end"\n')
    out = tmp_path / "no" / "such" / "backup.db"
    assert main(["backup", "--config", str(config), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"flowbot: the folder {out.parent} does not exist; create it first "
                   "(mkdir -p) or write the backup elsewhere\n")
    assert not (tmp_path / "no").exists()
