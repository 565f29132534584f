"""The admin API (:mod:`dim.admin`) against a real Redis and an in-process cluster:
status, configs, pause and resume, drain and undrain, rebalance, and its errors."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import attrs
import pytest
import redis

from dim import ClusterStatus, ConfigError, ConfigStatus, NodeStatus, StateError
from dim.admin import Admin, ConfigListing, Move, PublishedConfig, moves_between
from dim.keys import Keys
from dim.protocol import PAUSED, drain_field, static_field
from dim.testing import free_port, wait_until

from .helpers import FAST, Cluster

SLOW_POLL = attrs.evolve(FAST, config_interval=600.0)  # configs change only when asked


@pytest.fixture
def cluster(redis_url: str, service: str) -> Iterator[Cluster]:
    c = Cluster(redis_url, service, [{"id": i} for i in range(9)], settings=SLOW_POLL)
    c.add(3)
    c.wait_settled()
    yield c
    c.stop()


@pytest.fixture
def admin(redis_url: str, service: str) -> Iterator[Admin]:
    with Admin(redis_url, service) as a:
        yield a


def holds(predicate: Callable[[], Any], seconds: float, interval: float = 0.05) -> None:
    """Assert that ``predicate`` stays true for ``seconds`` (checked every ``interval``)."""
    deadline = time.monotonic() + seconds
    pause = threading.Event()
    while True:
        assert predicate(), "the condition stopped holding"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        pause.wait(min(interval, remaining))


def node_status(status: ClusterStatus, node_id: str) -> NodeStatus:
    return next(n for n in status.nodes if n.node_id == node_id)


# -- reads ------------------------------------------------------------------------------


def test_status_reports_nodes_configs_and_leader(
    redis_client: redis.Redis, service: str, cluster: Cluster
) -> None:
    """status() (on a client passed in) returns typed values: every live node with its
    counts, the leader and its epoch, and every config settled where it runs."""
    with Admin(redis_client, service) as admin:
        status = admin.status()
    assert isinstance(status, ClusterStatus) and status.service == service
    assert sorted(n.node_id for n in status.nodes) == sorted(
        str(m.node_id) for m in cluster.managers
    )
    assert all(isinstance(n, NodeStatus) for n in status.nodes)
    leader = next(m for m in cluster.managers if m.is_leader)
    assert status.leader == leader.node_id and status.epoch is not None
    assert sorted(status.configs) == list(range(9))
    assert all(isinstance(c, ConfigStatus) and c.settled for c in status.configs.values())
    for manager in cluster.managers:
        node = node_status(status, str(manager.node_id))
        assert node.assigned == node.running == len(manager.instances) == 3
        assert node.pid == os.getpid() and not node.draining
    assert not status.paused and status.pending == [] and status.not_running == []
    redis_client.ping()  # a client passed in stays open after close()


def test_configs_lists_content_and_placement(admin: Admin, cluster: Cluster) -> None:
    """configs() gives each published config's content, its node and its holder, at the
    assignment version of the status."""
    listing = admin.configs()
    assert isinstance(listing, ConfigListing)
    assert listing.version == admin.status().version is not None
    assert [c.config_id for c in listing.configs] == list(range(9))
    live = {m.node_id for m in cluster.managers}
    for config in listing.configs:
        assert isinstance(config, PublishedConfig)
        assert config.config == {"id": config.config_id}
        assert config.assigned_to == config.claimed_by and config.claimed_by in live


def test_moves_between_names_starts_stops_and_moves() -> None:
    """moves_between() compares the holders of two reads: started, stopped, moved; a
    config held by the same node is not a move."""

    def read(holders: dict[Any, Any]) -> ClusterStatus:
        configs = {c: ConfigStatus(c, node, node, 1) for c, node in holders.items()}
        return ClusterStatus("s", None, None, None, [], configs)

    before = read({1: "a", 2: "a", 3: None, 4: "b"})
    after = read({1: "a", 2: "b", 3: "c", 5: "c"})
    assert moves_between(before, after) == [
        Move(2, "a", "b"),
        Move(3, None, "c"),
        Move(4, "b", None),
        Move(5, None, "c"),
    ]
    assert moves_between(after, after) == []


# -- pause and resume -------------------------------------------------------------------


def test_pause_holds_placement_and_resume_restarts_it(admin: Admin, cluster: Cluster) -> None:
    """While paused, a stopped node's configs run nowhere and the assignment version
    stays; after resume() they run on the two nodes left, without overlap."""
    admin.pause()
    before = admin.status()
    assert before.paused
    # the pause is in the control hash before the node leaves, and the leader reads both
    # in one script: no plan of the leader can see the node gone but not the pause
    leaving = next(m for m in cluster.managers if not m.is_leader)
    gone = set(leaving.instances)
    leaving.stop()

    def held() -> bool:
        status = admin.status()
        return (
            status.paused
            and status.version == before.version
            and set(status.not_running) == gone
            and all(not (set(m.instances) & gone) for m in cluster.running())
        )

    wait_until(held, 5, message="the stopped node's configs did not stop")
    holds(held, 1.5)  # dozens of leader ticks at a 0.05 s heartbeat

    admin.resume()
    assert not admin.status().paused
    cluster.wait_settled()
    assert cluster.counts() == [4, 5]
    after = admin.status()
    assert after.version is not None and before.version is not None
    assert after.version > before.version and after.not_running == []
    assert cluster.ledger.overlaps() == []


# -- drain and undrain ------------------------------------------------------------------


def test_drain_moves_a_node_off_and_undrain_brings_balance_back(
    admin: Admin, cluster: Cluster
) -> None:
    """drain(prefix) names the node; wait_drained() returns once it runs nothing, the
    others run all 9 and only its configs moved; undrain() gives it its share again."""
    target = cluster.managers[1]
    node_id = str(target.node_id)
    before = admin.status()
    assert admin.drain(node_id[:-2]) == node_id  # a unique prefix names the node
    assert admin.draining() == {node_id}
    assert admin.wait_drained(node_id, 20)
    wait_until(lambda: sorted(cluster.counts()) == [0, 4, 5], 10, message=str(cluster.counts()))
    assert target.instances == {}
    after = admin.status()
    node = node_status(after, node_id)
    assert node.draining and node.running == node.assigned == 0
    moved = moves_between(before, after)
    assert {m.config_id for m in moved} == {
        c for c, s in before.configs.items() if s.claimed_by == node_id
    }
    assert all(m.source == node_id and m.target not in (None, node_id) for m in moved)

    assert admin.undrain(node_id) == node_id
    assert admin.draining() == set()
    wait_until(lambda: cluster.counts() == [3, 3, 3], 10, message=str(cluster.counts()))
    cluster.wait_settled()
    assert not node_status(admin.status(), node_id).draining
    assert cluster.ledger.overlaps() == []


def test_wait_drained_is_false_while_paused(admin: Admin, cluster: Cluster) -> None:
    """A drain waits for the pause: wait_drained() gives False on its deadline, and True
    once rebalancing resumes."""
    node_id = str(cluster.managers[0].node_id)
    admin.pause()
    admin.drain(node_id)
    assert admin.wait_drained(node_id, 0.5) is False
    assert node_status(admin.status(), node_id).running == 3
    admin.resume()
    assert admin.wait_drained(node_id, 20)
    admin.drain(node_id, undo=True)
    wait_until(lambda: cluster.counts() == [3, 3, 3], 10, message=str(cluster.counts()))


def test_undrain_of_a_node_that_is_gone(
    admin: Admin, redis_client: redis.Redis, service: str
) -> None:
    """A drained node that crashed is no longer live, but undrain() by its exact id
    still clears its drain; draining() reads only the drain fields of the control hash."""
    control = Keys(service).control
    # what a crashed drained node leaves (a graceful stop clears it), beside other fields
    fields = {drain_field("ghost-1"): "0", static_field("ghost-2"): "1", PAUSED: "1"}
    redis_client.hset(control, mapping=fields)
    assert admin.status().nodes == []
    assert admin.draining() == {"ghost-1"}
    with pytest.raises(ConfigError, match="no live node 'ghost-2'"):
        admin.undrain("ghost-2")  # not drained and not live
    assert admin.undrain("ghost-1") == "ghost-1"
    assert admin.draining() == set()
    assert redis_client.hexists(control, static_field("ghost-2"))


def test_unknown_or_ambiguous_node_is_refused(admin: Admin, cluster: Cluster) -> None:
    """A name that matches no live node, or several, raises ConfigError (a ValueError)
    naming it and the candidates; nothing is drained."""
    ids = sorted(str(m.node_id) for m in cluster.managers)
    with pytest.raises(ConfigError) as caught:
        admin.drain("nope-123")
    assert isinstance(caught.value, ValueError) and caught.value.value == "nope-123"
    assert "nope-123" in str(caught.value) and all(n in str(caught.value) for n in ids)
    with pytest.raises(ConfigError, match="nope-123"):
        admin.undrain("nope-123")
    shared = ids[0].rsplit("-", 1)[0]  # "<host>-<pid>": every node of this process
    with pytest.raises(ConfigError, match="matches 3 nodes") as caught:
        admin.drain(shared)
    assert caught.value.value == shared
    with pytest.raises(ConfigError, match="node must be a node id"):
        admin.drain(42)  # type: ignore[arg-type]
    assert admin.draining() == set()
    assert not any(n.draining for n in admin.status().nodes)


# -- rebalance --------------------------------------------------------------------------


def test_rebalance_places_a_new_config_at_once(admin: Admin, cluster: Cluster) -> None:
    """With a 10-minute config poll, a new config runs right after rebalance(), which
    names the leader it asked; configs() then lists it with its content."""
    cluster.configs.append({"id": 9, "name": "new"})
    status = admin.rebalance()
    leader = next(m for m in cluster.managers if m.is_leader)
    assert status.leader == leader.node_id and not status.paused
    cluster.wait_settled()
    listing = admin.configs()
    assert [c.config_id for c in listing.configs] == list(range(10))
    new = listing.configs[-1]
    assert new.config == {"id": 9, "name": "new"}
    assert new.assigned_to == new.claimed_by is not None


def test_rebalance_without_a_leader_raises_state_error(admin: Admin, service: str) -> None:
    """A service nobody runs has no leader to ask: StateError (a RuntimeError) naming it."""
    with pytest.raises(StateError, match="has no leader") as caught:
        admin.rebalance()
    assert isinstance(caught.value, RuntimeError) and repr(service) in str(caught.value)


# -- construction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"redis": 42, "service": "x"}, "redis must be a URL"),
        ({"redis": "http://localhost:6379", "service": "x"}, "must start with redis://"),
        ({"redis": "redis://:secret@localhost:99999/0", "service": "x"}, "invalid Redis URL"),
        ({"service": "two words"}, "service must be"),
        ({"redis": "redis://localhost:6379/0"}, "service is required"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict[str, Any], message: str) -> None:
    """A bad URL, client or service name, or none, fails when the admin is built, naming
    it (and never showing a password)."""
    with pytest.raises(ConfigError, match=message) as caught:
        Admin(**kwargs)
    assert "secret" not in str(caught.value)


def test_unreachable_redis_raises_the_redis_error() -> None:
    """A read from a server that is not there lets redis-py's ConnectionError through."""
    with Admin(f"redis://127.0.0.1:{free_port()}/0", "x", socket_timeout=0.5) as admin:
        with pytest.raises(redis.ConnectionError):
            admin.status()
