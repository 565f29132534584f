"""The user's ``create`` and ``disconnect``, called with their timeouts and reported.

:class:`InstanceCalls` calls them on the caller's thread, timed by the node's watchdog
(:class:`~dim.usercode.Watchdog`: at the deadline the caller's task goes on elsewhere,
so a hanging callback costs a thread, never a loop), owns the call threads for what
cannot run there, and the retry policy of ``create`` (tenacity: ``create_attempts``
tries with exponential backoff, cut short when the attempt is cancelled). It knows
nothing of claims or slots: the reconciler (:mod:`dim.reconciler`) decides when to
call, this module how.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Optional

import attrs
import tenacity

from dim.configs import Config
from dim.errors import CallTimeout, CreateError
from dim.events import Event, EventType
from dim.logs import NodeLog, fields
from dim.settings import Settings
from dim.usercode import Call, Runners, Watchdog

log = logging.getLogger("dim.reconciler")


@attrs.frozen
class UserCallbacks:
    create: Callable[[Any], Any]
    disconnect: Optional[Callable[[Any], Any]]
    healthcheck: Optional[Callable[[Any], Any]]


class Cancelled(Exception):
    """A create attempt may not start (cancelled, fenced, or the claim not covering it)."""


class Overran(Exception):
    """The ``create`` attempt on this thread returned after its deadline: its instance was
    disconnected, and the task it served goes on elsewhere (this thread leaves it)."""


class NotStarted(Exception):
    """No thread could be started for a ``disconnect`` (the process is at its thread
    limit): nothing was called, the instance still runs."""


class InstanceCalls:
    """Calls into ``create`` and ``disconnect`` for one node."""

    def __init__(
        self,
        node_id: str,
        settings: Settings,
        emit: Callable[..., None],
        callbacks: UserCallbacks,
    ) -> None:
        self._node_id = node_id
        self._log = NodeLog(log, node_id)
        self._settings = settings
        self._emit = emit
        self.callbacks = callbacks
        # the threads that run create/disconnect calls, each with its timeout
        self._runners = Runners(f"dim-call-{node_id}", keep=settings.max_workers)
        # times the creates and disconnects that workers and stop threads run themselves
        self.watchdog = Watchdog(f"dim-watch-{node_id}", reporter=self._report_apart)
        # the overruns' log lines that found no thread yet (see _report_apart)
        self._reports: list[Callable[[], None]] = []
        self._reports_lock = threading.Lock()

    def create(self, config: Config, overran: Callable[[CallTimeout], None]) -> Any:
        """One ``create`` attempt on this thread, timed by the watchdog. Returns the
        instance; raises CreateError (None returned) or what ``create`` raised.

        At ``create_timeout`` the watchdog calls ``overran`` with the CallTimeout: the
        attempt has failed, and the caller's task must go on on another thread. When the
        call returns after that, its instance is disconnected here and :class:`Overran`
        is raised: this thread serves the task no more. Without a watchdog thread (the
        process is at its thread limit) the attempt runs on a call thread with its
        timeout instead, which raises CallTimeout; after :meth:`close`, :class:`Cancelled`.
        """
        s = self._settings
        name = f"create of config {config.id!r}"
        callback = self.callbacks.create
        too_late = f"{name} did not return within {s.create_timeout:g} s"
        try:
            # nothing to report at the deadline: the task that goes on reports the attempt
            watch = self.watchdog.watch(s.create_timeout, lambda: overran(CallTimeout(too_late)))
        except Exception:  # RuntimeError: can't start new thread; MemoryError
            instance = self._runners.call(
                callback,
                config.value,
                s.create_timeout,
                name,
                on_late=lambda late: self._dispose_late(config, late),
            )
        else:
            if watch is None:
                raise Cancelled()  # the node stopped (or the interpreter is exiting)
            job = Call(callback, config.value, None)
            job.run()
            if not self.watchdog.finish(watch):
                # the task went on on another thread: whatever happens here (a log
                # handler that raises), this thread leaves it
                try:
                    self._dispose_late(config, job.box.get("value"))
                except BaseException:
                    with contextlib.suppress(BaseException):
                        self._log.exception("disposing of the late %s failed", name)
                raise Overran() from None
            instance = job.outcome(name)
        if instance is None:
            raise CreateError(f"create returned None for config id {config.id!r}", config.id)
        return instance

    def retrying(
        self,
        cancel: threading.Event,
        config_id: Any,
        token: Callable[[], Optional[int]],
        done: int = 0,
    ) -> tenacity.Retrying:
        """The retry policy of one create task that goes on after ``done`` attempts (a
        task resumed after an overrun): stops on ``cancel``, on :class:`Cancelled` and on
        :class:`Overran`, reports each failed attempt (``CREATE_FAILED``)."""
        s = self._settings

        def wait(state: tenacity.RetryCallState) -> float:
            # exponential in the attempt's number within the whole task
            doublings = min(state.attempt_number + done - 1, 64)
            return float(min(s.create_backoff * 2.0**doublings, s.create_backoff_max))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            attempt = state.attempt_number + done
            self._log.warning(
                "create of config %r failed (attempt %d of %d): %r",
                config_id,
                attempt,
                s.create_attempts,
                error,
                extra=fields(config=config_id, token=token()),
            )
            self._emit(
                Event(
                    EventType.CREATE_FAILED,
                    self._node_id,
                    config_id,
                    token(),
                    error=error,
                    data={"attempt": attempt},
                )
            )

        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max(1, s.create_attempts - done))
            | tenacity.stop_when_event_set(cancel),
            wait=wait,
            sleep=tenacity.sleep_using_event(cancel),
            retry=tenacity.retry_if_not_exception_type((Cancelled, Overran)),
            before_sleep=before_sleep,
            reraise=True,
        )

    def disconnect(
        self,
        config: Config,
        instance: Any,
        token: Optional[int],
        *,
        here: bool = False,
        overran: Optional[Callable[[], None]] = None,
    ) -> bool:
        """Call ``disconnect`` and report it (``INSTANCE_DISCONNECTED``); False if it
        overran with ``overran`` given: its overrun was reported instead, and its late
        return changes nothing.

        By default on a call thread within ``disconnect_timeout``; ``here``: on this
        thread, without a time limit; ``overran``: on this thread, timed by the watchdog,
        which at the deadline reports the overrun and calls ``overran``. An overrun is
        reported (``DISCONNECT_TIMEOUT``): the caller then lets the claim go while the
        instance may still run, and only its fencing token protects from it. Raises only
        :class:`NotStarted`, when no thread could be started for the call or its
        watchdog: the caller must hold the claim and try again."""
        s = self._settings
        callback = self.callbacks.disconnect
        if callback is None or instance is None:
            self._disconnected(config, token, None)
            return True
        name = f"disconnect of config {config.id!r}"
        if overran is not None:
            events: list[Event] = []
            try:
                watch = self.watchdog.watch(
                    s.disconnect_timeout,
                    lambda: self._let_go(config, token, name, overran, events),
                    lambda: self._log_overrun(config, token, events),
                )
            except Exception as exc:  # RuntimeError: can't start new thread; MemoryError
                raise NotStarted(f"no watchdog for the {name}: {exc!r}") from exc
            job = Call(callback, instance, None)
            job.run()
            if watch is not None and not self.watchdog.finish(watch):
                return False
        elif here:
            job = Call(callback, instance, None)
            job.run()
        else:
            try:
                job = self._runners.start(callback, instance)
            except Exception as exc:  # RuntimeError: can't start new thread; MemoryError
                raise NotStarted(f"no thread for the {name}: {exc!r}") from exc
        error: Optional[BaseException] = None
        try:
            job.result(s.disconnect_timeout, name)
        except CallTimeout as exc:
            error = exc
            self._report_overrun(config, token, exc)
        except Exception as exc:
            error = exc
            self._log.warning(
                "disconnect of config %r raised: %r",
                config.id,
                exc,
                extra=fields(config=config.id, token=token),
            )
        self._disconnected(config, token, error)
        return True

    def _let_go(
        self,
        config: Config,
        token: Optional[int],
        name: str,
        then: Callable[[], None],
        events: list[Event],
    ) -> None:
        """On the watchdog: a disconnect on its caller's thread is past its deadline. Its
        events are queued first (so they reach listeners before anything that follows
        the slot's end: a new instance of the config here), then the slot goes; logging
        waits for :meth:`_log_overrun`, on another thread (a log handler may block)."""
        exc = CallTimeout(f"{name} did not return within {self._settings.disconnect_timeout:g} s")
        events[:] = [
            Event(EventType.DISCONNECT_TIMEOUT, self._node_id, config.id, token, error=exc),
            Event(EventType.INSTANCE_DISCONNECTED, self._node_id, config.id, token, error=exc),
        ]
        for event in events:
            self._emit(event, log_it=False)
        then()

    def _log_overrun(self, config: Config, token: Optional[int], events: list[Event]) -> None:
        """The log lines of an overrun the watchdog let go (:meth:`_let_go`)."""
        self._log_timeout(config, token)
        for event in events:
            self._emit(event, queue=False)

    def _report_apart(self, reports: list[Callable[[], None]]) -> None:
        """The watchdog's reports (log lines), on a call thread: a log handler that
        blocks holds up that thread, never the watchdog, which times every create and
        disconnect. Without a thread they wait for the next try (:meth:`flush_reports`,
        on each tick of the reconciler)."""
        with self._reports_lock:
            self._reports.extend(reports)
        self.flush_reports()

    @property
    def reports_pending(self) -> bool:
        """Some overrun's log lines wait for a thread."""
        return bool(self._reports)

    def flush_reports(self) -> None:
        """Start a call thread for the waiting reports; never runs one here."""
        with self._reports_lock:
            batch, self._reports = self._reports, []
        if not batch:
            return

        def run(_: None) -> None:
            for report in batch:
                try:
                    report()
                except Exception:  # one failed report must not cost the others
                    self._log.exception("reporting an overrun failed")

        try:
            self._runners.start(run, None, inline=False)  # (the caller may be the watchdog)
        except Exception:  # RuntimeError: can't start new thread; MemoryError
            with self._reports_lock:
                self._reports[:0] = batch  # in order, before any that came meanwhile

    def _report_overrun(self, config: Config, token: Optional[int], exc: CallTimeout) -> None:
        self._emit(Event(EventType.DISCONNECT_TIMEOUT, self._node_id, config.id, token, error=exc))
        self._log_timeout(config, token)

    def _log_timeout(self, config: Config, token: Optional[int]) -> None:
        self._log.error(
            "disconnect of config %r did not return within %gs: its claim is let go "
            "while the instance may still run; only its fencing token (%s) protects "
            "from it now",
            config.id,
            self._settings.disconnect_timeout,
            token,
            extra=fields(config=config.id, token=token),
        )

    def _disconnected(
        self, config: Config, token: Optional[int], error: Optional[BaseException]
    ) -> None:
        self._emit(
            Event(EventType.INSTANCE_DISCONNECTED, self._node_id, config.id, token, error=error)
        )

    def _dispose_late(self, config: Config, instance: Any) -> None:
        """Disconnect what a ``create`` returned after its timeout, then say so (the
        disconnect first: a log handler that fails must not leave it running)."""
        if instance is None:
            return
        try:
            self.disconnect(config, instance, None)
        except NotStarted:
            # this thread ran the late create and serves nobody now: it disconnects
            self.disconnect(config, instance, None, here=True)
        self._log.warning(
            "create of config %r returned after its timeout; its late instance was "
            "disconnected (its claim may have been gone: only the fencing token "
            "protected from it)",
            config.id,
            extra=fields(config=config.id),
        )

    def close(self) -> None:
        self.flush_reports()  # a last try for the log lines still waiting for a thread
        self._runners.close()
        self.watchdog.close()
