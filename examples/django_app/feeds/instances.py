"""The dim callbacks, named by dotted path in ``settings.DIM``.

``FEEDS`` (environment) sets how many feeds there are (default 6); with ``FEEDS_LEDGER``
set, every create and disconnect appends ``<event> <pid> <feed id> <token>`` to it.
"""

import os
import threading
from typing import Any

import dim.contrib.django


class Feed:
    """Stands in for a long-lived client (a websocket, a queue consumer...)."""

    def __init__(self, config: dict, token: int) -> None:
        self.id = config["id"]
        self.url = config["url"]
        self.token = token  # the lease's fencing token: give it to what the feed writes to
        self.open = True


_ledger_lock = threading.Lock()


def record(event: str, feed: Feed) -> None:
    path = os.environ.get("FEEDS_LEDGER")
    if path:
        with _ledger_lock, open(path, "a", encoding="utf-8") as ledger:
            ledger.write(f"{event} {os.getpid()} {feed.id} {feed.token}\n")


def get_config() -> list:
    count = int(os.environ.get("FEEDS", "6"))
    return [{"id": f"feed-{n}", "url": f"wss://feeds.example/{n}"} for n in range(count)]


def create(config: Any) -> Feed:
    lease = dim.contrib.django.manager().lease(config["id"])
    feed = Feed(config, lease.token if lease is not None else -1)
    record("create", feed)
    return feed


def healthcheck(feed: Feed) -> None:
    if not feed.open:
        raise ConnectionError(feed.url)


def disconnect(feed: Feed) -> None:
    feed.open = False
    record("disconnect", feed)
