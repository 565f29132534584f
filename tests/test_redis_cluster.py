"""dim on a real Redis Cluster: three masters on loopback, joined by ``dim.testing``.

Managers get a ``redis.cluster.RedisCluster`` client. Every key of a service hashes to
one slot (the ``{<service>}`` hash tag), so every command and script goes to the master
of that slot; hints published there reach subscribers on every master over the cluster
bus. Each test's service is named so that its slot lives on a master other than the
client's default node, so a command sent to the wrong node would show.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.cluster import RedisCluster

from dim import Manager
from dim.keys import Keys
from dim.messages import Kind, Message
from dim.store import Store
from dim.testing import CLUSTER_SLOTS, RedisClusterServers, RedisServer, free_port, wait_until

from .helpers import FAST, Cluster, HintRecorder, run_dim

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parent.parent

#: What remains of a service after every node stopped gracefully.
HISTORY = {"configs", "era", "fence", "left", "version"}

CONFIGS = [{"id": i} for i in range(8)]


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """Three masters sharing the slots, formed once for this module."""
    servers = RedisClusterServers(3, directory=tmp_path_factory.mktemp("redis-cluster"))
    try:
        servers.start()
    except RuntimeError as exc:
        # a server built without cluster support refuses the directive at startup
        if "cluster-enabled" in str(exc):
            servers.close()
            pytest.skip(f"this redis-server has no cluster support: {exc}")
        raise
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="module")
def client(redis_cluster: RedisClusterServers) -> Iterator[RedisCluster]:
    """A RedisCluster client that dim is given (and never closes)."""
    c = redis_cluster.client(socket_timeout=0.5)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def service(request: pytest.FixtureRequest, client: RedisCluster) -> str:
    """A unique service name whose slot is served by a master other than the client's
    default node (the one that gets keyless commands such as PING and TIME)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    default = client.get_default_node().name
    while True:
        name = f"c-{slug}-{secrets.token_hex(4)}"
        if client.get_node_from_key(Keys(name).prefix).name != default:
            return name


@pytest.fixture
def cluster(client: RedisCluster, service: str) -> Iterator[Cluster]:
    c = Cluster(client, service, CONFIGS)
    try:
        yield c
    finally:
        c.stop()


def service_keys(server: RedisServer, service: str) -> set[str]:
    """The names (after the prefix) of the service's keys stored on one master."""
    prefix = Keys(service).prefix
    with server.client() as plain:
        return {k.decode()[len(prefix) :] for k in plain.scan_iter(match=prefix + "*")}


def others(redis_cluster: RedisClusterServers, owner: RedisServer) -> list[RedisServer]:
    return [s for s in redis_cluster.servers if s is not owner]


def recorder_on(client: RedisCluster, server: RedisServer, service: str) -> HintRecorder:
    """Every hint on the service's channel, as heard by a subscriber on one master."""
    node = client.get_node(host=server.host, port=server.port)
    pubsub = client.pubsub(node=node, ignore_subscribe_messages=True)
    return HintRecorder(pubsub, Keys(service).events)


def record_listener(manager: Manager) -> list[Message]:
    """The hints that this manager's own pub/sub listener handles from now on."""
    node = manager._node
    assert node is not None
    listener = node.listener
    original = listener.handle
    heard: list[Message] = []

    def handle(data: Any) -> Any:
        message = original(data)
        if message is not None:
            heard.append(message)
        return message

    listener.handle = handle  # type: ignore[method-assign]
    return heard


def test_helper_forms_a_three_master_cluster(
    redis_cluster: RedisClusterServers, client: RedisCluster
) -> None:
    """Every master says cluster_state:ok and knows all three; the slots are split."""
    for server in redis_cluster.servers:
        with server.client() as plain:
            info = plain.cluster("INFO")
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_known_nodes"]) == 3
        assert int(info["cluster_slots_assigned"]) == CLUSTER_SLOTS
    ranges = sorted(client.cluster_slots())
    assert ranges[0][0] == 0 and ranges[-1][1] == CLUSTER_SLOTS - 1 and len(ranges) == 3
    assert {p for _, p in redis_cluster.startup_nodes} == {n.port for n in client.get_primaries()}


def test_managers_spread_configs_and_run_each_once(cluster: Cluster) -> None:
    """Two managers on a RedisCluster client run 8 configs exactly once, 4 each."""
    cluster.add(2)
    cluster.wait_balanced()
    assert cluster.counts() == [4, 4]
    assert cluster.ledger.overlaps() == []


def test_join_and_leave_rebalance_with_hints_across_masters(
    cluster: Cluster, redis_cluster: RedisClusterServers, client: RedisCluster, service: str
) -> None:
    """A node joining and leaving gracefully rebalances; the hints reach the managers'
    listeners and a subscriber on another master (cluster-wide pub/sub)."""
    first = cluster.add(2)
    cluster.wait_settled()
    owner = redis_cluster.server_for(Keys(service).prefix)
    channel = Keys(service).events
    with owner.client() as plain:
        # both listeners subscribed on the master of the service's slot
        assert plain.pubsub_numsub(channel) == [(channel.encode(), 2)]
    recorder = recorder_on(client, others(redis_cluster, owner)[0], service)
    heard = [record_listener(m) for m in first]
    try:
        (joiner,) = cluster.add(1)
        cluster.wait_settled()
        assert cluster.counts() == [2, 3, 3]
        before = cluster.ledger.create_count()
        new_id = joiner.node_id
        joiner.stop()
        cluster.wait_settled()
        assert cluster.counts() == [4, 4]
        # only the leaver's instances were recreated
        assert cluster.ledger.create_count() - before == 2
        assert cluster.ledger.overlaps() == []
        # (a released claim is announced only to a node the assignment already names)
        for kind in (Kind.JOINED, Kind.LEFT):
            wait_until(lambda k=kind: recorder.heard(k, new_id), 5, message=f"no {kind} hint")
        # joins and leaves go to the leader's inbox; the shares the join changed hear it
        # (each listener records after it handled the hint: the leader may have planned
        # from its heartbeat first)
        leader = next(i for i, m in enumerate(first) if m.is_leader)
        wait_until(
            lambda: (
                {(Kind.JOINED, new_id), (Kind.LEFT, new_id)}
                <= {(m.kind, m.node) for m in list(heard[leader])}
            ),
            5,
            message=f"the leader heard {heard[leader]}",
        )
        for i, messages in enumerate(heard):
            if i != leader:
                wait_until(
                    lambda ms=messages: Kind.ASSIGNED in {m.kind for m in list(ms)},
                    5,
                    message=f"node {i} heard {messages}",
                )
    finally:
        recorder.close()


def test_status_reads_the_cluster(cluster: Cluster, client: RedisCluster, service: str) -> None:
    """status() works from a running manager and from one that never started, and the
    passed client stays open."""
    cluster.add(2)
    cluster.wait_balanced()
    running = cluster.managers[0].status()
    assert running.leader in {m.node_id for m in cluster.managers}
    assert {n.node_id for n in running.nodes} == {m.node_id for m in cluster.managers}
    assert all(0 < n.expires_in <= FAST.node_ttl for n in running.nodes)
    assert len(running.configs) == 8 and running.pending == [] and running.not_running == []
    assert sorted(n.running for n in running.nodes) == [4, 4]
    idle = Manager(list, object, redis=client, service=service, settings=FAST)
    stopped = idle.status()
    assert stopped.leader == running.leader and sorted(stopped.configs) == list(range(8))
    assert client.ping() is True


def test_pause_and_drain_through_a_cluster_client(
    cluster: Cluster, client: RedisCluster, service: str
) -> None:
    """The operator controls (pause, resume, drain, undo) write and announce through a
    RedisCluster client, and the leader acts on them."""
    cluster.add(2)
    cluster.wait_settled()
    store = Store(client, service)
    hint = Message(Kind.CONTROL, "test-operator")
    store.set_paused(True, hint)
    assert cluster.managers[0].status().paused
    store.set_paused(False, hint)
    assert not cluster.managers[0].status().paused
    drained, other = cluster.managers
    assert drained.node_id is not None
    store.set_draining(drained.node_id, True, hint)
    wait_until(lambda: not drained.instances and len(other.instances) == 8, 10)
    store.set_draining(drained.node_id, False, hint)
    wait_until(lambda: cluster.counts() == [4, 4] and cluster.settled(), 10)
    assert cluster.ledger.overlaps() == []


def test_every_key_lives_in_one_slot_on_one_master(
    cluster: Cluster, redis_cluster: RedisClusterServers, client: RedisCluster, service: str
) -> None:
    """While a cluster runs, all of the service's keys hash to one slot, held by the
    master that serves it, and no other master holds any."""
    cluster.add(2)
    cluster.wait_settled()
    prefix = Keys(service).prefix
    owner = redis_cluster.server_for(prefix)
    assert client.get_node_from_key(prefix).port == owner.port
    names = service_keys(owner, service)
    assert {"nodes", "leader", "fence", "configs", "assignment", "version"} <= names
    assert any(n.startswith("claim:") for n in names)
    for server in others(redis_cluster, owner):
        assert service_keys(server, service) == set()
    with owner.client() as plain:
        slot = plain.cluster("KEYSLOT", prefix)
        assert {plain.cluster("KEYSLOT", prefix + n) for n in names} == {slot}
        assert plain.cluster("COUNTKEYSINSLOT", slot) >= len(names)


def test_graceful_stop_leaves_only_history(
    cluster: Cluster, redis_cluster: RedisClusterServers, service: str
) -> None:
    """After every manager stopped, only the history keys remain, on the slot's master."""
    cluster.add(2)
    cluster.wait_settled()
    cluster.stop()
    assert all(m.node_id is None for m in cluster.managers)
    assert cluster.ledger.disconnect_count() == cluster.ledger.create_count() > 0
    owner = redis_cluster.server_for(Keys(service).prefix)
    assert service_keys(owner, service) == HISTORY
    for server in others(redis_cluster, owner):
        assert service_keys(server, service) == set()


def test_cluster_client_is_accepted_and_named(client: RedisCluster) -> None:
    """The constructor takes a RedisCluster; errors name its nodes, not a URL."""
    manager = Manager(list, object, redis=client, service="x", settings=FAST)
    where = manager._describe_target()
    assert where.startswith("redis cluster 127.0.0.1:")
    assert all(n.name in where for n in client.get_primaries())


def test_command_line_on_the_slot_master(
    cluster: Cluster, redis_cluster: RedisClusterServers, service: str
) -> None:
    """The dim CLI, given a plain URL of the master that serves the slot, reads and
    controls the service; another master's URL fails, naming the right one."""
    cluster.add(2)
    cluster.wait_settled()
    owner = redis_cluster.server_for(Keys(service).prefix)
    result = run_dim("status", "--redis", owner.url, "--service", service, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["nodes"]) == 2 and data["pending"] == [] and data["not_running"] == []
    for command in ("pause", "resume"):
        result = run_dim(command, "--redis", owner.url, "--service", service)
        assert result.returncode == 0, (command, result.stderr)
    assert not cluster.managers[0].status().paused
    elsewhere = others(redis_cluster, owner)[0]
    result = run_dim("status", "--redis", elsewhere.url, "--service", service)
    # the error (a MOVED reply) names the master to ask instead
    assert result.returncode != 0 and f"127.0.0.1:{owner.port}" in result.stderr, result.stderr


def test_a_cluster_url_for_managers_and_the_command(
    redis_cluster: RedisClusterServers, service: str
) -> None:
    """Managers given a redis+cluster:// URL of a master that does not serve the
    service's slot run there all the same (the client follows the cluster's layout), and
    so do dim wait --settled and dim status on that URL; they close what they opened."""
    owner = redis_cluster.server_for(Keys(service).prefix)
    elsewhere = others(redis_cluster, owner)
    url = f"redis+cluster://127.0.0.1:{elsewhere[0].port},127.0.0.1:{elsewhere[1].port}"
    cluster = Cluster(url, service, CONFIGS)
    try:
        cluster.add(2)
        cluster.wait_balanced()
        assert {"nodes", "leader", "assignment"} <= service_keys(owner, service)
        command = ["--redis", url, "--service", service]
        result = run_dim("wait", "--settled", "--timeout", "60", "--min-nodes", "2", *command)
        assert result.returncode == 0, result.stderr
        assert "settled: 8 configs running on 2 nodes" in result.stdout
        result = run_dim("status", "--check", "--json", *command)
        assert result.returncode == 0, result.stderr
        assert sorted(n["running"] for n in json.loads(result.stdout)["nodes"]) == [4, 4]
    finally:
        cluster.stop()
    assert cluster.ledger.overlaps() == []


def test_a_cluster_url_that_answers_nowhere() -> None:
    """A redis+cluster:// URL whose nodes do not answer: the command says so in one line
    (exit 1), as for one server."""
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    result = run_dim("status", "--redis", url, "--service", "x")
    assert result.returncode == 1, result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"dim status: cannot reach Redis at {url}"), line
