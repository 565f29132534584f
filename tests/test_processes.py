"""Fault tests with one dim node per OS process (see tests/node_proc.py).

Each node appends its instance lifecycle to a shared JSON-lines ledger; the checks below
rebuild, per config, the interval from ``create`` to ``disconnect`` of every instance,
and look for two instances of one config alive at the same time. Faults are real: kill -9,
SIGSTOP/SIGCONT, SIGTERM, and a private redis-server restarted or stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import redis

from dim import scripts
from dim.keys import Keys
from dim.store import Store, parse_owner
from dim.testing import RedisServer, wait_until

ROOT = Path(__file__).resolve().parent.parent

HB = 0.05  # heartbeat_interval of the node processes
TTL = 0.6  # node_ttl (claim TTL) and leader_ttl
CONFIGS = 12
# Generous bounds for a loaded 2-core machine; typical values are reported by the tests.
START_TIMEOUT = 20.0
SETTLE_TIMEOUT = 20.0
EXIT_TIMEOUT = 10.0
RECOVERY_SLACK = 4.0  # allowed on top of node_ttl for a crash to be healed
WAKE_BOUND = 1.0  # how long a process woken from SIGSTOP may keep its stale instances


class DimBug(AssertionError):
    """A check that fails because of a known, reported bug in dim (see the xfail reasons).

    Tests marked ``xfail(strict=True, raises=DimBug)`` still fail normally on any other
    assertion, and turn into an XPASS failure once the bug is fixed.
    """


ABANDONED_HEARTBEAT = (
    "dim bug: a heartbeat the node abandoned on its socket timeout can still run on the "
    "server later; the HEARTBEAT script (dim/scripts.py) then re-adds the member (ZADD) "
    "and re-creates any missing claim (status 2) of a node that has since left, so the "
    "leader sees a dead member for node_ttl (dim/node.py's claims_lock cannot help: the "
    "client no longer waits for that request)"
)

# -- the ledger --------------------------------------------------------------------------


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


class LedgerView:
    """A snapshot of the ledger file, rebuilt into per-instance intervals."""

    def __init__(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        self.records: list[dict[str, Any]] = []
        for line in data.split(b"\n")[:-1]:  # the last piece is "" or a partial line
            self.records.append(json.loads(line))
        self.ready: dict[int, str] = {}  # pid -> node id
        self.events: list[dict[str, Any]] = [r for r in self.records if r["ev"] == "event"]
        self.stopped: dict[int, float] = {}
        self.intervals: list[Interval] = []
        self.unmatched: list[dict[str, Any]] = []  # disconnects without a create
        by_inst: dict[tuple[int, int], Interval] = {}
        for r in self.records:
            ev = r["ev"]
            if ev == "ready":
                self.ready[r["pid"]] = r["node"]
            elif ev == "stopped":
                self.stopped[r["pid"]] = r["t"]
            elif ev == "create":
                iv = Interval(r["id"], r["pid"], r["node"], r["inst"], r["token"], r["t"])
                by_inst[(r["pid"], r["inst"])] = iv
                self.intervals.append(iv)
            elif ev == "disconnect":
                iv = by_inst.get((r["pid"], r["inst"]))
                if iv is None or iv.end is not None:
                    self.unmatched.append(r)
                else:
                    iv.end = r["t"]
        creates = [r for r in self.records if r["ev"] == "create"]
        # create called while its manager was stopping: Manager.lease() says None then
        self.stop_creates = [r for r in creates if r.get("during_stop")]
        self.missing_token = [r for r in creates if not r["token"] and not r.get("during_stop")]

    def fenced(self, since: float) -> set:
        """Pids whose node fenced itself (renewals failed too long) after ``since``."""
        return {r["pid"] for r in self.events if r["type"] == "fenced" and r["t"] > since}

    def node_pids(self) -> dict[str, int]:
        return {node: pid for pid, node in self.ready.items()}

    def open_intervals(self, pids: Optional[set] = None) -> list[Interval]:
        return [iv for iv in self.intervals if iv.end is None and (pids is None or iv.pid in pids)]

    def running(self, pids: set) -> dict[Any, list[int]]:
        """Who runs what now: config id -> pids with an open interval for it."""
        out: dict[Any, list[int]] = defaultdict(list)
        for iv in self.open_intervals(pids):
            out[iv.cid].append(iv.pid)
        return dict(out)

    def counts(self, pids: set) -> list[int]:
        per_pid = {pid: 0 for pid in pids}
        for iv in self.open_intervals(pids):
            per_pid[iv.pid] += 1
        return sorted(per_pid.values())


def overlaps(
    intervals: list[Interval],
    closed_at: Optional[dict[int, float]] = None,
    clip: Optional[dict[int, tuple[float, float]]] = None,
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
                    continue
                found.append((a, b))
    return found


def unexplained_moves(view: LedgerView, since: float) -> list[Interval]:
    """Instances started after ``since`` whose config did not run, just before, on a node
    that has fenced itself since (a node starved of CPU past its renew deadline stops its
    instances by design, and they start again)."""
    fenced = view.fenced(since)
    out = []
    for iv in view.intervals:
        if iv.start <= since:
            continue
        before = [p for p in view.intervals if p.cid == iv.cid and p.start <= since]
        last = max(before, key=lambda p: p.start) if before else None
        if last is None or last.pid not in fenced:
            out.append(iv)
    return out


def token_regressions(intervals: list[Interval]) -> list[tuple[Interval, Interval]]:
    """Consecutive instances of one config (by create time) whose token went down."""
    by_cid: dict[Any, list[Interval]] = defaultdict(list)
    for iv in intervals:
        by_cid[iv.cid].append(iv)
    bad = []
    for ivs in by_cid.values():
        ivs.sort(key=lambda iv: iv.start)
        ivs = [iv for iv in ivs if iv.token is not None]  # see LedgerView.stop_creates
        for a, b in zip(ivs, ivs[1:]):
            if b.token < a.token:  # type: ignore[operator]
                bad.append((a, b))
    return bad


# -- the processes -----------------------------------------------------------------------


class NodeProcs:
    """Node processes of one service sharing one ledger; every one is killed at teardown."""

    def __init__(self, tmp_path: Path, redis_url: str, service: str) -> None:
        self.dir = tmp_path
        self.redis_url = redis_url
        self.service = service
        self.keys = Keys(service)
        self.ledger_path = tmp_path / "ledger.jsonl"
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self.dead: dict[int, float] = {}  # pid -> time it was known dead (killed)
        self._seq = 0

    # processes

    def spawn(self, n: int, *extra: str) -> list[int]:
        pids = []
        for _ in range(n):
            self._seq += 1
            log = self.dir / f"node{self._seq}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.node_proc",
                        "--redis",
                        self.redis_url,
                        "--service",
                        self.service,
                        "--configs",
                        str(CONFIGS),
                        "--ledger",
                        str(self.ledger_path),
                        "--hb",
                        str(HB),
                        "--ttl",
                        str(TTL),
                        *extra,
                    ],
                    cwd=str(ROOT),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self.procs[proc.pid] = proc
            self.logs[proc.pid] = log
            pids.append(proc.pid)
        wait_until(
            lambda: set(pids) <= set(self.view().ready) or self._exited(pids),
            START_TIMEOUT,
            0.02,
            "node processes did not become ready",
        )
        assert not self._exited(pids), f"a node process exited early:\n{self.log_tails()}"
        return pids

    def wait_exit(self, pid: int, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit code of ``pid``; on a timeout, fail with its thread dump and log."""
        proc = self.procs[pid]
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(signal.SIGUSR1)  # node_proc dumps its threads' stacks
        try:
            wait_until(
                lambda: "most recent call first" in self.logs[pid].read_text(errors="replace"),
                5.0,
                0.05,
            )
        except TimeoutError:
            pass
        raise AssertionError(
            f"pid {pid} did not exit within {timeout:g}s:\n"
            f"{self.logs[pid].read_text(errors='replace')[-20000:]}"
        )

    def _exited(self, pids: list[int]) -> bool:
        return any(self.procs[p].poll() is not None for p in pids)

    def alive(self) -> set:
        return {pid for pid, p in self.procs.items() if p.poll() is None and pid not in self.dead}

    def kill9(self, pid: int) -> tuple[float, float]:
        """SIGKILL; returns (time the signal was sent, time the process was reaped)."""
        sent = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.procs[pid].wait(EXIT_TIMEOUT)
        reaped = time.monotonic()
        self.dead[pid] = reaped
        return sent, reaped

    def stop_proc(self, pid: int) -> float:
        """SIGSTOP; returns a time by which the process was certainly frozen."""
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: proc_state(pid) == "T", 5.0, 0.005, f"pid {pid} did not stop")
        return time.monotonic()

    def cont_proc(self, pid: int) -> float:
        """SIGCONT; returns a time just before the process could run again."""
        resumed = time.monotonic()
        os.kill(pid, signal.SIGCONT)
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
                proc.wait(EXIT_TIMEOUT)
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
        return LedgerView(self.ledger_path)

    def leader_pid(self, client: redis.Redis) -> Optional[int]:
        owner = parse_owner(_text(client.get(self.keys.leader)))
        if owner is None:
            return None
        return self.view().node_pids().get(owner[0])

    def claim_holders(self, client: redis.Redis) -> dict[str, Optional[str]]:
        ckeys = [str(i) for i in range(CONFIGS)]
        values = client.mget([self.keys.claim(c) for c in ckeys])
        out = {}
        for ckey, value in zip(ckeys, values):
            owner = parse_owner(_text(value))
            out[ckey] = owner[0] if owner else None
        return out

    def settled(self, client: Optional[redis.Redis], pids: set, balanced: bool = True) -> bool:
        """Each config runs exactly once, on ``pids`` only, balanced, and (if a client is
        given) the Redis claims and the leader's assignment name the very nodes that run
        them."""
        view = self.view()
        running = view.running(set(view.ready) - set(self.dead))
        if set(running) != set(range(CONFIGS)):
            return False
        if any(len(where) != 1 or where[0] not in pids for where in running.values()):
            return False
        counts = view.counts(pids)
        if balanced and max(counts) - min(counts) > 1:
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
        self, client: Optional[redis.Redis], pids: set, timeout: float = SETTLE_TIMEOUT
    ) -> LedgerView:
        def describe() -> str:
            view = self.view()
            running = view.running(set(view.ready) - set(self.dead))
            return (
                f"not settled on {sorted(pids)}: running {sorted(running.items())}\n"
                f"{self.log_tails()}"
            )

        try:
            wait_until(lambda: self.settled(client, pids), timeout, 0.02)
        except TimeoutError:
            raise AssertionError(describe()) from None
        return self.view()


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def proc_state(pid: int) -> str:
    """The one-letter state of a process from /proc (R, S, T, Z...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


@pytest.fixture
def make_procs(tmp_path: Path) -> Iterator[Any]:
    """Factory of NodeProcs; every process it started is killed afterwards (SIGCONT first)."""
    made: list[NodeProcs] = []

    def make(redis_url: str, service: str) -> NodeProcs:
        directory = tmp_path / f"run{len(made)}"
        directory.mkdir()
        procs = NodeProcs(directory, redis_url, service)
        made.append(procs)
        return procs

    try:
        yield make
    finally:
        for procs in made:
            procs.cleanup()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client(socket_timeout=5.0)
    try:
        yield c
    finally:
        c.close()


# -- a TCP proxy that can hold back heartbeats -------------------------------------------


class HeartbeatHoldingProxy:
    """A TCP proxy in front of Redis that can hold back the heartbeats of one node.

    While :meth:`hold` is on for a node id, every request carrying dim's HEARTBEAT script
    (its ``EVALSHA``) with that node id waits in the proxy until :meth:`release`;
    everything else is forwarded at once. It is a network that delays one kind of request:
    a held request still runs on the server once released, even if its client has given
    up on it meanwhile, as a delayed TCP segment would.
    """

    SHA = hashlib.sha1(scripts.HEARTBEAT.encode()).hexdigest().encode()

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._needle: Optional[bytes] = None  # node id whose heartbeats are held
        self._gate = threading.Event()
        self._gate.set()
        self.held = 0  # requests held back now
        self.held_at: Optional[float] = None  # when the first of them arrived
        self.forwarded = 0  # held requests forwarded since
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self, node_id: str) -> None:
        with self._lock:
            self._needle = node_id.encode()
            self.held_at = None
            self._gate.clear()

    def release(self) -> None:
        with self._lock:
            self._needle = None
            self._gate.set()

    def close(self) -> None:
        self._closed = True
        self.release()
        for sock in [self._listener, *self._socks]:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._socks += [client, server]
            for src, dst, inspect in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, inspect), name="proxy-pump", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
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
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[HeartbeatHoldingProxy]:
    p = HeartbeatHoldingProxy(redis_server.port)
    try:
        yield p
    finally:
        p.close()


def assert_clean(
    view: LedgerView,
    closed_at: Optional[dict[int, float]] = None,
    clip: Optional[dict[int, tuple[float, float]]] = None,
) -> None:
    found = overlaps(view.intervals, closed_at, clip)
    assert not found, f"one config ran twice at once: {found[:5]}"
    assert not view.unmatched, f"disconnects without a create: {view.unmatched[:5]}"
    assert not view.missing_token, f"create without a lease: {view.missing_token[:5]}"
    bad = token_regressions(view.intervals)
    assert not bad, f"fencing token went down: {bad[:5]}"


# -- tests -------------------------------------------------------------------------------


def test_three_processes_spread_evenly(
    make_procs: Any, redis_url: str, service: str, client: redis.Redis
) -> None:
    """Three processes run 12 configs 4/4/4, each exactly once, never two at a time."""
    procs = make_procs(redis_url, service)
    pids = set(procs.spawn(3))
    view = procs.wait_settled(client, pids)
    assert view.counts(pids) == [4, 4, 4]
    assert len(view.running(pids)) == CONFIGS
    assert_clean(view)


@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_kill9_heals(
    make_procs: Any, redis_url: str, service: str, client: redis.Redis, victim: str
) -> None:
    """kill -9 of a node (leader or not): survivors lead and run every config again
    within node_ttl plus slack, with no config ever running twice."""
    procs = make_procs(redis_url, service)
    pids = set(procs.spawn(3))
    procs.wait_settled(client, pids)
    leader = wait_until(lambda: procs.leader_pid(client), 5.0, 0.02, "no leader")
    target = leader if victim == "leader" else min(pids - {leader})
    survivors = pids - {target}
    sent, reaped = procs.kill9(target)

    view = procs.wait_settled(client, survivors)
    new_leader = wait_until(lambda: procs.leader_pid(client), 5.0, 0.02, "no new leader")
    assert new_leader in survivors
    lost = {iv.cid for iv in view.open_intervals({target})}
    replacements = [iv for iv in view.intervals if iv.pid in survivors and iv.start > sent]
    recovery = max(iv.start for iv in replacements) - sent
    assert len(lost) == 4 and lost <= {iv.cid for iv in replacements}
    assert view.counts(survivors) == [6, 6]
    assert recovery < TTL + RECOVERY_SLACK, f"recovery took {recovery:.3f}s"
    print(f"kill -9 {victim}: every config running again {recovery:.3f}s after the kill")
    assert_clean(view, closed_at={target: reaped})


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


def test_sigterm_all_exits_cleanly(
    make_procs: Any, redis_url: str, service: str, client: redis.Redis
) -> None:
    """SIGTERM to every process: each exits 0 promptly, every instance is disconnected,
    and Redis is left with no claim, member or leader."""
    procs = make_procs(redis_url, service)
    pids = set(procs.spawn(3))
    procs.wait_settled(client, pids)
    sent = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    codes = {pid: procs.wait_exit(pid) for pid in pids}
    took = time.monotonic() - sent
    left = leftovers(client, procs.keys)
    assert codes == {pid: 0 for pid in pids}, procs.log_tails()
    view = procs.view()
    print(
        f"SIGTERM to 3 processes: all exited 0 within {took:.3f}s "
        f"({len(view.stop_creates)} creates during stop)"
    )
    assert set(view.stopped) == pids
    assert view.intervals and not view.open_intervals(), view.open_intervals()
    assert_clean(view)
    assert left == []


# Heartbeat 0.4 s gives dim's connections a 0.4 s socket timeout: room to hold a heartbeat
# in flight for a while without the node giving up on it.
SLOW = ("--hb", "0.4", "--ttl", "1.2")
SLOW_TTL = 1.2
IN_FLIGHT = 0.15  # how long a heartbeat is held while its node stops (< socket timeout)


def stop_during_held_heartbeat(
    procs: NodeProcs, proxy: HeartbeatHoldingProxy, client: redis.Redis, hold_until_exit: bool
) -> dict[str, Any]:
    """Settle 3 nodes, hold one follower's heartbeat in the proxy, SIGTERM that node, and
    let the heartbeat through either soon (still awaited by the node) or only after the
    process exited (abandoned on its socket timeout, then run late by the server)."""
    pids = set(procs.spawn(3, *SLOW))
    procs.wait_settled(client, pids)
    leader = wait_until(lambda: procs.leader_pid(client), 5.0, 0.02, "no leader")
    target = min(pids - {leader})
    node = procs.view().ready[target]
    moved = {iv.cid for iv in procs.view().open_intervals({target})}
    proxy.hold(node)
    try:
        wait_until(lambda: proxy.held > 0, 5.0, 0.002, "the heartbeat was not held")
        sent = time.monotonic()
        os.kill(target, signal.SIGTERM)
        if hold_until_exit:
            code = procs.wait_exit(target)
        else:

            def stopped() -> bool:
                return not procs.view().open_intervals({target})

            try:  # the stop may also wait for its heartbeat first: then we time out
                wait_until(
                    stopped, max(0.0, (proxy.held_at or sent) + IN_FLIGHT - time.monotonic()), 0.002
                )
            except TimeoutError:
                pass
    finally:
        proxy.release()
    if not hold_until_exit:
        code = procs.wait_exit(target)
    left = leftovers(client, procs.keys, node)
    if hold_until_exit:  # give the late heartbeat a moment to land
        try:
            left = wait_until(lambda: leftovers(client, procs.keys, node), 0.5, 0.01)
        except TimeoutError:
            left = []
    assert code == 0, procs.log_tails()
    procs.dead[target] = time.monotonic()
    survivors = pids - {target}
    view = procs.wait_settled(client, survivors, timeout=SETTLE_TIMEOUT)
    handover = (
        max(iv.start for iv in view.intervals if iv.pid in survivors and iv.cid in moved) - sent
    )
    assert view.counts(survivors) == [6, 6]
    assert_clean(view)
    return {"left": left, "handover": handover}


def test_graceful_stop_with_heartbeat_in_flight(
    make_procs: Any, proxy: HeartbeatHoldingProxy, service: str, client: redis.Redis
) -> None:
    """A node stopping while its heartbeat is in flight leaves no claim, membership or
    leadership behind, and its configs move at once rather than after the claim TTL."""
    procs = make_procs(proxy.url, service)
    out = stop_during_held_heartbeat(procs, proxy, client, hold_until_exit=False)
    print(
        f"stop with a heartbeat in flight: handover {out['handover']:.3f}s, "
        f"left behind: {out['left']}"
    )
    assert out["left"] == []
    assert out["handover"] < SLOW_TTL * 0.75, f"handover took {out['handover']:.3f}s"


def test_abandoned_heartbeat_run_late(
    make_procs: Any, proxy: HeartbeatHoldingProxy, service: str, client: redis.Redis
) -> None:
    """A heartbeat the node gave up on (socket timeout) but Redis runs later, after the
    node stopped, brings back none of its claims or its membership."""
    procs = make_procs(proxy.url, service)
    out = stop_during_held_heartbeat(procs, proxy, client, hold_until_exit=True)
    print(f"late heartbeat after stop: handover {out['handover']:.3f}s, left behind: {out['left']}")
    if out["left"]:
        raise DimBug(f"a heartbeat run after the node stopped brought back: {out['left']}")


@pytest.mark.parametrize("victim", ["follower", "leader"])
def test_sigstop_longer_than_ttl(
    make_procs: Any, redis_url: str, service: str, client: redis.Redis, victim: str
) -> None:
    """A node frozen (SIGSTOP) past node_ttl loses its configs to the others, stops its
    stale instances within a bound after SIGCONT, and then the cluster settles again."""
    procs = make_procs(redis_url, service)
    pids = set(procs.spawn(3))
    procs.wait_settled(client, pids)
    leader = wait_until(lambda: procs.leader_pid(client), 5.0, 0.02, "no leader")
    target = leader if victim == "leader" else min(pids - {leader})
    others = pids - {target}
    stale = {iv.inst for iv in procs.view().open_intervals({target})}
    assert len(stale) == 4

    stopped = procs.stop_proc(target)
    try:

        def taken_over() -> bool:
            running = procs.view().running(others)
            return set(running) == set(range(CONFIGS)) and all(
                len(w) == 1 for w in running.values()
            )

        wait_until(
            taken_over,
            SETTLE_TIMEOUT,
            0.02,
            f"the others did not take over while pid {target} was stopped",
        )
        frozen_for = time.monotonic() - stopped
        # its claims lapse a TTL after their last renewal, which came at most a few
        # heartbeats before the freeze (more under load): nobody takes over at once
        assert frozen_for > TTL / 2
    finally:
        resumed = procs.cont_proc(target)

    def stale_closed() -> Optional[float]:
        ends = [iv.end for iv in procs.view().intervals if iv.pid == target and iv.inst in stale]
        return max(ends) if all(e is not None for e in ends) else None  # type: ignore

    last = wait_until(stale_closed, 10.0, 0.01, "stale instances were not stopped")
    lag = last - resumed
    print(
        f"SIGSTOP {victim} for {resumed - stopped:.3f}s: stale instances stopped "
        f"{lag * 1000:.0f} ms after SIGCONT"
    )
    assert lag < WAKE_BOUND, f"stale instances kept running {lag:.3f}s after SIGCONT"

    view = procs.wait_settled(client, pids)
    assert view.counts(pids) == [4, 4, 4]
    assert_clean(view, clip={target: (stopped, resumed)})


def rebuilt(procs: NodeProcs, c: redis.Redis, pids: set) -> bool:
    """Members, leader, assignment and claims are back, every config runs once."""
    if not procs.settled(c, pids):
        return False
    k = procs.keys
    now_ms = int(c.time()[0]) * 1000
    live = [n for n, exp in c.zrange(k.nodes, 0, -1, withscores=True) if exp > now_ms]
    return (
        len(live) == len(pids) and procs.leader_pid(c) in pids and (c.hlen(k.assignment) == CONFIGS)
    )


def test_redis_restart_with_data_loss(
    make_procs: Any, own_redis: RedisServer, service: str
) -> None:
    """Redis restarted empty: the cluster rebuilds membership, leadership, assignment and
    claims; nothing moves, no config ever runs twice and fencing tokens never go down."""
    procs = make_procs(own_redis.url, service)
    pids = set(procs.spawn(3))
    c = own_redis.client(socket_timeout=5.0)
    try:
        procs.wait_settled(c, pids)
        # A leader elected before every node has taken its claims back would move
        # instances and could start one twice: a race, so the restart is repeated.
        for round_ in range(5):
            c.set("dim-test-sentinel", "1")
            began = time.monotonic()
            own_redis.restart()
            restarted = time.monotonic()
            assert c.get("dim-test-sentinel") is None  # the data really is gone
            wait_until(
                lambda: rebuilt(procs, c, pids),
                SETTLE_TIMEOUT,
                0.02,
                f"cluster did not rebuild after the restart:\n{procs.log_tails()}",
            )
            took = time.monotonic() - restarted
            view = procs.view()
            moved = [iv for iv in view.intervals if iv.start > began]
            print(
                f"Redis restart {round_} ({restarted - began:.3f}s): rebuilt in {took:.3f}s, "
                f"{len(moved)} moved, fenced: {sorted(view.fenced(began))}"
            )
            assert_clean(view)
            bad = unexplained_moves(view, began)
            assert bad == [], (
                f"round {round_}: the restart (at {began:.3f}) moved {bad}\n{procs.log_tails(40)}"
            )
    finally:
        c.close()


def test_redis_restart_while_a_node_is_frozen(
    make_procs: Any, own_redis: RedisServer, service: str
) -> None:
    """Redis restarted empty while one node is frozen for less than its lease: its configs
    are not started elsewhere, and once it wakes nothing has moved."""
    procs = make_procs(own_redis.url, service)
    pids = set(procs.spawn(3))
    c = own_redis.client(socket_timeout=5.0)
    try:
        procs.wait_settled(c, pids)
        leader = wait_until(lambda: procs.leader_pid(c), 5.0, 0.02, "no leader")
        target = min(pids - {leader})
        theirs = {iv.cid for iv in procs.view().open_intervals({target})}
        # Frozen well inside its renew deadline (node_ttl - heartbeat), so the node keeps
        # its instances and re-claims them on waking: a leader that waits node_ttl after
        # a reset before placing unclaimed configs (DESIGN 4.6) starts nothing twice.
        freeze = 0.35
        stopped = procs.stop_proc(target)
        try:
            began = time.monotonic()
            own_redis.restart()
            restarted = time.monotonic()

            def started_elsewhere() -> bool:
                return any(
                    iv.cid in theirs
                    for iv in procs.view().intervals
                    if iv.start > restarted and iv.pid != target
                )

            wait_until(
                lambda: started_elsewhere() or time.monotonic() - stopped > freeze, 10.0, 0.005
            )
        finally:
            resumed = procs.cont_proc(target)
        print(f"node frozen {resumed - stopped:.3f}s across a Redis restart")  # < its lease
        wait_until(
            lambda: rebuilt(procs, c, pids),
            SETTLE_TIMEOUT,
            0.02,
            f"cluster did not rebuild after the restart:\n{procs.log_tails()}",
        )
        view = procs.view()
        assert_clean(view)
        frozen = resumed - stopped
        if frozen < TTL - 2 * HB:
            # still inside its lease: it takes its claims back and nothing moves. (On a
            # loaded machine the restart itself can outlast the lease; then moves are
            # legitimate and only the no-overlap check above applies.)
            bad = unexplained_moves(view, began)
            assert bad == [], f"the restart moved {bad}\n{procs.log_tails(40)}"
    finally:
        c.close()


def test_redis_down_longer_than_ttl(make_procs: Any, own_redis: RedisServer, service: str) -> None:
    """Redis unreachable past node_ttl: every node stops its instances before its claims
    can expire, and once Redis is back every config runs exactly once again."""
    procs = make_procs(own_redis.url, service)
    pids = set(procs.spawn(3))
    c = own_redis.client(socket_timeout=5.0)
    try:
        procs.wait_settled(c, pids)
        began = time.monotonic()
        own_redis.stop()
        down = time.monotonic()  # every claim was renewed for the last time before this

        wait_until(
            lambda: not procs.view().open_intervals(),
            SETTLE_TIMEOUT,
            0.01,
            "instances still running with Redis down",
        )
        view = procs.view()
        last = max(iv.end for iv in view.intervals)  # type: ignore[type-var]
        fenced_after = last - down
        print(
            f"Redis down: all instances stopped {fenced_after * 1000:.0f} ms after the "
            f"stop (claims expire by {TTL * 1000:.0f} ms)"
        )
        assert fenced_after < TTL, f"instances ran {fenced_after:.3f}s after Redis stopped"
        # every node fenced itself (and says so), and Redis stays away past node_ttl
        wait_until(
            lambda: procs.view().fenced(began) == pids and time.monotonic() - down > TTL + 0.2,
            10.0,
            0.02,
            "not every node reported that it fenced itself",
        )
        assert procs.alive() == pids

        own_redis.start()
        back = time.monotonic()
        view = procs.wait_settled(c, pids)
        print(f"Redis back: every config running again after {time.monotonic() - back:.3f}s")
        assert procs.alive() == pids
        assert_clean(view)
    finally:
        c.close()


def test_deposed_leader_write_is_refused(redis_server: RedisServer, service: str) -> None:
    """A leader write under a stale '<node>:<epoch>' returns -1 and changes nothing."""
    c = redis_server.client(socket_timeout=5.0)
    try:
        store = Store(c, service)
        k = store.keys
        change = {
            "assign": {"1": "node-a"},
            "configs": {"1": '[1,{"id":1}]'},
            "add": {"node-a": ["1"]},
        }
        c.set(k.leader, "node-a:5")
        assert store.leader_write("node-a:5", change, 5, "node-a") == 1

        def snapshot() -> Any:
            return (
                c.hgetall(k.assignment),
                c.hgetall(k.configs),
                c.get(k.version),
                c.smembers(k.desired("node-a")),
                c.smembers(k.desired("node-b")),
            )

        before = snapshot()
        steal = {
            "assign": {"1": "node-b"},
            "configs": {"1": '[1,{"id":1,"x":2}]'},
            "rem": {"node-a": ["1"]},
            "add": {"node-b": ["1"]},
            "unassign": [],
            "drop_configs": [],
        }
        pubsub = c.pubsub()
        pubsub.subscribe(k.events)
        try:
            confirmed = wait_until(lambda: pubsub.get_message(timeout=0.05), 5.0, 0.0)
            assert confirmed["type"] == "subscribe"
            for current in ("node-b:6", "node-a:7", None):  # deposed, re-elected, none
                if current is None:
                    c.delete(k.leader)
                else:
                    c.set(k.leader, current)
                assert store.leader_write("node-a:5", steal, 5, "node-a") == -1
                assert snapshot() == before
                assert c.get(k.leader) == (current.encode() if current else None)
            assert pubsub.get_message(timeout=0.2) is None  # no hint was published
            # the same write under the live value goes through and is announced
            c.set(k.leader, "node-b:8")
            assert store.leader_write("node-b:8", steal, 8, "node-b") == 2
            assert c.hget(k.assignment, "1") == b"node-b"
            hint = wait_until(lambda: pubsub.get_message(timeout=0.05), 5.0, 0.0)
            assert b'"assigned"' in hint["data"]
        finally:
            pubsub.close()
    finally:
        c.close()
