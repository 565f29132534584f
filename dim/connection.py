"""Connecting to Redis: a URL or the caller's client, checked, with clear errors.

Used by :meth:`dim.Manager.start`; the ``dim`` command shares :func:`safe_url` and
:mod:`dim.redis_errors`. The URL forms themselves (Sentinel and Cluster included) are
read by :mod:`dim.urls`.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union
from urllib.parse import parse_qs, urlsplit

import redis
import tenacity
from redis.cluster import RedisCluster

from dim import redis_errors
from dim.errors import RedisUnavailableError
from dim.settings import Settings
from dim.store import Client, redis_from
from dim.urls import SCHEMES, check_url, close_client, safe_url

__all__ = [
    "SCHEMES",
    "check_url",
    "close",
    "connect",
    "describe",
    "eviction_policy",
    "safe_url",
    "warn_eviction",
    "worth_retrying",
]

log = logging.getLogger("dim.manager")


def describe(target: Union[str, Client]) -> str:
    """Where dim connects, without secrets: the URL, or what a passed client points at."""
    if isinstance(target, str):
        return safe_url(target)
    if isinstance(target, RedisCluster):
        nodes = ",".join(sorted(n.name for n in target.get_nodes()))  # type: ignore[no-untyped-call]
        return f"redis cluster {nodes} (the redis.cluster.RedisCluster client passed to dim)"
    pool = target.connection_pool
    kwargs = pool.connection_kwargs
    user = kwargs.get("username")
    auth = f"{user}@" if user else ""
    db = kwargs.get("db") or 0
    if kwargs.get("path"):
        where = f"unix://{auth}{kwargs['path']}?db={db}"
    elif kwargs.get("host"):
        tls = issubclass(pool.connection_class, redis.SSLConnection)
        port = kwargs.get("port") or 6379
        where = f"{'rediss' if tls else 'redis'}://{auth}{kwargs['host']}:{port}/{db}"
    else:  # a Sentinel pool, say: its repr names the service
        return repr(target)
    return f"{where} (the redis.Redis client passed to dim)"


def connect(target: Union[str, Client], settings: Settings) -> Client:
    """A client that answered PING, or RedisUnavailableError saying what went wrong.

    An unreachable server is retried until ``connect_timeout``; a refused login, a
    missing permission or a rejected TLS certificate fail at once, since waiting
    cannot fix them.
    """
    where = describe(target)
    if isinstance(target, str) and urlsplit(target).scheme.startswith("rediss"):
        # redis-py would report a missing file as a connection failure, and retry it
        files = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")
        for name, values in parse_qs(urlsplit(target).query).items():
            if name in files and not os.path.exists(values[-1]):
                raise RedisUnavailableError(
                    f"cannot connect to Redis at {where}: the file {values[-1]!r} "
                    f"given as {name} does not exist"
                )
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(settings.connect_timeout),
        wait=tenacity.wait_exponential(multiplier=0.05, max=1.0),
        retry=tenacity.retry_if_exception(worth_retrying),
        reraise=True,
    )
    made: list[Client] = []

    def ping() -> None:
        # a cluster's client asks for the cluster's layout when it is made: inside the
        # retries, so that a cluster still starting is waited for like a server
        if not made:
            made.append(redis_from(target, settings.socket_timeout))
        made[0].ping()

    try:
        retrying(ping)
    except redis.RedisError as exc:
        client = made[0] if made else None
        close(client, target)
        message = redis_errors.explain(
            exc,
            where,
            has_password=_has_password(client, target),
            acl_hint="grant the node ACL from dim's docs (Connecting)",
            unreachable=f"cannot reach Redis at {{where}} within {settings.connect_timeout:g} s",
        )
        raise RedisUnavailableError(message) from exc
    return made[0]


def _has_password(client: Optional[Client], target: Union[str, Client]) -> bool:
    if isinstance(client, redis.Redis):
        return bool(client.connection_pool.connection_kwargs.get("password"))
    if isinstance(client, RedisCluster):
        return bool(client.nodes_manager.connection_kwargs.get("password"))
    return isinstance(target, str) and urlsplit(target).password is not None


def close(client: Optional[Client], target: Union[str, Client]) -> None:
    """Close a client dim made (never the caller's own)."""
    if client is not None and client is not target:
        try:
            close_client(client)
        except Exception:
            log.debug("closing the Redis client failed", exc_info=True)


def eviction_policy(client: Client) -> Optional[str]:
    """Redis's ``maxmemory-policy``, or None when it cannot be read (``INFO`` refused by
    an ACL, not answered, a cluster moving).

    Read on the connection :func:`connect` just made, before any other thread needs one:
    read later, when dim's loops use the pool's connection, it costs a new connection.
    """
    try:
        info = client.info("memory")
    except Exception:  # nothing to say; the warning is only advice
        log.debug("could not read Redis's eviction policy", exc_info=True)
        return None
    if isinstance(client, RedisCluster) and "maxmemory_policy" not in info:
        info = next((v for v in info.values() if isinstance(v, dict)), {})
    policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
    return str(policy) if policy else None


def warn_eviction(policy: Optional[str], where: str) -> None:
    """Warn when Redis may evict keys: a claim evicted under memory pressure is a
    claim another node may take while its holder still runs the instance."""
    if policy and policy != "noeviction":
        log.warning(
            "Redis at %s evicts keys under memory pressure (maxmemory-policy %s): dim's "
            "claims must never be evicted; use maxmemory-policy noeviction",
            where,
            policy,
        )


def worth_retrying(exc: BaseException) -> bool:
    """Whether waiting may help: a server down, starting or loading; not a refusal.

    Not retried: a refused login, any error reply (a missing permission included), and a
    TLS certificate the client rejects (redis-py wraps it in a ConnectionError).
    """
    if redis_errors.refused_login(exc) or redis_errors.certificate_rejected(exc):
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError))
