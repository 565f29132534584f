"""A chaos harness for dim: real node processes, a real Redis, real faults, and a checker.

The pieces, each usable on its own (the test suite uses them too):

* **Ledgers.** Every node process appends one JSON line per lifecycle event to its own
  ledger file (:class:`LedgerFile`, one ``os.write`` per line on an ``O_APPEND``
  descriptor)::

      {"t": <time.monotonic()>, "pid": ..., "node": <node id>, "id": <config id>,
       "ev": "create" | "disconnect", "token": <fencing token>, "inst": <serial>}

  plus ``ready``/``stopped`` lines and ``event`` lines for the dim events that explain
  faults. ``time.monotonic()`` is system-wide on Linux, so times of different processes
  compare. The harness keeps a ledger of its own (``harness.jsonl``) with what it did:
  the run's settings, each fault (start, end, when the cluster had settled again),
  processes killed or paused, exit codes, and what Redis held at the end.
* **The node** (``python -m dim.chaos node ...``, :func:`node_main`): a real
  :class:`dim.Manager` over ``[{"id": 0}, ..., {"id": N-1}]`` whose ``create`` and
  ``disconnect`` write the ledger. A small JSON *control file*, re-read whenever it
  changes, makes ``get_config`` fail, ``create`` fail for some configs, ``healthcheck``
  report some instances unhealthy or hang, ``create``/``disconnect`` slow, the config
  count change, or the process's wall clock step (:func:`write_control`).
* **The proxy** (:class:`ChaosProxy`): a TCP proxy of ours between the nodes and Redis
  that can add latency, stall all traffic, drop every connection, or hold back the
  heartbeats of one node.
* **The processes** (:class:`NodeProcs`): start, kill -9, SIGSTOP/SIGCONT, SIGTERM node
  processes, and follow their ledgers (:class:`LedgerView`) to tell when every config
  runs exactly once again.
* **The run** (:class:`ChaosRun`, ``python -m dim.chaos run``): a private
  ``redis-server``, N nodes behind the proxy, and a seeded random schedule of faults;
  after each fault it waits for the cluster to settle and measures the recovery.
* **The checker** (:func:`check`): a pure function over ledger records that reports
  overlaps (one config on two nodes at once; a woken SIGSTOPped process is measured
  separately), fencing tokens that went down, coverage gaps longer than the settings
  allow, recovery times per fault type, and a dirty shutdown (non-zero exits, claims or
  members left in Redis).

``benchmarks/chaos.py`` is the command line for people; the README's "Chaos testing"
section describes what is checked.
"""

from __future__ import annotations

import argparse
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
from dim.store import parse_owner
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
                if r.get("during_stop"):
                    self.stop_creates.append(r)
                elif not r.get("token"):
                    self.missing_token.append(r)
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
    """Consecutive instances of one config (by create time) whose token went down."""
    by_cid: dict[Any, list[Interval]] = defaultdict(list)
    for iv in intervals:
        if iv.token is not None:  # see LedgerView.stop_creates
            by_cid[iv.cid].append(iv)
    bad = []
    for ivs in by_cid.values():
        ivs.sort(key=lambda iv: iv.start)
        for a, b in zip(ivs, ivs[1:]):
            if b.token is not None and a.token is not None and b.token < a.token:
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
        that time is not held against the coverage bound.
    :ivar bound: which coverage bound applies (see :class:`Bounds`).
    :ivar description: for the report.
    """

    name: str
    measure_from: str
    blackout: bool
    bound: str
    description: str


FAULTS: dict[str, FaultKind] = {
    k.name: k
    for k in (
        FaultKind("kill_node", "start", False, "base", "kill -9 of a follower"),
        FaultKind("kill_leader", "start", False, "base", "kill -9 of the leader"),
        FaultKind("restart_node", "start", False, "base", "graceful restart (SIGTERM, start)"),
        FaultKind("pause_node", "start", False, "base", "SIGSTOP past node_ttl, then SIGCONT"),
        FaultKind("redis_restart", "end", True, "reset", "Redis restarted, all data lost"),
        FaultKind("redis_outage", "end", True, "reset", "Redis stopped past node_ttl, data lost"),
        FaultKind("proxy_stall", "end", True, "base", "network stalls past node_ttl"),
        FaultKind("slow_redis", "start", False, "base", "proxy adds latency"),
        FaultKind("join_burst", "start", False, "base", "burst of nodes joining at once"),
        FaultKind("get_config_fail", "start", False, "base", "get_config raises; leader restarts"),
        FaultKind("create_fail", "start", False, "create", "create raises for some configs"),
        FaultKind("healthcheck_hang", "end", False, "base", "healthcheck hangs for some configs"),
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


@attrs.frozen
class Bounds:
    """The time limits that dim's settings imply, plus ``slack`` for a loaded machine.

    * ``base``: a config whose node died runs again within ``max(node_ttl, leader_ttl)``
      plus two heartbeats (its claim expires, the leader reassigns, the new owner claims).
    * ``reset``: after Redis lost its data the new leader waits one ``node_ttl`` before
      placing unclaimed configs, on top of ``base``.
    * ``create``: ``base`` plus the backoffs of ``create_attempts`` failed attempts.
    * ``wake``: how long a process woken from SIGSTOP may keep its stale instances: its
      fence watchdog runs at once; allow two heartbeats and one socket timeout.
    * ``leader``: a dead leader is replaced within ``leader_ttl`` plus one heartbeat.

    A measured time counts as a violation only beyond bound + ``slack``.
    """

    heartbeat_interval: float
    node_ttl: float
    leader_ttl: float
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
            create_attempts=int(s.get("create_attempts", 3)),
            create_backoff=float(s.get("create_backoff", 0.01)),
            create_backoff_max=float(s.get("create_backoff_max", 0.05)),
            slack=float(run.get("slack", 1.5)),
        )

    @property
    def base(self) -> float:
        return max(self.node_ttl, self.leader_ttl) + 2 * self.heartbeat_interval

    @property
    def reset(self) -> float:
        return self.base + self.node_ttl

    @property
    def create(self) -> float:
        waits = 0.0
        for i in range(1, self.create_attempts):
            waits += min(self.create_backoff * 2.0**i, self.create_backoff_max)
        return self.base + waits

    @property
    def wake(self) -> float:
        return 2 * self.heartbeat_interval + max(self.heartbeat_interval, 0.25)

    @property
    def leader(self) -> float:
        return self.leader_ttl + self.heartbeat_interval

    def coverage(self, kind: Optional[str]) -> float:
        """The coverage bound (without slack) for a gap that follows a fault of ``kind``."""
        which = KINDS[kind].bound if kind in KINDS else "base"
        return float(getattr(self, which))

    def to_dict(self) -> Record:
        return {
            "base": self.base,
            "reset": self.reset,
            "create": self.create,
            "wake": self.wake,
            "leader": self.leader,
            "slack": self.slack,
        }


@attrs.define
class Report:
    """What :func:`check` found. ``ok`` is False as soon as one invariant failed."""

    bounds: Optional[Bounds]
    configs: list[Any] = attrs.field(factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    instances: int = 0
    #: (1) two instances of one config alive at once (never allowed)
    overlaps: list[Record] = attrs.field(factory=list)
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
            out.append(f"{len(self.overlaps)} overlaps of one config on two nodes")
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
    * ``{"ev": "fault", "kind": k, "t_start": ..., "t_end": ..., "settled": t or None}``;
    * ``{"ev": "exit", "pid": p, "code": c}`` for a SIGTERM; ``{"ev": "final"}`` once
      every node was asked to stop; ``{"ev": "leftovers", "items": [...]}``;
    * ``{"ev": "harness_error", "error": "..."}``.

    ``bounds`` defaults to those of the ``run`` record's settings.
    """
    recs = list(records)
    run: Optional[Mapping[str, Any]] = None
    window: Optional[tuple[float, float]] = None
    closed_at: dict[Any, float] = {}  # process key (node id, else pid) -> reaped
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
        elif ev == "paused":
            pauses[_proc_key(r)].append((float(r["t_stop"]), float(r["t_cont"])))
        elif ev == "fault":
            fault_recs.append(r)
        elif ev == "exit":
            exits.append({"pid": r["pid"], "code": r["code"], "phase": r.get("phase")})
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
    for entries in normal.values():
        entries.sort(key=lambda e: e[0])
        for i, (_a_start, a_end, a) in enumerate(entries):
            for b_start, b_end, b in entries[i + 1 :]:
                if b_start >= a_end:
                    break
                report.overlaps.append(
                    {
                        "config": a.cid,
                        "first": a.to_dict(),
                        "second": b.to_dict(),
                        "duration": min(a_end, b_end) - b_start,
                    }
                )
    for cid, stales in stale.items():
        for resumed, end, iv, _stopped in stales:
            for s, e, other in normal.get(cid, []):
                if other.pid == iv.pid:
                    continue
                lo, hi = max(s, resumed), min(e, end)
                if hi > lo:
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
    blackouts = [
        (float(f["t_start"]), float(f["t_end"]))
        for f in fault_recs
        if f.get("kind") in KINDS and KINDS[str(f["kind"])].blackout
    ]
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

    # (4) the end: every instance of a process that was not killed was disconnected
    if final:
        report.open_at_end = [
            iv.to_dict()
            for iv in view.intervals
            if iv.end is None and _lookup(closed_at, iv) is None
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
      the change; the node writes an ``ev: "wall_offset"`` line once it has.
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
        rule = self.current().get(name)
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
    p.add_argument("--redis", required=True, help="redis:// URL")
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
    p.add_argument("--create-timeout", type=float, default=30.0)
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
    args = _node_parser().parse_args(list(argv) if argv is not None else None)
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
        max_workers=args.max_workers,
        connect_timeout=args.connect_timeout,
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
        with serial_lock:
            serial = next(serials)
        ledger.write(
            node=node,
            id=config["id"],
            ev="create",
            token=token,
            inst=serial,
            early=early,
            during_stop=during_stop,
        )
        delay = control.rule("create_delay", config["id"])
        if delay is not None:
            threading.Event().wait(float(delay.get("seconds", 1.0)))
            ledger.write(node=node, id=config["id"], ev="created", token=token, inst=serial)
        return _Instance(serial, node, config["id"], token)

    def disconnect(instance: _Instance) -> None:
        delay = control.rule("disconnect_delay", instance.config_id)
        if delay is not None:
            ledger.write(
                node=instance.node,
                id=instance.config_id,
                ev="disconnecting",
                token=instance.token,
                inst=instance.serial,
            )
            threading.Event().wait(float(delay.get("seconds", 1.0)))
        ledger.write(
            node=instance.node,
            id=instance.config_id,
            ev="disconnect",
            token=instance.token,
            inst=instance.serial,
        )

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
        return control.rule("unhealthy", instance.config_id) is None

    manager = Manager(
        get_config=get_config,
        create=create,
        disconnect=disconnect,
        healthcheck=healthcheck if args.control else None,
        redis=args.redis,
        service=args.service,
        settings=settings,
        weight=args.weight,
    )
    box["m"] = manager

    def on_event(event: Event) -> None:
        ledger.write(
            node=event.node_id,
            ev="event",
            type=event.type.value,
            id=event.config_id,
            token=event.token,
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
        # recorded once dim has it: a disconnect that overran disconnect_timeout
        *[t for t in (getattr(EventType, "DISCONNECT_TIMEOUT", None),) if t is not None],
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
                offset = control.current().get("wall_offset") or 0.0
                if isinstance(offset, (int, float)) and offset != applied:
                    _set_wall_offset(float(offset))
                    applied = float(offset)
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

    def spawn(self, n: int, *extra: str, redis_url: Optional[str] = None) -> list[int]:
        """Start ``n`` processes at once and wait until every one is ready.

        ``extra`` arguments go to each node; ``redis_url`` (default: the one given to
        the constructor) lets some processes reach Redis another way (a proxy).
        """
        env = dict(os.environ)
        root = _package_root()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        before = dict(self.view().ready)  # a reused pid must announce a new node
        pids = []
        for _ in range(n):
            self._seq += 1
            log_path = self.dir / f"node{self._seq}.log"
            ledger = self.ledger_path
            if not self.shared_ledger:
                ledger = self.dir / f"ledger-{self._seq}.jsonl"
                self.ledgers.append(ledger)
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(
                    self.command(ledger, *extra, redis_url=redis_url),
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
            try:
                server = socket.create_connection(self.target, timeout=5.0)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            with self._lock:
                self._pairs.add(pair)
                self.connections += 1
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

    ``minutes=0`` runs one round: every fault kind once, in a seeded random order. With
    ``minutes > 0`` that first round always completes, then faults drawn at random
    follow until the time is up.
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
    disconnect_timeout: float = 2.0
    burst: int = 10
    slack: float = 1.5
    settle_timeout: float = 60.0
    quiet: float = 0.3
    kinds: tuple[str, ...] = tuple(FAULTS)

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
            "--connect-timeout",
            "30",
        ]


class HarnessError(RuntimeError):
    """The harness could not go on (a node crashed, the cluster never settled...)."""


class ChaosRun:
    """One seeded chaos run in ``directory`` (a temporary one by default).

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
        self.proxy: Optional[ChaosProxy] = None
        self.procs: Optional[NodeProcs] = None
        self.client: Optional[redis.Redis] = None
        self.base: set[int] = set()  # the N nodes the cluster should have between faults
        self.bounds = Bounds.from_record({"settings": options.settings(), "slack": options.slack})
        self.began = 0.0

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

    @property
    def _proxy(self) -> ChaosProxy:
        assert self.proxy is not None
        return self.proxy

    def _check_crashes(self) -> None:
        crashed = self._procs.crashed()
        if crashed:
            raise HarnessError(f"node processes exited on their own: {crashed}")

    def _settled(self, pids: set[int]) -> bool:
        self._check_crashes()
        try:
            if not self._procs.settled(self._client, pids):
                return False
            return self._procs.leader_pid(self._client) in pids
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
        self._say(f"{kind} {detail}: settled after {took}")
        if settled is None:
            raise HarnessError(
                f"the cluster did not settle within {self.options.settle_timeout:g}s after {kind}"
            )
        return record

    def _control(self, **fields: Any) -> None:
        write_control(self.control, **fields)

    def _replace(self, count: int = 1) -> None:
        t0 = time.monotonic()
        new = set(self._procs.spawn(count))
        self.base |= new
        self._fault("replace", t0, time.monotonic(), set(self.base), pids=sorted(new))

    # faults

    def fault_kill_node(self) -> None:
        self._kill(leader=False)

    def fault_kill_leader(self) -> None:
        self._kill(leader=True)

    def _kill(self, leader: bool) -> None:
        victim = self._victim(leader)
        sent, reaped = self._procs.kill9(victim)
        node = self._procs.view().ready.get(victim)
        self.harness.write(ev="killed", pid=victim, node=node, t=reaped, t_sent=sent)
        self.base.discard(victim)
        kind = "kill_leader" if leader else "kill_node"
        self._fault(kind, sent, reaped, set(self.base), pid=victim)
        self._replace()

    def fault_restart_node(self) -> None:
        victim = self.rng.choice(sorted(self.base))
        was_leader = victim == self._leader()
        t0 = time.monotonic()
        code = self._procs.terminate([victim])[victim]
        self.harness.write(ev="exit", pid=victim, code=code, phase="restart")
        self.base.discard(victim)
        new = set(self._procs.spawn(1))
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

    def fault_redis_restart(self) -> None:
        t0 = time.monotonic()
        self.redis.restart()
        self._fault("redis_restart", t0, time.monotonic(), set(self.base))

    def fault_redis_outage(self) -> None:
        t0 = time.monotonic()
        self.redis.stop()
        self._wait_fenced(t0, set(self.base), 1.5 * self.options.node_ttl)
        self.redis.start()
        t1 = time.monotonic()
        self._fault("redis_outage", t0, t1, set(self.base), down=t1 - t0)

    def fault_proxy_stall(self) -> None:
        t0 = time.monotonic()
        self._proxy.stall()
        try:
            self._wait_fenced(t0, set(self.base), 1.5 * self.options.node_ttl)
        finally:
            self._proxy.resume()
        t1 = time.monotonic()
        self._fault("proxy_stall", t0, t1, set(self.base), stalled=t1 - t0)

    def fault_slow_redis(self) -> None:
        o = self.options
        # round trips grow by 2 * (latency + up to jitter): up to 0.4 of a socket timeout
        socket_timeout = max(o.heartbeat_interval, 0.25)
        latency, jitter = socket_timeout * 0.08, socket_timeout * 0.12
        t0 = time.monotonic()
        self._proxy.set_latency(latency, jitter)
        try:
            duration = max(2.0, 2 * o.node_ttl)
            wait_until(
                lambda: time.monotonic() - t0 >= duration or self._procs.crashed(),
                duration + 5,
                0.05,
            )
        finally:
            self._proxy.set_latency(0.0)
        self._fault(
            "slow_redis", t0, time.monotonic(), set(self.base), latency=latency, jitter=jitter
        )

    def fault_join_burst(self) -> None:
        t0 = time.monotonic()
        burst = set(self._procs.spawn(self.options.burst))
        everyone = self.base | burst
        self._fault("join_burst", t0, time.monotonic(), everyone, pids=sorted(burst))
        self._pause_quietly()
        t1 = time.monotonic()
        codes = self._procs.terminate(sorted(burst))
        for pid, code in codes.items():
            self.harness.write(ev="exit", pid=pid, code=code, phase="leave_burst")
        self._fault("leave_burst", t1, time.monotonic(), set(self.base), codes=codes)

    def fault_get_config_fail(self) -> None:
        o = self.options
        t0 = time.monotonic()
        self._control(get_config_error=True)
        try:
            # let the leader hit the failure a few times, then make a new leader face it
            _pause(2 * o.config_interval)
            leader = self._wait_leader()
            code = self._procs.terminate([leader])[leader]
            self.harness.write(ev="exit", pid=leader, code=code, phase="restart")
            self.base.discard(leader)
            self.base |= set(self._procs.spawn(1))
            settled = self._wait_settled(set(self.base))
            if settled is None:
                self._say("not settled while get_config failed")
            _pause(2 * o.config_interval)
        finally:
            self._control()
        self._fault(
            "get_config_fail", t0, time.monotonic(), set(self.base), leader_restarted=leader
        )

    def _running_on(self, pid: int, count: int) -> list[Any]:
        mine = sorted(self._procs.view().running({pid}))
        return self.rng.sample(mine, min(count, len(mine)))

    def fault_create_fail(self) -> None:
        victim = self.rng.choice(sorted(self.base))
        ids = self._running_on(victim, 3)
        t0 = time.monotonic()
        rule = {"ids": ids, "pids": [victim]}
        self._control(create_fail=rule, unhealthy=rule)
        try:

            def moved() -> bool:
                self._check_crashes()
                running = self._procs.view().running(self.base)
                return all(running.get(c, [victim]) != [victim] for c in ids)

            # dim should hand them over within the create bound: wait a little longer,
            # then let the checker report the gap rather than wait for ever
            o = self.options
            limit = self.bounds.create + o.slack + o.failure_cooldown + 5.0
            try:
                wait_until(moved, limit, 0.02)
            except TimeoutError:
                self._say(f"configs {ids} did not move off pid {victim} within {limit:.1f}s")
        finally:
            self._control()
        self._fault("create_fail", t0, time.monotonic(), set(self.base), pid=victim, ids=ids)

    def fault_healthcheck_hang(self) -> None:
        o = self.options
        victim = self.rng.choice(sorted(self.base))
        ids = self._running_on(victim, 3)
        before = {iv.inst for iv in self._procs.view().open_intervals({victim})}
        t0 = time.monotonic()
        self._control(
            healthcheck_hang={
                "ids": ids,
                "pids": [victim],
                "seconds": 3 * o.healthcheck_timeout,
            }
        )
        try:

            def recycled() -> bool:
                self._check_crashes()
                view = self._procs.view()
                fresh = {
                    iv.cid
                    for iv in view.intervals
                    if iv.pid == victim and iv.start > t0 and iv.inst not in before
                }
                return time.monotonic() - t0 > 2 * o.healthcheck_interval and set(ids) <= fresh

            try:
                wait_until(recycled, self.options.settle_timeout, 0.02)
            except TimeoutError:
                self._say(f"hung healthchecks of {ids} on pid {victim} were not acted on")
        finally:
            self._control()
        self._fault("healthcheck_hang", t0, time.monotonic(), set(self.base), pid=victim, ids=ids)

    def _pause_quietly(self) -> None:
        _pause(self.options.quiet)

    # the run

    def schedule(self) -> Iterator[str]:
        """Every kind once in a seeded random order, then random kinds until time is up."""
        kinds = list(self.options.kinds)
        first = list(kinds)
        self.rng.shuffle(first)
        yield from first
        deadline = self.began + self.options.minutes * 60
        while time.monotonic() < deadline:
            yield self.rng.choice(kinds)

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
            self.client = self.redis.client(socket_timeout=5.0, socket_connect_timeout=5.0)
            self.proxy = ChaosProxy(self.redis.port)
            self.procs = NodeProcs(
                self.dir,
                self.proxy.url,
                self.service,
                configs=o.configs,
                node_args=o.node_args(),
                shared_ledger=False,
                control=self.control,
                start_timeout=60.0,
                settle_timeout=o.settle_timeout,
                exit_timeout=o.disconnect_timeout + 20.0,
            )
            self.base = set(self.procs.spawn(o.nodes))
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
            if self.proxy is not None:
                self.proxy.heal()
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
                    self.harness.write(ev="exit", pid=pid, code=code, phase="final")
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
            if self.proxy is not None:
                self.proxy.close()
            if self.client is not None:
                self.client.close()
            self.redis.stop()
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
        f"{o.get('leader_ttl')} s; slack {bounds.get('slack')} s",
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
    lags = [w["lag"] for w in report["wake_lags"]]
    paused = report["paused_overlaps"]
    failovers = [f["took"] for f in report["leader_failovers"]]
    exits = report["exits"]
    bad_exits = [e for e in exits if e["code"] != 0]
    lines += [
        "",
        "invariants",
        f"  (1) overlaps of one config on two nodes        {len(report['overlaps'])}",
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
    p.add_argument("--kinds", default=",".join(FAULTS), help="comma-separated fault kinds")
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
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
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
