"""dim.metrics against real managers: scraped over HTTP, compared with what happened."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import attrs
import pytest

from dim import ConfigError, EventType, Manager, __version__
from dim.plan import Census
from dim.testing import RedisServer, wait_until

from .helpers import FAST, Cluster

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, make_wsgi_app  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dim.metrics import (  # noqa: E402
    CLUSTER_GAUGES,
    COUNTERS,
    EVENT_COUNTERS,
    REBALANCE_COUNTS,
    PrometheusMetrics,
)

# A node TTL a loaded machine does not trip over, so the counts below are exact (FAST's
# 0.6 s can fence a node that is merely descheduled); the fence test keeps FAST.
STEADY = attrs.evolve(FAST, node_ttl=1.0, leader_ttl=1.0)
CONFIGS = [{"id": i} for i in range(6)]


class Scrape:
    """One scrape, parsed: samples by name, each with its labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def __repr__(self) -> str:
        return f"<Scrape {len(self.samples)} samples>\n{self.text}"

    def get(self, name: str, **labels: str) -> Optional[float]:
        """The one sample of ``name`` with these labels, or None if there is none."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) <= 1, f"{len(found)} samples of {name} {labels}"
        return found[0] if found else None

    def nodes(self) -> set[str]:
        return {s.labels["node"] for s in self.samples if "node" in s.labels}

    def label_names(self) -> set[str]:
        return {name for s in self.samples for name in s.labels}


Scraper = Callable[[], Scrape]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[CollectorRegistry], Scraper]]:
    """Serve a registry over HTTP (prometheus_client's WSGI app) on a port the OS picks;
    the servers stop after the test."""
    servers: list[tuple[WSGIServer, threading.Thread]] = []
    # never through a proxy that the environment may configure
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def start(registry: CollectorRegistry) -> Scraper:
        server = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=_QuietHandler)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        thread.start()
        servers.append((server, thread))
        url = f"http://127.0.0.1:{server.server_port}/metrics"

        def scrape() -> Scrape:
            with opener.open(url, timeout=5) as response:
                assert response.status == 200
                return Scrape(response.read().decode())

        return scrape

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def cluster(redis_url: str, service: str) -> Iterator[Cluster]:
    c = Cluster(redis_url, service, CONFIGS, settings=STEADY)
    yield c
    c.stop()


def metered(cluster: Cluster, **kwargs: Any) -> tuple[Manager, PrometheusMetrics]:
    """A started manager of the cluster with metrics in a registry of its own, built
    before the start so they hear everything."""
    manager = cluster.make(**kwargs)
    metrics = PrometheusMetrics(manager, registry=CollectorRegistry())
    manager.start()
    cluster.managers.append(manager)
    return manager, metrics


def until(scrape: Scraper, check: Callable[[Scrape], bool], timeout: float = 15.0) -> Scrape:
    """Scrape until ``check`` holds; the scrape that passed (the last one on timeout)."""
    last: list[Scrape] = []

    def ok() -> bool:
        last[:] = [scrape()]
        return check(last[0])

    try:
        wait_until(ok, timeout, interval=0.02)
    except TimeoutError as exc:
        raise AssertionError(f"metrics never matched; last {last[0]!r}") from exc
    return last[0]


def test_scrape_matches_the_manager_through_a_join(
    cluster: Cluster, serve: Callable[[CollectorRegistry], Scraper]
) -> None:
    """The gauges equal the manager's instances and leadership; a join counts one more
    rebalance whose moved count is what the new node took; creates and disconnects
    match the ledger. The only label is dim_service: no node id, nothing Prometheus
    adds itself (service, instance, job)."""
    before = time.time()
    a, metrics = metered(cluster)
    assert metrics._registry is not None
    scrape = serve(metrics._registry)
    cluster.wait_settled()
    node = a.node_id
    assert node is not None
    labels = {"dim_service": cluster.service}

    def first(s: Scrape) -> bool:
        return (
            s.get("dim_instances", **labels) == len(a.instances) == 6
            and s.get("dim_leader", **labels) == 1.0
            and s.get("dim_instances_created_total", **labels) == 6
            and s.get("dim_rebalance_placed_total", **labels) == 6
            and s.get("dim_leader_takeover_seconds_count", **labels) == 1
        )

    s = until(scrape, first)
    assert a.is_leader
    assert s.label_names() == {"dim_service", "le", "version"}  # le: buckets; version: build
    assert node not in s.text
    assert s.get("dim_rebalance_moved_total", **labels) == 0
    takeover = s.get("dim_leader_takeover_seconds_sum", **labels)
    assert takeover is not None and 0 < takeover < time.time() - before
    rebalances = s.get("dim_rebalances_total", **labels)
    assert rebalances is not None and rebalances >= 1

    (b,) = cluster.add(1)
    cluster.wait_settled()
    assert len(b.instances) == 3

    def joined(s: Scrape) -> bool:
        return (
            s.get("dim_instances", **labels) == len(a.instances) == 3
            and s.get("dim_rebalance_moved_total", **labels) == len(b.instances)
            and s.get("dim_instances_disconnected_total", **labels) == 3
        )

    s = until(scrape, joined)
    assert s.get("dim_rebalances_total", **labels) > rebalances  # type: ignore[operator]
    assert s.get("dim_rebalance_placed_total", **labels) == 6  # the join placed nothing new
    assert s.get("dim_leader", **labels) == 1.0 and a.is_leader
    assert s.get("dim_instances_created_total", **labels) == cluster.ledger.create_count(node)
    assert node not in s.text and b.node_id not in s.text  # type: ignore[operator]
    assert s.get("dim_fenced_total", **labels) == 0
    assert s.get("dim_create_failures_total", **labels) == 0
    metrics.close()


def test_leader_gauge_follows_a_failover(
    cluster: Cluster, serve: Callable[[CollectorRegistry], Scraper]
) -> None:
    """A node that does not lead shows leader 0 and writes no rebalance; when the leader
    stops, it shows leader 1, one election won and one takeover observed."""
    (a,) = cluster.add(1)
    wait_until(lambda: a.is_leader, 10)
    b, metrics = metered(cluster)
    assert metrics._registry is not None
    scrape = serve(metrics._registry)
    cluster.wait_settled()
    node = b.node_id
    assert node is not None
    labels = {"dim_service": cluster.service}

    s = until(scrape, lambda s: s.get("dim_instances", **labels) == len(b.instances) == 3)
    assert s.get("dim_leader", **labels) == 0.0 and not b.is_leader
    assert s.get("dim_rebalances_total", **labels) == 0
    assert s.get("dim_leadership_gained_total", **labels) == 0
    assert s.get("dim_leader_takeover_seconds_count", **labels) == 0

    a.stop()
    cluster.wait_settled()

    def took_over(s: Scrape) -> bool:
        return (
            s.get("dim_leader", **labels) == 1.0
            and s.get("dim_instances", **labels) == len(b.instances) == 6
            and s.get("dim_leader_takeover_seconds_count", **labels) == 1
            # (counted when the event thread delivers the create, after it is visible)
            and s.get("dim_instances_created_total", **labels) == cluster.ledger.create_count(node)
        )

    s = until(scrape, took_over)
    assert b.is_leader
    assert s.get("dim_leadership_gained_total", **labels) == 1
    assert s.get("dim_rebalances_total", **labels) >= 1  # type: ignore[operator]
    metrics.close()


def test_a_restart_keeps_the_series_and_close_unregisters(
    cluster: Cluster, serve: Callable[[CollectorRegistry], Scraper]
) -> None:
    """A restart (a new node id) keeps the same series: the counters go on, the gauges
    follow the new node; a stopped manager reads 0; close() empties the registry (which
    then takes a new collector) and stops the counting."""
    registry = CollectorRegistry()
    a = cluster.make()
    metrics = PrometheusMetrics(a, registry=registry)
    scrape = serve(registry)
    s = scrape()
    assert s.get("dim_instances") == 0.0 and s.get("dim_leader") == 0.0  # not started yet
    assert s.get("dim_instances_created_total") == 0.0
    a.start()
    cluster.managers.append(a)
    cluster.wait_settled()
    first = a.node_id
    assert first is not None
    until(scrape, lambda s: s.get("dim_instances_created_total") == 6)

    a.stop()
    s = until(scrape, lambda s: s.get("dim_instances_disconnected_total") == 6)
    assert s.get("dim_instances") == 0.0 and s.get("dim_leader") == 0.0  # stopped
    assert s.get("dim_leadership_lost_total") == 1  # resigned on stop
    assert s.get("dim_configs") is None  # a process that does not lead has no counts

    a.start()
    cluster.wait_settled()
    second = a.node_id
    assert second is not None and second != first
    s = until(scrape, lambda s: s.get("dim_instances_created_total") == 12)
    assert s.get("dim_instances") == len(a.instances) == 6
    assert s.get("dim_leadership_gained_total") == 2
    assert first not in s.text and second not in s.text

    metrics.close()
    metrics.close()  # safe twice
    assert not [f for f in scrape().families if f.startswith("dim_")]
    again = PrometheusMetrics(a, registry=registry)  # the names are free again

    def counts(metrics: PrometheusMetrics) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name, s.labels, s.value)
            for f in metrics.collect()
            if f.type != "gauge"  # gauges are read from the manager, not counted
            for s in f.samples
            if not s.name.endswith("_created")  # when the series was made
        ]

    frozen = counts(metrics)

    cluster.configs.append({"id": "late"})  # one more create on the only node
    a.refresh()
    s = until(scrape, lambda s: s.get("dim_instances_created_total") == 1)
    assert s.get("dim_instances") == len(a.instances) == 7
    assert counts(metrics) == frozen  # the closed one no longer listens
    again.close()


def test_failures_are_counted(
    cluster: Cluster, serve: Callable[[CollectorRegistry], Scraper]
) -> None:
    """create() raising, giving up a config, a failed healthcheck and get_config raising
    each move their counter by exactly the number of times they happened."""
    raised: list[Any] = []
    config_errors: list[int] = []
    sick = {1}
    failing_config = threading.Event()

    def create_hook(node: str, config: Any) -> None:
        if config["id"] == "bad":
            raised.append(config["id"])
            raise RuntimeError("bad config")

    def healthcheck(instance: Any) -> bool:
        if instance.config["id"] in sick:
            sick.discard(instance.config["id"])
            return False
        return True

    def get_config() -> list[Any]:
        if failing_config.is_set():
            config_errors.append(1)
            raise OSError("config store down")
        return [*CONFIGS[:4], {"id": "bad"}]

    cluster._create_hook = create_hook
    cluster.get_config = get_config  # type: ignore[method-assign]
    settings = attrs.evolve(STEADY, create_attempts=2, failure_cooldown=60)
    a, metrics = metered(cluster, settings=settings, healthcheck=healthcheck)
    assert metrics._registry is not None
    scrape = serve(metrics._registry)
    node = a.node_id
    assert node is not None

    def failed(s: Scrape) -> bool:
        return (
            s.get("dim_instance_failures_total") == 1
            # every failed call: the retried one and the last one
            and s.get("dim_create_failures_total") == len(raised) == 2
            and s.get("dim_instances_unhealthy_total") == 1
            and s.get("dim_instances") == len(a.instances) == 4
            # the unhealthy instance was disconnected and created again (the scrape can
            # land between its unhealthy report and its recreation)
            and s.get("dim_instances_disconnected_total") == 1
            and s.get("dim_instances_created_total") == 5
        )

    s = until(scrape, failed)
    assert s.get("dim_config_errors_total") == 0

    failing_config.set()
    a.refresh()
    wait_until(lambda: len(config_errors) >= 2, 10)
    failing_config.clear()
    s = until(scrape, lambda s: s.get("dim_config_errors_total") == len(config_errors))
    assert s.get("dim_instances") == 4  # the last good config is kept
    metrics.close()


def test_fence_and_redis_outage_are_counted(
    own_redis: RedisServer, service: str, serve: Callable[[CollectorRegistry], Scraper]
) -> None:
    """With Redis frozen the node fences itself and the scrape (which never touches
    Redis) shows it; after the thaw the outage histogram holds one observation no
    longer than the freeze and no shorter than the time Redis stayed frozen after the
    loss was seen."""
    cluster = Cluster(own_redis.url, service, CONFIGS[:2], settings=FAST)
    try:
        a, metrics = metered(cluster)
        assert metrics._registry is not None
        scrape = serve(metrics._registry)
        cluster.wait_settled()
        node = a.node_id
        assert node is not None
        s = until(scrape, lambda s: s.get("dim_instances") == 2)
        fenced = s.get("dim_fenced_total")
        outages = s.get("dim_redis_outage_seconds_count")
        outage_sum = s.get("dim_redis_outage_seconds_sum")
        assert fenced is not None and outages is not None and outage_sum is not None

        frozen_at = time.time()
        own_redis.pause()
        try:
            s = until(
                scrape,
                lambda s: (
                    s.get("dim_fenced_total") == fenced + 1
                    and s.get("dim_instances") == len(a.instances) == 0
                    and s.get("dim_leader") == 0.0
                    and s.get("dim_redis_lost_total") == s.get("dim_redis_restored_total") + 1  # type: ignore[operator]
                ),
            )
            assert not a.is_leader
            lost_seen_at = time.time()  # the loss happened before this
        finally:
            thawed_at = time.time()  # the first heartbeat that succeeds comes after this
            own_redis.resume()

        def recovered(s: Scrape) -> bool:
            return (
                s.get("dim_redis_outage_seconds_count") == outages + 1
                and s.get("dim_instances") == len(a.instances) == 2
            )

        s = until(scrape, recovered)
        seen_at = time.time()
        assert s.get("dim_redis_lost_total") == s.get("dim_redis_restored_total")
        outage = s.get("dim_redis_outage_seconds_sum") - outage_sum  # type: ignore[operator]
        assert thawed_at - lost_seen_at <= outage <= seen_at - frozen_at
        wait_until(lambda: a.is_leader, 10)
        until(scrape, lambda s: s.get("dim_leader") == 1.0)
        metrics.close()
    finally:
        cluster.stop()


def test_cluster_gauges_come_from_the_leader(
    redis_url: str, service: str, serve: Callable[[CollectorRegistry], Scraper]
) -> None:
    """Only the leading process exports the cluster's counts, so that max() or sum() over
    the processes is the cluster's: the live nodes, the configs, what runs, and a config
    that no node may take as not running. When the leader stops, the other process takes
    the counts over and the stopped one exports none; every process exports what runs in
    it, and their sum is every config that runs."""
    configs: list[Any] = [*CONFIGS, {"id": "gpu", "tags": ["gpu"]}]
    cluster = Cluster(redis_url, service, configs, settings=STEADY, requires="tags")
    try:
        a, metrics_a = metered(cluster)
        wait_until(lambda: a.is_leader, 10)
        b, metrics_b = metered(cluster)
        assert metrics_a._registry is not None and metrics_b._registry is not None
        scrape_a, scrape_b = serve(metrics_a._registry), serve(metrics_b._registry)
        counts = {
            "dim_nodes": 2,
            "dim_configs": 7,
            "dim_configs_running": 6,
            "dim_configs_not_running": 1,
            "dim_configs_unplaceable": 1,
            "dim_configs_pending_handoff": 0,
        }

        def counted(s: Scrape, **expected: int) -> bool:
            return all(s.get(name, dim_service=service) == v for name, v in expected.items())

        s = until(scrape_a, lambda s: counted(s, dim_leader=1, **counts))
        assert a.is_leader
        s_b = until(scrape_b, lambda s: s.get("dim_instances") == len(b.instances) == 3)
        assert s_b.get("dim_leader") == 0.0 and not b.is_leader
        assert not [x for x in s_b.samples if x.name in counts]  # b does not lead
        until(scrape_a, lambda s: s.get("dim_instances") == len(a.instances) == 3)

        a.stop()
        counts["dim_nodes"] = 1
        s_b = until(scrape_b, lambda s: counted(s, dim_leader=1, dim_instances=6, **counts))
        assert b.is_leader
        s = until(scrape_a, lambda s: s.get("dim_instances") == 0.0)
        assert s.get("dim_leader") == 0.0
        assert not [x for x in s.samples if x.name in counts]  # a no longer leads
        metrics_a.close()
        metrics_b.close()
    finally:
        cluster.stop()


def test_node_label_is_opt_in(
    cluster: Cluster, serve: Callable[[CollectorRegistry], Scraper]
) -> None:
    """node_label=True adds the node id to every series of the manager; a restart makes
    new series (the old node's gauges go, its counters stay). dim_build_info holds the
    version."""
    registry = CollectorRegistry()
    a = cluster.make()
    metrics = PrometheusMetrics(a, registry=registry, node_label=True)
    scrape = serve(registry)
    assert scrape().get("dim_build_info", version=__version__) == 1.0
    a.start()
    cluster.managers.append(a)
    cluster.wait_settled()
    first = a.node_id
    assert first is not None
    labels = {"dim_service": cluster.service, "node": first}
    s = until(scrape, lambda s: s.get("dim_instances_created_total", **labels) == 6)
    assert s.get("dim_instances", **labels) == 6 and s.get("dim_leader", **labels) == 1
    s = until(scrape, lambda s: s.get("dim_configs_running", **labels) == 6)
    assert s.nodes() == {first}

    a.stop()
    a.start()
    cluster.wait_settled()
    second = a.node_id
    assert second is not None
    again = {"dim_service": cluster.service, "node": second}
    s = until(scrape, lambda s: s.get("dim_configs_running", **again) == 6)
    assert s.get("dim_instances", **again) == 6 and s.get("dim_leader", **again) == 1
    assert s.get("dim_instances", **labels) is None  # the old node's gauges went
    assert s.get("dim_configs_running", **labels) is None
    assert s.get("dim_instances_created_total", **labels) == 6  # its counters stay
    assert s.nodes() == {first, second}
    metrics.close()


def test_bad_arguments_and_name_clashes() -> None:
    """A bad namespace or manager is refused with the value named; a second collector
    with the same names in one registry is refused, another namespace is not; before
    the manager starts every process series reads 0 and there are no cluster counts."""
    # never started, so it never connects (and the URL leads nowhere)
    manager = Manager(lambda: [], lambda c: object(), redis="redis://127.0.0.1:1/0", service="u")
    registry = CollectorRegistry()
    with pytest.raises(ConfigError, match="'dim-x'"):
        PrometheusMetrics(manager, registry=registry, namespace="dim-x")
    with pytest.raises(ConfigError, match="manager"):
        PrometheusMetrics("redis://localhost", registry=registry)  # type: ignore[arg-type]
    first = PrometheusMetrics(manager, registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusMetrics(manager, registry=registry)
    other = PrometheusMetrics(manager, registry=registry, namespace="feeds")
    families = list(registry.collect())
    assert {f.name for f in families} >= {"dim_instances", "feeds_instances"}
    values = {(s.name, s.value) for f in families for s in f.samples if f.type != "counter"}
    assert values >= {("dim_instances", 0.0), ("dim_leader", 0.0), ("feeds_leader", 0.0)}
    assert not [s for f in families for s in f.samples if s.name.endswith("configs")]
    unregistered = PrometheusMetrics(manager, registry=None)
    assert "closed" not in repr(unregistered)
    for metrics in (first, other, unregistered):
        metrics.close()
        assert "closed" in repr(metrics)
    assert list(registry.collect()) == []


def test_every_event_type_has_a_counter() -> None:
    """Every event type feeds a counter (a new one in dim needs its counter here too), but
    the leader's count of the cluster, which sets one gauge per count; every counter is
    fed."""
    assert set(EVENT_COUNTERS) | {EventType.CLUSTER_COUNTED} == set(EventType)
    assert EventType.CLUSTER_COUNTED not in EVENT_COUNTERS
    assert {field for field, _ in CLUSTER_GAUGES.values()} == {f.name for f in attrs.fields(Census)}
    fed = {name for names in EVENT_COUNTERS.values() for name in names}
    assert fed | set(REBALANCE_COUNTS.values()) == set(COUNTERS)


def test_importing_needs_the_extra_only_for_metrics() -> None:
    """dim imports without prometheus_client; dim.metrics without it says what to install."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if not installed
        import dim
        try:
            import dim.metrics
        except ImportError as exc:
            print(exc)
        else:
            print("imported")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'dim-manager[prometheus]'" in done.stdout
