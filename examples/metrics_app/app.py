"""A Flask app whose gunicorn workers share a list of feeds through dim, with one
Prometheus endpoint for all the workers (``prometheus_client``'s multiprocess mode).

Every worker runs its own manager, and its :class:`dim.metrics.PrometheusMetrics` (built
in ``gunicorn.conf.py``) writes to the directory named by ``PROMETHEUS_MULTIPROC_DIR``;
``GET /metrics``, whichever worker answers it, adds up the files of every live worker::

    cd examples/metrics_app
    export PROMETHEUS_MULTIPROC_DIR=/tmp/dim-metrics && mkdir -p $PROMETHEUS_MULTIPROC_DIR
    gunicorn -c gunicorn.conf.py          # 3 workers on 127.0.0.1:8000
    curl -s localhost:8000/metrics        # the three workers as one

Environment: ``PROMETHEUS_MULTIPROC_DIR`` (required), ``DIM_REDIS_URL`` (default
``redis://localhost:6379/0``), ``DIM_SERVICE`` (default ``metrics-feeds``),
``DIM_SETTINGS`` (JSON of dim.Settings fields), ``FEEDS`` (how many feeds, default 6).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from dim.contrib.flask import Dim


class Feed:
    """Stands in for a long-lived client (a websocket, a queue consumer...)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.url = config["url"]

    def close(self) -> None:
        pass


def get_config() -> list[dict[str, Any]]:
    count = int(os.environ.get("FEEDS", "6"))
    return [{"id": f"feed-{n}", "url": f"wss://feeds.example/{n}"} for n in range(count)]


class Workers:
    """``MultiProcessCollector`` over the directory's files, less those still empty.

    A process creates its file and only then sizes it (``prometheus_client``'s
    ``MmapedDict``); a scrape in between would fail on the empty file, and with it every
    metric. Sizing only grows a file, so one whose size is read non-zero reads whole.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def collect(self) -> Iterator[Metric]:
        files = []
        for path in self.directory.glob("*.db"):
            try:
                if path.stat().st_size:
                    files.append(str(path))
            except FileNotFoundError:  # a dead worker's gauges, just removed
                pass
        return iter(MultiProcessCollector.merge(files, accumulate=True))


dim_ext = Dim(get_config=get_config, create=Feed, disconnect=Feed.close)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        DIM_REDIS_URL=os.environ.get("DIM_REDIS_URL", "redis://localhost:6379/0"),
        DIM_SERVICE=os.environ.get("DIM_SERVICE", "metrics-feeds"),
        DIM_SETTINGS=json.loads(os.environ.get("DIM_SETTINGS", "{}")),
    )
    dim_ext.init_app(app)

    @app.get("/metrics")
    def metrics() -> Response:
        # a registry per scrape, holding only the collector of the shared directory
        # (not this worker's own metrics: they are in the directory too)
        registry = CollectorRegistry()
        registry.register(Workers(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    return app


app = create_app()
