"""A Flask app whose worker processes share a list of feeds through dim.

Each feed runs in exactly one gunicorn worker; ``GET /dim`` tells which ones run in the
worker that answered. Run it with the ``gunicorn.conf.py`` beside this file::

    cd examples/flask_app
    gunicorn -c gunicorn.conf.py          # 3 workers on 127.0.0.1:8000, --preload
    curl -s localhost:8000/dim            # pid, node and feeds of one worker
    flask --app app dim status            # the whole cluster

or without gunicorn: ``flask --app app run`` (one process runs every feed). To keep the
feeds out of the web workers, run them in worker processes of their own::

    DIM_AUTOSTART=false gunicorn -c gunicorn.conf.py   # the web workers join nothing
    flask --app app dim run                            # a worker: until SIGTERM or Ctrl-C

Environment: ``DIM_REDIS_URL`` (default ``redis://localhost:6379/0``), ``DIM_SERVICE``
(default ``flask-feeds``), ``DIM_SETTINGS`` (JSON of dim.Settings fields),
``DIM_AUTOSTART`` (``false``: the app joins only through ``flask dim run``), ``FEEDS``
(how many feeds, default 6), ``FEEDS_LEDGER`` (a file to which every create and
disconnect appends ``<event> <pid> <feed id> <token>``).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from flask import Flask, jsonify

from dim.contrib.flask import Dim


class Feed:
    """Stands in for a long-lived client (a websocket, a queue consumer...)."""

    def __init__(self, config: dict[str, Any], token: int) -> None:
        self.id = config["id"]
        self.url = config["url"]
        self.token = token  # the lease's fencing token: give it to what the feed writes to
        self.open = True
        record("create", self)

    def ping(self) -> None:
        if not self.open:
            raise ConnectionError(self.url)

    def close(self) -> None:
        self.open = False
        record("disconnect", self)


_ledger_lock = threading.Lock()


def record(event: str, feed: Feed) -> None:
    path = os.environ.get("FEEDS_LEDGER")
    if path:
        with _ledger_lock, open(path, "a", encoding="utf-8") as ledger:
            ledger.write(f"{event} {os.getpid()} {feed.id} {feed.token}\n")


def get_config() -> list[dict[str, Any]]:
    count = int(os.environ.get("FEEDS", "6"))
    return [{"id": f"feed-{n}", "url": f"wss://feeds.example/{n}"} for n in range(count)]


def create(config: dict[str, Any]) -> Feed:
    lease = dim_ext.manager.lease(config["id"])
    return Feed(config, lease.token if lease is not None else -1)


# not named `dim`: that would hide the package
dim_ext = Dim(get_config=get_config, create=create, healthcheck=Feed.ping, disconnect=Feed.close)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        DIM_REDIS_URL=os.environ.get("DIM_REDIS_URL", "redis://localhost:6379/0"),
        DIM_SERVICE=os.environ.get("DIM_SERVICE", "flask-feeds"),
        DIM_SETTINGS=json.loads(os.environ.get("DIM_SETTINGS", "{}")),
        # "false" for web processes when dedicated workers (`flask dim run`) run the feeds
        DIM_AUTOSTART=os.environ.get("DIM_AUTOSTART", "true") != "false",
    )
    dim_ext.init_app(app)

    @app.get("/dim")
    def where() -> Any:
        manager = dim_ext.manager
        return jsonify(
            pid=os.getpid(),
            node=manager.node_id,
            leader=manager.is_leader,
            instances=sorted(manager.instances),
        )

    return app


app = create_app()
