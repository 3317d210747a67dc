"""A channel that appends every outgoing message to a JSON-lines file: for dry runs,
benchmarks and crash tests, where another process reads what was "sent".

It is an idempotent receiver: `Delivery.id` (the outbox row id) is the idempotency key,
so a message the outbox sends again after a crash is written once."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from channels.base import Delivery, RateLimit, Route

log = logging.getLogger(__name__)

_encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per message


class FileChannel:
    name = "file"
    rate_limit = RateLimit()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._written: set[int] = set()

    @classmethod
    def create(cls, config: Any, runtime: Any) -> FileChannel:
        return cls(config.channels.file.path)

    def routes(self) -> Sequence[Route]:
        return []

    async def start(self) -> None:
        self._written = set(_outbox_ids(self.path))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def stop(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def send(self, delivery: Delivery) -> str | None:
        if delivery.id in self._written:  # sent before a crash, not yet marked sent
            log.info("outbox %d already delivered before a restart; not written again",
                     delivery.id)
            return None
        m = delivery.message
        line = _encode({
            "outbox_id": delivery.id, "user_id": delivery.user_id, "text": m.text,
            "buttons": [b.label for b in m.buttons], "link": m.link.url if m.link else None,
        })
        os.write(self._fd, (line + "\n").encode())  # one write: whole lines even on kill -9
        self._written.add(delivery.id)
        return None


def _outbox_ids(path: Path) -> Iterator[int]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                yield int(json.loads(line)["outbox_id"])
            except (ValueError, KeyError, TypeError):
                continue
