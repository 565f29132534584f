"""dim's Redis URLs: one server, a master found through Sentinel, or a Redis Cluster,
and the client each one describes.

``redis://``, ``rediss://`` and ``unix://`` are redis-py's own (``Redis.from_url``).
redis-py has no URL for the other two, so dim reads these (``rediss+`` for TLS):

``redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB][?OPTIONS]``
    the sentinels (port 26379 unless given) and the name of the master they watch; the
    client asks them where the master is and follows failovers
    (``Sentinel(...).master_for(MASTER)``).
``redis+cluster://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/0][?OPTIONS]``
    one or more nodes of the cluster (port 6379 unless given), from which the client
    discovers the rest (``RedisCluster(startup_nodes=...)``). The database is 0.

The user, the password and the query options are redis-py's, as ``from_url`` reads them
(``socket_timeout``, ``ssl_ca_certs``, ...), for the connections to the data: the master,
or every node of the cluster. The sentinels have their own login, in two more options,
``sentinel_username`` and ``sentinel_password``; over ``rediss+sentinel://`` they are
reached with TLS too, with the same ``ssl_*`` options.

Nothing here talks to Redis except :func:`client_from_url` for a cluster, which (as
redis-py does) asks a node for the cluster's layout when it is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import attrs
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

from dim.errors import ConfigError

__all__ = [
    "SCHEMES",
    "Target",
    "check_url",
    "client_from_url",
    "close_client",
    "parse",
    "safe_url",
    "url_with",
]

#: A client dim talks through: one server (a Sentinel-managed master included), or a
#: Redis Cluster.
Client = Union[redis.Redis, RedisCluster]

#: The URL schemes dim connects with.
SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)
TLS_SCHEMES = ("rediss", "rediss+sentinel", "rediss+cluster")

#: Query options whose values are secrets (``***`` in messages).
SECRET_OPTIONS = ("password", "ssl_password", "sentinel_password")
#: Query options for the sentinels' own connections.
SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
DEFAULT_PORTS = {"sentinel": 26379, "cluster": 6379}


def safe_url(url: str) -> str:
    """The URL without its secrets, for messages.

    The password becomes ``***``, and so do the values of the query options that are
    secrets (``password``, ``ssl_password``, ``sentinel_password``). Everything else
    stays, so the message still names the user, hosts, port, database and TLS files.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is not None:
        # rebuilt from the raw netloc: parts.port raises on a malformed port
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}:***@{hostport}")
    if parts.query:
        fields = parts.query.split("&")
        for i, field in enumerate(fields):
            name, sep, _ = field.partition("=")
            if sep and name.lower() in SECRET_OPTIONS:
                fields[i] = f"{name}=***"
        parts = parts._replace(query="&".join(fields))
    return urlunsplit(parts)


@attrs.frozen
class Target:
    """What a URL says: where to connect, and with which redis-py options.

    :ivar kind: ``'server'`` (redis://, rediss://, unix://), ``'sentinel'`` or
        ``'cluster'``.
    :ivar hosts: the sentinels, or the cluster's startup nodes (empty for a server).
    :ivar master: the name of the master the sentinels watch (Sentinel only).
    :ivar options: redis-py connection options for the data connections (the user, the
        password, ``db``, ``ssl`` and the query options).
    :ivar sentinel_options: the sentinels' own login (Sentinel only).
    """

    kind: str
    hosts: tuple[tuple[str, int], ...] = ()
    master: Optional[str] = None
    options: Mapping[str, Any] = attrs.field(factory=dict)
    sentinel_options: Mapping[str, Any] = attrs.field(factory=dict)


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def parse(url: str) -> Target:
    """Read a URL (no I/O).

    :raises ConfigError: an unknown scheme or a malformed URL (the message hides its
        secrets).
    """
    if not isinstance(url, str):
        raise ConfigError(f"a Redis URL must be a str, got {url!r}", url)
    scheme = _scheme(url)
    if scheme not in SCHEMES:
        raise ConfigError(
            "redis URL must start with redis://, rediss://, unix://, redis+sentinel:// or "
            f"redis+cluster:// (rediss+... for TLS), got {safe_url(url)!r}",
            url,
        )
    try:
        parts = urlsplit(url)
        if "+" not in scheme:
            parts.port  # noqa: B018 - raises ValueError for a malformed port
            return Target("server", options=parse_url(url))  # type: ignore[no-untyped-call]
        return _parse_multi(url, scheme, parts)
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {safe_url(url)!r}: {exc}", url) from None


def _parse_multi(url: str, scheme: str, parts: Any) -> Target:
    """A redis+sentinel:// or redis+cluster:// URL (ValueError when malformed)."""
    base, _, kind = scheme.partition("+")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    hosts = tuple(_host(h, DEFAULT_PORTS[kind]) for h in hostlist.split(","))
    names = [unquote(p) for p in parts.path.split("/")[1:] if p]
    master = None
    if kind == "sentinel":
        if not names:
            raise ValueError(
                "it names no master: redis+sentinel://HOST:26379[,HOST:26379...]/MASTER[/DB]"
            )
        master, *names = names
    if len(names) > 1 or (names and not names[0].isdigit()):
        what = "the master and a database number" if master else "a database number"
        raise ValueError(f"the path {parts.path!r} should name {what}")
    # the rest is what redis-py reads from a plain URL: user, password, db, query options
    fields = [f for f in parts.query.split("&") if f]
    sentinel_fields = [f for f in fields if f.partition("=")[0] in SENTINEL_OPTIONS]
    rest = [f for f in fields if f not in sentinel_fields]
    auth = f"{userinfo}@" if userinfo else ""
    db = f"/{names[0]}" if names else ""
    plain = f"{base}://{auth}localhost{db}" + (f"?{'&'.join(rest)}" if rest else "")
    options: dict[str, Any] = parse_url(plain)  # type: ignore[no-untyped-call]
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    if base == "rediss":
        options["ssl"] = True
    if kind == "cluster" and options.pop("db", 0) != 0:
        raise ValueError("a Redis Cluster has only database 0")
    sentinel_options = {}
    for field in sentinel_fields:
        name, _, value = field.partition("=")
        sentinel_options[name.replace("sentinel_", "", 1)] = unquote(value)
    return Target(kind, hosts, master, options, sentinel_options)


def _host(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"empty host in {text!r}")
    if not port_text:
        return unquote(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid port {port_text!r}")
    return unquote(host), int(port_text)


def check_url(url: str) -> str:
    """``url``, if dim can connect with it (see :func:`parse`).

    :raises ConfigError: an unknown scheme or a malformed URL.
    """
    parse(url)
    return url


def client_from_url(url: str, **defaults: Any) -> Client:
    """The client ``url`` describes; ``defaults`` are redis-py options that the URL's
    own query options override (as in ``Redis.from_url``).

    A cluster's client asks a node for the cluster's layout when it is made, so it may
    raise a :class:`redis.ConnectionError` (with the reason); the other clients connect
    on their first command.

    :raises ConfigError: see :func:`parse`.
    """
    target = parse(url)
    if target.kind == "server":
        return redis.Redis.from_url(url, **defaults)
    options = {**defaults, **target.options}
    if target.kind == "sentinel":
        assert target.master is not None
        # the sentinels get the socket options, the TLS options over rediss+sentinel://,
        # and their own login; not the data connections' retry or client name
        reach = {k: v for k, v in options.items() if k.startswith("socket_")}
        if options.get("ssl"):
            reach.update({k: v for k, v in options.items() if k.startswith("ssl")})
        reach.update(target.sentinel_options)
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=reach)
        master: redis.Redis = sentinel.master_for(target.master, **options)
        return master
    options.pop("retry", None)  # the cluster client's retry is its own policy
    nodes = [ClusterNode(host, port) for host, port in target.hosts]  # type: ignore[no-untyped-call]
    try:
        return RedisCluster(startup_nodes=nodes, **options)
    except RedisClusterException as exc:
        raise redis.ConnectionError(" ".join(str(exc).split())) from exc


def close_client(client: Client) -> None:
    """Close a client dim made, and the connections to its sentinels (if any)."""
    client.close()
    pool = getattr(client, "connection_pool", None)
    manager = getattr(pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()


def url_with(
    url: str,
    *,
    username: Optional[str] = None,
    password: Optional[str] = None,
    tls_ca: Optional[str] = None,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    sentinel_username: Optional[str] = None,
    sentinel_password: Optional[str] = None,
) -> str:
    """``url`` with these options in it, replacing the URL's own: the user and the
    password (of the data connections), the TLS files (``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``) and the sentinels' login. None leaves the URL's.

    :raises ConfigError: a TLS file for a URL without TLS, a sentinel login for a URL
        without Sentinel, or a URL that :func:`parse` refuses.
    """
    parse(url)
    scheme = _scheme(url)
    query = {
        "ssl_ca_certs": tls_ca,
        "ssl_certfile": tls_cert,
        "ssl_keyfile": tls_key,
        "sentinel_username": sentinel_username,
        "sentinel_password": sentinel_password,
    }
    given = {name: value for name, value in query.items() if value is not None}
    if scheme not in TLS_SCHEMES and set(given) & {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}:
        raise ConfigError(
            f"TLS files need a URL with TLS (rediss://, rediss+sentinel:// or "
            f"rediss+cluster://), got {safe_url(url)!r}",
            url,
        )
    if not scheme.endswith("+sentinel") and set(given) & set(SENTINEL_OPTIONS):
        raise ConfigError(
            f"a sentinel login needs a redis+sentinel:// URL, got {safe_url(url)!r}", url
        )
    parts = urlsplit(url)
    if username is not None or password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        old_user, colon, old_password = userinfo.partition(":")
        user = quote(username, safe="") if username is not None else old_user
        secret = quote(password, safe="") if password is not None else old_password
        auth = f"{user}:{secret}" if password is not None or colon else user
        parts = parts._replace(netloc=f"{auth}@{hostport}")
    if given:
        fields = [f for f in parts.query.split("&") if f and f.partition("=")[0] not in given]
        fields += [f"{name}={quote(value, safe='/')}" for name, value in given.items()]
        parts = parts._replace(query="&".join(fields))
    return urlunsplit(parts)
