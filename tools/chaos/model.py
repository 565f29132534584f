"""What the chaos run injects and what it measures against: the fault kinds and the
time limits that dim's settings imply (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import attrs

from tools.chaos.ledger import Record

__all__ = ["FAULTS", "FOLLOW_UPS", "GROUPS", "KINDS", "Bounds", "FaultKind"]


@attrs.frozen
class FaultKind:
    """How a kind of fault is measured.

    :ivar name: the kind, as written in the harness ledger.
    :ivar measure_from: ``"start"`` or ``"end"``: recovery counts from the moment the
        fault was injected, or from the moment its condition cleared (for faults during
        which no node can do anything, such as Redis being unreachable).
    :ivar blackout: while the fault lasts nobody can run anything (Redis unreachable);
        that time is not held against the coverage bound. A fault record may name its
        blackout stretches itself (``detail["blackout"]``: ``[[t0, t1], ...]``) when
        only part of the fault was one.
    :ivar bound: which coverage bound applies (see :class:`Bounds`).
    :ivar description: for the report.
    :ivar group: what the fault hits (``process``, ``redis``, ``network``,
        ``callbacks``); a round that draws a subset of the kinds takes them from every
        group in turn (:meth:`ChaosRun.schedule`).
    """

    name: str
    measure_from: str
    blackout: bool
    bound: str
    description: str
    group: str = "process"


FAULTS: dict[str, FaultKind] = {
    k.name: k
    for k in (
        # processes
        FaultKind("kill_node", "start", False, "base", "kill -9 of a follower"),
        FaultKind("kill_leader", "start", False, "base", "kill -9 of the leader"),
        FaultKind("restart_node", "start", False, "base", "graceful restart (SIGTERM, start)"),
        FaultKind("pause_node", "start", False, "base", "SIGSTOP past node_ttl, then SIGCONT"),
        FaultKind("join_burst", "start", False, "base", "burst of nodes joining at once"),
        # Redis
        FaultKind("redis_restart", "end", True, "reset", "Redis restarted, all data lost", "redis"),
        FaultKind(
            "redis_outage", "end", True, "reset", "Redis stopped past node_ttl, data lost", "redis"
        ),
        FaultKind(
            "stale_snapshot",
            "end",
            True,
            "reset",
            "SAVE, placement changes, kill -9, restart from the stale RDB",
            "redis",
        ),
        FaultKind(
            "lost_writes",
            "end",
            False,
            "reset",
            "every key restored to an earlier DUMP (with its TTL), newer keys deleted",
            "redis",
        ),
        FaultKind(
            "replica_failover",
            "end",
            True,
            "reset",
            "master killed, a lagging (SIGSTOPped) replica promoted, proxies re-pointed",
            "redis",
        ),
        FaultKind(
            "sentinel_failover",
            "end",
            True,
            "reset",
            "Sentinel fails the master over while a burst joins through Sentinel",
            "redis",
        ),
        # network
        FaultKind("proxy_stall", "end", True, "base", "network stalls past node_ttl", "network"),
        FaultKind("slow_redis", "start", False, "base", "proxy adds latency", "network"),
        FaultKind(
            "fence_stall",
            "start",
            False,
            "fence",
            "one node's network stalls for renew_deadline +- 2 heartbeats, slow disconnects",
            "network",
        ),
        # user callbacks and clocks
        FaultKind(
            "get_config_fail",
            "start",
            False,
            "base",
            "get_config raises; leader restarts",
            "callbacks",
        ),
        FaultKind(
            "create_fail", "start", False, "create", "create raises for some configs", "callbacks"
        ),
        FaultKind(
            "healthcheck_hang",
            "end",
            False,
            "base",
            "healthcheck hangs for some configs",
            "callbacks",
        ),
        FaultKind(
            "slow_callbacks",
            "start",
            False,
            "base",
            "create and disconnect slow (within their timeouts) while nodes join and leave",
            "callbacks",
        ),
        FaultKind(
            "disconnect_overrun",
            "start",
            False,
            "base",
            "disconnect overruns disconnect_timeout on one node while configs move",
            "callbacks",
        ),
        FaultKind(
            "base_exceptions",
            "start",
            False,
            "create",
            "each callback raises a BaseException (CancelledError, SystemExit...)",
            "callbacks",
        ),
        FaultKind(
            "get_config_hang",
            "start",
            False,
            "base",
            "get_config hangs past config_timeout while a node dies",
            "callbacks",
        ),
        FaultKind(
            "wall_clock_step",
            "start",
            False,
            "base",
            "a node's wall clock steps an hour forward and back",
            "callbacks",
        ),
    )
}

# What the harness does after some faults, measured like a fault but not one.
FOLLOW_UPS: dict[str, FaultKind] = {
    k.name: k
    for k in (
        FaultKind("replace", "start", False, "base", "a node joins (replacing a dead one)"),
        FaultKind("leave_burst", "start", False, "base", "the burst leaves (SIGTERM at once)"),
    )
}

KINDS: dict[str, FaultKind] = {**FAULTS, **FOLLOW_UPS}

GROUPS: tuple[str, ...] = ("process", "redis", "network", "callbacks")


@attrs.frozen
class Bounds:
    """The time limits that dim's settings imply, plus ``slack`` for a loaded machine.

    The lease model (mirrors :class:`dim.Settings`):

    * ``fence_margin = max(heartbeat_interval, node_ttl / 4)``;
    * ``renew_deadline = node_ttl - fence_margin``: a node that could not renew that
      long fences itself;
    * ``lease = renew_deadline + disconnect_timeout + fence_margin``: how long the claims
      of a crashed node live;
    * ``create_lease = create_timeout + disconnect_timeout + fence_margin +
      heartbeat_interval``: the claim of a config being created;
    * ``reset_window = max(lease, create_lease)``: after Redis lost or rewound data (a
      restart, a failover, lost writes, a stale snapshot) nobody takes a new claim
      that long (running instances keep running).

    The bounds:

    * ``base``: a config whose node died runs again within ``lease`` (its claims
      expire) or ``max(node_ttl, leader_ttl)`` (the leader notices and reassigns,
      a new leader is elected), whichever is longer, plus two heartbeats.
    * ``reset``: after a Redis reset, ``reset_window + lease`` plus two heartbeats.
    * ``create``: ``base`` plus the backoffs of ``create_attempts`` failed attempts.
    * ``wake``: how long a process woken from SIGSTOP may keep its stale instances: its
      fence watchdog runs at once; allow two heartbeats and one socket timeout.
    * ``leader``: a dead leader is replaced within ``leader_ttl`` plus one heartbeat.

    A measured time counts as a violation only beyond bound + ``slack``.
    """

    heartbeat_interval: float
    node_ttl: float
    leader_ttl: float
    disconnect_timeout: float = 5.0
    create_timeout: float = 10.0
    create_attempts: int = 3
    create_backoff: float = 0.01
    create_backoff_max: float = 0.05
    slack: float = 1.5

    @classmethod
    def from_record(cls, run: Mapping[str, Any]) -> Bounds:
        s = run.get("settings", {})
        return cls(
            heartbeat_interval=float(s["heartbeat_interval"]),
            node_ttl=float(s["node_ttl"]),
            leader_ttl=float(s["leader_ttl"]),
            disconnect_timeout=float(s.get("disconnect_timeout", 5.0)),
            create_timeout=float(s.get("create_timeout", 10.0)),
            create_attempts=int(s.get("create_attempts", 3)),
            create_backoff=float(s.get("create_backoff", 0.01)),
            create_backoff_max=float(s.get("create_backoff_max", 0.05)),
            slack=float(run.get("slack", 1.5)),
        )

    # the lease model

    @property
    def fence_margin(self) -> float:
        return max(self.heartbeat_interval, self.node_ttl / 4)

    @property
    def renew_deadline(self) -> float:
        return self.node_ttl - self.fence_margin

    @property
    def lease(self) -> float:
        return self.renew_deadline + self.disconnect_timeout + self.fence_margin

    @property
    def create_lease(self) -> float:
        return (
            self.create_timeout
            + self.disconnect_timeout
            + self.fence_margin
            + self.heartbeat_interval
        )

    @property
    def reset_window(self) -> float:
        return max(self.lease, self.create_lease)

    # the bounds

    @property
    def base(self) -> float:
        return max(self.lease, self.node_ttl, self.leader_ttl) + 2 * self.heartbeat_interval

    @property
    def reset(self) -> float:
        return self.reset_window + self.lease + 2 * self.heartbeat_interval

    @property
    def create(self) -> float:
        waits = 0.0
        for i in range(1, self.create_attempts):
            waits += min(self.create_backoff * 2.0**i, self.create_backoff_max)
        return self.base + waits

    @property
    def fence(self) -> float:
        """A node fenced while it was creating: those claims carry a create's TTL
        (``create_lease``); then another node claims within a heartbeat or two."""
        return max(self.base, self.create_lease + 2 * self.heartbeat_interval)

    @property
    def wake(self) -> float:
        return 2 * self.heartbeat_interval + max(self.heartbeat_interval, 0.25)

    @property
    def leader(self) -> float:
        return self.leader_ttl + self.heartbeat_interval

    @property
    def overrun_tolerance(self) -> float:
        """How much earlier than ``disconnect_timeout`` after its ``disconnecting`` line
        another instance may start and still be explained by an overrun: the line is
        written a moment after dim started the call (one heartbeat)."""
        return self.heartbeat_interval

    def coverage(self, kind: Optional[str]) -> float:
        """The coverage bound (without slack) for a gap that follows a fault of ``kind``."""
        which = KINDS[kind].bound if kind in KINDS else "base"
        return float(getattr(self, which))

    def to_dict(self) -> Record:
        return {
            "base": self.base,
            "reset": self.reset,
            "create": self.create,
            "fence": self.fence,
            "wake": self.wake,
            "leader": self.leader,
            "lease": self.lease,
            "create_lease": self.create_lease,
            "reset_window": self.reset_window,
            "renew_deadline": self.renew_deadline,
            "slack": self.slack,
        }
