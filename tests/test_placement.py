"""Placement control on a real Redis: paced moves and the rebalance delay."""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from typing import Any

import pytest
import redis

from dim import EventType, Manager, StateError
from dim.keys import Keys
from dim.protocol import WriteRefused
from dim.testing import wait_until
from tools.chaos.ledger import Interval

from .helpers import FAST, Cluster, Ledger


def max_simultaneous_gaps(ledger: Ledger, since: float = 0.0) -> tuple[int, int]:
    """(configs moved after ``since``, the most of them running nowhere at one moment)."""
    edges = []
    moved = 0
    by_config: dict[Any, list[Interval]] = defaultdict(list)
    for iv in ledger.intervals():
        by_config[iv.cid].append(iv)
    for intervals in by_config.values():
        ordered = sorted(intervals, key=lambda iv: iv.start)
        for a, b in zip(ordered, ordered[1:]):
            if a.node != b.node and a.end is not None and b.start > since:
                moved += 1
                edges += [(a.end, 1), (b.start, -1)]
    level = peak = 0
    for _, step in sorted(edges):
        level += step
        peak = max(peak, level)
    return moved, peak


def test_max_concurrent_moves_bounds_the_handoffs(redis_url: str, service: str) -> None:
    """24 configs on 2 nodes, 2 more join: 12 move, at most 2 in handoff at once; the end
    is balanced.

    The leader counts a move as arrived when the new owner holds the claim; the ledger
    sees its gap end later, when ``create`` is called (after a worker thread starts, and
    once the heartbeat has renewed the claim for a whole create: up to a heartbeat). On a
    loaded machine that can outlast a batch or two: both moves in flight arrive and the
    next two begin, and even the two after, before the first ``create`` is called, so the
    ledger can see up to 3 x 2 configs running nowhere at once (a tox -p run saw 5).
    Unpaced, the 12 moves are in flight together: the ledger saw 10 and 12."""
    slow = threading.Event()

    def slow_create(node: str, config: Any) -> None:
        slow.wait(0.05)  # never set: a create that takes a moment

    # node_ttl 3 s: a node stalled on a loaded machine (tox -p) must not lapse, which would
    # move its configs away and back
    settings = FAST.replace(max_concurrent_moves=2, node_ttl=3.0, leader_ttl=3.0)
    cluster = Cluster(
        redis_url, service, [{"id": i} for i in range(24)], settings=settings, create=slow_create
    )
    try:
        # paced moves go two at a time, and the cluster is settled between two batches:
        # each wait is for the end (wait_balanced)
        cluster.add(2)
        cluster.wait_balanced(timeout=30)
        # the first node may place all 24 before the second joins, and then 12 move:
        # count only the moves the last two joins cause
        settled = time.monotonic()
        cluster.add(2)
        cluster.wait_balanced(timeout=30)
        assert cluster.counts() == [6, 6, 6, 6]
        moved, peak = max_simultaneous_gaps(cluster.ledger, since=settled)
        assert moved == 12
        assert peak <= 6, f"{peak} configs were running nowhere at once"
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_rebalance_delay_turns_a_burst_of_joins_into_one_rebalance(
    redis_url: str, service: str
) -> None:
    """Three nodes joining in quick succession cause one rebalance that moves anything,
    after the membership has been quiet for rebalance_delay, with the minimum moves."""
    settings = FAST.replace(rebalance_delay=1.0)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(12)], settings=settings)
    try:
        (first,) = cluster.add(1)
        cluster.wait_settled()
        moving: list[dict[str, Any]] = []
        first.add_listener(lambda e: moving.append(e.data), EventType.REBALANCE_APPLIED)
        cluster.add(3)
        # during the delay the new nodes are members with nothing to run
        wait_until(
            lambda: cluster.counts() == [3, 3, 3, 3],
            30,
            message="the nodes never ran 3 configs each",
        )
        cluster.wait_settled()
        assert [d["moved"] for d in moving if d["moved"]] == [9]
        assert cluster.ledger.create_count() == 12 + 9
    finally:
        cluster.stop()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_max_concurrent_moves_is_refused(bad: Any) -> None:
    with pytest.raises(
        ValueError, match=f"max_concurrent_moves must be an integer >= 1, got {bad!r}"
    ):
        FAST.replace(max_concurrent_moves=bad)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), "1"])
def test_bad_rebalance_delay_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="rebalance_delay"):
        FAST.replace(rebalance_delay=bad)


def test_a_second_process_with_the_same_name_is_refused(redis_url: str, service: str) -> None:
    """A node_name held by a live node: start() waits about node_ttl, then raises a
    StateError naming the holder; the first node keeps running undisturbed."""
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(4)])
    try:
        (first,) = cluster.add(1, node_name="web-1")
        cluster.wait_settled()
        assert first.node_id == "web-1"
        twin = cluster.make(node_name="web-1")
        with pytest.raises(StateError, match=r"node_name 'web-1' is in use .*pid \d+"):
            twin.start()
        assert twin.node_id is None
        assert sorted(first.instances) == [0, 1, 2, 3]
        assert cluster.ledger.create_count() == 4
        assert first.wait_until_stable(5)
    finally:
        cluster.stop()


def test_a_static_node_back_within_its_grace_gets_its_configs_back(
    redis_url: str, service: str
) -> None:
    """With rejoin_grace, a named node that restarts gets exactly its configs back; they
    run nowhere in between and nothing else moves."""
    settings = FAST.replace(rejoin_grace=30.0)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(9)], settings=settings)
    try:
        for name in ("a", "b", "c"):
            cluster.add(1, node_name=name)
        cluster.wait_settled()
        b = next(m for m in cluster.managers if m.node_id == "b")
        mine = set(b.instances)
        where = {iv.cid: iv.node for iv in cluster.ledger.intervals()}
        before = len(cluster.ledger.intervals())
        b_before = cluster.ledger.create_count("b")

        def elsewhere() -> list[Any]:
            # instances started since the mark anywhere but where their config ran (a
            # node stalled on a loaded machine may stop and restart its own: not a move)
            return [iv for iv in cluster.ledger.intervals()[before:] if iv.node != where[iv.cid]]

        b.stop()
        # the others keep their own three and take nothing while b is away
        others = [m for m in cluster.running() if m.node_id != "b"]
        assert all(m.wait_until_stable(5) for m in others)
        assert [len(m.instances) for m in others] == [3, 3]
        assert elsewhere() == []
        assert cluster.ledger.create_count("b") == b_before
        (back,) = cluster.add(1, node_name="b")
        cluster.wait_settled()
        assert set(back.instances) == mine
        assert cluster.ledger.create_count("b") == b_before + 3
        assert elsewhere() == []
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_the_configs_of_a_static_node_move_when_its_grace_ends(
    redis_url: str, service: str
) -> None:
    # (a grace longer than b's stop() may take on a loaded machine)
    settings = FAST.replace(rejoin_grace=3.0)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(6)], settings=settings)
    try:
        cluster.add(1, node_name="a")
        cluster.add(1, node_name="b")
        cluster.wait_settled()
        b = next(m for m in cluster.managers if m.node_id == "b")
        b.stop()
        a = next(m for m in cluster.managers if m.node_id == "a")
        assert len(a.instances) == 3  # right after b left: nothing moved yet
        wait_until(lambda: len(a.instances) == 6, 15, message="b's configs never moved to a")
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


@pytest.mark.parametrize("bad", ["", "a b", "x{y}", 3, "z" * 101])
def test_bad_node_name_is_refused(redis_url: str, service: str, bad: Any) -> None:
    with pytest.raises(ValueError, match="node_name must be 1-100 characters"):
        Manager(get_config=list, create=id, redis=redis_url, service=service, node_name=bad)


def test_a_new_leader_keeps_the_grace_of_a_static_leader_that_restarts(
    redis_url: str, service: str
) -> None:
    """The leader itself restarts under its name: the next leader knows the name is
    static (from Redis, not from memory) and keeps its configs for it."""
    settings = FAST.replace(rejoin_grace=30.0)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(6)], settings=settings)
    try:
        (a,) = cluster.add(1, node_name="a")
        cluster.wait_settled()
        (b,) = cluster.add(1, node_name="b")
        cluster.wait_settled()
        assert a.is_leader
        mine = set(a.instances)
        before = cluster.ledger.create_count()
        a.stop()
        wait_until(lambda: b.is_leader, 10, message="b never took over")
        assert b.wait_until_stable(5) and len(b.instances) == 3
        assert cluster.ledger.create_count() == before
        (back,) = cluster.add(1, node_name="a")
        cluster.wait_settled()
        assert set(back.instances) == mine
        assert cluster.ledger.create_count() == before + 3
    finally:
        cluster.stop()


def run_nowhere(cluster: Cluster, ids: set[int]) -> bool:
    return not (set(cluster.placement()) & ids)


def test_tags_decide_where_configs_may_run(redis_url: str, service: str) -> None:
    """Configs requiring 'gpu' run only on the gpu node, 'eu' ones only on eu nodes;
    with the gpu node gone they run nowhere and status says why; it comes back, so do
    they."""
    configs = [{"id": i, "needs": ["gpu"] if i < 3 else ["eu"] if i < 6 else []} for i in range(9)]
    cluster = Cluster(redis_url, service, configs, requires="needs")
    try:
        (leader,) = cluster.add(1, tags={"eu"})
        reports: list[dict[Any, str]] = []
        leader.add_listener(
            lambda e: reports.append(e.data["unplaced"]), EventType.CONFIGS_UNPLACED
        )
        gpu = cluster.add(1, tags={"eu", "gpu"})[0]
        cluster.add(1)
        cluster.wait_settled()
        where = cluster.placement()
        tags = {m.node_id: m._tags for m in cluster.running()}  # type: ignore[attr-defined]
        for config in configs:
            (node,) = where[config["id"]]
            assert set(config["needs"]) <= tags[node], (config, node)
        gpu.stop()
        wait_until(lambda: run_nowhere(cluster, {0, 1, 2}), 10, message="gpu configs kept")
        status = cluster.managers[0].status()
        wait_until(
            lambda: set(cluster.managers[0].status().unplaceable) == {0, 1, 2},
            10,
            message=f"unplaceable: {status.unplaceable}",
        )
        assert set(cluster.managers[0].status().unplaceable.values()) == {"needs tags gpu"}
        assert sorted(cluster.placement()) == list(range(3, 9))
        cluster.add(1, tags={"gpu"})
        wait_until(lambda: sorted(cluster.placement()) == list(range(9)), 10, message="gpu back")
        assert cluster.managers[0].status().unplaceable == {}
        # the leader reported the change both ways (the first report may come from before
        # the gpu node joined)
        wait_until(lambda: reports and reports[-1] == {}, 5, message=f"reports: {reports}")
        assert {0: "needs tags gpu", 1: "needs tags gpu", 2: "needs tags gpu"} in reports
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_capacity_runs_the_highest_priorities_first(redis_url: str, service: str) -> None:
    """Two nodes of capacity 2, six configs: the four highest priorities run, the others
    wait for capacity; a third node lets everything run."""
    configs = [{"id": i, "p": 10 - i} for i in range(6)]
    cluster = Cluster(redis_url, service, configs, priority="p")
    try:
        cluster.add(2, capacity=2)
        wait_until(lambda: sorted(cluster.placement()) == [0, 1, 2, 3], 10, message="top four")
        assert cluster.counts() == [2, 2]
        wait_until(
            lambda: (
                cluster.managers[0].status().unplaceable
                == {4: "waits for capacity", 5: "waits for capacity"}
            ),
            10,
            message="the two lowest are not reported as waiting",
        )
        cluster.add(1, capacity=2)
        cluster.wait_settled()
        assert cluster.counts() == [2, 2, 2]
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_a_config_whose_requirement_nobody_meets_stops(redis_url: str, service: str) -> None:
    """A running config changed to require a tag no node has is stopped (not kept where
    it runs) and reported."""
    configs = [{"id": 0, "needs": []}, {"id": 1, "needs": []}]
    cluster = Cluster(redis_url, service, configs, requires="needs")
    try:
        cluster.add(2)
        cluster.wait_settled()
        cluster.configs[1] = {"id": 1, "needs": ["tpu"]}
        cluster.managers[0].refresh()
        wait_until(lambda: run_nowhere(cluster, {1}), 10, message="config 1 still runs")
        wait_until(
            lambda: cluster.managers[0].status().unplaceable == {1: "needs tags tpu"},
            10,
            message="config 1 not reported",
        )
        assert sorted(cluster.placement()) == [0]
    finally:
        cluster.stop()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tags": "eu"}, "tags must be a collection of strings, got 'eu'"),
        ({"tags": {"a b"}}, "got 'a b'"),
        ({"capacity": -1}, "capacity must be an integer >= 0 or None, got -1"),
        ({"capacity": 1.5}, "got 1.5"),
        ({"requires": 5}, "requires must be a config field name or a callable, got 5"),
        ({"priority": ""}, "priority must be a config field name or a callable"),
    ],
)
def test_bad_placement_arguments_are_refused(
    redis_url: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Manager(get_config=list, create=id, redis=redis_url, service="x", **kwargs)


def test_a_bad_requirement_keeps_the_last_good_config(redis_url: str, service: str) -> None:
    """A config whose required tags are not a list of tags: CONFIG_ERROR naming it, and
    everything keeps running on the last good config."""
    cluster = Cluster(redis_url, service, [{"id": 0, "needs": []}], requires="needs")
    try:
        (node,) = cluster.add(1)
        cluster.wait_settled()
        errors: list[Any] = []
        node.add_listener(lambda e: errors.append(e.error), EventType.CONFIG_ERROR)
        cluster.configs = [{"id": 0, "needs": []}, {"id": 1, "needs": "gpu"}]
        node.refresh()
        wait_until(lambda: errors, 10, message="no CONFIG_ERROR")
        assert "requires of config 1" in str(errors[0]) and "'gpu'" in str(errors[0])
        assert sorted(node.instances) == [0]
    finally:
        cluster.stop()


def test_a_new_leader_clears_what_the_old_one_reported_unplaced(
    redis_url: str, service: str, redis_client: Any
) -> None:
    """The leader that reported a config as unplaceable stops, and the config is gone
    from get_config: the new leader takes the stale report out of Redis."""
    settings = FAST.replace(config_interval=600.0)  # only a new leader reads the configs
    configs = [{"id": 0, "needs": ["gpu"]}]
    cluster = Cluster(redis_url, service, configs, requires="needs", settings=settings)
    unplaced = Keys(service).unplaced
    try:
        (first,) = cluster.add(1)
        cluster.add(1)
        wait_until(lambda: redis_client.hkeys(unplaced) == [b"0"], 10, message="no report")
        cluster.configs = [{"id": 1, "needs": []}]
        first.stop()
        wait_until(lambda: sorted(cluster.placement()) == [1], 10, message="1 not placed")
        wait_until(lambda: redis_client.hkeys(unplaced) == [], 10, message="stale report")
    finally:
        cluster.stop()


def test_a_write_whose_reply_was_lost_keeps_its_moves_in_flight(
    redis_url: str, service: str
) -> None:
    """max_concurrent_moves: a leader write that went through but whose reply was lost
    (the leader saw a Redis error) still counts its moves as in flight, so the next plan
    does not start more moves than the limit while they are under way."""
    settings = FAST.replace(max_concurrent_moves=1)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(8)], settings=settings)
    try:
        (first,) = cluster.add(1)
        cluster.wait_settled()
        node = first._node  # type: ignore[attr-defined]
        leader = first._parts[1]  # type: ignore[attr-defined]
        store = node.store
        real_write = store.leader_write
        lost: list[Any] = []
        in_flight: list[dict[str, str]] = []

        def reply_lost(*args: Any, **kwargs: Any) -> Any:
            result = real_write(*args, **kwargs)
            change = args[1]
            if not lost and any(n != first.node_id for n in change.assign.values()):
                lost.append(change)
                in_flight.append(dict(leader._moving))  # what the next plan will count
                raise redis.ConnectionError("the reply was lost")
            return result

        store.leader_write = reply_lost
        cluster.add(1)
        wait_until(lambda: lost, 10, message="no move was written")
        (moved,) = [c for c, n in lost[0].assign.items() if n != first.node_id]
        assert moved in in_flight[0]  # the next plan counts it until it arrives
        # the move is taken back (the leader repairs Redis to its own copy) or arrives;
        # either way the paced moves go on until the placement is balanced
        wait_until(
            lambda: sorted(cluster.counts()) == [4, 4],
            30,
            message=f"the paced moves stalled: {cluster.placement()}",
        )
        cluster.wait_settled()
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_a_refused_write_does_not_leave_its_moves_in_flight(redis_url: str, service: str) -> None:
    """max_concurrent_moves: a leader write refused as late (nothing written) started no
    move, so the moves it carried do not hold the others back: pacing goes on."""
    settings = FAST.replace(max_concurrent_moves=1)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(8)], settings=settings)
    try:
        (first,) = cluster.add(1)
        cluster.wait_settled()
        store = first._node.store  # type: ignore[attr-defined]
        real_write = store.leader_write
        refused: list[Any] = []

        def late(*args: Any, **kwargs: Any) -> Any:
            change = args[1]
            if not refused and any(n != first.node_id for n in change.assign.values()):
                refused.append(change)
                return WriteRefused.LATE, []  # the script did nothing
            return real_write(*args, **kwargs)

        store.leader_write = late
        cluster.add(1)
        wait_until(lambda: refused, 10, message="no move was attempted")
        wait_until(
            lambda: sorted(cluster.counts()) == [4, 4],
            30,
            message=f"the paced moves stalled: {cluster.placement()}",
        )
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()
