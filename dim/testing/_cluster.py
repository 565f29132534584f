"""A throw-away Redis Cluster of masters on loopback (:class:`RedisClusterServers`)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

from dim.testing._server import RedisServer
from dim.testing._support import _FORBIDDEN_PORTS, Started, free_port, wait_until

#: The number of hash slots of a Redis Cluster.
CLUSTER_SLOTS = 16384

#: A cluster node's bus listens on its port + 10000, so the port may not exceed this.
_MAX_CLUSTER_PORT = 65535 - 10000


def _bindable(port: int, host: str) -> bool:
    """Whether ``port`` on ``host`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _cluster_port(host: str, taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too, clear of ``taken``."""
    while True:
        port = free_port(host)
        bus = port + 10000
        if (
            port <= _MAX_CLUSTER_PORT
            and bus not in _FORBIDDEN_PORTS
            and not {port, bus} & taken
            and _bindable(bus, host)
        ):
            return port


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Split the 16384 slots into ``masters`` contiguous ranges ``(first, last)``."""
    bounds = [CLUSTER_SLOTS * i // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


class RedisClusterServers(Started):
    """A throw-away Redis Cluster of ``masters`` masters (no replicas) on ``127.0.0.1``.

    Each master is a :class:`RedisServer` in cluster mode with its own directory (log and
    ``nodes.conf``). The slots are split into contiguous ranges and the nodes are joined
    with plain commands (``CLUSTER SET-CONFIG-EPOCH``, ``CLUSTER ADDSLOTS``, ``CLUSTER
    MEET``), so no ``redis-cli`` is needed; :meth:`start` returns once every node reports
    ``cluster_state:ok``, knows every node and sees all slots assigned.

    Example::

        with RedisClusterServers() as cluster:
            client = cluster.client()
            client.set("{svc}:a", "1")
            assert cluster.server_for("{svc}:a").client().get("{svc}:a") == b"1"
            client.close()

    :ivar servers: the masters, in slot order (the first one holds slot 0).
    """

    def __init__(
        self,
        masters: int = 3,
        *,
        executable: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        node_timeout_ms: int = 2000,
        startup_timeout: float = 15.0,
    ) -> None:
        """Configure the cluster; nothing runs until :meth:`start`.

        Args:
            masters: how many masters share the slots (at least 1).
            executable: server binary; by default :func:`find_redis_server`.
            directory: parent of the nodes' directories; by default a temporary
                directory that :meth:`close` removes.
            node_timeout_ms: ``cluster-node-timeout`` of every node.
            startup_timeout: seconds for each server to answer PING, and again for the
                cluster to form.
        """
        if masters < 1:
            raise ValueError(f"a cluster needs at least one master, got {masters}")
        self.host = "127.0.0.1"
        self.startup_timeout = startup_timeout
        self._owns_directory = directory is None
        self.directory = Path(
            tempfile.mkdtemp(prefix="dim-redis-cluster-") if directory is None else directory
        )
        taken: set[int] = set()
        self.servers: list[RedisServer] = []
        for index in range(masters):
            port = _cluster_port(self.host, taken)
            taken |= {port, port + 10000}
            self.servers.append(
                RedisServer(
                    port,
                    executable=executable,
                    directory=self.directory / f"node-{index}-{port}",
                    startup_timeout=startup_timeout,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        # relative to the node's own directory (its working directory)
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                    ],
                )
            )
        self._lock = threading.RLock()

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every master."""
        return [(s.host, s.port) for s in self.servers]

    @property
    def running(self) -> bool:
        """Whether every master process is alive."""
        return all(s.running for s in self.servers)

    def client(self, **kwargs: Any) -> RedisCluster:
        """Return a new ``redis.cluster.RedisCluster`` for this cluster (kwargs pass through)."""
        nodes = [
            ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in self.startup_nodes
        ]
        return RedisCluster(startup_nodes=nodes, **kwargs)

    def server_for(self, key: str | bytes) -> RedisServer:
        """The master that serves ``key``'s hash slot, as the cluster reports it."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        by_port = {s.port: s for s in self.servers}
        with self._probe(self.servers[0]) as probe:
            for first, last, master, *_replicas in probe.cluster("SLOTS"):
                if int(first) <= slot <= int(last):
                    return by_port[int(master[1])]
        raise LookupError(f"no master serves slot {slot} (key {key!r})")

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> RedisClusterServers:
        """Start the masters, assign the slots, join them, and wait for ``cluster_state:ok``.

        Does nothing if the cluster already runs. On failure every master is stopped.

        Raises:
            RuntimeError: a server did not come up (its log tail is included).
            TimeoutError: the cluster did not form within ``startup_timeout``.
        """
        with self._lock:
            if self.running:
                return self
            try:
                for server in self.servers:
                    server.start()
                self._join()
            except BaseException:
                self.stop()
                raise
            return self

    def _join(self) -> None:
        """Give each master its slots and a distinct epoch, then introduce them."""
        fresh = []
        for epoch, (server, (low, high)) in enumerate(
            zip(self.servers, _slot_ranges(len(self.servers))), start=1
        ):
            with self._probe(server) as probe:
                if self._state(probe).get("cluster_slots_assigned", "0") != "0":
                    continue  # restarted with its nodes.conf: already part of the cluster
                # distinct epochs up front, so the nodes need not resolve a collision
                probe.cluster("SET-CONFIG-EPOCH", epoch)
                probe.cluster("ADDSLOTS", *range(low, high + 1))
                fresh.append(server)
        # every pair meets directly: learning of a node by gossip takes seconds
        for index, server in enumerate(fresh):
            with self._probe(server) as probe:
                for other in fresh[index + 1 :]:
                    probe.cluster("MEET", other.host, other.port)
        wait_until(
            self._formed,
            self.startup_timeout,
            interval=0.05,
            message=f"Redis Cluster on ports {[s.port for s in self.servers]} did not form",
        )

    def _formed(self) -> bool:
        """Every master is ok, knows every master, and sees every slot assigned."""
        expected = {
            "cluster_state": "ok",
            "cluster_known_nodes": str(len(self.servers)),
            "cluster_slots_assigned": str(CLUSTER_SLOTS),
        }
        for server in self.servers:
            with self._probe(server) as probe:
                state = self._state(probe)
            if any(state.get(name) != value for name, value in expected.items()):
                return False
        return True

    @staticmethod
    def _state(probe: redis.Redis) -> dict[str, str]:
        """``CLUSTER INFO`` as a dict of strings."""
        raw = probe.cluster("INFO")
        if isinstance(raw, dict):
            return {str(k): str(v) for k, v in raw.items()}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {name: value.strip() for name, value in pairs}

    @staticmethod
    def _probe(server: RedisServer) -> redis.Redis:
        """A plain client on one master that fails fast instead of retrying."""
        return server.client(
            socket_connect_timeout=1.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )

    def stop(self) -> None:
        """Stop every master (see :meth:`RedisServer.stop`)."""
        with self._lock:
            for server in self.servers:
                server.stop()

    def close(self) -> None:
        """Stop every master and remove the directories this object created."""
        with self._lock:
            for server in self.servers:
                server.close()
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __repr__(self) -> str:
        """Show the ports and state."""
        state = "running" if self.running else "stopped"
        return f"<RedisClusterServers {self.host} ports={[s.port for s in self.servers]} {state}>"
