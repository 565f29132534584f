"""Deploy checks: when a cluster is settled (``ClusterStatus.problems``,
``Admin.wait_settled``), and ``dim status --check`` and ``dim wait --settled`` on real
clusters: settled, without nodes, with a config that runs nowhere or cannot be placed,
and with a handoff held open by a ``disconnect`` that waits.

The commands run in this process (``dim.cli.main``); tests/test_cli.py runs them as
``python -m dim`` too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Optional

import attrs
import pytest
import redis

from dim import ClusterStatus, ConfigStatus, Manager, NodeStatus
from dim.admin import Admin
from dim.cli import main
from dim.keys import Keys
from dim.testing import wait_until

from .helpers import FAST, Cluster

# -- the rule, on values (no Redis) -----------------------------------------------------


def node(node_id: str, *, running: int = 1, instances: Optional[int] = 1) -> NodeStatus:
    return NodeStatus(
        node_id=node_id,
        host="h",
        pid=1,
        weight=1.0,
        started=None,
        expires_in=1.0,
        library_version=None,
        assigned=running,
        running=running,
        instances=instances,
    )


def config(
    config_id: Any,
    assigned_to: Optional[str],
    claimed_by: Optional[str],
    waiting: Optional[str] = None,
) -> ConfigStatus:
    return ConfigStatus(config_id, assigned_to, claimed_by, 1 if claimed_by else None, waiting)


def cluster_status(
    nodes: list[NodeStatus], configs: list[ConfigStatus], **kwargs: Any
) -> ClusterStatus:
    options: dict[str, Any] = {"leader": nodes[0].node_id if nodes else None, "version": 3}
    options.update(kwargs)
    return ClusterStatus(
        service="feeds",
        leader=options["leader"],
        epoch=1 if options["leader"] else None,
        version=options["version"],
        nodes=nodes,
        configs={c.config_id: c for c in configs},
        paused=options.get("paused", False),
    )


SETTLED = cluster_status([node("a"), node("b")], [config(1, "a", "a"), config(2, "b", "b")])


def test_a_settled_cluster_has_no_problems() -> None:
    """Every config runs where it is assigned, on live nodes that run what they hold."""
    assert SETTLED.problems() == []
    assert SETTLED.settled
    assert SETTLED.to_dict()["problems"] == []


def test_no_nodes_and_no_leader() -> None:
    """No live node, or live nodes and no leader, are each one problem."""
    assert cluster_status([], []).problems() == ["no live nodes"]
    leaderless = attrs.evolve(SETTLED, leader=None, epoch=None)
    assert leaderless.problems() == ["no leader"]
    assert not leaderless.settled


def test_too_few_nodes() -> None:
    """min_nodes asks for at least that many live nodes."""
    assert SETTLED.problems(min_nodes=2) == []
    assert SETTLED.problems(min_nodes=3) == ["2 live nodes, expected at least 3"]


def test_nothing_published_yet() -> None:
    """A leader that has not written an assignment (a new service, an emptied Redis)."""
    fresh = cluster_status([node("a", running=0, instances=0)], [], version=None)
    assert fresh.problems() == ["the leader has not published an assignment yet"]


def test_configs_running_nowhere_cannot_be_placed_or_in_handoff() -> None:
    """Each kind of unsettled config is one line naming the configs."""
    status = cluster_status(
        [node("a", running=2, instances=2), node("b", running=0, instances=0)],
        [
            config(1, "a", "a"),
            config(2, "b", None),
            config(3, None, None, waiting="requires tags gpu"),
            config(4, "b", "a"),
            config(5, "a", "gone-node"),
        ],
    )
    assert status.problems() == [
        "1 config cannot be placed: 3 (requires tags gpu)",
        "1 config runs nowhere: 2",
        "1 config is held by a node that is gone: 5 (held by gone-node, assigned to a)",
        "1 handoff pending: 4 (held by a, assigned to b)",
    ]


def test_claims_held_but_instances_not_running() -> None:
    """A node holding claims for instances it has not started (being created, or create
    failing) is not settled; the count is its own, from its last heartbeat."""
    status = cluster_status(
        [node("a", running=3, instances=1), node("b", running=1, instances=None)],
        [config(1, "a", "a"), config(2, "a", "a"), config(3, "a", "a"), config(4, "b", "b")],
    )
    assert status.problems() == [
        "node a runs 1 of the 3 instances it holds claims for (being created, or create "
        "failing: see its log)"
    ]


def test_long_lists_are_cut() -> None:
    """A problem names at most ten configs, then says how many more."""
    status = cluster_status(
        [node("a", running=0, instances=0)], [config(i, "a", None) for i in range(25)]
    )
    (line,) = status.problems()
    assert line == "25 configs run nowhere: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (15 more)"


def test_a_pause_is_named_when_something_waits() -> None:
    """A pause is no problem by itself, but says why the problems will not clear."""
    assert attrs.evolve(SETTLED, paused=True).problems() == []
    waiting = cluster_status([node("a")], [config(1, "a", "a"), config(2, "a", None)], paused=True)
    assert waiting.problems() == [
        "1 config runs nowhere: 2",
        "rebalancing is paused: nothing moves until 'dim resume'",
    ]


# -- the commands on real clusters ------------------------------------------------------


def dim(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``dim ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: --help, bad arguments
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def target(redis_url: str, service: str) -> list[str]:
    """The connection arguments of the session server and this test's service."""
    return ["--redis", redis_url, "--service", service]


@pytest.fixture
def settled_cluster(redis_url: str, service: str) -> Iterator[Cluster]:
    c = Cluster(redis_url, service, [{"id": i} for i in range(4)])
    c.add(2)
    c.wait_settled()
    yield c
    c.stop()


def test_settled_cluster_passes(
    capsys: pytest.CaptureFixture[str], target: list[str], settled_cluster: Cluster
) -> None:
    """wait --settled returns 0 on a settled cluster, and then status --check does too."""
    code, out, err = dim(capsys, "wait", "--settled", "--timeout", "60", *target)
    assert (code, err) == (0, ""), out
    assert "settled: 4 configs running on 2 nodes" in out
    code, out, err = dim(capsys, "status", "--check", *target)
    assert (code, err) == (0, "")
    assert "4 published, 4 running" in out  # the status is printed, as without --check
    code, out, err = dim(capsys, "status", "--check", "--json", *target)
    assert code == 0 and '"problems": []' in out


def test_too_few_nodes_fails_the_check(
    capsys: pytest.CaptureFixture[str], target: list[str], settled_cluster: Cluster
) -> None:
    """--min-nodes N also asks for N live nodes."""
    assert dim(capsys, "wait", "--settled", "--timeout", "60", *target)[0] == 0
    code, _, err = dim(capsys, "status", "--check", "--min-nodes", "3", *target)
    assert code == 1
    assert err == "dim status: not settled: 2 live nodes, expected at least 3\n"


def test_no_nodes_fails(capsys: pytest.CaptureFixture[str], target: list[str]) -> None:
    """A service without nodes: status --check and wait --settled exit 1, saying why."""
    code, out, err = dim(capsys, "status", "--check", *target)
    assert code == 1 and "no live nodes" in out
    assert err == "dim status: not settled: no live nodes\n"
    code, out, err = dim(capsys, "wait", "--settled", "--timeout", "0.5", *target)
    assert code == 1 and out == ""
    assert err == "dim wait: not settled after 0.5 s: no live nodes\n"


def test_a_config_whose_create_keeps_failing(
    capsys: pytest.CaptureFixture[str], redis_url: str, service: str, target: list[str]
) -> None:
    """A config that never starts (its create always fails) keeps the cluster unsettled,
    whether its claim is held while create is retried or released after giving up."""

    def create(node: str, config: Any) -> None:
        if config["id"] == "broken":
            raise RuntimeError("cannot connect")

    cluster = Cluster(redis_url, service, [{"id": 1}, {"id": 2}, {"id": "broken"}], create=create)
    try:
        cluster.add(1)
        wait_until(lambda: set(cluster.placement()) == {1, 2}, 15, interval=0.02)
        code, _, err = dim(capsys, "wait", "--settled", "--timeout", "1", *target)
        assert code == 1
        assert err.startswith("dim wait: not settled after 1 s: "), err
        code, _, err = dim(capsys, "status", "--check", *target)
        assert code == 1 and err.startswith("dim status: not settled: "), err
        with Admin(redis_url, service) as admin:
            assert not admin.wait_settled(0.5)
            assert admin.problems()
    finally:
        cluster.stop()


def test_a_config_that_cannot_be_placed(
    capsys: pytest.CaptureFixture[str], redis_url: str, service: str, target: list[str]
) -> None:
    """A config requiring a tag no node has is named, with the tag it needs."""
    configs = [{"id": 1}, {"id": "gpu-job", "needs": ["gpu"]}]
    cluster = Cluster(redis_url, service, configs, requires="needs")
    try:
        cluster.add(1)
        with Admin(redis_url, service) as admin:

            def placed_but_one() -> bool:
                status = admin.status()
                return "gpu-job" in status.unplaceable and len(status.problems()) == 1

            wait_until(placed_but_one, 15, interval=0.02)
        code, out, err = dim(capsys, "status", "--check", *target)
        assert code == 1 and "cannot be placed" in out
        (line,) = err.splitlines()
        assert line.startswith("dim status: not settled: 1 config cannot be placed: gpu-job (")
        assert "gpu" in line
    finally:
        cluster.stop()


def test_a_pending_handoff(
    capsys: pytest.CaptureFixture[str], redis_url: str, service: str, target: list[str]
) -> None:
    """A drained node whose disconnect waits keeps its claims: the handoffs are pending
    (exit 1) until the disconnects return, and then wait --settled exits 0."""
    release = threading.Event()
    slow: list[str] = []  # the node whose disconnects wait for release

    def disconnect(node: str, instance: Any) -> None:
        if node in slow:
            release.wait(60)

    cluster = Cluster(redis_url, service, [{"id": i} for i in range(4)], disconnect=disconnect)
    try:
        # the first node opens the reset window of a new service with its own (short)
        # settings; the second, whose disconnects may take a minute, joins it later
        cluster.add(1)
        cluster.wait_settled()
        (drained,) = cluster.add(1, settings=FAST.replace(disconnect_timeout=60.0))
        cluster.wait_balanced()
        slow.append(str(drained.node_id))
        with Admin(redis_url, service) as admin:
            admin.drain(str(drained.node_id))
            wait_until(lambda: len(admin.status().pending) == 2, 15, interval=0.02)
            code, out, err = dim(capsys, "status", "--check", *target)
            assert code == 1 and "pending handoffs" in out
            assert err.startswith("dim status: not settled: 2 handoffs pending: "), err
            assert f"held by {drained.node_id}" in err
            assert not admin.wait_settled(0.2)
            release.set()
            code, out, err = dim(capsys, "wait", "--settled", "--timeout", "60", *target)
            assert (code, err) == (0, "")
            assert "settled: 4 configs running on 2 nodes" in out
            assert admin.wait_settled(1)
        assert cluster.ledger.overlaps() == []
    finally:
        release.set()
        cluster.stop()


def test_wait_returns_once_settled(
    capsys: pytest.CaptureFixture[str], redis_url: str, service: str, target: list[str]
) -> None:
    """wait --settled started on an empty service returns 0 once nodes joined and run
    every config."""
    results: list[tuple[int, str, str]] = []
    waiter = threading.Thread(
        target=lambda: results.append(
            dim(capsys, "wait", "--settled", "--timeout", "60", "--min-nodes", "2", *target)
        )
    )
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(3)])
    try:
        waiter.start()
        cluster.add(2)
        waiter.join(90)
        assert not waiter.is_alive()
        ((code, _, _),) = results
        assert code == 0
    finally:
        cluster.stop()


def test_wait_settled_rides_out_a_redis_restart(own_redis: Any, service: str) -> None:
    """A deploy gate started while Redis is down (a failover, a restart) keeps waiting
    instead of failing: it returns True once Redis is back and the cluster settled."""
    own_redis.kill()
    admin = Admin(own_redis.url, service, socket_timeout=0.5)
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(admin.wait_settled(60)))
    cluster: Optional[Cluster] = None
    try:
        waiter.start()
        own_redis.start()
        cluster = Cluster(own_redis.url, service, [{"id": i} for i in range(2)])
        cluster.add(1)
        waiter.join(90)
        assert outcome == [True]
    finally:
        if cluster is not None:
            cluster.stop()
        admin.close()


def test_wait_settled_raises_the_last_error_when_redis_never_comes_back(
    own_redis: Any, service: str
) -> None:
    """Still unreachable at the deadline: the connection error, not a plain False."""
    own_redis.kill()
    with Admin(own_redis.url, service, socket_timeout=0.5) as admin:
        with pytest.raises(redis.ConnectionError):
            admin.wait_settled(2, interval=0.2)


def test_wait_settled_is_not_fooled_by_a_stale_instance_count(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """A node's running count comes with its heartbeat: a count one beat old that is
    too high (a config just claimed, its create not returned) must not make the gate
    pass. Modelled by writing a high count into the node's health field between two
    heartbeats of a node that beats once a second."""
    release = threading.Event()

    def create(node: str, config: Any) -> None:
        if config["id"] == 1:
            release.wait(60)  # config 1 is claimed, its create never returns in time

    slow = FAST.replace(heartbeat_interval=1.0, node_ttl=5.0, leader_ttl=5.0, create_timeout=60.0)
    # history from an earlier node, so the leader places at once (a new service first
    # waits one lease, over a minute with this create_timeout)
    with Manager(list, object, redis=redis_url, service=service, settings=FAST) as earlier:
        assert earlier.wait_until_stable(30)
    cluster = Cluster(redis_url, service, [{"id": 0}, {"id": 1}], settings=slow, create=create)
    try:
        (manager,) = cluster.add(1)
        admin = Admin(redis_url, service)
        wait_until(lambda: len(admin.status().configs) == 2 and manager.leases.keys() == {0, 1}, 30)
        assert admin.problems()  # the honest count: 1 instance for 2 claims
        # (one read right after this is fooled, unless the next beat came in between)
        redis_client.hset(Keys(service).node(manager.node_id), "health", "2 0")
        assert not admin.wait_settled(3, interval=0.1)
        admin.close()
    finally:
        release.set()
        cluster.stop()
