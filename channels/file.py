"""A channel that appends every outgoing message to a JSON-lines file: for dry runs,
benchmarks and crash tests, where another process reads what was "sent"."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from channels.base import Delivery, RateLimit, Route

_encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per message


class FileChannel:
    name = "file"
    rate_limit = RateLimit()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    @classmethod
    def create(cls, config: Any, runtime: Any) -> FileChannel:
        return cls(config.channels.file.path)

    def routes(self) -> Sequence[Route]:
        return []

    async def start(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def stop(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def send(self, delivery: Delivery) -> str | None:
        m = delivery.message
        line = _encode({
            "outbox_id": delivery.id, "user_id": delivery.user_id, "text": m.text,
            "buttons": [b.label for b in m.buttons], "link": m.link.url if m.link else None,
        })
        os.write(self._fd, (line + "\n").encode())  # one write: whole lines even on kill -9
        return None
