"""One config on one node: the slot state machine (docs/protocol.rst, section 5).

Pure: no Redis, no threads of its own, no clock (times are passed in). The reconciler
(:mod:`dim.reconciler`) owns the table of slots and makes every transition under its
lock, through the methods below; each checks that the transition is one of these:

``CLAIMING``
    assigned here, no claim yet (another node holds it, a reset window is
    open, or a cool-down after failures runs).

    * -> ``CREATING`` (:meth:`Slot.claimed`): the claim script gave a fresh token; the
      claim lives ``Settings.create_lease``.
    * -> gone: no longer assigned here.

``CREATING``
    claim held; ``create`` attempts run on a worker. An attempt starts only
    while the claim is sure to outlive it and the disconnect of what it returns.

    * -> ``RUNNING`` (:meth:`Slot.created`): ``create`` returned in time, the slot is
      still wanted, the node is not fenced and the claim not lost.
    * -> gone: cancelled (moved away, removed, fenced, closing, claim lost); whatever
      ``create`` returns is disconnected first, then the claim is released.
    * -> ``CLAIMING`` (:meth:`Slot.gave_up`): ``create`` failed ``create_attempts``
      times; the claim is released and the config handed to another node for
      ``failure_cooldown``.

``RUNNING``
    claim held, instance up.

    * -> ``STOPPING`` (:meth:`Slot.take_stop`): moved away or removed; claim lost
      (``LEASE_LOST``); unhealthy or its config changed (to be recreated); fenced;
      closing.

``STOPPING``
    its ``disconnect`` is queued or running; the claim stays held, and renewed,
    until it has returned (or overrun ``disconnect_timeout``, which is reported).

    * -> ``CREATING`` (:meth:`Slot.recreating`): recreated in place, only once the
      disconnect has returned (:meth:`Slot.stopped`); the claim then gets a new, larger
      token (each incarnation has its own).
    * -> gone: the claim is released (when fenced: kept as an *orphan* and released once
      Redis answers; when lost: nothing to release).

The reconciler removes a slot from its table only once no instance of it can exist any
more, so a config is never created on this node while its previous instance is still
stopping: break before make, on one node as across nodes.
"""

from __future__ import annotations

import enum
import threading
from typing import Any, Optional

import attrs

from dim.configs import Config


class State(enum.Enum):
    CLAIMING = "claiming"
    CREATING = "creating"
    RUNNING = "running"
    STOPPING = "stopping"


#: Every transition a slot may make (leaving the table is :meth:`Slot.may_leave`).
TRANSITIONS = frozenset(
    {
        (State.CLAIMING, State.CREATING),
        (State.CREATING, State.RUNNING),
        (State.CREATING, State.CLAIMING),
        (State.RUNNING, State.STOPPING),
        (State.STOPPING, State.CREATING),
    }
)


class TransitionError(RuntimeError):
    """A transition the state machine does not have (a bug in dim, never user input)."""


@attrs.frozen
class Lease:
    """The right to run one config, as held by this node.

    :ivar config_id: the config.
    :ivar token: the fencing token: every incarnation of a config (a new owner, or the
        same node creating it again) gets a larger one, across Redis restarts and
        failovers too, so a downstream system that remembers the highest token it has
        seen can reject a stale owner.
    :ivar node_id: the node holding it.
    """

    config_id: Any
    token: int
    node_id: str


@attrs.define(eq=False)
class Slot:
    config: Config
    state: State = State.CLAIMING
    token: Optional[int] = None
    instance: Any = None
    retry_at: float = 0.0
    healthy: Optional[bool] = None
    cancel: threading.Event = attrs.field(factory=threading.Event)
    # monotonic time until which the claim is sure to live in Redis (renewal sent + TTL),
    # read only while CREATING (claimed and retokened set it anew): once create returns,
    # a settle cuts the claim to a lease without lowering it here
    lease_until: float = 0.0
    disconnecting: bool = False  # a thread has taken the disconnect of the instance
    recreate: Optional[Config] = None  # after the disconnect, create again with this
    lost: bool = False  # the claim is somebody else's now: never renew or release it
    timed_out: bool = False  # the last create attempt overran its timeout
    create_for: Optional[int] = None  # the token whose create task has begun
    # create attempts begun since the claim (or the recreate), and the failure of the
    # last one when it overran: the task goes on, on another thread, from there
    attempts: int = 0
    overrun: Optional[BaseException] = None
    kept: bool = False  # kept running outside the share at a plan (dim.share.keep)

    @property
    def ckey(self) -> str:
        return self.config.ckey

    def _to(self, source: State, target: State) -> None:
        """The one place a slot changes state: ``source -> target`` must be in the table
        and the slot in ``source``."""
        if self.state is not source or (source, target) not in TRANSITIONS:
            raise TransitionError(
                f"slot {self.ckey!r}: {source.name} -> {target.name} while {self.state.name}"
            )
        self.state = target

    def claimed(self, token: int, lease_until: float) -> None:
        """CLAIMING -> CREATING: this node holds the claim with ``token``."""
        if token <= 0 or self.instance is not None:
            raise TransitionError(f"slot {self.ckey!r}: claimed with {token} over an instance")
        self._to(State.CLAIMING, State.CREATING)
        self.token = token
        self.lost = False
        self.lease_until = lease_until
        self.cancel = threading.Event()
        self.attempts, self.overrun = 0, None

    def created(self, instance: Any) -> None:
        """CREATING -> RUNNING: ``create`` returned this instance."""
        self._to(State.CREATING, State.RUNNING)
        self.instance = instance
        self.healthy = None

    def gave_up(self, retry_at: float) -> None:
        """CREATING -> CLAIMING: ``create`` kept failing; claim again at ``retry_at``."""
        self._to(State.CREATING, State.CLAIMING)
        self.token = None
        self.retry_at = retry_at

    def stop_free(self) -> bool:
        """Whether :meth:`take_stop` would hand over the disconnect now."""
        if self.instance is None:
            return False
        return self.state is State.RUNNING or (
            self.state is State.STOPPING and not self.disconnecting
        )

    def take_stop(self) -> bool:
        """RUNNING -> STOPPING; True if the caller now owns the disconnect (nobody took
        it before), False if it is taken already or there is no instance to stop."""
        if self.state is State.RUNNING:
            self._to(State.RUNNING, State.STOPPING)
        if self.state is not State.STOPPING or self.disconnecting or self.instance is None:
            return False
        self.disconnecting = True
        return True

    def stopped(self) -> None:
        """The disconnect of the instance returned (or was given up on)."""
        self.instance = None
        self.disconnecting = False

    def retokened(self, token: int, lease_until: float) -> None:
        """A recreated slot got its new incarnation's token (larger than the last)."""
        if self.state is not State.CREATING or self.token is None or token <= self.token:
            raise TransitionError(f"slot {self.ckey!r}: token {token} after {self.token}")
        self.token = token
        self.lease_until = lease_until

    def recreating(self, config: Config) -> None:
        """STOPPING -> CREATING, in place, with ``config``: only after :meth:`stopped`."""
        if self.instance is not None or self.disconnecting:
            raise TransitionError(f"slot {self.ckey!r}: recreated before its disconnect")
        self._to(State.STOPPING, State.CREATING)
        self.config = config
        self.cancel = threading.Event()
        self.attempts, self.overrun = 0, None
