"""A complete dim example: spread websocket-like clients over the processes of a service.

Run it in two or three terminals against the same Redis and watch the feeds spread out,
move when a process stops, and come back when it returns::

    export DIM_REDIS_URL=redis://localhost:6379/0   # the default
    python examples/basic.py

Stop a process with Ctrl-C: it disconnects its clients and hands them over at once. Kill
one with ``kill -9``: its clients start elsewhere once its lease expires (``node_ttl``).
Look at the cluster meanwhile with::

    dim status --service example
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Optional

from dim import Event, EventType, Manager, Settings

REDIS_URL = os.environ.get("DIM_REDIS_URL", "redis://localhost:6379/0")
SERVICE = "example"  # every process with this name on this Redis forms one cluster


class WebsocketClient:
    """A toy websocket client: a thread that would read messages until it is closed.

    A real one would connect in ``__init__`` (or a ``connect()`` method) and raise if it
    cannot; dim then retries ``create`` with backoff, and after a few failures lets
    another process try.
    """

    def __init__(self, url: str, token: Optional[int]) -> None:
        self.url = url
        # The fencing token of this instance's lease. A downstream system that remembers
        # the highest token it has seen per feed can refuse a stale owner's writes.
        self.token = token
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"client-{url}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        # Stand-in for `for message in websocket: handle(message)`.
        while not self._closed.wait(1.0):
            pass

    def ping(self) -> None:
        """Raise if the client is dead; dim then disconnects and recreates it."""
        if self._closed.is_set() or not self._thread.is_alive():
            raise ConnectionError(f"{self.url} is not connected")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)

    def __repr__(self) -> str:
        return f"<WebsocketClient {self.url} token={self.token}>"


def get_config() -> list[dict[str, Any]]:
    """The list of things to run. Each needs a unique ``id``; the rest is yours.

    Called on the leader only, every ``config_interval`` seconds: read it from your
    database or settings. If it raises, dim keeps the last good list. Changing a config's
    content makes its owner recreate that one instance.
    """
    return [{"id": n, "url": f"wss://feeds.example.com/{n}"} for n in range(1, 7)]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    def create(config: dict[str, Any]) -> WebsocketClient:
        # The claim is taken before create is called, so its lease is already readable.
        lease = manager.lease(config["id"])
        return WebsocketClient(config["url"], lease.token if lease else None)

    manager = Manager(
        get_config=get_config,
        create=create,  # returns the running instance (never None)
        healthcheck=lambda client: client.ping(),  # raising (or False) means unhealthy
        disconnect=lambda client: client.close(),  # stops an instance
        redis=REDIS_URL,
        service=SERVICE,
        # Optional: the defaults suit production; these make the example lively.
        settings=Settings(heartbeat_interval=0.5, node_ttl=3, leader_ttl=3, config_interval=5),
    )

    # Listeners run on one dedicated thread, in order; one that raises is only logged.
    def on_event(event: Event) -> None:
        detail = "" if event.config_id is None else f" config={event.config_id}"
        if event.token is not None:
            detail += f" token={event.token}"
        if event.error is not None:
            detail += f" error={event.error!r}"
        print(f"[{event.node_id}] {event.type.value}{detail}", flush=True)

    manager.add_listener(on_event)  # all events; or name some: add_listener(f, EventType.X)
    manager.add_listener(
        lambda event: print(f"  now running here: {sorted(manager.instances)}", flush=True),
        EventType.INSTANCE_CREATED,
        EventType.INSTANCE_DISCONNECTED,
    )

    # Stop on Ctrl-C (SIGINT) and on SIGTERM (what systemd, Docker and Kubernetes send).
    stopping = threading.Event()

    def request_stop(signum: int, frame: Optional[FrameType]) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    manager.start()  # joins the cluster and returns at once; raises if Redis is unreachable
    print(f"node {manager.node_id} joined service {SERVICE!r} on {REDIS_URL}; Ctrl-C stops")
    try:
        while not stopping.wait(10):
            print(f"  leader: {manager.is_leader}, running: {sorted(manager.instances)}")
    finally:
        # Graceful: disconnect every client, release the claims, leave, hand over the
        # leadership, so the other processes take over at once.
        manager.stop()
        print("stopped")


if __name__ == "__main__":
    main()
