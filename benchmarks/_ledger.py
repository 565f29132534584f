"""The ledger the benchmark node processes append to (standard library only).

The tooz node runs in a virtualenv without dim, so this module imports nothing but the
standard library. Each record is one JSON line written with a single ``os.write`` on an
``O_APPEND`` descriptor, so lines from several processes never mix. ``t`` is
``time.monotonic()``, which is system-wide on Linux: times from different processes
compare.

Records (``ev``):

``loaded``      the process has imported everything and waits for ``start``
``ready``       a node joined: ``node`` (its id), ``pid``
``create``      an instance started: ``node``, ``id`` (config id), ``v`` (config content
                version), ``inst`` (serial in this pid)
``disconnect``  an instance stopped: same fields as its ``create``
``view``        (tooz only) the members this node sees after applying them: ``members``
``stopped``     a node finished its graceful stop: ``node``
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


class LedgerFile:
    """Append-only JSON lines, one ``os.write`` per line."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pid = os.getpid()

    def write(self, **fields: Any) -> None:
        record = {"t": time.monotonic(), "pid": self.pid}
        record.update(fields)
        os.write(self.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


class LedgerReader:
    """Reads the records appended since the last call (complete lines only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]
