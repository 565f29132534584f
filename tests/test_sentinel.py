"""dim through Redis Sentinel: a real master, a replica and three sentinels on loopback.

The managers get ``redis.sentinel.Sentinel(...).master_for(name, socket_timeout=...)`` as
their ``redis=`` client. The master is failed over (``SENTINEL FAILOVER``, or killed), and
dim must reconnect to the new master and run every config exactly once again.
Replication is asynchronous, so a failover may lose the last writes (protocol.rst §7, §14.1):
here the cluster is quiet when the master goes, so nothing that matters is lost.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Optional

import pytest
import redis
import trustme
from redis.sentinel import Sentinel

from dim import Settings
from dim.keys import Keys
from dim.testing import RedisServer, TLSFiles, find_redis_server, free_port, wait_until
from dim.urls import url_with
from tests.helpers import Cluster, dim_env, run_dim

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

    def __init__(
        self,
        directory: Path,
        master_port: int,
        *,
        master_password: Optional[str] = None,
        password: Optional[str] = None,
        tls: Optional[TLSFiles] = None,
    ) -> None:
        self.port = free_port()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "sentinel.conf"  # sentinel rewrites it: it must be writable
        auth = ""
        if master_password is not None:
            auth += f"sentinel auth-pass {MASTER} {master_password}\n"
        if password is not None:
            # its own clients' password, and the one it gives the other sentinels
            auth += f"requirepass {password}\nsentinel sentinel-pass {password}\n"
        listen = f"port {self.port}\n"
        if tls is not None:
            # TLS only, to its clients, to the master and replicas, and to the sentinels
            listen = (
                f"port 0\ntls-port {self.port}\ntls-cert-file {tls.cert_file}\n"
                f"tls-key-file {tls.key_file}\ntls-ca-cert-file {tls.ca_file}\n"
                "tls-auth-clients no\ntls-replication yes\n"
            )
        conf.write_text(
            listen + "bind 127.0.0.1\n"
            "daemonize no\n"
            f"dir {directory}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n" + auth
        )
        binary = shutil.which("redis-sentinel")
        args = [binary, str(conf)] if binary else [find_redis_server(), str(conf), "--sentinel"]
        self.log = directory / "sentinel.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.client = redis.Redis(
            host="127.0.0.1",  # the name in a TLS certificate
            port=self.port,
            password=password,
            socket_timeout=2.0,
            decode_responses=True,
            **(tls.client_options() if tls is not None else {}),
        )

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


@contextmanager
def sentinels_running(
    directory: Path,
    *,
    password: Optional[str] = None,
    sentinel_password: Optional[str] = None,
    tls: Optional[TLSFiles] = None,
) -> Iterator[dict[str, Any]]:
    """A master, a replica and three sentinels that know each other, stopped afterwards;
    ``password`` for the master and replica, ``sentinel_password`` for the sentinels,
    ``tls`` for all of them (TLS only)."""
    master = RedisServer(directory=directory / "master", password=password, tls=tls)
    master.start()
    replica = RedisServer(
        directory=directory / "replica",
        password=password,
        tls=tls,
        extra_args=[
            "--replicaof",
            "127.0.0.1",
            str(master.port),
            *(["--masterauth", password] if password else []),
            *(["--tls-replication", "yes"] if tls else []),
        ],
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
        sentinels = [
            SentinelProcess(
                directory / f"sentinel{i}",
                master.port,
                master_password=password,
                password=sentinel_password,
                tls=tls,
            )
            for i in range(3)
        ]
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


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A master, a replica and three sentinels that know each other, stopped afterwards."""
    with sentinels_running(tmp_path) as setup:
        yield setup


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


def sentinel_url(sentinels: list[SentinelProcess]) -> str:
    """``redis+sentinel://`` with every sentinel, naming the master and database 0."""
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
    return f"redis+sentinel://{hosts}/{MASTER}/0"


@pytest.mark.timeout(360)
def test_a_sentinel_url_for_managers_and_the_command(
    sentinel_setup: dict[str, Any], service: str
) -> None:
    """Managers given a redis+sentinel:// URL run on the master the sentinels name and
    follow a failover; ``dim wait --settled`` takes the same URL and finds the master
    before and after it."""
    master: RedisServer = sentinel_setup["master"]
    replica: RedisServer = sentinel_setup["replica"]
    sentinels: list[SentinelProcess] = sentinel_setup["sentinels"]
    url = sentinel_url(sentinels)
    cluster = Cluster(url, service, [{"id": i} for i in range(6)], settings=SETTINGS)
    command = ["--redis", url, "--service", service]
    try:
        cluster.add(2)
        cluster.wait_balanced(TIMEOUT)
        result = run_dim("wait", "--settled", "--timeout", "60", "--min-nodes", "2", *command)
        assert result.returncode == 0, result.stderr
        with master.client(decode_responses=True) as direct:
            assert len(direct.zrange(Keys(service).nodes, 0, -1)) == 2  # on the master

        assert sentinels[0].client.execute_command("SENTINEL", "FAILOVER", MASTER)

        def promoted() -> bool:
            # every sentinel names the new master: a client may ask any of them (one
            # that has not heard yet names the old master, now a replica whose data
            # stops being renewed)
            try:
                named = {
                    tuple(s.client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER))
                    for s in sentinels
                }
            except redis.RedisError:
                return False
            return named == {("127.0.0.1", str(replica.port))}

        wait_until(promoted, TIMEOUT, 0.05, "the sentinels did not all name the new master")
        # (on a loaded machine the sentinels may fail over again, back to the old master:
        # the command asks them each time, and waits until the cluster has settled there)
        cluster.wait_settled(TIMEOUT)
        result = run_dim("wait", "--settled", "--timeout", "60", "--min-nodes", "2", *command)
        assert result.returncode == 0, result.stderr
        assert "settled: 6 configs running on 2 nodes" in result.stdout
    finally:
        cluster.stop()
    assert cluster.ledger.overlaps() == []


@pytest.mark.timeout(360)
def test_a_sentinel_url_with_passwords(tmp_path: Path, service: str) -> None:
    """The master's password and the sentinels' own: in the URL for the managers, from
    $DIM_REDIS_PASSWORD and $DIM_SENTINEL_PASSWORD for the command. A wrong or missing
    one fails in one line that shows neither."""
    with sentinels_running(tmp_path, password="data-pw", sentinel_password="watch-pw") as setup:
        url = sentinel_url(setup["sentinels"])
        full = url_with(url, password="data-pw", sentinel_password="watch-pw")
        cluster = Cluster(full, service, [{"id": i} for i in range(3)], settings=SETTINGS)
        try:
            cluster.add(1)
            cluster.wait_settled(TIMEOUT)
            env = dim_env(
                DIM_REDIS_URL=url,
                DIM_SERVICE=service,
                DIM_REDIS_PASSWORD="data-pw",
                DIM_SENTINEL_PASSWORD="watch-pw",
            )
            result = run_dim("status", "--check", env=env)
            assert result.returncode == 0, result.stderr
            assert "3 published, 3 running" in result.stdout
            for wrong in (
                {**env, "DIM_REDIS_PASSWORD": "not-it"},
                {**env, "DIM_SENTINEL_PASSWORD": "not-it"},
                {k: v for k, v in env.items() if k != "DIM_SENTINEL_PASSWORD"},
            ):
                result = run_dim("status", env=wrong)
                assert result.returncode == 1, result.stdout
                (line,) = result.stderr.strip().splitlines()
                assert "Traceback" not in line
                assert not {"not-it", "data-pw", "watch-pw"} & set(re.split(r"[\s:@=&/]", line))
        finally:
            cluster.stop()


@pytest.mark.timeout(360)
def test_a_tls_sentinel_url(tmp_path: Path, service: str) -> None:
    """rediss+sentinel:// reaches the sentinels and the master over TLS (TLS-only
    ports), with the CA given in the URL for the managers and by --tls-ca for the
    command."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: str(tmp_path / name) for name in ("ca.pem", "server.pem", "server.key")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    cert.cert_chain_pems[0].write_to_path(paths["server.pem"])
    cert.private_key_pem.write_to_path(paths["server.key"])
    tls = TLSFiles(paths["server.pem"], paths["server.key"], paths["ca.pem"])
    with ExitStack() as stack:
        try:
            setup = stack.enter_context(sentinels_running(tmp_path / "servers", tls=tls))
        except RuntimeError as exc:
            if "tls" in str(exc).lower():
                pytest.skip(f"this redis-server cannot serve TLS: {str(exc).splitlines()[-1]}")
            raise
        bare = sentinel_url(setup["sentinels"]).replace("redis+", "rediss+", 1)
        url = url_with(bare, tls_ca=paths["ca.pem"])
        cluster = Cluster(url, service, [{"id": i} for i in range(3)], settings=SETTINGS)
        stack.callback(cluster.stop)
        cluster.add(1)
        cluster.wait_settled(TIMEOUT)
        command = ["--redis", bare, "--tls-ca", paths["ca.pem"], "--service", service]
        result = run_dim("wait", "--settled", "--timeout", "60", *command)
        assert result.returncode == 0, result.stderr
        plain = sentinel_url(setup["sentinels"])  # without TLS, the sentinels do not answer
        result = run_dim("status", "--redis", plain, "--service", service)
        assert result.returncode == 1 and "Traceback" not in result.stderr
