"""A chaos harness for dim: real node processes, a real Redis, real faults, and a checker.

The pieces, each usable on its own (the test suite uses them too):

* **Ledgers.** Every node process appends one JSON line per lifecycle event to its own
  ledger file (:class:`LedgerFile`, one ``os.write`` per line on an ``O_APPEND``
  descriptor)::

      {"t": <time.monotonic()>, "pid": ..., "node": <node id>, "id": <config id>,
       "ev": "create" | "disconnect", "token": <fencing token>, "inst": <serial>}

  plus ``ready``/``stopped`` lines, ``event`` lines for the dim events that explain
  faults (``fenced``, ``disconnect_timeout``, ``redis_reset``...), ``disconnecting``
  lines when a slowed or raising ``disconnect`` is called, and ``get_config`` lines
  while the control file asks for them. ``time.monotonic()`` is system-wide on Linux,
  so times of different processes compare. The harness keeps a ledger of its own
  (``harness.jsonl``) with what it did: the run's settings, each fault (start, end,
  when the cluster had settled again), processes killed, paused or exited, and what
  Redis held at the end.
* **The node** (``python -m dim.chaos node ...``, :func:`node_main`): a real
  :class:`dim.Manager` over ``[{"id": 0}, ..., {"id": N-1}]`` whose ``create`` and
  ``disconnect`` write the ledger. A small JSON *control file*, re-read whenever it
  changes, makes ``get_config`` fail or hang, ``create`` fail for some configs, any
  callback raise a ``BaseException`` (``CancelledError``, ``SystemExit``,
  ``KeyboardInterrupt``, a ``GreenletExit``), ``healthcheck`` report some instances
  unhealthy or hang, ``create``/``disconnect`` slow, the config count change, or the
  process's wall clock step (:func:`write_control`). It reaches Redis by URL or through
  Sentinel (``--sentinel``).
* **The proxy** (:class:`ChaosProxy`): a TCP proxy of ours between one node (or all)
  and Redis that can add latency, stall all traffic, drop every connection, hold back
  the heartbeats of one node, or be re-pointed at another server (a failover). The run
  gives each node a proxy of its own, so one node can be cut off alone.
* **The processes** (:class:`NodeProcs`): start, kill -9, SIGSTOP/SIGCONT, SIGTERM node
  processes, and follow their ledgers (:class:`LedgerView`) to tell when every config
  runs exactly once again.
* **The run** (:class:`ChaosRun`, ``python -m dim.chaos run``): a private
  ``redis-server``, N nodes behind their proxies, and a seeded schedule of faults (the
  kinds are in :data:`FAULTS`); after each fault it waits for the cluster to settle and
  measures the recovery. Redis faults include a restart from a stale snapshot, writes
  lost by restoring an earlier ``DUMP``, a failover to a lagging replica, and a
  Sentinel failover in the middle of moves.
* **The checker** (:func:`check`): a pure function over ledger records that reports
  overlaps (one config alive twice at once, on two nodes or on one; a woken SIGSTOPped
  process is measured separately, and so is an overlap a ``disconnect`` that overran
  ``disconnect_timeout`` explains), fencing tokens that did not grow from one instance
  of a config to the next, coverage gaps longer than the settings allow, recovery
  times per fault type, and a dirty shutdown (non-zero exits, claims or members left
  in Redis).

``benchmarks/chaos.py`` is the command line for people; the README's "Chaos testing"
section describes what is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import hashlib
import itertools
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import attrs
import redis

from dim import Event, EventType, Manager, Settings, scripts
from dim.keys import Keys
from dim.protocol import parse_owner
from dim.testing import RedisServer, wait_until

__all__ = [
    "FAULTS",
    "Bounds",
    "ChaosOptions",
    "ChaosProxy",
    "ChaosRun",
    "Interval",
    "LedgerFile",
    "LedgerView",
    "NodeProcs",
    "Report",
    "check",
    "format_report",
    "leftovers",
    "node_main",
    "overlaps",
    "read_records",
    "token_regressions",
    "write_control",
]

log = logging.getLogger(__name__)

Record = dict[str, Any]


def _pause(seconds: float) -> None:
    """Pace the calling thread without ``time.sleep``."""
    threading.Event().wait(max(0.0, seconds))


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


# -- ledgers -----------------------------------------------------------------------------


class LedgerFile:
    """Append-only JSON lines, one ``os.write`` per line (lines of processes never mix)."""

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self.path = str(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pid = os.getpid()

    def write(self, **fields: Any) -> None:
        record: Record = {"t": time.monotonic(), "pid": self.pid}
        record.update(fields)
        os.write(self.fd, (json.dumps(record, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _parse_lines(data: bytes) -> list[Record]:
    out = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:  # a line cut short by kill -9 (never seen: one write per line)
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def read_records(paths: Iterable[Union[str, os.PathLike[str]]]) -> list[Record]:
    """Every complete record of these ledger files, in file order, file after file."""
    out: list[Record] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            continue
        # the last piece is "" or a line still being written
        complete, _, _ = data.rpartition(b"\n")
        out.extend(_parse_lines(complete))
    return out


class _Tail:
    """Reads what was appended to some files since the last call."""

    def __init__(self) -> None:
        self._offsets: dict[str, int] = {}

    def read(self, paths: Iterable[Path]) -> list[Record]:
        out: list[Record] = []
        for path in paths:
            key = str(path)
            offset = self._offsets.get(key, 0)
            try:
                with open(key, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            self._offsets[key] = offset + end + 1
            out.extend(_parse_lines(data[:end]))
        return out


class Interval:
    """One instance's life: from the ``create`` call to the ``disconnect`` (or None)."""

    __slots__ = ("cid", "end", "inst", "node", "pid", "start", "token")

    def __init__(
        self, cid: Any, pid: int, node: str, inst: int, token: Optional[int], start: float
    ) -> None:
        self.cid = cid
        self.pid = pid
        self.node = node
        self.inst = inst
        self.token = token
        self.start = start
        self.end: Optional[float] = None

    def __repr__(self) -> str:
        end = "open" if self.end is None else f"{self.end:.3f}"
        return (
            f"<config {self.cid} pid {self.pid} #{self.inst} token {self.token} "
            f"{self.start:.3f}..{end}>"
        )

    def to_dict(self) -> Record:
        return {
            "config": self.cid,
            "pid": self.pid,
            "node": self.node,
            "inst": self.inst,
            "token": self.token,
            "start": self.start,
            "end": self.end,
        }


class LedgerView:
    """Node ledger records rebuilt into per-instance intervals; grows with :meth:`extend`."""

    def __init__(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        self.records: list[Mapping[str, Any]] = []
        self.ready: dict[int, str] = {}  # pid -> node id
        self.events: list[Mapping[str, Any]] = []
        self.stopped: dict[int, float] = {}
        self.intervals: list[Interval] = []
        self.unmatched: list[Mapping[str, Any]] = []  # disconnects without a create
        # create called while its manager was stopping: Manager.lease() says None then
        self.stop_creates: list[Mapping[str, Any]] = []
        self.missing_token: list[Mapping[str, Any]] = []
        # (node id, serial) -> when its slowed or raising disconnect was called
        self.disconnecting: dict[tuple[Any, int], float] = {}
        # slowed creates: (node id, serial) -> when create was called, and those returned
        self.slow_creates: dict[tuple[Any, int], float] = {}
        self.created: set[tuple[Any, int]] = set()
        self.get_config_calls: list[Mapping[str, Any]] = []
        # keyed by (node id, serial): a pid may be reused by a later process
        self._by_inst: dict[tuple[Any, int], Interval] = {}
        self._open: dict[tuple[Any, int], Interval] = {}
        self.extend(records)

    @classmethod
    def from_paths(cls, paths: Iterable[Union[str, os.PathLike[str]]]) -> LedgerView:
        return cls(read_records(paths))

    def extend(self, records: Iterable[Mapping[str, Any]]) -> None:
        for r in records:
            self.records.append(r)
            ev = r.get("ev")
            if ev == "ready":
                self.ready[r["pid"]] = r["node"]
            elif ev == "stopped":
                self.stopped[r["pid"]] = r["t"]
            elif ev == "event":
                self.events.append(r)
            elif ev == "create":
                iv = Interval(r["id"], r["pid"], r["node"], r["inst"], r.get("token"), r["t"])
                key = (r.get("node") or r["pid"], r["inst"])
                self._by_inst[key] = iv
                self._open[key] = iv
                self.intervals.append(iv)
                if r.get("delay"):
                    self.slow_creates[key] = r["t"]
                if r.get("during_stop"):
                    self.stop_creates.append(r)
                elif not r.get("token"):
                    self.missing_token.append(r)
            elif ev == "disconnecting":
                self.disconnecting.setdefault((r.get("node") or r["pid"], r["inst"]), r["t"])
            elif ev == "created":
                self.created.add((r.get("node") or r["pid"], r["inst"]))
            elif ev == "get_config":
                self.get_config_calls.append(r)
            elif ev == "disconnect":
                key = (r.get("node") or r["pid"], r["inst"])
                found = self._by_inst.get(key)
                if found is None or found.end is not None:
                    self.unmatched.append(r)
                else:
                    found.end = r["t"]
                    self._open.pop(key, None)

    def fenced(self, since: float) -> set[int]:
        """Pids whose node fenced itself (renewals failed too long) after ``since``."""
        return {r["pid"] for r in self.events if r.get("type") == "fenced" and r["t"] > since}

    def node_pids(self) -> dict[str, int]:
        return {node: pid for pid, node in self.ready.items()}

    def open_intervals(self, pids: Optional[set[int]] = None) -> list[Interval]:
        """Instances not disconnected yet, of the current processes ``pids`` (all if None)."""
        if pids is None:
            return list(self._open.values())
        # the node a pid runs now: an earlier process with the same pid is not it
        nodes = {self.ready.get(pid) for pid in pids}
        return [iv for iv in self._open.values() if iv.pid in pids and iv.node in nodes]

    def running(self, pids: set[int]) -> dict[Any, list[int]]:
        """Who runs what now: config id -> pids with an open interval for it."""
        out: dict[Any, list[int]] = defaultdict(list)
        for iv in self.open_intervals(pids):
            out[iv.cid].append(iv.pid)
        return dict(out)

    def counts(self, pids: set[int]) -> list[int]:
        per_pid = {pid: 0 for pid in pids}
        for iv in self.open_intervals(pids):
            per_pid[iv.pid] += 1
        return sorted(per_pid.values())


def overlaps(
    intervals: Iterable[Interval],
    closed_at: Optional[Mapping[int, float]] = None,
    clip: Optional[Mapping[int, tuple[float, float]]] = None,
) -> list[tuple[Interval, Interval]]:
    """Pairs of instances of one config alive at the same time.

    ``closed_at[pid]``: that process died then; its open intervals end there.
    ``clip[pid] = (stopped, resumed)``: that process was frozen; an interval of it that
    was alive across the freeze is counted only up to ``stopped`` (the window after it
    woke is measured separately).
    """
    closed_at = closed_at or {}
    clip = clip or {}
    spans: dict[Any, list[tuple[float, float, Interval]]] = defaultdict(list)
    for iv in intervals:
        end = iv.end
        if end is None:
            end = closed_at.get(iv.pid, float("inf"))
        if iv.pid in clip:
            stopped, resumed = clip[iv.pid]
            if iv.start < stopped and end > resumed:
                end = stopped
        spans[iv.cid].append((iv.start, end, iv))
    found = []
    for entries in spans.values():
        entries.sort(key=lambda e: e[0])
        for i, (_a_start, a_end, a) in enumerate(entries):
            for b_start, _b_end, b in entries[i + 1 :]:
                if b_start >= a_end:
                    break
                found.append((a, b))
    return found


def token_regressions(intervals: Iterable[Interval]) -> list[tuple[Interval, Interval]]:
    """Consecutive instances of one config (by create time) whose token did not grow.

    Each incarnation of a config, on another node or recreated on the same one, must get
    a strictly larger fencing token than the one before: an equal token is a regression
    too (downstream could not tell the two apart).
    """
    by_cid: dict[Any, list[Interval]] = defaultdict(list)
    for iv in intervals:
        if iv.token is not None:  # see LedgerView.stop_creates
            by_cid[iv.cid].append(iv)
    bad = []
    for ivs in by_cid.values():
        ivs.sort(key=lambda iv: iv.start)
        for a, b in zip(ivs, ivs[1:]):
            if b.token is not None and a.token is not None and b.token <= a.token:
                bad.append((a, b))
    return bad


# -- the checker (pure) ------------------------------------------------------------------


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


@attrs.define
class Report:
    """What :func:`check` found. ``ok`` is False as soon as one invariant failed."""

    bounds: Optional[Bounds]
    configs: list[Any] = attrs.field(factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    instances: int = 0
    #: (1) two instances of one config alive at once, on two nodes or on one (never
    #: allowed, except as explained in :attr:`overruns`)
    overlaps: list[Record] = attrs.field(factory=list)
    #: (1) overlaps explained by a disconnect that overran disconnect_timeout (reported
    #: by a ``disconnect_timeout`` event): after the timeout, dim let the claim go and
    #: only the fencing token protects, until the overrunning disconnect returns
    overruns: list[Record] = attrs.field(factory=list)
    #: (1) disconnects that ran past disconnect_timeout without a disconnect_timeout event
    unreported_overruns: list[Record] = attrs.field(factory=list)
    #: (1) a process woken from SIGSTOP still ran a config another node had taken
    paused_overlaps: list[Record] = attrs.field(factory=list)
    #: (1) per pause: how long after SIGCONT its stale instances kept running
    wake_lags: list[Record] = attrs.field(factory=list)
    #: (2) a config's fencing token went down
    token_regressions: list[Record] = attrs.field(factory=list)
    missing_tokens: list[Record] = attrs.field(factory=list)
    unmatched: list[Record] = attrs.field(factory=list)
    #: (3) every coverage gap (a config running nowhere) and those over the bound
    gaps: list[Record] = attrs.field(factory=list)
    gaps_over_bound: list[Record] = attrs.field(factory=list)
    #: (3) per fault: recovery measured from the ledgers, and when the harness saw it settle
    faults: list[Record] = attrs.field(factory=list)
    leader_failovers: list[Record] = attrs.field(factory=list)
    #: (3) get_config hangs after which the leader never called get_config again
    config_stuck: list[Record] = attrs.field(factory=list)
    #: (4) the end: exit codes, instances left running, what Redis still held
    exits: list[Record] = attrs.field(factory=list)
    open_at_end: list[Record] = attrs.field(factory=list)
    leftovers: Optional[list[str]] = None
    harness_errors: list[str] = attrs.field(factory=list)

    @property
    def violations(self) -> list[str]:
        """One line per failed invariant (empty when everything held)."""
        out = []
        if self.overlaps:
            same = sum(o["first"]["node"] == o["second"]["node"] for o in self.overlaps)
            out.append(f"{len(self.overlaps)} overlaps of one config ({same} of them on one node)")
        if self.unreported_overruns:
            out.append(
                f"{len(self.unreported_overruns)} disconnects overran disconnect_timeout "
                f"without a disconnect_timeout event"
            )
        bad_pauses = [p for p in self.paused_overlaps if not p["within_bound"]]
        if bad_pauses:
            out.append(f"{len(bad_pauses)} overlaps after SIGCONT beyond the wake bound")
        slow_wakes = [w for w in self.wake_lags if not w["within_bound"]]
        if slow_wakes:
            out.append(f"{len(slow_wakes)} woken processes kept stale instances too long")
        if self.token_regressions:
            out.append(f"{len(self.token_regressions)} fencing token regressions")
        if self.missing_tokens:
            out.append(f"{len(self.missing_tokens)} creates without a lease")
        if self.unmatched:
            out.append(f"{len(self.unmatched)} disconnects without a create")
        if self.gaps_over_bound:
            out.append(f"{len(self.gaps_over_bound)} coverage gaps longer than the bound")
        stuck = [f for f in self.faults if f.get("settled") is None]
        if stuck:
            out.append(f"{len(stuck)} faults after which the cluster never settled")
        slow_leader = [f for f in self.leader_failovers if not f["within_bound"]]
        if slow_leader:
            out.append(f"{len(slow_leader)} leader failovers slower than the bound")
        if self.config_stuck:
            out.append(
                f"{len(self.config_stuck)} get_config hangs after which get_config was "
                f"never called again"
            )
        bad_exits = [e for e in self.exits if e["code"] != 0]
        if bad_exits:
            out.append(f"{len(bad_exits)} node processes exited non-zero on SIGTERM")
        if self.open_at_end:
            out.append(f"{len(self.open_at_end)} instances never disconnected on SIGTERM")
        if self.leftovers:
            out.append(f"Redis still holds {len(self.leftovers)} claims/members/leader")
        if self.leftovers is None and self.exits:
            out.append("Redis was not checked for leftovers at the end")
        out.extend(f"harness: {e}" for e in self.harness_errors)
        return out

    @property
    def ok(self) -> bool:
        return not self.violations

    def recovery_by_kind(self) -> dict[str, dict[str, Any]]:
        """Per fault kind: count, recovery and settle times (median, max), bound."""
        by: dict[str, list[Record]] = defaultdict(list)
        for f in self.faults:
            by[f["kind"]].append(f)
        out: dict[str, dict[str, Any]] = {}
        for kind in list(KINDS) + sorted(set(by) - set(KINDS)):
            faults = by.get(kind)
            if not faults:
                continue
            rec = [f["recovery"] for f in faults]
            settle = [f["settle"] for f in faults if f.get("settle") is not None]
            out[kind] = {
                "count": len(faults),
                "recovery_median": statistics.median(rec),
                "recovery_max": max(rec),
                "settle_median": statistics.median(settle) if settle else None,
                "settle_max": max(settle) if settle else None,
                "bound": self.bounds.coverage(kind) if self.bounds else None,
            }
        return out

    def to_dict(self) -> Record:
        return {
            "ok": self.ok,
            "violations": self.violations,
            "bounds": self.bounds.to_dict() if self.bounds else None,
            "configs": len(self.configs),
            "window": list(self.window),
            "instances": self.instances,
            "recovery_by_kind": self.recovery_by_kind(),
            "overlaps": self.overlaps,
            "overruns": self.overruns,
            "unreported_overruns": self.unreported_overruns,
            "paused_overlaps": self.paused_overlaps,
            "wake_lags": self.wake_lags,
            "token_regressions": self.token_regressions,
            "missing_tokens": self.missing_tokens,
            "unmatched": self.unmatched,
            "gaps": len(self.gaps),
            "longest_gap": max((g["duration"] for g in self.gaps), default=0.0),
            "gaps_over_bound": self.gaps_over_bound,
            "faults": self.faults,
            "leader_failovers": self.leader_failovers,
            "config_stuck": self.config_stuck,
            "exits": self.exits,
            "open_at_end": self.open_at_end,
            "leftovers": self.leftovers,
            "harness_errors": self.harness_errors,
        }


def _proc_key(record: Mapping[str, Any]) -> Any:
    """Who a harness record is about: the node id if it says, else the pid."""
    return record.get("node") or int(record["pid"])


def _lookup(table: Mapping[Any, Any], iv: Interval) -> Any:
    return table.get(iv.node, table.get(iv.pid))


def _segments(
    iv: Interval,
    closed_at: Mapping[Any, float],
    pauses: Mapping[Any, list[tuple[float, float]]],
    horizon: float,
) -> tuple[list[tuple[float, float]], Optional[tuple[float, float, float]]]:
    """The stretches in which an instance could act: ``(normal, stale)``.

    ``normal`` are the stretches while its process ran; ``stale``, if any, is
    ``(resumed, end, stopped)`` for an instance that lived across a SIGSTOP: after its
    process woke it ran a config that another node may have taken meanwhile.
    """
    end = iv.end
    if end is None:
        killed = _lookup(closed_at, iv)
        end = horizon if killed is None else killed
    start = iv.start
    for stopped, resumed in sorted(_lookup(pauses, iv) or []):
        if start < stopped < end:
            stale = (resumed, end, stopped) if end > resumed else None
            return [(start, stopped)], stale
    return ([(start, end)] if end > start else []), None


def check(records: Iterable[Mapping[str, Any]], bounds: Optional[Bounds] = None) -> Report:
    """Check the invariants over the records of every ledger of one run (pure).

    Records of the node ledgers are described in :mod:`dim.chaos`; the harness adds:

    * ``{"ev": "run", "configs": [ids], "settings": {...}, "slack": s}``
    * ``{"ev": "window", "t_start": ..., "t_end": ...}``: the stretch in which every
      config must run (from the first settle to the final SIGTERM);
    * ``{"ev": "killed", "pid": p, "t": ...}``: kill -9, reaped at ``t``;
    * ``{"ev": "paused", "pid": p, "t_stop": ..., "t_cont": ...}``;
    * ``{"ev": "fault", "kind": k, "t_start": ..., "t_end": ..., "settled": t or None,
      "detail": {...}}``; ``detail["blackout"]`` (``[[t0, t1], ...]``) names the
      stretches in which Redis could not be reached, when only part of the fault was;
      ``detail["cleared"]`` of a ``get_config_hang`` is when the hang was lifted;
    * ``{"ev": "exit", "pid": p, "code": c, "node": n, "t_exit": t}`` for a SIGTERM
      (an instance still open then, its disconnect abandoned, ends at ``t_exit``);
      ``{"ev": "final"}`` once every node was asked to stop;
      ``{"ev": "leftovers", "items": [...]}``;
    * ``{"ev": "harness_error", "error": "..."}``.

    An overlap is two intervals of one config that intersect, whether on two nodes or
    on one. It is *explained* (:attr:`Report.overruns`, not a violation) only when the
    earlier instance's ``disconnect`` overran ``disconnect_timeout`` and dim said so
    (a ``disconnect_timeout`` event for that node, config and token), and the later
    instance started no earlier than ``disconnect_timeout`` after that disconnect was
    called (its ``disconnecting`` line): from then until the disconnect returns only
    the fencing token protects.

    ``bounds`` defaults to those of the ``run`` record's settings.
    """
    recs = list(records)
    run: Optional[Mapping[str, Any]] = None
    window: Optional[tuple[float, float]] = None
    closed_at: dict[Any, float] = {}  # process key (node id, else pid) -> gone
    killed_at: dict[Any, float] = {}  # the same, for kill -9 only
    pauses: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    fault_recs: list[Mapping[str, Any]] = []
    exits: list[Record] = []
    leftover_items: Optional[list[str]] = None
    final = False
    harness_errors: list[str] = []
    node_recs: list[Mapping[str, Any]] = []
    for r in recs:
        ev = r.get("ev")
        if ev == "run":
            run = r
        elif ev == "window":
            window = (float(r["t_start"]), float(r["t_end"]))
        elif ev == "killed":
            closed_at[_proc_key(r)] = float(r["t"])
            killed_at[_proc_key(r)] = float(r["t"])
        elif ev == "paused":
            pauses[_proc_key(r)].append((float(r["t_stop"]), float(r["t_cont"])))
        elif ev == "fault":
            fault_recs.append(r)
        elif ev == "exit":
            exits.append({"pid": r["pid"], "code": r["code"], "phase": r.get("phase")})
            if r.get("t_exit") is not None:
                closed_at.setdefault(_proc_key(r), float(r["t_exit"]))
        elif ev == "final":
            final = True
        elif ev == "leftovers":
            leftover_items = [str(i) for i in r.get("items", [])]
        elif ev == "harness_error":
            harness_errors.append(str(r.get("error")))
        else:
            node_recs.append(r)
    if bounds is None and run is not None and "settings" in run:
        bounds = Bounds.from_record(run)
    view = LedgerView(node_recs)
    times = [float(r["t"]) for r in node_recs if "t" in r]
    if window is None:
        window = (min(times, default=0.0), max(times, default=0.0))
    horizon = max([window[1], *times, *closed_at.values()], default=0.0)
    if run is not None and "configs" in run:
        configs = list(run["configs"])
    else:
        configs = sorted({iv.cid for iv in view.intervals}, key=str)
    report = Report(bounds=bounds, configs=configs, window=window)
    report.instances = len(view.intervals)
    report.unmatched = [dict(r) for r in view.unmatched]
    report.missing_tokens = [dict(r) for r in view.missing_token]
    report.exits = exits
    report.leftovers = leftover_items
    report.harness_errors = harness_errors
    report.token_regressions = [
        {"config": a.cid, "before": a.to_dict(), "after": b.to_dict()}
        for a, b in token_regressions(view.intervals)
    ]
    wake_bound = (bounds.wake + bounds.slack) if bounds else float("inf")

    # (1) overlaps, with the stretch after a SIGCONT measured apart
    normal: dict[Any, list[tuple[float, float, Interval]]] = defaultdict(list)
    stale: dict[Any, list[tuple[float, float, Interval, float]]] = defaultdict(list)
    lags: dict[tuple[int, float], list[float]] = defaultdict(list)
    for iv in view.intervals:
        segs, st = _segments(iv, closed_at, pauses, horizon)
        for s, e in segs:
            normal[iv.cid].append((s, e, iv))
        if st is not None:
            resumed, end, stopped = st
            stale[iv.cid].append((resumed, end, iv, stopped))
            lags[(iv.pid, resumed)].append(max(0.0, end - resumed))
    # a disconnect that overran disconnect_timeout, as dim reported it
    reported: dict[tuple[Any, Any, Any], float] = {}
    for r in view.events:
        if r.get("type") == "disconnect_timeout":
            reported.setdefault((r.get("node"), r.get("id"), r.get("token")), float(r["t"]))
    overrun_after = bounds.disconnect_timeout if bounds else None
    tolerance = bounds.overrun_tolerance if bounds else 0.0

    def explained(a: Interval, b: Interval, start: float) -> Optional[Record]:
        """Why an overlap from ``start`` is allowed: an overrunning disconnect of one."""
        for x in (a, b):
            called = view.disconnecting.get((x.node, x.inst))
            event = reported.get((x.node, x.cid, x.token))
            if called is None or event is None or x.start > start:
                continue
            if overrun_after is not None and start < called + overrun_after - tolerance:
                continue
            return {"overrunning": x.to_dict(), "disconnect_called": called, "reported": event}
        return None

    def overlap(a: Interval, b: Interval, start: float, end: float) -> None:
        entry: Record = {
            "config": a.cid,
            "first": a.to_dict(),
            "second": b.to_dict(),
            "start": start,
            "duration": end - start,
            "same_node": a.node == b.node,
        }
        why = explained(a, b, start)
        if why is None:
            report.overlaps.append(entry)
        else:
            entry.update(why)
            report.overruns.append(entry)

    for entries in normal.values():
        entries.sort(key=lambda e: e[0])
        for i, (_a_start, a_end, a) in enumerate(entries):
            for b_start, b_end, b in entries[i + 1 :]:
                if b_start >= a_end:
                    break
                overlap(a, b, b_start, min(a_end, b_end))
    for cid, stales in stale.items():
        for resumed, end, iv, _stopped in stales:
            for s, e, other in normal.get(cid, []):
                lo, hi = max(s, resumed), min(e, end)
                if hi <= lo:
                    continue
                if other.pid == iv.pid and other.node == iv.node:
                    # the woken process started the config again before its stale
                    # instance was down: an overlap on one node, never allowed
                    overlap(iv, other, lo, hi)
                    continue
                lag = end - resumed
                report.paused_overlaps.append(
                    {
                        "config": cid,
                        "paused": iv.to_dict(),
                        "other": other.to_dict(),
                        "duration": hi - lo,
                        "lag": lag,
                        "within_bound": lag <= wake_bound,
                    }
                )
    # every disconnect that ran past disconnect_timeout must have been reported
    if overrun_after is not None and bounds is not None:
        for iv in view.intervals:
            called = view.disconnecting.get((iv.node, iv.inst))
            if called is None or _lookup(killed_at, iv) is not None:
                continue
            end = iv.end if iv.end is not None else _lookup(closed_at, iv)
            if end is None or end - called <= overrun_after + 2 * bounds.heartbeat_interval:
                continue
            frozen = _lookup(pauses, iv) or []
            if any(stop < end and cont > called for stop, cont in frozen):
                continue
            if (iv.node, iv.cid, iv.token) not in reported:
                report.unreported_overruns.append(
                    {
                        "instance": iv.to_dict(),
                        "disconnect_called": called,
                        "returned": iv.end,
                        "took": end - called,
                    }
                )
    for (pid, resumed), values in sorted(lags.items(), key=lambda kv: kv[0][1]):
        lag = max(values)
        report.wake_lags.append(
            {
                "pid": pid,
                "resumed": resumed,
                "lag": lag,
                "instances": len(values),
                "within_bound": lag <= wake_bound,
            }
        )

    # (3) coverage gaps within the window
    blackouts: list[tuple[float, float]] = []
    for fr in fault_recs:
        named = (fr.get("detail") or {}).get("blackout")
        if named is not None:
            blackouts += [(float(b0), float(b1)) for b0, b1 in named]
        elif fr.get("kind") in KINDS and KINDS[str(fr["kind"])].blackout:
            blackouts.append((float(fr["t_start"]), float(fr["t_end"])))
    ordered_faults = sorted(fault_recs, key=lambda f: float(f["t_start"]))
    starts = [float(f["t_start"]) for f in ordered_faults]
    w0, w1 = window

    def fault_at(t: float) -> Optional[Mapping[str, Any]]:
        found = None
        for f in ordered_faults:
            if float(f["t_start"]) <= t:
                found = f
            else:
                break
        return found

    for cid in configs:
        segs = sorted((s, e) for s, e, _ in normal.get(cid, []))
        cursor = w0
        holes: list[tuple[float, float]] = []
        for s, e in segs:
            if e <= cursor:
                continue
            if s > cursor:
                holes.append((cursor, min(s, w1)))
            cursor = max(cursor, e)
            if cursor >= w1:
                break
        if cursor < w1:
            holes.append((cursor, w1))
        for g0, g1 in holes:
            if g1 <= g0:
                continue
            excused = sum(max(0.0, min(g1, b1) - max(g0, b0)) for b0, b1 in blackouts)
            f = fault_at(g0)
            kind = str(f["kind"]) if f is not None else None
            gap: Record = {
                "config": cid,
                "start": g0,
                "end": g1,
                "duration": g1 - g0,
                "excused": excused,
                "kind": kind,
                "open_at_end": g1 >= w1 and cursor < w1,
            }
            report.gaps.append(gap)
            if bounds is not None:
                allowed = bounds.coverage(kind) + bounds.slack
                gap["bound"] = bounds.coverage(kind)
                if g1 - g0 - excused > allowed:
                    report.gaps_over_bound.append(gap)

    # (3) recovery per fault, from the gaps that ended in its stretch
    for i, f in enumerate(ordered_faults):
        kind = str(f["kind"])
        t_start = float(f["t_start"])
        t_end = float(f.get("t_end", t_start))
        until = starts[i + 1] if i + 1 < len(starts) else w1
        meta = KINDS.get(kind)
        ref = t_end if meta is not None and meta.measure_from == "end" else t_start
        # the longest any config stayed down, counted from the fault (or from when its
        # condition cleared): gaps from later moves (a node rejoining) count from their
        # own start
        mine = [g for g in report.gaps if t_start < g["end"] <= until]
        recovery = max((g["end"] - max(g["start"], ref) for g in mine), default=0.0)
        recovery = max(0.0, recovery)
        settled = f.get("settled")
        entry: Record = {
            "kind": kind,
            "t_start": t_start,
            "t_end": t_end,
            "duration": t_end - t_start,
            "recovery": recovery,
            "gaps": len(mine),
            "settled": settled,
            "settle": (float(settled) - ref) if settled is not None else None,
            "detail": f.get("detail", {}),
        }
        report.faults.append(entry)
        if kind == "kill_leader":
            victim = f.get("detail", {}).get("pid")
            gained = [
                float(r["t"])
                for r in view.events
                if r.get("type") == "leadership_gained"
                and r.get("pid") != victim
                and float(r["t"]) > t_start
            ]
            if gained:
                took = min(gained) - t_start
                bound = (bounds.leader + bounds.slack) if bounds else float("inf")
                report.leader_failovers.append(
                    {"t_start": t_start, "took": took, "within_bound": took <= bound}
                )

    # (3) after a get_config hang was lifted, the leader called get_config again
    for f in ordered_faults:
        cleared = (f.get("detail") or {}).get("cleared")
        if f.get("kind") != "get_config_hang" or cleared is None:
            continue
        later = [float(r["t"]) for r in view.get_config_calls if float(r["t"]) > cleared]
        if not later:
            report.config_stuck.append(
                {"t_start": float(f["t_start"]), "cleared": cleared, "detail": f.get("detail")}
            )

    # (4) the end: every instance of a process that was not killed was disconnected (or
    # its disconnect overran disconnect_timeout, was reported, and was abandoned when
    # the process exited)
    if final:
        report.open_at_end = [
            iv.to_dict()
            for iv in view.intervals
            if iv.end is None
            and _lookup(killed_at, iv) is None
            and (iv.node, iv.cid, iv.token) not in reported
        ]
    return report


# -- the node process --------------------------------------------------------------------


def write_control(path: Union[str, os.PathLike[str]], **fields: Any) -> None:
    """Replace the control file atomically (the nodes re-read it when it changes).

    Fields: ``get_config_error`` (bool); ``create_fail``, ``unhealthy`` and
    ``healthcheck_hang`` are rules ``{"ids": [config ids], "pids": [pids] or None}``
    (None: every node); ``healthcheck_hang`` also takes ``"seconds"``. A rule without
    ``"ids"`` (or with ``"ids": None``) applies to every config.

    * ``create_delay`` and ``disconnect_delay``: rules with ``"seconds"``: ``create``
      (after its ``create`` line) or ``disconnect`` (before its ``disconnect`` line)
      waits that long. A delayed call also writes ``created`` (when ``create``
      returns) or ``disconnecting`` (when ``disconnect`` is called) lines.
    * ``configs``: how many configs ``get_config`` returns from now on (default: the
      node's ``--configs``).
    * ``wall_offset``: seconds added to this process's wall clock as Python reads it
      (``time.time`` and ``datetime.datetime.now/utcnow/today``; the monotonic clock is
      untouched), to step the wall clock without libfaketime. Applied within ~50 ms of
      the change; the node writes an ``ev: "wall_offset"`` line once it has. A number
      applies to every node; a rule ``{"pids": [...], "seconds": s}`` to those only
      (the others go back to 0).
    * ``raise``: ``{callback: rule}`` where callback is ``create``, ``disconnect``,
      ``healthcheck`` or ``get_config`` and the rule (``ids``/``pids`` as above) has
      ``"exc"``: one of :data:`BASE_EXCEPTIONS` (``CancelledError``, ``SystemExit``,
      ``KeyboardInterrupt``, ``GreenletExit``), raised from that callback. A raising
      ``create`` writes a ``create_error`` line (no instance); a raising
      ``disconnect`` writes ``disconnecting`` and then its ``disconnect`` line (the
      instance is gone: the call is over) before it raises.
    * ``get_config_hang``: ``{"seconds": s, "pids": ...}``: ``get_config`` blocks that
      long (it writes ``get_config`` with ``"hang": s`` when called and
      ``get_config_return`` when it returns).
    * ``log_get_config``: every ``get_config`` call writes a ``get_config`` line.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(fields, sort_keys=True))
    os.replace(tmp, target)


class Control:
    """The node's view of the control file, re-read only when the file changed."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._key: Optional[tuple[int, int, int]] = None
        self._data: Record = {}
        self._lock = threading.Lock()
        self.pid = os.getpid()

    def current(self) -> Record:
        if self.path is None:
            return {}
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._key, self._data = None, {}
                return self._data
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._key:
                try:
                    data = json.loads(Path(self.path).read_text())
                except (OSError, ValueError):
                    return self._data  # replaced under us: keep the last good one
                self._key = key
                self._data = data if isinstance(data, dict) else {}
            return self._data

    def rule(self, name: str, config_id: Any) -> Optional[Record]:
        """The rule ``name`` if it applies to this config in this process."""
        return self._applies(self.current().get(name), config_id)

    def raising(self, callback: str, config_id: Any = None) -> Optional[BaseException]:
        """The exception the ``raise`` rule of ``callback`` asks for here, if any."""
        rules = self.current().get("raise")
        if not isinstance(rules, dict):
            return None
        rule = self._applies(rules.get(callback), config_id)
        if rule is None:
            return None
        return make_base_exception(str(rule.get("exc", "SystemExit")), callback)

    def wall_offset(self) -> float:
        value = self.current().get("wall_offset")
        if isinstance(value, dict):
            pids = value.get("pids")
            if pids is not None and self.pid not in pids:
                return 0.0
            value = value.get("seconds")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return 0.0
        return float(value)

    def _applies(self, rule: Any, config_id: Any) -> Optional[Record]:
        if not isinstance(rule, dict):
            return None
        ids = rule.get("ids")
        if ids is not None and config_id not in ids:
            return None
        pids = rule.get("pids")
        if pids is not None and self.pid not in pids:
            return None
        return rule


class _Instance:
    """A fake long-lived instance that remembers its config and lease token."""

    def __init__(
        self, serial: int, node: Optional[str], config_id: Any, token: Optional[int]
    ) -> None:
        self.serial = serial
        self.node = node
        self.config_id = config_id
        self.token = token


class ControlledError(RuntimeError):
    """A failure the control file asked for."""


class GreenletExit(BaseException):
    """Like gevent's ``GreenletExit``: a ``BaseException`` that is not an ``Exception``."""


#: What a ``raise`` rule may ask a callback to raise (none is an ``Exception``).
BASE_EXCEPTIONS: tuple[str, ...] = (
    "CancelledError",
    "SystemExit",
    "KeyboardInterrupt",
    "GreenletExit",
)


def make_base_exception(name: str, where: str) -> BaseException:
    """A fresh exception of kind ``name`` (see :data:`BASE_EXCEPTIONS`)."""
    if name == "CancelledError":
        return asyncio.CancelledError(f"{where} cancelled (control file)")
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt(f"{where} interrupted (control file)")
    if name == "GreenletExit":
        return GreenletExit(f"{where} killed (control file)")
    return SystemExit(f"{where} exits (control file)")


_wall: dict[str, float] = {}


def _set_wall_offset(offset: float) -> None:
    """Run this process's wall clock ``offset`` seconds off, as Python code reads it.

    The first call replaces ``time.time`` and ``datetime.datetime`` (with a subclass
    whose ``now``/``utcnow``/``today`` add the offset); later calls change the offset.
    Code that bound the originals before (``from time import time``) is not affected,
    nor is the monotonic clock. libfaketime cannot do this: it breaks the sleeps of
    Python 3.11+.
    """
    import datetime as dt

    first = "offset" not in _wall
    _wall["offset"] = offset
    if first:
        real_time = time.time
        real_datetime = dt.datetime

        def shifted_time() -> float:
            return real_time() + _wall["offset"]

        class ShiftedDatetime(dt.datetime):
            @classmethod
            def now(cls, tz: Any = None) -> Any:
                return real_datetime.now(tz) + dt.timedelta(seconds=_wall["offset"])

            @classmethod
            def utcnow(cls) -> Any:
                return real_datetime.utcnow() + dt.timedelta(seconds=_wall["offset"])

            @classmethod
            def today(cls) -> Any:
                return real_datetime.today() + dt.timedelta(seconds=_wall["offset"])

        time.time = shifted_time
        dt.datetime = ShiftedDatetime  # type: ignore[misc]


def _node_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dim.chaos node",
        description="One dim node that writes its instance lifecycle to a ledger.",
    )
    p.add_argument("--redis", default=None, help="redis:// URL (or --sentinel)")
    p.add_argument(
        "--sentinel",
        default=None,
        help="host:port[,host:port...] of Sentinels: reach the master through them",
    )
    p.add_argument("--sentinel-master", default="dimmaster", help="the master's name")
    p.add_argument("--service", required=True)
    p.add_argument("--configs", type=int, required=True, help="number of configs")
    p.add_argument("--ledger", required=True, help="JSON-lines file to append to")
    p.add_argument("--control", default=None, help="JSON control file (enables healthcheck)")
    p.add_argument("--hb", type=float, default=0.05, help="heartbeat_interval")
    p.add_argument("--ttl", type=float, default=0.6, help="node_ttl (claim TTL)")
    p.add_argument("--leader-ttl", type=float, default=None, help="leader_ttl (default: --ttl)")
    p.add_argument("--config-interval", type=float, default=0.2)
    p.add_argument("--healthcheck-interval", type=float, default=1.0)
    p.add_argument("--healthcheck-timeout", type=float, default=0.5)
    p.add_argument("--failure-cooldown", type=float, default=1.0)
    p.add_argument("--create-attempts", type=int, default=3)
    p.add_argument("--disconnect-timeout", type=float, default=2.0)
    p.add_argument("--create-timeout", type=float, default=1.0)
    p.add_argument("--config-timeout", type=float, default=10.0, help="config_timeout")
    p.add_argument("--max-workers", type=int, default=8, help="create/disconnect calls at once")
    p.add_argument("--weight", type=float, default=1.0, help="the node's weight")
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument(
        "--log-healthchecks",
        action="store_true",
        help='write a "healthcheck" ledger line per healthcheck call',
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def node_main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one node until SIGTERM/SIGINT, then stop it gracefully and return 0.

    ``create`` lines also say whether the call raced ``start()`` (``"early"``) or came
    while the manager was stopping (``"during_stop"``). ``READY <node id>`` is printed
    on stdout once the manager has started. SIGUSR1 dumps every thread's stack. What
    the control file can change is listed in :func:`write_control`.
    """
    parser = _node_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.redis is None and args.sentinel is None:
        parser.error("give --redis or --sentinel")
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format=f"%(asctime)s pid={os.getpid()} %(threadName)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = Settings(
        heartbeat_interval=args.hb,
        node_ttl=args.ttl,
        leader_ttl=args.leader_ttl if args.leader_ttl is not None else args.ttl,
        config_interval=args.config_interval,
        healthcheck_interval=args.healthcheck_interval,
        healthcheck_timeout=args.healthcheck_timeout,
        create_attempts=args.create_attempts,
        create_backoff=0.01,
        create_backoff_max=0.05,
        failure_cooldown=args.failure_cooldown,
        disconnect_timeout=args.disconnect_timeout,
        create_timeout=args.create_timeout,
        config_timeout=args.config_timeout,
        max_workers=args.max_workers,
        connect_timeout=args.connect_timeout,
    )
    target: Any = args.redis
    if args.sentinel:
        from redis.sentinel import Sentinel

        hosts = []
        for item in str(args.sentinel).split(","):
            host, _, port = item.strip().rpartition(":")
            hosts.append((host or "127.0.0.1", int(port)))
        timeout = settings.socket_timeout
        sentinel = Sentinel(hosts, socket_timeout=1.0, socket_connect_timeout=1.0)
        target = sentinel.master_for(
            args.sentinel_master, socket_timeout=timeout, socket_connect_timeout=timeout
        )
    ledger = LedgerFile(args.ledger)
    control = Control(args.control)
    configs = [{"id": i} for i in range(args.configs)]
    serials = itertools.count(1)
    serial_lock = threading.Lock()
    started = threading.Event()  # set once start() has returned (see create)
    stopping = threading.Event()  # set just before manager.stop()
    box: dict[str, Manager] = {}
    node_box: dict[str, Optional[str]] = {}

    def get_config() -> list[Record]:
        current = control.current()
        hang = control.rule("get_config_hang", None)
        seconds = float(hang.get("seconds", 1.0)) if hang is not None else 0.0
        if hang is not None or current.get("log_get_config"):
            ledger.write(node=node_box.get("id"), ev="get_config", hang=seconds)
        if hang is not None:
            threading.Event().wait(seconds)
            ledger.write(node=node_box.get("id"), ev="get_config_return", hang=seconds)
        exc = control.raising("get_config")
        if exc is not None:
            ledger.write(node=node_box.get("id"), ev="get_config_raise", exc=type(exc).__name__)
            raise exc
        if current.get("get_config_error"):
            raise ControlledError("get_config fails (control file)")
        count = current.get("configs")
        if isinstance(count, int) and not isinstance(count, bool):
            return [{"id": i} for i in range(count)]
        return list(configs)

    def create(config: Record) -> _Instance:
        manager = box["m"]
        # Manager.start() publishes its node only after the loops run, so a create that
        # races start() sees no node id and no lease yet: wait for start() to return
        # (and record that it happened, "early").
        # Likewise Manager.stop() forgets its node first, so a create that runs while the
        # manager stops sees no node and no lease either ("during_stop").
        early = manager.node_id is None
        during_stop = stopping.is_set()
        if early and not during_stop:
            started.wait(10.0)
        lease = manager.lease(config["id"])
        token = lease.token if lease is not None else None
        node = manager.node_id or node_box.get("id")
        if control.rule("create_fail", config["id"]) is not None:
            ledger.write(node=node, id=config["id"], ev="create_error", token=token)
            raise ControlledError(f"create of {config['id']} fails (control file)")
        exc = control.raising("create", config["id"])
        if exc is not None:
            ledger.write(
                node=node,
                id=config["id"],
                ev="create_error",
                token=token,
                raised=type(exc).__name__,
            )
            raise exc
        with serial_lock:
            serial = next(serials)
        delay = control.rule("create_delay", config["id"])
        ledger.write(
            node=node,
            id=config["id"],
            ev="create",
            token=token,
            inst=serial,
            early=early,
            during_stop=during_stop,
            **({} if delay is None else {"delay": float(delay.get("seconds", 1.0))}),
        )
        if delay is not None:
            threading.Event().wait(float(delay.get("seconds", 1.0)))
            ledger.write(node=node, id=config["id"], ev="created", token=token, inst=serial)
        return _Instance(serial, node, config["id"], token)

    def disconnect(instance: _Instance) -> None:
        delay = control.rule("disconnect_delay", instance.config_id)
        exc = control.raising("disconnect", instance.config_id)
        if delay is not None or exc is not None:
            ledger.write(
                node=instance.node,
                id=instance.config_id,
                ev="disconnecting",
                token=instance.token,
                inst=instance.serial,
                seconds=float(delay.get("seconds", 1.0)) if delay is not None else 0.0,
            )
        if delay is not None:
            threading.Event().wait(float(delay.get("seconds", 1.0)))
        ledger.write(
            node=instance.node,
            id=instance.config_id,
            ev="disconnect",
            token=instance.token,
            inst=instance.serial,
            **({} if exc is None else {"raised": type(exc).__name__}),
        )
        if exc is not None:
            raise exc

    def healthcheck(instance: _Instance) -> bool:
        if args.log_healthchecks:
            ledger.write(
                node=instance.node,
                id=instance.config_id,
                ev="healthcheck",
                token=instance.token,
                inst=instance.serial,
            )
        hang = control.rule("healthcheck_hang", instance.config_id)
        if hang is not None:
            threading.Event().wait(float(hang.get("seconds", 1.0)))
            return True
        exc = control.raising("healthcheck", instance.config_id)
        if exc is not None:
            ledger.write(
                node=instance.node,
                id=instance.config_id,
                ev="healthcheck_raise",
                token=instance.token,
                inst=instance.serial,
                exc=type(exc).__name__,
            )
            raise exc
        return control.rule("unhealthy", instance.config_id) is None

    manager = Manager(
        get_config=get_config,
        create=create,
        disconnect=disconnect,
        healthcheck=healthcheck if args.control else None,
        redis=target,
        service=args.service,
        settings=settings,
        weight=args.weight,
    )
    box["m"] = manager

    def on_event(event: Event) -> None:
        extra: Record = {}
        if event.error is not None:
            extra["error"] = repr(event.error)[:300]
        ledger.write(
            node=event.node_id,
            ev="event",
            type=event.type.value,
            id=event.config_id,
            token=event.token,
            **extra,
        )

    manager.add_listener(
        on_event,
        EventType.FENCED,
        EventType.LEASE_LOST,
        EventType.LEADERSHIP_GAINED,
        EventType.LEADERSHIP_LOST,
        EventType.REDIS_LOST,
        EventType.REDIS_RESTORED,
        EventType.LOOP_ERROR,
        EventType.INSTANCE_FAILED,
        EventType.INSTANCE_UNHEALTHY,
        EventType.CONFIG_ERROR,
        # recorded once dim has them: a disconnect that overran disconnect_timeout, and
        # Redis data lost or rewound (a reset window opened)
        *[
            t
            for t in (
                getattr(EventType, "DISCONNECT_TIMEOUT", None),
                getattr(EventType, "REDIS_RESET", None),
            )
            if t is not None
        ],
    )

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # kill -USR1 <pid> dumps every thread's stack to stderr (for a hung stop)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # A process-directed signal goes to any thread that does not block it, and one taken
    # by a dim thread does not interrupt the main thread's Event.wait(), which would then
    # never return. So block the signals while dim starts its threads (they inherit the
    # mask, and so do the threads they start), then unblock them in this thread only.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    if args.control:

        def follow_wall_offset() -> None:
            applied = 0.0
            while not stop.wait(0.05):
                offset = control.wall_offset()
                if offset != applied:
                    _set_wall_offset(offset)
                    applied = offset
                    ledger.write(node=node_box.get("id"), ev="wall_offset", offset=applied)

        threading.Thread(target=follow_wall_offset, name="wall-offset", daemon=True).start()
    manager.start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    node_id = manager.node_id
    node_box["id"] = node_id
    started.set()
    ledger.write(node=node_id, ev="ready")
    sys.stdout.write(f"READY {node_id}\n")
    sys.stdout.flush()

    stop.wait()

    stopping.set()
    manager.stop()
    ledger.write(node=node_id, ev="stopped")
    return 0


# -- node processes ----------------------------------------------------------------------


def proc_state(pid: int) -> str:
    """The one-letter state of a process from /proc (R, S, T, Z...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _package_root() -> str:
    """The directory holding the ``dim`` package in use (for the children's PYTHONPATH)."""
    return str(Path(__file__).resolve().parent.parent)


class NotSettled(TimeoutError):
    """The cluster did not settle in time."""


class NodeProcs:
    """Node processes of one service; :meth:`cleanup` kills every one still alive.

    Each process writes its own ledger (``ledger-<n>.jsonl``) unless ``shared_ledger``,
    then all write ``ledger.jsonl``. :meth:`view` follows the ledgers incrementally.
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike[str]],
        redis_url: str,
        service: str,
        *,
        configs: int = 12,
        node_args: Sequence[str] = (),
        shared_ledger: bool = True,
        control: Optional[Union[str, os.PathLike[str]]] = None,
        start_timeout: float = 20.0,
        settle_timeout: float = 20.0,
        exit_timeout: float = 10.0,
    ) -> None:
        self.dir = Path(directory)
        self.redis_url = redis_url
        self.service = service
        self.keys = Keys(service)
        self.config_ids = list(range(configs))
        self.node_args = list(node_args)
        self.shared_ledger = shared_ledger
        self.control = None if control is None else str(control)
        self.ledger_path = self.dir / "ledger.jsonl"
        self.ledgers: list[Path] = [self.ledger_path] if shared_ledger else []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}
        self.dead: dict[int, float] = {}  # pid -> time it was known dead (killed, exited)
        self.paused: set[int] = set()
        self.start_timeout = start_timeout
        self.settle_timeout = settle_timeout
        self.exit_timeout = exit_timeout
        self._seq = 0
        self._tail = _Tail()
        self._view = LedgerView()
        self._view_lock = threading.Lock()

    # processes

    def command(self, ledger: Path, *extra: str, redis_url: Optional[str] = None) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "dim.chaos",
            "node",
            "--redis",
            redis_url or self.redis_url,
            "--service",
            self.service,
            "--configs",
            str(len(self.config_ids)),
            "--ledger",
            str(ledger),
        ]
        if self.control is not None:
            args += ["--control", self.control]
        return args + self.node_args + list(extra)

    def spawn(
        self,
        n: int,
        *extra: str,
        redis_url: Optional[str] = None,
        redis_urls: Optional[Sequence[str]] = None,
    ) -> list[int]:
        """Start ``n`` processes at once and wait until every one is ready.

        ``extra`` arguments go to each node; ``redis_url`` (default: the one given to
        the constructor) lets some processes reach Redis another way (a proxy), and
        ``redis_urls`` (one per process) gives each its own way (a proxy each).
        """
        if redis_urls is not None and len(redis_urls) != n:
            raise ValueError(f"{len(redis_urls)} redis_urls for {n} processes")
        env = dict(os.environ)
        root = _package_root()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        before = dict(self.view().ready)  # a reused pid must announce a new node
        pids = []
        for i in range(n):
            url = redis_urls[i] if redis_urls is not None else redis_url
            self._seq += 1
            log_path = self.dir / f"node{self._seq}.log"
            ledger = self.ledger_path
            if not self.shared_ledger:
                ledger = self.dir / f"ledger-{self._seq}.jsonl"
                self.ledgers.append(ledger)
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(
                    self.command(ledger, *extra, redis_url=url),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            self.procs[proc.pid] = proc
            self.logs[proc.pid] = log_path
            self.dead.pop(proc.pid, None)  # a pid reused by the OS: this one is new
            self.paused.discard(proc.pid)
            pids.append(proc.pid)
        try:

            def ready() -> bool:
                now = self.view().ready
                fresh = all(p in now and now[p] != before.get(p) for p in pids)
                return fresh or self._exited(pids)

            wait_until(
                ready,
                self.start_timeout,
                0.02,
                "node processes did not become ready",
            )
        except TimeoutError:
            raise RuntimeError(f"node processes did not start:\n{self.log_tails()}") from None
        if self._exited(pids):
            raise RuntimeError(f"a node process exited early:\n{self.log_tails()}")
        return pids

    def wait_exit(self, pid: int, timeout: Optional[float] = None) -> int:
        """The exit code of ``pid``; on a timeout, raise with its thread dump and log."""
        proc = self.procs[pid]
        try:
            code = proc.wait(self.exit_timeout if timeout is None else timeout)
            self.dead.setdefault(pid, time.monotonic())
            return code
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(signal.SIGUSR1)  # the node dumps its threads' stacks
        try:
            wait_until(
                lambda: "most recent call first" in self.logs[pid].read_text(errors="replace"),
                5.0,
                0.05,
            )
        except TimeoutError:
            pass
        raise TimeoutError(
            f"pid {pid} did not exit within {timeout or self.exit_timeout:g}s:\n"
            f"{self.logs[pid].read_text(errors='replace')[-20000:]}"
        )

    def _exited(self, pids: Iterable[int]) -> bool:
        return any(self.procs[p].poll() is not None for p in pids)

    def alive(self) -> set[int]:
        return {pid for pid, p in self.procs.items() if p.poll() is None and pid not in self.dead}

    def crashed(self) -> dict[int, Optional[int]]:
        """Processes that exited although nobody killed or stopped them: pid -> code."""
        return {
            pid: p.returncode
            for pid, p in self.procs.items()
            if pid not in self.dead and p.poll() is not None
        }

    def kill9(self, pid: int) -> tuple[float, float]:
        """SIGKILL; returns (time the signal was sent, time the process was reaped)."""
        sent = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.procs[pid].wait(self.exit_timeout)
        reaped = time.monotonic()
        self.dead[pid] = reaped
        self.paused.discard(pid)
        return sent, reaped

    def terminate(self, pids: Iterable[int]) -> dict[int, int]:
        """SIGTERM these processes at once; their exit codes (raises on a hang)."""
        pids = list(pids)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        return {pid: self.wait_exit(pid) for pid in pids}

    def stop_proc(self, pid: int) -> float:
        """SIGSTOP; returns a time by which the process was certainly frozen."""
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(pid)
        wait_until(lambda: proc_state(pid) == "T", 5.0, 0.005, f"pid {pid} did not stop")
        return time.monotonic()

    def cont_proc(self, pid: int) -> float:
        """SIGCONT; returns a time just before the process could run again."""
        resumed = time.monotonic()
        os.kill(pid, signal.SIGCONT)
        self.paused.discard(pid)
        return resumed

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
            try:
                proc.wait(self.exit_timeout)
            except subprocess.TimeoutExpired:  # pragma: no cover - a kernel problem
                pass

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for pid, path in self.logs.items():
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = []
            out.append(f"--- pid {pid} ---\n" + "\n".join(text))
        return "\n".join(out)

    # views

    def view(self) -> LedgerView:
        """The ledgers so far (one object, extended with what was appended since)."""
        with self._view_lock:
            self._view.extend(self._tail.read(list(self.ledgers)))
            return self._view

    def leader_pid(self, client: redis.Redis) -> Optional[int]:
        owner = parse_owner(_text(client.get(self.keys.leader)))
        if owner is None:
            return None
        return self.view().node_pids().get(owner[0])

    def claim_holders(self, client: redis.Redis) -> dict[str, Optional[str]]:
        ckeys = [str(i) for i in self.config_ids]
        values = client.mget([self.keys.claim(c) for c in ckeys])
        out = {}
        for ckey, value in zip(ckeys, values):
            owner = parse_owner(_text(value))
            out[ckey] = owner[0] if owner else None
        return out

    def settled(self, client: Optional[redis.Redis], pids: set[int], balanced: bool = True) -> bool:
        """Each config runs exactly once, on ``pids`` only, balanced, and (if a client is
        given) the Redis claims and the leader's assignment name the very nodes that run
        them."""
        view = self.view()
        running = view.running(set(view.ready) - set(self.dead))
        if set(running) != set(self.config_ids):
            return False
        if any(len(where) != 1 or where[0] not in pids for where in running.values()):
            return False
        counts = view.counts(pids)
        if balanced and counts and max(counts) - min(counts) > 1:
            return False
        if client is not None:
            holders = self.claim_holders(client)
            assignment = {
                _text(c): _text(n) for c, n in client.hgetall(self.keys.assignment).items()
            }
            for cid, (pid,) in running.items():
                node = view.ready[pid]
                if holders.get(str(cid)) != node or assignment.get(str(cid)) != node:
                    return False
        return True

    def wait_settled(
        self, client: Optional[redis.Redis], pids: set[int], timeout: Optional[float] = None
    ) -> LedgerView:
        """Wait for :meth:`settled`; raises :class:`NotSettled` with what runs where."""

        def ok() -> bool:
            try:
                return self.settled(client, pids)
            except redis.RedisError:
                return False

        try:
            wait_until(ok, self.settle_timeout if timeout is None else timeout, 0.02)
        except TimeoutError:
            view = self.view()
            running = view.running(set(view.ready) - set(self.dead))
            raise NotSettled(
                f"not settled on {sorted(pids)}: running {sorted(running.items())}\n"
                f"{self.log_tails()}"
            ) from None
        return self.view()


def leftovers(client: redis.Redis, keys: Keys, node: Optional[str] = None) -> list[str]:
    """Claims, members and leader left in Redis (only those of ``node``, if given)."""
    left = []
    for key in sorted(client.scan_iter(match=keys.prefix + "claim:*")):
        value = _text(client.get(key))
        if value is not None and (node is None or value.startswith(node + ":")):
            left.append(f"{_text(key)}={value} (pttl {client.pttl(key)} ms)")
    left += [
        f"member {_text(n)}"
        for n in client.zrange(keys.nodes, 0, -1)
        if node is None or _text(n) == node
    ]
    leader = _text(client.get(keys.leader))
    if leader is not None and (node is None or leader.startswith(node + ":")):
        left.append(f"leader {leader} (pttl {client.pttl(keys.leader)} ms)")
    return left


# -- the proxy ---------------------------------------------------------------------------


class ChaosProxy:
    """A TCP proxy in front of Redis that can delay, stall or drop traffic.

    * :meth:`set_latency` delays every chunk, both ways, by ``latency`` plus up to
      ``jitter`` seconds (slow Redis).
    * :meth:`stall` holds all traffic, new connections included, until :meth:`resume`:
      a partition without resets. Requests held meanwhile still reach Redis afterwards,
      even if their client gave up on them, as delayed TCP segments would.
    * :meth:`drop` closes every connection and refuses new ones until :meth:`undrop`.
    * :meth:`hold` holds back the requests carrying dim's HEARTBEAT script (``EVALSHA``)
      of one node until :meth:`release`; everything else flows.
    * :meth:`retarget` points the proxy at another server (a failover): every open
      connection is closed, new ones go to the new server.
    """

    SHA = hashlib.sha1(scripts.HEARTBEAT.encode()).hexdigest().encode()

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._needle: Optional[bytes] = None  # node id whose heartbeats are held
        self._gate = threading.Event()  # heartbeat hold
        self._gate.set()
        self._flow = threading.Event()  # cleared while stalled
        self._flow.set()
        self._closing = threading.Event()
        self._latency = 0.0
        self._jitter = 0.0
        self._dropping = False
        self._rng = random.Random()
        self.held = 0  # heartbeats held back now
        self.held_at: Optional[float] = None  # when the first of them arrived
        self.forwarded = 0  # held heartbeats forwarded since
        self.connections = 0  # accepted so far
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # faults

    def hold(self, node_id: str) -> None:
        with self._lock:
            self._needle = node_id.encode()
            self.held_at = None
            self._gate.clear()

    def release(self) -> None:
        with self._lock:
            self._needle = None
            self._gate.set()

    def retarget(self, port: int, host: str = "127.0.0.1") -> None:
        """Send new connections to ``host:port``; close the open ones."""
        with self._lock:
            self.target = (host, port)
            pairs = list(self._pairs)
        for pair in pairs:
            self._shut(*pair)

    def set_latency(self, latency: float, jitter: float = 0.0) -> None:
        with self._lock:
            self._latency = max(0.0, latency)
            self._jitter = max(0.0, jitter)

    def stall(self) -> None:
        self._flow.clear()

    def resume(self) -> None:
        self._flow.set()

    def drop(self) -> None:
        with self._lock:
            self._dropping = True
            pairs = list(self._pairs)
        for pair in pairs:
            self._shut(*pair)

    def undrop(self) -> None:
        with self._lock:
            self._dropping = False

    def heal(self) -> None:
        """End every fault: no latency, no stall, no drop, no hold."""
        self.set_latency(0.0)
        self.undrop()
        self.release()
        self.resume()

    def close(self) -> None:
        self._closing.set()
        self.heal()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._shut(*pair)

    # plumbing

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                dropping = self._dropping
            if dropping:
                client.close()
                continue
            with self._lock:
                target = self.target
            try:
                server = socket.create_connection(target, timeout=5.0)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            with self._lock:
                moved = self.target != target  # re-pointed meanwhile: not this one
                if not moved:
                    self._pairs.add(pair)
                    self.connections += 1
            if moved:
                self._shut(client, server)
                client.close()
                server.close()
                continue
            done = [0]
            for src, dst, inspect in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump,
                    args=(src, dst, inspect, pair, done),
                    name="proxy-pump",
                    daemon=True,
                ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        inspect: bool,
        pair: tuple[socket.socket, socket.socket],
        done: list[int],
    ) -> None:
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if inspect:
                    seen, tail = tail + data, data[-200:]
                    with self._lock:
                        needle = self._needle
                        hold = needle is not None and self.SHA in seen and needle in seen
                        if hold:
                            self.held += 1
                            if self.held_at is None:
                                self.held_at = time.monotonic()
                    if hold:
                        self._gate.wait()
                        with self._lock:
                            self.held -= 1
                            self.forwarded += 1
                with self._lock:
                    delay = self._latency + self._jitter * self._rng.random()
                if delay > 0:
                    self._closing.wait(delay)
                while not self._flow.wait(0.1):
                    if self._closing.is_set():
                        return
                with self._lock:
                    if self._dropping:
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._shut(src, dst)
            with self._lock:
                done[0] += 1
                if done[0] == 2:
                    self._pairs.discard(pair)
                    for sock in pair:
                        try:
                            sock.close()
                        except OSError:
                            pass


# -- the run -----------------------------------------------------------------------------


@attrs.frozen
class ChaosOptions:
    """What :class:`ChaosRun` does.

    ``minutes=0`` runs one round: every fault kind once (or ``round_size`` of them), in
    a seeded order that takes the kinds from every group in turn. With ``minutes > 0``
    that first round always completes, then the schedule goes on dealing kinds from the
    same seeded deck (every kind once before any comes again) until the time is up.

    The timings are dim's settings for every node: with the defaults a crashed node's
    claims live ``lease`` = 2 s and a reset window lasts ``create_lease`` = 4.35 s.
    """

    seed: int = 1
    minutes: float = 0.0
    nodes: int = 5
    configs: int = 40
    heartbeat_interval: float = 0.1
    node_ttl: float = 1.0
    leader_ttl: float = 1.0
    config_interval: float = 0.5
    healthcheck_interval: float = 0.5
    healthcheck_timeout: float = 0.3
    failure_cooldown: float = 2.0
    create_attempts: int = 3
    disconnect_timeout: float = 1.0
    create_timeout: float = 3.0
    config_timeout: float = 1.0
    burst: int = 10
    sentinel_burst: int = 4
    slack: float = 1.5
    settle_timeout: float = 60.0
    quiet: float = 0.3
    kinds: tuple[str, ...] = tuple(FAULTS)
    round_size: Optional[int] = None

    def settings(self) -> Record:
        return {
            "heartbeat_interval": self.heartbeat_interval,
            "node_ttl": self.node_ttl,
            "leader_ttl": self.leader_ttl,
            "config_interval": self.config_interval,
            "healthcheck_interval": self.healthcheck_interval,
            "healthcheck_timeout": self.healthcheck_timeout,
            "failure_cooldown": self.failure_cooldown,
            "create_attempts": self.create_attempts,
            "create_backoff": 0.01,
            "create_backoff_max": 0.05,
            "disconnect_timeout": self.disconnect_timeout,
            "create_timeout": self.create_timeout,
            "config_timeout": self.config_timeout,
        }

    def node_args(self) -> list[str]:
        return [
            "--hb",
            str(self.heartbeat_interval),
            "--ttl",
            str(self.node_ttl),
            "--leader-ttl",
            str(self.leader_ttl),
            "--config-interval",
            str(self.config_interval),
            "--healthcheck-interval",
            str(self.healthcheck_interval),
            "--healthcheck-timeout",
            str(self.healthcheck_timeout),
            "--failure-cooldown",
            str(self.failure_cooldown),
            "--create-attempts",
            str(self.create_attempts),
            "--disconnect-timeout",
            str(self.disconnect_timeout),
            "--create-timeout",
            str(self.create_timeout),
            "--config-timeout",
            str(self.config_timeout),
            "--connect-timeout",
            "30",
        ]


class HarnessError(RuntimeError):
    """The harness could not go on (a node crashed, the cluster never settled...)."""


SENTINEL_MASTER = "dimmaster"


class SentinelProcess:
    """One Redis Sentinel (``redis-sentinel``, else ``redis-server --sentinel``) on a free
    loopback port, watching the master at ``master_port`` (quorum 2)."""

    def __init__(self, directory: Path, master_port: int, down_after_ms: int = 1000) -> None:
        from dim.testing import find_redis_server, free_port

        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "sentinel.conf"  # Sentinel rewrites it: it must be writable
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "daemonize no\n"
            f"dir {directory}\n"
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} {down_after_ms}\n"
            f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
            f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
        )
        binary = shutil.which("redis-sentinel")
        args = [binary, str(conf)] if binary else [find_redis_server(), str(conf), "--sentinel"]
        self.log = directory / "sentinel.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.client = redis.Redis(
            port=self.port, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self, others: int) -> bool:
        """It knows a replica that is up and ``others`` other Sentinels."""
        try:
            master = _command(self.client, "SENTINEL", "MASTER", SENTINEL_MASTER)
            replicas = _command(self.client, "SENTINEL", "REPLICAS", SENTINEL_MASTER)
        except redis.RedisError:
            return False
        info = _pairs(master)
        if int(info.get("num-other-sentinels", 0)) < others:
            return False
        for replica in replicas or []:
            flags = str(_pairs(replica).get("flags", ""))
            if "disconnected" not in flags and "s_down" not in flags:
                return True
        return False

    def master_port(self) -> Optional[int]:
        try:
            addr = _command(self.client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
        except redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _pairs(reply: Any) -> dict[str, Any]:
    """A Sentinel reply (a flat list of names and values, or a dict) as a dict."""
    if isinstance(reply, dict):
        return {str(k): v for k, v in reply.items()}
    items = list(reply or [])
    return {str(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    return dict(client.info(section))


class ChaosRun:
    """One seeded chaos run in ``directory`` (a temporary one by default).

    Every node reaches Redis through a :class:`ChaosProxy` of its own (so one node can
    be cut off alone, and a failover re-points them all); the harness talks to the
    current master directly.

    :meth:`run` returns a JSON-ready dict with the options, what happened, and the
    :class:`Report` of :func:`check` (under ``"report"``; ``result["ok"]`` says whether
    every invariant held).
    """

    def __init__(
        self,
        options: ChaosOptions,
        directory: Optional[Union[str, os.PathLike[str]]] = None,
        progress: Optional[Callable[[str], None]] = None,
    ) -> None:
        unknown = set(options.kinds) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        if not options.kinds:
            raise ValueError("no fault kinds")
        self.options = options
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="dim-chaos-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress or (lambda line: None)
        self.rng = random.Random(options.seed)
        self.service = f"chaos-{options.seed}-{secrets.token_hex(3)}"
        self.control = self.dir / "control.json"
        self.harness = LedgerFile(self.dir / "harness.jsonl")
        self.redis = RedisServer(directory=self.dir / "redis")
        self.servers: list[RedisServer] = [self.redis]  # every server started, for cleanup
        self.sentinels: list[SentinelProcess] = []
        self.proxies: dict[int, ChaosProxy] = {}  # node pid -> its proxy
        self.procs: Optional[NodeProcs] = None
        self.client: Optional[redis.Redis] = None
        self.base: set[int] = set()  # the N nodes the cluster should have between faults
        self.bounds = Bounds.from_record({"settings": options.settings(), "slack": options.slack})
        self.began = 0.0
        self.first_round: list[str] = []

    # helpers

    def _say(self, text: str) -> None:
        self.progress(f"[{time.monotonic() - self.began:7.1f}s] {text}")

    @property
    def _procs(self) -> NodeProcs:
        assert self.procs is not None
        return self.procs

    @property
    def _client(self) -> redis.Redis:
        assert self.client is not None
        return self.client

    def _check_crashes(self) -> None:
        crashed = self._procs.crashed()
        if crashed:
            raise HarnessError(f"node processes exited on their own: {crashed}")

    def _settled(self, pids: set[int]) -> bool:
        """Settled on ``pids`` (see :meth:`NodeProcs.settled`), a leader among them, and
        no reset window open: the next fault must not start inside the last one's."""
        self._check_crashes()
        try:
            if not self._procs.settled(self._client, pids):
                return False
            if self._procs.leader_pid(self._client) not in pids:
                return False
            reset = getattr(self._procs.keys, "reset", None)
            return reset is None or not self._client.exists(reset)
        except redis.RedisError:
            return False

    def _wait_settled(self, pids: set[int]) -> Optional[float]:
        """When the cluster settled on ``pids`` (None if it did not in time)."""
        try:
            wait_until(lambda: self._settled(pids), self.options.settle_timeout, 0.02)
        except TimeoutError:
            return None
        return time.monotonic()

    def _leader(self) -> Optional[int]:
        try:
            return self._procs.leader_pid(self._client)
        except redis.RedisError:
            return None

    def _wait_leader(self) -> int:
        def leader() -> Optional[int]:
            self._check_crashes()
            pid = self._leader()
            return pid if pid in self.base else None

        found = wait_until(leader, self.options.settle_timeout, 0.02, "no leader")
        assert found is not None
        return found

    def _victim(self, leader: bool = False) -> int:
        current = self._wait_leader()
        if leader:
            return current
        return self.rng.choice(sorted(self.base - {current}))

    def _wait_fenced(self, since: float, pids: set[int], at_least: float) -> None:
        """Until every node in ``pids`` fenced itself and ``at_least`` s passed."""
        deadline = since + at_least

        def done() -> bool:
            self._check_crashes()
            return time.monotonic() >= deadline and pids <= self._procs.view().fenced(since)

        try:
            wait_until(done, self.options.settle_timeout, 0.02)
        except TimeoutError:
            fenced = self._procs.view().fenced(since)
            self._say(f"not every node fenced itself: {sorted(pids - fenced)} did not")

    def _hold(self, since: float, seconds: float) -> None:
        """Let a fault last ``seconds`` from ``since`` (a crash ends the wait)."""

        def done() -> bool:
            self._check_crashes()
            return time.monotonic() - since >= seconds

        wait_until(done, seconds + 5.0, 0.002)

    def _fault(
        self, kind: str, t_start: float, t_end: float, expect: set[int], **detail: Any
    ) -> Record:
        """Wait for the cluster to settle on ``expect``, then write the fault record."""
        settled = self._wait_settled(expect)
        record: Record = {
            "kind": kind,
            "t_start": t_start,
            "t_end": t_end,
            "settled": settled,
            "detail": detail,
        }
        self.harness.write(ev="fault", **record)
        meta = KINDS[kind]
        ref = t_end if meta.measure_from == "end" else t_start
        took = f"{settled - ref:.2f}s" if settled is not None else "NEVER"
        shown = {k: v for k, v in detail.items() if k != "blackout"}
        self._say(f"{kind} {shown}: settled after {took}")
        if settled is None:
            raise HarnessError(
                f"the cluster did not settle within {self.options.settle_timeout:g}s after {kind}"
            )
        return record

    def _control(self, **fields: Any) -> None:
        write_control(self.control, **fields)

    # node processes, each behind a proxy of its own

    def _spawn(self, count: int, *extra: str) -> list[int]:
        proxies = [ChaosProxy(self.redis.port) for _ in range(count)]
        try:
            pids = self._procs.spawn(count, *extra, redis_urls=[p.url for p in proxies])
        except BaseException:
            for proxy in proxies:
                proxy.close()
            raise
        self.proxies.update(zip(pids, proxies))
        return pids

    def _gone(self, pid: int) -> None:
        """The process is dead: close its proxy."""
        proxy = self.proxies.pop(pid, None)
        if proxy is not None:
            proxy.close()

    def _exit(self, pid: int, code: int, phase: str) -> None:
        node = self._procs.view().ready.get(pid)
        self.harness.write(
            ev="exit", pid=pid, node=node, code=code, phase=phase, t_exit=time.monotonic()
        )
        self._gone(pid)

    def _terminate(self, pids: Iterable[int], phase: str) -> dict[int, int]:
        """SIGTERM at once; record each exit (code and when) and close their proxies."""
        pids = list(pids)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        codes = {}
        for pid in pids:
            codes[pid] = self._procs.wait_exit(pid)
            self._exit(pid, codes[pid], phase)
        self.base -= set(pids)
        return codes

    def _kill9(self, pid: int) -> tuple[float, float]:
        sent, reaped = self._procs.kill9(pid)
        node = self._procs.view().ready.get(pid)
        self.harness.write(ev="killed", pid=pid, node=node, t=reaped, t_sent=sent)
        self._gone(pid)
        self.base.discard(pid)
        return sent, reaped

    def _replace(self, count: int = 1) -> None:
        t0 = time.monotonic()
        new = set(self._spawn(count))
        self.base |= new
        self._fault("replace", t0, time.monotonic(), set(self.base), pids=sorted(new))

    def _leave(self, pids: Iterable[int]) -> None:
        pids = sorted(pids)
        t1 = time.monotonic()
        codes = self._terminate(pids, "leave_burst")
        self._fault("leave_burst", t1, time.monotonic(), set(self.base), codes=codes)

    def _pending_disconnects(self) -> list[tuple[Any, int]]:
        """Slowed disconnects of live processes called but not returned yet."""
        view = self._procs.view()
        alive = {view.ready.get(pid) for pid in self._procs.alive()}
        ended = {(iv.node, iv.inst) for iv in view.intervals if iv.end is not None}
        return [k for k in view.disconnecting if k not in ended and k[0] in alive]

    def _pending_creates(self) -> list[tuple[Any, int]]:
        """Slowed creates of live processes called but not returned yet."""
        view = self._procs.view()
        alive = {view.ready.get(pid) for pid in self._procs.alive()}
        return [k for k in view.slow_creates if k not in view.created and k[0] in alive]

    def _wait_disconnects(self) -> None:
        """Until every slowed create and disconnect has returned (a crash of the node
        meanwhile would cost create_lease, or be an overrun, not what the next fault
        measures)."""

        def none() -> bool:
            self._check_crashes()
            return not self._pending_disconnects() and not self._pending_creates()

        try:
            wait_until(none, self.options.settle_timeout, 0.02)
        except TimeoutError:
            self._say(
                f"slowed calls never returned: disconnects {self._pending_disconnects()}, "
                f"creates {self._pending_creates()}"
            )

    def _running_on(self, pid: int, count: int) -> list[Any]:
        mine = sorted(self._procs.view().running({pid}))
        return self.rng.sample(mine, min(count, len(mine)))

    # Redis: the current master, replicas, snapshots

    def _new_client(self) -> None:
        old, self.client = (
            self.client,
            self.redis.client(socket_timeout=5.0, socket_connect_timeout=5.0),
        )
        if old is not None:
            old.close()

    def _repoint(self, server: RedisServer) -> None:
        """``server`` is the master now: every proxy and the harness's client go there."""
        self.redis = server
        for proxy in list(self.proxies.values()):
            proxy.retarget(server.port)
        self._new_client()

    def _wait_reset(self, since: float) -> Optional[float]:
        """After Redis lost or rewound data: wait until a node noticed (a ``redis_reset``
        event, or the reset window in Redis), so that the settle that follows waits for
        the window to close. None if nobody noticed within 2 node_ttl + 1 s."""
        reset = getattr(self._procs.keys, "reset", None)

        def seen() -> Optional[float]:
            self._check_crashes()
            events = self._procs.view().events
            times = [
                float(r["t"])
                for r in events[-200:]
                if r.get("type") == "redis_reset" and float(r["t"]) > since
            ]
            if times:
                return min(times) - since
            try:
                if reset is not None and self._client.exists(reset):
                    return time.monotonic() - since
            except redis.RedisError:
                pass
            return None

        try:
            return wait_until(seen, 2 * self.options.node_ttl + 1.0, 0.01)
        except TimeoutError:
            self._say("no node noticed that Redis lost or rewound data")
            return None

    def _forget_snapshot(self, server: Optional[RedisServer] = None) -> None:
        """Delete the server's RDB file, so that its next start begins empty."""
        server = server or self.redis
        for name in ("dump.rdb",):
            try:
                (server.directory / name).unlink()
            except FileNotFoundError:
                pass

    def _start_replica(self) -> RedisServer:
        """A new server replicating the master, in sync when this returns.

        It is started as a master and told ``REPLICAOF`` at run time, so that a later
        restart of it (once promoted) comes back as a master.
        """
        replica = RedisServer(directory=self.dir / f"redis-{len(self.servers)}")
        self.servers.append(replica)
        replica.start()
        master = self._client
        # no 5 s wait for more replicas, no RDB file on either side
        master.config_set("repl-diskless-sync", "yes")
        master.config_set("repl-diskless-sync-delay", "0")
        with replica.client(socket_timeout=5.0) as c:
            c.config_set("repl-diskless-load", "on-empty-db")
            _command(c, "REPLICAOF", "127.0.0.1", str(self.redis.port))
            target = int(_info(master, "replication").get("master_repl_offset", 0))

            def synced() -> bool:
                info = _info(c, "replication")
                return (
                    info.get("master_link_status") == "up"
                    and int(info.get("slave_repl_offset", -1)) >= target
                )

            wait_until(synced, 30.0, 0.02, "the replica did not sync")
        return replica

    def _promote(self, replica: RedisServer) -> None:
        with replica.client(socket_timeout=5.0) as c:
            _command(c, "REPLICAOF", "NO", "ONE")
        self._repoint(replica)
        self._forget_snapshot(replica)

    def _service_keys(self) -> list[bytes]:
        return list(self._client.scan_iter(match=self._procs.keys.prefix + "*", count=1000))

    def _dump_keys(self) -> tuple[dict[bytes, tuple[Optional[bytes], int]], float]:
        """DUMP and PTTL of every key of the service at one moment (MULTI/EXEC)."""
        keys = self._service_keys()
        pipe = self._client.pipeline(transaction=True)
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        values = pipe.execute()
        taken = time.monotonic()
        snapshot = {k: (values[2 * i], int(values[2 * i + 1])) for i, k in enumerate(keys)}
        return snapshot, taken

    def _restore_keys(
        self, snapshot: Mapping[bytes, tuple[Optional[bytes], int]], taken: float
    ) -> dict[str, int]:
        """Every key back to its DUMP with the TTL it has left; keys born since deleted."""
        now_keys = set(self._service_keys())
        elapsed_ms = int((time.monotonic() - taken) * 1000)
        pipe = self._client.pipeline(transaction=True)
        counts = {"restored": 0, "expired": 0, "deleted": 0}
        for key in now_keys - set(snapshot):
            pipe.delete(key)
            counts["deleted"] += 1
        for key, (value, pttl) in snapshot.items():
            if value is None:
                continue
            if pttl == -1:
                pipe.restore(key, 0, value, replace=True)
            elif pttl - elapsed_ms > 0:
                pipe.restore(key, pttl - elapsed_ms, value, replace=True)
            else:
                pipe.delete(key)
                counts["expired"] += 1
                continue
            counts["restored"] += 1
        pipe.execute()
        return counts

    def _change_placement(self) -> tuple[str, Callable[[], None]]:
        """Make the placement change (a join, a leave or a crash) and let it settle;
        returns what it did and how to undo it."""
        how = self.rng.choice(["join", "leave", "kill"])
        if how == "join":
            joined = self._spawn(2)
            self.base |= set(joined)
            undo: Callable[[], None] = lambda: self._leave(joined)  # noqa: E731
        elif how == "leave":
            self._terminate([self._victim()], "leave")
            undo = self._replace
        else:
            self._kill9(self._victim())
            undo = self._replace
        if self._wait_settled(set(self.base)) is None:
            self._say(f"the placement change ({how}) did not settle")
        return how, undo

    # faults: processes

    def fault_kill_node(self) -> None:
        self._kill(leader=False)

    def fault_kill_leader(self) -> None:
        self._kill(leader=True)

    def _kill(self, leader: bool) -> None:
        victim = self._victim(leader)
        sent, reaped = self._kill9(victim)
        kind = "kill_leader" if leader else "kill_node"
        self._fault(kind, sent, reaped, set(self.base), pid=victim)
        self._replace()

    def fault_restart_node(self) -> None:
        victim = self.rng.choice(sorted(self.base))
        was_leader = victim == self._leader()
        t0 = time.monotonic()
        code = self._terminate([victim], "restart")[victim]
        new = set(self._spawn(1))
        self.base |= new
        self._fault(
            "restart_node",
            t0,
            time.monotonic(),
            set(self.base),
            pid=victim,
            leader=was_leader,
            code=code,
            new=sorted(new),
        )

    def fault_pause_node(self) -> None:
        victim = self._victim(leader=self.rng.random() < 0.5)
        was_leader = victim == self._leader()
        others = self.base - {victim}
        procs = self._procs
        stopped = procs.stop_proc(victim)
        try:

            def taken_over() -> bool:
                self._check_crashes()
                running = procs.view().running(others)
                return (
                    time.monotonic() - stopped > 1.5 * self.options.node_ttl
                    and set(running) == set(procs.config_ids)
                    and all(len(w) == 1 for w in running.values())
                )

            try:
                wait_until(taken_over, self.options.settle_timeout, 0.02)
            except TimeoutError:
                self._say(f"the others did not take over while pid {victim} was stopped")
        finally:
            resumed = procs.cont_proc(victim)
        node = procs.view().ready.get(victim)
        self.harness.write(ev="paused", pid=victim, node=node, t_stop=stopped, t_cont=resumed)
        self._fault(
            "pause_node",
            stopped,
            resumed,
            set(self.base),
            pid=victim,
            leader=was_leader,
            frozen=resumed - stopped,
        )

    def fault_join_burst(self) -> None:
        t0 = time.monotonic()
        burst = set(self._spawn(self.options.burst))
        everyone = self.base | burst
        self._fault("join_burst", t0, time.monotonic(), everyone, pids=sorted(burst))
        self._pause_quietly()
        t1 = time.monotonic()
        codes = self._terminate(sorted(burst), "leave_burst")
        self._fault("leave_burst", t1, time.monotonic(), set(self.base), codes=codes)

    # faults: Redis

    def fault_redis_restart(self) -> None:
        t0 = time.monotonic()
        self._forget_snapshot()
        self.redis.restart()
        t1 = time.monotonic()
        reset = self._wait_reset(t0)
        self._fault("redis_restart", t0, t1, set(self.base), reset_seen=reset)

    def fault_redis_outage(self) -> None:
        t0 = time.monotonic()
        self.redis.stop()
        self._forget_snapshot()
        self._wait_fenced(t0, set(self.base), 1.5 * self.options.node_ttl)
        self.redis.start()
        t1 = time.monotonic()
        reset = self._wait_reset(t1)
        self._fault("redis_outage", t0, t1, set(self.base), down=t1 - t0, reset_seen=reset)

    def fault_stale_snapshot(self) -> None:
        t0 = time.monotonic()
        self._client.save()
        how, undo = self._change_placement()
        killed = time.monotonic()
        self.redis.kill()
        self.redis.start()  # the same port and directory: it loads the stale dump.rdb
        back = time.monotonic()
        self._forget_snapshot()
        self._new_client()
        loaded = int(self._client.dbsize())
        reset = self._wait_reset(killed)
        self._fault(
            "stale_snapshot",
            t0,
            back,
            set(self.base),
            change=how,
            keys_loaded=loaded,
            stale_for=killed - t0,
            reset_seen=reset,
            blackout=[[killed, back]],
        )
        undo()

    def fault_lost_writes(self) -> None:
        t0 = time.monotonic()
        snapshot, taken = self._dump_keys()
        how, undo = self._change_placement()
        counts = self._restore_keys(snapshot, taken)
        t1 = time.monotonic()
        reset = self._wait_reset(t1)
        self._fault(
            "lost_writes",
            t0,
            t1,
            set(self.base),
            change=how,
            rewound_by=t1 - taken,
            reset_seen=reset,
            **counts,
        )
        undo()

    def fault_replica_failover(self) -> None:
        t0 = time.monotonic()
        replica = self._start_replica()
        replica.pause()  # SIGSTOP: it lags from here on
        lagging = time.monotonic()
        try:
            how, undo = self._change_placement()
        except BaseException:
            replica.resume()
            raise
        killed = time.monotonic()
        self.redis.kill()
        replica.resume()
        self._promote(replica)
        promoted = time.monotonic()
        reset = self._wait_reset(killed)
        self._fault(
            "replica_failover",
            t0,
            promoted,
            set(self.base),
            change=how,
            lag=killed - lagging,
            port=replica.port,
            reset_seen=reset,
            blackout=[[killed, promoted]],
        )
        undo()

    def fault_sentinel_failover(self) -> None:
        o = self.options
        t0 = time.monotonic()
        old = self.redis
        replica = self._start_replica()
        seq = len(self.sentinels)
        sentinels = [SentinelProcess(self.dir / f"sentinel-{seq + i}", old.port) for i in range(3)]
        self.sentinels += sentinels
        try:
            wait_until(
                lambda: all(s.ready(len(sentinels) - 1) for s in sentinels),
                30.0,
                0.05,
                "the Sentinels did not find the replica and each other",
            )
            how = self.rng.choice(["failover", "kill"])
            before = set(self._procs.view().ready)
            t_spawn = time.monotonic()
            spawned: dict[str, Any] = {}
            where = ",".join(s.address for s in sentinels)

            def spawn_burst() -> None:
                try:
                    spawned["pids"] = self._procs.spawn(
                        o.sentinel_burst, "--sentinel", where, "--sentinel-master", SENTINEL_MASTER
                    )
                except BaseException as exc:  # reported below
                    spawned["error"] = exc

            spawner = threading.Thread(target=spawn_burst, name="sentinel-burst", daemon=True)
            spawner.start()

            def moving() -> bool:
                # a node of the burst has started creating: moves are under way (no
                # crash check here: the spawning thread is changing the process table)
                view = self._procs.view()
                return (
                    any(iv.start > t_spawn and iv.pid not in before for iv in view.intervals)
                    or "error" in spawned
                )

            try:
                wait_until(moving, o.settle_timeout, 0.005)
            except TimeoutError:
                self._say("the Sentinel burst never started moving configs")
            triggered = time.monotonic()
            if how == "failover":
                _command(sentinels[0].client, "SENTINEL", "FAILOVER", SENTINEL_MASTER)
            else:
                old.kill()

            def switched() -> bool:
                if any(s.master_port() != replica.port for s in sentinels[:1]):
                    return False
                try:
                    with replica.client(socket_timeout=1.0) as c:
                        return _info(c, "replication").get("role") == "master"
                except redis.RedisError:
                    return False

            wait_until(switched, 60.0, 0.005, "Sentinel did not fail the master over")
            announced = time.monotonic()
            blackout = [[triggered, announced]] if how == "kill" else []
            if how == "failover":
                # The nodes behind the proxies behave like Sentinel clients: they keep
                # their connections to the old master until it stops taking writes
                # (Sentinel converts it to a replica of the new one: READONLY, then a
                # reconnect to the master Sentinel names). Moving them at once would
                # split the cluster over two writable masters, as no Sentinel client
                # would.
                def converted() -> bool:
                    try:
                        with old.client(socket_timeout=1.0) as c:
                            return _info(c, "replication").get("role") != "master"
                    except redis.RedisError:
                        return True

                wait_until(converted, 60.0, 0.005, "Sentinel never converted the old master")
                blackout = [[time.monotonic(), time.monotonic()]]
            self._repoint(replica)
            self._forget_snapshot(replica)
            repointed = time.monotonic()
            blackout[-1][1] = repointed
            reset = self._wait_reset(triggered)
            spawner.join(o.settle_timeout)
            if "error" in spawned:
                raise HarnessError(f"the Sentinel burst did not start: {spawned['error']!r}")
            burst = list(spawned.get("pids", []))
            self.base |= set(burst)
            self._fault(
                "sentinel_failover",
                t0,
                repointed,
                set(self.base),
                how=how,
                burst=burst,
                failover_took=announced - triggered,
                old_master_writable=repointed - triggered,
                port=replica.port,
                reset_seen=reset,
                blackout=blackout,
            )
            self._leave(burst)
        finally:
            for s in sentinels:
                s.stop()
            if self.redis is not old:
                old.stop()  # demoted to a replica of the new master (or dead already)

    # faults: the network

    def fault_proxy_stall(self) -> None:
        t0 = time.monotonic()
        proxies = list(self.proxies.values())
        for proxy in proxies:
            proxy.stall()
        try:
            self._wait_fenced(t0, set(self.base), 1.5 * self.options.node_ttl)
        finally:
            for proxy in proxies:
                proxy.resume()
        t1 = time.monotonic()
        self._fault("proxy_stall", t0, t1, set(self.base), stalled=t1 - t0)

    def fault_slow_redis(self) -> None:
        o = self.options
        # round trips grow by 2 * (latency + up to jitter): up to 0.4 of a socket timeout
        socket_timeout = max(o.heartbeat_interval, 0.25)
        latency, jitter = socket_timeout * 0.08, socket_timeout * 0.12
        t0 = time.monotonic()
        proxies = list(self.proxies.values())
        for proxy in proxies:
            proxy.set_latency(latency, jitter)
        try:
            self._hold(t0, max(2.0, 2 * o.node_ttl))
        finally:
            for proxy in proxies:
                proxy.set_latency(0.0)
        self._fault(
            "slow_redis", t0, time.monotonic(), set(self.base), latency=latency, jitter=jitter
        )

    def fault_fence_stall(self) -> None:
        """One node's network stalls for renew_deadline +- 2 heartbeats while its
        disconnects are slow: the heal lands just before the fence, just after it, or
        while the fence's disconnects run. In the ``creating`` variant two of its
        configs are being recreated (slow creates) when the stall begins, so creates
        are in flight at the fence too."""
        o, b = self.options, self.bounds
        victim = self._victim(leader=self.rng.random() < 0.3)
        offset = self.rng.uniform(-2 * o.heartbeat_interval, 2 * o.heartbeat_interval)
        stall = b.renew_deadline + offset
        slow = self.rng.uniform(0.3, 0.8) * o.disconnect_timeout
        variant = self.rng.choice(["running", "creating"])
        rules: Record = {"disconnect_delay": {"pids": [victim], "seconds": slow}}
        ids: list[Any] = []
        creating = 0.0
        mark = 0.0
        if variant == "creating":
            ids = self._running_on(victim, 2)
            creating = self.rng.uniform(0.3, 0.6) * o.create_timeout
            rules["create_delay"] = {"pids": [victim], "seconds": creating}
            mark = time.monotonic()
            self._control(**rules, unhealthy={"ids": ids, "pids": [victim]})

            def recreating() -> bool:
                self._check_crashes()
                return any(
                    iv.pid == victim and iv.cid in ids and iv.start > mark
                    for iv in self._procs.view().intervals
                )

            try:
                wait_until(recreating, o.settle_timeout, 0.002)
            except TimeoutError:
                self._say(f"configs {ids} of pid {victim} were not recreated")
        proxy = self.proxies[victim]
        t0 = time.monotonic()
        # the fault began when it made instances recreate: their gaps are its own
        began = mark if variant == "creating" else t0
        proxy.stall()
        try:
            self._control(**rules)  # no more unhealthy instances
            self._hold(t0, stall)
        finally:
            proxy.resume()
        healed = time.monotonic()
        try:
            self._wait_disconnects()
        finally:
            self._control()
        fenced = [
            float(r["t"])
            for r in self._procs.view().events
            if r.get("type") == "fenced" and r["pid"] == victim and r["t"] > t0
        ]
        self._fault(
            "fence_stall",
            began,
            healed,
            set(self.base),
            pid=victim,
            variant=variant,
            stall=healed - t0,
            offset=healed - t0 - b.renew_deadline,
            fenced=(min(fenced) - t0) if fenced else None,
            disconnect=slow,
            create=creating,
            ids=ids,
        )

    # faults: user callbacks and clocks

    def fault_get_config_fail(self) -> None:
        o = self.options
        t0 = time.monotonic()
        self._control(get_config_error=True)
        try:
            # let the leader hit the failure a few times, then make a new leader face it
            self._hold(time.monotonic(), 2 * o.config_interval)
            leader = self._wait_leader()
            self._terminate([leader], "restart")
            self.base |= set(self._spawn(1))
            settled = self._wait_settled(set(self.base))
            if settled is None:
                self._say("not settled while get_config failed")
            self._hold(time.monotonic(), 2 * o.config_interval)
        finally:
            self._control()
        self._fault(
            "get_config_fail", t0, time.monotonic(), set(self.base), leader_restarted=leader
        )

    def fault_create_fail(self) -> None:
        victim = self.rng.choice(sorted(self.base))
        ids = self._running_on(victim, 3)
        t0 = time.monotonic()
        rule = {"ids": ids, "pids": [victim]}
        self._control(create_fail=rule, unhealthy=rule)
        try:
            self._wait_moved_off(victim, ids)
        finally:
            self._control()
        self._fault("create_fail", t0, time.monotonic(), set(self.base), pid=victim, ids=ids)

    def _wait_moved_off(self, victim: int, ids: list[Any]) -> None:
        def moved() -> bool:
            self._check_crashes()
            running = self._procs.view().running(self.base)
            return all(running.get(c, [victim]) != [victim] for c in ids)

        # dim should hand them over within the create bound: wait a little longer, then
        # let the checker report the gap rather than wait for ever
        o = self.options
        limit = self.bounds.create + o.slack + o.failure_cooldown + 5.0
        try:
            wait_until(moved, limit, 0.02)
        except TimeoutError:
            self._say(f"configs {ids} did not move off pid {victim} within {limit:.1f}s")

    def _wait_recycled(self, victim: int, ids: list[Any], since: float) -> None:
        before = {iv.inst for iv in self._procs.view().open_intervals({victim})}

        def recycled() -> bool:
            self._check_crashes()
            view = self._procs.view()
            fresh = {
                iv.cid
                for iv in view.intervals
                if iv.start > since and (iv.pid != victim or iv.inst not in before)
            }
            return set(ids) <= fresh

        try:
            wait_until(recycled, self.options.settle_timeout, 0.02)
        except TimeoutError:
            self._say(f"configs {ids} of pid {victim} were not recreated")

    def fault_healthcheck_hang(self) -> None:
        o = self.options
        victim = self.rng.choice(sorted(self.base))
        ids = self._running_on(victim, 3)
        t0 = time.monotonic()
        self._control(
            healthcheck_hang={
                "ids": ids,
                "pids": [victim],
                "seconds": 3 * o.healthcheck_timeout,
            }
        )
        try:
            self._hold(t0, 2 * o.healthcheck_interval)
            self._wait_recycled(victim, ids, t0)
        finally:
            self._control()
        self._fault("healthcheck_hang", t0, time.monotonic(), set(self.base), pid=victim, ids=ids)

    def fault_slow_callbacks(self) -> None:
        """create and disconnect slow (within their timeouts) everywhere, while two nodes
        join and then leave: every move pays both."""
        o = self.options
        create = self.rng.uniform(0.2, 0.6) * o.create_timeout
        disconnect = self.rng.uniform(0.3, 0.7) * o.disconnect_timeout
        slow = {"create_delay": {"seconds": create}, "disconnect_delay": {"seconds": disconnect}}
        t0 = time.monotonic()
        self._control(**slow)
        try:
            joined = self._spawn(2)
            self.base |= set(joined)
            if self._wait_settled(set(self.base)) is None:
                self._say("not settled after a join with slow callbacks")
            self._terminate(joined, "leave")
            if self._wait_settled(set(self.base)) is None:
                self._say("not settled after a leave with slow callbacks")
            self._wait_disconnects()
        finally:
            self._control()
        self._fault(
            "slow_callbacks",
            t0,
            time.monotonic(),
            set(self.base),
            create=create,
            disconnect=disconnect,
            joined=joined,
        )

    def fault_disconnect_overrun(self) -> None:
        """One node's disconnects overrun disconnect_timeout while some of its configs
        move: to a node that joins, to the same node (recreated after failing health
        checks), or anywhere (the node restarts gracefully)."""
        o = self.options
        victim = self._victim(leader=self.rng.random() < 0.3)
        seconds = o.disconnect_timeout + self.rng.uniform(0.5, 1.5)
        how = self.rng.choice(["join", "unhealthy", "restart"])
        slow = {"disconnect_delay": {"pids": [victim], "seconds": seconds}}
        t0 = time.monotonic()
        joined: list[int] = []
        ids: list[Any] = []
        self._control(**slow)
        try:
            if how == "join":
                joined = self._spawn(1)
                self.base |= set(joined)
            elif how == "unhealthy":
                ids = self._running_on(victim, 2)
                self._control(**slow, unhealthy={"ids": ids, "pids": [victim]})

                def called() -> bool:
                    self._check_crashes()
                    view = self._procs.view()
                    node = view.ready.get(victim)
                    hit = {
                        iv.cid
                        for iv in view.intervals
                        if iv.node == node and (iv.node, iv.inst) in view.disconnecting
                    }
                    return set(ids) <= hit

                try:
                    wait_until(called, o.settle_timeout, 0.02)
                except TimeoutError:
                    self._say(f"configs {ids} of pid {victim} were never disconnected")
                self._control(**slow)
            else:
                self._terminate([victim], "restart")
                self.base |= set(self._spawn(1))
            self._wait_disconnects()
        finally:
            self._control()
        self._fault(
            "disconnect_overrun",
            t0,
            time.monotonic(),
            set(self.base),
            pid=victim,
            how=how,
            seconds=seconds,
            ids=ids,
            joined=joined,
        )
        if joined:
            self._leave(joined)

    def fault_base_exceptions(self) -> None:
        """Every callback raises a BaseException for some configs (or calls): a health
        check (the instance is recreated), a create (the config goes elsewhere), every
        disconnect of one node (which then stops gracefully), and get_config."""
        excs = list(BASE_EXCEPTIONS)
        self.rng.shuffle(excs)
        where = dict(zip(("healthcheck", "create", "disconnect", "get_config"), excs))
        victim = self._victim()
        picked = self._running_on(victim, 2)
        if len(picked) < 2:
            raise HarnessError(f"pid {victim} runs fewer than 2 configs")
        checked, created = picked
        rules = {
            "healthcheck": {"ids": [checked], "pids": [victim], "exc": where["healthcheck"]},
            "create": {"ids": [created], "pids": [victim], "exc": where["create"]},
            "disconnect": {"pids": [victim], "exc": where["disconnect"]},
            "get_config": {"exc": where["get_config"]},
        }
        t0 = time.monotonic()
        self._control(**{"raise": rules, "unhealthy": {"ids": [created], "pids": [victim]}})
        try:
            self._wait_recycled(victim, [checked], t0)
            self._wait_moved_off(victim, [created])
            rules.pop("healthcheck")
            self._control(**{"raise": rules})
            code = self._terminate([victim], "restart")[victim]
            self.base |= set(self._spawn(1))
        finally:
            self._control()
        self._fault(
            "base_exceptions",
            t0,
            time.monotonic(),
            set(self.base),
            pid=victim,
            raised=where,
            healthcheck_id=checked,
            create_id=created,
            code=code,
        )

    def fault_get_config_hang(self) -> None:
        """get_config hangs past config_timeout on the leader while a node (maybe the
        leader) dies: the dead node's configs must move without get_config; once the
        hang is lifted get_config must be called again."""
        o = self.options
        hang = o.config_timeout + self.rng.uniform(1.0, 3.0)
        leader = self.rng.random() < 0.5
        t0 = time.monotonic()
        self._control(get_config_hang={"seconds": hang}, log_get_config=True)
        try:

            def hanging() -> bool:
                self._check_crashes()
                return any(
                    r["t"] > t0 and r.get("hang") for r in self._procs.view().get_config_calls
                )

            try:
                wait_until(hanging, o.settle_timeout, 0.02)
            except TimeoutError:
                self._say("the leader never called get_config")
            victim = self._victim(leader)
            self._kill9(victim)
            if self._wait_settled(set(self.base)) is None:
                self._say("not settled while get_config hung")
            cleared = time.monotonic()
            self._control(log_get_config=True)

            def resumed() -> Optional[float]:
                self._check_crashes()
                calls = self._procs.view().get_config_calls
                later = [float(r["t"]) for r in calls if r["t"] > cleared]
                return min(later) if later else None

            try:
                again = wait_until(resumed, o.settle_timeout, 0.02)
            except TimeoutError:
                again = None
                self._say("get_config was never called again after the hang")
        finally:
            self._control()
        self._fault(
            "get_config_hang",
            t0,
            cleared,
            set(self.base),
            pid=victim,
            leader=leader,
            hang=hang,
            cleared=cleared,
            resumed=None if again is None else again - cleared,
        )
        self._replace()

    def fault_wall_clock_step(self) -> None:
        """A node's wall clock steps an hour (forward or back), a node restarts (configs
        move to and from it), then the clock steps back to true time."""
        o = self.options
        victim = self._victim(leader=self.rng.random() < 0.5)
        first = self.rng.choice([3600.0, -3600.0])
        t0 = time.monotonic()

        def step(offset: float) -> float:
            seen = len(self._procs.view().records)
            self._control(wall_offset={"pids": [victim], "seconds": offset})

            def applied() -> Optional[float]:
                self._check_crashes()
                for r in self._procs.view().records[seen:]:
                    if (
                        r.get("ev") == "wall_offset"
                        and r["pid"] == victim
                        and r.get("offset") == offset
                    ):
                        return float(r["t"])
                return None

            at = wait_until(applied, 10.0, 0.01, "the wall clock was not stepped")
            assert at is not None
            return at

        try:
            stepped = step(first)
            other = self.rng.choice(sorted(self.base - {victim}))
            self._terminate([other], "restart")
            self.base |= set(self._spawn(1))
            if self._wait_settled(set(self.base)) is None:
                self._say("not settled with a stepped wall clock")
            self._hold(stepped, 2 * o.node_ttl)
            back = step(0.0)
            self._hold(back, 2 * o.node_ttl)
        finally:
            self._control()
        self._fault(
            "wall_clock_step",
            t0,
            time.monotonic(),
            set(self.base),
            pid=victim,
            first=first,
            restarted=other,
        )

    def _pause_quietly(self) -> None:
        _pause(self.options.quiet)

    # the run

    def _deck(self) -> Iterator[str]:
        """The kinds, every one once per pass, in a seeded order that takes them from
        every group in turn (so any stretch of the deck mixes process, Redis, network
        and callback faults)."""
        kinds = list(self.options.kinds)
        while True:
            groups: dict[str, list[str]] = defaultdict(list)
            for kind in kinds:
                groups[FAULTS[kind].group].append(kind)
            order = sorted(groups)
            self.rng.shuffle(order)
            for name in order:
                self.rng.shuffle(groups[name])
            while any(groups.values()):
                for name in order:
                    if groups[name]:
                        yield groups[name].pop()

    def schedule(self) -> Iterator[str]:
        """The first round (every kind, or ``round_size`` of them), then more from the
        same deck until time is up."""
        o = self.options
        deck = self._deck()
        size = len(o.kinds) if o.round_size is None else max(1, o.round_size)
        self.first_round = [next(deck) for _ in range(size)]
        yield from self.first_round
        deadline = self.began + o.minutes * 60
        while time.monotonic() < deadline:
            yield next(deck)

    def run(self) -> Record:
        o = self.options
        self.began = time.monotonic()
        wall = time.time()
        self._control()
        self.harness.write(
            ev="run",
            seed=o.seed,
            nodes=o.nodes,
            configs=list(range(o.configs)),
            settings=o.settings(),
            slack=o.slack,
            service=self.service,
        )
        counts: dict[str, int] = defaultdict(int)
        error: Optional[str] = None
        window_start: Optional[float] = None
        try:
            self.redis.start()
            self._new_client()
            self.procs = NodeProcs(
                self.dir,
                self.redis.url,  # every node gets a proxy of its own instead (_spawn)
                self.service,
                configs=o.configs,
                node_args=o.node_args(),
                shared_ledger=False,
                control=self.control,
                start_timeout=60.0,
                settle_timeout=o.settle_timeout,
                exit_timeout=o.disconnect_timeout + 20.0,
            )
            self.base = set(self._spawn(o.nodes))
            if self._wait_settled(self.base) is None:
                raise HarnessError("the cluster never settled at the start")
            window_start = time.monotonic()
            self._say(f"{o.nodes} nodes run {o.configs} configs; faults begin")
            for kind in self.schedule():
                self._pause_quietly()
                getattr(self, f"fault_{kind}")()
                counts[kind] += 1
        except (HarnessError, NotSettled, TimeoutError, RuntimeError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._say(f"stopping early: {error[:2000]}")
            self.harness.write(ev="harness_error", error=error[:5000])
        except redis.RedisError as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._say(f"stopping early: {error[:2000]}")
            self.harness.write(ev="harness_error", error=error[:5000])
        finally:
            self._finish(window_start)
        records = read_records(
            [self.dir / "harness.jsonl", *(self.procs.ledgers if self.procs else [])]
        )
        report = check(records)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        result: Record = {
            "ok": report.ok,
            "seed": o.seed,
            "minutes": o.minutes,
            "nodes": o.nodes,
            "configs": o.configs,
            "options": attrs.asdict(o),
            "started": wall,
            "duration": time.monotonic() - self.began,
            "first_round": list(self.first_round),
            "fault_counts": dict(counts),
            "error": error,
            "directory": None if self._own_dir else str(self.dir),
            "report": report.to_dict(),
        }
        return result

    def _finish(self, window_start: Optional[float]) -> None:
        """Stop every node with SIGTERM, record exit codes and what Redis still holds."""
        procs = self.procs
        try:
            for proxy in list(self.proxies.values()):
                proxy.heal()
            if procs is not None:
                for pid in list(procs.paused):
                    procs.cont_proc(pid)
                alive = sorted(procs.alive())
                t_end = time.monotonic()
                if window_start is not None:
                    self.harness.write(ev="window", t_start=window_start, t_end=t_end)
                self.harness.write(ev="final", pids=alive)
                for pid in alive:
                    os.kill(pid, signal.SIGTERM)
                for pid in alive:
                    try:
                        code = procs.wait_exit(pid)
                    except TimeoutError as exc:
                        code = -999
                        self.harness.write(ev="harness_error", error=str(exc)[-3000:])
                    self._exit(pid, code, "final")
                took = time.monotonic() - t_end
                self._say(f"SIGTERM to {len(alive)} nodes: all gone after {took:.2f}s")
                if self.client is not None and self.redis.running:
                    try:
                        items = leftovers(self.client, procs.keys)
                        self.harness.write(ev="leftovers", items=items)
                    except redis.RedisError as exc:
                        self.harness.write(ev="harness_error", error=f"leftovers: {exc!r}")
        finally:
            if procs is not None:
                procs.cleanup()
            for proxy in list(self.proxies.values()):
                proxy.close()
            self.proxies.clear()
            if self.client is not None:
                self.client.close()
            for sentinel in self.sentinels:
                sentinel.stop()
            for server in self.servers:
                server.stop()
            self.harness.close()


def format_report(result: Mapping[str, Any]) -> str:
    """The human-readable table of a :meth:`ChaosRun.run` result."""
    report = result["report"]
    bounds = report.get("bounds") or {}
    o = result.get("options", {})
    lines = [
        f"dim chaos run: seed {result['seed']}, {result['nodes']} nodes, "
        f"{result['configs']} configs, {result['duration']:.0f} s; heartbeat "
        f"{o.get('heartbeat_interval')} s, node_ttl {o.get('node_ttl')} s, leader_ttl "
        f"{o.get('leader_ttl')} s, disconnect_timeout {o.get('disconnect_timeout')} s, "
        f"create_timeout {o.get('create_timeout')} s; slack {bounds.get('slack')} s",
        f"lease {bounds.get('lease', 0):.2f} s, create_lease {bounds.get('create_lease', 0):.2f}"
        f" s, reset_window {bounds.get('reset_window', 0):.2f} s",
        f"first round: {', '.join(result.get('first_round') or []) or '-'}",
        "",
        f"{'fault':<18}{'n':>4}  {'recovery median / max (s)':>26}  "
        f"{'settled median / max (s)':>25}  {'bound (s)':>9}",
    ]

    def num(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    for kind, row in report["recovery_by_kind"].items():
        lines.append(
            f"{kind:<18}{row['count']:>4}  "
            f"{num(row['recovery_median']) + ' / ' + num(row['recovery_max']):>26}  "
            f"{num(row['settle_median']) + ' / ' + num(row['settle_max']):>25}  "
            f"{num(row['bound']):>9}"
        )
    missing = [k for k in (o.get("kinds") or []) if k not in report["recovery_by_kind"]]
    if missing:
        lines.append(f"{'(not run)':<18}{', '.join(missing)}")
    lags = [w["lag"] for w in report["wake_lags"]]
    paused = report["paused_overlaps"]
    failovers = [f["took"] for f in report["leader_failovers"]]
    exits = report["exits"]
    bad_exits = [e for e in exits if e["code"] != 0]
    lines += [
        "",
        "invariants",
        f"  (1) overlaps of one config (two nodes or one)  {len(report['overlaps'])}"
        f" ({sum(1 for x in report['overlaps'] if x.get('same_node'))} on one node)",
        f"      explained by a reported disconnect overrun  {len(report['overruns'])}"
        + (
            f", longest {max(x['duration'] for x in report['overruns']):.3f} s"
            if report["overruns"]
            else ""
        ),
        f"      overruns without a disconnect_timeout event {len(report['unreported_overruns'])}",
        f"      after SIGCONT (paused process), allowed     {len(paused)}"
        + (f", longest {max(p['duration'] for p in paused):.3f} s" if paused else ""),
        f"      wake lag after SIGCONT, max (bound {num(bounds.get('wake'))} s)"
        f"    {num(max(lags) if lags else None)} s over {len(lags)} pauses",
        f"  (2) fencing token regressions                  {len(report['token_regressions'])}"
        f" (creates without a lease: {len(report['missing_tokens'])})",
        f"  (3) coverage gaps                              {report['gaps']}"
        f", longest {report['longest_gap']:.2f} s, over bound: {len(report['gaps_over_bound'])}",
        f"      leader failover median / max (bound {num(bounds.get('leader'))} s)"
        f"  {num(statistics.median(failovers) if failovers else None)} / "
        f"{num(max(failovers) if failovers else None)} s",
        f"      get_config never called again after a hang  {len(report['config_stuck'])}",
        f"  (4) SIGTERM exits                              {len(exits) - len(bad_exits)} "
        f"of {len(exits)} exited 0; instances left running: {len(report['open_at_end'])}",
        f"      left in Redis (claims, members, leader)    "
        f"{'not checked' if report['leftovers'] is None else len(report['leftovers'])}",
        "",
    ]
    if report["violations"]:
        lines.append("FAIL: " + "; ".join(report["violations"]))
    else:
        lines.append("PASS: every invariant held")
    return "\n".join(lines)


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dim.chaos run",
        description="A seeded chaos run against real node processes and a private Redis.",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--minutes",
        type=float,
        default=2.0,
        help="keep injecting faults this long (the first round of every kind always "
        "completes; 0: one round)",
    )
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--configs", type=int, default=40)
    p.add_argument("--slack", type=float, default=1.5, help="seconds allowed over each bound")
    p.add_argument("--burst", type=int, default=10, help="nodes joining at once")
    p.add_argument("--sentinel-burst", type=int, default=4, help="nodes joining via Sentinel")
    p.add_argument("--kinds", default=",".join(FAULTS), help="comma-separated fault kinds")
    p.add_argument(
        "--round-size",
        type=int,
        default=None,
        help="kinds in the first round (default: all of them); later ones come from the "
        "same seeded deck",
    )
    p.add_argument("--output", default=None, help="write the JSON result here")
    p.add_argument("--dir", default=None, help="keep ledgers and logs here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run_main(argv: Optional[Sequence[str]] = None, default_output: Optional[str] = None) -> int:
    """The ``run`` command: print the report, save JSON, exit 1 if an invariant failed."""
    args = _run_parser().parse_args(list(argv) if argv is not None else None)
    options = ChaosOptions(
        seed=args.seed,
        minutes=args.minutes,
        nodes=args.nodes,
        configs=args.configs,
        slack=args.slack,
        burst=args.burst,
        sentinel_burst=args.sentinel_burst,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        round_size=args.round_size,
    )
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = ChaosRun(options, args.dir, progress).run()
    print(format_report(result))
    output = args.output or default_output
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
        print(f"saved {output}")
    return 0 if result["ok"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "node":
        return node_main(args[1:])
    if args and args[0] == "run":
        return run_main(args[1:])
    print("usage: python -m dim.chaos {node|run} [options]  (--help after either)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
