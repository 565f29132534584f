"""Shared fixtures: private Redis servers (never the machine's 6379) and unique names.

* ``redis_server`` -- one private server for the whole session, shared by all tests.
* ``redis_url`` / ``redis_client`` -- a URL for it and a fresh bytes client on it.
* ``service`` -- a unique service name per test, so tests sharing the session server
  never see each other's keys (nothing is ever flushed).
* ``own_redis`` -- a private server for one test, free to kill, pause or restart.
* ``redis_factory`` -- starts more private servers with custom options for one test.
"""

from __future__ import annotations

import functools
import re
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import redis

from dim.testing import RedisServer, find_redis_server


@functools.cache
def server_lacks_tls() -> str:
    """Why the test server binary cannot serve TLS ("" when it can).

    A binary built without TLS says so at once when asked for a TLS port; one with TLS
    gets further (and stops at the missing certificate).
    """
    try:
        binary = find_redis_server()
        out = subprocess.run(
            [binary, "--port", "0", "--tls-port", "1", "--save", ""],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return ""  # the tests themselves report what is wrong with the server
    if "Failed finding TLS support" in out.stdout + out.stderr:
        return f"{binary} was built without TLS"
    return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the TLS tests (those using the ``pki`` fixture) when the server binary
    has no TLS (the embedded Valkey), as the report header says once. CI runs them on
    a redis-server that has TLS."""
    reason = server_lacks_tls() if any("pki" in _fixtures(i) for i in items) else ""
    if not reason:
        return
    kept = [i for i in items if "pki" not in _fixtures(i)]
    left_out = [i for i in items if "pki" in _fixtures(i)]
    config.hook.pytest_deselected(items=left_out)
    items[:] = kept


def _fixtures(item: pytest.Item) -> list[str]:
    return list(getattr(item, "fixturenames", ()))


def pytest_report_header(config: pytest.Config) -> str:
    """Which server binary the tests start (Redis or the embedded Valkey), said once."""
    try:
        binary = find_redis_server()
    except RuntimeError as exc:
        return f"dim test servers: none found ({exc})"
    try:
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        version = f"--version failed: {exc}"
    tls = server_lacks_tls()
    tls = f"; {tls}: the TLS tests are left out (deselected)" if tls else ""
    return f"dim test servers: {binary} ({version}){tls}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis server shared by the session; do not stop or pause it in a test."""
    server = RedisServer(directory=tmp_path_factory.mktemp("redis-session"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """The ``redis://127.0.0.1:PORT/0`` URL of the session server."""
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A ``redis.Redis`` client (bytes responses) on the session server, closed afterwards."""
    client = redis_server.client(decode_responses=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def service(request: pytest.FixtureRequest) -> str:
    """A service name unique to this test run: ``t-<test name>-<random hex>``.

    Tests share the session server, so isolation comes from this name alone;
    the fixture never flushes anything.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"t-{slug or 'test'}-{secrets.token_hex(4)}"


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private, already started server for one test, stopped afterwards (even if paused)."""
    server = RedisServer(directory=tmp_path_factory.mktemp("redis-own"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RedisServer]]:
    """Start private servers with custom options: ``redis_factory(password="pw")``.

    Keyword arguments go to :class:`dim.testing.RedisServer`; every server started
    through the factory is stopped when the test ends.
    """
    servers: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        kwargs.setdefault("directory", tmp_path_factory.mktemp("redis-extra"))
        server = RedisServer(**kwargs)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
