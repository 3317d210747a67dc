"""The database worker in a process of its own, so SQLite and the transitions run on one
core while the event loop (HTTP, channels) runs on another, instead of both taking turns
on one interpreter lock.

The server starts `python -m storage.process FD` with one end of a socket pair. Jobs go
over it as pickled batches, one per event-loop iteration: `(request id, urgent, fn, args)`,
where `fn` is a module-level function or a method named through its class
(`Ledger.webview_callback`), so pickle sends its name, never code. Inside, a
`storage.worker.DbWorker` thread runs them exactly as it would in the server's process
(grouped commits, a savepoint per job, urgent jobs first) and sends back
`(commits, jobs, [(request id, ok, value or exception)])` after each commit.

The database process ignores SIGINT and SIGTERM and ends when the server closes its end
(or dies: the socket's EOF). So Ctrl-C or a service manager's SIGTERM lets the server
finish its requests and deliveries first, and a `kill -9` of the server takes this
process with it within one batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from bot import heap
from bot.errors import StorageUnavailable
from bot.store import Store
from storage.lock import WriterLock
from storage.worker import TIMER, TimerPass

log = logging.getLogger(__name__)
T = TypeVar("T")
_HEADER = struct.Struct(">I")
_PICKLE = pickle.HIGHEST_PROTOCOL


def _frame(value: Any) -> bytes:
    data = pickle.dumps(value, _PICKLE)
    return _HEADER.pack(len(data)) + data


class DatabaseProcessError(StorageUnavailable, RuntimeError):
    """The database process could not start, or exited under us (a request meanwhile is
    answered 503). `reason`: why, in words (the database's own error when it could not
    be opened)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__("storage_unavailable", f"The database is unavailable ({message}); "
                         "retry in a few seconds.")
        self.detail = message
        self.reason = reason or message

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.detail, self.reason))


class ProcessWorker:
    """`DbWorker`'s interface, with the worker in a child process. `factory()` opens the
    store there (pickled, with the config it carries) when `open()` starts the process.

    `timer`: the database process keeps the deadlines itself (see DbWorker), on its own
    clock, and each pass's answer goes to `on_timer(ok, value)`. Expiries then wait for
    neither the event loop nor the queue of callbacks."""

    def __init__(self, factory: Callable[[], Store], timer: TimerPass | None = None,
                 lock: Path | None = None) -> None:
        self.factory = factory
        self.timer = timer
        self.lock = lock  # the database file: one writer (storage/lock.py), see open()
        self._held: WriterLock | None = None
        self.on_timer: Callable[[bool, Any], None] = lambda ok, value: None
        self.commits = 0
        self.jobs = 0
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._out: list[tuple[int, bool, Callable[..., Any], tuple[Any, ...]]] = []
        self._next_id = 0
        self._closing = False
        self.died = False  # the database process exited under us (the server exits 1)
        self.on_exit: Callable[[], None] = _stop_server

    async def open(self) -> None:
        """Start the database process. With `lock`, first take the database's writer lock
        here (raises `bot.errors.DatabaseInUse` at once when another process serves it),
        and hand it down: the database process holds it too, so a database process that
        outlives a killed server still keeps a second one out until it ends."""
        fds: tuple[int, ...] = ()
        if self.lock is not None:
            self._held = await asyncio.to_thread(WriterLock.acquire, self.lock)
            fds = (self._held.fd,)
        ours, theirs = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "storage.process", str(theirs.fileno()),
                pass_fds=(theirs.fileno(), *fds))
        except BaseException:
            self._release()
            raise
        finally:
            theirs.close()
        self.pid = self._proc.pid
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        # sys.path first: the factory's classes must be importable before it is unpickled
        held = (self._held.fd, str(self.lock)) if self._held is not None else None
        self._writer.write(_frame((sys.path, pickle.dumps((self.factory, self.timer), _PICKLE),
                                   held)))
        try:
            ready = await _read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            ready = ("error", "it exited while starting; see its log above")
        if ready != ("ready", None):
            await self._reap()
            self._release()
            raise DatabaseProcessError(f"the database process did not start: {ready[1]}",
                                       reason=str(ready[1]))
        self._reader_task = asyncio.create_task(self._read(reader), name="db-process-reader")

    async def run(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> T:
        """Run `fn(store, *args)` in the database process; return once it is committed."""
        if self._writer is None or self._closing:
            raise DatabaseProcessError("the database process is not running")
        loop = asyncio.get_running_loop()
        self._next_id += 1
        fut: asyncio.Future[T] = loop.create_future()
        self._futures[self._next_id] = fut
        self._out.append((self._next_id, urgent, fn, args))
        if urgent:
            self._flush()
        elif len(self._out) == 1:
            loop.call_soon(self._flush)  # one frame for every job of this loop iteration
        return await fut

    def _flush(self) -> None:
        batch, self._out = self._out, []
        if not batch or self._writer is None:
            return
        try:
            frame = _frame(batch)
        except Exception:  # a job that cannot cross: fail it alone, send the others
            good = []
            for job in batch:
                try:
                    pickle.dumps(job, _PICKLE)
                except Exception as exc:
                    self._settle(job[0], False, TypeError(
                        f"database job {getattr(job[2], '__qualname__', job[2])!r} cannot be "
                        f"sent to the database process: {exc}"))
                else:
                    good.append(job)
            if not good:
                return
            frame = _frame(good)
        self._writer.write(frame)

    def _settle(self, request_id: int, ok: bool, value: Any) -> None:
        if request_id == TIMER:
            self.on_timer(ok, value)
            return
        fut = self._futures.pop(request_id, None)
        if fut is None or fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self.commits, self.jobs, answers = await _read_frame(reader)
                for request_id, ok, value in answers:
                    self._settle(request_id, ok, value)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        lost = DatabaseProcessError("the database process exited before answering")
        for request_id in list(self._futures):
            self._settle(request_id, False, lost)
        if not self._closing:
            log.critical("the database process (pid %s) exited; stopping the server so it "
                         "can be restarted", self.pid)
            self._closing = True
            self.died = True
            self.on_exit()

    async def stop(self) -> None:
        """Let the database process finish what it was sent, then end it."""
        self._closing = True
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None
        try:
            if self._reader_task is not None:
                await self._reader_task
                self._reader_task = None
            await self._reap()
        finally:  # even when cancelled: the database process holds its own copy of the lock
            self._release()

    def _release(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None

    async def _reap(self) -> None:
        if self._proc is None:
            return
        try:  # not wait_for: on Python 3.11 it swallows a cancel that meets the exit
            async with asyncio.timeout(30):
                await self._proc.wait()
        except TimeoutError:
            log.error("the database process did not end in 30 s; killing it")
            self._proc.kill()
            await self._proc.wait()
        self._proc = None


def _stop_server() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))  # noqa: S301 - our child, our socket pair


# -- inside the database process --------------------------------------------------------


def _read_blocking(stream: IO[bytes]) -> Any:
    """The next frame, or None at EOF (the server closed its end or died)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None  # noqa: S301 - from our parent


def _answers(ran: list[Any]) -> list[tuple[int, bool, Any]]:
    out = []
    for (fn, _, request_id), ok, value in ran:
        try:
            pickle.dumps(value, _PICKLE)
        except Exception as exc:  # an answer that cannot cross fails its job, not the batch
            ok, value = False, DatabaseProcessError(
                f"the answer of {getattr(fn, '__qualname__', fn)!r} cannot be sent back: {exc}")
        out.append((request_id, ok, value))
    return out


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from bot import logs  # the server's --log-level and --log-format, passed in its env

    logs.setup(os.environ.get("FLOWBOT_LOG_LEVEL", "info"),
               os.environ.get("FLOWBOT_LOG_FORMAT", "text"))
    sock = socket.socket(fileno=int(sys.argv[1]))
    stream = sock.makefile("rb")
    send_lock = threading.Lock()

    start = _read_blocking(stream)
    if start is None:
        return
    sys.path[:] = start[0]
    try:
        factory, timer = pickle.loads(start[1])  # noqa: S301 - from our parent
        if start[2] is not None:  # the writer lock our parent took, held for our life
            held = WriterLock.adopt(start[2][0], Path(start[2][1]))  # noqa: F841
        store = factory()
    except Exception as exc:
        # the server says it in one line; the traceback only for whoever debugs this
        log.debug("could not open the database", exc_info=True)
        sock.sendall(_frame(("error", str(exc) or type(exc).__name__)))
        return

    def answer(ran: list[Any]) -> None:
        answers = [(request_id, ok, value) for (_, _, request_id), ok, value in ran]
        try:
            frame = _frame((worker.commits, worker.jobs, answers))
        except Exception:
            frame = _frame((worker.commits, worker.jobs, _answers(ran)))
        try:
            with send_lock:
                sock.sendall(frame)
        except OSError:
            pass  # the server is gone; what committed stays committed

    from storage.backends import worker_for  # imports this module: not at the top

    heap.settle()
    worker = worker_for(store, answer=answer, timer=timer)
    with send_lock:
        sock.sendall(_frame(("ready", None)))
    worker.start()
    try:
        while (batch := _read_blocking(stream)) is not None:
            for request_id, urgent, fn, args in batch:
                worker.submit(fn, args, request_id, urgent=urgent)
    finally:
        worker.join()
        store.close()


if __name__ == "__main__":
    main()
