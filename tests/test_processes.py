"""Fault tests with one dim node per OS process (``python -m tools.chaos node``).

The ledger, the node processes and the proxy live in :mod:`tools.chaos`, shared with the
chaos harness. Each node appends its instance lifecycle to a shared JSON-lines ledger;
the checks below rebuild, per config, the interval from ``create`` to ``disconnect`` of
every instance, and look for two instances of one config alive at the same time. Faults
are real: kill -9, SIGSTOP/SIGCONT, SIGTERM, and a private redis-server restarted or
stopped.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import redis

from dim import change as change_set
from dim.change import Change
from dim.store import Store
from dim.testing import RedisServer, wait_until
from tools.chaos.ledger import Interval, LedgerView, overlaps, token_regressions
from tools.chaos.processes import NodeProcs, leftovers
from tools.chaos.proxy import ChaosProxy

from .helpers import no_reset_window

# real processes, servers or faults: run on one interpreter (tox: py311)
pytestmark = pytest.mark.slow

HB = 0.05  # heartbeat_interval of the node processes
TTL = 0.6  # node_ttl and leader_ttl
CREATE_TIMEOUT = 1.0
DISCONNECT_TIMEOUT = 1.0
# a crashed node's claims live renew deadline + disconnect_timeout + fence margin
LEASE = TTL - max(HB, TTL / 4) + DISCONNECT_TIMEOUT + max(HB, TTL / 4)
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


@pytest.fixture
def make_procs(tmp_path: Path) -> Iterator[Any]:
    """Factory of NodeProcs; every process it started is killed afterwards (SIGCONT first)."""
    made: list[NodeProcs] = []

    def make(redis_url: str, service: str) -> NodeProcs:
        directory = tmp_path / f"run{len(made)}"
        directory.mkdir()
        procs = NodeProcs(
            directory,
            redis_url,
            service,
            configs=CONFIGS,
            node_args=(
                "--hb",
                str(HB),
                "--ttl",
                str(TTL),
                "--create-timeout",
                str(CREATE_TIMEOUT),
                "--disconnect-timeout",
                str(DISCONNECT_TIMEOUT),
            ),
            start_timeout=START_TIMEOUT,
            settle_timeout=SETTLE_TIMEOUT,
            exit_timeout=EXIT_TIMEOUT,
        )
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


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[ChaosProxy]:
    p = ChaosProxy(redis_server.port)
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
    assert recovery < LEASE + RECOVERY_SLACK, f"recovery took {recovery:.3f}s"
    print(f"kill -9 {victim}: every config running again {recovery:.3f}s after the kill")
    assert_clean(view, closed_at={target: reaped})


def test_kill9_right_after_the_creates_costs_a_lease_not_a_create_lease(
    make_procs: Any, redis_url: str, service: str, client: redis.Redis
) -> None:
    """kill -9 of a node a moment after its creates returned, long before its next
    heartbeat: its configs run again one lease after the kill, not one create lease
    (each claim was given a lease as its create returned)."""
    procs = make_procs(redis_url, service)
    # lease 1.5 + 0.5 + 1.0 = 3 s; create lease 8 + 0.5 + 1.0 + 1.0 = 10.5 s
    timing = ("--hb", "1.0", "--ttl", "2.5", "--create-timeout", "8")
    timing += ("--disconnect-timeout", "0.5")
    lease, create_lease = 3.0, 10.5
    no_reset_window(client, procs.keys)  # (one would last a create lease)
    (first,) = procs.spawn(1, *timing)
    wait_until(lambda: len(procs.view().running({first})) == CONFIGS, 10.0, 0.005)

    def settled() -> bool:  # (the ledger's create line comes before create returns)
        ttls = [client.pttl(key) for key in client.scan_iter(procs.keys.claim("*"))]
        return len(ttls) == CONFIGS and all(0 < ttl <= lease * 1000 for ttl in ttls)

    # (the first heartbeat since came with the start: the next is about a second away)
    wait_until(settled, 0.5, 0.002, "the claims kept their create lease")
    sent, reaped = procs.kill9(first)
    (second,) = procs.spawn(1, *timing)
    view = procs.wait_settled(client, {second})
    recovery = max(iv.start for iv in view.intervals if iv.pid == second) - sent
    print(f"kill -9 right after the creates: every config ran again {recovery:.3f}s later")
    # a lease, a heartbeat for the next try of each claim, and room for a loaded machine
    assert recovery < lease + 2.0 < create_lease, f"recovery took {recovery:.3f}s"
    assert_clean(view, closed_at={first: reaped})


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
    procs: NodeProcs, proxy: ChaosProxy, client: redis.Redis, hold_until_exit: bool
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
    make_procs: Any, proxy: ChaosProxy, service: str, client: redis.Redis
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
    make_procs: Any, proxy: ChaosProxy, service: str, client: redis.Redis
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
        # A new service on a server up for less than the reset window (the Store's is 1 s)
        # opens one, and refuses leader writes while it lasts: the session server is that
        # young when this test is the first to use it.
        wait_until(lambda: c.info("server")["uptime_in_seconds"] >= 1, 10.0, 0.05)
        store = Store(c, service)
        k = store.keys
        change = Change(
            assign={"1": "node-a"}, configs={"1": '[1,{"id":1}]'}, add={"node-a": ["1"]}
        )
        c.set(k.leader, "node-a:5")
        first, kept = store.leader_write("node-a:5", change, 5, "node-a")
        assert first > 0 and kept == []

        def snapshot() -> Any:
            return (
                c.hgetall(k.assignment),
                c.hgetall(k.configs),
                c.get(k.version),
                c.smembers(k.desired("node-a")),
                c.smembers(k.desired("node-b")),
                c.hgetall(k.shares),
                c.hgetall(k.deltas),
            )

        before = snapshot()
        steal = Change(
            assign={"1": "node-b"},
            configs={"1": '[1,{"id":1,"x":2}]'},
            rem={"node-a": ["1"]},
            add={"node-b": ["1"]},
        )
        deltas = change_set.deltas(steal, {"1": "node-b"}, ["node-a", "node-b"])
        pubsub = c.pubsub()
        pubsub.psubscribe(k.events + "*")  # every node's channel and each inbox
        try:
            confirmed = wait_until(lambda: pubsub.get_message(timeout=0.05), 5.0, 0.0)
            assert confirmed["type"] == "psubscribe"
            for current in ("node-b:6", "node-a:7", None):  # deposed, re-elected, none
                if current is None:
                    c.delete(k.leader)
                else:
                    c.set(k.leader, current)
                assert store.leader_write("node-a:5", steal, 5, "node-a", deltas) == (-1, [])
                assert snapshot() == before
                assert c.get(k.leader) == (current.encode() if current else None)
            assert pubsub.get_message(timeout=0.2) is None  # no hint was published
            # the same write under the live value goes through and is announced
            c.set(k.leader, "node-b:8")
            second, _ = store.leader_write("node-b:8", steal, 8, "node-b", deltas)
            assert second > first  # versions are fence values: they only grow
            assert c.hget(k.assignment, "1") == b"node-b"
            # each node whose share changed hears it in its own inbox
            hints = [wait_until(lambda: pubsub.get_message(timeout=0.05), 5.0, 0.0) for _ in "ab"]
            assert sorted(h["channel"] for h in hints) == [
                k.inbox("node-a").encode(),
                k.inbox("node-b").encode(),
            ]
            assert all(b'"assigned"' in h["data"] for h in hints)
            assert c.hget(k.shares, "node-b") == str(second).encode()
        finally:
            pubsub.close()
    finally:
        c.close()
