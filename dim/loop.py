"""The guarded background loop every dim thread runs, and its monotonic timer."""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Generic, Optional, TypeVar

import redis

from dim.events import Event, EventType
from dim.logs import fields
from dim.roles import Host
from dim.usercode import block_signals

H = TypeVar("H", bound=Host)

log = logging.getLogger(__name__)

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Every:
    """A job due every ``interval`` seconds, timed on a monotonic clock.

    ``schedule`` (which dim used before) times its jobs with ``datetime.now()``: a step of
    the wall clock back (NTP, a DST change on a host in local time) stalled a loop for
    the size of the step. This timer cannot be stepped. A run that comes late does not
    cause a burst of catch-up runs.

    >>> now = [0.0]
    >>> every = Every(10.0, lambda: now[0])
    >>> every.due(), every.wait()
    (False, 10.0)
    >>> now[0] = 25.0
    >>> every.due()
    True
    >>> every.ran()
    ... every.wait()
    10.0
    """

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self.next_at = clock() + interval

    def __repr__(self) -> str:
        return f"<Every {self.interval:g}s next in {self.wait():.2f}s>"

    def due(self) -> bool:
        return self.clock() >= self.next_at

    def ran(self) -> None:
        """The job ran now: the next run is one interval from now."""
        self.next_at = self.clock() + self.interval

    def wait(self) -> float:
        """Seconds until the job is due (0 when it is)."""
        return max(0.0, self.next_at - self.clock())


class Loop(Generic[H]):
    """A named thread that calls :meth:`tick` until the node stops.

    ``tick()`` returns how long to wait before the next tick; :meth:`wake` cuts that wait
    short (as does stopping). An exception in ``tick`` never kills the thread: it is
    logged, reported to listeners as ``LOOP_ERROR`` (Redis errors are reported by the
    heartbeat as ``REDIS_LOST`` instead), and the loop retries after an exponential
    backoff capped at one heartbeat interval.
    """

    role = "loop"

    def __init__(self, node: H) -> None:
        self.node = node
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.failures = 0

    def __repr__(self) -> str:
        alive = self._thread is not None and self._thread.is_alive()
        return f"<{type(self).__name__} node={self.node.node_id} alive={alive}>"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"dim-{self.role}-{self.node.node_id}", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def join(self, timeout: float) -> None:
        thread = self._thread
        # (ident: it started; start() may have failed, out of threads, or been interrupted)
        if (
            thread is not None
            and thread.ident is not None
            and thread is not threading.current_thread()
        ):
            thread.join(timeout)

    def cpu_time(self) -> Optional[float]:
        """CPU seconds this loop's thread has used, from ``/proc`` (``schedstat`` to the
        nanosecond, else ``stat``'s clock ticks); None where the platform does not say
        or the thread ended."""
        thread = self._thread
        native = getattr(thread, "native_id", None)
        if native is None:
            return None
        task = f"/proc/self/task/{native}"
        try:
            with open(f"{task}/schedstat", "rb") as stat:
                return int(stat.read().split()[0]) / 1e9
        except (OSError, IndexError, ValueError):
            pass  # a kernel without schedstat, or the thread ended
        try:
            with open(f"{task}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            # after the name: state is field 3, utime 14 and stime 15 (proc(5))
            return (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, IndexError, ValueError):  # not Linux, the thread ended, no /proc
            return None

    def tick(self) -> float:
        raise NotImplementedError

    def _run(self) -> None:
        block_signals()
        stop = self.node.stop_event
        while not stop.is_set():
            self._wake.clear()
            try:
                delay = self.tick()
                self.failures = 0
            except BaseException as exc:  # no loop may die (a BaseException included)
                self.failures += 1
                delay = min(
                    self.node.settings.heartbeat_interval, 0.01 * 2 ** min(self.failures, 10)
                )
                if isinstance(exc, redis.RedisError):
                    log.warning(
                        "%s: Redis error (retrying in %.2fs): %r",
                        self.role,
                        delay,
                        exc,
                        extra=fields(self.node.node_id),
                    )
                else:
                    log.exception(
                        "%s loop raised (retrying in %.2fs)",
                        self.role,
                        delay,
                        extra=fields(self.node.node_id),
                    )
                    self.node.emit(
                        Event(
                            EventType.LOOP_ERROR,
                            self.node.node_id,
                            error=exc,
                            data={"loop": self.role},
                        )
                    )
            if stop.is_set():
                break
            self._wake.wait(max(delay, 0.0))
