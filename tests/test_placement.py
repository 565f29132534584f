"""Placement control on a real Redis: paced moves and the rebalance delay."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dim import EventType
from dim.testing import wait_until

from .helpers import FAST, Cluster, Ledger


def max_simultaneous_gaps(ledger: Ledger) -> tuple[int, int]:
    """(moved configs, the most of them running nowhere at the same moment)."""
    edges = []
    moved = 0
    with ledger.lock:
        for entries in ledger.intervals.values():
            ordered = sorted(entries, key=lambda e: e[1])
            for a, b in zip(ordered, ordered[1:]):
                if a[0] != b[0] and a[2] is not None:
                    moved += 1
                    edges += [(a[2], 1), (b[1], -1)]
    level = peak = 0
    for _, step in sorted(edges):
        level += step
        peak = max(peak, level)
    return moved, peak


def test_max_concurrent_moves_bounds_the_handoffs(redis_url: str, service: str) -> None:
    """24 configs on 2 nodes, 2 more join: 12 move, never more than 2 running nowhere at
    once (disconnects are slow, so unpaced moves would overlap); the end is balanced."""
    slow = threading.Event()

    def slow_create(node: str, config: Any) -> None:
        slow.wait(0.05)  # never set: a create that takes a moment

    settings = FAST.replace(max_concurrent_moves=2)
    cluster = Cluster(
        redis_url, service, [{"id": i} for i in range(24)], settings=settings, create=slow_create
    )
    try:
        cluster.add(2)
        cluster.wait_settled()
        cluster.add(2)
        cluster.wait_settled(timeout=30)
        assert cluster.counts() == [6, 6, 6, 6]
        moved, peak = max_simultaneous_gaps(cluster.ledger)
        assert moved == 12
        assert peak <= 2, f"{peak} configs were running nowhere at once"
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
