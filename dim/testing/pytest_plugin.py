"""A pytest plugin for testing code that uses dim: a private server and fast settings.

Installed with dim (the ``pytest11`` entry point ``dim``), so its fixtures are there in
any project that has pytest and dim; it adds nothing else (no option, no hook):

``dim_redis``
    The URL of a private Redis server (``redis-server`` from ``PATH``, else the
    embedded Valkey of ``dim-manager[embedded]``) started on a free port for the
    session and stopped after it; never a server you run. Nothing is ever flushed: tests
    keep apart through ``dim_service``.
``dim_service``
    A service name unique to the test.
``dim_settings``
    :func:`dim.testing.fast_settings`: a heartbeat every 0.1 s, a node lapses after 1 s.

Example (``docs/testing.rst``)::

    def test_every_feed_runs_here(dim_redis, dim_service, dim_settings):
        manager = Manager(
            get_config=..., create=..., redis=dim_redis, service=dim_service, settings=dim_settings
        )
        with manager:
            assert manager.wait_until_stable(timeout=30)
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from dim.settings import Settings
from dim.testing._server import RedisServer
from dim.testing._settings import fast_settings

__all__ = ["dim_redis", "dim_redis_server", "dim_service", "dim_settings"]


@pytest.fixture(scope="session")
def dim_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The private :class:`~dim.testing.RedisServer` behind ``dim_redis`` (session-wide:
    do not stop or pause it; start your own for fault tests)."""
    with RedisServer(directory=tmp_path_factory.mktemp("dim-redis")) as server:
        yield server


@pytest.fixture(scope="session")
def dim_redis(dim_redis_server: RedisServer) -> str:
    """The ``redis://127.0.0.1:PORT/0`` URL of the session's private server."""
    return dim_redis_server.url


@pytest.fixture
def dim_service(request: pytest.FixtureRequest) -> str:
    """A service name unique to this test: ``test-<test name>-<random hex>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"test-{slug or 'dim'}-{secrets.token_hex(4)}"


@pytest.fixture
def dim_settings() -> Settings:
    """:func:`dim.testing.fast_settings` (short heartbeats and leases)."""
    return fast_settings()
