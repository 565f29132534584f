"""A read-only view of one service's cluster, for ``Manager.status()`` and the CLI."""

from __future__ import annotations

import time
from typing import Any, Optional

import attrs

from dim.configs import decode
from dim.constraints import parse_capacity, parse_tags, parse_weight
from dim.protocol import draining, parse_health, parse_owner, paused
from dim.store import Store


@attrs.frozen
class NodeStatus:
    """One member as Redis sees it."""

    node_id: str
    host: Optional[str]
    pid: Optional[int]
    weight: float
    started: Optional[float]
    expires_in: float  # seconds until its membership lapses without a heartbeat
    library_version: Optional[str]
    assigned: int  # configs the leader placed here
    running: int  # claims this node holds
    draining: bool = False  # an operator is moving everything off it (``dim drain``)
    unhealthy: int = 0  # configs being recreated after a failed health check (last beat)
    tags: tuple[str, ...] = ()  # its labels (``Manager(tags=...)``)
    capacity: Optional[int] = None  # the most instances it runs (None: no limit)
    # instances it runs, by its own count at its last heartbeat (None: not reported);
    # fewer than ``running`` while some are being created (or their create fails)
    instances: Optional[int] = None


@attrs.frozen
class ConfigStatus:
    """One config: where it should run and who holds its claim."""

    config_id: Any
    assigned_to: Optional[str]
    claimed_by: Optional[str]
    token: Optional[int]
    waiting: Optional[str] = None  # why no live node may take it (tags, capacity)

    @property
    def settled(self) -> bool:
        """Running where it is assigned."""
        return self.assigned_to is not None and self.assigned_to == self.claimed_by


@attrs.frozen
class ClusterStatus:
    """The cluster of one service, read from Redis in one go.

    :ivar leader: the leader's node id, or None.
    :ivar epoch: the leader's epoch, or None.
    :ivar version: the assignment version.
    :ivar nodes: live members.
    :ivar configs: every config the leader published, by config id.
    :ivar local: this node's instances (state, token, health), when read by a manager.
    :ivar paused: rebalancing is paused (``dim pause``): nothing moves until ``dim resume``.
    """

    service: str
    leader: Optional[str]
    epoch: Optional[int]
    version: Optional[int]
    nodes: list[NodeStatus]
    configs: dict[Any, ConfigStatus]
    local: dict[Any, dict[str, Any]] = attrs.field(factory=dict)
    node_id: Optional[str] = None
    paused: bool = False  # rebalancing paused by an operator (``dim pause``)

    @property
    def not_running(self) -> list[Any]:
        """Configs whose claim nobody holds."""
        return [c.config_id for c in self.configs.values() if c.claimed_by is None]

    @property
    def unplaceable(self) -> dict[Any, str]:
        """Configs no live node may take now, with the reason (required tags, capacity)."""
        return {c.config_id: c.waiting for c in self.configs.values() if c.waiting}

    @property
    def pending(self) -> list[Any]:
        """Configs not (yet) running where they are assigned: handoffs in progress."""
        return [c.config_id for c in self.configs.values() if not c.settled]

    @property
    def settled(self) -> bool:
        """No :meth:`problems` (with ``min_nodes`` 0)."""
        return not self.problems()

    def problems(self, min_nodes: int = 0) -> list[str]:
        """Why the cluster is not settled, one line each; empty when it is.

        Settled means: a leader, at least ``min_nodes`` live nodes, an assignment
        published, and every published config running on the live node it is assigned
        to. So each of these is a problem: no live node, no leader, a config that cannot
        be placed (tags, capacity), one whose claim nobody holds, one held by a node that
        is no longer live, a handoff in progress (held by one node, assigned to another),
        and a node that holds claims for instances it has not started (being created, or
        ``create`` failing). A pause is not a problem by itself; when something else is,
        the last line says that rebalancing is paused.

        Balance is not part of it: a node that just joined may run nothing until the
        leader's next rebalance (``rebalance_delay``), and the cluster is settled
        meanwhile. The node counts come from each node's last heartbeat, so a config
        that has just started may count as not running for one ``heartbeat_interval``.
        """
        return _problems(self, min_nodes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "service": self.service,
            "node_id": self.node_id,
            "leader": self.leader,
            "epoch": self.epoch,
            "version": self.version,
            "paused": self.paused,
            "nodes": [attrs.asdict(n) for n in self.nodes],
            "configs": [attrs.asdict(c) for c in self.configs.values()],
            "not_running": self.not_running,
            "pending": self.pending,
            "unplaceable": {str(k): v for k, v in self.unplaceable.items()},
            "problems": self.problems(),
            "local": [{"config_id": k, **v} for k, v in self.local.items()],
        }


#: Configs named in one problem line; the rest are counted.
MAX_NAMED = 10


def _problems(status: ClusterStatus, min_nodes: int) -> list[str]:
    found = []
    live = {n.node_id for n in status.nodes}
    if not live:
        found.append("no live nodes")
    elif status.leader is None:
        found.append("no leader")
    if live and len(live) < min_nodes:
        found.append(f"{len(live)} live nodes, expected at least {min_nodes}")
    if status.leader is not None and status.version is None:
        found.append("the leader has not published an assignment yet")
    unplaceable, nowhere, gone, handoffs = [], [], [], []
    for c in status.configs.values():
        if c.waiting:
            unplaceable.append(f"{c.config_id} ({c.waiting})")
        elif c.claimed_by is None:
            nowhere.append(str(c.config_id))
        elif c.claimed_by not in live:
            gone.append(
                f"{c.config_id} (held by {c.claimed_by}, assigned to {c.assigned_to or 'nobody'})"
            )
        elif c.claimed_by != c.assigned_to:
            handoffs.append(
                f"{c.config_id} (held by {c.claimed_by}, assigned to {c.assigned_to or 'nobody'})"
            )
    for items, one, many in (
        (unplaceable, "config cannot be placed", "configs cannot be placed"),
        (nowhere, "config runs nowhere", "configs run nowhere"),
        (gone, "config is held by a node that is gone", "configs are held by nodes that are gone"),
        (handoffs, "handoff pending", "handoffs pending"),
    ):
        if items:
            found.append(f"{len(items)} {one if len(items) == 1 else many}: {_named(items)}")
    for n in status.nodes:
        # claims it holds for configs assigned to it; an instance it hands off is no
        # longer counted as running by the node, and is a pending handoff above
        held = sum(1 for c in status.configs.values() if c.claimed_by == n.node_id == c.assigned_to)
        if n.instances is not None and n.instances < held:
            found.append(
                f"node {n.node_id} runs {n.instances} of the {held} instances it holds "
                "claims for (being created, or create failing: see its log)"
            )
    if found and status.paused:
        found.append("rebalancing is paused: nothing moves until 'dim resume'")
    return found


def _named(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED])
    if len(items) > MAX_NAMED:
        shown += f", ... ({len(items) - MAX_NAMED} more)"
    return shown


def read_status(store: Store) -> ClusterStatus:
    """Read the cluster view; only reads, so a read-only Redis user may call it."""
    now_ms, members = store.members()
    live = sorted(n for n, expiry in members.items() if expiry > now_ms)
    infos = store.node_infos(live)
    leader = parse_owner(store.leader())
    version_text = store.version()
    assignment = store.assignment()
    stored = store.configs()
    holders = store.claims(sorted(stored))
    control = store.control()
    waiting = store.unplaced()
    drained = draining(control)
    configs: dict[Any, ConfigStatus] = {}
    assigned_count: dict[str, int] = {}
    running_count: dict[str, int] = {}
    for ckey in sorted(stored):
        config = decode(ckey, stored[ckey])
        if config is None:
            continue
        holder = holders.get(ckey)
        target = assignment.get(ckey)
        if target is not None:
            assigned_count[target] = assigned_count.get(target, 0) + 1
        if holder is not None:
            running_count[holder[0]] = running_count.get(holder[0], 0) + 1
        configs[config.id] = ConfigStatus(
            config.id,
            target,
            holder[0] if holder else None,
            holder[1] if holder else None,
            waiting.get(ckey),
        )
    nodes = []
    for node_id in live:
        info = infos.get(node_id, {})
        nodes.append(
            NodeStatus(
                node_id=node_id,
                host=info.get("host"),
                pid=_int(info.get("pid")),
                weight=parse_weight(info.get("weight")),  # the weight the leader uses
                started=_float(info.get("started"), None),
                expires_in=(members[node_id] - now_ms) / 1000.0,
                library_version=info.get("version"),
                assigned=assigned_count.get(node_id, 0),
                running=running_count.get(node_id, 0),
                draining=node_id in drained,
                unhealthy=parse_health(info.get("health"))[1],
                instances=_instances(info.get("health")),
                tags=tuple(sorted(parse_tags(info.get("tags")))),
                capacity=parse_capacity(info.get("capacity")),
            )
        )
    return ClusterStatus(
        service=store.keys.service,
        leader=leader[0] if leader else None,
        epoch=leader[1] if leader else None,
        version=_int(version_text),
        nodes=nodes,
        configs=configs,
        paused=paused(control),
    )


def _instances(health: Optional[str]) -> Optional[int]:
    """The running count from a node's health field; None if it has none (yet)."""
    parts = (health or "").split()
    well_formed = len(parts) == 2 and all(p.isascii() and p.isdigit() for p in parts)
    return parse_health(health)[0] if well_formed else None


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: Optional[str], default: Any) -> Any:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


def age(started: Optional[float]) -> Optional[float]:
    return None if started is None else max(0.0, time.time() - started)
