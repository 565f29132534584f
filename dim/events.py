"""Lifecycle events and their delivery to listeners.

Listeners run on one dedicated thread (``dim-events-<node>``), in the order the events
happened, so a slow listener never holds up a heartbeat or a handoff. A listener that
raises is logged and never propagated.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from enum import Enum
from typing import Any, Callable, Optional

import attrs

from dim.logs import fields

log = logging.getLogger(__name__)


class EventType(str, Enum):
    """Everything a listener can hear about."""

    LEADERSHIP_GAINED = "leadership_gained"
    LEADERSHIP_LOST = "leadership_lost"
    INSTANCE_CREATED = "instance_created"
    INSTANCE_DISCONNECTED = "instance_disconnected"
    INSTANCE_UNHEALTHY = "instance_unhealthy"
    CREATE_FAILED = "create_failed"  # one attempt of create failed (it will be retried)
    INSTANCE_FAILED = "instance_failed"  # create gave up on this node: handed to another
    REBALANCE_APPLIED = "rebalance_applied"  # the leader wrote a new assignment
    LEASE_LOST = "lease_lost"  # a claim was taken by another node: instance stopped
    FENCED = "fenced"  # renewals failed too long: every local instance was stopped
    # a disconnect did not return within disconnect_timeout: its claim was let go while
    # the instance may still run; only its fencing token protects downstream now
    DISCONNECT_TIMEOUT = "disconnect_timeout"
    # Redis lost or rewound data (a restart, a failover to a replica, a clock step): no
    # new claims for Settings.reset_window, every node takes its claims back
    REDIS_RESET = "redis_reset"
    REDIS_LOST = "redis_lost"
    REDIS_RESTORED = "redis_restored"
    CONFIG_ERROR = "config_error"  # get_config failed or returned bad data: kept last good
    LOOP_ERROR = "loop_error"  # a background loop raised: logged, retried with backoff
    # the configs no live node may take changed (tags, capacity): data["unplaced"] maps
    # each such config id to the reason; empty once every config has a place again
    CONFIGS_UNPLACED = "configs_unplaced"
    # the leader counted the cluster (every config_interval, and when it takes over):
    # data holds the epoch and the counts of dim.plan.Census (nodes, configs, running,
    # not_running, unplaceable, pending_handoff)
    CLUSTER_COUNTED = "cluster_counted"


@attrs.frozen
class Event:
    """Something that happened on one node.

    :ivar type: what happened.
    :ivar node_id: the node it happened on.
    :ivar config_id: the config concerned, if any.
    :ivar token: the fencing token of the lease concerned, if any.
    :ivar error: the exception concerned, if any.
    :ivar data: small extra facts (e.g. ``{"moved": 3}`` for a rebalance).
    :ivar time: wall-clock time (``time.time()``) when it happened.
    """

    type: EventType
    node_id: str
    config_id: Any = None
    token: Optional[int] = None
    error: Optional[BaseException] = None
    data: dict[str, Any] = attrs.field(factory=dict)
    time: float = attrs.field(factory=time.time)


Listener = Callable[[Event], Any]


class Dispatcher:
    """Queue of events delivered to listeners on one thread."""

    def __init__(self) -> None:
        self._listeners: list[tuple[Listener, Optional[frozenset[EventType]]]] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Optional[Event]] = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        # the kinds some listener hears (all of them for a listener of every kind), kept
        # with the listeners so that emit() reads one attribute: an event nobody hears
        # wakes no thread
        self._wanted: frozenset[EventType] = frozenset()

    def _listened(self) -> None:
        kinds: set[EventType] = set()
        for _, types in self._listeners:
            kinds.update(EventType if types is None else types)
        self._wanted = frozenset(kinds)

    def add(self, listener: Listener, types: Optional[frozenset[EventType]]) -> None:
        with self._lock:
            self._listeners.append((listener, types))
            self._listened()

    def remove(self, listener: Listener) -> None:
        with self._lock:
            self._listeners = [(f, t) for f, t in self._listeners if f is not listener]
            self._listened()

    def wants(self, kind: EventType) -> bool:
        """Whether some listener hears events of this kind (is it worth making one?)."""
        return kind in self._wanted

    def emit(self, event: Event, *, queue: bool = True, log_it: bool = True) -> None:
        """Queue the event for its listeners, then log it. A thread that must not block
        on a log handler queues it alone (``log_it=False``) and has another thread log it
        later (``queue=False``)."""
        # queued before it is logged: a log handler that blocks holds up no listener
        if queue and event.type in self._wanted:
            self._queue.put(event)
        level = logging.WARNING if event.error is not None else logging.DEBUG
        if log_it and log.isEnabledFor(level):
            log.log(
                level,
                "event %s node=%s config=%r error=%r",
                event.type.value,
                event.node_id,
                event.config_id,
                event.error,
                extra=fields(
                    event.node_id,
                    config=event.config_id,
                    token=event.token,
                    epoch=event.data.get("epoch"),
                ),
            )

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Deliver what is queued, then end the thread (waits at most ``timeout``); a
        dispatcher never told to start is left as it is (it may start later)."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)  # (even to a thread still starting: it ends on it)
        if thread.ident is not None:  # it started (start() may have failed)
            thread.join(timeout)

    def _run(self) -> None:
        from dim.usercode import block_signals

        block_signals()
        while True:
            event = self._queue.get()
            if event is None:
                return
            with self._lock:
                listeners = list(self._listeners)
            for listener, types in listeners:
                if types is not None and event.type not in types:
                    continue
                try:
                    listener(event)
                except BaseException:  # a listener never ends delivery, whatever it raises
                    log.exception("event listener %r raised on %s", listener, event.type.value)
