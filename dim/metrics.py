"""Prometheus metrics for one manager (the ``dim-manager[prometheus]`` extra).

:class:`PrometheusMetrics` is a collector for ``prometheus_client``: it listens to the
manager's events (:meth:`dim.Manager.add_listener`) and counts them, and reads the two
gauges (instances running here, leadership) from the manager at scrape time, so a
scrape never touches Redis and answers even while Redis is down. Every sample carries
the labels ``service`` (the manager's service) and ``node`` (its node id, new for every
start). The metric table is in ``docs/metrics.rst``.

The metrics belong to the process that runs the manager: they are not written to
``prometheus_client``'s multiprocess files.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterator
from typing import Optional

try:
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as exc:
    raise ImportError(
        f"dim.metrics needs prometheus_client ({exc}): pip install 'dim-manager[prometheus]'"
    ) from exc

from dim.errors import ConfigError, ForkedError
from dim.events import Event, EventType
from dim.manager import Manager

__all__ = ["PrometheusMetrics"]

log = logging.getLogger(__name__)

#: Counters: name (after the namespace, before ``_total``) -> help.
COUNTERS: dict[str, str] = {
    "leadership_gained": "Elections this node won.",
    "leadership_lost": "Leaderships this node lost: deposed, fenced, or handed over on stop.",
    "instances_created": "Instances create() returned here.",
    "instances_disconnected": (
        "Instances stopped here (moved away, unhealthy, changed, fenced, or on stop)."
    ),
    "instances_unhealthy": "Health checks that failed, raised or timed out here.",
    "create_failures": "Calls of create() here that raised, returned None or timed out.",
    "instance_failures": (
        "Configs this node gave up after create_attempts failed calls (handed over)."
    ),
    "rebalances": "Assignments this node wrote as the leader.",
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
    "fenced": "Times this node stopped all its instances because it could not renew in time.",
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
        "Times this node learned that Redis lost or rewound data (a restart, a failover, "
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

_NAMESPACE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LABELS = ("service", "node")


class _Histogram:
    """Bucket counts and a sum, kept by the collector (never in multiprocess files)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[index] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), float(running)))
        return out


class PrometheusMetrics:
    """Exposes one manager's state and events as Prometheus metrics.

    Registers itself with ``registry`` (``prometheus_client``'s default registry unless
    told otherwise; ``None`` registers nothing, for a caller that registers it) and
    subscribes to the manager's events. Build it before :meth:`dim.Manager.start`, so it
    hears the first election; it may be built at any time, counting from then on. It
    follows the manager across a stop and a start: the new node gets new series (its
    counters start at zero) and the old node's series stay, frozen, until :meth:`close`.

    Two collectors with the same ``namespace`` cannot share a registry (their names
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
    :raises ConfigError: ``namespace`` is not a valid metric name prefix.
    :raises ValueError: the registry already holds metrics with these names.
    """

    def __init__(
        self,
        manager: Manager,
        registry: Optional[CollectorRegistry] = REGISTRY,
        namespace: str = "dim",
    ) -> None:
        if not isinstance(manager, Manager):
            raise ConfigError(f"manager must be a dim.Manager, got {manager!r}", manager)
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(
                f"namespace must match [a-zA-Z_][a-zA-Z0-9_]*, got {namespace!r}", namespace
            )
        self.manager = manager
        self.namespace = namespace
        self._registry = registry
        self._lock = threading.Lock()
        self._closed = False
        self._nodes: list[str] = []  # every node heard from, in order
        self._counts: dict[tuple[str, str], float] = {}  # (counter name, node) -> count
        self._histograms: dict[tuple[str, str], _Histogram] = {}  # (name, node) -> data
        self._gained_at: dict[str, float] = {}  # node -> when it won, until its first write
        self._lost_at: dict[str, float] = {}  # node -> when Redis was lost, until restored
        # one bound method, kept: remove_listener compares by identity
        self._listener = self._on_event
        # registered first: if the names clash, no listener is left behind
        if registry is not None:
            registry.register(self)
        manager.add_listener(self._listener)

    def __repr__(self) -> str:
        with self._lock:
            nodes = len(self._nodes)
        state = "closed" if self._closed else "open"
        return (
            f"<PrometheusMetrics service={self.manager.service!r} "
            f"namespace={self.namespace!r} nodes={nodes} {state}>"
        )

    def close(self) -> None:
        """Stop listening and unregister from the registry; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.manager.remove_listener(self._listener)
        if self._registry is not None:
            try:
                self._registry.unregister(self)
            except KeyError:
                pass  # the caller unregistered it already

    # -- the listener (dim's event thread) ----------------------------------------------

    def _on_event(self, event: Event) -> None:
        node = event.node_id
        with self._lock:
            if node not in self._nodes:
                self._nodes.append(node)
            for name in EVENT_COUNTERS.get(event.type, ()):
                self._add(name, node, 1)
            if event.type is EventType.REBALANCE_APPLIED:
                for key, name in REBALANCE_COUNTS.items():
                    value = event.data.get(key)
                    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                        self._add(name, node, value)
                started = self._gained_at.pop(node, None)
                if started is not None:
                    self._observe("leader_takeover_seconds", node, event.time - started)
            elif event.type is EventType.LEADERSHIP_GAINED:
                self._gained_at[node] = event.time
            elif event.type is EventType.LEADERSHIP_LOST:
                self._gained_at.pop(node, None)  # lost before its first write: no sample
            elif event.type is EventType.REDIS_LOST:
                self._lost_at.setdefault(node, event.time)
            elif event.type is EventType.REDIS_RESTORED:
                started = self._lost_at.pop(node, None)
                if started is not None:
                    self._observe("redis_outage_seconds", node, event.time - started)

    def _add(self, name: str, node: str, amount: float) -> None:
        self._counts[name, node] = self._counts.get((name, node), 0.0) + amount

    def _observe(self, name: str, node: str, seconds: float) -> None:
        if seconds < 0:
            log.debug("%s: the wall clock stepped back; %.3f s not recorded", name, seconds)
            return
        histogram = self._histograms.get((name, node))
        if histogram is None:
            histogram = self._histograms[name, node] = _Histogram(HISTOGRAMS[name][1])
        histogram.observe(seconds)

    # -- the collector (the scraping thread) ----------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples (lets the registry check the names)."""
        return iter(self._build(with_samples=False))

    def collect(self) -> Iterator[Metric]:
        """The metric families with their samples, read now."""
        return iter(self._build(with_samples=True))

    def _build(self, with_samples: bool) -> list[Metric]:
        ns, service = self.namespace, self.manager.service
        instances = GaugeMetricFamily(
            f"{ns}_instances",
            "Instances running in this process now (the manager's instances).",
            labels=_LABELS,
        )
        leader = GaugeMetricFamily(
            f"{ns}_leader", "1 if this process leads its service now, else 0.", labels=_LABELS
        )
        counters = {
            name: CounterMetricFamily(f"{ns}_{name}", doc, labels=_LABELS)
            for name, doc in COUNTERS.items()
        }
        histograms = {
            name: HistogramMetricFamily(f"{ns}_{name}", doc, labels=_LABELS)
            for name, (doc, _) in HISTOGRAMS.items()
        }
        families: list[Metric] = [instances, leader, *counters.values(), *histograms.values()]
        if not with_samples:
            return families
        current = self._current()
        if current is not None:
            node, running, leads = current
            instances.add_metric([service, node], running)
            leader.add_metric([service, node], 1.0 if leads else 0.0)
        with self._lock:
            nodes = list(self._nodes)
            if current is not None and current[0] not in nodes:
                nodes.append(current[0])
            # every node has every series from the start (zero until an event), so
            # rate() and increase() see the first increment
            for node in nodes:
                for name, counter in counters.items():
                    counter.add_metric([service, node], self._counts.get((name, node), 0.0))
                for name, family in histograms.items():
                    data = self._histograms.get((name, node)) or _Histogram(HISTOGRAMS[name][1])
                    family.add_metric([service, node], data.buckets(), data.total)
        return families

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
