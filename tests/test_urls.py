"""dim's Redis URLs read without I/O (:mod:`dim.urls`): the Sentinel and Cluster forms,
their errors, secrets hidden in messages, and options folded into a URL (``url_with``).
The clients they make are run against real servers in test_sentinel.py,
test_redis_cluster.py and test_connections.py."""

from __future__ import annotations

import pytest
from redis.sentinel import SentinelConnectionPool

from dim import ConfigError, Manager
from dim.admin import Admin
from dim.urls import Target, check_url, client_from_url, close_client, parse, safe_url, url_with


def test_plain_urls_are_redis_pys() -> None:
    """redis://, rediss:// and unix:// are read by redis-py's own parser."""
    target = parse("redis://u:p%40ss@db.internal:6380/2?socket_timeout=0.5")
    assert target.kind == "server" and target.hosts == ()
    assert target.options["username"] == "u" and target.options["password"] == "p@ss"
    assert target.options["db"] == 2 and target.options["socket_timeout"] == 0.5
    assert parse("unix:///run/redis.sock?db=1").options["path"] == "/run/redis.sock"


def test_sentinel_url() -> None:
    """Sentinels (default port 26379), the master's name, the database, the data
    connections' login and options, and the sentinels' own login."""
    target = parse(
        "redis+sentinel://dimnode:s%3Acret@s1,s2:26380,[::1]:26381/mymaster/3"
        "?socket_timeout=0.5&sentinel_username=watch&sentinel_password=w%26pw"
    )
    assert target == Target(
        "sentinel",
        (("s1", 26379), ("s2", 26380), ("::1", 26381)),
        "mymaster",
        {"username": "dimnode", "password": "s:cret", "db": 3, "socket_timeout": 0.5},
        {"username": "watch", "password": "w&pw"},
    )
    assert parse("redis+sentinel://s1/mymaster").options == {}
    tls = parse("rediss+sentinel://s1/mymaster?ssl_ca_certs=/etc/ca.pem")
    assert tls.options == {"ssl": True, "ssl_ca_certs": "/etc/ca.pem"}


def test_cluster_url() -> None:
    """Startup nodes (default port 6379), database 0 only, TLS."""
    target = parse("rediss+cluster://:pw@n1:7000,n2/0?ssl_ca_certs=/etc/ca.pem")
    assert target.kind == "cluster" and target.master is None
    assert target.hosts == (("n1", 7000), ("n2", 6379))
    assert target.options == {"password": "pw", "ssl": True, "ssl_ca_certs": "/etc/ca.pem"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://:secret@localhost", "redis URL must start with redis://, rediss://, unix://"),
        ("redis+sentinel://:secret@s1:26379", "it names no master"),
        ("redis+sentinel://s1:26379/m/zero", "should name the master and a database number"),
        ("redis+sentinel://s1:26379/m/0/1", "should name the master and a database number"),
        ("redis+sentinel://:secret@s1:huge/m", "invalid port 'huge'"),
        ("redis+sentinel://s1:26379,/m", "empty host"),
        ("redis+cluster://:secret@n1/1", "a Redis Cluster has only database 0"),
        ("redis://:secret@localhost:99999/0", "invalid Redis URL"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    """A bad URL raises ConfigError naming the problem, with the password hidden; the
    Manager, the Admin and check_url refuse it when they are made."""
    for make in (
        check_url,
        lambda u: Manager(list, dict, redis=u, service="x"),
        lambda u: Admin(u, "x"),
    ):
        with pytest.raises(ConfigError) as info:
            make(url)
        assert message in str(info.value), str(info.value)
        assert "secret" not in str(info.value)


def test_safe_url_hides_every_secret() -> None:
    """The password and the secret query options become ***; the rest stays."""
    url = "redis+sentinel://u:pw@s1,s2:26380/m/0?sentinel_password=spw&ssl_password=k&x=1"
    assert safe_url(url) == (
        "redis+sentinel://u:***@s1,s2:26380/m/0?sentinel_password=***&ssl_password=***&x=1"
    )


def test_a_sentinel_client_is_made_without_io() -> None:
    """The client asks the sentinels for the master on its first command only; the
    sentinels get the socket options and their own login, not the master's."""
    client = client_from_url(
        "redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/mymaster/1?sentinel_password=spw",
        socket_timeout=0.25,
    )
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
        assert pool.connection_kwargs["password"] == "pw"
        assert pool.connection_kwargs["db"] == 1
        sentinels = pool.sentinel_manager.sentinels
        assert len(sentinels) == 2
        kwargs = sentinels[0].connection_pool.connection_kwargs
        assert kwargs["password"] == "spw" and kwargs["socket_timeout"] == 0.25
    finally:
        close_client(client)


def test_url_with_folds_options_in() -> None:
    """User, password (percent-encoded), TLS files and the sentinels' login replace the
    URL's own; None keeps them."""
    assert url_with("redis://h:1/0", password="p@ss:w/rd") == "redis://:p%40ss%3Aw%2Frd@h:1/0"
    assert url_with("redis://u:old@h/0", password="new") == "redis://u:new@h/0"
    assert url_with("redis://u:old@h/0", username="v") == "redis://v:old@h/0"
    assert url_with("redis://h/0", username="v") == "redis://v@h/0"
    assert url_with("unix:///run/r.sock?db=0", username="v", password="p") == (
        "unix://v:p@/run/r.sock?db=0"
    )
    assert url_with("redis://u:p@h/0") == "redis://u:p@h/0"
    tls = url_with("rediss://h/0?ssl_ca_certs=/old.pem&db=0", tls_ca="/ca.pem", tls_key="/k")
    assert tls == "rediss://h/0?db=0&ssl_ca_certs=/ca.pem&ssl_keyfile=/k"
    assert parse(tls).options["ssl_ca_certs"] == "/ca.pem"
    sentinel = url_with("redis+sentinel://s1/m", sentinel_password="s&p")
    assert parse(sentinel).sentinel_options == {"password": "s&p"}


def test_url_with_refuses_options_that_do_not_fit() -> None:
    """TLS files need a TLS URL, a sentinel login a Sentinel URL."""
    with pytest.raises(ConfigError, match="TLS files need a URL with TLS"):
        url_with("redis://:secret@h/0", tls_ca="/ca.pem")
    with pytest.raises(ConfigError, match="a sentinel login needs a redis\\+sentinel://"):
        url_with("redis+cluster://h", sentinel_username="watch")
