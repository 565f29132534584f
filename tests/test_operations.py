"""The operator commands, run as real subprocesses against a live cluster: drain, pause
and resume, rebalance, config and watch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from dim.testing import wait_until

from .helpers import FAST, ROOT, Cluster, assert_one_line_error, dim_env, run_dim

FAST_WATCH = ["--interval", "0.1"]
SLOW_POLL = attrs.evolve(FAST, config_interval=600.0)  # configs change only when asked


@pytest.fixture
def cluster(redis_url: str, service: str) -> Iterator[Cluster]:
    c = Cluster(redis_url, service, [{"id": i} for i in range(9)], settings=SLOW_POLL)
    c.add(3)
    c.wait_settled()
    yield c
    c.stop()


def status(redis_url: str, service: str) -> dict[str, Any]:
    result = run_dim("status", "--redis", redis_url, "--service", service, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_drain_moves_everything_off_a_node_and_undo_brings_it_back(
    redis_url: str, service: str, cluster: Cluster
) -> None:
    """`dim drain NODE --wait` returns once the node runs nothing (the others run all 9);
    the node stays a member, marked draining; --undo gives it its share again."""
    target = cluster.managers[1]
    prefix = target.node_id[:-2]  # a unique prefix names the node too
    result = run_dim("drain", prefix, "--redis", redis_url, "--service", service, "--wait", "20")
    assert result.returncode == 0, result.stderr
    assert f"node {target.node_id} runs nothing now" in result.stdout
    assert target.instances == {}
    wait_until(lambda: sorted(cluster.counts()) == [0, 4, 5], 10, message=str(cluster.counts()))
    node = next(n for n in status(redis_url, service)["nodes"] if n["node_id"] == target.node_id)
    assert node["draining"] is True and node["running"] == 0
    assert cluster.ledger.overlaps() == []

    result = run_dim("drain", target.node_id, "--undo", "--redis", redis_url, "--service", service)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: cluster.counts() == [3, 3, 3], 10, message=str(cluster.counts()))
    cluster.wait_settled()
    assert cluster.ledger.overlaps() == []


def test_drain_of_an_unknown_node_is_refused(
    redis_url: str, service: str, cluster: Cluster
) -> None:
    """A node that is not a member: exit 2, one line naming it and the live nodes."""
    result = run_dim("drain", "nope-123", "--redis", redis_url, "--service", service)
    line = assert_one_line_error(result, 2)
    assert "nope-123" in line and cluster.managers[0].node_id in line


def test_pause_holds_everything_and_resume_heals(
    redis_url: str, service: str, cluster: Cluster
) -> None:
    """While paused, a stopped node's configs run nowhere and the table says so; after
    `dim resume` they run again on the two nodes left."""
    result = run_dim("pause", "--redis", redis_url, "--service", service)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: status(redis_url, service)["paused"], 5, message="not paused")
    # the leader must know before the node stops, or it could still place them
    wait_until(
        lambda: all(m._node.leader._paused for m in cluster.running() if m.is_leader),  # type: ignore[union-attr]
        5,
        message="the leader did not see the pause",
    )
    leaving = next(m for m in cluster.managers if not m.is_leader)
    gone = set(leaving.instances)
    leaving.stop()
    table = run_dim("status", "--redis", redis_url, "--service", service).stdout
    assert "REBALANCING PAUSED" in table
    assert set(status(redis_url, service)["not_running"]) == gone
    assert all(not (set(m.instances) & gone) for m in cluster.running())

    result = run_dim("resume", "--redis", redis_url, "--service", service)
    assert result.returncode == 0, result.stderr
    cluster.wait_settled()
    assert cluster.counts() == [4, 5]
    assert cluster.ledger.overlaps() == []


def test_rebalance_makes_the_leader_read_its_config_now(
    redis_url: str, service: str, cluster: Cluster
) -> None:
    """With a 10-minute config poll, a new config runs right after `dim rebalance`, and
    `dim config` lists it with where it is assigned."""
    cluster.configs.append({"id": 9, "name": "new"})
    result = run_dim("rebalance", "--redis", redis_url, "--service", service)
    assert result.returncode == 0, result.stderr
    assert "asked the leader" in result.stdout
    cluster.wait_settled()
    result = run_dim("config", "--redis", redis_url, "--service", service, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in json.loads(result.stdout)}
    assert sorted(rows) == list(range(10))
    assert rows[9]["config"] == {"id": 9, "name": "new"}
    assert rows[9]["assigned_to"] == rows[9]["claimed_by"] is not None
    table = run_dim("config", "--redis", redis_url, "--service", service).stdout
    assert "10 configs" in table and '"name": "new"' in table


def test_rebalance_without_a_leader_fails(redis_url: str, service: str) -> None:
    result = run_dim("rebalance", "--redis", redis_url, "--service", service)
    assert "no leader" in assert_one_line_error(result, 1)


def test_watch_prints_the_moves_as_they_happen(
    redis_url: str, service: str, cluster: Cluster
) -> None:
    """Piped, `dim watch` prints the table once, then one line per config that moves."""
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dim",
            "watch",
            "--redis",
            redis_url,
            "--service",
            service,
            *FAST_WATCH,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dim_env(),
    )
    try:
        assert watch.stdout is not None
        first = watch.stdout.readline()  # the table has started: the first read is done
        assert first.startswith(f"service {service}")
        leaving = cluster.managers[2]
        moved = set(leaving.instances)
        leaving.stop()
        cluster.wait_settled()
        seen: set[int] = set()
        lines = []
        while seen != moved:
            line = watch.stdout.readline()
            assert line, f"watch ended early; saw {lines}"
            lines.append(line)
            if "started on" in line or "moved" in line:
                seen.add(int(line.split("config ")[1].split(":")[0]))
    finally:
        watch.terminate()
        _, err = watch.communicate(timeout=10)
    assert watch.returncode == 0 and "Traceback" not in err


def test_status_shows_instances_recreated_after_a_failed_health_check(
    redis_url: str, service: str
) -> None:
    """A config whose health check fails is being recreated: the node's row says so
    (from its heartbeat) until it runs healthy again."""
    gate = threading.Event()
    failing = {"on": True}

    def create(node: str, config: Any) -> None:
        if config["id"] == 0 and not failing["on"]:
            gate.wait(10)  # the recreation after the failed check waits for the test

    def healthcheck(instance: Any) -> bool:
        if instance.config["id"] == 0 and failing["on"]:
            failing["on"] = False
            return False
        return True

    cluster = Cluster(
        redis_url,
        service,
        [{"id": i} for i in range(3)],
        settings=SLOW_POLL,
        create=create,
        healthcheck=healthcheck,
    )
    try:
        cluster.add(1)

        def unhealthy() -> int:
            result: int = status(redis_url, service)["nodes"][0]["unhealthy"]
            return result

        wait_until(lambda: unhealthy() == 1, 10, message="no unhealthy instance shown")
        table = run_dim("status", "--redis", redis_url, "--service", service).stdout
        assert "(1 unhealthy)" in table
        gate.set()
        wait_until(lambda: unhealthy() == 0, 10, message="still shown unhealthy")
        cluster.wait_settled()
    finally:
        gate.set()
        cluster.stop()
