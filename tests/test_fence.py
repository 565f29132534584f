"""Regression tests for the fence and the user callbacks around it (issue #10).

Each instance's interval runs from the moment ``create`` is called to the moment its
``disconnect`` RETURNS; two intervals of one config that intersect are an overlap,
whether they belong to two nodes or to one. The node processes are real
(``python -m tools.chaos node``), their ``create``/``disconnect``/``healthcheck`` slowed
down or hung through the control file (:func:`tools.chaos.control.write_control`); node A
reaches Redis through a :class:`~tools.chaos.proxy.ChaosProxy` that can stall it, node B
directly. Every check reads the nodes' ledgers only.

Timing: heartbeat 0.1 s, node_ttl = leader_ttl = 0.6 s, so a node that cannot renew
fences itself ``node_ttl - max(heartbeat, node_ttl / 4)`` = 0.45 s after its last
renewal, 0.15 s before its claims expire.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import redis

from dim.testing import RedisServer, wait_until
from tools.chaos.control import write_control
from tools.chaos.ledger import Interval, LedgerView, overlaps
from tools.chaos.processes import NodeProcs
from tools.chaos.proxy import ChaosProxy

# real processes, servers or faults: run on one interpreter (tox: py311)
pytestmark = pytest.mark.slow

HB = 0.1
TTL = 0.6  # node_ttl and leader_ttl
CONFIG_INTERVAL = 0.3
DISCONNECT_TIMEOUT = 2.0
CREATE_TIMEOUT = 1.0
RENEW_DEADLINE = TTL - max(HB, TTL / 4)  # 0.45 s: when a node that cannot renew fences
CONFIGS = 12
START_TIMEOUT = 30.0
SETTLE_TIMEOUT = 20.0
EXIT_TIMEOUT = 15.0


def node_args(
    disconnect_timeout: float = DISCONNECT_TIMEOUT, healthcheck_interval: float = 1.0
) -> tuple[str, ...]:
    return (
        "--hb",
        str(HB),
        "--ttl",
        str(TTL),
        "--leader-ttl",
        str(TTL),
        "--config-interval",
        str(CONFIG_INTERVAL),
        "--disconnect-timeout",
        str(disconnect_timeout),
        "--create-timeout",
        str(CREATE_TIMEOUT),
        "--healthcheck-interval",
        str(healthcheck_interval),
        "--healthcheck-timeout",
        "0.5",
    )


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


@pytest.fixture
def make_procs(tmp_path: Path, redis_url: str, service: str) -> Iterator[Any]:
    """Factory of NodeProcs with a control file; every process is killed afterwards."""
    made: list[NodeProcs] = []

    def make(
        configs: int = CONFIGS,
        disconnect_timeout: float = DISCONNECT_TIMEOUT,
        healthcheck_interval: float = 1.0,
    ) -> NodeProcs:
        directory = tmp_path / f"run{len(made)}"
        directory.mkdir()
        control = directory / "control.json"
        write_control(control)
        procs = NodeProcs(
            directory,
            redis_url,
            service,
            configs=configs,
            node_args=node_args(disconnect_timeout, healthcheck_interval),
            control=control,
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


# -- helpers -----------------------------------------------------------------------------


def control(procs: NodeProcs, **fields: Any) -> None:
    assert procs.control is not None
    write_control(procs.control, **fields)


def b_then_a(procs: NodeProcs, proxy: ChaosProxy, client: redis.Redis) -> tuple[int, int]:
    """B (direct) runs every config and leads; then A joins through the proxy: 6/6."""
    (b,) = procs.spawn(1)
    procs.wait_settled(client, {b})
    (a,) = procs.spawn(1, redis_url=proxy.url)
    procs.wait_settled(client, {a, b})
    return a, b


def b_then_a_direct(procs: NodeProcs, client: redis.Redis) -> tuple[int, int]:
    """B runs every config and leads; then A joins (both direct): 6/6."""
    (b,) = procs.spawn(1)
    procs.wait_settled(client, {b})
    (a,) = procs.spawn(1)
    procs.wait_settled(client, {a, b})
    return a, b


def pending_disconnects(view: LedgerView) -> list[Any]:
    """Delayed disconnects called but not returned yet: (pid, instance serial)."""
    called = {(r["pid"], r["inst"]) for r in view.records if r.get("ev") == "disconnecting"}
    ended = {(iv.pid, iv.inst) for iv in view.intervals if iv.end is not None}
    return sorted(called - ended)


def healed(procs: NodeProcs, client: redis.Redis, pids: set[int]) -> LedgerView:
    """Every delayed disconnect has returned, then each config runs exactly once."""
    wait_until(
        lambda: not pending_disconnects(procs.view()),
        SETTLE_TIMEOUT,
        0.01,
        "delayed disconnects did not return",
    )
    return procs.wait_settled(client, pids)


def fenced_at(view: LedgerView, pid: int, since: float) -> Optional[float]:
    """When ``pid`` reported its first fence after ``since`` (None: not yet)."""
    times = [
        r["t"]
        for r in view.events
        if r.get("type") == "fenced" and r["pid"] == pid and r["t"] > since
    ]
    return min(times) if times else None


def describe(
    pairs: Iterable[tuple[Interval, Interval]],
    names: Mapping[int, str],
    t0: float,
    closed_at: Optional[Mapping[int, float]] = None,
) -> str:
    """One line per pair: config, both instances (times from ``t0``), how long they
    overlap. An instance never disconnected ends when its process died (``closed_at``)."""
    closed = closed_at or {}
    lines = []
    for x, y in pairs:
        ends = [e for e in (x.end or closed.get(x.pid), y.end or closed.get(y.pid)) if e]
        dur = (min(ends) if ends else float("inf")) - max(x.start, y.start)

        def one(iv: Interval) -> str:
            if iv.end is not None:
                end = f"{iv.end - t0:+.3f}"
            elif iv.pid in closed:
                end = f"exit {closed[iv.pid] - t0:+.3f}"
            else:
                end = "open"
            who = f"{names.get(iv.pid, iv.pid)}#{iv.inst} tok {iv.token}"
            return f"{who} [{iv.start - t0:+.3f}, {end}]"

        lines.append(f"config {x.cid}: {one(x)} vs {one(y)}: {dur:.3f}s")
    return "\n".join(lines)


def strict_token_failures(intervals: Iterable[Interval]) -> list[tuple[Interval, Interval]]:
    """Consecutive instances of one config (by create time) whose token did not grow."""
    by_cid: dict[Any, list[Interval]] = defaultdict(list)
    for iv in intervals:
        if iv.token is not None:
            by_cid[iv.cid].append(iv)
    bad = []
    for ivs in by_cid.values():
        ivs.sort(key=lambda iv: iv.start)
        bad += [(x, y) for x, y in zip(ivs, ivs[1:]) if y.token <= x.token]  # type: ignore[operator]
    return bad


def elapsed(t0: float, seconds: float) -> None:
    """Wait until ``seconds`` have passed since ``t0`` (a fault's duration)."""
    wait_until(lambda: time.monotonic() - t0 >= seconds, seconds + 5.0, 0.002)


class Trigger:
    """Run ``action`` on a thread as soon as ``condition`` holds (polled every 2 ms)."""

    def __init__(self, condition: Callable[[], bool], action: Callable[[], None]) -> None:
        self.fired: Optional[float] = None
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(0.002):
                if condition():
                    action()
                    self.fired = time.monotonic()
                    return

        self._thread = threading.Thread(target=run, name="trigger", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


# -- harness smoke (passes on today's dim) -------------------------------------------------


def test_harness_knobs(make_procs: Any, proxy: ChaosProxy, client: redis.Redis) -> None:
    """Node knobs work: proxy URL, create/disconnect delays, config count, wall offset."""
    procs = make_procs(configs=2, healthcheck_interval=0.1)
    control(procs, create_delay={"seconds": 0.2}, disconnect_delay={"seconds": 0.25})
    (a,) = procs.spawn(1, "--log-healthchecks", "--max-workers", "3", redis_url=proxy.url)
    assert proxy.connections > 0  # A talks to Redis through the proxy
    procs.wait_settled(client, {a})
    starts = {iv.inst: iv.start for iv in procs.view().intervals}

    def created() -> dict[int, float]:
        return {r["inst"]: r["t"] for r in procs.view().records if r.get("ev") == "created"}

    wait_until(lambda: set(created()) == set(starts), 5.0, 0.01, "creates did not return")
    assert all(t - starts[i] >= 0.2 for i, t in created().items())
    wait_until(
        lambda: sum(r.get("ev") == "healthcheck" for r in procs.view().records) >= 4, 10.0, 0.02
    )
    control(procs, configs=3, disconnect_delay={"seconds": 0.25})
    wait_until(lambda: procs.view().running({a}).keys() == {0, 1, 2}, SETTLE_TIMEOUT, 0.02)
    control(procs, configs=2, disconnect_delay={"seconds": 0.25})
    ended = wait_until(
        lambda: [iv for iv in procs.view().intervals if iv.cid == 2 and iv.end], 10.0, 0.02
    )
    called = [
        r["t"] for r in procs.view().records if r.get("ev") == "disconnecting" and r["id"] == 2
    ]
    assert called and ended[0].end - called[0] >= 0.25
    control(procs, configs=2, wall_offset=-3600)
    wait_until(lambda: any(r.get("ev") == "wall_offset" for r in procs.view().records), 10.0, 0.02)
    assert not overlaps(procs.view().intervals)


# -- 1. a slow disconnect across a partition --------------------------------------------


def test_slow_disconnect_across_partition(
    make_procs: Any, proxy: ChaosProxy, client: redis.Redis
) -> None:
    """A partitioned node with a 0.375 s disconnect never overlaps its successor; all heal."""
    procs = make_procs()
    a, b = b_then_a(procs, proxy, client)
    names = {a: "A", b: "B"}
    control(procs, disconnect_delay={"seconds": 0.375, "pids": [a]})
    t0 = time.monotonic()
    proxy.stall()
    try:
        wait_until(
            lambda: fenced_at(procs.view(), a, t0) is not None and time.monotonic() - t0 >= 2.0,
            SETTLE_TIMEOUT,
            0.01,
            "A did not fence itself while partitioned",
        )
    finally:
        proxy.resume()
    stalled = time.monotonic() - t0
    view = healed(procs, client, {a, b})
    fence = fenced_at(view, a, t0)
    assert fence is not None
    print(f"stall {stalled:.2f}s, A fenced {fence - t0:.3f}s into it")
    found = overlaps(view.intervals)
    assert not found, f"{len(found)} overlaps (t from the stall):\n{describe(found, names, t0)}"


# -- 2. a create still running when the fence fires -------------------------------------


def test_create_in_flight_at_fence(make_procs: Any, proxy: ChaosProxy, client: redis.Redis) -> None:
    """A create in flight at the fence ends (and is undone) before another node's create."""
    procs = make_procs()
    (b,) = procs.spawn(1)
    procs.wait_settled(client, {b})
    names = {b: "B"}
    # every create takes 0.6 s (create_timeout is 1 s); A runs 4 calls at once: the stall
    # starts as the 4th begins, and A fences itself 0.35-0.45 s later, with all 4 still
    # running (the other 2 may not start at all: an attempt starts only while the claim
    # covers it, and nothing renews A's claims during the stall)
    control(procs, create_delay={"seconds": 0.6})
    since = time.monotonic()

    def a_creates() -> list[Interval]:
        return [iv for iv in procs.view().intervals if iv.pid != b and iv.start > since]

    def stall() -> None:
        proxy.stall()
        (pid,) = {iv.pid for iv in a_creates()}
        control(
            procs,
            create_delay={"seconds": 0.6},
            disconnect_delay={"seconds": 0.375, "pids": [pid]},
        )

    trigger = Trigger(lambda: len(a_creates()) >= 4, stall)
    try:
        spawned: dict[str, Any] = {}

        def spawn_a() -> None:
            try:
                spawned["pids"] = procs.spawn(1, "--max-workers", "4", redis_url=proxy.url)
            except BaseException as exc:  # reported below
                spawned["error"] = exc

        spawner = threading.Thread(target=spawn_a, name="spawn-a", daemon=True)
        spawner.start()
        wait_until(lambda: trigger.fired, START_TIMEOUT, 0.01, "A never took 4 configs over")
        t0 = trigger.fired
        assert t0 is not None
        (a,) = {iv.pid for iv in procs.view().intervals if iv.pid != b}
        names[a] = "A"
        wait_until(
            lambda: fenced_at(procs.view(), a, t0) is not None and time.monotonic() - t0 >= 2.0,
            SETTLE_TIMEOUT,
            0.01,
            "A did not fence itself while partitioned",
        )
    finally:
        trigger.close()
        proxy.resume()
    spawner.join(START_TIMEOUT)
    assert "error" not in spawned, spawned.get("error")
    view = healed(procs, client, {a, b})
    fence = fenced_at(view, a, t0)
    assert fence is not None
    done = {r["inst"]: r["t"] for r in view.records if r.get("ev") == "created" and r["pid"] == a}
    in_flight = [
        iv
        for iv in view.intervals
        if iv.pid == a and iv.start < fence and done.get(iv.inst, float("inf")) > fence
    ]
    print(
        f"A fenced {fence - t0:.3f}s after its 4th create; creates in flight then: "
        f"{sorted(iv.cid for iv in in_flight)}"
    )
    # the premise (the harness, not dim): some create was still running at the fence
    assert in_flight, "harness: no create of A was in flight when it fenced itself"
    found = overlaps(view.intervals)
    late = {iv.inst for iv in in_flight}
    marked = [(x, y) for x, y in found if x.inst in late or y.inst in late]
    assert not found, (
        f"{len(found)} overlaps, {len(marked)} of them of an instance whose create was in "
        f"flight at the fence (t from the stall, fence at {fence - t0:+.3f}):\n"
        f"{describe(found, names, t0)}"
    )


# -- 3. a disconnect that overruns disconnect_timeout is reported -----------------------


@pytest.mark.parametrize("how", ["moved", "sigterm"])
def test_disconnect_timeout_reported(make_procs: Any, client: redis.Redis, how: str) -> None:
    """Each disconnect overrunning disconnect_timeout yields a disconnect_timeout event."""
    procs = make_procs(disconnect_timeout=1.0)
    a, b = b_then_a_direct(procs, client)
    names = {a: "A", b: "B"}
    control(procs, disconnect_delay={"seconds": 3.0, "pids": [a]})
    t0 = time.monotonic()
    if how == "moved":
        (c,) = procs.spawn(1)  # 4/4/4: A hands 2 configs to C
        names[c] = "C"
        wait_until(
            lambda: sum(r.get("ev") == "disconnecting" for r in procs.view().records) >= 2,
            SETTLE_TIMEOUT,
            0.01,
            "A was never asked to disconnect anything",
        )
    else:
        os.kill(a, signal.SIGTERM)
        code = procs.wait_exit(a)
        assert code == 0, procs.log_tails()
    calls = [r for r in procs.view().records if r.get("ev") == "disconnecting" and r["pid"] == a]
    assert calls, "harness: no disconnect of A hung"

    def reported() -> list[Mapping[str, Any]]:
        events = {
            (r.get("id"), r.get("token"))
            for r in procs.view().events
            if r["pid"] == a and r.get("type") == "disconnect_timeout"
        }
        return [r for r in calls if (r["id"], r["token"]) not in events]

    try:
        wait_until(lambda: not reported(), 1.0 + 5.0, 0.02)
    except TimeoutError:
        pass
    missing = reported()
    dead = dict(procs.dead)
    found = overlaps(procs.view().intervals, closed_at=dead)
    print(
        f"{how}: {len(calls)} hung disconnects on A; overlaps meanwhile (not checked):\n"
        f"{describe(found, names, t0, dead) or 'none'}"
    )
    assert not missing, (
        f"{len(missing)} of {len(calls)} disconnects that overran disconnect_timeout were "
        f"not reported (no 'disconnect_timeout' event): configs "
        f"{sorted(r['id'] for r in missing)}"
    )


# -- 4. a graceful stop with more instances than workers --------------------------------


# 12 disconnects on 2 workers take 6 x the delay: 2.4 s at 0.4 s, 4.2 s at 0.7 s; the
# second is longer than stop()'s wait (disconnect_timeout + 1 s) although every single
# disconnect returns well within disconnect_timeout.
@pytest.mark.parametrize("seconds", [0.4, 0.7])
def test_stop_more_instances_than_workers(
    make_procs: Any, client: redis.Redis, seconds: float
) -> None:
    """stop() with 12 instances on 2 workers: no overlap, exit within timeout + 3 s."""
    procs = make_procs()
    (a,) = procs.spawn(1, "--max-workers", "2")
    procs.wait_settled(client, {a})
    # B takes nothing while A runs (weight 1/100 of A's: a share of 0.12 configs)
    (b,) = procs.spawn(1, "--weight", "0.01")
    names = {a: "A", b: "B"}
    control(procs, disconnect_delay={"seconds": seconds, "pids": [a]})
    node_b = procs.view().ready[b]
    wait_until(
        lambda: client.zscore(procs.keys.nodes, node_b) and procs.settled(client, {a}),
        SETTLE_TIMEOUT,
        0.02,
        "harness: B did not join with every config left on A",
    )
    before = procs.view().running({a, b})
    assert sorted(before) == list(range(CONFIGS)) and all(w == [a] for w in before.values()), (
        f"harness: not every config ran on A alone: {before}"
    )
    t0 = time.monotonic()
    os.kill(a, signal.SIGTERM)
    code = procs.wait_exit(a)
    took = time.monotonic() - t0

    def all_on_b() -> bool:
        running = procs.view().running({b})
        return sorted(running) == list(range(CONFIGS))

    wait_until(all_on_b, SETTLE_TIMEOUT, 0.02, "B did not take every config over")
    view = procs.view()
    found = overlaps(view.intervals, closed_at={a: procs.dead[a]})
    print(f"disconnect {seconds}s x 12 on 2 workers: A exited {code} after {took:.2f}s")
    assert code == 0, procs.log_tails()
    problems = []
    if found:
        listing = describe(found, names, t0, procs.dead)
        problems.append(f"{len(found)} overlaps (t from SIGTERM):\n{listing}")
    if took > DISCONNECT_TIMEOUT + 3.0:
        problems.append(f"A took {took:.2f}s to exit (bound {DISCONNECT_TIMEOUT + 3.0:g}s)")
    assert not problems, "\n".join(problems)


# -- 5. the partition heals while the node fences itself --------------------------------


@pytest.mark.parametrize("stall", [0.4, 0.5, 0.55, 0.65, 0.8])
def test_heal_during_fence(
    make_procs: Any, proxy: ChaosProxy, client: redis.Redis, stall: float
) -> None:
    """Healing around the fence point: no overlap (one node too), tokens strictly grow."""
    procs = make_procs()
    a, b = b_then_a(procs, proxy, client)
    names = {a: "A", b: "B"}
    control(procs, disconnect_delay={"seconds": 0.6, "pids": [a]})
    t0 = time.monotonic()
    proxy.stall()
    try:
        elapsed(t0, stall)
    finally:
        proxy.resume()
    view = healed(procs, client, {a, b})
    fence = fenced_at(view, a, t0)
    found = overlaps(view.intervals)
    same = [(x, y) for x, y in found if x.pid == y.pid]
    tokens = strict_token_failures(view.intervals)
    print(
        f"stall {stall}s: A fenced at "
        f"{'never' if fence is None else f'{fence - t0:+.3f}s'}; "
        f"{len(found)} overlaps ({len(same)} on one node), {len(tokens)} tokens not larger"
    )
    problems = []
    if found:
        problems.append(
            f"{len(found)} overlaps, {len(same)} of them on one node (t from the stall):\n"
            f"{describe(found, names, t0)}"
        )
    if tokens:
        problems.append(
            f"{len(tokens)} instances without a larger token than the one before:\n"
            f"{describe(tokens, names, t0)}"
        )
    assert not problems, "\n".join(problems)


# -- 6. a recreated instance gets a larger token ----------------------------------------


def test_recreated_instance_gets_larger_token(make_procs: Any, client: redis.Redis) -> None:
    """An instance recreated after a failed health check gets a larger token."""
    procs = make_procs(configs=3, healthcheck_interval=0.1)
    (a,) = procs.spawn(1)
    procs.wait_settled(client, {a})
    control(procs, unhealthy={"ids": [0], "pids": [a]})
    try:
        wait_until(
            lambda: sum(iv.cid == 0 for iv in procs.view().intervals) >= 3,
            SETTLE_TIMEOUT,
            0.01,
            "config 0 was not recreated after failed health checks",
        )
    finally:
        control(procs)
    view = procs.wait_settled(client, {a})
    mine = sorted((iv for iv in view.intervals if iv.cid == 0), key=lambda iv: iv.start)
    print(f"config 0 incarnations: {[(iv.inst, iv.token) for iv in mine]}")
    assert not overlaps(view.intervals)
    bad = strict_token_failures(view.intervals)
    assert not bad, f"tokens did not grow on recreation: {[(x.token, y.token) for x, y in bad]}"


# -- 7. a wall-clock step on a node -----------------------------------------------------


def test_wall_clock_step_back(make_procs: Any, client: redis.Redis) -> None:
    """After a 1 h wall-clock step back, health checks go on and new configs start."""
    procs = make_procs(configs=3, healthcheck_interval=0.1)
    (a,) = procs.spawn(1, "--log-healthchecks")
    procs.wait_settled(client, {a})

    def checks(since: float) -> int:
        return sum(r.get("ev") == "healthcheck" and r["t"] > since for r in procs.view().records)

    wait_until(lambda: checks(0.0) >= 10, 10.0, 0.02, "harness: no health checks")
    control(procs, wall_offset=-3600.0)

    def stepped() -> Optional[float]:
        done = [r["t"] for r in procs.view().records if r.get("ev") == "wall_offset"]
        return done[0] if done else None

    t1 = wait_until(stepped, 10.0, 0.01, "harness: the wall clock was not stepped")
    assert t1 is not None
    problems = []
    try:
        wait_until(lambda: checks(t1) >= 10, 3.0, 0.02)
    except TimeoutError:
        problems.append(f"{checks(t1)} health checks in the 3 s after the step (want >= 10)")
    t2 = time.monotonic()
    control(procs, wall_offset=-3600.0, configs=4)
    try:
        wait_until(lambda: 3 in procs.view().running({a}), 5.0, 0.02)
    except TimeoutError:
        problems.append("config 3, added after the step, did not start within 5 s")
    else:
        start = min(iv.start for iv in procs.view().intervals if iv.cid == 3)
        print(f"config 3 started {start - t2:.3f}s after it was added")
    assert not problems, "; ".join(problems)
