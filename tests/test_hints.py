"""What the pub/sub hints carry, so that a rebalance wakes only the nodes it concerns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from dim import Manager
from dim.keys import Keys
from dim.messages import Kind
from dim.testing import wait_until

from .helpers import FAST, Cluster, HintRecorder


@pytest.fixture
def hints(redis_client: redis.Redis, service: str) -> Iterator[HintRecorder]:
    h = HintRecorder(redis_client.pubsub(ignore_subscribe_messages=True), Keys(service).events)
    yield h
    h.close()


def test_releases_are_batched_and_name_their_claims(
    redis_url: str, service: str, hints: HintRecorder
) -> None:
    """A node stopping 8 instances at once releases them in fewer hints than instances,
    and the hints name exactly the claims released."""
    gate = threading.Event()
    entered: list[Any] = []
    lock = threading.Lock()

    def disconnect(instance: Any) -> None:
        with lock:
            entered.append(instance)
        gate.wait(10)  # every disconnect returns at the same moment

    manager = Manager(
        get_config=lambda: [{"id": i} for i in range(8)],
        create=lambda config: config["id"],
        disconnect=disconnect,
        redis=redis_url,
        service=service,
        settings=FAST,
    )
    manager.start()
    stopper = threading.Thread(target=manager.stop)
    try:
        wait_until(lambda: len(manager.instances) == 8, 10, message="instances did not start")
        start = hints.mark()
        stopper.start()
        wait_until(lambda: len(entered) == 8, 10, message="disconnects did not all start")
        gate.set()
        stopper.join(15)
        assert not stopper.is_alive()
        wait_until(
            lambda: sum(len(m.ckeys) for m in hints.of(Kind.RELEASED, start)) >= 8,
            5,
            message=f"released hints: {hints.of(Kind.RELEASED, start)}",
        )
        released = hints.of(Kind.RELEASED, start)
        named = [c for m in released for c in m.ckeys]
        assert sorted(named, key=int) == [str(i) for i in range(8)]
        assert len(released) < 8
    finally:
        gate.set()
        if stopper.is_alive():
            stopper.join(15)
        manager.stop()


def test_assigned_hint_names_only_the_nodes_it_changes(
    redis_url: str, service: str, hints: HintRecorder
) -> None:
    """A changed config names only its owner; the other nodes settle on the new version
    without reading their share again."""
    configs = [{"id": i, "v": 0} for i in range(6)]
    cluster = Cluster(redis_url, service, configs)
    try:
        managers = cluster.add(3)
        cluster.wait_settled()
        owner = next(m for m in managers if 0 in m.instances)
        start = hints.mark()
        cluster.configs[0] = {"id": 0, "v": 1}
        managers[0].refresh()
        wait_until(
            lambda: owner.instances.get(0) is not None and owner.instances[0].config["v"] == 1,
            10,
            message="the owner did not recreate the changed config",
        )
        assigned = hints.of(Kind.ASSIGNED, start)
        assert assigned and assigned[-1].targets == (owner.node_id,)
        version = str(assigned[-1].version)
        for m in managers:
            assert m.wait_until_stable(10)
            assert m._node.reconciler.version == version  # type: ignore[union-attr]
        assert cluster.counts() == [2, 2, 2]
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_config_result_is_taken_when_get_config_returns(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """The leader plans as soon as get_config returns, not at its next heartbeat: with a
    6 s heartbeat, the first configs and a refreshed one run well within it."""
    # a service this server already knew (a fresh one would wait out a reset window)
    keys = Keys(service)
    seconds, micros = redis_client.time()
    redis_client.set(keys.fence, seconds * 1_000_000 + micros)
    redis_client.set(keys.era, redis_client.info("server")["run_id"])
    configs = [{"id": 0, "v": 0}, {"id": 1, "v": 0}]
    slow = FAST.replace(heartbeat_interval=6.0, node_ttl=20.0, leader_ttl=20.0, config_interval=600)
    manager = Manager(
        get_config=lambda: [dict(c) for c in configs],
        create=lambda config: config,
        disconnect=lambda instance: None,
        redis=redis_url,
        service=service,
        settings=slow,
    )
    manager.start()
    try:
        wait_until(lambda: len(manager.instances) == 2, 4, message="the first configs waited")
        configs[0] = {"id": 0, "v": 1}
        manager.refresh()
        wait_until(
            lambda: manager.instances.get(0) is not None and manager.instances[0]["v"] == 1,
            4,
            message="the refreshed config waited for a heartbeat",
        )
    finally:
        manager.stop()
