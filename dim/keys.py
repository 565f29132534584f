"""Every Redis key and channel name dim uses, in one place.

All names of a service start with ``dim:{<service>}:``. The braces are a Redis Cluster
hash tag: every key of one service lives in one slot, so one Lua script may touch them
all.
"""

from __future__ import annotations

import re

import attrs

from dim.errors import ConfigError

_SERVICE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def check_service(service: object) -> str:
    """Return ``service`` if it is a usable service name, else raise ConfigError."""
    if not isinstance(service, str) or not _SERVICE_RE.match(service):
        raise ConfigError(
            f"service must be 1-100 characters of letters, digits, '_', '.' or '-', "
            f"got {service!r}",
            service,
        )
    return service


def require_service(service: object) -> str:
    """:func:`check_service`, and a clear error when there is none: the name has no
    default, because two applications that left it out would join one cluster on a
    shared Redis and run each other's configs."""
    if service is None:
        raise ConfigError(
            "service is required: it names the cluster this process joins (every process "
            "of one service shares its configs); give each application its own, e.g. "
            "service='feeds'",
            service,
        )
    return check_service(service)


def check_node_name(name: object) -> str:
    """Return ``name`` if it is a usable static node name, else raise ConfigError."""
    if not isinstance(name, str) or not _SERVICE_RE.match(name):
        raise ConfigError(
            f"node_name must be 1-100 characters of letters, digits, '_', '.' or '-', got {name!r}",
            name,
        )
    return name


@attrs.frozen
class Keys:
    """The key names of one service."""

    service: str

    @property
    def prefix(self) -> str:
        return f"dim:{{{self.service}}}:"

    @property
    def nodes(self) -> str:
        """ZSET of live node ids, scored by expiry (ms, Redis server time)."""
        return self.prefix + "nodes"

    def node(self, node_id: str) -> str:
        """HASH of one node's description (host, pid, weight...), expiring with it."""
        return f"{self.prefix}node:{node_id}"

    @property
    def leader(self) -> str:
        """STRING ``<node id>:<epoch>`` with a TTL: who leads now."""
        return self.prefix + "leader"

    @property
    def fence(self) -> str:
        """STRING counter: every epoch and every claim token takes its next value."""
        return self.prefix + "fence"

    @property
    def era(self) -> str:
        """STRING the run id of the Redis server that holds the data: another one (a
        restart, a failover) means the data may have been lost or rewound."""
        return self.prefix + "era"

    @property
    def reset(self) -> str:
        """STRING ``<why> <server ms>`` with a TTL: a reset window is open (no new claims;
        nodes take theirs back) after Redis lost or rewound data."""
        return self.prefix + "reset"

    @property
    def assignment(self) -> str:
        """HASH config key -> node id: the desired placement, written by the leader."""
        return self.prefix + "assignment"

    def desired(self, node_id: str) -> str:
        """SET of the config keys assigned to one node."""
        return f"{self.prefix}desired:{node_id}"

    @property
    def configs(self) -> str:
        """HASH config key -> canonical JSON ``[id, config]``."""
        return self.prefix + "configs"

    @property
    def version(self) -> str:
        """STRING assignment version: a new fence value on every leader write."""
        return self.prefix + "version"

    @property
    def shares(self) -> str:
        """HASH node id -> the version of its desired set: the assignment version of the
        last leader write that changed it (or first placed the node)."""
        return self.prefix + "shares"

    @property
    def deltas(self) -> str:
        """HASH node id -> JSON of the last leader write to its desired set: the share
        version before and after, the configs added, removed and changed."""
        return self.prefix + "deltas"

    def claim(self, ckey: str) -> str:
        """STRING ``<node id>:<token>`` with a TTL: who may run that config now."""
        return f"{self.prefix}claim:{ckey}"

    @property
    def failures(self) -> str:
        """HASH ``<node id> <config key>`` -> expiry (ms): nodes that gave up a config."""
        return self.prefix + "failures"

    @property
    def left(self) -> str:
        """ZSET of nodes that left, scored by when their tombstone expires (ms)."""
        return self.prefix + "left"

    @property
    def unplaced(self) -> str:
        """HASH config key -> why no live node may take it now (tags, capacity)."""
        return self.prefix + "unplaced"

    @property
    def control(self) -> str:
        """HASH of operator controls: ``paused`` -> '1' while rebalancing is paused;
        ``drain <node id>`` -> when it was asked, for each node being drained."""
        return self.prefix + "control"

    @property
    def events(self) -> str:
        """Pub/sub channel for hints to every node (never the truth)."""
        return self.prefix + "events"

    def inbox(self, node_id: str) -> str:
        """Pub/sub channel for hints to one node: what concerns it alone."""
        return f"{self.prefix}events:{node_id}"
