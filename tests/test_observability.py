"""What an operator sees of a running cluster without Prometheus: the leader's count of
the cluster (``CLUSTER_COUNTED``) and dim's log records with their structured fields."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
from typing import Any

import attrs
import pytest
import redis

from dim import Event, EventType
from dim.keys import Keys
from dim.testing import wait_until

from .helpers import FAST, Cluster

# a node TTL that a loaded machine does not trip over, so that leadership stays put
STEADY = attrs.evolve(FAST, node_ttl=1.0, leader_ttl=1.0)


class Events:
    """Every event of the managers it listens to, in the order delivered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[Event] = []

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._seen.append(event)

    def of(self, kind: EventType) -> list[Event]:
        with self._lock:
            return [e for e in self._seen if e.type is kind]


def test_the_leader_counts_the_cluster(redis_url: str, service: str) -> None:
    """Only a leader sends CLUSTER_COUNTED, with its epoch; it counts the live nodes, the
    configs, what runs, what no node may take, and a config whose create always fails as
    running nowhere (so "not running" is what an alert needs)."""
    configs: list[Any] = [{"id": i} for i in range(6)]
    configs += [{"id": "gpu", "tags": ["gpu"]}, {"id": "bad"}]

    def create_hook(node: str, config: Any) -> None:
        if config["id"] == "bad":
            raise RuntimeError("bad config")

    cluster = Cluster(
        redis_url, service, configs, settings=STEADY, create=create_hook, requires="tags"
    )
    events = Events()
    try:
        a, b = cluster.make(), cluster.make()
        for manager in (a, b):
            manager.add_listener(events)
            manager.start()
            cluster.managers.append(manager)

        def counted(**expected: int) -> bool:
            return any(
                all(e.data[k] == v for k, v in expected.items())
                for e in events.of(EventType.CLUSTER_COUNTED)
            )

        wait_until(
            lambda: counted(nodes=2, configs=8, running=6, not_running=2),
            30,
            interval=0.02,
            message=f"no such count: {events.of(EventType.CLUSTER_COUNTED)[-3:]}",
        )
        census = events.of(EventType.CLUSTER_COUNTED)
        leaders = {(e.node_id, e.data["epoch"]) for e in events.of(EventType.LEADERSHIP_GAINED)}
        for event in census:
            assert (event.node_id, event.data["epoch"]) in leaders  # only a leader counts
            data = event.data
            assert data["running"] + data["not_running"] == data["configs"] == 8
            assert data["running"] <= 6  # "bad" never runs
            assert data["not_running"] >= data["unplaceable"] >= 1  # "gpu" never has a place
            assert 0 <= data["pending_handoff"] <= 8
            assert 1 <= data["nodes"] <= 2
    finally:
        cluster.stop()


class Monitor:
    """The commands a Redis server runs for one service's keys, from MONITOR, on a thread
    of its own until :meth:`close`."""

    def __init__(self, url: str, service: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._service = service
        self._stop = f"stop-monitor-{service}"
        self._lock = threading.Lock()
        self._seen: list[tuple[str, str]] = []  # (client type, command)
        self._monitor = self._client.monitor().__enter__()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            command = self._monitor.next_command()
            if self._stop in command["command"]:
                return
            if self._service in command["command"]:
                with self._lock:
                    self._seen.append((command["client_type"], command["command"]))

    def commands(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._seen)

    def close(self) -> None:
        self._client.echo(self._stop)
        self._thread.join(10)
        self._monitor.__exit__()
        self._client.close()


def test_the_leader_counts_only_for_a_listener(redis_url: str, service: str) -> None:
    """With no listener for CLUSTER_COUNTED the leader reads nothing to count the cluster
    (an idle leader stays at one round trip per heartbeat); once one listens, the leader
    reads the live nodes' health and sends counts."""
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(3)], settings=STEADY)
    polls: list[float] = []
    configs = cluster.get_config

    def get_config() -> list[Any]:
        polls.append(1)
        return configs()

    cluster.get_config = get_config  # type: ignore[method-assign]
    monitor = Monitor(redis_url, service)
    try:
        (a,) = cluster.add(1)
        cluster.wait_settled()
        seen = len(polls)
        wait_until(lambda: len(polls) >= seen + 3, 15, interval=0.02)  # 3 config_intervals

        def health_reads() -> list[str]:
            return [c for kind, c in monitor.commands() if kind != "lua" and c.startswith("HGET ")]

        assert health_reads() == []
        events = Events()
        a.add_listener(events, EventType.CLUSTER_COUNTED)
        wait_until(lambda: events.of(EventType.CLUSTER_COUNTED), 15, interval=0.02)
        assert events.of(EventType.CLUSTER_COUNTED)[0].data["running"] == 3
        reads = wait_until(health_reads, 15, interval=0.02)
        assert reads[0] == f"HGET {Keys(service).node(a.node_id or '?')} health"
    finally:
        cluster.stop()
        monitor.close()


def test_log_records_carry_node_config_and_epoch(
    redis_url: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each rebalance is one INFO record carrying the leader's node and epoch; a create
    and a disconnect carry the node, the config id and the token; a record about the
    node alone carries no config."""
    caplog.set_level(logging.DEBUG, logger="dim")
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(3)], settings=STEADY)
    events = Events()
    try:
        a = cluster.make()
        a.add_listener(events)
        a.start()
        cluster.managers.append(a)
        cluster.wait_settled()
        node = a.node_id
        assert node is not None
        cluster.configs.pop()  # config 2 goes away: its instance is disconnected
        a.refresh()
        wait_until(lambda: events.of(EventType.INSTANCE_DISCONNECTED), 15, interval=0.02)
        a.stop()
    finally:
        cluster.stop()

    records = list(caplog.records)
    (gained,) = events.of(EventType.LEADERSHIP_GAINED)
    epoch = gained.data["epoch"]
    rebalances = [r for r in records if r.getMessage().startswith("rebalance v")]
    assert len(rebalances) == len(events.of(EventType.REBALANCE_APPLIED)) >= 2
    for record in rebalances:
        assert record.levelno == logging.INFO and record.name == "dim.leader"
        assert (record.dim_node, record.dim_epoch) == (node, epoch)  # type: ignore[attr-defined]

    created = events.of(EventType.INSTANCE_CREATED)
    assert {e.config_id for e in created} == {0, 1, 2}
    for event in created:
        assert any(
            "created" in r.getMessage()
            and getattr(r, "dim_node", None) == node
            and getattr(r, "dim_config", None) == event.config_id
            and getattr(r, "dim_token", None) == event.token
            for r in records
        ), f"no create record for {event}"
    (gone,) = events.of(EventType.INSTANCE_DISCONNECTED)[:1]
    assert gone.config_id == 2
    assert any(
        "instance_disconnected" in r.getMessage()
        and getattr(r, "dim_node", None) == node
        and getattr(r, "dim_config", None) == 2
        and getattr(r, "dim_token", None) == gone.token
        for r in records
    )
    (joined,) = [r for r in records if r.getMessage().startswith(f"node {node} joined")]
    assert joined.dim_node == node  # type: ignore[attr-defined]
    assert not hasattr(joined, "dim_config") and not hasattr(joined, "dim_epoch")


def test_dim_logs_nothing_to_an_unconfigured_program() -> None:
    """The dim logger has a NullHandler: a program that configures no logging does not get
    dim's warnings on stderr through logging's last-resort handler."""
    code = textwrap.dedent(
        """
        import logging
        import dim
        logging.getLogger("dim.node").warning("cannot reach Redis")
        print(any(isinstance(h, logging.NullHandler) for h in logging.getLogger("dim").handlers))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout.strip(), done.stderr) == ("True", "")


def test_a_listener_added_later_hears_a_count_at_the_next_tick(
    redis_url: str, service: str
) -> None:
    """Metrics built after start() get the cluster's counts at the leader's next tick,
    not a whole config_interval later (60 s here)."""
    slow_poll = STEADY.replace(config_interval=60.0)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(3)], settings=slow_poll)
    try:
        (a,) = cluster.add(1)
        cluster.wait_settled()
        events = Events()
        a.add_listener(events, EventType.CLUSTER_COUNTED)
        wait_until(lambda: events.of(EventType.CLUSTER_COUNTED), 20, interval=0.02)
    finally:
        cluster.stop()
