"""dim.metrics in prometheus_client's multiprocess mode: the example under
``examples/metrics_app/`` served by a real gunicorn with several workers, each running
its own manager, and scraped over HTTP through ``MultiProcessCollector``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from dim import __version__
from dim.testing import wait_until

from .test_frameworks import DEADLINE, ROOT, TIMINGS, _env, _status, run_gunicorn
from .test_metrics import Scrape, until

pytest.importorskip("prometheus_client")
pytest.importorskip("gunicorn")

METRICS_APP = ROOT / "examples" / "metrics_app"
__all__ = ["run_gunicorn"]  # the fixture, shared with test_frameworks


@pytest.mark.slow  # gunicorn processes: one interpreter is enough
def test_one_scrape_adds_up_the_gunicorn_workers(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str, run_gunicorn: Any
) -> None:
    """Three workers each run a manager and its metrics; any worker's /metrics adds them up:
    every instance of every worker, one leader, the cluster's counts from the leader, no
    pid label, even while a process's file is being created. A worker killed with SIGKILL
    (the leader) drops out of the sums (the example's child_exit marks it dead) while its
    counts stay in the counters; the worker gunicorn starts in its place joins them."""
    configs = 9
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "gauge_livesum_999999.db").write_bytes(b"")  # an earlier run's file
    env = _env(
        tmp_path,
        DIM_REDIS_URL=redis_url,
        DIM_SERVICE=service,
        DIM_SETTINGS=json.dumps(TIMINGS),
        FEEDS=str(configs),
        PROMETHEUS_MULTIPROC_DIR=str(directory),
    )
    server = run_gunicorn(["-c", "gunicorn.conf.py", "--workers", "3"], METRICS_APP, env)
    server.wait_answering("/metrics")
    assert not (directory / "gauge_livesum_999999.db").exists()  # on_starting emptied it
    wait_until(lambda: len(server.workers()) == 3, DEADLINE, message="3 workers")

    def scrape() -> Scrape:
        code, body = server.get("/metrics")
        assert code == 200, body
        return Scrape(body)

    whole = {
        "dim_instances": configs,  # each worker runs a third: only the sum is 9
        "dim_leader": 1,
        "dim_nodes": 3,
        "dim_configs": configs,
        "dim_configs_running": configs,
        "dim_configs_not_running": 0,
        "dim_configs_unplaceable": 0,
        "dim_configs_pending_handoff": 0,
    }

    def adds_up(s: Scrape, **expected: int) -> bool:
        return all(s.get(n, dim_service=service) == v for n, v in expected.items())

    s = until(scrape, lambda s: adds_up(s, **whole), DEADLINE)
    # a process that has just created its file and not yet sized it (prometheus_client
    # does the two apart): a scrape in between still answers, with the same sums
    (directory / "counter_999998.db").write_bytes(b"")
    s = scrape()
    assert adds_up(s, **whole), s
    workers = server.workers()
    assert sorted(n.running for n in _status(redis_client, service).nodes) == [3, 3, 3]
    assert {n.pid for n in _status(redis_client, service).nodes} == workers
    assert s.label_names() == {"dim_service", "le", "version"}  # no pid: livesum, livemax
    assert s.get("dim_build_info", version=__version__) == 1
    created = s.get("dim_instances_created_total", dim_service=service)
    assert created is not None and created >= configs
    assert s.get("dim_leadership_gained_total", dim_service=service) == 1

    # the leader dies without a word: child_exit takes its gauges out of the sums (or
    # they would count its instances and its leadership for ever)
    status = _status(redis_client, service)
    (leader,) = [n for n in status.nodes if n.node_id == status.leader]
    assert leader.pid is not None
    os.kill(leader.pid, signal.SIGKILL)
    wait_until(
        lambda: len(server.workers()) == 3 and leader.pid not in server.workers(),
        DEADLINE,
        message="a worker in place of the killed one",
    )
    s = until(scrape, lambda s: adds_up(s, dim_leadership_gained_total=2, **whole), DEADLINE)
    assert not list(directory.glob(f"gauge_live*_{leader.pid}.db"))
    assert list(directory.glob(f"counter_{leader.pid}.db"))  # its counts stay
    again = s.get("dim_instances_created_total", dim_service=service)
    assert again is not None and again >= created + 3  # its share was created again
    assert server.terminate() == 0, server.output()
