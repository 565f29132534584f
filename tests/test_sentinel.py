"""dim through Redis Sentinel: a real master, a replica and three sentinels on loopback.

The managers get ``redis.sentinel.Sentinel(...).master_for(name, socket_timeout=...)`` as
their ``redis=`` client. The master is failed over (``SENTINEL FAILOVER``, or killed), and
dim must reconnect to the new master and run every config exactly once again.
Replication is asynchronous, so a failover may lose the last writes (protocol.rst §7, §14.1):
here the cluster is quiet when the master goes, so nothing that matters is lost.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.sentinel import Sentinel

from dim import Settings
from dim.testing import RedisServer, find_redis_server, free_port, wait_until
from tests.helpers import Cluster

# real processes, servers or faults: run on one interpreter (tox: py311)
pytestmark = pytest.mark.slow

MASTER = "dimmaster"
SETTINGS = Settings(
    heartbeat_interval=0.2,
    node_ttl=1.5,
    leader_ttl=1.5,
    healthcheck_interval=1.0,
    healthcheck_timeout=0.5,
    config_interval=0.5,
    create_backoff=0.01,
    create_backoff_max=0.05,
    failure_cooldown=1.0,
    # create_timeout sizes the reset window that a new service and a failover open (no
    # new claims meanwhile): 3.6 s with it, 12.6 s with its 10 s default
    create_timeout=1.0,
    disconnect_timeout=2.0,
    connect_timeout=10.0,
)
SOCKET_TIMEOUT = 0.2  # the client's socket timeout: one heartbeat interval
TIMEOUT = 60.0  # generous: other heavy tests may share this 2-core machine


class SentinelProcess:
    """One ``redis-sentinel`` (or ``redis-server --sentinel``) on a free loopback port."""

    def __init__(self, directory: Path, master_port: int) -> None:
        self.port = free_port()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "sentinel.conf"  # sentinel rewrites it: it must be writable
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "daemonize no\n"
            f"dir {directory}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        binary = shutil.which("redis-sentinel")
        args = [binary, str(conf)] if binary else [find_redis_server(), str(conf), "--sentinel"]
        self.log = directory / "sentinel.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.client = redis.Redis(port=self.port, socket_timeout=2.0, decode_responses=True)

    def answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class SentinelCluster(Cluster):
    """A :class:`tests.helpers.Cluster` whose every manager has its own Sentinel client."""

    def __init__(self, sentinel: Sentinel, service: str, configs: list[Any]) -> None:
        super().__init__("", service, configs, settings=SETTINGS)
        self.sentinel = sentinel
        self.clients: list[redis.Redis] = []

    def make(self, **kwargs: Any) -> Any:
        client = self.sentinel.master_for(
            MASTER, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
        )
        self.clients.append(client)
        self.redis_url = client  # type: ignore[assignment]  # Cluster.make passes it as redis=
        return super().make(**kwargs)

    def stop(self) -> None:
        super().stop()
        for client in self.clients:
            client.close()


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A master, a replica and three sentinels that know each other, stopped afterwards."""
    master = RedisServer(directory=tmp_path / "master")
    master.start()
    replica = RedisServer(
        directory=tmp_path / "replica",
        extra_args=["--replicaof", "127.0.0.1", str(master.port)],
    )
    sentinels: list[SentinelProcess] = []
    try:
        replica.start()
        probe = master.client(socket_timeout=2.0, decode_responses=True)
        try:
            wait_until(
                lambda: probe.info("replication").get("connected_slaves") == 1,
                TIMEOUT,
                0.05,
                "the replica did not connect to the master",
            )
        finally:
            probe.close()
        sentinels = [SentinelProcess(tmp_path / f"sentinel{i}", master.port) for i in range(3)]
        wait_until(lambda: all(s.answers() for s in sentinels), TIMEOUT, 0.05, "sentinels down")

        def acquainted() -> bool:
            # each sentinel sees the replica and the two other sentinels (quorum, election)
            for s in sentinels:
                try:
                    seen = s.client.info("sentinel").get("master0", {})
                except redis.RedisError:
                    return False
                if seen.get("sentinels", 0) < 3 or seen.get("slaves", 0) < 1:
                    return False
            return True

        wait_until(acquainted, TIMEOUT, 0.1, "the sentinels did not discover each other")
        yield {"master": master, "replica": replica, "sentinels": sentinels}
    finally:
        for s in sentinels:
            s.stop()
        # the old master first: a master that stops with a replica attached waits for it
        # (up to shutdown-timeout), and after a failover that replica is the old master
        master.stop()
        replica.stop()


@pytest.mark.timeout(360)
@pytest.mark.parametrize("how", ["sentinel_failover", "kill_master"])
def test_sentinel_failover(sentinel_setup: dict[str, Any], service: str, how: str) -> None:
    """After a Sentinel failover dim reconnects and every config runs exactly once again."""
    master: RedisServer = sentinel_setup["master"]
    replica: RedisServer = sentinel_setup["replica"]
    sentinels: list[SentinelProcess] = sentinel_setup["sentinels"]
    sentinel = Sentinel([("127.0.0.1", s.port) for s in sentinels], socket_timeout=1.0)
    configs = [{"id": i} for i in range(9)]
    cluster = SentinelCluster(sentinel, service, configs)
    try:
        cluster.add(3)
        cluster.wait_balanced(TIMEOUT)
        assert cluster.counts() == [3, 3, 3]
        assert sentinel.discover_master(MASTER) == ("127.0.0.1", master.port)
        created = cluster.ledger.create_count()

        began = time.monotonic()
        if how == "kill_master":
            master.kill()
        else:
            # a plain command: some redis-py versions mis-parse the SENTINEL replies
            assert sentinels[0].client.execute_command("SENTINEL", "FAILOVER", MASTER)

        def promoted() -> bool:
            try:
                return sentinel.discover_master(MASTER) == ("127.0.0.1", replica.port)
            except redis.RedisError:
                return False

        wait_until(promoted, TIMEOUT, 0.05, "the replica was not promoted")
        promoted_after = time.monotonic() - began
        if how == "sentinel_failover":
            # the old master keeps accepting writes until Sentinel demotes it
            old = master.client(socket_timeout=2.0, decode_responses=True)
            try:
                wait_until(
                    lambda: old.info("replication").get("role") == "slave",
                    TIMEOUT,
                    0.05,
                    "the old master was not demoted",
                )
            finally:
                old.close()
            print(f"old master demoted after {time.monotonic() - began:.2f}s")
        new_master = replica.client(socket_timeout=2.0, decode_responses=True)
        try:

            def converged() -> bool:
                # every node is a member on the new master, and runs its share once
                members = new_master.zrange(f"dim:{{{service}}}:nodes", 0, -1)
                nodes = sorted(m.node_id or "" for m in cluster.running())
                return sorted(members) == nodes and cluster.settled()

            wait_until(converged, TIMEOUT, 0.05, f"no convergence: {cluster.placement()}")
        finally:
            new_master.close()
        settled_after = time.monotonic() - began
        print(
            f"{how}: replica promoted after {promoted_after:.2f}s, every config running "
            f"once again after {settled_after:.2f}s "
            f"({cluster.ledger.create_count() - created} creates since the failover)"
        )
        assert cluster.counts() == [3, 3, 3]
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()
    assert cluster.ledger.overlaps() == []
