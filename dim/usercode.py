"""Running user callbacks with a time limit.

Python cannot kill a thread, so a callback that hangs is *abandoned*: it runs on its own
daemon thread, the caller stops waiting after the timeout, and if the callback returns
later its result goes to ``on_late`` (for ``create``: the late instance is disconnected
so it does not leak).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

from dim.errors import CallTimeout

_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name)}


def block_signals() -> None:
    """Keep SIGINT/SIGTERM away from the calling (dim) thread.

    The kernel delivers a process signal to any thread that does not block it. Python
    runs handlers in the main thread anyway, but only a signal delivered to the main
    thread interrupts what it is blocked on (``Event.wait()``, ``join()``), so an
    application waiting for Ctrl-C or SIGTERM would not wake. Every thread dim starts
    calls this first.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def call_with_timeout(
    fn: Callable[[Any], Any],
    arg: Any,
    timeout: float,
    name: str,
    on_late: Optional[Callable[[Any], None]] = None,
) -> Any:
    """Return ``fn(arg)``, or raise what it raised, or CallTimeout after ``timeout`` s."""
    done = threading.Event()
    lock = threading.Lock()
    box: dict[str, Any] = {}
    abandoned = False

    def run() -> None:
        block_signals()
        try:
            box["value"] = fn(arg)
        except BaseException as exc:
            box["error"] = exc
        with lock:
            done.set()
            late = abandoned
        if late and on_late is not None and "value" in box:
            on_late(box["value"])

    thread = threading.Thread(target=run, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:
        # the interpreter is shutting down and starts no threads (3.12+): call it here,
        # without a time limit, rather than not at all
        return fn(arg)
    if not done.wait(timeout):
        with lock:
            if not done.is_set():
                abandoned = True
        if abandoned:
            raise CallTimeout(f"{name} did not return within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
