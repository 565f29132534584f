"""Ledgers: one record per instance lifecycle event, written by nodes, read by checkers.

One format for every user: the node program (:mod:`tools.chaos.node`) and the tooz
node of the benchmarks append JSON lines to files (:class:`LedgerFile`), in-process
clusters of the tests keep the same records in memory (:class:`MemoryLedger`), and
the chaos checker, the process tests and the benchmark observer read them back
(:func:`read_records`, :class:`LedgerTail`) and rebuild each instance's life
(:class:`LedgerView`, :func:`overlaps`, :func:`token_regressions`).

A record is a JSON object with ``t`` (``time.monotonic()``: system-wide on Linux, so
times of different processes compare), ``pid``, ``ev`` and the fields of its event;
``create`` and ``disconnect`` carry ``node``, ``id`` (the config id), ``inst`` (a
serial unique within the writer) and, where known, ``token`` (the fencing token) and
``v`` (the config's content version, in the benchmarks). An instance's interval runs
from its ``create`` record (written when ``create`` is called) to its ``disconnect``
record (written when ``disconnect`` returns): the widest window in which it could act.

Standard library only: the tooz node of the benchmarks runs where dim is not installed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

__all__ = [
    "Interval",
    "LedgerFile",
    "LedgerTail",
    "LedgerView",
    "MemoryLedger",
    "Record",
    "overlaps",
    "read_records",
    "token_regressions",
]

Record = dict[str, Any]


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


class MemoryLedger:
    """The in-process twin of :class:`LedgerFile`: the same records, kept in a list.

    For managers that run in the test process itself (an in-process cluster): there is
    no file to append to and nothing to tail, and :meth:`view` rebuilds the intervals
    with the same :class:`LedgerView` the file ledgers use.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self.pid = os.getpid()

    def write(self, **fields: Any) -> None:
        record: Record = {"t": time.monotonic(), "pid": self.pid}
        record.update(fields)
        with self._lock:
            self._records.append(record)

    @property
    def records(self) -> list[Record]:
        """A copy of every record so far, in the order they were written."""
        with self._lock:
            return list(self._records)

    def view(self) -> LedgerView:
        """The records so far, as intervals (a new view each call)."""
        return LedgerView(self.records)


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


class LedgerTail:
    """Reads what was appended to some ledger files since the last call.

    Only complete lines count: a line still being written is read on a later call.
    """

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
