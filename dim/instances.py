"""The user's ``create`` and ``disconnect``, called with their timeouts and reported.

:class:`InstanceCalls` owns the threads that run those calls (each call with its
timeout on a thread of its own, so a hanging callback costs a thread, never a loop) and
the retry policy of ``create`` (tenacity: ``create_attempts`` tries with exponential
backoff, cut short when the attempt is cancelled). It knows nothing of claims or slots:
the reconciler (:mod:`dim.reconciler`) decides when to call, this module how.
"""

from __future__ import annotations

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
        # times the disconnects that stop threads run themselves
        self.watchdog = Watchdog(f"dim-watch-{node_id}", reporter=self._report_apart)

    def create(self, config: Config) -> Any:
        """One ``create`` attempt within ``create_timeout``; an instance returned after it
        is disconnected when it arrives. Raises CallTimeout, CreateError (None returned)
        or what ``create`` raised."""
        instance = self._runners.call(
            self.callbacks.create,
            config.value,
            self._settings.create_timeout,
            f"create of config {config.id!r}",
            on_late=lambda late: self._dispose_late(config, late),
        )
        if instance is None:
            raise CreateError(f"create returned None for config id {config.id!r}", config.id)
        return instance

    def retrying(
        self, cancel: threading.Event, config_id: Any, token: Callable[[], Optional[int]]
    ) -> tenacity.Retrying:
        """The retry policy of one create task: stops on ``cancel`` and on
        :class:`Cancelled`, reports each failed attempt (``CREATE_FAILED``)."""
        s = self._settings

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self._log.warning(
                "create of config %r failed (attempt %d of %d): %r",
                config_id,
                state.attempt_number,
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
                    data={"attempt": state.attempt_number},
                )
            )

        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(s.create_attempts)
            | tenacity.stop_when_event_set(cancel),
            wait=tenacity.wait_exponential(multiplier=s.create_backoff, max=s.create_backoff_max),
            sleep=tenacity.sleep_using_event(cancel),
            retry=tenacity.retry_if_not_exception_type(Cancelled),
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
        """The watchdog's reports, on a call thread: a log handler that blocks holds up
        that thread, not the watchdog. Here when no thread can be started."""

        def run(_: None) -> None:
            for report in reports:
                try:
                    report()
                except Exception:  # one failed report must not cost the others
                    self._log.exception("reporting an overrun failed")

        try:
            self._runners.start(run, None)
        except Exception:  # RuntimeError: can't start new thread; MemoryError
            run(None)

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
        if instance is None:
            return
        self._log.warning(
            "create of config %r returned after its timeout; disconnecting the late instance "
            "(its claim may be gone: only the fencing token protects from it)",
            config.id,
            extra=fields(config=config.id),
        )
        try:
            self.disconnect(config, instance, None)
        except NotStarted:
            # this thread ran the late create and serves nobody now: it disconnects
            self.disconnect(config, instance, None, here=True)

    def close(self) -> None:
        self._runners.close()
        self.watchdog.close()
