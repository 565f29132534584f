"""Every way of reaching Redis, each against a real server on loopback.

``rediss://`` (TLS with a throw-away CA made by ``trustme``, and mutual TLS), ``unix://``
sockets, a ready ``redis.Redis`` that the caller owns, and ACL users: the minimal user a
node needs and the read-only user ``dim status`` needs. Also what ``start()`` and ``dim
status`` say, at once and in one line, when the login, a permission or a certificate is
refused.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import attrs
import pytest
import redis
import trustme
from redis.backoff import NoBackoff
from redis.retry import Retry

from dim import Manager, RedisUnavailableError, Settings
from dim.keys import Keys
from dim.store import Store
from dim.testing import RedisServer, TLSFiles, find_redis_server, free_port, wait_until

from .helpers import FAST, Cluster, dim_env, run_dim

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

#: Every command a node sends, at top level or from its Lua scripts (Redis checks the
#: calls a script makes against the caller's ACL). The minimal node user is
#: ``ACL SETUSER <name> reset on >PASSWORD ~dim:* resetchannels &dim:* +<each of these>``,
#: as docs/connecting.rst says. ``test_minimal_acl_user_runs_a_cluster`` proves that it
#: is enough (nothing denied) and that each one is used.
NODE_COMMANDS = (
    "del",
    "evalsha",
    "exists",
    "get",
    "hdel",
    "hget",
    "hgetall",
    "hlen",
    "hmget",
    "hset",
    "info",
    "mget",
    "pexpire",
    "ping",
    "pttl",
    "publish",
    "sadd",
    "scard",
    "script|load",
    "set",
    "sismember",
    "smembers",
    "srem",
    "subscribe",
    "time",
    "zadd",
    "zcount",
    "zrange",
    "zrem",
    "zremrangebyscore",
    "zscore",
)

#: What ``dim status`` reads: ``ACL SETUSER <name> reset on >PASSWORD %R~dim:* +<each>``.
STATUS_COMMANDS = ("get", "hgetall", "mget", "time", "zrange")
# the operator commands (docs/connecting.rst): the reads of status, plus the control hash
OPS_COMMANDS = (*STATUS_COMMANDS, "hset", "hdel", "publish", "multi", "exec")

#: What remains of a service after every node stopped gracefully (protocol.rst §1).
HISTORY = {"configs", "era", "fence", "version", "left"}

PASSWORD = "node-secret"

#: start() against a server that refuses must fail well before this.
PATIENT = FAST.replace(connect_timeout=10.0)

#: For start() against a server that never accepts: give up soon. The default timings
#: (a 1 s socket timeout) so that a slow machine's TLS handshake is not what fails.
QUICK = Settings(connect_timeout=0.5)


# -- helpers ----------------------------------------------------------------------------


def setuser(admin: redis.Redis, name: str, *rules: str) -> None:
    """Create (or redefine from scratch) an ACL user with a password and these rules."""
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{PASSWORD}", *rules)


def node_rules(*, without: str = "", keys: str = "~dim:*", channels: str = "&dim:*") -> list[str]:
    """The minimal node ACL rules, optionally with one command left out."""
    commands = [f"+{c}" for c in NODE_COMMANDS if c != without]
    return [keys, "resetchannels", channels, *commands]


def user_url(server: RedisServer, user: str, password: str = PASSWORD) -> str:
    return f"redis://{user}:{password}@{server.host}:{server.port}/0"


def denials(admin: redis.Redis) -> list[dict[str, Any]]:
    """ACL LOG entries, less redis-py's optional CLIENT SETINFO (Redis 7.2+ logs it)."""
    return [e for e in admin.acl_log() if str(e.get("object")) != "client|setinfo"]


def leftover(admin: redis.Redis, service: str) -> set[str]:
    """The service's keys that are not history: none once every node left gracefully."""
    prefix = Keys(service).prefix
    names = {k.decode()[len(prefix) :] for k in admin.scan_iter(match=prefix + "*")}
    return names - HISTORY


def run_cluster(target: Any, service: str, *, nodes: int = 2, configs: int = 4) -> Cluster:
    """Start ``nodes`` managers on ``target``; return the cluster once it has settled."""
    cluster = Cluster(target, service, [{"id": i} for i in range(configs)])
    cluster.add(nodes)
    cluster.wait_settled()
    return cluster


def stop_cleanly(cluster: Cluster) -> None:
    """Stop every manager; each instance was disconnected and none ever ran twice."""
    cluster.stop()
    assert all(m.node_id is None for m in cluster.managers)
    assert cluster.ledger.create_count() > 0
    assert cluster.ledger.disconnect_count() == cluster.ledger.create_count()
    assert cluster.ledger.overlaps() == []


def failed_start(target: Any, settings: Any = PATIENT) -> tuple[str, float]:
    """start() a manager that must fail: (its error message, seconds it took).

    Also checks that it left no node behind: no node id, and no dim thread started.
    """
    before = set(threading.enumerate())
    manager = Manager(list, object, redis=target, service="refused", settings=settings)
    began = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        manager.start()
    took = time.monotonic() - began
    assert manager.node_id is None
    started = [t.name for t in threading.enumerate() if t not in before]
    assert not [name for name in started if name.startswith("dim-")], started
    return str(info.value), took


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command exited 1 with exactly one line on stderr and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- fixtures -------------------------------------------------------------------------


@attrs.frozen
class PKI:
    """PEM files of a test CA, a server certificate for 127.0.0.1 and a client one."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here

    def files(self, *, client_cert: bool = False) -> TLSFiles:
        if client_cert:
            return TLSFiles(
                self.server_cert, self.server_key, self.ca, self.client_cert, self.client_key
            )
        return TLSFiles(self.server_cert, self.server_key, self.ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A throw-away CA (trustme) with a server and a client certificate, as files."""
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("dim-client")
    paths = {name: str(directory / name) for name in ("ca", "scert", "skey", "ccert", "ckey")}
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["scert"])
    server.private_key_pem.write_to_path(paths["skey"])
    client.cert_chain_pems[0].write_to_path(paths["ccert"])
    client.private_key_pem.write_to_path(paths["ckey"])
    other = str(directory / "other-ca")
    trustme.CA().cert_pem.write_to_path(other)
    return PKI(paths["ca"], paths["scert"], paths["skey"], paths["ccert"], paths["ckey"], other)


def start_tls(factory: Callable[..., RedisServer], files: TLSFiles) -> RedisServer:
    """A TLS-only server from ``factory``; skips the test if the binary has no TLS."""
    try:
        return factory(tls=files)
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            # one reason for every such test, so `-ra` reports it once with a count
            pytest.skip(f"{find_redis_server()} was built without TLS (tested where it has it)")
        raise


@pytest.fixture
def tls_server(pki: PKI, redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A server that speaks TLS only (no plain port) and asks for no client certificate."""
    return start_tls(redis_factory, pki.files())


@pytest.fixture
def acl_server(own_redis: RedisServer) -> Iterator[tuple[RedisServer, redis.Redis]]:
    """A fresh server (no script cached, no statistics) and an admin client on it."""
    admin = own_redis.client(client_name="admin")
    try:
        yield own_redis, admin
    finally:
        admin.close()


# -- TLS ------------------------------------------------------------------------------


def test_rediss_url_runs_a_cluster(tls_server: RedisServer, service: str) -> None:
    """Managers on a rediss:// URL with ssl_ca_certs run, report status and stop cleanly."""
    assert tls_server.url.startswith(f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs=")
    plain = redis.Redis(port=tls_server.port, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # the port speaks TLS only, so the cluster below went over TLS
    plain.close()
    cluster = run_cluster(tls_server.url, service)
    try:
        assert cluster.counts() == [2, 2]
        status = cluster.managers[0].status()
        assert len(status.nodes) == 2 and status.not_running == []
    finally:
        stop_cleanly(cluster)
    admin = tls_server.client()
    assert leftover(admin, service) == set()
    admin.close()


def test_rediss_with_a_client_certificate(
    pki: PKI, redis_factory: Callable[..., RedisServer], service: str
) -> None:
    """Mutual TLS: ssl_certfile and ssl_keyfile in the URL work; without them start fails."""
    server = start_tls(redis_factory, pki.files(client_cert=True))
    assert "ssl_certfile=" in server.url and "ssl_keyfile=" in server.url
    cluster = run_cluster(server.url, service, nodes=1, configs=2)
    stop_cleanly(cluster)
    without = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={pki.ca}"
    message, _ = failed_start(without, QUICK)
    assert "cannot reach Redis" in message and "ssl_certfile" in message


@pytest.mark.parametrize("case", ["untrusted CA", "wrong host name"])
def test_rejected_certificate_fails_start_at_once(
    case: str, pki: PKI, tls_server: RedisServer
) -> None:
    """A server certificate the client cannot verify fails start() at once, saying so."""
    if case == "untrusted CA":
        url = f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={pki.other_ca}"
        reason = "certificate verify failed"
    else:  # the certificate names 127.0.0.1 only
        url = f"rediss://localhost:{tls_server.port}/0?ssl_ca_certs={pki.ca}"
        reason = "Hostname mismatch"
    message, took = failed_start(url)
    assert took < 5, "a certificate that cannot verify is not worth retrying"
    assert message.startswith(f"the TLS certificate of Redis at {url} was rejected")
    assert reason in message and "ssl_ca_certs must name the CA" in message


def test_missing_tls_file_fails_start_at_once(pki: PKI, tls_server: RedisServer) -> None:
    """A CA file that does not exist is named at once, not retried as an outage."""
    missing = str(Path(pki.ca).with_name("no-such-ca.pem"))
    url = f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={missing}"
    message, took = failed_start(url)
    assert took < 5
    assert f"the file {missing!r} given as ssl_ca_certs does not exist" in message


def test_tls_and_plain_mixed_up_are_explained(
    pki: PKI, tls_server: RedisServer, redis_server: RedisServer
) -> None:
    """redis:// to a TLS port, and rediss:// to a plain one, each suggest the other."""
    message, _ = failed_start(f"redis://127.0.0.1:{tls_server.port}/0", QUICK)
    assert "cannot reach Redis" in message and "use rediss://" in message
    plain = f"rediss://127.0.0.1:{redis_server.port}/0?ssl_ca_certs={pki.ca}"
    message, _ = failed_start(plain, QUICK)
    assert "cannot reach Redis" in message and "use redis://" in message


def test_dim_status_over_rediss(pki: PKI, tls_server: RedisServer, service: str) -> None:
    """``dim status`` reads a cluster over rediss://, and names a rejected certificate."""
    cluster = run_cluster(tls_server.url, service)
    try:
        result = run_dim("status", "--redis", tls_server.url, "--service", service, "--json")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert sorted(n["running"] for n in data["nodes"]) == [2, 2]
    finally:
        stop_cleanly(cluster)
    untrusted = f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={pki.other_ca}"
    line = one_line_error(run_dim("status", "--redis", untrusted, "--service", service))
    assert "TLS certificate" in line and "rejected" in line


def test_dim_command_tls_options(
    pki: PKI, redis_factory: Callable[..., RedisServer], service: str
) -> None:
    """--tls-ca, --tls-cert and --tls-key (or $DIM_REDIS_TLS_CA, _CERT, _KEY) add the
    TLS files to a bare rediss:// URL, for a server that wants a client certificate."""
    server = start_tls(redis_factory, pki.files(client_cert=True))
    bare = f"rediss://127.0.0.1:{server.port}/0"
    cluster = run_cluster(server.url, service, nodes=1, configs=2)
    try:
        result = run_dim(
            "status",
            "--check",
            "--redis",
            bare,
            "--service",
            service,
            "--tls-ca",
            pki.ca,
            "--tls-cert",
            pki.client_cert,
            "--tls-key",
            pki.client_key,
        )
        assert result.returncode == 0, result.stderr
        assert "2 published, 2 running" in result.stdout
        env = dim_env(
            DIM_REDIS_URL=bare,
            DIM_SERVICE=service,
            DIM_REDIS_TLS_CA=pki.ca,
            DIM_REDIS_TLS_CERT=pki.client_cert,
            DIM_REDIS_TLS_KEY=pki.client_key,
        )
        result = run_dim("wait", "--settled", "--timeout", "30", env=env)
        assert result.returncode == 0, result.stderr
        # the CA only: the server ends the session, which the one line explains
        line = one_line_error(
            run_dim("status", "--redis", bare, "--tls-ca", pki.ca, "--service", service)
        )
        assert "cannot reach Redis" in line and "ssl_certfile" in line
    finally:
        stop_cleanly(cluster)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--redis", "redis://127.0.0.1:1/0", "--tls-ca", "{ca}"], "TLS files need a URL with TLS"),
        (["--redis", "rediss://127.0.0.1:1/0", "--tls-ca", "/no/such/ca.pem"], "no such file"),
        (
            ["--redis", "redis://127.0.0.1:1/0", "--sentinel-password", "x"],
            "needs a redis+sentinel",
        ),
    ],
)
def test_dim_command_refuses_options_that_do_not_fit(
    pki: PKI, args: list[str], message: str
) -> None:
    """TLS files for a URL without TLS, a TLS file that does not exist, a sentinel login
    for one server: exit 2, one line."""
    result = run_dim("status", "--service", "x", *(a.format(ca=pki.ca) for a in args))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message in line, line


def test_dim_command_user_and_password_options(
    acl_server: tuple[RedisServer, redis.Redis], service: str
) -> None:
    """--username with $DIM_REDIS_PASSWORD logs in as the read-only user, for the deploy
    checks too; a wrong password fails in one line that does not show it."""
    server, admin = acl_server
    setuser(admin, "dimnode", *node_rules())
    setuser(admin, "dimstatus", "%R~dim:*", *(f"+{c}" for c in STATUS_COMMANDS))
    cluster = run_cluster(user_url(server, "dimnode"), service)
    try:
        admin.acl_log_reset()
        bare = f"redis://127.0.0.1:{server.port}/0"
        env = dim_env(DIM_REDIS_PASSWORD=PASSWORD)
        for command in (["status", "--check"], ["wait", "--settled", "--timeout", "30"]):
            result = run_dim(
                *command, "--redis", bare, "--service", service, "--username", "dimstatus", env=env
            )
            assert result.returncode == 0, (command, result.stderr)
            assert PASSWORD not in result.stdout + result.stderr
        assert denials(admin) == []
        env = dim_env(DIM_REDIS_USERNAME="dimstatus", DIM_REDIS_PASSWORD="not-the-password")
        line = one_line_error(run_dim("status", "--redis", bare, "--service", service, env=env))
        assert "refused the login" in line and "dimstatus:***@" in line
        assert "not-the-password" not in line
    finally:
        stop_cleanly(cluster)


# -- unix socket and a ready client ---------------------------------------------------


def test_unix_socket_url_runs_a_cluster(
    redis_factory: Callable[..., RedisServer], tmp_path: Path, service: str
) -> None:
    """unix://user:password@/path works for a user confined to one service's keys.

    Every connection dim opens goes over the socket, and all are closed by stop().
    """
    sock = tmp_path / "redis.sock"
    server = redis_factory(unix_socket=sock)
    admin = server.client(client_name="admin")
    keys = Keys(service)
    setuser(admin, "feeds", *node_rules(keys=f"~{keys.prefix}*", channels=f"&{keys.events}*"))

    def dim_clients() -> list[dict[str, Any]]:
        return [c for c in admin.client_list() if c["user"] == "feeds"]

    url = f"unix://feeds:{PASSWORD}@{sock}?db=0"
    cluster = run_cluster(url, service)
    try:
        # a heartbeat connection and a pub/sub connection per node, at least
        assert len(dim_clients()) >= 2
        assert all("U" in c["flags"] for c in dim_clients()), dim_clients()
    finally:
        stop_cleanly(cluster)
    wait_until(lambda: not dim_clients(), 5, message="dim left connections open")
    assert denials(admin) == []
    assert leftover(admin, service) == set()
    admin.close()


def test_ready_client_is_used_and_left_open(own_redis: RedisServer, service: str) -> None:
    """A redis.Redis passed in carries all of dim's traffic, and dim never closes it."""
    client = own_redis.client(client_name="mine", socket_timeout=1.0)
    admin = own_redis.client(client_name="admin")
    held = client.connection_pool.get_connection()
    held.send_command("CLIENT", "ID")
    held_id = held.read_response()
    try:
        cluster = run_cluster(client, service)
        try:
            names = {c["name"] for c in admin.client_list()}
            assert names == {"mine", "admin"}, "dim opened a connection of its own"
        finally:
            stop_cleanly(cluster)
        # closing the client would have disconnected every connection of its pool
        assert held._sock is not None  # still connected (redis-py 7 has no is_connected)
        held.send_command("CLIENT", "ID")
        assert held.read_response() == held_id
        assert client.ping() is True
    finally:
        client.connection_pool.release(held)
        client.close()
    assert leftover(admin, service) == set()
    admin.close()


def test_ready_client_error_names_its_address() -> None:
    """start() with a client for an unreachable server names host and port, not secrets."""
    port = free_port()
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        username="someone",
        password="hidden",
        socket_timeout=0.2,
        retry=Retry(NoBackoff(), 0),  # redis-py 6+ retries 10 times by default
    )
    message, _ = failed_start(client, QUICK)
    where = f"redis://someone@127.0.0.1:{port}/0 (the redis.Redis client passed to dim)"
    assert message.startswith(f"cannot reach Redis at {where} within 0.5 s: ")
    assert "hidden" not in message


# -- ACL users ------------------------------------------------------------------------


def test_minimal_acl_user_runs_a_cluster(
    acl_server: tuple[RedisServer, redis.Redis], service: str
) -> None:
    """The minimal node ACL is enough (nothing denied) and each command in it is used."""
    server, admin = acl_server
    setuser(admin, "dimnode", *node_rules())
    admin.config_resetstat()
    admin.acl_log_reset()
    url = user_url(server, "dimnode")
    cluster = run_cluster(url, service)
    channel = Keys(service).events
    try:
        # both nodes listen: pub/sub works for this user
        wait_until(lambda: admin.pubsub_numsub(channel) == [(channel.encode(), 2)], 10)
        # a removed config: the leader unassigns it, its node drops it
        cluster.configs.pop()
        cluster.managers[0].refresh()
        wait_until(lambda: cluster.counts() == [1, 2] and cluster.settled(), 10)
        assert sorted(cluster.managers[1].status().configs) == [0, 1, 2]
        # where a config stands, asked at the share version held (a node checking a
        # config it keeps outside its share), as this user
        node = cluster.managers[0]
        with redis.Redis.from_url(url) as client:
            held = node._node.reconciler.version  # type: ignore[union-attr]
            Store(client, service).read_desired(node.node_id, ["0"], held)
    finally:
        stop_cleanly(cluster)
    assert denials(admin) == []
    calls = {
        name.removeprefix("cmdstat_"): stats["calls"]
        for name, stats in admin.info("commandstats").items()
    }
    unused = [c for c in NODE_COMMANDS if not calls.get(c)]
    assert unused == [], f"granted but never used, drop them from the ACL: {unused}"
    assert leftover(admin, service) == set()


def test_read_only_user_runs_dim_status(
    acl_server: tuple[RedisServer, redis.Redis], service: str
) -> None:
    """``dim status`` works for a user that may only read dim's keys with five commands."""
    server, admin = acl_server
    setuser(admin, "dimnode", *node_rules())
    setuser(admin, "dimstatus", "%R~dim:*", *(f"+{c}" for c in STATUS_COMMANDS))
    cluster = run_cluster(user_url(server, "dimnode"), service)
    try:
        admin.acl_log_reset()
        url = user_url(server, "dimstatus")
        result = run_dim("status", "--redis", url, "--service", service, "--json")
        assert result.returncode == 0, result.stderr
        assert PASSWORD not in result.stdout + result.stderr
        data = json.loads(result.stdout)
        assert len(data["nodes"]) == 2 and data["leader"] is not None
        assert sorted(c["config_id"] for c in data["configs"]) == [0, 1, 2, 3]
        assert data["not_running"] == []
        assert denials(admin) == []
        reader = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.set(Keys(service).version, "0")  # read-only indeed
        reader.close()
    finally:
        stop_cleanly(cluster)


def test_operator_user_runs_every_operator_command(
    acl_server: tuple[RedisServer, redis.Redis], service: str
) -> None:
    """``dim watch``, ``config``, ``pause``, ``resume``, ``drain`` and ``rebalance`` work
    for the operator ACL of the docs, with no command denied."""
    server, admin = acl_server
    setuser(admin, "dimnode", *node_rules())
    setuser(admin, "dimops", "~dim:*", "resetchannels", "&dim:*", *(f"+{c}" for c in OPS_COMMANDS))
    cluster = run_cluster(user_url(server, "dimnode"), service)
    try:
        admin.acl_log_reset()
        url = user_url(server, "dimops")
        node = cluster.managers[0].node_id
        assert node is not None
        for command in (
            ["watch", "--count", "1"],
            ["config"],
            ["pause"],
            ["resume"],
            ["drain", node, "--wait", "20"],
            ["drain", node, "--undo"],
            ["rebalance"],
        ):
            result = run_dim(*command, "--redis", url, "--service", service)
            assert result.returncode == 0, (command, result.stderr)
        assert denials(admin) == []
        cluster.wait_settled()
    finally:
        stop_cleanly(cluster)


def test_status_names_a_missing_permission(
    acl_server: tuple[RedisServer, redis.Redis], service: str
) -> None:
    """``dim status`` as a user without MGET: one line naming the permission, exit 1."""
    server, admin = acl_server
    commands = [f"+{c}" for c in STATUS_COMMANDS if c != "mget"]
    setuser(admin, "nomget", "%R~dim:*", *commands)
    # a config with a claim to read, so that status needs MGET
    cluster = run_cluster(server.url, service, nodes=1, configs=1)
    try:
        result = run_dim("status", "--redis", user_url(server, "nomget"), "--service", service)
    finally:
        stop_cleanly(cluster)
    line = one_line_error(result)
    assert "lacks a permission dim needs (NOPERM" in line and "'mget'" in line
    assert "read-only ACL" in line and PASSWORD not in line


# -- start() refused ------------------------------------------------------------------


def test_wrong_password_fails_start_at_once(
    acl_server: tuple[RedisServer, redis.Redis],
) -> None:
    """A wrong password for an ACL user: one RedisUnavailableError naming the login."""
    server, admin = acl_server
    setuser(admin, "dimnode", *node_rules())
    message, took = failed_start(user_url(server, "dimnode", password="not-it"))
    assert took < 5, "a refused login is not worth retrying"
    target = f"redis://dimnode:***@127.0.0.1:{server.port}/0"
    assert message.startswith(f"Redis at {target} refused the login: ")
    assert "not-it" not in message


@pytest.mark.parametrize(
    ("without", "keys", "needle"),
    [
        # the server's own words, as Redis and Valkey put them
        (
            "ping",
            "~dim:*",
            r"lacks a permission dim needs \(NOPERM (this user|User partial) has no "
            r"permissions to run the 'ping' command\)",
        ),
        ("evalsha", "~dim:*", r"no permissions to run the 'evalsha' command"),
        ("script|load", "~dim:*", r"no permissions to run the 'script\|load' command"),
        ("", "~other:*", r"(?i)no permissions to access (one of the keys|a key)"),
        # called from a script
        ("set", "~dim:*", r"can't run this command|no permissions to run the 'set' command"),
    ],
    ids=["no-ping", "no-evalsha", "no-script-load", "no-dim-keys", "no-set-in-lua"],
)
def test_missing_permission_fails_start_at_once(
    without: str, keys: str, needle: str, acl_server: tuple[RedisServer, redis.Redis]
) -> None:
    """Without PING, EVALSHA, SCRIPT LOAD, dim's keys or a scripted command: fails at once."""
    server, admin = acl_server
    setuser(admin, "partial", *node_rules(without=without, keys=keys))
    message, took = failed_start(user_url(server, "partial"))
    assert took < 5, "a missing permission is not worth retrying"
    assert f"redis://partial:***@127.0.0.1:{server.port}/0" in message
    assert re.search(needle, message) and PASSWORD not in message, message


# -- what start() reads of the server -------------------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl", "noeviction"])
def test_start_warns_when_redis_may_evict_claims(
    policy: str, own_redis: RedisServer, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """start() reads ``maxmemory-policy`` and warns, naming it, unless it is noeviction:
    an evicted claim is one another node may take while its holder runs the instance."""
    admin = own_redis.client()
    try:
        admin.config_set("maxmemory-policy", policy)
        caplog.set_level(logging.WARNING, logger="dim")
        cluster = run_cluster(own_redis.url, service, nodes=1, configs=1)
        stop_cleanly(cluster)
    finally:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.close()
    said = [r.getMessage() for r in caplog.records if "evicts keys" in r.getMessage()]
    if policy == "noeviction":
        assert said == []
    else:
        assert said == [
            f"Redis at redis://127.0.0.1:{own_redis.port}/0 evicts keys under memory "
            f"pressure (maxmemory-policy {policy}): dim's claims must never be evicted; "
            "use maxmemory-policy noeviction"
        ]


def test_a_user_without_info_starts_without_the_eviction_warning(
    acl_server: tuple[RedisServer, redis.Redis], service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The policy is advice: a user that may not run INFO still starts and runs, and
    start() neither fails nor guesses a policy."""
    server, admin = acl_server
    admin.config_set("maxmemory-policy", "allkeys-lru")
    setuser(admin, "noinfo", *node_rules(without="info"))
    caplog.set_level(logging.WARNING, logger="dim")
    try:
        cluster = run_cluster(user_url(server, "noinfo"), service, nodes=1, configs=2)
        stop_cleanly(cluster)
    finally:
        admin.config_set("maxmemory-policy", "noeviction")
    assert not [r for r in caplog.records if "evicts keys" in r.getMessage()]
