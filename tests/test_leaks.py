"""Start/stop cycles leak no thread, connection, file descriptor or key."""

from __future__ import annotations

import os
import threading

import pytest
import redis

from dim import Manager
from dim.keys import Keys
from dim.testing import RedisServer, wait_until

from .helpers import FAST

# real processes, servers or faults: run on one interpreter (tox: py311)
pytestmark = pytest.mark.slow


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _clients(client: redis.Redis) -> int:
    return len(client.client_list())


def test_fifty_start_stop_cycles_leak_nothing(own_redis: RedisServer, service: str) -> None:
    """50 start/stop cycles of a manager running 3 instances leave the thread count,
    Redis connections, open files and the service's keys where they started."""
    # A private server: the connection count is the server's, and on the session server
    # a process or thread left by an earlier test of this worker may (re)connect meanwhile.
    redis_url = own_redis.url
    redis_client = own_redis.client(decode_responses=False)
    created: list[int] = []
    closed: list[int] = []
    manager = Manager(
        lambda: [1, 2, 3],
        lambda c: created.append(c) or c,
        disconnect=closed.append,
        healthcheck=lambda i: True,
        redis=redis_url,
        service=service,
        settings=FAST,
    )
    # one warm-up cycle loads modules and lazily created pools before we count
    manager.start()
    assert manager.wait_until_stable(10)
    manager.stop()
    threads, fds, clients = threading.active_count(), _open_fds(), _clients(redis_client)
    for _ in range(50):
        manager.start()
        assert manager.wait_until_stable(10)
        assert sorted(manager.instances) == [1, 2, 3]
        manager.stop()
    assert len(created) == len(closed) == 51 * 3
    # threads that were abandoned on stop have already been joined or end at once
    wait_until(
        lambda: threading.active_count() <= threads,
        5,
        message=f"threads: {[t.name for t in threading.enumerate()]}",
    )
    wait_until(lambda: _clients(redis_client) <= clients, 5, message="Redis connections leak")
    assert _open_fds() <= fds + 2
    prefix = Keys(service).prefix
    left = sorted(k.decode()[len(prefix) :] for k in redis_client.keys(prefix + "*"))
    redis_client.close()
    assert left == ["configs", "era", "fence", "left", "version"]
