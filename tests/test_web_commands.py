"""``manage.py dim ...`` and ``flask dim ...`` run for real, on the example projects under
``examples/``, and Django's system checks of ``settings.DIM``.

Each command is a subprocess on the session Redis. The example apps append ``<event>
<pid> <feed id> <token>`` to a ledger file at each create and disconnect, so the ``run``
tests see every instance disconnected before the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dim.admin import Admin
from dim.keys import Keys
from dim.status import ClusterStatus, NodeStatus
from dim.testing import free_port, wait_until

from .helpers import assert_one_line_error

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
FLASK_APP = ROOT / "examples" / "flask_app"
DJANGO_APP = ROOT / "examples" / "django_app"
DEADLINE = 40.0  # for conditions that take a second or two when all is well
FEEDS = 4
# roomy enough for a loaded machine; a new service waits one lease (4.7 s) before placing
TIMINGS = {
    "heartbeat_interval": 0.2,
    "node_ttl": 2.0,
    "leader_ttl": 2.0,
    "config_interval": 0.5,
    "create_timeout": 2.0,
    "disconnect_timeout": 2.0,
    "connect_timeout": 5.0,
}

# A project with typos in settings.DIM, on the example's apps, with a database so that
# `migrate` has something to do; "dim.contrib.django" is listed by package.
TYPO_SETTINGS = """
import os

from settings import *  # the example project's

INSTALLED_APPS = ["django.contrib.contenttypes", "dim.contrib.django", "feeds"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["DATABASE"]}}
DIM = {**DIM, "TAGZ": ["eu"], "CREATE": "feeds.nowhere.create", "CAPACITY": -1}
"""

# The example project with AUTOSTART True: ready() starts the manager in every process,
# `manage.py dim run` included, which must still run one node; and more Manager options.
AUTOSTART_SETTINGS = """
from settings import *  # the example project's

INSTALLED_APPS = ["dim.contrib.django.DimConfig", "feeds"]
DIM = {
    **DIM,
    "AUTOSTART": True,
    "NODE_NAME": "django-worker",
    "TAGS": ["eu"],
    "CAPACITY": 10,
    "WEIGHT": 2.0,
    "REQUIRES": "tags",
    "PRIORITY": "rank",
}
"""

# What web processes use when dedicated workers (`manage.py dim run`) run the instances.
WORKER_SETTINGS = """
from settings import *  # the example project's

DIM = {**DIM, "AUTOSTART": False}
"""


def command_env(tmp_path: Path, redis_url: str, service: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIM_", "FLASK_"))}
    path = [str(ROOT), str(tmp_path), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env.pop("SERVER_SOFTWARE", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(
        DIM_REDIS_URL=redis_url,
        DIM_SERVICE=service,
        DIM_SETTINGS=json.dumps(TIMINGS),
        FEEDS=str(FEEDS),
        FEEDS_LEDGER=str(tmp_path / "ledger"),
    )
    env.update(extra)
    return env


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=DJANGO_APP,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
    )


def flask(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *args],
        cwd=FLASK_APP,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
    )


def never_joined(client: redis.Redis, service: str) -> bool:
    return list(client.scan_iter(match=Keys(service).prefix + "*")) == []


def status(redis_url: str, service: str) -> ClusterStatus:
    with Admin(redis_url, service) as admin:
        return admin.status()


def still_open(ledger: Path) -> list[str]:
    """Feeds created and not disconnected, per the ledger."""
    count: dict[str, int] = {}
    lines = ledger.read_text(encoding="utf-8").splitlines() if ledger.exists() else []
    for line in lines:
        event, _, feed, _ = line.split()
        count[feed] = count.get(feed, 0) + (1 if event == "create" else -1)
    return sorted(feed for feed, n in count.items() if n > 0)


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Any]:
    """Start long-running commands; any still running after the test is killed."""
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"command-{len(started)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def runs_one_node_then_leaves(
    proc: subprocess.Popen[bytes], redis_url: str, service: str, ledger: Path, log: Path
) -> NodeStatus:
    """The process is the cluster's one node and runs every feed; SIGTERM: it leaves, 0.

    Returns the node as it ran."""

    def running() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {log.read_text()}")
        nodes = status(redis_url, service).nodes
        return any(n.pid == proc.pid and n.running == FEEDS for n in nodes)

    try:
        wait_until(running, DEADLINE, interval=0.1)
    except TimeoutError:
        raise AssertionError(f"no node ran the feeds: {status(redis_url, service)}") from None
    nodes = status(redis_url, service).nodes
    assert [n.pid for n in nodes] == [proc.pid]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE) == 0, log.read_text()
    assert status(redis_url, service).nodes == []
    assert still_open(ledger) == []
    return nodes[0]


# -- Flask ----------------------------------------------------------------------------------


def test_flask_dim_status_reads_the_apps_cluster(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """``flask dim status --json`` uses the app's Redis and service, and joins nothing."""
    result = flask("dim", "status", "--json", env=command_env(tmp_path, redis_url, service))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["service"] == service
    assert never_joined(redis_client, service)
    assert "usage: flask dim" in flask("dim", "--help", env=os.environ.copy()).stdout


def test_flask_dim_errors_keep_their_exit_code(
    tmp_path: Path, redis_url: str, service: str
) -> None:
    """A bad argument exits 2 with one line naming ``flask dim``."""
    result = flask("dim", "drain", "no-such-node", env=command_env(tmp_path, redis_url, service))
    assert assert_one_line_error(result, 2).startswith("flask dim drain: error: ")


def test_flask_dim_run_runs_the_apps_manager_until_sigterm(
    tmp_path: Path, redis_url: str, service: str, background: Any
) -> None:
    """``flask dim run`` (DIM_AUTOSTART False): one node runs every feed, and leaves on
    SIGTERM with exit 0."""
    # the app as its web processes configure it when dedicated workers run the instances
    env = command_env(tmp_path, redis_url, service, DIM_AUTOSTART="false")
    proc = background(["-m", "flask", "--app", "app", "dim", "run"], FLASK_APP, env)
    log = tmp_path / "command-0.log"
    runs_one_node_then_leaves(proc, redis_url, service, tmp_path / "ledger", log)


# -- Django ---------------------------------------------------------------------------------


def test_manage_py_dim_status_reads_the_projects_cluster(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """``manage.py dim status --json`` uses settings.DIM, and joins nothing (Django's own
    ``--settings``, applied by manage.py, is not passed on)."""
    env = command_env(tmp_path, redis_url, service)
    result = manage("dim", "status", "--settings", "settings", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["service"] == service
    assert never_joined(redis_client, service)
    assert "usage: manage.py dim" in manage("dim", "--help", env=env).stdout
    assert "usage: manage.py dim" in manage("help", "dim", env=env).stdout


def test_manage_py_dim_status_joins_nothing_even_with_autostart(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """With AUTOSTART True, ``manage.py dim status`` (a deploy gate's command) still
    joins nothing: a gate that joined would count itself and take configs."""
    (tmp_path / "autostart_settings.py").write_text(AUTOSTART_SETTINGS, encoding="utf-8")
    env = command_env(tmp_path, redis_url, service, DJANGO_SETTINGS_MODULE="autostart_settings")
    result = manage("dim", "status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["nodes"] == []
    assert never_joined(redis_client, service)


def test_manage_py_dim_errors_keep_their_exit_code(
    tmp_path: Path, redis_url: str, service: str
) -> None:
    """A bad argument exits 2 with one line naming ``manage.py dim``."""
    result = manage("dim", "drain", "no-such-node", env=command_env(tmp_path, redis_url, service))
    assert assert_one_line_error(result, 2).startswith("manage.py dim drain: error: ")


@pytest.mark.parametrize("settings", ["settings", "autostart_settings", "worker_settings"])
def test_manage_py_dim_run_runs_one_node_until_sigterm(
    tmp_path: Path, redis_url: str, service: str, background: Any, settings: str
) -> None:
    """``manage.py dim run`` runs one node (AUTOSTART None, True or False), leaves on
    SIGTERM, exits 0; the node has the Manager options of settings.DIM."""
    (tmp_path / "autostart_settings.py").write_text(AUTOSTART_SETTINGS, encoding="utf-8")
    (tmp_path / "worker_settings.py").write_text(WORKER_SETTINGS, encoding="utf-8")
    env = command_env(tmp_path, redis_url, service, DJANGO_SETTINGS_MODULE=settings)
    proc = background(["manage.py", "dim", "run"], DJANGO_APP, env)
    log = tmp_path / "command-0.log"
    node = runs_one_node_then_leaves(proc, redis_url, service, tmp_path / "ledger", log)
    if settings == "autostart_settings":
        assert (node.node_id, node.tags, node.capacity, node.weight) == (
            "django-worker",
            ("eu",),
            10,
            2.0,
        )


def typo_env(tmp_path: Path, redis_url: str, service: str) -> dict[str, str]:
    (tmp_path / "typo_settings.py").write_text(TYPO_SETTINGS, encoding="utf-8")
    return command_env(
        tmp_path,
        redis_url,
        service,
        DJANGO_SETTINGS_MODULE="typo_settings",
        DATABASE=str(tmp_path / "db.sqlite3"),
    )


def test_manage_py_check_reports_typos_in_settings_dim(
    tmp_path: Path, redis_url: str, service: str
) -> None:
    """``manage.py check``: each typo is a dim.E00x error naming its key; exit 1."""
    env = typo_env(tmp_path, redis_url, service)
    result = manage("check", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    err = result.stderr
    assert "dim.E002" in err and "unknown key 'TAGZ'" in err
    assert "dim.E004" in err and "settings.DIM['CREATE'] = 'feeds.nowhere.create'" in err
    assert "dim.E006" in err and "settings.DIM['CAPACITY']" in err


def test_migrate_still_runs_with_a_typo_in_settings_dim(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """``manage.py migrate`` applies the migrations and shows the typo as a warning."""
    env = typo_env(tmp_path, redis_url, service)
    result = manage("migrate", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Applying contenttypes.0001_initial... OK" in result.stdout
    assert "dim.W002" in result.stderr and "TAGZ" in result.stderr
    assert never_joined(redis_client, service)


def test_manage_py_dim_run_with_a_typo_exits_1_with_assert_one_line_error(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """Starting a node on bad settings fails clearly: one line naming the key, exit 1."""
    env = typo_env(tmp_path, redis_url, service)
    line = assert_one_line_error(manage("dim", "run", env=env), 1)
    assert line.startswith("manage.py dim run: settings.DIM has unknown key 'TAGZ'"), line
    assert never_joined(redis_client, service)


def test_gunicorn_does_not_serve_with_a_typo_in_settings_dim(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """Under gunicorn a wrong settings.DIM fails the worker's boot, naming the key."""
    env = typo_env(tmp_path, redis_url, service)
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # gunicorn's control socket: one per test
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "--bind",
            f"127.0.0.1:{free_port()}",
            "--workers",
            "1",
        ],
        cwd=DJANGO_APP,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
    )
    assert result.returncode != 0
    assert "settings.DIM has unknown key 'TAGZ'" in result.stderr
    assert never_joined(redis_client, service)
