"""One started node: its identity, shared state, the heartbeat and the fence watchdog.

A :class:`Node` exists from ``Manager.start()`` to ``Manager.stop()``; a restarted manager
gets a new node with a new id. The loops share it and talk to each other only through it
(``wake`` calls and a few flags), never through Redis.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable, Optional

import redis

from dim.constraints import format_tags
from dim.events import Dispatcher, Event, EventType
from dim.logs import NodeLog, fields
from dim.loop import Loop
from dim.messages import Kind, Message
from dim.protocol import ClaimStatus, owner, parse_owner
from dim.renewal import Renewal
from dim.roles import LeaderRole, ReconcilerRole, Runnable
from dim.settings import Settings
from dim.store import Store

log = logging.getLogger(__name__)

#: A leader loop that has shown no progress for a lease but whose thread has used a
#: CPU for at least this share of the time since its last progress is computing, not
#: stuck (a blocked thread uses none; a computing one keeps more than this share on a
#: machine loaded tenfold): its lead is renewed, for at most BUSY_MAX seconds since
#: that progress (a plan over a million configs took up to 43 s on a 2-core machine:
#: docs/performance.rst).
BUSY_SHARE = 0.02
BUSY_MAX = 60.0


def new_node_id() -> str:
    """``<host>-<pid>-<random>``: unique for every start."""
    host = socket.gethostname().split(".")[0].replace(":", "_")[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Node:
    """Shared runtime state of one started manager.

    Each flag has one writer, named next to it; the others only read it. The loops know
    each other through :mod:`dim.roles` (``reconciler``, ``leader``), set once by the
    manager before any loop starts.
    """

    def __init__(
        self,
        *,
        store: Store,
        settings: Settings,
        dispatcher: Dispatcher,
        weight: float,
        clock: Callable[[], float] = time.monotonic,
        node_id: Optional[str] = None,
        tags: frozenset[str] = frozenset(),
        capacity: Optional[int] = None,
    ) -> None:
        self.node_id = node_id or new_node_id()
        self.static = node_id is not None  # a name the user chose, kept across restarts
        self.tags = tags
        self.capacity = capacity
        # this process's claim on the node id: a second process with the same static
        # name is refused while this session's description lives
        self.session = secrets.token_hex(6)
        # writer: heartbeat. The last heartbeat found the node id owned by another.
        self.name_taken = False
        self.store = store
        self.settings = settings
        self.dispatcher = dispatcher
        self.weight = weight
        self.clock = clock
        self.pid = os.getpid()
        self.started_at = time.time()
        self.stop_event = threading.Event()
        self.leaving = False  # writer: Manager.stop (a graceful stop began)
        # writer: heartbeat. When the last successful heartbeat was *sent*: every claim
        # it renewed lives until at least then plus its TTL (dim.renewal)
        self.renewal = Renewal(settings.heartbeat_interval, settings.renew_deadline, clock())
        self.fenced = False  # writer: reconciler (fence, unfence), under the table's lock
        self.redis_ok = True  # writer: heartbeat
        # writer: set_leader only, under its lock ('<me>:<epoch>' while this node leads)
        self.leader_value: Optional[str] = None
        self.epoch = 0
        self._info: Optional[dict[str, str]] = None
        self.reconciler: ReconcilerRole
        self.leader: LeaderRole
        self.listener: Optional[Loop[Any]] = None
        # writer: listener, once it has subscribed (or once the node leaves: it never
        # will); the reconciler's first read waits for it, so that every write after that
        # read reaches the node as a hint
        self.subscribed = threading.Event()
        self.health: Optional[Loop[Any]] = None
        self.heartbeat = Heartbeat(self)
        self.watchdog = FenceWatchdog(self)
        self._lock = threading.Lock()
        self._log = NodeLog(log, self.node_id, lambda: self.epoch if self.is_leader else None)

    def __repr__(self) -> str:
        return f"<Node {self.node_id} leader={self.is_leader} fenced={self.fenced}>"

    @property
    def is_leader(self) -> bool:
        return self.leader_value is not None

    def emit(self, event: Event, *, queue: bool = True, log_it: bool = True) -> None:
        self.dispatcher.emit(event, queue=queue, log_it=log_it)

    def info(self) -> dict[str, str]:
        """This node's description (constant for its life, built once: every heartbeat
        sends it, and Redis stores it only when the hash is missing)."""
        if self._info is None:
            from dim import __version__

            self._info = {
                "host": socket.gethostname(),
                "pid": str(self.pid),
                "started": f"{self.started_at:.3f}",
                "weight": repr(self.weight),
                "version": __version__,
                "session": self.session,
                "static": "1" if self.static else "0",
                "tags": format_tags(self.tags),
                "capacity": "" if self.capacity is None else str(self.capacity),
            }
        return self._info

    def set_leader(self, value: Optional[str]) -> None:
        """Record leadership gained (value '<me>:<epoch>') or lost (None)."""
        with self._lock:
            old = self.leader_value
            if value == old:
                return
            self.leader_value = value
            if value is not None:
                self.epoch = parse_owner(value)[1]  # type: ignore[index]
        if old is not None:
            lost = parse_owner(old)
            self._log.info(
                "node %s lost leadership (%s)",
                self.node_id,
                old,
                extra=fields(epoch=lost[1] if lost else None),
            )
            self.emit(Event(EventType.LEADERSHIP_LOST, self.node_id, data={"leader": old}))
        if value is not None:
            self._log.info("node %s is the leader (epoch %d)", self.node_id, self.epoch)
            self.emit(Event(EventType.LEADERSHIP_GAINED, self.node_id, data={"epoch": self.epoch}))
            self.leader.wake()

    def wake_all(self) -> None:
        for loop in self.loops():
            loop.wake()

    def loops(self) -> list[Runnable]:
        out: list[Runnable] = [self.heartbeat, self.watchdog, self.reconciler, self.leader]
        return out + [loop for loop in (self.listener, self.health) if loop is not None]


class Heartbeat(Loop["Node"]):
    """The one Lua call per interval: membership, claims, leadership, version (protocol.rst §2)."""

    role = "heartbeat"

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        # published by the heartbeat script when it (re)adds this node to the membership
        self._joined = Message(Kind.JOINED, node.node_id)
        self._now = False
        self._reset_seen = ""
        self._stale = 0  # stale replies in a row
        # the leader loop's last sign of life when we last warned, and why
        self._stalled: tuple[float, bool] = (0.0, False)
        # the leader loop's last sign of life, and its CPU seconds soon after
        self._leader_cpu: Optional[tuple[float, float]] = None
        self._log = NodeLog(log, node.node_id)

    def _leader_busy(self, mark: float, quiet: float) -> bool:
        """The leader loop's thread has used a CPU for at least BUSY_SHARE of the
        ``quiet`` seconds since its last progress at ``mark`` (it computes; a loop
        blocked on a lock or a socket uses none). It is sampled at the first beat after
        each progress, so the share is measured over a lease or more, not over one beat.
        ``mark`` is the progress ``quiet`` was measured from: one that comes between
        the two reads does not reset the sample of this beat."""
        cpu = self.node.leader.cpu_time()
        if cpu is None:
            self._leader_cpu = None
            return False
        if self._leader_cpu is None or self._leader_cpu[0] != mark:
            self._leader_cpu = (mark, cpu)  # about its CPU at its last progress
            return False
        return cpu - self._leader_cpu[1] >= BUSY_SHARE * quiet

    def beat(self) -> None:
        """One heartbeat; raises redis errors to the caller."""
        node = self.node
        s = node.settings
        leader_value = node.leader_value
        renew_leader = ""
        mark = node.leader.alive_at
        quiet = node.clock() - mark
        # (only a leader reads its loop's CPU: 20 us a beat)
        busy = leader_value is not None and self._leader_busy(mark, quiet) and quiet < BUSY_MAX
        if leader_value is not None and (quiet < s.leader_ttl - s.heartbeat_interval or busy):
            # renew only while the leader loop itself is alive: a leader whose loop is
            # stuck (blocked, or computing for over BUSY_MAX) must lose the lease rather than
            # freeze the cluster; one that computes (a plan of a million configs) is
            # alive, and a new leader would only start the same computation again
            renew_leader = leader_value
        elif leader_value is not None and self._stalled != (mark, quiet >= BUSY_MAX):
            self._stalled = (mark, quiet >= BUSY_MAX)  # once per stall and reason
            self._log.warning(
                "node %s: the leader loop has shown no progress for %.1fs (leader_ttl %gs "
                "less heartbeat_interval %gs) and is %s: the lead lapses. If it was "
                "reading or writing very many configs, raise leader_ttl",
                node.node_id,
                quiet,
                s.leader_ttl,
                s.heartbeat_interval,
                f"computing for over {BUSY_MAX:g}s" if quiet >= BUSY_MAX else "blocked",
            )
        leads = leader_value is not None and not node.leaving
        running, unhealthy = node.reconciler.table.health()
        health = f"{running} {unhealthy}"
        with node.reconciler.claims_lock:
            claims = node.reconciler.table.held_claims(s)
            sent = node.clock()
            result = node.store.heartbeat(
                node.node_id,
                node_ttl=s.node_ttl,
                leader_ttl=s.leader_ttl,
                leaving=node.leaving,
                may_lead=not node.leaving,
                renew_leader=renew_leader,
                info=node.info(),
                claims={c: (owner(node.node_id, t), ttl) for c, (t, ttl) in claims.items()},
                view=leads,
                joined=self._joined,
                session=node.session,
                health=health,
            )
        if result.stale:
            # it came too late to count (a stalled connection), or the server's clock
            # stepped: nothing was renewed; beat again at once with a fresh estimate
            self._stale += 1
            self._now = self._stale == 1
            return
        self._stale = 0
        was_taken, node.name_taken = node.name_taken, result.taken
        if result.taken:
            if not was_taken:
                self._log.error(
                    "node id %s belongs to another live process: this one renews nothing",
                    node.node_id,
                )
            return
        if result.gone:
            return  # this node has left: nothing was renewed, nothing to resume
        node.renewal.renewed(sent)
        if not node.redis_ok:
            node.redis_ok = True
            self._log.warning("node %s reached Redis again", node.node_id)
            node.emit(Event(EventType.REDIS_RESTORED, node.node_id))
        node.reconciler.renewed(claims, result.claims, sent)
        self._note_reset(result.header.reset_id)
        # lost claims first: an instance stopping after the fence must not be recreated
        # under a claim this very heartbeat found taken
        for ckey, status in result.claims.items():
            if status in (ClaimStatus.LOST, ClaimStatus.RELEASED):
                node.reconciler.lease_lost(ckey, claims[ckey][0], status)
            elif status == ClaimStatus.TAKEN_BACK:
                self._log.warning(
                    "claim %r was missing in Redis; node %s took it back", ckey, node.node_id
                )
        if node.fenced:
            node.reconciler.unfence()
        mine = result.leader is not None and result.leader.startswith(node.node_id + ":")
        if mine and not node.leaving:
            node.set_leader(result.leader)
        elif node.is_leader:
            node.set_leader(None)
        node.reconciler.saw_version(result.version, sent)
        if result.view is not None and node.is_leader:
            node.leader.observe(result.view, sent)

    def _note_reset(self, reset_id: str) -> None:
        """A reset window this node had not heard of: say so, and read everything again."""
        node = self.node
        if not reset_id or reset_id == self._reset_seen:
            return
        self._reset_seen = reset_id
        era = node.store.era
        self._log.warning(
            "node %s: Redis lost or rewound data (%s): no new claims for %.1fs while every "
            "node takes its claims back",
            node.node_id,
            reset_id.split(" ")[0],
            max(0.0, era.reset_until - node.clock()),
        )
        node.emit(Event(EventType.REDIS_RESET, node.node_id, data={"reset": reset_id}))
        node.reconciler.wake(read=True)
        node.leader.wake()

    def wake(self) -> None:
        """Beat now rather than when the next one is due (a leader just stepped down)."""
        self._now = True
        super().wake()

    def tick(self) -> float:
        node = self.node
        now, self._now = self._now, False
        due = node.renewal.heartbeat_in(node.clock())
        if not now and due > 0.001:
            return due  # start() or a woken beat just renewed everything
        try:
            self.beat()
        except redis.RedisError as exc:
            node = self.node
            if node.redis_ok:
                node.redis_ok = False
                self._log.warning("node %s cannot reach Redis: %r", node.node_id, exc)
                node.emit(Event(EventType.REDIS_LOST, node.node_id, error=exc))
            # retry sooner than a full interval: every renewal counts toward the fence
            return node.settings.heartbeat_interval / 2
        if self._now:
            return 0.0  # a stale reply: beat again now
        return self.node.settings.heartbeat_interval


class FenceWatchdog(Loop["Node"]):
    """Stops every local instance when renewals have failed for too long (protocol.rst §6).

    It never touches Redis, so a stalled connection cannot delay it.
    """

    role = "fence"

    def tick(self) -> float:
        node = self.node
        remaining = node.renewal.fence_in(node.clock())
        if remaining > 0:
            return remaining
        if not node.fenced:
            node.reconciler.fence()
        return node.settings.heartbeat_interval
