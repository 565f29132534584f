"""Running user callbacks with a time limit.

Python cannot kill a thread, so a callback that hangs is *abandoned*: it runs on its own
daemon thread, the caller stops waiting after the timeout, and if the callback returns
later its result goes to ``on_late`` (for ``create``: the late instance is disconnected
so it does not leak).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import math
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

from dim.errors import CallbackError, CallTimeout

log = logging.getLogger(__name__)

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


class Call:
    __slots__ = ("abandoned", "arg", "box", "done", "fn", "kind", "lock", "on_done", "on_late")

    def __init__(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        on_late: Optional[Callable[[Any], None]],
        on_done: Optional[Callable[[], None]] = None,
    ) -> None:
        self.fn = fn
        self.arg = arg
        self.on_late = on_late
        self.on_done = on_done  # told once the outcome is in (a waiting loop wakes)
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.box: dict[str, Any] = {}
        self.abandoned = False
        self.kind = ""  # the name of the thread it runs on (Runners)

    def run(self) -> None:
        try:
            self.box["value"] = self.fn(self.arg)
        except BaseException as exc:  # user code: whatever it raises is the outcome
            self.box["error"] = exc
        with self.lock:
            self.done.set()
            late = self.abandoned
        if self.on_done is not None:
            try:
                self.on_done()
            except BaseException:  # the runner thread must go on serving
                log.exception("waking the caller of a finished call failed")
        if late and self.on_late is not None and "value" in self.box:
            try:
                self.on_late(self.box["value"])
            except BaseException:  # the runner thread must go on serving
                log.exception("disposing of a late result failed")

    def result(self, timeout: float, name: str) -> Any:
        if not self.done.wait(timeout) and self.abandon():
            raise CallTimeout(f"{name} did not return within {timeout:g} s")
        return self.outcome(name)

    def abandon(self) -> bool:
        """Stop waiting for the call; True if it had not returned (it is abandoned: a
        value it returns later goes to ``on_late``)."""
        with self.lock:
            if not self.done.is_set():
                self.abandoned = True
        return self.abandoned

    def outcome(self, name: str) -> Any:
        """The value of a finished call, or what it raised: an ``Exception`` as is, any
        other ``BaseException`` (``CancelledError``, ``SystemExit``, ``KeyboardInterrupt``,
        gevent's ``GreenletExit``) as a :class:`CallbackError`, so that no caller in dim
        lets one through by accident."""
        if "error" in self.box:
            error = self.box["error"]
            if isinstance(error, Exception):
                raise error
            raise CallbackError(f"{name} raised {error!r}", error) from error
        return self.box["value"]


class Runners:
    """Threads kept idle between user calls: starting a thread per call costs more than
    the rest of a create or disconnect (~130 us of CPU each), and its caller waits until
    the new thread runs.

    A call takes an idle thread or starts one; the thread goes back to the idle list when
    the call returns in time. A call that times out keeps its thread until it returns
    (it is abandoned, not killed). :meth:`close` lets the idle threads exit.

    One pool may serve several kinds of call, each naming its thread (``name``, the
    pool's own by default). At most ``keep`` idle threads of each kind stay; a call
    takes an idle thread of its own kind, or with ``borrow`` one of any kind (a stop
    takes a thread a create left idle, never the other way round: a create can wait for
    a thread, while a disconnect that cannot get one keeps its instance running and, on
    a fenced node, lets its claim lapse under it). A borrowed thread that its kind has
    no room for goes back to the pool's own kind. The kind is kept with the idle thread,
    not read from its name, which user code may change.
    """

    def __init__(self, name: str, keep: int = 8) -> None:
        self.name = name
        self.keep = keep
        # (inbox, thread, kind) of each idle thread
        self._idle: list[tuple[queue.SimpleQueue[Optional[Call]], threading.Thread, str]] = []
        self._lock = threading.Lock()
        self._closed = False

    def call(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        timeout: float,
        name: str,
        on_late: Optional[Callable[[Any], None]] = None,
    ) -> Any:
        """Return ``fn(arg)``, or raise what it raised (see :meth:`Call.outcome`), or
        CallTimeout after ``timeout`` s."""
        return self.start(fn, arg, on_late).result(timeout, name)

    def start(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        on_late: Optional[Callable[[Any], None]] = None,
        on_done: Optional[Callable[[], None]] = None,
        inline: bool = True,
        name: Optional[str] = None,
        borrow: bool = False,
    ) -> Call:
        """Start ``fn(arg)`` on a thread named ``name``, its kind (default: the pool's),
        and return at once; the caller polls the job (``done``, :meth:`Call.outcome`) and
        may :meth:`Call.abandon` it. ``on_done`` is called on that thread once the outcome
        is in. When the interpreter is shutting down and starts no thread, the call runs
        here (``inline``), or RuntimeError. ``borrow``: an idle thread of another kind
        will do."""
        job = Call(fn, arg, on_late, on_done)
        name = job.kind = name or self.name
        idle = self._reuse(name, borrow)
        if idle is None:
            inbox: queue.SimpleQueue[Optional[Call]] = queue.SimpleQueue()
            # the call goes in first: a signal handler that raises in the caller (the main
            # thread, in stop()) while start() waits for the thread to run leaves a thread
            # with its call, not one that waits for a call forever
            inbox.put(job)
            thread = threading.Thread(target=self._serve, args=(inbox,), name=name, daemon=True)
            try:
                thread.start()
            except RuntimeError:
                if not inline or (
                    not sys.is_finalizing() and "shutdown" not in str(sys.exc_info()[1])
                ):
                    raise  # out of threads: a failure of this call, not a reason to block
                # the interpreter is shutting down and starts no threads (3.12+): call it
                # here, without a time limit, rather than not at all
                job.run()
            return job
        inbox, thread = idle
        if thread.name != name:
            thread.name = name  # (before it runs the call)
        inbox.put(job)
        return job

    def _reuse(
        self, kind: str, borrow: bool
    ) -> Optional[tuple[queue.SimpleQueue[Optional[Call]], threading.Thread]]:
        """An idle thread of that kind (or with ``borrow``, of any), or None."""
        with self._lock:
            idle = self._idle
            for i in range(len(idle) - 1, -1, -1):
                if idle[i][2] == kind:
                    return idle.pop(i)[:2]
            return idle.pop()[:2] if borrow and idle else None

    def _serve(self, inbox: queue.SimpleQueue[Optional[Call]]) -> None:
        block_signals()
        me = threading.current_thread()
        while True:
            job = inbox.get()
            if job is None:
                return
            job.run()
            with self._lock:
                if self._closed or job.abandoned:
                    return
                kind = next(
                    (k for k in (job.kind, self.name) if self._idle_of(k) < self.keep), None
                )
                if kind is None:
                    return
                self._idle.append((inbox, me, kind))

    def _idle_of(self, kind: str) -> int:
        return sum(1 for _inbox, _thread, k in self._idle if k == kind)

    def close(self) -> None:
        """Let the idle threads exit (busy ones exit when their call returns)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for inbox, _thread, _kind in idle:
            inbox.put(None)


class Place:
    """One of the :class:`Workers` places, held by the task that runs on it."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = False  # given up: the task goes on outside the limit, or ended


class Workers:
    """At most ``limit`` tasks at once, each on a thread (kept idle between tasks, as
    :class:`Runners` does); the others wait, first come first served.

    A task is called with its :class:`Place`. It may give the place up before it ends
    (:meth:`leave`: a create that overran its time limit still runs user code, but no
    longer counts), and a waiting task starts in its place. A thread that ends its task
    takes the next waiting one itself. Thread starts that fail leave the tasks waiting:
    :attr:`stalled` says so, and :meth:`kick` tries again.
    """

    def __init__(self, name: str, limit: int, runners: Optional[Runners] = None) -> None:
        self.limit = limit
        self.name = name
        # (shared with other kinds of call when given: see Lifecycle)
        self._runners = runners if runners is not None else Runners(name, keep=limit)
        self._lock = threading.Lock()
        self._running = 0
        self._waiting: collections.deque[Callable[[Place], None]] = collections.deque()

    @property
    def stalled(self) -> bool:
        """Tasks wait while a place is free: their thread could not be started."""
        with self._lock:
            return bool(self._waiting) and self._running < self.limit

    def submit(self, task: Callable[[Place], None], first: bool = False) -> None:
        """Run ``task(place)`` on a thread now, or once a place is free (``first``: before
        the tasks waiting already). Raises what ``Thread.start`` raises when no thread can
        be started: the task still waits (:meth:`kick` starts it)."""
        with self._lock:
            if first:
                self._waiting.appendleft(task)
            else:
                self._waiting.append(task)
        self.kick()

    def kick(self) -> None:
        """Start waiting tasks while places are free; raises what ``Thread.start`` raises
        (the task it was for waits on, first in line)."""
        while True:
            with self._lock:
                if not self._waiting or self._running >= self.limit:
                    return
                task = self._waiting.popleft()
                self._running += 1
            try:
                # (never here, at interpreter shutdown: the caller may be the watchdog)
                self._runners.start(self._run, (task, Place()), inline=False, name=self.name)
            except BaseException:
                with self._lock:
                    self._running -= 1
                    self._waiting.appendleft(task)
                raise

    def leave(self, place: Place) -> None:
        """The task on ``place`` gives it up and goes on outside the limit; a waiting task
        starts in its place (without a thread, it waits for a :meth:`kick`)."""
        with self._lock:
            if place.left:
                return
            place.left = True
            self._running -= 1
        try:
            self.kick()
        except Exception:  # RuntimeError: can't start new thread; MemoryError
            pass  # it waits, stalled, for the owner's next kick (nothing logged here: the
            # watchdog calls this, and a log handler may block)

    def _run(self, job: tuple[Callable[[Place], None], Place]) -> None:
        task, place = job
        while True:
            try:
                task(place)
            except BaseException:  # the tasks guard themselves; this thread goes on
                with contextlib.suppress(BaseException):  # (a log filter that raises)
                    log.exception("a task of %s raised", self)
            with self._lock:
                if place.left:
                    return  # the place went to another task
                if self._waiting:
                    task = self._waiting.popleft()  # the same place, this thread
                    continue
                place.left = True
                self._running -= 1
                return

    def close(self) -> None:
        """Let the idle threads exit (waiting tasks still run, to their end)."""
        self._runners.close()

    def __repr__(self) -> str:
        return f"<Workers {self.name} {self._running}/{self.limit} running>"


class Watch:
    """The deadline of one call that runs on its caller's thread (see :class:`Watchdog`)."""

    __slots__ = ("deadline", "finished", "fired", "overran", "report")

    def __init__(
        self, deadline: float, overran: Callable[[], None], report: Optional[Callable[[], None]]
    ) -> None:
        self.deadline = deadline
        self.overran = overran
        self.report = report
        self.fired = False  # the deadline passed first: ``overran`` runs (or ran)
        self.finished = False  # the call returned first


class Watchdog:
    """Times calls that run on the threads of their callers, so that a call needs no
    thread of its own (a worker runs ``create`` and a stop thread ``disconnect`` itself:
    no hand-off to another thread and back).

    One thread, started by the first :meth:`watch`, sleeps until the earliest deadline
    and then runs ``overran`` for every call not returned by its own; ``after`` runs
    once after each such batch (one round trip for all the claims they let go). Whichever
    comes first, the return or the deadline, wins: a call that returns late learns it from
    :meth:`finish`. The batch's ``report`` calls (logging, which a handler may block) go
    to ``reporter``, which runs them elsewhere, so they never make the watchdog late for
    the next deadline; the watchdog itself logs nothing.
    """

    def __init__(
        self,
        name: str,
        after: Callable[[], None] = lambda: None,
        reporter: Optional[Callable[[list[Callable[[], None]]], None]] = None,
    ) -> None:
        self.name = name
        self.after = after
        # (by default the watchdog reports itself, one after the other)
        self.reporter = reporter or (lambda reports: [report() for report in reports])
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._starting = threading.Lock()
        self._closed = False
        # when the thread wakes next on its own (-inf: it is awake and looks again)
        self._wakes_at = math.inf

    def watch(
        self,
        timeout: float,
        overran: Callable[[], None],
        report: Optional[Callable[[], None]] = None,
    ) -> Optional[Watch]:
        """Watch a call starting now. Raises what ``Thread.start`` raises when the
        watchdog thread cannot be started (RuntimeError at the thread limit); None when
        the interpreter is shutting down and starts no threads (3.12+), or after
        :meth:`close`: the call then runs without a time limit rather than not at all."""
        if self._thread is None and not self._closed:
            with self._starting:  # not under the condition: a slow start blocks no close
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                    try:
                        thread.start()
                    except RuntimeError as exc:
                        if sys.is_finalizing() or "shutdown" in str(exc):
                            return None
                        raise
                    self._thread = thread
        watch = Watch(time.monotonic() + timeout, overran, report)
        with self._cond:
            if self._closed:
                return None  # after the node stopped (its thread may be gone)
            heapq.heappush(self._heap, (watch.deadline, next(self._order), watch))
            if watch.deadline < self._wakes_at:
                self._wakes_at = -math.inf
                self._cond.notify()
        return watch

    def finish(self, watch: Watch) -> bool:
        """The call returned: True if in time, False if its overrun was (being) handled."""
        with self._cond:
            if watch.fired:
                return False
            watch.finished = True
            if self._closed:
                self._cond.notify()  # it may be the last the thread waits for
            return True

    def close(self) -> None:
        """The thread exits once no watched call is left (calls still running keep it)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _due(self) -> Optional[list[Watch]]:
        """Under the lock: the watches past their deadline, after sleeping until there is
        one; None when closed with nothing left to watch."""
        while True:
            now = time.monotonic()
            due = []
            while self._heap and (self._heap[0][2].finished or self._heap[0][0] <= now):
                watch = heapq.heappop(self._heap)[2]
                if not watch.finished:
                    watch.fired = True
                    due.append(watch)
            if due:
                self._wakes_at = -math.inf
                return due
            if self._closed and all(entry[2].finished for entry in self._heap):
                return None
            self._wakes_at = self._heap[0][0] if self._heap else math.inf
            self._cond.wait(None if not self._heap else self._wakes_at - now)

    def _run(self) -> None:
        block_signals()
        while True:
            with self._cond:
                due = self._due()
            if due is None:
                return
            # nothing is logged here (a log handler may block or raise, and this thread
            # times every call): what went wrong goes to the reporter with the reports
            failed: list[Callable[[], None]] = []
            for watch in due:
                try:
                    watch.overran()
                except BaseException as exc:  # the watchdog must go on timing the others
                    failed.append(_logger("handling an overrun failed", exc))
            try:
                self.after()
            except BaseException as exc:
                failed.append(_logger("the work after a batch of overruns failed", exc))
            reports = [watch.report for watch in due if watch.report is not None] + failed
            if not reports:
                continue
            with contextlib.suppress(BaseException):  # (a reporter only hands them off)
                self.reporter(reports)


def _logger(text: str, exc: BaseException) -> Callable[[], None]:
    """A report that logs ``text`` with the traceback of ``exc``, later, elsewhere."""
    return lambda: log.error(text, exc_info=exc)


def call_with_timeout(
    fn: Callable[[Any], Any],
    arg: Any,
    timeout: float,
    name: str,
    on_late: Optional[Callable[[Any], None]] = None,
) -> Any:
    """Return ``fn(arg)``, or raise what it raised, or CallTimeout after ``timeout`` s.

    The call runs on a new thread of its own; :class:`Runners` reuses threads instead.
    """
    runners = Runners(name, keep=0)
    try:
        return runners.call(fn, arg, timeout, name, on_late)
    finally:
        runners.close()
