"""Prometheus metrics for one manager (the ``dim-manager[prometheus]`` extra).

:class:`PrometheusMetrics` keeps ``prometheus_client``'s own metric classes (counters,
gauges, histograms) up to date from the manager's events (:meth:`dim.Manager.add_listener`)
and state, so they work in ``prometheus_client``'s multiprocess mode as in a single
process: under gunicorn, each worker's manager writes its values to the shared
directory and one scrape of any worker adds them up. A scrape never touches Redis.

Every sample carries the label ``dim_service`` (a name that does not collide with the
``service`` target label a Prometheus ServiceMonitor adds); the node id, new for every
start, is a label only when asked for (``node_label=True``). The processes of a service
each export what runs in them; the one that leads also exports the cluster's counts
(``CLUSTER_COUNTED``). The metric table is in ``docs/metrics.rst``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Optional

try:
    from prometheus_client import Counter, Gauge, Histogram
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as exc:
    raise ImportError(
        f"dim.metrics needs prometheus_client ({exc}): pip install 'dim-manager[prometheus]'"
    ) from exc

from dim import __version__
from dim.errors import ConfigError, ForkedError
from dim.events import Event, EventType
from dim.manager import Manager

__all__ = ["PrometheusMetrics"]

log = logging.getLogger(__name__)

#: Counters: name (after the namespace, before ``_total``) -> help.
COUNTERS: dict[str, str] = {
    "leadership_gained": "Elections won here (summed over the processes: the leader changes).",
    "leadership_lost": "Leaderships lost here: deposed, fenced, or handed over on stop.",
    "instances_created": "Instances create() returned here.",
    "instances_disconnected": (
        "Instances stopped here (moved away, unhealthy, changed, fenced, or on stop)."
    ),
    "instances_unhealthy": "Health checks that failed, raised or timed out here.",
    "create_failures": "Calls of create() here that raised, returned None or timed out.",
    "instance_failures": (
        "Configs given up here after create_attempts failed calls (handed over)."
    ),
    "rebalances": "Assignments written here as the leader.",
    "rebalance_moved": "Configs the leader's writes moved from one live node to another.",
    "rebalance_placed": (
        "Configs the leader's writes placed with no live previous node (new configs, or "
        "from nodes that left or died)."
    ),
    "rebalance_removed": (
        "Configs the leader's writes took out of the assignment (gone from get_config, or "
        "with no node left to run them)."
    ),
    "leases_lost": "Claims found taken by another node (the instance was stopped at once).",
    "fenced": "Times this process stopped all its instances because it could not renew in time.",
    "redis_lost": "Heartbeats that failed after one that succeeded.",
    "redis_restored": "Heartbeats that succeeded after one that failed.",
    "config_errors": (
        "Calls of get_config that raised, timed out or returned bad configs (one per bad config)."
    ),
    "disconnect_timeouts": (
        "Calls of disconnect() that overran disconnect_timeout: the claim was let go while "
        "the instance may still run (only its fencing token protects from it)."
    ),
    "redis_resets": (
        "Times this process learned that Redis lost or rewound data (a restart, a failover, "
        "a clock step): no new claims for the reset window."
    ),
    "loop_errors": "Errors raised in a background loop or worker task.",
    "unplaced_changes": (
        "Times the leader found that the configs no live node may take (required tags, "
        "capacity) changed."
    ),
}

#: The counters each event adds one to.
EVENT_COUNTERS: dict[EventType, tuple[str, ...]] = {
    EventType.LEADERSHIP_GAINED: ("leadership_gained",),
    EventType.LEADERSHIP_LOST: ("leadership_lost",),
    EventType.INSTANCE_CREATED: ("instances_created",),
    EventType.INSTANCE_DISCONNECTED: ("instances_disconnected",),
    EventType.INSTANCE_UNHEALTHY: ("instances_unhealthy",),
    # CREATE_FAILED is sent for a failed call that will be retried; the last failed call
    # sends INSTANCE_FAILED instead, so it counts as a create failure too
    EventType.CREATE_FAILED: ("create_failures",),
    EventType.INSTANCE_FAILED: ("create_failures", "instance_failures"),
    EventType.REBALANCE_APPLIED: ("rebalances",),
    EventType.LEASE_LOST: ("leases_lost",),
    EventType.FENCED: ("fenced",),
    EventType.REDIS_LOST: ("redis_lost",),
    EventType.REDIS_RESTORED: ("redis_restored",),
    EventType.CONFIG_ERROR: ("config_errors",),
    EventType.LOOP_ERROR: ("loop_errors",),
    EventType.CONFIGS_UNPLACED: ("unplaced_changes",),
    EventType.DISCONNECT_TIMEOUT: ("disconnect_timeouts",),
    EventType.REDIS_RESET: ("redis_resets",),
}

#: The counters a REBALANCE_APPLIED event adds its counts to: data key -> counter.
REBALANCE_COUNTS: dict[str, str] = {
    "moved": "rebalance_moved",
    "placed": "rebalance_placed",
    "removed": "rebalance_removed",
}

#: Histograms: name -> (help, upper bounds of the buckets in seconds).
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "leader_takeover_seconds": (
        "From winning an election to the first assignment this leader wrote.",
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    ),
    "redis_outage_seconds": (
        "From the first failed heartbeat to the next one that succeeded.",
        (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0),
    ),
}

#: Gauges of this process: name -> help (summed over the live processes of a host).
GAUGES: dict[str, str] = {
    "instances": "Instances running in this process now (the manager's instances).",
    "leader": "1 if this process leads its service now, else 0.",
}

#: The cluster's counts, exported by the process that leads (``CLUSTER_COUNTED``; the
#: fields of :class:`dim.plan.Census`): name -> (census field, help).
CLUSTER_GAUGES: dict[str, tuple[str, str]] = {
    "nodes": ("nodes", "Live nodes of the service, as its leader counts them."),
    "configs": ("configs", "Configs of the service (placed or not), from its leader."),
    "configs_running": (
        "running",
        "Configs whose instance runs on a live node, from the counts the nodes report.",
    ),
    "configs_not_running": (
        "not_running",
        "Configs whose instance runs nowhere (no place, create failing or in progress, "
        "node gone, handoff): alert when above 0 for long.",
    ),
    "configs_unplaceable": (
        "unplaceable",
        "Configs no live node may take (required tags, capacity).",
    ),
    "configs_pending_handoff": (
        "pending_handoff",
        "Instances that nodes still have to start to run what they are assigned.",
    ),
}

_NAMESPACE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
SERVICE_LABEL = "dim_service"
NODE_LABEL = "node"


def _multiprocess() -> bool:
    """prometheus_client's multiprocess mode (its own test): values live in files."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


class PrometheusMetrics:
    """Exposes one manager's state and events as Prometheus metrics.

    Builds ``prometheus_client`` counters, gauges and histograms, registers itself (a
    collector of them) with ``registry`` (``prometheus_client``'s default registry
    unless told otherwise; ``None`` registers nothing, for a caller that registers it),
    and subscribes to the manager's events. Build it before :meth:`dim.Manager.start`,
    so it hears the first election; built later, it counts from then on. It follows the
    manager across a stop and a start: the series stay the same (unless ``node_label``),
    and the counters go on counting.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (``prometheus_client``'s multiprocess mode)
    every value is written to that directory, and a ``MultiProcessCollector`` adds up
    the live processes: build one per worker, after the fork (``docs/metrics.rst``).

    Two instances with the same ``namespace`` cannot share a registry (their names
    clash): give each manager of a process its own namespace or registry.

    Example::

        from prometheus_client import start_http_server
        from dim.metrics import PrometheusMetrics

        manager = Manager(get_config, create, redis=url, service="feeds")
        metrics = PrometheusMetrics(manager)
        start_http_server(9100)
        manager.start()
        ...
        manager.stop()
        metrics.close()

    :param manager: the manager to observe.
    :param registry: where to register (default: ``prometheus_client.REGISTRY``).
    :param namespace: the prefix of every metric name.
    :param node_label: label every sample with the node id too (``node``). A manager
        gets a new node id at every start, so each start makes new series: only for a
        node with a static name (``node_name``), or when you want that.
    :raises ConfigError: ``namespace`` is not a valid metric name prefix.
    :raises ValueError: the registry already holds metrics with these names.
    """

    def __init__(
        self,
        manager: Manager,
        registry: Optional[CollectorRegistry] = REGISTRY,
        namespace: str = "dim",
        *,
        node_label: bool = False,
    ) -> None:
        if not isinstance(manager, Manager):
            raise ConfigError(f"manager must be a dim.Manager, got {manager!r}", manager)
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(
                f"namespace must match [a-zA-Z_][a-zA-Z0-9_]*, got {namespace!r}", namespace
            )
        self.manager = manager
        self.namespace = namespace
        self.node_label = bool(node_label)
        self._registry = registry
        self._lock = threading.Lock()
        self._closed = False
        labels = (SERVICE_LABEL, NODE_LABEL) if self.node_label else (SERVICE_LABEL,)
        ns = namespace
        # livesum: the processes of a host add up, and a dead one drops out
        # (multiprocess.mark_process_dead); livemax for the cluster's counts, which only
        # the leading process has (an old leader's last count never adds to it)
        self._gauges = {
            name: Gauge(f"{ns}_{name}", doc, labels, registry=None, multiprocess_mode="livesum")
            for name, doc in GAUGES.items()
        }
        self._cluster = {
            name: Gauge(f"{ns}_{name}", doc, labels, registry=None, multiprocess_mode="livemax")
            for name, (_, doc) in CLUSTER_GAUGES.items()
        }
        self._counters = {
            name: Counter(f"{ns}_{name}", doc, labels, registry=None)
            for name, doc in COUNTERS.items()
        }
        self._histograms = {
            name: Histogram(f"{ns}_{name}", doc, labels, buckets=bounds, registry=None)
            for name, (doc, bounds) in HISTOGRAMS.items()
        }
        self._build_info = Gauge(
            f"{ns}_build_info",
            "Always 1: the version of dim this process runs.",
            ("version",),
            registry=None,
            multiprocess_mode="livemax",
        )
        self._build_info.labels(__version__).set(1)
        self._known: set[tuple[str, ...]] = set()  # label values with series so far
        self._gauged: Optional[tuple[str, ...]] = None  # labels of the process gauges
        self._counted: Optional[tuple[str, ...]] = None  # ... of the cluster's counts
        self._gained_at: dict[str, float] = {}  # node -> when it won, until its first write
        self._lost_at: dict[str, float] = {}  # node -> when Redis was lost, until restored
        with self._lock:
            self._refresh()
        # one bound method, kept: remove_listener compares by identity
        self._listener = self._on_event
        # registered first: if the names clash, no listener is left behind
        if registry is not None:
            registry.register(self)
        manager.add_listener(self._listener)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<PrometheusMetrics service={self.manager.service!r} "
            f"namespace={self.namespace!r} series={len(self._known)} {state}>"
        )

    def close(self) -> None:
        """Stop listening, unregister from the registry, and take this process's gauges
        out of the sums (they read 0 in multiprocess mode); safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._gauged is not None:
                self._drop(self._gauges.values(), self._gauged)
            if self._counted is not None:
                self._drop(self._cluster.values(), self._counted)
            self._gauged = self._counted = None
        self.manager.remove_listener(self._listener)
        if self._registry is not None:
            try:
                self._registry.unregister(self)
            except KeyError:
                pass  # the caller unregistered it already

    # -- the listener (dim's event thread) ----------------------------------------------

    def _on_event(self, event: Event) -> None:
        with self._lock:
            if self._closed:
                return
            node = event.node_id
            labels = self._labels(node)
            self._series(labels)
            for name in EVENT_COUNTERS.get(event.type, ()):
                self._counters[name].labels(*labels).inc()
            if event.type is EventType.REBALANCE_APPLIED:
                for key, name in REBALANCE_COUNTS.items():
                    value = event.data.get(key)
                    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                        self._counters[name].labels(*labels).inc(value)
                started = self._gained_at.pop(node, None)
                if started is not None:
                    self._observe("leader_takeover_seconds", labels, event.time - started)
            elif event.type is EventType.LEADERSHIP_GAINED:
                self._gained_at[node] = event.time
            elif event.type is EventType.LEADERSHIP_LOST:
                self._gained_at.pop(node, None)  # lost before its first write: no sample
            elif event.type is EventType.REDIS_LOST:
                self._lost_at.setdefault(node, event.time)
            elif event.type is EventType.REDIS_RESTORED:
                started = self._lost_at.pop(node, None)
                if started is not None:
                    self._observe("redis_outage_seconds", labels, event.time - started)
            # every change of what runs here or of the leadership is followed by an
            # event: reading the manager now keeps the gauges true between scrapes
            # (in multiprocess mode nobody reads them at scrape time)
            current = self._refresh()
            if event.type is EventType.CLUSTER_COUNTED and current == (node, True):
                self._count(labels, event.data)

    def _labels(self, node: str) -> tuple[str, ...]:
        service = self.manager.service
        return (service, node) if self.node_label else (service,)

    def _series(self, labels: tuple[str, ...]) -> None:
        """Every counter and histogram has a series from the start (at zero until an
        event), so rate() and increase() see the first increment."""
        if labels in self._known:
            return
        self._known.add(labels)
        for counter in self._counters.values():
            counter.labels(*labels)
        for histogram in self._histograms.values():
            histogram.labels(*labels)

    def _observe(self, name: str, labels: tuple[str, ...], seconds: float) -> None:
        if seconds < 0:
            log.debug("%s: the wall clock stepped back; %.3f s not recorded", name, seconds)
            return
        self._histograms[name].labels(*labels).observe(seconds)

    def _count(self, labels: tuple[str, ...], data: dict[str, object]) -> None:
        for name, (field, _) in CLUSTER_GAUGES.items():
            value = data.get(field)
            if isinstance(value, int) and not isinstance(value, bool):
                self._cluster[name].labels(*labels).set(value)
        self._counted = labels

    def _drop(self, gauges: Iterable[Gauge], labels: tuple[str, ...]) -> None:
        """Take gauges out: removed, or set to 0 where they cannot be (multiprocess
        files keep every series; 0 adds nothing to a sum nor to a max)."""
        for gauge in gauges:
            if _multiprocess():
                gauge.labels(*labels).set(0)
            else:
                gauge.remove(*labels)

    def _refresh(self) -> Optional[tuple[str, bool]]:
        """Set the process gauges from the manager; drop the cluster's counts of a
        process that no longer leads. Returns (node id, leads) of a running manager."""
        current = self._current()
        node, running, leads = current if current is not None else (None, 0, False)
        labels: Optional[tuple[str, ...]] = None
        if node is not None:
            labels = self._labels(node)
        elif not self.node_label:
            labels = (self.manager.service,)  # a stopped manager: the same series, at 0
        if self._gauged is not None and self._gauged != labels:
            self._drop(self._gauges.values(), self._gauged)
            self._gauged = None
        if labels is not None:
            self._series(labels)
            self._gauges["instances"].labels(*labels).set(running)
            self._gauges["leader"].labels(*labels).set(1 if leads else 0)
            self._gauged = labels
        if self._counted is not None and (not leads or self._counted != labels):
            self._drop(self._cluster.values(), self._counted)
            self._counted = None
        return (node, leads) if node is not None else None

    def _current(self) -> Optional[tuple[str, int, bool]]:
        """(node id, instances running, leads) of the running manager, else None."""
        manager = self.manager
        node = manager.node_id
        if node is None:
            return None
        try:
            running = len(manager.instances)
            leads = manager.is_leader
        except ForkedError:
            return None  # a copy inherited through fork() runs nothing here
        if manager.node_id != node:
            return None  # stopped (or restarted) while we read: report it next time
        return node, running, leads

    # -- the collector (the scraping thread) ----------------------------------------------

    def _metrics(self) -> list[MetricWrapperBase]:
        return [
            *self._gauges.values(),
            *self._cluster.values(),
            *self._counters.values(),
            *self._histograms.values(),
            self._build_info,
        ]

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples (lets the registry check the names)."""
        return iter([m for metric in self._metrics() for m in metric.describe()])

    def collect(self) -> Iterator[Metric]:
        """The metric families with their samples; the process gauges read now."""
        with self._lock:
            if not self._closed:
                self._refresh()
        return iter([m for metric in self._metrics() for m in metric.collect()])
