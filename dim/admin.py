"""Operate a cluster from outside it: status, deploy checks, pause, resume, drain and
rebalance.

:class:`Admin` is what the ``dim`` command's operator subcommands call; use it from a
deploy script, a runbook or a test. It joins nothing and runs no thread: each method is
one or a few plain Redis calls, made when you call it.

Reads (:meth:`Admin.status`, :meth:`Admin.configs`, :meth:`Admin.problems`,
:meth:`Admin.wait_drained`, :meth:`Admin.wait_settled`) need only the read-only ACL of
:doc:`connecting`; :meth:`Admin.pause`, :meth:`Admin.resume`, :meth:`Admin.drain`,
:meth:`Admin.undrain` and :meth:`Admin.rebalance` need the operator ACL. Each write goes
to the control hash (or the events channel) and wakes the leader with a ``control``
hint; the leader acts on its next plan, so a call returns before the cluster has
changed: wait for the outcome with :meth:`Admin.wait_drained`,
:meth:`Admin.wait_settled` or by polling :meth:`Admin.status`.

Errors from redis-py (an unreachable server, a refused login, a missing permission) pass
through unchanged, as they do from :meth:`dim.Manager.status`: the call is a plain
request that the caller made.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from types import TracebackType
from typing import Any, Callable, Optional, Union

import attrs
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from dim.configs import decode as decode_config
from dim.errors import ConfigError, StateError
from dim.keys import require_service
from dim.messages import Kind, Message
from dim.protocol import draining
from dim.status import ClusterStatus, NodeStatus, read_status
from dim.store import Client, Store
from dim.urls import check_url, client_from_url, close_client, safe_url

__all__ = ["Admin", "ConfigListing", "Move", "PublishedConfig", "connect", "moves_between"]

#: How often :meth:`Admin.wait_drained` reads the cluster.
POLL_INTERVAL = 0.2


def connect(url: str, timeout: float = 5.0) -> Client:
    """A client for ``url`` that fails fast (two quick retries) when Redis is away.

    This is the client :class:`Admin` makes from a URL (any form of :doc:`connecting`):
    an operator's call should say at once that Redis is unreachable rather than retry
    for long. A Redis Cluster's client asks for the cluster's layout when it is made,
    so it may raise :class:`redis.ConnectionError` already.

    :raises ConfigError: an unknown scheme, or a URL redis-py cannot read (the message
        hides its password).
    """
    try:
        return client_from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid Redis URL {safe_url(url)!r}: {exc}", url) from None


@attrs.frozen
class PublishedConfig:
    """One config as the leader published it, and where it runs.

    :ivar config_id: its id (int or str, as ``get_config`` gave it).
    :ivar assigned_to: the node the leader assigned it to, or None.
    :ivar claimed_by: the node holding its claim (running it), or None.
    :ivar config: its content, as ``get_config`` returned it.
    """

    config_id: Any
    assigned_to: Optional[str]
    claimed_by: Optional[str]
    config: Any


@attrs.frozen
class ConfigListing:
    """Every config the leader published, in config-key order, and the assignment
    version the placement was read at."""

    version: Optional[int]
    configs: list[PublishedConfig]


@attrs.frozen
class Move:
    """A config whose holder changed between two reads of the cluster.

    ``source`` None: it started; ``target`` None: it stopped; both set: it moved.
    """

    config_id: Any
    source: Optional[str]
    target: Optional[str]


def moves_between(before: ClusterStatus, after: ClusterStatus) -> list[Move]:
    """The configs whose holder (the node running it) differs between two reads, by
    config key; no I/O."""
    moves = []
    for config_id in sorted(set(before.configs) | set(after.configs), key=str):
        old = before.configs.get(config_id)
        new = after.configs.get(config_id)
        was = old.claimed_by if old else None
        now = new.claimed_by if new else None
        if was != now:
            moves.append(Move(config_id, was, now))
    return moves


class _Confirmation:
    """Settled twice, with a heartbeat of every node in between (see ``wait_settled``).

    Each poll reads the members' expiries (absolute, in the server's milliseconds)
    before the status: an expiry later than the one read just after the first settled
    status means a heartbeat came between the two status reads, so the second one holds
    a fresh running count. (Server times: no jitter of the reader's clock counts.)
    """

    def __init__(self, store: Store, min_nodes: int) -> None:
        self.store = store
        self.min_nodes = min_nodes
        self.first: Optional[dict[str, int]] = None  # node -> expiry after the first read

    def poll(self, read: Callable[[], ClusterStatus]) -> bool:
        before = self.store.members()[1]
        status = read()
        if status.problems(self.min_nodes):
            self.first = None
            return False
        live = {n.node_id for n in status.nodes}
        if self.first is None or set(self.first) != live:
            after = self.store.members()[1]
            self.first = {node: after.get(node, 0) for node in live}
            return False
        return all(before.get(node, 0) > end for node, end in self.first.items())


class Admin:
    """Look at and steer one service's cluster, from any process.

    :param redis: a URL (``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``,
        ``redis+cluster://``: see :doc:`connecting`), from which the admin makes a client
        that fails fast (see :func:`connect`) and closes it in :meth:`close`; or a
        ``redis.Redis`` / ``redis.cluster.RedisCluster`` client, which it uses as is and
        leaves open.
    :param service: the service name the managers use (required).
    :param socket_timeout: for a client made from a URL: how long one Redis call may
        take.
    :raises ConfigError: a bad URL, client or service name.
    :raises redis.ConnectionError: a ``redis+cluster://`` URL whose nodes do not answer
        (a cluster's client reads the cluster's layout when it is made).

    Example::

        from dim.admin import Admin

        with Admin("redis://redis.internal:6379/0", "feeds") as admin:
            node_id = admin.drain("web-3")  # a node id or a unique prefix of one
            if not admin.wait_drained(node_id, timeout=60):
                raise SystemExit(f"{node_id} still runs instances")
            ...  # maintenance on web-3's host
            admin.undrain(node_id)
    """

    def __init__(
        self,
        redis: Union[str, Client] = "redis://localhost:6379/0",
        service: Optional[str] = None,
        *,
        socket_timeout: float = 5.0,
    ) -> None:
        self.service = require_service(service)
        if isinstance(redis, str):
            check_url(redis)
            self._owned = True
            client: Client = connect(redis, timeout=socket_timeout)
        elif isinstance(redis, (Redis, RedisCluster)):
            self._owned = False
            client = redis
        else:
            raise ConfigError(
                f"redis must be a URL, a redis.Redis or a redis.cluster.RedisCluster client, "
                f"got {redis!r}",
                redis,
            )
        #: The Redis client this admin talks through.
        self.client: Client = client
        self._store = Store(client, self.service)

    def __repr__(self) -> str:
        return f"<Admin service={self.service!r}>"

    def __enter__(self) -> Admin:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the client made from a URL (a client passed in stays open); safe to call
        twice."""
        if self._owned:
            close_client(self.client)

    # -- reads ----------------------------------------------------------------------------

    def status(self) -> ClusterStatus:
        """The cluster as Redis sees it now: live nodes, leader, assignment, claims."""
        return read_status(self._store)

    def configs(self) -> ConfigListing:
        """Every config the leader published (its content, where it is assigned, who
        runs it), in config-key order."""
        status = self.status()
        stored = self._store.configs()
        rows = []
        for ckey in sorted(stored, key=lambda c: (len(c), c)):
            config = decode_config(ckey, stored[ckey])
            if config is None:
                continue  # foreign data: decode() logged it
            where = status.configs.get(config.id)
            rows.append(
                PublishedConfig(
                    config.id,
                    where.assigned_to if where else None,
                    where.claimed_by if where else None,
                    config.value,
                )
            )
        return ConfigListing(status.version, rows)

    def resolve(self, node: str, status: Optional[ClusterStatus] = None) -> str:
        """The id of the live node that ``node`` names: its id, or a unique prefix.

        :raises ConfigError: no live node, or more than one, matches (the message lists
            them; ``value`` is ``node``).
        """
        if not isinstance(node, str):
            raise ConfigError(f"node must be a node id (a str), got {node!r}", node)
        if status is None:
            status = self.status()
        ids = [n.node_id for n in status.nodes]
        if node in ids:
            return node
        matches = [n for n in ids if n.startswith(node)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ConfigError(f"{node!r} matches {len(matches)} nodes: {', '.join(matches)}", node)
        known = ", ".join(ids) or "none"
        raise ConfigError(
            f"no live node {node!r} in service {status.service!r} (nodes: {known})", node
        )

    def draining(self) -> set[str]:
        """The nodes being drained (live or not)."""
        return draining(self._store.control())

    def wait_drained(
        self, node_id: str, timeout: float, *, interval: float = POLL_INTERVAL
    ) -> bool:
        """Block until the node ``node_id`` runs nothing and is assigned nothing (or is
        no longer a member); False if it still does after ``timeout`` seconds.

        Rebalancing that is paused holds a drain, so this returns False then.
        """
        return self._wait(lambda: self._drained(node_id, self.status()), timeout, interval)

    def problems(self, min_nodes: int = 0) -> list[str]:
        """Why the cluster is not settled now, one line each (empty: it is); see
        :meth:`ClusterStatus.problems <dim.ClusterStatus.problems>` for the rule."""
        return self.status().problems(min_nodes)

    def wait_settled(
        self, timeout: float, *, min_nodes: int = 0, interval: float = POLL_INTERVAL
    ) -> bool:
        """Block until the cluster is settled: a leader, at least ``min_nodes`` live
        nodes, and every config running where it is assigned (see
        :meth:`ClusterStatus.problems <dim.ClusterStatus.problems>`); False if it is not
        after ``timeout`` seconds (:meth:`problems` says why).

        A deploy script calls it between two restarts::

            with Admin(url, "feeds") as admin:
                for host in hosts:
                    restart(host)
                    if not admin.wait_settled(120, min_nodes=len(hosts)):
                        raise SystemExit(f"not settled: {admin.problems(len(hosts))}")

        A node reports how many instances it runs with its heartbeat, so one read may
        see a count that is one heartbeat old (a config just claimed, not running yet,
        hidden by one that just left). So settled means: settled in a read, and again in
        a later read after every node of the first one has sent a heartbeat since.
        """
        confirm = _Confirmation(self._store, min_nodes)
        return self._wait(lambda: confirm.poll(self.status), timeout, interval)

    # -- writes (the operator ACL) --------------------------------------------------------

    def pause(self) -> None:
        """Stop all rebalancing until :meth:`resume`.

        The leader changes no assignment: instances keep running where they are and an
        unhealthy one is still recreated in place, but the configs of a node that stops
        or dies run nowhere, and new configs are not placed.
        """
        self._store.set_paused(True, self._hint())

    def resume(self) -> None:
        """End a :meth:`pause`: the leader re-plans everything at once."""
        self._store.set_paused(False, self._hint())

    def drain(self, node: str, undo: bool = False) -> str:
        """Move every config off one live node, which stays a member with nothing to run
        until it stops or :meth:`undrain`; with ``undo``, the same as :meth:`undrain`.

        :param node: a live node's id, or a unique prefix of one (for ``undo``, also the
            exact id of a drained node that is no longer live).
        :returns: the node id.
        :raises ConfigError: ``node`` names no live node, or several (see
            :meth:`resolve`).
        """
        if undo and isinstance(node, str) and node in self.draining():
            node_id = node
        else:
            node_id = self.resolve(node)
        self._store.set_draining(node_id, not undo, self._hint())
        return node_id

    def undrain(self, node: str) -> str:
        """Let a drained node take configs again; returns its id (see :meth:`drain`)."""
        return self.drain(node, undo=True)

    def rebalance(self) -> ClusterStatus:
        """Ask the leader to call ``get_config`` and re-plan now, rather than at its next
        config poll; only what is unbalanced or changed moves.

        :returns: the cluster as read just before asking: its ``leader`` is the node
            asked, and ``paused`` says whether anything will move.
        :raises StateError: the service has no leader (no live node).
        """
        status = self.status()
        if status.leader is None:
            raise StateError(f"service {self.service!r} has no leader (no live node?)")
        self._store.publish(self._hint())
        return status

    # -- internals ------------------------------------------------------------------------

    def _wait(self, done: Callable[[], bool], timeout: float, interval: float) -> bool:
        """Read the status every ``interval`` until ``done`` says so (True) or ``timeout``
        seconds have passed (False); always reads at least once.

        A connection error or timeout (a failover, a restart) is retried until the
        deadline, and raised if the last read failed so.
        """
        deadline = time.monotonic() + timeout
        pause = threading.Event()  # never set: the poll interval
        while True:
            failure: Optional[RedisError] = None
            try:
                if done():
                    return True
            except (RedisConnectionError, RedisTimeoutError) as exc:
                failure = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if failure is not None:
                    raise failure
                return False
            pause.wait(min(interval, remaining))

    @staticmethod
    def _drained(node_id: str, status: ClusterStatus) -> bool:
        node: Optional[NodeStatus] = next((n for n in status.nodes if n.node_id == node_id), None)
        return node is None or (node.assigned == 0 and node.running == 0)

    def _hint(self) -> Message:
        """The ``control`` hint that wakes the leader after an operator's write."""
        return Message(Kind.CONTROL, f"admin-{socket.gethostname()}-{os.getpid()}")
