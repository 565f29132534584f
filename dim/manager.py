"""The Manager: lifecycle, wiring of the loops, public properties."""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import attrs
import redis
from redis.cluster import RedisCluster

from dim import connection, runtime
from dim.configs import KeyFunc
from dim.constraints import Rule, Rules, check_capacity, check_tags
from dim.era import Era
from dim.errors import ConfigError, ForkedError, RedisUnavailableError, StateError
from dim.events import Dispatcher, Event, EventType, Listener
from dim.health import HealthLoop
from dim.instances import UserCallbacks
from dim.keys import check_node_name, require_service
from dim.leader import LeaderLoop
from dim.listener import HintListener
from dim.logs import fields
from dim.messages import Kind, Message
from dim.node import Node
from dim.reconciler import Reconciler
from dim.settings import Settings
from dim.slots import Lease
from dim.status import ClusterStatus, read_status
from dim.store import Client, Store, redis_from

log = logging.getLogger(__name__)

# started managers, until they stop: held strongly, so that a manager the application
# kept only in a local variable is still stopped by the exit hook
_live_managers: set[Manager] = set()
# how many times stop() runs the rest of an interrupted leave when interrupted again (a
# user pressing Ctrl-C over and over: each pass takes a few round trips)
_HURRIED_PASSES = 3


def _check_callable(name: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    if not callable(value):
        raise ConfigError(f"{name} must be callable, got {value!r}", value)


class Manager:
    """Runs this process's share of the configured instances of one service.

    Each config returned by ``get_config`` runs in exactly one process of the cluster
    (all managers with the same ``service`` on the same Redis). The manager creates the
    instances assigned to this process with ``create``, checks them with
    ``healthcheck``, and stops them with ``disconnect`` when they move away, fail, or the
    manager stops.

    Example::

        manager = Manager(
            get_config=lambda: [{"id": 1, "url": "wss://a"}, {"id": 2, "url": "wss://b"}],
            create=lambda config: Client(config["url"]),
            healthcheck=lambda client: client.ping(),
            disconnect=lambda client: client.close(),
            redis="redis://localhost:6379/0",
            service="example",
        ).start()
        ...
        manager.stop()

    :param get_config: returns the list of configs (called on the leader only, every
        ``config_interval`` and on :meth:`refresh`). A config is a JSON-serialisable
        mapping with an ``id`` (int or str), or a bare int/str.
    :param create: builds and returns the running instance for one config; must not
        return None. Raising (or timing out) is retried with backoff.
    :param healthcheck: optional; raising or returning ``False`` marks the instance
        unhealthy (it is then disconnected and created again).
    :param disconnect: optional; stops an instance.
    :param redis: a URL (``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``
        or ``redis+cluster://``: see :doc:`connecting`), a ``redis.Redis``, or a
        ``redis.cluster.RedisCluster`` (see :doc:`cluster`). A client you pass is used as
        is: give it a ``socket_timeout`` shorter than ``heartbeat_interval`` so a stalled
        server cannot hold up dim's loops.
    :param service: the cluster's name (required); managers with different names never
        interact.
    :param settings: timing and retry :class:`Settings`.
    :param key: reads the id of a config (default: ``config["id"]``, or the bare value).
    :param weight: this node's share relative to others (default 1.0).
    :param node_name: a static identity, kept across restarts (default: a new random id
        per start). Only one live process may use a name: ``start()`` waits up to
        ``node_ttl`` for a previous holder to go, then raises :class:`StateError`. With
        ``settings.rejoin_grace``, a node that comes back under its name within the
        grace gets its configs back; they do not move elsewhere meanwhile.
    :param tags: labels of this node (``{"eu", "gpu"}``); a config that requires tags
        runs only on a node that has them all.
    :param capacity: the most instances this node runs (default: no limit).
    :param requires: which tags a config requires: the name of a field of the config
        mapping holding a list of tags, or a callable ``config -> iterable of tags``.
        A config no live node may take is reported (``dim status``), not dropped.
    :param priority: when capacity is short, which configs run first: a field name or a
        callable ``config -> int`` (higher first; default 0).
    """

    def __init__(
        self,
        get_config: Callable[[], Any],
        create: Callable[[Any], Any],
        healthcheck: Optional[Callable[[Any], Any]] = None,
        disconnect: Optional[Callable[[Any], Any]] = None,
        *,
        redis: Union[str, redis.Redis, RedisCluster] = "redis://localhost:6379/0",
        service: Optional[str] = None,
        settings: Optional[Settings] = None,
        key: Optional[KeyFunc] = None,
        weight: float = 1.0,
        node_name: Optional[str] = None,
        tags: Iterable[str] = (),
        capacity: Optional[int] = None,
        requires: Rule = None,
        priority: Rule = None,
    ) -> None:
        _check_callable("get_config", get_config, optional=False)
        _check_callable("create", create, optional=False)
        _check_callable("healthcheck", healthcheck, optional=True)
        _check_callable("disconnect", disconnect, optional=True)
        _check_callable("key", key, optional=True)
        import redis as redis_module

        if not isinstance(redis, (str, redis_module.Redis, RedisCluster)):
            raise ConfigError(
                f"redis must be a URL, a redis.Redis or a redis.cluster.RedisCluster client, "
                f"got {redis!r}",
                redis,
            )
        if isinstance(redis, str):
            connection.check_url(redis)
        if settings is None:
            settings = Settings()
        if not isinstance(settings, Settings):
            raise ConfigError(f"settings must be a dim.Settings, got {settings!r}", settings)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise ConfigError(f"weight must be a positive number, got {weight!r}", weight)
        self.service = require_service(service)
        self._node_name = None if node_name is None else check_node_name(node_name)
        self._tags = check_tags(tags)
        self._capacity = check_capacity(capacity)
        self._rules = Rules(requires, priority)
        self.settings = settings
        self._redis_target = redis
        self._callbacks = UserCallbacks(
            create=create, disconnect=disconnect, healthcheck=healthcheck
        )
        self._get_config = get_config
        self._key = key
        self._weight = float(weight)
        self._dispatcher = Dispatcher()
        self._lock = threading.RLock()
        self._node: Optional[Node] = None
        # the node's reconciler and leader loop, as built here (the node knows them only
        # through dim.roles)
        self._parts: Optional[tuple[Reconciler, LeaderLoop]] = None
        self._client: Optional[Client] = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        node = self._node
        if node is None:
            return f"<Manager service={self.service!r} stopped>"
        return (
            f"<Manager service={self.service!r} node={node.node_id} leader={node.is_leader} "
            f"instances={len(node.reconciler.table.instances())}>"
        )

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Manager:
        """Join the cluster and start the background threads; returns ``self``.

        Non-blocking beyond the first round trip to Redis. Calling it on a running
        manager does nothing. After :meth:`stop` it joins again as a new node.

        If it cannot start its threads (the process is at its thread limit, or a signal
        handler raised), it leaves again and raises that error.

        :raises RedisUnavailableError: Redis cannot be reached within
            ``settings.connect_timeout``, or refuses the login or the commands dim needs.
        :raises ConfigError: this process cannot run dim's threads: gevent or eventlet
            monkey-patched it, or uWSGI runs without ``enable-threads`` (or without
            ``lazy-apps``, in its master) (:mod:`dim.runtime`).
        """
        with self._lock:
            self._check_fork()
            if self._node is not None:
                return self
            runtime.check()  # real threads, or a clear error (gevent, uWSGI)
            self._pid = os.getpid()  # a manager built before a fork may start after it
            client = connection.connect(self._redis_target, self.settings)
            # (now, on the connection just made: later it would cost a new one; one
            # round trip before the join, bounded like every call by socket_timeout)
            policy = connection.eviction_policy(client)
            store = Store(client, self.service, self._era(client))
            node = Node(
                store=store,
                settings=self.settings,
                dispatcher=self._dispatcher,
                weight=self._weight,
                node_id=self._node_name,
                tags=self._tags,
                capacity=self._capacity,
            )
            reconciler = Reconciler(node, self._callbacks)
            leader = LeaderLoop(node, self._get_config, self._key, self._rules)
            node.reconciler, node.leader = reconciler, leader
            node.listener = HintListener(node)
            if self._callbacks.healthcheck is not None:
                node.health = HealthLoop(node, self._callbacks.healthcheck)
            try:
                self._first_beat(node)
            except BaseException:
                # the beat may have run on the server though its reply was lost: take
                # the membership back out rather than leave a ghost for node_ttl
                try:
                    store.leave(node.node_id, node.session, Message(Kind.LEFT, node.node_id))
                except redis.RedisError:
                    log.debug("could not undo a failed join", exc_info=True)
                self._close_client(client)
                raise
            # visible before any thread runs, so create() can already read its lease
            self._node = node
            self._parts = (reconciler, leader)
            self._client = client
            _live_managers.add(self)  # from here on, the exit hooks stop it
            try:
                self._dispatcher.start(f"dim-events-{node.node_id}")
                # the listener first: the reconciler's first read waits for its
                # subscription
                for loop in sorted(node.loops(), key=lambda loop: loop is not node.listener):
                    loop.start()
            except BaseException:
                # out of threads, or a signal handler raised: a member without all its
                # loops would be assigned configs and run none; leave again
                self._hurried_leave(node)
                raise
            # (the first heartbeat announced us: a JOINED hint, from the script itself)
            # a warning only, logged once the threads run (a handler may be slow)
            connection.warn_eviction(policy, self._describe_target())
            log.info(
                "node %s joined service %r", node.node_id, self.service, extra=fields(node.node_id)
            )
            return self

    def _first_beat(self, node: Node) -> None:
        """Join with the first heartbeat; a static name still held by another process is
        waited for (a crashed predecessor lapses within ``node_ttl``), then refused."""
        s = self.settings
        deadline = node.clock() + s.node_ttl + 2 * s.heartbeat_interval
        pause = threading.Event()  # never set: the retry interval
        while True:
            try:
                node.heartbeat.beat()
            except redis.RedisError as exc:
                raise RedisUnavailableError(
                    f"Redis at {self._describe_target()} refused dim's first heartbeat: {exc}"
                ) from exc
            if not node.name_taken:
                return
            if node.clock() >= deadline:
                holder = node.store.node_infos([node.node_id]).get(node.node_id, {})
                raise StateError(
                    f"node_name {node.node_id!r} is in use by another live process of "
                    f"service {self.service!r} (host {holder.get('host', '?')}, pid "
                    f"{holder.get('pid', '?')}); give each process its own name"
                )
            pause.wait(s.heartbeat_interval)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Leave the cluster gracefully; safe to call twice.

        Order matters for speed: the node leaves the membership and hands over leadership
        first, so the rest of the cluster rebalances while this node disconnects its
        instances; each claim is released (and announced) the moment its instance is
        disconnected, so the new owner starts at once. Only then are the threads joined.

        It returns within ``settings.stop_timeout`` (``disconnect_timeout`` plus one
        second), plus at most ``max(1 s, 2 heartbeats)`` for dim's threads to end and
        one second for the event listeners, plus a few Redis round trips, whatever the
        callbacks do: every disconnect starts at once, one that overruns its budget is
        reported (``DISCONNECT_TIMEOUT``) and left behind, and neither ``get_config``
        nor a ``healthcheck`` is waited for. One exception: a disconnect that still gets
        no thread at the deadline (the process is at its thread limit) runs where it is,
        without a time limit, and is waited for, rather than not run at all.

        Interrupted by an exception (a signal handler's ``SystemExit``, a second Ctrl-C),
        it still leaves, waiting for no more disconnects, then lets the exception go on.

        :param timeout: how long to wait for the disconnects (default:
            ``settings.stop_timeout``).
        """
        if os.getpid() != self._pid:
            # a forked child must not touch its parent's cluster state, nor wait on a
            # lock the fork may have copied in its held state
            return
        with self._lock:
            node = self._node
            if node is None:
                return
            assert self._parts is not None
            try:
                self._leave(node, *self._parts, timeout)
                self._node = None
                self._parts = None
            except BaseException as exc:
                # interrupted: a signal handler raised here (a second SIGTERM or Ctrl-C).
                # Half stopped, the node would stay a member that claims nothing (what it
                # is assigned runs nowhere) and keep its threads: finish leaving, waiting
                # for no disconnect (as with timeout=0), then let the exception go on
                self._hurried_leave(node)
                log.warning(
                    "stop() of node %s was interrupted (%r): it left without waiting for "
                    "its disconnects",
                    node.node_id,
                    exc,
                    extra=fields(node.node_id),
                )
                raise

    def _hurried_leave(self, node: Node) -> None:
        """The rest of a leave that an exception cut short, waiting for no disconnect and
        with no final rebalance; again if a signal handler raises in it too (at most
        :data:`_HURRIED_PASSES` times: then that exception goes on, and the manager stays
        started, so that stop() or the exit hooks try once more)."""
        for passes_left in range(_HURRIED_PASSES - 1, -1, -1):
            parts = self._parts
            if self._node is not node or parts is None:
                return  # a stop() in the signal handler itself (the lock is reentrant)
            try:
                self._leave(node, *parts, 0.0, hurry=True)
            except BaseException:
                if not passes_left:
                    raise
                continue
            self._node = None
            self._parts = None
            return

    def _leave(
        self,
        node: Node,
        reconciler: Reconciler,
        leader: LeaderLoop,
        timeout: Optional[float],
        hurry: bool = False,
    ) -> None:
        """The steps of a graceful stop; each may run twice (``hurry``: again, after an
        interruption, and with no final rebalance: the next leader places our configs)."""
        # no new claims from here on: the final rebalance may not hand us anything
        reconciler.begin_close()
        s = self.settings
        wait = s.stop_timeout if timeout is None else timeout
        store = node.store
        if node.is_leader and not hurry and not (node.static and s.rejoin_grace):
            # (a static node with a rejoin grace keeps its configs for its restart)
            try:
                leader.final_rebalance()
            except Exception:
                log.warning(
                    "final rebalance before stepping down failed",
                    exc_info=True,
                    extra=fields(node.node_id),
                )
        # under claims_lock: no heartbeat is in flight, and every later one renews
        # claims only (no membership, no leadership)
        with node.reconciler.claims_lock:
            node.leaving = True
        leader_value = node.leader_value
        try:
            if not store.leave(node.node_id, node.session, Message(Kind.LEFT, node.node_id)):
                log.warning(
                    "node id %s belongs to another process by now: its membership stays",
                    node.node_id,
                    extra=fields(node.node_id),
                )
            if leader_value is not None:
                store.resign(leader_value, Message(Kind.LEADER_LEFT, node.node_id))
        except redis.RedisError as exc:
            # the cluster notices by TTL instead; the claims are still released below
            log.warning(
                "node %s could not announce that it leaves: %r",
                node.node_id,
                exc,
                extra=fields(node.node_id),
            )
        node.set_leader(None)
        reconciler.close(wait)
        node.stop_event.set()
        node.wake_all()
        # one deadline for all of them: a loop stuck in user code (a placement rule, a
        # log handler) costs that once, not once per loop
        joined_by = node.clock() + max(1.0, s.heartbeat_interval * 2)
        for loop in node.loops():
            loop.join(max(0.0, joined_by - node.clock()))
        leader.close()
        try:
            # a tombstone outlives any request of ours still queued in a stalled server
            store.forget(node.node_id, tombstone=max(60.0, 10 * s.node_ttl), session=node.session)
        except redis.RedisError as exc:
            log.warning(
                "node %s could not clear its traces (they expire): %r",
                node.node_id,
                exc,
                extra=fields(node.node_id),
            )
        if isinstance(node.listener, HintListener):
            node.listener.close()
        self._dispatcher.stop(timeout=1.0)
        self._dispatcher = _fresh_dispatcher(self._dispatcher)
        self._close_client(self._client)
        self._client = None
        _live_managers.discard(self)
        log.info("node %s left service %r", node.node_id, self.service, extra=fields(node.node_id))

    def __enter__(self) -> Manager:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- public views ---------------------------------------------------------------------

    @property
    def node_id(self) -> Optional[str]:
        """This node's id while started (new for every start), else None."""
        node = self._node
        return node.node_id if node is not None else None

    @property
    def is_leader(self) -> bool:
        node = self._running_node(required=False)
        return node is not None and node.is_leader

    @property
    def instances(self) -> dict[Any, Any]:
        """Snapshot ``{config_id: instance}`` of what runs in this process now."""
        node = self._running_node(required=False)
        return node.reconciler.table.instances() if node is not None else {}

    @property
    def leases(self) -> dict[Any, Lease]:
        """Snapshot ``{config_id: Lease}`` of the claims this process holds now."""
        node = self._running_node(required=False)
        return node.reconciler.table.leases(node.node_id) if node is not None else {}

    def lease(self, config_id: Any) -> Optional[Lease]:
        """The lease (with its fencing token) of one config held here, or None.

        Available from the moment the claim is taken, so ``create`` may call it for the
        instance it is building, and pass the token to the system it drives.
        """
        return self.leases.get(config_id)

    def status(self) -> ClusterStatus:
        """The cluster as Redis sees it now, plus this node's local instance states."""
        node = self._running_node(required=False)
        if node is not None:
            view = read_status(node.store)
            local = node.reconciler.table.local_view()
            return attrs.evolve(view, local=local, node_id=node.node_id)
        client = redis_from(self._redis_target, self.settings.socket_timeout)
        try:
            return read_status(Store(client, self.service))
        finally:
            if client is not self._redis_target:
                self._close_client(client)

    def wait_until_stable(self, timeout: float = 10.0) -> bool:
        """Block until this node runs exactly what it is assigned and its claims have
        their lease (protocol.rst §6); False on timeout."""
        self._running_node(required=True)
        parts = self._parts
        return parts is not None and parts[0].wait_until_stable(timeout)

    def refresh(self) -> None:
        """Ask the leader to call ``get_config`` now rather than at its next interval."""
        node = self._running_node(required=True)
        assert node is not None
        if node.is_leader:
            node.leader.request_refresh()
        else:
            node.store.publish(Message(Kind.REFRESH, node.node_id))

    def add_listener(self, callback: Listener, *types: EventType) -> Listener:
        """Call ``callback(event)`` for events of these types (all if none given).

        Listeners run on one dedicated thread in event order; one that raises is logged
        and ignored. Returns ``callback`` so it can serve as a decorator.
        """
        _check_callable("listener", callback, optional=False)
        for t in types:
            if not isinstance(t, EventType):
                raise ConfigError(f"event type must be a dim.EventType, got {t!r}", t)
        self._dispatcher.add(callback, frozenset(types) if types else None)
        return callback

    def remove_listener(self, callback: Listener) -> None:
        self._dispatcher.remove(callback)

    # -- internals ------------------------------------------------------------------------

    def _running_node(self, required: bool) -> Optional[Node]:
        self._check_fork()
        node = self._node
        if node is None and required:
            raise StateError(f"manager for service {self.service!r} is not started")
        return node

    def _check_fork(self) -> None:
        if os.getpid() != self._pid and self._node is not None:
            raise ForkedError(
                f"this manager was started in process {self._pid} and inherited by forked "
                f"process {os.getpid()}; its threads did not survive the fork. Start the "
                f"manager after forking (gunicorn: in post_fork or the app factory, without "
                f"--preload)"
            )

    def _era(self, client: Client) -> Era:
        """What the node will know of the server; requests may run late by up to two
        socket timeouts (the client's own, when it has one)."""
        if isinstance(client, RedisCluster):
            timeout = client.nodes_manager.connection_kwargs.get("socket_timeout")
        else:
            timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        max_delay = 2 * float(timeout) + 0.1 if timeout else None
        s = self.settings
        return Era(time.monotonic, max_delay, s.reset_window, tolerance=s.fence_margin / 2)

    def _describe_target(self) -> str:
        return connection.describe(self._redis_target)

    def _close_client(self, client: Optional[Client]) -> None:
        connection.close(client, self._redis_target)


def _fresh_dispatcher(old: Dispatcher) -> Dispatcher:
    """A new dispatcher with the same listeners, so a restarted manager keeps them."""
    new = Dispatcher()
    for listener, types in old._listeners:
        new.add(listener, types)
    return new


def _stop_all_at_exit() -> None:
    for manager in list(_live_managers):
        try:
            manager.stop()
        except Exception:
            log.exception("stopping %r at exit failed", manager)


# threading's exit hooks run before concurrent.futures shuts its pools and before the
# interpreter refuses new threads (3.12+), so a stop there can still disconnect; the
# plain atexit hook is the fallback (it finds nothing left to do when the first ran)
_register_early = getattr(threading, "_register_atexit", None)
if _register_early is not None:
    _register_early(_stop_all_at_exit)
atexit.register(_stop_all_at_exit)

__all__ = ["Event", "Manager"]
