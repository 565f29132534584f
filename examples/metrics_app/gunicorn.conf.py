"""gunicorn settings for the metrics example: ``gunicorn -c gunicorn.conf.py``.

Besides dim's two hooks (see ``examples/flask_app/gunicorn.conf.py``), three things make
one scrape show every worker, all in ``prometheus_client``'s multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` set in the environment of the whole server):

* ``on_starting`` empties the directory, so that the files of an earlier run do not
  add up with this one's;
* ``post_fork`` builds the worker's :class:`~dim.metrics.PrometheusMetrics` on the
  worker's own manager, before that manager starts (so it hears the first election);
* ``child_exit`` runs in the master for every worker that exits, SIGKILL included:
  ``mark_process_dead`` takes that worker's gauges (its instances, its leadership, the
  cluster's counts if it led) out of the sums. Its counters stay: they count what
  happened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess

from dim.contrib import post_fork as start_dim
from dim.contrib import worker_exit

__all__ = ["child_exit", "on_starting", "post_fork", "worker_exit"]  # gunicorn's hooks

wsgi_app = "app:app"
bind = "127.0.0.1:8000"
workers = 3
preload_app = True
graceful_timeout = 20  # longer than dim's disconnect_timeout (10 s by default)


def on_starting(server: Any) -> None:
    for path in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        path.unlink()


def post_fork(server: Any, worker: Any) -> None:
    from app import dim_ext as extension  # loaded in the master (preload_app) or here

    from dim.metrics import PrometheusMetrics

    PrometheusMetrics(extension.manager)  # this worker's manager, not started yet
    start_dim(server, worker)  # starts it


def child_exit(server: Any, worker: Any) -> None:
    multiprocess.mark_process_dead(worker.pid)
